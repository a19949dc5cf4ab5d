"""The element and shape rules of :mod:`modelsurgeon.capture.onnx_shapes`: what is known of a
value (:class:`Fact`: shape of ints and :class:`Dim` s, small elements, the array) and how the
ops shape arithmetic is written with carry it from inputs to outputs."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

MAX_ELEMENTS = 64  # element-wise (symbolic) tracking is for shape-sized tensors
MAX_ARRAY_BYTES = 1 << 20  # known arrays larger than this are not materialised
_ANON = itertools.count()


class Dim:
    """A symbolic size. Named dims are equal by name (ONNX: the same ``dim_param`` is the same
    size); anonymous ones only to themselves."""

    __slots__ = ("name",)

    def __init__(self, name: str | None = None):
        self.name = name or f"__ms_dim{next(_ANON)}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dim) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return self.name

    @property
    def anonymous(self) -> bool:
        return self.name.startswith("__ms_dim")


@dataclass
class Fact:
    shape: tuple | None = None  # ints and Dims; None: rank unknown
    dtype: int | None = None  # onnx elem type
    elems: tuple | None = None  # flat elements (numbers, Dims, None) of a small tensor
    array: Any = None  # np.ndarray once fully known

    @property
    def known(self) -> bool:
        return self.array is not None


def _np_dtype(elem: int | None):
    import onnx

    try:
        return onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else None
    except Exception:
        return None


def _dims(shape: Any) -> tuple | None:
    """An onnx_ir shape as ints and Dims."""
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else Dim(getattr(d, "value", None)) for d in shape.dims)


def _number(x: Any) -> bool:
    return x is not None and not isinstance(x, Dim)


def _from_array(arr) -> Fact:
    import numpy as np

    arr = np.asarray(arr)
    f = Fact(shape=tuple(int(d) for d in arr.shape), array=arr)
    try:
        import onnx

        f.dtype = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
    except Exception:
        pass
    if arr.size <= MAX_ELEMENTS and arr.dtype.kind in "biuf":
        f.elems = tuple(arr.reshape(-1).tolist())
    return f


def _attr(node: Any, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None or a.is_ref() else a.value


# -- element rules ----------------------------------------------------------------------------

def _fact(shape: tuple, elems: list, dtype: int | None) -> Fact:
    """A Fact from elements; the array too when every element is a number."""
    import numpy as np

    f = Fact(shape=tuple(shape), dtype=dtype, elems=tuple(elems))
    if all(_number(e) for e in elems) and dtype is not None:
        npd = _np_dtype(dtype)
        if npd is not None:
            f.array = np.array(elems, dtype=npd).reshape(shape)
    return f


def _ints(f: Fact | None) -> list | None:
    """A known integer array's elements."""
    if f is None or not f.known or f.array.dtype.kind not in "iu":
        return None
    return [int(x) for x in f.array.reshape(-1)]


def _small(f: Fact | None) -> bool:
    return f is not None and f.elems is not None and f.shape is not None and len(f.shape) <= 1


