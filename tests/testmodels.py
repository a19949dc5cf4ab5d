"""Small models for the tests: every layout fold-bn must handle or must refuse."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ControlFlow(nn.Module):
    """Not symbolically traceable: data-dependent branch, loop count from a tensor value,
    ``float(tensor)``, and a shape-dependent Python condition."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if float(y.mean()) > -1e9:  # always true, but decided on data
            y = self.bn2(self.conv2(y))
        for _ in range(int(x.shape[-1] > 4) + 1):
            y = F.relu(y)
        if y.shape[-1] % 2 == 0:
            y = y * 0.5
        return self.head(y.mean((2, 3)))


class SharedConv(nn.Module):
    """One conv called twice: its BN cannot be folded into it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        a = self.bn_a(self.conv(x))
        b = self.bn_b(self.conv(a))
        return a + b


class SharedBN(nn.Module):
    """One BN applied after two convs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.c2(self.bn(self.c1(x))))


class TwoConsumers(nn.Module):
    """The conv output feeds its BN and a skip connection."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 1)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y
        return self.bn2(self.conv2(z))


class WSConv2d(nn.Conv2d):
    """Weight standardisation: the stored weight is not the one convolved."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WeightStandardised(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = WSConv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(F.relu(self.bn(self.conv(x)))))


class NoRunningStats(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.bn(self.conv(x))


class BatchNormAct2d(nn.BatchNorm2d):
    """timm-style BN with the activation inside the norm layer."""

    def __init__(self, num_features, act=True):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.SiLU() if act else nn.Identity()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return self.act(self.drop(x))


class FrozenBatchNorm2d(nn.Module):
    """detectron2-style frozen BN: buffers only, no BN base class, computes in forward."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n) - eps)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


class Affine(nn.Module):
    """A converter's per-channel scale layer (any name): y = x * a + b via torch.addcmul."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, n, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, n, 1, 1))

    def forward(self, x):
        return torch.addcmul(self.bias, x, self.weight)


class Zoo(nn.Module):
    """Many layer kinds in one model, each followed by a foldable norm."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = BatchNormAct2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = FrozenBatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.grouped_bn = nn.BatchNorm2d(12, affine=False)
        self.grouped_scale = Affine(12)
        self.up = nn.ConvTranspose2d(12, 8, 4, stride=2, padding=1, groups=2, bias=False)
        self.up_bn = nn.BatchNorm2d(8)
        self.refl = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.refl_bn = nn.BatchNorm2d(8, eps=1e-3)
        self.fc = nn.Linear(8, 16, bias=False)
        self.fc_bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem_bn(self.stem(x))
        x = F.relu(self.dw_bn(self.dw(x)))
        x = F.relu(self.grouped_scale(self.grouped_bn(self.grouped(x))))
        x = F.relu(self.up_bn(self.up(x)))
        x = F.relu(self.refl_bn(self.refl(x)))
        x = x.mean((2, 3))
        return self.out(F.relu(self.fc_bn(self.fc(x))))


class OneD(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(4, 8, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm1d(8)
        self.t = nn.ConvTranspose1d(8, 6, 3, stride=2, output_padding=1)
        self.bn2 = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn2(self.t(F.relu(self.bn(self.c(x)))))


class ThreeD(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(2, 6, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm3d(6)
        self.t = nn.ConvTranspose3d(6, 4, 2, stride=2, bias=False)
        self.bn2 = nn.BatchNorm3d(4)

    def forward(self, x):
        return self.bn2(self.t(F.relu(self.bn(self.c(x)))))


class InlineScale(nn.Module):
    """Per-channel parameters applied inline in the host forward (no module to remove)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.gamma = nn.Parameter(torch.ones(5))
        self.beta = nn.Parameter(torch.zeros(5))
        self.conv2 = nn.Conv2d(5, 5, 1)

    def forward(self, x):
        y = self.conv(x) * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)
        return self.conv2(F.relu(y))


def randomize_all(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics/affine in every norm and scale layer, including buffers-only ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if not t.is_floating_point():
                    continue
                if "var" in name:
                    t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.05)
                elif "mean" in name:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
                elif name in ("weight", "gamma") and not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                    t.copy_(1 + torch.randn(t.shape, generator=g) * 0.3)
                elif name in ("bias", "beta") and not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model


class NonPersistentScale(nn.Module):
    """``conv(x) * scale`` with the scale in a non-persistent buffer (a state_dict does not hold
    it), then a foldable conv + BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 6).view(1, 6, 1, 1), persistent=False)
        self.conv2 = nn.Conv2d(6, 6, 1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.conv2(F.relu(self.conv(x) * self.scale)))


def non_persistent_scale() -> nn.Module:
    torch.manual_seed(0)
    return randomize_all(NonPersistentScale(), 3).eval()


def seeded_resnet(seed: int = 0) -> nn.Module:
    """The same small ResNet for the same seed (weights and BatchNorm statistics random), in
    eval mode; the global RNG is left as it was."""
    from zoo import randomize
    from zoo.resnet import resnet

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return randomize(resnet(), seed).eval()
