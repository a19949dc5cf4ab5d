"""The pass contract, on either back end (drawn in docs/architecture.md).

Details: docs/architecture.md (*Passes*, *The contract*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

from ..report.codes import Refusal


@dataclass
class Applied:
    """One rewrite done: target and detail for the report, ``data`` for its JSON. A pass whose
    ``verify`` needs more (what it measured before rewriting) subclasses it."""

    target: str
    detail: str
    data: dict = field(default_factory=dict)
    pass_name: str = ""
    slot: str | None = None

    def to_json(self) -> dict:
        d = {"pass": self.pass_name, "target": self.target, "detail": self.detail}
        if self.slot:
            d["slot"] = self.slot
        d.update({k: v for k, v in self.data.items() if k not in d})
        return d


@dataclass
class Skipped:
    """A candidate the pass found and cannot rewrite exactly, with the reason and its stable
    ``code`` (``report/codes.py``; docs/json.md lists them). ``reason`` may be a
    :class:`~modelsurgeon.report.codes.Refusal`, which brings its code."""

    target: str
    reason: str
    pass_name: str = ""
    slot: str | None = None
    code: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.reason, Refusal):
            self.code = self.code or self.reason.code
            self.reason = self.reason.reason

    def to_json(self) -> dict:
        d = {"pass": self.pass_name, "target": self.target, "reason": self.reason}
        if self.code:
            d["code"] = self.code
        if self.slot:
            d["slot"] = self.slot
        return d


@dataclass
class Match:
    """Base for a pass's matches: a target (for the report) plus whatever the rewrite needs."""

    target: str


@dataclass
class PassReport:
    name: str
    applied: list[Applied] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.applied)

    def add_round(self, other: "PassReport", first_round: bool, slot: str | None = None) -> None:
        """Take in one more run of the same pass: every round's rewrites add up; what is skipped
        is what the latest round found (earlier rounds' candidates may have been rewritten
        since, by another pass)."""
        self.applied.extend(other.applied)
        if not first_round:
            self.skipped = [s for s in self.skipped if s.slot != slot]
        self.skipped.extend(other.skipped)
        self.notes.extend(n for n in other.notes if n not in self.notes)


@dataclass(kw_only=True)
class PassContext:
    """What every pass gets besides its back end's model and graph; the pipeline merges back
    what a pass leaves here."""

    options: Any = None  # the pass's options (an instance of its PassSpec's options dataclass)
    slot: str | None = None  # "model" / "ema" in a multi-model checkpoint
    references: Any = None  # the original model's outputs (torch References / OnnxReferences)
    notes: list[str] = field(default_factory=list)  # into the pass's section of the report
    warnings: list[str] = field(default_factory=list)  # into Report.warnings
    report_extra: dict = field(default_factory=dict)  # pass sections of the report (Report.extra)
    checks: list = field(default_factory=list)  # ParityReports a pass measured itself (gradients)
    # A pass sets ``stop`` (a one-line reason) in ``match`` when it has answered an inspection
    # (``truncate --list``): the run ends after that pass; nothing is rewritten, verified or written.
    stop: str | None = None
    # False when no host code runs on the output (an .onnx export): nothing is left to its fuse()
    host_code: bool = True


@dataclass
class TorchContext(PassContext):
    """What a PyTorch pass works on."""

    model: Any
    graph: Any  # DataflowGraph of the current model on ``inputs``
    inputs: list  # the example inputs (trial 0)
    editor: Any  # ModuleEditor


@dataclass
class OnnxContext(PassContext):
    """What an ONNX pass works on."""

    model: Any  # onnx_ir.Model, edited in place
    graph: Any  # modelsurgeon.capture.onnx.OnnxGraph
    editor: Any  # modelsurgeon.rewrite.onnx.OnnxEditor
    input_shapes: dict = field(default_factory=dict)  # graph input name -> example shape
    given_shapes: dict = field(default_factory=dict)  # the same, for inputs sized with --input-shape


class Pass:
    """Base of every pass. Subclasses set ``name`` (the registered name) and ``backend``."""

    name: ClassVar[str] = ""
    backend: ClassVar[str] = "torch"  # "torch" or "onnx"
    preserves_function: ClassVar[bool] = True  # False: verify() checks the pass's own result

    def prepare(self, ctx: Any) -> list[str] | None:
        """Check the options against the model before anything runs; return the names of
        tensors the references must include (ONNX), if any."""
        return None

    def match(self, ctx: Any) -> Iterable[Match | Skipped]:
        raise NotImplementedError(f"{type(self).__name__}.match")

    def rewrite(self, ctx: Any, match: Match) -> Applied | Skipped:
        raise NotImplementedError(f"{type(self).__name__}.rewrite")

    def verify(self, ctx: Any, applied: list[Applied], tolerance: Any) -> Any:
        """``None``: the pipeline's parity against the original decides. A ParityReport
        replaces it (PyTorch; on ONNX it is added to the check of the written file)."""
        return None


def run_pass(p: Pass, ctx: Any, dry_run: bool = False) -> PassReport:
    """Match on the unmodified graph, then rewrite each match (unless ``dry_run``)."""
    report = PassReport(p.name)
    found = list(p.match(ctx))
    if ctx.stop:
        dry_run = True  # an inspection: report what was found, change nothing
    seen: set[tuple[str, str]] = set()
    for m in found:
        if isinstance(m, Skipped):
            if (m.target, m.reason) in seen:  # the same module met again (shared, called twice)
                continue
            seen.add((m.target, m.reason))
            m.pass_name, m.slot = p.name, ctx.slot
            report.skipped.append(m)
            continue
        result = Applied(m.target, "would be rewritten") if dry_run else p.rewrite(ctx, m)
        result.pass_name, result.slot = p.name, ctx.slot
        (report.applied if isinstance(result, Applied) else report.skipped).append(result)
    report.notes.extend(ctx.notes)
    return report
