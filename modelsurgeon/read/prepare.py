"""Put a loaded model into the state surgery runs in, and take it back out unchanged.

Surgery evaluates models in inference mode and float32 (fp16/bf16 checkpoints, as YOLO saves
them, are upcast in place: exact, and the CPU runs float32 well). Every floating tensor's
storage dtype is remembered, so that rewrites round their float64 results to what will be
saved, verification sees exactly the saved numbers, and :meth:`StorageState.restore` casts the
model back before writing. Training flags are restored too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import BadInput


@dataclass
class StorageState:
    dtypes: dict[int, Any] = field(default_factory=dict)  # id(tensor) -> storage dtype
    module_dtype: dict[int, Any] = field(default_factory=dict)  # id(module) -> dtype of its params
    training: dict[int, bool] = field(default_factory=dict)  # id(module) -> training flag
    default_dtype: Any = None
    upcast: bool = False
    mode_stored: bool = True  # the file keeps train/eval flags (a pickled module); a state_dict does not

    def storage_dtype(self, tensor: Any, module: Any = None) -> Any:
        """The dtype ``tensor`` will be saved in."""
        dt = self.dtypes.get(id(tensor))
        if dt is None and module is not None:
            dt = self.module_dtype.get(id(module))
        return dt or self.default_dtype or tensor.dtype

    def inherit(self, old: Any, new: Any) -> None:
        """``new`` replaces module ``old``: it is saved in ``old``'s dtype and training flag."""
        if id(old) in self.module_dtype:
            self.module_dtype.setdefault(id(new), self.module_dtype[id(old)])
        if id(old) in self.training and id(new) not in self.training:
            self.training[id(new)] = self.training[id(old)]
            new.training = old.training

    def restore(self, model: Any) -> None:
        """Cast every floating tensor back to its storage dtype; restore training flags."""
        import torch

        with torch.no_grad():
            for mod in model.modules():
                mdt = self.module_dtype.get(id(mod), self.default_dtype)
                for name, p in list(mod._parameters.items()):
                    if p is None or not p.is_floating_point():
                        continue
                    dt = self.dtypes.get(id(p), mdt)
                    if dt is not None and p.dtype != dt:
                        p.data = p.data.to(dt)
                for name, b in list(mod._buffers.items()):
                    if b is None or not b.is_floating_point():
                        continue
                    dt = self.dtypes.get(id(b), mdt)
                    if dt is not None and b.dtype != dt:
                        mod._buffers[name] = b.to(dt)
                if id(mod) in self.training:
                    mod.training = self.training[id(mod)]


def prepare(model: Any, check_finite: bool = True) -> StorageState:
    """Record storage dtypes and training flags; switch to eval and float32 compute."""
    import torch

    state = StorageState()
    counts: dict[Any, int] = {}
    for mod in model.modules():
        state.training[id(mod)] = mod.training
        mdt = None
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is None or not t.is_floating_point():
                continue
            state.dtypes.setdefault(id(t), t.dtype)
            mdt = mdt or t.dtype
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        if mdt is not None:
            state.module_dtype[id(mod)] = mdt
    state.default_dtype = max(counts, key=counts.get) if counts else torch.float32
    if check_finite:
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t is not None and t.is_floating_point() and not _finite(t):
                raise BadInput(f"weights are not finite: {name} holds NaN or Inf values")
        check_statistics(model)
    model.eval()
    if any(dt in (torch.float16, torch.bfloat16) for dt in counts):
        state.upcast = True
        with torch.no_grad():
            for mod in model.modules():
                for name, p in list(mod._parameters.items()):
                    if p is not None and p.dtype in (torch.float16, torch.bfloat16):
                        p.data = p.data.float()
                for name, b in list(mod._buffers.items()):
                    if b is not None and b.dtype in (torch.float16, torch.bfloat16):
                        mod._buffers[name] = b.float()
                        state.dtypes[id(mod._buffers[name])] = state.dtypes.pop(id(b), b.dtype)
    return state


def _finite(t: Any) -> bool:
    """All elements finite? A finite sum proves it in one pass without allocating (NaN and Inf
    propagate into it); only a non-finite sum -- which may also be an overflow -- needs the
    elementwise test, done in chunks so it never allocates a tensor-sized mask."""
    import torch

    with torch.no_grad():
        if bool(torch.isfinite(t.sum())):
            return True
        flat = t.reshape(-1)
        step = 1 << 20
        return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


def check_statistics(model: Any) -> None:
    """Refuse BatchNorm statistics no trained model has: a running variance that is zero or
    negative (any module's ``running_var`` buffer: torch BatchNorm/InstanceNorm classes, frozen
    BN, BN+activation classes). Such a checkpoint is corrupt or hand-edited, and folding it would
    turn the damage into plausible-looking weights."""
    for name, t in model.named_buffers():
        if t is None or not t.is_floating_point() or name.rsplit(".", 1)[-1] != "running_var":
            continue
        neg, zero = int((t < 0).sum()), int((t == 0).sum())
        if neg or zero:
            what = " and ".join(f"{n} {w}" for n, w in ((neg, "negative"), (zero, "zero")) if n)
            raise BadInput(f"invalid BatchNorm statistics: {name} holds {what} value{'s' if neg + zero > 1 else ''} "
                           f"(a running variance must be positive)")


def compute_dtype(state: StorageState) -> Any:
    """The dtype example inputs should have for the prepared model."""
    import torch

    if state.default_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return state.default_dtype


class BufferState:
    """Buffers as the checkpoint holds them, for the ones running the model changes.

    Capture, references and verification run the real model; a module that updates its
    buffers in eval mode (a calibrated observer, a BatchNorm forced to training statistics)
    would otherwise be saved with the state those runs left. The first runs show which
    buffers move (:meth:`changed`); they are put back before the passes, before the
    verification run and at the end (:func:`operate`)."""

    def __init__(self, model: Any):
        self._saved = [(name, b, b.detach().clone()) for name, b in model.named_buffers() if b is not None]
        self._moved: list | None = None

    def changed(self) -> list[str]:
        """Names of the buffers the runs so far changed (from then on, the ones restored)."""
        import torch

        self._moved = [(n, b, v) for n, b, v in self._saved
                       if b.shape != v.shape or not torch.equal(b.detach(), v)]
        self._saved = []
        return [n for n, _, _ in self._moved]

    def restore(self) -> None:
        import torch

        if self._moved is None:  # ended before the first runs were compared
            self.changed()
        with torch.no_grad():
            for _, b, v in self._moved or []:
                if b.shape == v.shape:
                    b.copy_(v)
