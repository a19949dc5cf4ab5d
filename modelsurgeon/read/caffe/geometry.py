"""Caffe's parameter rules and output sizes, as its layer sources compute them.

* Convolution / Deconvolution: ``kernel_size`` / ``stride`` / ``pad`` / ``dilation`` given
  once for both spatial axes or once per axis, or as ``*_h`` / ``*_w``; output
  ``(H + 2p - (d(k-1)+1)) / s + 1`` (deconvolution: ``s(H-1) + d(k-1)+1 - 2p``).
* Pooling: ``ceil((H + 2p - k) / s) + 1`` (``round_mode: FLOOR`` floors), then, with padding,
  one less when the last window would start in the padding (``(out-1)*s >= H + p``);
  average pooling divides by the window clipped to ``[-p, H+p)``.
* Reshape: ``0`` copies the input's axis, ``-1`` is inferred, ``axis`` / ``num_axes`` pick
  the replaced range; Flatten: axes ``axis..end_axis`` into one.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ...errors import BadInput


def canonical(axis: int, rank: int, where: str) -> int:
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank:
        raise BadInput(f"{where}: axis {axis} out of range for a {rank}-d input")
    return a


def _pair(rep: Sequence[int], h: Any, w: Any, has_h: bool, has_w: bool, default: int | None, what: str,
          where: str) -> tuple[int, int]:
    if has_h or has_w:
        if rep:
            raise BadInput(f"{where}: {what} given both as {what}_h/{what}_w and as {what}")
        return int(h), int(w)
    if not rep:
        if default is None:
            raise BadInput(f"{where}: no {what} given")
        return default, default
    if len(rep) == 1:
        return int(rep[0]), int(rep[0])
    if len(rep) == 2:
        return int(rep[0]), int(rep[1])
    raise BadInput(f"{where}: {len(rep)} values of {what}: only 2-d convolutions are supported")


def conv_geometry(cp: Any, where: str) -> dict:
    """kernel, stride, pad, dilation (each (h, w)) of a ConvolutionParameter."""
    k = _pair(cp.kernel_size, cp.kernel_h, cp.kernel_w, cp.HasField("kernel_h"), cp.HasField("kernel_w"), None,
              "kernel", where)
    s = _pair(cp.stride, cp.stride_h, cp.stride_w, cp.HasField("stride_h"), cp.HasField("stride_w"), 1, "stride", where)
    p = _pair(cp.pad, cp.pad_h, cp.pad_w, cp.HasField("pad_h"), cp.HasField("pad_w"), 0, "pad", where)
    d = _pair(cp.dilation, 0, 0, False, False, 1, "dilation", where)
    if min(k) < 1 or min(s) < 1 or min(d) < 1:
        raise BadInput(f"{where}: kernel {k}, stride {s}, dilation {d}: must be positive")
    if cp.axis != 1:
        raise BadInput(f"{where}: convolution over axis {cp.axis}: only axis 1 (N, C, H, W) is supported")
    return {"kernel": k, "stride": s, "pad": p, "dilation": d}


def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def deconv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return s * (size - 1) + d * (k - 1) + 1 - 2 * p


def pool_geometry(pp: Any, hw: tuple[int, int], where: str) -> dict:
    """kernel, stride, pad, output size (each (h, w)) and global of a PoolingParameter."""
    if pp.global_pooling:
        if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
            raise BadInput(f"{where}: global_pooling with a kernel size")
        k = hw
    elif pp.HasField("kernel_size") and not (pp.HasField("kernel_h") or pp.HasField("kernel_w")):
        k = (pp.kernel_size, pp.kernel_size)
    elif pp.HasField("kernel_h") and pp.HasField("kernel_w") and not pp.HasField("kernel_size"):
        k = (pp.kernel_h, pp.kernel_w)
    else:
        raise BadInput(f"{where}: give kernel_size, or kernel_h and kernel_w")
    p = (pp.pad_h, pp.pad_w) if pp.HasField("pad_h") else (pp.pad, pp.pad)
    s = (pp.stride_h, pp.stride_w) if pp.HasField("stride_h") else (pp.stride, pp.stride)
    if pp.global_pooling and (p != (0, 0) or s != (1, 1)):
        raise BadInput(f"{where}: global pooling needs pad 0 and stride 1")
    if min(k) < 1 or min(s) < 1 or p[0] >= k[0] or p[1] >= k[1]:
        raise BadInput(f"{where}: kernel {k}, stride {s}, pad {p}: Caffe needs kernel > pad >= 0, stride > 0")
    out = []
    for n, kk, ss, pad in zip(hw, k, s, p):
        frac = (n + 2 * pad - kk) / ss
        o = (math.floor(frac) if pp.round_mode == 1 else math.ceil(frac)) + 1
        if pad and (o - 1) * ss >= n + pad:
            o -= 1
        if o < 1:
            raise BadInput(f"{where}: output size {o} for input size {n}")
        out.append(o)
    return {"kernel": k, "stride": s, "pad": p, "out": tuple(out), "global": bool(pp.global_pooling)}


def reshape(shape: Sequence[int], rp: Any, where: str) -> list[int]:
    """The output shape of a Reshape layer (Caffe's ReshapeLayer::Reshape)."""
    rank = len(shape)
    axis = rp.axis + rank + 1 if rp.axis < 0 else rp.axis
    if not 0 <= axis <= rank:
        raise BadInput(f"{where}: axis {rp.axis} out of range")
    end = rank if rp.num_axes == -1 else axis + rp.num_axes
    if rp.num_axes < -1 or end > rank:
        raise BadInput(f"{where}: num_axes {rp.num_axes} out of range")
    dims = [int(d) for d in rp.shape.dim]
    new = list(shape[:axis])
    infer = None
    for i, d in enumerate(dims):
        if d == 0:
            if axis + i >= rank:
                raise BadInput(f"{where}: dim {i} is 0 (copy) but the input has no axis {axis + i}")
            new.append(shape[axis + i])
        elif d == -1:
            if infer is not None:
                raise BadInput(f"{where}: more than one -1 in the shape")
            infer = len(new)
            new.append(1)
        elif d < 0:
            raise BadInput(f"{where}: dim {d}")
        else:
            new.append(d)
    new += list(shape[end:])
    total = math.prod(shape)
    known = math.prod(new)
    if infer is not None:
        if known == 0 or total % known:
            raise BadInput(f"{where}: cannot infer -1 for {list(shape)} -> {dims}")
        new[infer] = total // known
    if math.prod(new) != total:
        raise BadInput(f"{where}: {list(shape)} ({total} values) cannot be reshaped to {new}")
    return new


def flatten(shape: Sequence[int], fp: Any, where: str) -> list[int]:
    rank = len(shape)
    a, e = canonical(fp.axis, rank, where), canonical(fp.end_axis, rank, where)
    if e < a:
        raise BadInput(f"{where}: end_axis before axis")
    return list(shape[:a]) + [math.prod(shape[a:e + 1])] + list(shape[e + 1:])


def interp_out(ip: Any, hw: tuple[int, int], where: str) -> tuple[int, int]:
    """Output size of PSPNet's Interp layer (one bottom; no padding)."""
    if ip.pad_beg or ip.pad_end:
        raise BadInput(f"{where}: Interp with pad_beg/pad_end is not supported")
    shrink, zoom = ip.HasField("shrink_factor"), ip.HasField("zoom_factor")
    out = []
    for n, fixed in zip(hw, (ip.height, ip.width)):
        if shrink and not zoom:
            o = (n - 1) // ip.shrink_factor + 1
        elif zoom and not shrink:
            o = n + (n - 1) * (ip.zoom_factor - 1)
        elif ip.HasField("height") and ip.HasField("width"):
            o = fixed
        elif shrink and zoom:
            o = (n - 1) // ip.shrink_factor + 1
            o = o + (o - 1) * (ip.zoom_factor - 1)
        else:
            raise BadInput(f"{where}: give zoom_factor, shrink_factor or height and width")
        if o < 1:
            raise BadInput(f"{where}: output size {o}")
        out.append(o)
    return out[0], out[1]
