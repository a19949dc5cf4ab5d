"""Backbone stages: chains of sibling module calls, each reading the previous one's output.

A *stage* is what a backbone is made of, found in the recorded execution rather than in the
module tree, so both layouts in the wild are seen the same way:

* a container called as a whole (``self.features(x)`` on an ``nn.Sequential``): its children's
  calls form the chain;
* a host forward calling blocks one by one (``x = self.layer1(x); x = self.layer2(x)...`` or
  ``for blk in self.blocks: x = blk(x)``): the host's child calls form the chain.

A chain is a maximal run of consecutive child calls of one call where each block has one tensor
output and reads the previous block's output as its first input (other inputs constant), every
block module is called once, and the chain's output reaches a model output. Trailing
parameter-free blocks (pooling, activation, dropout after the last layer) are left out: they
belong to the path to the head. Chains of at least two blocks are candidates; the main stage is
the one with the highest ``blocks x share of the model's FLOPs`` (parameters when no FLOPs are
counted), i.e. many blocks that carry the compute.

FLOPs per module come from the capture (``torch.utils.flop_counter``'s formulas, see
:mod:`modelsurgeon.report.flops`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..capture.graph import DataflowGraph, ModuleCall


@dataclass
class Block:
    index: int
    call: ModuleCall
    path: str
    out_shape: tuple | None
    params: int
    flops: int

    @property
    def module(self) -> Any:
        return self.call.module

    @property
    def type_name(self) -> str:
        return type(self.call.module).__name__

    @property
    def out_channels(self) -> int | None:
        """Size of dimension 1 of the output (channels of NC... tensors, features of N x F)."""
        s = self.out_shape
        return s[1] if s is not None and len(s) >= 2 else (s[0] if s else None)

    def row(self) -> dict:
        return {"index": self.index, "path": self.path, "type": self.type_name,
                "out_shape": list(self.out_shape) if self.out_shape is not None else None,
                "out_channels": self.out_channels, "params": self.params, "flops": self.flops}


@dataclass
class Stage:
    path: str  # container of the blocks ('' = the model itself); the host when parents differ
    host: str  # path of the module whose forward calls the blocks ('' = the model)
    blocks: list[Block]
    flops: int
    share: float  # of the model's FLOPs (or parameters when no FLOPs are counted)
    measure: str  # "FLOPs" | "parameters" | "blocks"
    trimmed: list[str] = field(default_factory=list)  # trailing parameter-free calls left out

    @property
    def score(self) -> float:
        return len(self.blocks) * self.share

    @property
    def label(self) -> str:
        return self.path or "<model>"

    def describe(self) -> str:
        host = f"{self.host}.forward" if self.host else "the model's forward"
        return (f"{self.label}: {len(self.blocks)} blocks called one after another by {host}, each "
                f"reading the previous one's output, on the input→output path, carrying "
                f"{self.share:.0%} of the model's {self.measure}")

    def summary(self) -> dict:
        return {"stage": self.path, "host": self.host, "blocks": len(self.blocks),
                "share": round(self.share, 4), "measure": self.measure, "score": round(self.score, 3)}


def module_flops(model: Any, inputs: list, graph: DataflowGraph | None = None) -> tuple[dict[str, int], int]:
    """FLOPs per module path (nested calls included) and in all, for one forward pass: from
    the capture when it counted them, else by capturing the model once more."""
    if graph is None or graph.module_flops is None:
        from ..capture import capture

        graph, _, _ = capture(model, inputs, count_flops=True)
    return graph.module_flops, graph.module_flops.get("", 0)


def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _live_values(g: DataflowGraph) -> set[int]:
    """Values the model's outputs depend on."""
    live: set[int] = set()
    stack = list(g.outputs)
    while stack:
        v = stack.pop()
        if v in live:
            continue
        live.add(v)
        p = g.values[v].producer
        if p is not None:
            stack.extend(g.events[p].inputs)
        prev = g.values[v].version_of
        if prev is not None:
            stack.append(prev)
    return live


def find_stages(g: DataflowGraph, model: Any, flops: dict[str, int], total_flops: int) -> list[Stage]:
    """Every candidate stage, best first."""
    live = _live_values(g)
    total_params = _params(model)
    chains: list[list[ModuleCall]] = []
    for call in g.calls:
        run: list[ModuleCall] = []
        for cid in call.children:
            c = g.call(cid)
            if not _block_ok(g, c):
                chains.append(run)
                run = []
                continue
            if run and _continues(g, run[-1], c):
                run.append(c)
            else:
                chains.append(run)
                run = [c]
        chains.append(run)
    stages: list[Stage] = []
    seen: set[tuple] = set()
    for chain in chains:
        trimmed: list[str] = []
        while chain and _params(chain[-1].module) == 0:
            trimmed.insert(0, chain[-1].path)
            chain = chain[:-1]
        if len(chain) < 2 or chain[-1].outputs[0] not in live:
            continue
        host = g.call(chain[0].parent).path
        parents = {_parent(c.path) for c in chain}
        subruns = [chain]
        if len(parents) > 1:  # blocks of different containers: each container's run too
            i = 0
            while i < len(chain):
                j = i
                while j + 1 < len(chain) and _parent(chain[j + 1].path) == _parent(chain[i].path):
                    j += 1
                if j > i:
                    subruns.append(chain[i:j + 1])
                i = j + 1
        for run in subruns:
            key = tuple(c.id for c in run)
            if key in seen:
                continue
            seen.add(key)
            ps = {_parent(c.path) for c in run}
            path = ps.pop() if len(ps) == 1 else host
            blocks = [Block(i, c, c.path, g.value(c.outputs[0]).shape, _params(c.module), flops.get(c.path, 0))
                      for i, c in enumerate(run)]
            fl = sum(b.flops for b in blocks)
            if total_flops > 0:
                share, measure = fl / total_flops, "FLOPs"
            elif total_params > 0:
                share, measure = sum(b.params for b in blocks) / total_params, "parameters"
            else:
                share, measure = 1.0, "blocks"
            stages.append(Stage(path, host, blocks, fl, share, measure,
                                trimmed if run is chain else []))
    stages.sort(key=lambda s: (-s.score, -len(s.blocks), s.path.count(".")))
    return stages


def _block_ok(g: DataflowGraph, c: ModuleCall) -> bool:
    return len(c.outputs) == 1 and len(c.inputs) >= 1 and g.call_count(c.module) == 1


def _continues(g: DataflowGraph, prev: ModuleCall, c: ModuleCall) -> bool:
    return (c.inputs[0] == prev.outputs[0] and c.module is not prev.module
            and all(g.value(v).const for v in c.inputs[1:]))
