"""The architectures of the ONNX optimize table and how they are exported.

Every model is defined in this repository (``examples/zoo``, ``examples/yolo``), given random
BatchNorm statistics, and exported with a symbolic batch dimension three ways: the TorchScript
exporter with constant folding on and off, and the dynamo exporter without its own optimiser
(it needs onnxscript: "not installed" otherwise).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT / "examples", ROOT / "examples" / "yolo"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

MODES = {
    "fold": "TorchScript exporter, do_constant_folding=True",
    "nofold": "TorchScript exporter, do_constant_folding=False",
    "dynamo": "dynamo exporter, optimize=False",
}


def cases(smoke: bool = False) -> list[tuple[str, str, object, int]]:
    """(name, family, builder, input size); ``smoke``: small widths and inputs."""
    from zoo.bifpn import bifpn
    from zoo.densenet import densenet
    from zoo.efficientnet import efficientnet, efficientnet_lite
    from zoo.mobilenetv2 import mobilenet_v2
    from zoo.mobilenetv3 import mobilenet_v3
    from zoo.repvgg import repvgg
    from zoo.resnet import resnet
    from zoo.shufflenet import shufflenet_v2
    from zoo.unet import unet
    from zoo.vit import vit

    from models.yolo import Model

    if smoke:
        return [
            ("efficientnet-lite0", "efficientnet", lambda: efficientnet_lite(0.25, 0.34, 10), 64),
            ("yolov5s-style", "yolo", lambda: Model(nc=3, width=0.25), 64),
            ("vit-tiny", "vit", lambda: vit(64, 32, 2, 2, 10), 64),
        ]
    return [
        ("resnet18", "resnet", lambda: resnet(1000, 64, 2), 224),
        ("mobilenetv2", "mobilenet", lambda: mobilenet_v2(1000, 1.0), 224),
        ("mobilenetv3-large", "mobilenet", lambda: mobilenet_v3(1.0), 224),
        ("efficientnet-lite0 (TF-same)", "efficientnet", lambda: efficientnet_lite(), 224),
        ("efficientnet-b0 (TF-same, SE)", "efficientnet", lambda: efficientnet(), 224),
        ("repvgg-a0 (training form)", "repvgg", lambda: repvgg(), 224),
        ("densenet121-style", "densenet", lambda: densenet(), 224),
        ("shufflenetv2", "shufflenet", lambda: shufflenet_v2(), 224),
        ("vit-tiny/16", "vit", lambda: vit(), 224),
        ("unet", "unet", lambda: unet(), 256),
        ("bifpn", "bifpn", lambda: bifpn(), 256),
        ("yolov5s-style (Focus, decode)", "yolo", lambda: Model(nc=80, width=0.5), 320),
    ]


def build(builder, seed: int = 1):
    import torch

    from zoo import randomize

    torch.manual_seed(0)
    return randomize(builder(), seed).eval()


def export(model, size: int, path: Path, mode: str) -> Path | str:
    """Write ``model`` as ONNX with a symbolic batch; a string says why it could not be."""
    import torch

    x = torch.randn(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "dynamo":
            import importlib.util

            if importlib.util.find_spec("onnxscript") is None:  # the dynamo exporter needs it
                return "not installed (onnxscript)"
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                prog = torch.onnx.export(model, (x,), dynamo=True, optimize=False, input_names=["x"],
                                         dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
                prog.save(str(path))
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=mode == "fold",
                              input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return path
