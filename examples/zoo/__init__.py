"""Reference architectures for modelsurgeon's examples and tests (no torchvision/timm needed).

Every builder returns a freshly initialised model; :func:`randomize` gives BatchNorm layers
(and other norm/scale layers) random statistics and affine parameters, because default BN
(mean 0, var 1, gamma 1, beta 0) hides folding bugs.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters in every norm-like layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("running_mean", "mean", "blob_mean"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            for name in ("running_var", "var", "blob_var"):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.05)
            if isinstance(m, (nn.modules.batchnorm._NormBase,)) or type(m).__name__ in ("Scale", "FrozenBatchNorm2d", "Affine"):
                for name in ("weight", "bias"):
                    t = getattr(m, name, None)
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        base = 1.0 if name == "weight" else 0.0
                        t.copy_(base + torch.randn(t.shape, generator=g) * 0.3)
    return model
