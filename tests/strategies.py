"""Random model configurations for the property tests (:mod:`test_properties`).

A *configuration* is a plain JSON-able dict (hypothesis prints it on failure; it can be passed
to the CLI as ``--arch strategies:build --arch-kwargs '<json>'``). :func:`build` turns one into a
model with random weights, random norm statistics and affine parameters, in its storage dtype.

Adding a pass to the property tests takes a few lines:

1. a builder ``def build_<kind>(cfg) -> nn.Module`` registered in :data:`BUILDERS`
   (or reuse ``conv_norm``);
2. a strategy drawing configurations with ``"kind": "<kind>"`` (see :func:`conv_norm_configs`);
3. one entry in :data:`PROPERTY_PASSES`: ``"<pass>": PassSpec(strategy, check_report=...)``.

The harness in :mod:`test_properties` then runs the pass through the Python API and through
checkpoint files (``.pt``, ``.safetensors``, ``.onnx`` outputs; ``.onnx`` inputs once the pass
has an ONNX back end) and checks the property: parity with the original on fresh inputs, or
every candidate skipped with a reason, or ``ParityError`` -- never a silently wrong model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

DTYPES = ("float32", "float64", "float16", "bfloat16")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


# ----------------------------------------------------------------------------------------------
# modules the configurations are made of


class FrozenBN(nn.Module):
    """detectron2-style frozen BatchNorm: buffers only, maths in forward (found by probing)."""

    def __init__(self, n: int, dim: int, eps: float):
        super().__init__()
        self.eps, self.dim = eps, dim
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        view = (1, -1) + (1,) * self.dim
        return x * scale.view(view) + shift.view(view)


class BNAct(nn.modules.batchnorm._BatchNorm):
    """timm-style BatchNorm with its activation inside (folded: the activation is kept)."""

    def __init__(self, n: int, eps: float, affine: bool):
        super().__init__(n, eps=eps, affine=affine)
        self.act = nn.SiLU()

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


class Scale(nn.Module):
    """Caffe ``Scale`` layer (with bias_term), for any number of spatial dimensions."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        view = (1, -1) + (1,) * self.dim
        return x * self.weight.view(view) + self.bias.view(view)


def _bn_class(dim: int) -> type:
    return {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]


class ConvNorm(nn.Module):
    """``[channels_last] → conv|linear → norm → [Caffe Scale | inline x*g+b] → [relu]``.

    ``variant``: ``plain``; ``two_readers`` (the conv output also feeds a skip connection:
    the norm must be skipped); ``batch_stats`` (BN without running statistics: skipped).
    """

    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["dim"]
        self.dim, self.variant, self.channels_last = d, cfg["variant"], cfg["channels_last"]
        cin, cout = cfg["cin"], cfg["cout"]
        if d == 0:
            self.conv = nn.Linear(cin, cout, bias=cfg["bias"])
        elif cfg["transposed"]:
            cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[d]
            self.conv = cls(cin, cout, cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
                            output_padding=cfg["output_padding"], groups=cfg["groups"], bias=cfg["bias"],
                            dilation=cfg["dilation"])
        else:
            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[d]
            self.conv = cls(cin, cout, cfg["kernel"], stride=cfg["stride"], padding=cfg["padding"],
                            dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"],
                            padding_mode=cfg["padding_mode"])
        norm, eps = cfg["norm"], cfg["eps"]
        if self.variant == "batch_stats":
            self.norm = _bn_class(d)(cout, eps=eps, affine=cfg["affine"], track_running_stats=False)
        elif norm == "bn":
            self.norm = _bn_class(d)(cout, eps=eps, affine=cfg["affine"])
        elif norm == "bn_act":
            self.norm = BNAct(cout, eps=eps, affine=cfg["affine"])
        elif norm == "frozen":
            self.norm = FrozenBN(cout, max(d, 0), eps)
        elif norm == "inline_bn":  # F.batch_norm in this forward, on this module's own tensors
            self.norm = None
            self.eps = eps
            self.register_buffer("running_mean", torch.zeros(cout))
            self.register_buffer("running_var", torch.ones(cout))
            self.bn_weight = nn.Parameter(torch.ones(cout)) if cfg["affine"] else None
            self.bn_bias = nn.Parameter(torch.zeros(cout)) if cfg["affine"] else None
        else:
            raise ValueError(f"unknown norm {norm!r}")
        self.scale = Scale(cout, max(d, 0)) if cfg["scale"] == "caffe" else None
        if cfg["scale"] == "inline":
            self.gamma = nn.Parameter(torch.ones(cout))
            self.beta = nn.Parameter(torch.zeros(cout))
        self.inline = cfg["scale"] == "inline"
        self.relu = cfg["relu"]

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last if self.dim == 2 else torch.channels_last_3d)
        y = self.conv(x)
        if self.norm is None:
            z = F.batch_norm(y, self.running_mean, self.running_var, self.bn_weight, self.bn_bias, False, 0.0, self.eps)
        else:
            z = self.norm(y)
        if self.variant == "two_readers":
            z = z + y
        if self.inline:
            view = (1, -1) + (1,) * max(self.dim, 0)
            z = z * self.gamma.view(view) + self.beta.view(view)
        if self.scale is not None:
            z = self.scale(z)
        return F.relu(z) if self.relu else z


