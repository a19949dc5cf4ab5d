"""Loading a checkpoint the way YOLOv5's ``models.experimental.attempt_load`` does (used by its
``detect.py``, ``val.py``, ``export.py`` and ``torch.hub``): ``torch.load`` the dict, take
``ema`` or ``model``, ``.float()``, call the model's own ``fuse()``, ``.eval()``. Needs only torch
and the YOLOv5 source tree (``examples/yolo``) on the path."""

from __future__ import annotations

import torch


def attempt_load(weights, fuse: bool = True):
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt["model"]).float()
    if not hasattr(model, "stride"):
        model.stride = torch.tensor([32.0])
    return model.fuse().eval() if fuse and hasattr(model, "fuse") else model.eval()


if __name__ == "__main__":  # python yolov5_loader.py CKPT: load, fuse, run; prints what was imported
    import sys

    m = attempt_load(sys.argv[1])
    y = m(torch.randn(1, 3, 64, 64))
    print("modelsurgeon" in sys.modules, float(y[0].abs().sum()))
