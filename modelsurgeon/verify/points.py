"""Where to compare: ``--verify-at`` points and post-processed outputs.

A detector's forward ends in post-processing -- top-k, a score threshold, NMS -- whose discrete
decisions turn a rounding-level change of a score into another box or label: the raw head
outputs agree to 1e-7, ``labels`` differs everywhere. Such outputs are *post-processed*: an
integer output, or one computed after a discrete op (top-k, sort, argmax, a comparison, a
data-dependent selection) reading computed values; the report says so and suggests the module
to compare instead.

``--verify-at MODULE`` (ONNX: ``--verify-at TENSOR``, repeatable) compares those modules'
outputs (every call, every trial) in addition to the model's outputs, with the same rule. A
model output that fails is *excused* -- reported with its figures, counted as passed -- only
when all of these hold:

* it is post-processed;
* every ``--verify-at`` output passed, in every trial (a module that did not run fails);
* the verified outputs separate every rewrite from the model's outputs: in the recorded run,
  every path from a tensor or module the rewrite changed to a model output goes through a
  verified output, and no changed value is read by Python (control flow). The model's outputs
  are then a function of the verified values and of what no rewrite touched.

Anything else that fails still fails: a rewrite downstream of the verified modules, a wrong
head, a float output that is not post-processed. The ONNX side is :mod:`.points_onnx`.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Sequence

from ..errors import BadInput
from .compare import ParityReport

DISCRETE = frozenset({
    "topk", "sort", "argsort", "msort", "argmax", "argmin", "kthvalue", "mode", "median", "nonzero",
    "argwhere", "masked_select", "unique", "unique_consecutive", "searchsorted", "bucketize", "nms",
    "batched_nms", "gt", "lt", "ge", "le", "eq", "ne", "greater", "less", "greater_equal", "less_equal",
    "__gt__", "__lt__", "__ge__", "__le__", "__eq__", "__ne__", "isin", "round", "floor", "ceil", "trunc",
})
"""Ops whose output is a discrete decision about their (computed) input (``Tensor.`` dropped)."""
SELECT = frozenset({"__getitem__", "index_select", "gather", "take", "take_along_dim", "masked_fill", "where"})
"""Ops that pick elements with an index or mask: discrete when that index is computed."""


def _short(name: str) -> str:
    return name[7:] if name.startswith("Tensor.") else name


# -- PyTorch: recording module outputs ----------------------------------------------------------

def resolve(model: Any, paths: Sequence[str]) -> list[tuple[str, Any]]:
    """``(path, module)`` for every ``--verify-at`` path; BadInput (code ``verify-at``) for one
    that names no module."""
    from ..rewrite.recipe import get_module

    out = []
    for p in paths:
        try:
            mod = get_module(model, p)
        except (AttributeError, KeyError):
            mod = None
        if mod is None or not hasattr(mod, "register_forward_hook"):
            raise BadInput(f"--verify-at {p}: the model has no module at this path", code="verify-at")
        out.append((p, mod))
    return out


@contextlib.contextmanager
def module_outputs(model: Any, paths: Sequence[str]) -> Iterator[dict]:
    """While active, ``{path: [output of each call]}`` (detached copies) of the modules now at
    ``paths`` -- resolved when entered, so a module a pass replaced is the one recorded."""
    from .torch import detach

    got: dict[str, list] = {p: [] for p in paths}
    handles = []
    for p, mod in resolve(model, paths):
        handles.append(mod.register_forward_hook(lambda _m, _a, out, p=p: got[p].append(detach(out))))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


# -- PyTorch: what the recorded graph says --------------------------------------------------------

def _discrete_event(g: Any, ev: Any) -> bool:
    name = _short(ev.name)
    if not g.reads_variable(ev):
        return False
    if name in DISCRETE:
        return True
    if name in SELECT:  # an index / mask that is itself computed from the input
        return any(not g.value(i).const and (g.value(i).dtype is not None and not g.value(i).dtype.is_floating_point)
                   for i in ev.inputs[1:])
    return False


def post_processed(g: Any) -> dict[int, str]:
    """Model output value id -> why it is post-processed (an integer output, or the discrete
    op met walking back from it)."""
    out: dict[int, str] = {}
    for vid in g.outputs:
        v = g.value(vid)
        if v.dtype is not None and not v.dtype.is_floating_point and not v.dtype.is_complex:
            out[vid] = f"an integer output ({str(v.dtype).replace('torch.', '')})"
            continue
        ev = _first_discrete(g, vid)
        if ev is not None:
            out[vid] = f"computed after {_short(ev.name)} in {g.call(ev.scope).path or 'the model'}"
    return out


def _first_discrete(g: Any, vid: int) -> Any:
    stack, seen = [vid], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        ev = g.producer(v)
        if ev is None:
            continue
        if _discrete_event(g, ev):
            return ev
        stack.extend(i for i in ev.inputs if not g.value(i).const)
    return None


def suggest(g: Any, vid: int) -> str | None:
    """The module to compare instead of post-processed output ``vid``: the outermost module
    (not the model) whose output the first discrete op before ``vid`` is computed from."""
    ev = _first_discrete(g, vid)
    if ev is None:
        return None
    producers: dict[int, list] = {}
    for c in g.calls[1:]:
        for o in c.outputs:
            producers.setdefault(o, []).append(c)
    stack, seen = [i for i in ev.inputs if not g.value(i).const], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        calls = producers.get(v)
        if calls:
            return min(calls, key=lambda c: c.path.count(".")).path
        p = g.producer(v)
        if p is not None:
            stack.extend(i for i in p.inputs if not g.value(i).const)
    return None


def leaf_names(g: Any, output: Any) -> dict[int, str]:
    """Model output value id -> the name the comparison gives that leaf (``out[0]['labels']``);
    empty when the output holds objects the recorder does not look into."""
    import torch

    from .compare import flatten_outputs

    tensors = [n for n, leaf in flatten_outputs(output) if isinstance(leaf, torch.Tensor)]
    return dict(zip(g.outputs, tensors)) if len(tensors) == len(g.outputs) else {}


def separation(g: Any, editor: Any, verified: set[int]) -> str | None:
    """``None`` when every path from what ``editor`` changed to a model output goes through a
    value in ``verified`` (and no changed value is read by Python); else why not."""
    starts: list[int] = []
    for t in editor.changed_tensors:
        v = g.param_value(t)
        if v is None:  # created by an earlier structural edit, whose module is a start below
            if not editor.changed_modules:
                return "a rewritten tensor was not in the recorded run"
            continue
        if not g.param_uses(t):
            return f"the rewritten {v.name} is not read in the recorded run"
        starts.append(v.id)
    for m in editor.changed_modules:
        calls = g.calls_of(m)
        if not calls and g.paths_of(m):
            return f"the rewritten {g.paths_of(m)[0]} did not run in the recorded run"
        for c in calls:  # none: a module an earlier edit created, in its predecessor's place
            starts.extend(c.outputs)
    stack, seen = starts, set()
    while stack:
        v = stack.pop()
        if v in seen or v in verified:
            continue
        seen.add(v)
        for u in g.uses(v):
            if u < 0:
                return "a rewritten value reaches a model output without going through the verified modules"
            ev = g.event(u)
            if not ev.outputs:
                where = g.call(ev.scope).path or "the model's forward"
                return f"a rewritten value is read by Python ({ev.name} in {where}): control flow the comparison cannot see"
            stack.extend(ev.outputs)
    return None


def excuse(parity: ParityReport, post: Callable[[str], str | None], at_passed: bool, separated: str | None) -> list[str]:
    """Mark failing post-processed outputs as passed when the ``--verify-at`` outputs vouch for
    them (module docstring); returns notes for the report."""
    failing = [o for o in parity.outputs if not o.passed and not o.name.startswith("at:")]
    if not failing:
        return []
    if not at_passed:
        return ["--verify-at: the verified outputs differ too: nothing is excused"]
    if separated is not None:
        return [f"--verify-at: the failing outputs are not excused: {separated}"]
    notes = []
    for o in failing:
        why = post(o.name)
        if why is None:
            notes.append(f"--verify-at: {o.name} is not post-processed: not excused")
            continue
        o.passed, o.excused = True, True
        o.note = f"post-processed ({why}): the verified outputs match, this one differs by tie-breaking"
    parity.passed = all(o.passed for o in parity.outputs)
    return notes


# -- the pipeline's use (PyTorch) ----------------------------------------------------------------

class TorchPoints:
    """What the PyTorch pipeline keeps about where to compare: the ``--verify-at`` modules as
    the recorded run saw them, and the post-processed outputs by leaf name."""

    def __init__(self, model: Any, graph: Any, output: Any, paths: Sequence[str]):
        self.graph = graph  # the original model's recorded run
        self.paths = list(paths)
        self.verified: set[int] = set()
        for p, mod in resolve(model, self.paths):
            calls = graph.calls_of(mod)
            if not calls:
                raise BadInput(f"--verify-at {p}: the module does not run on the example input", code="verify-at")
            self.verified.update(o for c in calls for o in c.outputs)
        names, found = leaf_names(graph, output), post_processed(graph)
        self.names = set(names.values())
        self.post = {names[v]: why for v, why in found.items() if v in names}
        self.suggestion = None  # the module to suggest for --verify-at
        for v in found:
            self.suggestion = suggest(graph, v)
            if self.suggestion:
                break

    def describe(self) -> str | None:
        """A report note naming the post-processed outputs, or ``None``."""
        if not self.post:
            return None
        shown = ", ".join(f"{n} ({w})" for n, w in list(self.post.items())[:4])
        more = f" and {len(self.post) - 4} more" if len(self.post) > 4 else ""
        hint = "" if self.paths else (f"; compare a module's outputs with --verify-at {self.suggestion}"
                                      if self.suggestion else "; compare a module's outputs with --verify-at MODULE")
        return (f"post-processed outputs: {shown}{more}: their discrete decisions (ties in top-k / NMS) may "
                f"change with an exact rewrite{hint}")

    def hint(self, parity: ParityReport) -> str:
        """Appended to a parity failure's message when post-processed outputs failed."""
        bad = [o.name for o in parity.outputs if not o.passed and self.reason(o.name)]
        if not bad or self.paths:
            return ""
        return f"; {bad[0]} is post-processed ({self.reason(bad[0])}): compare a module's outputs with " \
               f"--verify-at {self.suggestion or 'MODULE'}"

    def judge(self, parity: ParityReport, editor: Any) -> list[str]:
        """Excuse failing post-processed outputs when the verified modules vouch for them."""
        if not self.paths or parity.passed:
            return []
        at_ok = all(o.passed for o in parity.outputs if o.name.startswith("at:"))
        return excuse(parity, self.reason, at_ok, separation(self.graph, editor, self.verified))

    def reason(self, name: str) -> str | None:
        """Why output leaf ``name`` is post-processed, or ``None``. A leaf the recorded run did not
        have (``out[1][...]``: the second image of the batch-larger trial) is judged by the leaves
        of the same pattern (list indices aside), when they all agree."""
        if name in self.post:
            return self.post[name]
        if name in self.names:
            return None
        pattern = _pattern(name)
        same = [n for n in self.names if _pattern(n) == pattern]
        whys = {self.post.get(n) for n in same}
        return next(iter(whys)) if same and len(whys) == 1 else None


def _pattern(name: str) -> str:
    return re.sub(r"\[\d+\]", "[*]", name)


def empty_everywhere(outputs: list) -> list[str]:
    """Names of output tensors empty in every trial (a detector that kept no box)."""
    import torch

    from .compare import flatten_outputs

    per = [dict((n, v) for n, v in flatten_outputs(o) if isinstance(v, torch.Tensor)) for o in outputs]
    if not per:
        return []
    return [n for n in per[0] if all(n in d and d[n].numel() == 0 for d in per)]
