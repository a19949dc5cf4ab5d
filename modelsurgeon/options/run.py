"""The options every run shares (input, verification, output), declared once: the CLI's common
parameters and the keyword arguments of ``ms.run`` and of the pass functions come from here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from .base import Options, finite_non_negative, option

DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32")

INPUT, VERIFICATION, OUTPUT, GENERAL = "Input", "Verification", "Output", "General"


def parse_dims(text: str) -> tuple[int, ...]:
    """``1,3,640,640`` (or ``1x3x640x640``) -> ``(1, 3, 640, 640)``; ``ValueError`` saying why not."""
    t = str(text).replace(" ", "")
    if not re.fullmatch(r"\d+([,x]\d+)*", t):
        raise ValueError("expected comma-separated integers like 1,3,224,224")
    dims = tuple(int(p) for p in re.split(r"[,x]", t))
    if any(d <= 0 for d in dims):
        raise ValueError("every dimension must be a positive integer")
    if len(dims) > 8:
        raise ValueError("more than 8 dimensions")
    if any(d > 2**31 - 1 for d in dims):
        raise ValueError("a dimension above 2**31 - 1")
    return dims


def shapes(value: Any) -> tuple[str, ...]:
    """One shape or several, as text (``"1,3,64,64"``, the CLI's form) or integers
    (``(1, 3, 64, 64)``, the API's) -> a tuple of texts, each checked."""
    if isinstance(value, str) or (isinstance(value, (list, tuple)) and value and
                                  all(isinstance(d, int) and not isinstance(d, bool) for d in value)):
        value = [value]
    out = []
    for s in value:
        text = s if isinstance(s, str) else ",".join(str(d) for d in s)
        parse_dims(text)
        out.append(text)
    return tuple(out)


def _seed(value: int) -> str | None:
    return None if 0 <= value < 2**32 else "choose a seed from 0 to 2**32 - 1"


@dataclass
class RunOptions(Options):
    input: Path = option(help="Checkpoint (.pt/.pth/.ckpt, .safetensors), ONNX file, darknet .weights or Caffe "
                              ".caffemodel.", argument=True, metavar="INPUT")
    input_shape: tuple[str, ...] = option((), flags=("--input-shape", "-s"), metavar="SHAPE", panel=INPUT, convert=shapes,
                                          help="Example input shape, e.g. 1,3,640,640; repeat for several inputs. "
                                               "Default: guessed from the first layer (PyTorch) or the graph's declared "
                                               "shapes (ONNX).")
    dtype: str = option("auto", metavar="DTYPE", panel=INPUT, choices=("auto", *DTYPES),
                        help="Input dtype: auto (the model's compute dtype), float32, float64, float16, bfloat16, "
                             "int64, int32.")
    arch: str | None = option(None, metavar="PKG.MODULE:FN", panel=INPUT,
                              help="Model factory for state_dict/safetensors inputs: package.module:function.")
    arch_kwargs: str | dict | None = option(None, metavar="JSON", panel=INPUT,
                                            help="JSON object of keyword arguments for --arch.")
    trust_pickle: bool = option(False, panel=INPUT,
                                help="Allow unpickling code objects (full modules, YOLO dicts), and importing the model "
                                     "factory a modelsurgeon-written file names. Runs code the file chooses: only for "
                                     "checkpoints you trust.")
    code_paths: tuple[Path, ...] = option((), flags="--code-path", metavar="DIR", panel=INPUT,
                                          help="Directory to put on the import path (the model's source tree); "
                                               "repeatable.")
    cfg: Path | None = option(None, metavar="FILE", panel=INPUT,
                              help="The .cfg of a darknet .weights input (default: the .cfg beside it).")
    prototxt: Path | None = option(None, metavar="FILE", panel=INPUT,
                                   help="The .prototxt of a Caffe .caffemodel input (default: the .prototxt beside it).")
    trials: int = option(2, metavar="N", panel=VERIFICATION, minimum=1,
                         help="Random inputs to check parity on: the example input, then fresh ones (the second one "
                              "batch larger, when the model runs at it).")
    seed: int = option(0, metavar="N", panel=VERIFICATION, check=_seed, help="Seed of the random inputs.")
    atol: float | None = option(None, metavar="FLOAT", panel=VERIFICATION, check=finite_non_negative,
                                help="Absolute tolerance (default by dtype: 1e-6 for float32 weights).")
    rtol: float | None = option(None, metavar="FLOAT", panel=VERIFICATION, check=finite_non_negative,
                                help="Tolerance relative to each output's largest magnitude (default by dtype: 1e-4 "
                                     "float32, 1e-2 float16, 5e-2 bfloat16).")
    verify_at: tuple[str, ...] = option((), metavar="MODULE", panel=VERIFICATION,
                                        help="Also compare this module's outputs (ONNX: this tensor's), e.g. a detector's "
                                             "head; repeatable. A post-processed output (top-k, NMS) that differs by "
                                             "tie-breaking is then excused when these match and every rewrite lies "
                                             "before them.")
    verify: bool = option(True, flags="--no-verify", panel=VERIFICATION, help="Skip the parity check.")
    force: bool = option(False, panel=VERIFICATION, help="Write the output even if parity fails.")
    output: Path | None = option(None, flags=("--output", "-o"), metavar="PATH", panel=OUTPUT,
                                 help="Output file; format by extension: .pt/.pth/.ckpt, .safetensors, .onnx "
                                      "(.weights + .cfg, .caffemodel + .prototxt for darknet / Caffe inputs). "
                                      "Default: INPUT's name with the command inserted.")
    dry_run: bool = option(False, panel=OUTPUT, help="Report what would change; write nothing.")
    in_place: bool = option(False, panel=OUTPUT, help="Allow the output to replace the input file (atomically).")
    opset: int = option(17, metavar="N", panel=OUTPUT, help="ONNX opset for .onnx outputs exported from PyTorch.")

    # set by the command, not options of their own
    pass_options: dict = field(default_factory=dict)  # pass name -> its options (an Options instance)
    repeat: bool = False  # run the pass list again until nothing changes (optimize)
    verify_each: bool = False  # parity after each pass (optimize --verify-each)
    status: Callable[[str], None] | None = None  # progress lines (the CLI's spinner)

    MODEL: ClassVar[tuple[str, ...]] = ("input_shape", "trials", "seed", "atol", "rtol", "verify_at", "verify")
    """The options of the API functions working on a model in memory (no files)."""
