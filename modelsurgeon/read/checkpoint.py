"""What a loaded checkpoint is: its container, the models inside it, and how to put them back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelSlot:
    """One model inside a checkpoint (a full module, ``ckpt['model']``, ``ckpt['ema']``...)."""

    name: str  # "module", "model", "ema", "state_dict"
    key: str | None  # key in the container dict, None when the checkpoint is the module itself
    module: Any  # the torch.nn.Module
    sd_prefix: str = ""  # for state_dict checkpoints: prefix of the keys in the file
    storage: Any = None  # modelsurgeon.read.prepare.StorageState, set by prepare()
    recipe: Any = None  # this model's structural edits (Checkpoint.recipe_for)
    sd_extra: dict = field(default_factory=dict)
    """State_dict entries that are not the model's (keys outside ``sd_prefix``, non-tensor
    values such as ``'version': 3``), as the file holds them: written back unchanged."""


@dataclass
class Checkpoint:
    """A loaded input file.

    ``format`` is one of:
      * ``module``      -- a pickled ``nn.Module`` (``container`` is the module)
      * ``container``   -- a dict wrapping modules (YOLO ``model``/``ema`` + metadata)
      * ``state_dict``  -- tensors only, rebuilt with ``--arch``; ``container`` is the original
                           dict (a bare state_dict, or a Lightning-style dict holding one)
      * ``safetensors`` -- tensors + string metadata, rebuilt with ``--arch``
      * ``onnx``        -- an ONNX model (``container`` is the IR model)
      * ``darknet`` / ``caffe`` -- read into an ONNX graph (``container`` is the IR model,
                           ``source`` what the format's writer needs to put it back)
    """

    path: Path
    format: str
    container: Any
    slots: list[ModelSlot] = field(default_factory=list)
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    recipe: Any = None  # modelsurgeon.rewrite.recipe.Recipe: structural edits (loaded + new)
    metadata: dict = field(default_factory=dict)  # safetensors metadata / our own meta
    sd_key: str | None = None  # for state_dict containers: key holding the tensors
    size_bytes: int = 0
    aliases: dict = field(default_factory=dict)
    """Container keys holding the very module object of an earlier slot (``{'model': m,
    'ema': m}``) -> that slot's key. ``slots`` lists each object once, so it is rewritten once;
    the saved container keeps the keys pointing at the same object."""
    notes: list[str] = field(default_factory=list)  # what the loader has to say, for the report
    source: Any = None  # darknet / caffe: the files as read (read/darknet, read/caffe)

    @property
    def is_onnx(self) -> bool:
        """Edited by the ONNX back end: an ONNX file, or a Darknet / Caffe model read into one."""
        return self.format in ("onnx", "darknet", "caffe")

    @property
    def onnx_source(self) -> Any:
        """The original graph for references: the ``.onnx`` path, or the converted graph's bytes."""
        return self.source.onnx_bytes if self.source is not None else self.path

    @property
    def needs_arch(self) -> bool:
        return self.format in ("state_dict", "safetensors")

    def recipe_for(self, slot: ModelSlot) -> Any:
        """The recipe ``slot``'s edits are recorded in: the checkpoint's (loaded + new) for a
        single model, one of its own for each model of a container."""
        if slot.recipe is None:
            from ..rewrite.recipe import Recipe

            single = len(self.slots) == 1 and self.recipe is not None
            slot.recipe = self.recipe if single else Recipe()
        return slot.recipe

    def primary(self) -> ModelSlot:
        """The model used for single-model outputs: ``ema`` when present, else the first."""
        for s in self.slots:
            if s.name == "ema":
                return s
        return self.slots[0]
