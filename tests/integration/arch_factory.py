"""Model factories the way a user passes them to ``--arch``: ``arch_factory:timm_model`` with
``--arch-kwargs '{"name": "resnet18d"}'`` (and ``--code-path`` this directory). Plain calls into
timm / torchvision; nothing here knows about modelsurgeon."""

from __future__ import annotations


def timm_model(name: str, **kwargs):
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def torchvision_model(name: str, **kwargs):
    import torchvision

    return torchvision.models.get_model(name, weights=None, **kwargs)


def torchvision_detector(name: str, **kwargs):
    import torchvision

    kwargs.setdefault("weights_backbone", None)
    return torchvision.models.get_model(name, weights=None, **kwargs)


def torchvision_frozen(name: str, **kwargs):
    """A torchvision model with ``FrozenBatchNorm2d`` (what its detection backbones use)."""
    import torchvision
    from torchvision.ops.misc import FrozenBatchNorm2d

    return torchvision.models.get_model(name, weights=None, norm_layer=FrozenBatchNorm2d, **kwargs)


def timm_frozen(name: str, **kwargs):
    """A timm model with its BatchNorms frozen by timm itself (``FrozenBatchNorm2d``,
    ``FrozenBatchNormAct2d``), as fine-tuning recipes do."""
    from timm.layers import freeze_batch_norm_2d

    return freeze_batch_norm_2d(timm_model(name, **kwargs))


FACTORIES = {"timm": timm_model, "torchvision": torchvision_model, "detector": torchvision_detector,
             "torchvision_frozen": torchvision_frozen, "timm_frozen": timm_frozen}


def build(source: str, name: str, **kwargs):
    return FACTORIES[source](name, **kwargs)
