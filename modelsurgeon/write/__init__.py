"""The last stage of the pipeline: write the result, atomically, in the format its extension names.

* ``.pt/.pth/.ckpt`` -- the input's own container (full module, YOLO dict with every wrapped
  module rewritten, or state_dict + recipe) -- :mod:`.torch`
* ``.safetensors``   -- tensors + the metadata that rebuilds the structure -- :mod:`.torch`
* ``.onnx``          -- export + onnxruntime parity -- :mod:`.onnx_export`
* ``.weights``       -- darknet ``.weights`` + ``.cfg`` of a model read from darknet -- :mod:`.darknet`
* ``.caffemodel``    -- Caffe ``.caffemodel`` + ``.prototxt`` of a model read from Caffe -- :mod:`.caffe`
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput

TORCH_OUT = {".pt", ".pth", ".ckpt"}
FORMATS = {**{s: "pt" for s in TORCH_OUT}, ".safetensors": "safetensors", ".onnx": "onnx",
           ".weights": "darknet", ".caffemodel": "caffe"}


def output_format(path: Path) -> str:
    """The format an output path's extension names; ``.bin`` (a Hugging Face weights file, not
    torch's zip container) and anything else are refused rather than guessed."""
    if Path(path).is_dir():
        raise BadInput(f"output {path} is a directory: name a file (.pt/.pth/.ckpt, .safetensors, .onnx)",
                       code="output-is-directory")
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise BadInput(f"cannot tell the output format from {Path(path).name!r}: use .pt/.pth/.ckpt, "
                       ".safetensors, .onnx (.weights, .caffemodel for darknet / Caffe models)", code="output-format")
    return fmt

