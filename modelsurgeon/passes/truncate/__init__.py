"""truncate: cut a model short -- drop the last blocks of a backbone stage (PyTorch) or end the graph at named tensors (ONNX)."""

from dataclasses import dataclass

from ...options import Options, option
from ..spec import PassSpec


def _strip(value: str) -> str:
    return str(value).strip()


@dataclass
class TruncateOptions(Options):
    blocks: int | None = option(None, flags=("--blocks", "-n"), metavar="N", minimum=1, backend="torch",
                                help="Remove the last N blocks of the stage.")
    after: str | None = option(None, metavar="BLOCK", convert=_strip, backend="torch",
                               help="Keep everything up to and including this block.")
    stage: str | None = option(None, metavar="PATH", backend="torch",
                               help="Module path of the stage to cut (default: found automatically).")
    list_blocks: bool = option(False, flags="--list",
                               help="List the stage's blocks (index, path, channels, params, FLOPs) and exit.")
    head: str = option("reinit", metavar="reinit|drop", choices=("reinit", "drop"), backend="torch",
                       help="What to do with layers whose input width changed: reinit or drop.")
    at: tuple[str, ...] = option((), metavar="TENSOR", backend="onnx",
                                 help="ONNX: make this tensor a graph output and remove what follows; repeatable.")

    def check(self) -> None:
        if self.blocks is not None and self.after is not None:
            self.fail("{blocks} and {after} are mutually exclusive: give one of them", blocks=self.blocks,
                      after=self.after)


SPEC = PassSpec(
    "truncate",
    summary="drop the last blocks of a backbone stage and rewire what consumed them",
    options=TruncateOptions,
    torch="modelsurgeon.passes.truncate.torch:Truncate",
    onnx="modelsurgeon.passes.truncate.onnx:Truncate",
    exact=False,
    description="Drop the last blocks of a backbone stage and rewire what consumed them.",
    example="modelsurgeon truncate examples/checkpoints/mobilenetv2.pt --arch zoo.mobilenetv2:mobilenet_v2 "
            "--code-path examples -s 1,3,64,64 --blocks 2 -o mobilenetv2-small.pt",
)
