"""The ``.weights`` file: a header, then every layer's float32 arrays in layer order.

Header: ``int32 major, minor, revision``, then ``seen`` (images trained on) as a 64-bit
integer when ``major*10 + minor >= 2``, else 32-bit; little-endian throughout. After it, each
layer that has weights reads its arrays (``layers.py`` lists them per layer). darknet itself
reads on past a short file and ignores what is left over; here the file must hold exactly
what the ``.cfg`` asks for, or it is refused (a truncated download, the wrong ``.cfg``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from ...errors import BadInput

VERSION_LIMIT = 1000  # darknet reads files with a larger major/minor as transposed (pre-2016) ones


@dataclass
class Header:
    major: int
    minor: int
    revision: int
    seen: int

    @property
    def seen_bytes(self) -> int:
        return 8 if self.major * 10 + self.minor >= 2 else 4

    @property
    def size(self) -> int:
        return 12 + self.seen_bytes

    def pack(self) -> bytes:
        seen = struct.pack("<Q" if self.seen_bytes == 8 else "<I", self.seen)
        return struct.pack("<iii", self.major, self.minor, self.revision) + seen


def read_header(data: bytes, name: str) -> Header:
    if len(data) < 16:
        raise BadInput(f"{name}: {len(data)} bytes: too short for a darknet weights header", code="not-a-checkpoint")
    major, minor, revision = struct.unpack_from("<iii", data, 0)
    if not (0 <= major <= VERSION_LIMIT and 0 <= minor <= VERSION_LIMIT and revision >= 0):
        raise BadInput(f"{name}: not a darknet weights file (header version {major}.{minor}.{revision})",
                       code="not-a-checkpoint")
    h = Header(major, minor, revision, 0)
    h.seen = struct.unpack_from("<Q" if h.seen_bytes == 8 else "<I", data, 12)[0]
    return h


def read_weights(path: Path, layers: list, cfg_name: str) -> tuple[Header, dict]:
    """``(header, {layer index: {array name: float32 array}})``; the file must hold exactly
    the floats the layers read."""
    import numpy as np

    data = path.read_bytes()
    header = read_header(data, path.name)
    body = len(data) - header.size
    need = sum(L.count for L in layers)
    if body != 4 * need:
        if body < 4 * need:
            short = _first_short(layers, body // 4)
            raise BadInput(f"{path.name}: too short for {cfg_name}: {body} bytes of weights, {4 * need} needed "
                           f"(ends inside {short}); a truncated file or another model's .cfg", code="weights-mismatch")
        raise BadInput(f"{path.name}: too long for {cfg_name}: {body - 4 * need} bytes left after the last layer's "
                       "weights; another model's .cfg?", code="weights-mismatch")
    flat = np.frombuffer(data, dtype="<f4", offset=header.size).astype(np.float32)
    out: dict[int, dict] = {}
    pos = 0
    for L in layers:
        if not L.weights:
            continue
        arrays = {}
        for wname, shape in L.weights:
            n = int(np.prod(shape))
            arrays[wname] = flat[pos:pos + n].reshape(shape)
            pos += n
        out[L.index] = arrays
    if not np.isfinite(flat).all():
        bad = next(L for L in layers if L.index in out and not all(np.isfinite(a).all() for a in out[L.index].values()))
        raise BadInput(f"{path.name}: {bad.where()} holds NaN or infinite weights")
    return header, out


def _first_short(layers: list, have: int) -> str:
    pos = 0
    for L in layers:
        pos += L.count
        if pos > have:
            return L.where()
    return "the last layer"


def pack_weights(header: Header, layers: list, arrays: dict) -> bytes:
    """The file bytes: ``header`` then each layer's arrays in the order ``layers`` list them."""
    import numpy as np

    parts = [header.pack()]
    for L in layers:
        for wname, shape in L.weights:
            a = np.asarray(arrays[L.index][wname], dtype="<f4")
            if a.shape != tuple(shape):
                raise ValueError(f"{L.where()}: {wname} has shape {a.shape}, the cfg needs {shape}")
            parts.append(np.ascontiguousarray(a).tobytes())
    return b"".join(parts)
