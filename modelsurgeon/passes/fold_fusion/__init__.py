"""fold-fusion: constant computations (fusion-weight normalisation) evaluated; constant scales folded into the convs."""

from ..spec import PassSpec

SPEC = PassSpec(
    "fold-fusion",
    summary="evaluate parameter-only computations (fusion weight normalisation) and fold constant scales into convs",
    torch="modelsurgeon.passes.fold_fusion.torch:FoldFusion",
    onnx="modelsurgeon.passes.fold_fusion.onnx:FoldFusion",
    # the strided conv focus-to-conv makes of a stem is a conv fusion weights can move into
    after=("focus-to-conv",),
    before=("fold-bn",),
    description="Fold fusion weights: evaluate parameter-only computations and fold constant scales into convs.",
    example="modelsurgeon fold-fusion examples/checkpoints/bifpn.pt --trust-pickle --code-path examples -s 1,3,64,64 "
            "-o bifpn-folded.pt",
)