def _elements(node: Any, ins: list) -> list[Fact] | None:
    """Element-wise rules for the ops shape arithmetic uses; ``None`` when none applies."""
    op = node.op_type
    out_dtype = int(node.outputs[0].dtype) if node.outputs and node.outputs[0].dtype is not None else None
    if op == "Shape":
        src = ins[0]
        if src is None or src.shape is None:
            return None
        rank = len(src.shape)
        start, end = int(_attr(node, "start", 0)), _attr(node, "end", None)
        start = max(0, min(rank, start + rank if start < 0 else start))
        end = rank if end is None else max(0, min(rank, int(end) + rank if int(end) < 0 else int(end)))
        dims = list(src.shape[start:end])
        return [_fact((len(dims),), dims, 7)]
    if op == "Size":
        src = ins[0]
        if src is None or src.shape is None or not all(isinstance(d, int) for d in src.shape):
            return None
        n = 1
        for d in src.shape:
            n *= d
        return [_fact((), [n], 7)]
    if op in ("Identity",) and _small(ins[0]):
        return [_fact(ins[0].shape, list(ins[0].elems), ins[0].dtype)]
    if op == "Cast" and _small(ins[0]):
        to = int(_attr(node, "to", 0))
        npd = _np_dtype(to)
        if npd is None:
            return None
        integral = npd.kind in "iu"
        out = []
        for e in ins[0].elems:
            if isinstance(e, Dim):
                out.append(e if integral else None)
            elif e is None:
                out.append(None)
            else:
                import numpy as np

                out.append(np.array(e).astype(npd).item())
        return [_fact(ins[0].shape, out, to)]
    if op in ("Unsqueeze", "Squeeze", "Reshape", "Flatten") and _small(ins[0]):
        shape = _view_shape(node, ins)
        if shape is None:
            return None
        return [_fact(shape, list(ins[0].elems), ins[0].dtype)]
    if op == "Gather" and _small(ins[0]) and len(ins[0].shape) == 1:
        idx = ins[1]
        if idx is None or not idx.known or int(_attr(node, "axis", 0)) != 0 or idx.array.size > MAX_ELEMENTS:
            return None
        n = len(ins[0].elems)
        picked = []
        for i in idx.array.reshape(-1).tolist():
            i = int(i) + n if int(i) < 0 else int(i)
            if not 0 <= i < n:
                return None
            picked.append(ins[0].elems[i])
        return [_fact(tuple(int(d) for d in idx.array.shape), picked, ins[0].dtype)]
    if op == "Concat" and ins and all(_small(f) and len(f.shape) == 1 for f in ins):
        elems = [e for f in ins for e in f.elems]
        return [_fact((len(elems),), elems, ins[0].dtype)] if len(elems) <= MAX_ELEMENTS else None
    if op == "Slice" and _small(ins[0]) and len(ins[0].shape) == 1:
        return _slice(node, ins)
    if op in _BINARY and len(ins) == 2 and all(_small(f) for f in ins):
        return _binary(op, ins, out_dtype)
    if op == "Where" and len(ins) == 3 and all(_small(f) for f in ins):
        cond, a, b = ins
        shape = _broadcast_shape([f.shape for f in ins])
        if shape is None:
            return None
        n = _count(shape)
        ce, ae, be = (_spread(f, shape) for f in ins)
        out = []
        for c, x, y in zip(ce, ae, be):
            out.append(None if c is None else (x if c else y))
        return [_fact(shape, out, a.dtype)] if len(out) == n else None
    return None


def _count(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _view_shape(node: Any, ins: list) -> tuple | None:
    """Output shape of Unsqueeze/Squeeze/Reshape/Flatten on a small value (rank ≤ 1)."""
    src = ins[0]
    n = len(src.elems)
    op = node.op_type
    if op == "Reshape":
        target = _ints(ins[1]) if len(ins) > 1 else None
        if target is None or len(target) > 1:
            return None
        if not target:
            return () if n == 1 else None
        return (n,) if target[0] in (-1, n) or (target[0] == 0 and len(src.shape) == 1) else None
    if op == "Flatten":
        return (1, n) if int(_attr(node, "axis", 1)) == 1 or n == 1 else None
    axes = _attr(node, "axes", None)
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = _ints(ins[1])
    if op == "Unsqueeze":
        if axes is None or len(list(axes)) != 1 or len(src.shape) != 0:
            return None
        return (1,)
    # Squeeze
    if len(src.shape) == 1 and n == 1:
        return ()
    return None


def _slice(node: Any, ins: list) -> list[Fact] | None:
    src = ins[0]
    n = len(src.elems)
    if len(ins) < 3:
        if node.attributes.get("starts") is None:
            return None
        starts, ends = list(_attr(node, "starts")), list(_attr(node, "ends"))
        axes = list(_attr(node, "axes", [0]))
        steps = [1]
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else [0]
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1 or axes not in ([0], [-1]) or steps[0] == 0:
        return None
    picked = list(src.elems)[slice(*_clamp(starts[0], ends[0], steps[0], n))]
    return [_fact((len(picked),), picked, src.dtype)]


def _clamp(start: int, end: int, step: int, n: int) -> tuple[int, int | None, int]:
    """ONNX Slice bounds as a Python slice (clamped the way the operator clamps them)."""
    if start < 0:
        start += n
    if end < 0:
        end += n
    if step > 0:
        start, end = max(0, min(n, start)), max(0, min(n, end))
        return start, end, step
    start, end = max(-1, min(n - 1, start)), max(-1, min(n - 1, end))
    return start, (end if end >= 0 else None), step


def _broadcast_shape(shapes: list) -> tuple | None:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        ds = {s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0} - {1}
        if len(ds) > 1 or any(not isinstance(d, int) for d in ds):
            return None
        out.append(ds.pop() if ds else 1)
    return tuple(out)


def _spread(f: Fact, shape: tuple) -> list:
    """A rank ≤ 1 value's elements broadcast to ``shape`` (rank ≤ 1)."""
    n = _count(shape)
    return list(f.elems) * n if len(f.elems) == 1 else list(f.elems)


_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
           "And", "Or", "Mod"}


