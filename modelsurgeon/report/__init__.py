"""The report of one run: what was rewritten, what was skipped and why, parity, before/after.

One data structure for every command and back end; rendered as rich tables
(:mod:`modelsurgeon.report.render`) or as one JSON document (``--json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._version import __version__


@dataclass
class ModelStats:
    params: int = 0
    flops: int | None = None
    bn: int = 0  # BatchNorm-like modules + inline batch_norm ops (torch) / BatchNormalization nodes (ONNX)
    modules: int = 0  # modules in the tree (torch) / nodes in the graph (ONNX)
    ops: int = 0  # ops reading the input's values in one forward (torch) / nodes (ONNX)

    def to_json(self) -> dict:
        return {"params": self.params, "flops": self.flops, "bn": self.bn, "modules": self.modules,
                "ops": self.ops}


@dataclass
class Report:
    command: str
    input: str
    output: str | None = None
    backend: str = "torch"
    input_format: str = ""
    passes: list = field(default_factory=list)  # PassReport
    parity: Any = None  # ParityReport
    before: ModelStats | None = None
    after: ModelStats | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False
    written: bool = False
    inputs: list = field(default_factory=list)
    slots: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # pass-specific sections (truncate, bench...)
    stopped: str | None = None  # a pass ended the run after matching (an inspection, e.g. --list)

    @property
    def applied(self) -> list:
        return [a for p in self.passes for a in p.applied]

    @property
    def skipped(self) -> list:
        return [s for p in self.passes for s in p.skipped]

    def to_json(self) -> dict:
        parity = self.parity.to_json() if self.parity is not None else {
            "checked": False, "passed": None, "max_abs": None, "max_rel": None, "outputs": []}
        return {
            "tool": "modelsurgeon",
            "version": __version__,
            "command": self.command,
            "input": self.input,
            "output": self.output,
            "written": self.written,
            "dry_run": self.dry_run,
            "stopped": self.stopped,
            "backend": self.backend,
            "input_format": self.input_format,
            "slots": self.slots,
            "inputs": [list(s) for s in self.inputs],
            "applied": [a.to_json() for a in self.applied],
            "skipped": [s.to_json() for s in self.skipped],
            "passes": [{"name": p.name, "applied": len(p.applied), "skipped": len(p.skipped), "notes": list(p.notes)}
                       for p in self.passes],
            "parity": parity,
            "before": self.before.to_json() if self.before else None,
            "after": self.after.to_json() if self.after else None,
            "warnings": self.warnings,
            "notes": self.notes,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            **self.extra,
        }
