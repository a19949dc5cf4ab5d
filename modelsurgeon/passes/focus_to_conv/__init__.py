"""focus-to-conv: a space-to-depth stem (YOLOv5 Focus, pixel_unshuffle, SpaceToDepth) + conv becomes one strided conv."""

from dataclasses import dataclass

from ...options import Options, option
from ..spec import PassSpec


@dataclass
class FocusToConvOptions(Options):
    check_grad: bool = option(False, backend="torch",
                              help="Also check that gradients of the new conv equal the original's mapped gradients.")
    bench: bool = option(False, backend="torch", help="Measure the stem's CPU latency before and after.")


SPEC = PassSpec(
    "focus-to-conv",
    summary="replace space-to-depth stems (YOLOv5 Focus, pixel_unshuffle) + conv by one strided conv",
    options=FocusToConvOptions,
    torch="modelsurgeon.passes.focus_to_conv.torch:FocusToConv",
    onnx="modelsurgeon.passes.focus_to_conv.onnx:FocusToConv",
    before=("fold-bn",),
    description="Replace space-to-depth stems (YOLOv5 Focus, pixel_unshuffle) + conv by one strided conv.",
    example="modelsurgeon focus-to-conv examples/checkpoints/yolov5s-focus.pt --trust-pickle --code-path examples/yolo "
            "-s 1,3,64,64 -o yolov5s-v6stem.pt",
)
