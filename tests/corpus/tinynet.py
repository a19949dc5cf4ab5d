"""The architecture the bad-input corpus's state_dicts are written for (``--arch tinynet:tiny``)."""

import torch.nn as nn


def tiny(width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2, 1))


def wide(width: int = 1024) -> nn.Module:
    """~38 MB of float32 weights at width 1024: an output that takes measurable time to write."""
    return nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
