"""Build the example checkpoints under examples/checkpoints/ (random weights, random BN stats).

    python examples/build.py            # ~5 MB in all, a few seconds

| file                      | what it is                                  | load it with |
|---------------------------|---------------------------------------------|--------------|
| resnet.pt                 | full pickled ResNet-style module            | --trust-pickle --code-path examples |
| caffenet.pt               | full module, Conv -> BN(affine=False) -> Scale | --trust-pickle --code-path examples |
| mobilenetv2.pt            | plain state_dict of a MobileNetV2 layout    | --arch zoo.mobilenetv2:mobilenet_v2 --code-path examples |
| mobilenetv2.safetensors   | the same weights as safetensors             | --arch zoo.mobilenetv2:mobilenet_v2 --code-path examples |
| yolov5s-focus.pt          | YOLOv5-style dict: fp16 model + ema, optimizer, epoch | --trust-pickle --code-path examples/yolo |
| bifpn.pt                  | full module: BiFPN neck with fast normalised fusion | --trust-pickle --code-path examples |
| resnet.onnx               | the ResNet exported with its BatchNormalization nodes | (ONNX: nothing needed) |
| yolov5s-focus.onnx        | the YOLOv5-style model exported: Focus as 4 Slice + Concat, BN nodes | (ONNX) |
| yolov3-tiny.weights       | darknet yolov3-tiny layout (channels / 8), its .cfg beside it | (the .cfg beside it) |
| resnet-deploy.caffemodel  | Caffe ResNet-50-style deploy net with BatchNorm + Scale | (the .prototxt beside it) |
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "yolo")]

import torch  # noqa: E402

from zoo import randomize  # noqa: E402
from zoo.bifpn import bifpn  # noqa: E402
from zoo.caffe import caffenet  # noqa: E402
from zoo.mobilenetv2 import mobilenet_v2  # noqa: E402
from zoo.resnet import resnet  # noqa: E402


def build(out: Path) -> list[Path]:
    from safetensors.torch import save_file

    from models.yolo import Model

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    written = []

    def save(obj, name):
        p = out / name
        torch.save(obj, p)
        written.append(p)

    save(randomize(resnet(), 1).eval(), "resnet.pt")
    save(randomize(caffenet(), 2).eval(), "caffenet.pt")
    mb = randomize(mobilenet_v2(), 3).eval()
    save(mb.state_dict(), "mobilenetv2.pt")
    save_file({k: v.contiguous() for k, v in mb.state_dict().items()}, str(out / "mobilenetv2.safetensors"))
    written.append(out / "mobilenetv2.safetensors")

    model = randomize(Model(nc=3, width=0.25, focus=True), 4)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    save({"epoch": 299, "best_fitness": 0.51, "model": copy.deepcopy(model).half(),
          "ema": ema.half(), "updates": 12000, "optimizer": opt.state_dict(),
          "opt": {"img_size": [64, 64], "batch_size": 16}, "date": "2026-11-29"}, "yolov5s-focus.pt")
    save(randomize(bifpn(), 5).eval(), "bifpn.pt")
    # ONNX files as an exporter writes them when asked not to fold (BatchNormalization kept)
    export_onnx(randomize(resnet(), 1).eval(), (1, 3, 64, 64), out / "resnet.onnx")
    export_onnx(model.float().eval(), (1, 3, 64, 64), out / "yolov5s-focus.onnx")
    written += [out / "resnet.onnx", out / "yolov5s-focus.onnx"]
    from native import build_native  # darknet and Caffe files

    written += build_native(out)
    return written


def export_onnx(model, shape, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(shape),), str(path), dynamo=False, opset_version=13,
                          do_constant_folding=False, input_names=["images"],
                          dynamic_axes={"images": {0: "batch"}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "checkpoints")
    args = ap.parse_args()
    for p in build(args.out):
        print(f"{p}  {p.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
