"""The stable codes of skips and refusals: ``code -> one-line meaning`` (docs/json.md has the
same table; a test keeps the two equal). A reason's wording may change; its code does not.

A matcher that cannot use a candidate returns a :class:`Refusal` (code + reason) instead of a
bare string; ``Skipped(target, refusal)`` takes both.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

CODES: dict[str, str] = {
    # how the model calls or shares the candidate
    "shared-module": "the module (or a tensor of it) is called or read more than once, so a rewrite would change other uses",
    "tied-tensor": "a tensor the rewrite would write is registered by another module too (tied)",
    "non-persistent-buffer": "a tensor the rewrite would write is a non-persistent buffer, which a state_dict does not carry",
    "other-readers": "a value the rewrite would change or remove is read elsewhere too",
    "model-output": "a value the rewrite would change or remove is an output of the model",
    "read-outside": "a tensor of the module is read outside its call (the host's forward uses it)",
    "hook": "a hook on a module the rewrite would remove or bypass would be dropped",
    "call-arguments": "the module is called with more than its one tensor (keyword or extra arguments)",
    "not-executed": "the module does not run on the example input",
    "host-reads": "the host's own code reads the module's tensors by name (its own re-parameterisation)",
    # what the candidate computes
    "training-mode": "the norm normalises with batch statistics (training mode or no running statistics)",
    "computed-tensor": "the forward computes the weight, bias or statistics it uses, so the stored tensor is not the one applied",
    "not-affine": "the module or op is not an exact per-channel affine map (a custom norm, a scale probing cannot confirm)",
    "norm-like": "a module that looks like a per-channel map is not one exactly (batch statistics, or a zero scale probing cannot confirm)",
    "other-axis": "the map acts on another axis than the layer's output channels",
    "not-foldable": "no conv or linear layer the map can be folded into (nothing before it takes a per-channel scale)",
    "no-bias": "the layer has no bias and none can be added (not a torch conv/linear, or its forward ignores one)",
    "padding": "the layer after the norm pads with zeros, which the norm's shift would have to reach (folding forward)",
    "layer-settings": "the layer's kind or settings are not ones the rewrite handles (groups, dilation, padding, a non-torch class, an op type)",
    "size-dependent": "the module computes something else at other input sizes",
    "not-a-pattern": "the candidate is not the pattern the pass rewrites exactly (e.g. not a space-to-depth)",
    "input-size": "the example input's size does not fit the rewrite (e.g. not divisible by the block size)",
    "inline": "the pattern is written inline in a forward that does other work, and that forward cannot be regenerated",
    "unevaluable": "the constant sub-graph or probe cannot be evaluated",
    "too-large": "evaluating the constant would store much more than it is computed from",
    "non-numeric": "a constant that is not numeric (strings) is left as computed",
    "subgraph": "the node is inside a subgraph (If / Loop / Scan body), which is not rewritten",
    # generated forwards (rewrite/forward: why a module's forward cannot be regenerated)
    "untraceable": "torch.fx cannot trace the forward (only ever combined with a recording reason)",
    "data-dependent": "the forward turns tensor values into Python values (a branch on data)",
    "not-reproduced": "the regenerated forward does not give what the module gave, at the recorded size or another",
    "not-checkable": "the model runs at no other input size to check a replayed forward at",
    "not-describable": "the forward calls something a generated forward cannot record",
    "outside": "the forward reads tensors or calls modules that are not its own",
    "cannot-take-forward": "the module cannot take an instance forward (a GraphModule, its own __call__ or pickling)",
    "shared": "the module whose forward would be regenerated is called more than once",
    "edit": "an edit asked of a generated forward cannot be made",
    # reparam: why branches summed before a non-linearity are not one conv
    "zero-padding-after-bn": "a k×k stage pads with zeros after a stage with a bias (1×1 conv → BN → padded k×k): not one conv at the border",
    "pad-value": "a branch pads with values other than the bias of what it pads",
    "misaligned-centres": "the branches' kernel centres do not align (padding − dilation·(k−1)/2 differs, or one side is padded more)",
    "stride-mismatch": "the branches have different strides",
    "groups-mismatch": "the branches' convs have different groups",
    "channels-mismatch": "the branches have different channel counts",
    "padding-mode": "a branch pads with reflect, replicate or circular padding",
    "nonlinear-branch": "two branches reach the input linearly and another through a non-linearity",
    "pooling": "average pooling that does not count its padding, or with ceil_mode",
    "sequence": "a branch with two k×k stages or two paddings",
    "not-2d": "the branches do not read a 4-D tensor (2-D convs only)",
    # truncate's refusals (the run stops with exit 2 and this code; nothing written)
    "no-stage": "no backbone stage found on the input-to-output path (name one with --stage)",
    "mid-stage": "the cut would remove blocks from the middle of a stage (a later block reads the stage's output)",
    "head-not-rebuildable": "a layer after the cut depends on the channel count and cannot be rebuilt or dropped",
    "truncated-model-fails": "the truncated model raises when run on the example input",
}

BUILTIN_CODES: Mapping[str, str] = MappingProxyType(dict(CODES))
"""modelsurgeon's own codes (:data:`CODES` also holds those other packages register)."""