def randomize_norms(model: nn.Module, cfg: dict) -> None:
    """Random statistics and affine parameters (default BN hides folding bugs); variances
    according to ``cfg['var']``: ``normal`` (0.05..1.55), ``tiny`` (1e-7..1e-3: eps matters),
    ``wide`` (1e-4..1e3)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    with torch.no_grad():
        for p in model.conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        for m in model.modules():
            if m is model.conv:
                continue
            for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if not t.is_floating_point():
                    continue
                shape = t.shape
                if "var" in name:
                    u = torch.rand(shape, generator=g, dtype=torch.float64)
                    if cfg["var"] == "tiny":
                        v = 10 ** (-7 + 4 * u)
                    elif cfg["var"] == "wide":
                        v = 10 ** (-4 + 7 * u)
                    else:
                        v = u * 1.5 + 0.05
                    t.copy_(v)
                elif "mean" in name:
                    t.copy_(torch.randn(shape, generator=g, dtype=torch.float64) * cfg["mean_scale"])
                elif name.endswith(("weight", "gamma")):
                    t.copy_(1 + torch.randn(shape, generator=g, dtype=torch.float64) * 0.5)
                elif name.endswith(("bias", "beta")):
                    t.copy_(torch.randn(shape, generator=g, dtype=torch.float64) * 0.5)


def build_conv_norm(cfg: dict) -> nn.Module:
    model = ConvNorm(cfg)
    randomize_norms(model, cfg)
    dtype = getattr(torch, cfg["dtype"])
    model = model.to(dtype)
    with torch.no_grad():  # a variance that underflowed to 0 in fp16 is no longer "random"
        for name, b in model.named_buffers():
            if name.endswith("running_var") and b.is_floating_point():
                b.clamp_(min=torch.finfo(b.dtype).tiny)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last if cfg["dim"] == 2 else torch.channels_last_3d)
    return model.eval()


BUILDERS: dict[str, Callable[[dict], nn.Module]] = {
    "conv_norm": build_conv_norm,
}


def build(**cfg: Any) -> nn.Module:
    """Model factory for a configuration (also usable as ``--arch strategies:build``)."""
    return BUILDERS[cfg["kind"]](cfg)


def storage_dtype(cfg: dict) -> torch.dtype:
    return getattr(torch, cfg["dtype"])


# ----------------------------------------------------------------------------------------------
# strategies


def _per_dim(draw, d: int, values) -> list[int]:
    """One value for every spatial dim (often all equal, sometimes not)."""
    if draw(st.booleans()):
        v = draw(values)
        return [v] * d
    return [draw(values) for _ in range(d)]


@st.composite
def conv_norm_configs(draw, dims=(0, 1, 2, 3), dtypes=DTYPES, variants=("plain", "two_readers", "batch_stats"),
                      padding_modes=PADDING_MODES, transposed=(False, True), channels_last=(False, True),
                      norms=("bn", "bn", "bn", "bn_act", "frozen", "inline_bn")) -> dict:
    """Conv{1,2,3}d / ConvTranspose{1,2,3}d / Linear → BN-like norm → optional scale."""
    d = draw(st.sampled_from(dims))
    tr = d > 0 and draw(st.sampled_from(transposed))
    variant = draw(st.sampled_from(variants))
    # plain configurations dominate; the skip variants are a minority
    if variant != "plain" and draw(st.integers(0, 3)) != 0:
        variant = "plain"
    depthwise = d > 0 and draw(st.integers(0, 4)) == 0
    if depthwise:
        cin = draw(st.integers(1, 6))
        groups, cout = cin, cin * draw(st.integers(1, 2))
    else:
        groups = draw(st.sampled_from((1, 1, 2, 3))) if d > 0 else 1
        cin = groups * draw(st.integers(1, 3 if groups > 1 else 6))
        cout = groups * draw(st.integers(1, 3 if groups > 1 else 6))
    cfg: dict[str, Any] = {"kind": "conv_norm", "dim": d, "transposed": tr, "cin": cin, "cout": cout,
                           "groups": groups, "bias": draw(st.booleans())}
    batch = draw(st.integers(1, 2))
    if variant == "batch_stats":
        batch = 2
    max_size = {0: 0, 1: 10, 2: 6, 3: 4}[d]
    if d == 0:
        cfg.update(kernel=None, stride=None, dilation=None, padding=None, padding_mode="zeros", output_padding=None)
        shape = [batch, cin]
    else:
        k = _per_dim(draw, d, st.integers(1, 3))
        s = _per_dim(draw, d, st.integers(1, 3))
        dil = _per_dim(draw, d, st.integers(1, 2))
        sizes = []
        if tr:
            op = [draw(st.integers(0, max(s[i], dil[i]) - 1)) for i in range(d)]
            sizes = [draw(st.integers(1, max_size)) for _ in range(d)]
            pad = [draw(st.integers(0, min(2, ((sizes[i] - 1) * s[i] + dil[i] * (k[i] - 1) + op[i]) // 2)))
                   for i in range(d)]
            mode = "zeros"
        else:
            op = None
            mode = draw(st.sampled_from(padding_modes))
            choice = draw(st.sampled_from(("int", "int", "same", "valid")))
            if choice == "same" and any(x != 1 for x in s):
                choice = "int"
            if choice == "int":
                pad = _per_dim(draw, d, st.integers(0, 2))
                per_side = pad
            elif choice == "same":
                pad = "same"
                per_side = [(dil[i] * (k[i] - 1) + 1) // 2 for i in range(d)]
            else:
                pad = "valid"
                per_side = [0] * d
            for i in range(d):
                need = max(dil[i] * (k[i] - 1) + 1 - 2 * per_side[i], 1)
                if mode != "zeros":
                    need = max(need, per_side[i] + 1)
                sizes.append(draw(st.integers(need, need + max_size // 2)))
        cfg.update(kernel=k, stride=s, dilation=dil, padding=pad, padding_mode=mode, output_padding=op)
        shape = [batch, cin] + sizes
    cfg["input_shape"] = shape
    cfg["norm"] = "bn" if variant == "batch_stats" else draw(st.sampled_from(norms))
    cfg["affine"] = draw(st.booleans()) if cfg["norm"] != "frozen" else True
    cfg["eps"] = draw(st.sampled_from((1e-5, 1e-3, 1e-1, 1e-8, 0.0, 4e-5)))
    if variant == "batch_stats" and cfg["eps"] == 0.0:
        cfg["eps"] = 1e-5  # torch refuses eps=0 with batch statistics
    cfg["var"] = draw(st.sampled_from(("normal", "normal", "tiny", "wide")))
    cfg["mean_scale"] = draw(st.sampled_from((0.5, 3.0)))
    cfg["scale"] = draw(st.sampled_from(("none", "none", "caffe", "inline")))
    cfg["relu"] = draw(st.booleans())
    cfg["variant"] = variant
    cfg["dtype"] = draw(st.sampled_from(dtypes))
    cfg["channels_last"] = d in (2, 3) and draw(st.sampled_from(channels_last))
    cfg["seed"] = draw(st.integers(0, 2**16))
    return cfg


# ----------------------------------------------------------------------------------------------
# expectations per pass, and the registry the harness iterates over


def check_fold_bn_report(cfg: dict, original: nn.Module, model: nn.Module, report: Any) -> None:
    """fold-bn never silently leaves a BN behind: the norm is folded or skipped with a reason;
    and in the configurations where folding is impossible, it is skipped, not folded."""
    applied = {a.target for a in report.applied}
    skipped = {s.target: s.reason for s in report.skipped}
    for s in report.skipped:
        assert isinstance(s.reason, str) and len(s.reason) > 10, s
    if cfg["norm"] == "inline_bn":  # folded = statistics set to the identity, else reported
        folded = any("batch_norm in the model's forward" in a.detail for a in report.applied)
        if cfg["variant"] == "two_readers":
            assert not folded and any("2 readers" in r for r in skipped.values()), (skipped, applied)
        else:
            assert folded or skipped, "an inline batch_norm neither folded nor skipped"
        return
    still_there = isinstance(getattr(model, "norm", None), type(original.norm))
    if cfg["variant"] in ("two_readers", "batch_stats"):
        assert still_there, "an unfoldable norm was removed"
        assert any("norm" in t for t in skipped) or cfg["norm"] == "frozen", (cfg["variant"], skipped, applied)
    elif still_there and isinstance(original.norm, nn.modules.batchnorm._BatchNorm):
        assert any("norm" in t for t in skipped), f"norm neither folded nor skipped: {skipped}, {applied}"


@dataclass
class PassSpec:
    """How the property tests exercise one pass (or one pass list, e.g. ``optimize``)."""

    configs: Any  # hypothesis strategy of configuration dicts
    check_report: Callable[[dict, nn.Module, nn.Module, Any], None] | None = None  # (cfg, original, rewritten, report)
    command: str | None = None  # CLI command / report name (default: the entry's name)
    passes: list[str] | None = None  # passes to run (default: [the entry's name])
    repeat: bool = False  # run the pass list until nothing changes (optimize)
    exact: bool = True  # function-preserving: parity with the original is the property
    onnx_configs: Any = None  # configurations torch.onnx.export and onnxruntime handle


PROPERTY_PASSES: dict[str, PassSpec] = {
    "fold-bn": PassSpec(
        conv_norm_configs(),
        check_report=check_fold_bn_report,
        # what torch.onnx.export handles: no training-mode BN, no memory-format conversion
        # inside forward; float32 (onnxruntime's CPU kernels)
        onnx_configs=conv_norm_configs(dtypes=("float32",), variants=("plain", "two_readers"), channels_last=(False,)),
    ),
}
