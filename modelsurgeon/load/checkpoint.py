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
    storage: Any = None  # modelsurgeon.load.prepare.StorageState, set by prepare()


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

    @property
    def is_onnx(self) -> bool:
        return self.format == "onnx"

    @property
    def needs_arch(self) -> bool:
        return self.format in ("state_dict", "safetensors")

    def primary(self) -> ModelSlot:
        """The model used for single-model outputs: ``ema`` when present, else the first."""
        for s in self.slots:
            if s.name == "ema":
                return s
        return self.slots[0]
