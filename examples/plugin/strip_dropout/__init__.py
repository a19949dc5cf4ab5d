"""strip-dropout: dropout layers, identities in inference, removed.

The pass's declaration, all the command line needs (kept light: no torch, no onnx). The
implementations (``torch.py``, ``onnx.py``) are imported when the pass runs.
"""

from modelsurgeon.passes import PassSpec

SPEC = PassSpec(
    "strip-dropout",
    summary="remove dropout (Dropout*, AlphaDropout, DropPath / StochasticDepth; ONNX Dropout nodes), an identity "
            "at inference",
    torch="strip_dropout.torch:StripDropout",
    onnx="strip_dropout.onnx:StripDropout",
    exact=True,  # so optimize runs it too
    before=("fold-bn",),  # a BatchNorm behind a dropout becomes foldable once the dropout is gone
)
