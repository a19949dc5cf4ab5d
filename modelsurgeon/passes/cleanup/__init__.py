"""Generic ONNX graph clean-up that ``optimize`` runs around the exact passes.

One rewrite per module, each a pass of the usual shape (``match`` finds every instance on the
unmodified graph, ``rewrite`` applies one) with no PyTorch counterpart and no command of its
own: each is a :class:`PassSpec` of the group ``cleanup`` (``optimize --passes / --skip
cleanup`` names them all), with the passes it must run ``before`` / ``after`` declared here.
``EARLY`` are registered before the surgery passes (focus-to-conv, fold-fusion, fold-bn) and
``LATE`` after them: registration order places the passes the declarations leave free.
Constant folding proper is ``fold-fusion``'s first step; the shape facts the rewrites rely on
come from :mod:`modelsurgeon.capture.onnx_shapes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...options import Options, option
from ..spec import PassSpec


@dataclass
class FixInputShapesOptions(Options):
    keep_symbolic: bool = option(False, help="ONNX: keep symbolic input dimensions symbolic even when "
                                             "--input-shape sizes them for verification.")


def _cleanup(name: str, summary: str, target: str, before: tuple = (), after: tuple = (), **kw) -> PassSpec:
    return PassSpec(name, summary, onnx=f"modelsurgeon.passes.cleanup.{target}", before=before, after=after,
                    cli=None, group="cleanup", **kw)


EARLY = [
    _cleanup("fix-input-shapes", "give symbolic input dimensions the sizes --input-shape names (optimize "
             "--keep-symbolic: keep them)", "fix_shapes:FixInputShapes", before=("fold-shapes",),
             options=FixInputShapesOptions),
    _cleanup("remove-identity", "remove Identity, inference Dropout and single-input Concat/Sum/Max/Min/Mean",
             "identity:RemoveIdentity", before=("fold-shapes",)),
    _cleanup("castlike-to-cast", "CastLike to a tensor of known type → Cast", "castlike:CastLikeToCast",
             before=("fold-shapes", "fold-fusion")),
    _cleanup("fold-shapes", "sizes read from shapes made constants; partly symbolic Reshape/Expand targets made "
             "constant with 0 / -1", "fold_shapes:FoldShapes", before=("fold-fusion",), after=("fix-input-shapes",)),
]
# -- focus-to-conv, fold-fusion (constant folding), fold-bn run here --
LATE = [
    _cleanup("resize-scales", "Resize to sizes computed at run time → Resize by constant scales, where exact",
             "resize:ResizeScales", after=("fold-shapes",)),
    _cleanup("split-sequences", "SplitToSequence read by SequenceAt at constant positions → Split",
             "sequences:SplitSequences", after=("fold-shapes",)),
    _cleanup("fuse-pad", "a zero Pad on spatial axes folded into the Conv / AveragePool reading it",
             "fuse_pad:FusePad", after=("fold-fusion", "fold-shapes")),
    _cleanup("remove-noops", "remove ops that return their input: Cast to the same type, Reshape/Expand/Squeeze to "
             "the same shape, reductions over sizes of 1, zero Pad, full Slice, identity Transpose, +0 / ×1",
             "noop:RemoveNoOps",
             after=("fold-fusion", "fold-shapes")),
    _cleanup("merge-reshapes", "chains of Reshape/Flatten/Squeeze/Unsqueeze → one Reshape", "views:MergeReshapes",
             after=("fold-shapes",)),
    _cleanup("merge-transposes", "consecutive Transposes → one (or none)", "transposes:MergeTransposes"),
    _cleanup("transpose-to-reshape", "a Transpose that only moves sizes of 1 → Reshape",
             "transpose_view:TransposeToReshape", before=("merge-reshapes",), after=("merge-transposes",)),
    _cleanup("gather-to-reshape", "a Gather of every index in order → Reshape", "gather_view:GatherToReshape",
             before=("merge-reshapes",), after=("fold-shapes",)),
    _cleanup("merge-concats", "a Concat read only by a Concat on the same axis spliced into it",
             "concats:MergeConcats", after=("fold-shapes",)),
    _cleanup("merge-slices", "Slice of a Slice on other axes → one Slice", "slices:MergeSlices",
             after=("fold-shapes", "remove-noops")),
    _cleanup("fold-bn-through-view", "BatchNormalization of a [M, C] view of a MatMul by a constant → its weight "
             "+ Add before the view", "bn_view:FoldBnThroughView", before=("merge-reshapes", "fuse-gemm"),
             after=("fold-bn", "fold-fusion")),
    _cleanup("fold-bn-into-gemm", "BatchNormalization of a [M, C] tensor read only by Gemms folded into them",
             "bn_gemm:FoldBnIntoGemm", after=("fold-bn", "fuse-gemm")),
    _cleanup("fold-input-scale", "a constant scalar / per-channel Mul read only by Convs folded into their weights",
             "input_scale:FoldInputScale", after=("fold-bn", "fold-fusion")),
    _cleanup("fuse-gemm", "MatMul of a matrix by a constant + constant Add → Gemm", "gemm:FuseGemm",
             after=("fold-bn",)),
    _cleanup("dedup-constants", "initializers with the same contents → one", "dedup:DedupConstants",
             before=("cse",), after=("fold-fusion",)),
    _cleanup("cse", "nodes computing the same thing from the same inputs → one", "cse:EliminateCommonSubexpressions",
             after=("dedup-constants",)),
]
CLEANUP = EARLY + LATE