def _binary(op: str, ins: list, out_dtype: int | None) -> list[Fact] | None:
    a, b = ins
    shape = _broadcast_shape([a.shape, b.shape])
    if shape is None or (len(a.elems) != 1 and len(b.elems) != 1 and len(a.elems) != len(b.elems)):
        return None
    ae, be = _spread(a, shape), _spread(b, shape)
    npd = _np_dtype(a.dtype)
    out = [_binary_elem(op, x, y, npd) for x, y in zip(ae, be)]
    dtype = 9 if op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or") else a.dtype
    return [_fact(shape, out, dtype if dtype is not None else out_dtype)]


def _binary_elem(op: str, x: Any, y: Any, npd: Any) -> Any:
    import numpy as np

    if _number(x) and _number(y):
        if npd is None:
            return None
        xa, ya = np.array(x, dtype=npd), np.array(y, dtype=npd)
        if op == "Div" and npd.kind in "iu":
            if y == 0 or x < 0 or y < 0:
                return None  # integer division of negatives: truncation vs floor, left to the runtime
            return int(x) // int(y)
        if op == "Mod" and (npd.kind not in "iu" or y == 0 or x < 0 or y < 0):
            return None
        fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Max": np.maximum,
              "Min": np.minimum, "Equal": np.equal, "Less": np.less, "Greater": np.greater,
              "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal, "And": np.logical_and,
              "Or": np.logical_or, "Mod": np.mod}[op]
        with np.errstate(all="ignore"):
            return fn(xa, ya).astype(bool if op in ("Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or") else npd).item()
    # a size (Dim) is a non-negative integer: the identities and comparisons that hold for any size
    if isinstance(x, Dim) and _number(y):
        if (op in ("Add", "Sub") and y == 0) or (op in ("Mul", "Div") and y == 1) or (op == "Max" and y <= 0):
            return x
        if op == "Equal" and y < 0:
            return False
        if op in ("Less", "LessOrEqual") and y < 0:
            return False
        if op in ("Greater", "GreaterOrEqual") and y < 0:
            return True
        return None
    if isinstance(y, Dim) and _number(x):
        if (op == "Add" and x == 0) or (op == "Mul" and x == 1) or (op == "Max" and x <= 0):
            return y
        if op == "Equal" and x < 0:
            return False
        return None
    if isinstance(x, Dim) and isinstance(y, Dim) and x == y:
        if op in ("Equal", "LessOrEqual", "GreaterOrEqual"):
            return True
        if op in ("Less", "Greater"):
            return False
        if op in ("Max", "Min"):
            return x
        if op == "Sub":
            return 0
    return None
