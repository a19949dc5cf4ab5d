"""reparam: multi-branch blocks (RepVGG, MobileOne, RepConv, ACNet, DBB...) merged into one conv."""

from ..spec import PassSpec

SPEC = PassSpec(
    "reparam",
    summary="merge multi-branch blocks (RepVGG, MobileOne, RepConv, ACNet, DBB) into one conv each",
    torch="modelsurgeon.passes.reparam.torch:Reparam",
    onnx="modelsurgeon.passes.reparam.onnx:Reparam",
    # the branches' BatchNorms go into the merged kernel (fold-bn would fold them one by one and
    # leave the identity branches' norms); fusion weights and a merged stem reach the convs first
    before=("fold-bn",),
    after=("focus-to-conv", "fold-fusion"),
    description="Structural re-parameterisation: branches reading one tensor and summed before any "
                "non-linearity (convs, BatchNorm, identity, average pooling, 1x1->kxk sequences) become one conv.",
)