ERRORS: dict[str, str] = {
    "parity-failed": "the rewritten model does not reproduce the original (nothing written; `--force` writes anyway)",
    "bad-input": "the input, an option or the model cannot be used as given (the message says which)",
    "usage": "the command line does not parse (unknown option, missing argument)",
    "bad-option": "an option's value cannot be used (out of range, not a choice, two options that exclude each other, an option of the other back end); the message names the flag",
    "unknown-pass": "a pass name no installed pass has",
    "unsupported-backend": "the pass has no implementation for the input's back end (PyTorch or ONNX)",
    "not-found": "the input file does not exist",
    "not-a-checkpoint": "the input is not a checkpoint (a text file, random bytes, an empty file, a directory)",
    "truncated-checkpoint": "the input is a checkpoint cut short or corrupt (a zip archive without its end, a pickle ending early)",
    "unsafe-checkpoint": "loading would unpickle code objects and `--trust-pickle` was not given",
    "needs-arch": "a state_dict / safetensors input needs `--arch` to rebuild its model",
    "model-cannot-run": "the model raises on inputs of the given (or guessed) shape",
    "input-dtype": "the model cannot run inputs of the `--dtype` asked for (it runs in its own dtype)",
    "input-mismatch": "`compare`: the two models take different inputs (counts or names), or `--inputs` does not fit them",
    "output-mismatch": "`compare`: the two models give different numbers of outputs (both signatures said)",
    "input-shape": "`compare`: no input shape can be read from the models: pass `--input-shape`",
    "bad-inputs-file": "`compare --inputs`: not a readable `.npz`",
    "verify-at": "a `--verify-at` module or tensor does not exist or never runs",
    "output-format": "the output's extension names no format modelsurgeon writes (`.pt/.pth/.ckpt`, `.safetensors`, `.onnx`, and for a darknet / Caffe input its own `.weights` / `.caffemodel`; a `.bin` is refused, not guessed)",
    "missing-structure": "a darknet `.weights` / Caffe `.caffemodel` input whose `.cfg` / `.prototxt` is neither given (`--cfg` / `--prototxt`) nor beside it",
    "unsupported-layer": "a darknet section, option or activation, or a Caffe layer type (or a V1 net), that modelsurgeon does not read: named, with its line",
    "weights-mismatch": "a `.weights` / `.caffemodel` that does not fit its `.cfg` / `.prototxt` (too short, too long, a layer's blobs missing or of another shape)",
    "cannot-write-format": "the rewritten model cannot be written as darknet / Caffe files (a node a pass added, a cut those files cannot number or name): write `.onnx`",
    "output-is-directory": "`-o` names a directory",
    "internal-error": "a bug in modelsurgeon (rerun with `--debug` and report it)",
    "interrupted": "Ctrl-C",
}
"""Error codes (``--json`` prints ``{"error": {"code", ...}}``); a pass's refusal (truncate) is an
error carrying its code from :data:`CODES`."""


def registered(code: str | None) -> bool:
    return code in CODES or code in ERRORS


def register_code(code: str, meaning: str) -> None:
    """Add a code (a pass from another package); an existing code keeps its meaning."""
    if code in CODES and CODES[code] != meaning:
        raise ValueError(f"skip code {code!r} is already registered with another meaning")
    CODES[code] = meaning


@dataclass(frozen=True)
class Refusal:
    """Why a candidate cannot be rewritten: a stable ``code`` (a key of :data:`CODES`) and a
    ``reason`` for people. ``str(refusal)`` is the reason."""

    code: str
    reason: str

    def __str__(self) -> str:
        return self.reason

    def reworded(self, reason: str) -> "Refusal":
        """The same refusal told in other words (with more context), keeping its code."""
        return Refusal(self.code, reason)
