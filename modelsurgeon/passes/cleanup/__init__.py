"""Generic ONNX graph clean-up that ``optimize`` runs around the exact passes.

One rewrite per module, each a pass of the usual shape (``match`` finds every instance on the
unmodified graph, ``rewrite`` applies one) with no PyTorch counterpart. ``CLEANUP`` lists them in
the order ``optimize`` runs them, the first ``EARLY`` before the surgery passes (focus-to-conv,
fold-fusion, fold-bn) and the rest after; each pass class declares the passes it must run
``before`` / ``after``, and that order honours them (tested). Constant folding proper is
``fold-fusion``'s first step; the shape facts the rewrites rely on come from
:mod:`modelsurgeon.capture.onnx_shapes`.
"""

from __future__ import annotations

# name, summary, "module:Class"
CLEANUP = [
    ("fix-input-shapes", "give symbolic input dimensions the sizes --input-shape names (optimize --keep-symbolic: keep them)",
     "fix_shapes:FixInputShapes"),
    ("remove-identity", "remove Identity, inference Dropout and single-input Concat/Sum/Max/Min/Mean",
     "identity:RemoveIdentity"),
    ("castlike-to-cast", "CastLike to a tensor of known type → Cast", "castlike:CastLikeToCast"),
    ("fold-shapes", "sizes read from shapes made constants; partly symbolic Reshape/Expand targets made constant with 0 / -1",
     "fold_shapes:FoldShapes"),
    # -- focus-to-conv, fold-fusion (constant folding), fold-bn run here --
    ("resize-scales", "Resize to sizes computed at run time → Resize by constant scales, where exact",
     "resize:ResizeScales"),
    ("split-sequences", "SplitToSequence read by SequenceAt at constant positions → Split", "sequences:SplitSequences"),
    ("fuse-pad", "a zero Pad on spatial axes folded into the Conv / AveragePool reading it", "fuse_pad:FusePad"),
    ("remove-noops", "remove ops that return their input: Cast to the same type, Reshape/Expand/Squeeze to the same shape, "
     "zero Pad, full Slice, identity Transpose, +0 / ×1", "noop:RemoveNoOps"),
    ("merge-reshapes", "chains of Reshape/Flatten/Squeeze/Unsqueeze → one Reshape", "views:MergeReshapes"),
    ("merge-transposes", "consecutive Transposes → one (or none)", "transposes:MergeTransposes"),
    ("fuse-gemm", "MatMul of a matrix by a constant + constant Add → Gemm", "gemm:FuseGemm"),
    ("dedup-constants", "initializers with the same contents → one", "dedup:DedupConstants"),
    ("cse", "nodes computing the same thing from the same inputs → one", "cse:EliminateCommonSubexpressions"),
]
EARLY = 4  # CLEANUP[:EARLY] run before the surgery passes, the rest after them
