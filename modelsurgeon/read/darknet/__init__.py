"""Darknet models in: ``.cfg`` + ``.weights`` read into an ONNX graph.

``read_darknet(weights, cfg)`` returns a :class:`DarknetSource`: the ``onnx_ir`` model
(``.model``) and what a writer needs to put a rewritten graph back into darknet files (the
parsed ``.cfg``, the layers, the header, which node belongs to which layer).
``load_darknet`` wraps it in a :class:`~modelsurgeon.read.checkpoint.Checkpoint` for the
pipeline, which runs it through the ONNX back end.

    cfg.py      the .cfg grammar (sections, options, darknet's atoi/atof)
    layers.py   layers with darknet's defaults, input layers, output sizes, weight arrays
    weights.py  the .weights header and float stream (exact length required)
    graph.py    the ONNX graph
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...errors import BadInput


@dataclass
class DarknetSource:
    cfg: Any  # cfg.Cfg
    layers: list
    header: Any  # weights.Header
    arrays: dict  # layer index -> {array name: np.ndarray}, as read
    model: Any  # onnx_ir.Model
    owner: dict  # node name -> layer index
    cfg_path: Path | None = None
    weights_path: Path | None = None
    onnx_bytes: bytes = field(default=b"", repr=False)  # the graph as read, serialized


def companion(path: Path, given: str | Path | None, suffix: str, flag: str) -> Path:
    """The structure file for ``path``: ``given``, else the file beside it with the same stem."""
    if given is not None:
        p = Path(given)
        if not p.is_file():
            raise BadInput(f"{flag} {p}: no such file", code="missing-structure")
        return p
    p = path.with_suffix(suffix)
    if not p.is_file():
        raise BadInput(f"{path.name}: no {p.name} beside it: pass {flag} FILE", code="missing-structure")
    return p


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})")


def net_shape(cfg: Any, input_shapes: Sequence[str] = ()) -> tuple[int, int, int, int]:
    """Batch 1 x ``[net]`` channels x height x width, or the one ``--input-shape`` given."""
    from ...verify.inputs import parse_shape
    from .layers import input_shape

    c, h, w = input_shape(cfg)
    if not input_shapes:
        return 1, c, h, w
    if len(input_shapes) != 1:
        raise BadInput(f"a darknet model has one input: pass --input-shape once (got {len(input_shapes)})")
    shape = tuple(parse_shape(input_shapes[0]))
    if len(shape) != 4 or shape[1] != c:
        raise BadInput(f"--input-shape {','.join(map(str, shape))}: a darknet model takes N,{c},H,W "
                       f"([net] channels={c})")
    return shape  # type: ignore[return-value]


def read_darknet(weights: str | Path, cfg: str | Path | None = None, input_shapes: Sequence[str] = ()) -> DarknetSource:
    """Read ``weights`` with its ``.cfg`` (``cfg``, or the ``.cfg`` beside it) into ONNX."""
    import onnx_ir as ir

    from ...capture.onnx import infer_shapes
    from .cfg import parse_cfg
    from .graph import DarknetGraph
    from .layers import read_layers
    from .weights import read_weights

    weights = Path(weights)
    cfg_path = companion(weights, cfg, ".cfg", "--cfg")
    parsed = parse_cfg(_read_text(cfg_path), cfg_path.name)
    shape = net_shape(parsed, input_shapes)
    layers = read_layers(parsed, shape[1:])
    header, arrays = read_weights(weights, layers, cfg_path.name)
    model, owner = DarknetGraph(layers, arrays, shape).build(weights.stem)
    infer_shapes(model)
    src = DarknetSource(cfg=parsed, layers=layers, header=header, arrays=arrays, model=model, owner=owner,
                        cfg_path=cfg_path, weights_path=weights)
    src.onnx_bytes = ir.to_proto(model).SerializeToString()
    return src


def load_darknet(path: str | Path, cfg: str | Path | None = None, input_shapes: Sequence[str] = ()) -> Any:
    from ..checkpoint import Checkpoint

    src = read_darknet(path, cfg, input_shapes)
    ckpt = Checkpoint(path=Path(path), format="darknet", container=src.model, source=src)
    ckpt.notes.append(f"read with {src.cfg_path.name}: {len(src.layers)} layers, weights file version "
                      f"{src.header.major}.{src.header.minor}.{src.header.revision}")
    return ckpt
