"""fold-bn: BatchNorm and any per-channel affine layer folded into the conv / transposed conv / linear before it."""

from ..spec import PassSpec

SPEC = PassSpec(
    "fold-bn",
    summary="fold BatchNorm and any per-channel affine layer into the conv/linear before it",
    torch="modelsurgeon.passes.fold_bn.torch:FoldBN",
    onnx="modelsurgeon.passes.fold_bn.onnx:FoldBN",
    # a Focus stem becomes one conv first (its BatchNorm then folds into the merged conv), and
    # fusion weights reach the convs and norms first (a norm scaled by one is still folded)
    after=("focus-to-conv", "fold-fusion"),
    description="Fold BatchNorm (any class) and per-channel scale layers into the conv/linear before them.",
    example="modelsurgeon fold-bn examples/checkpoints/resnet.pt --trust-pickle --code-path examples -s 1,3,64,64 "
            "-o resnet-folded.pt",
)
