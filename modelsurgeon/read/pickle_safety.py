"""Safe-by-default unpickling.

Every ``.pt`` is first loaded with ``torch.load(weights_only=True)``, which only rebuilds
tensors and plain containers. A file that needs anything else (model classes, argparse
namespaces, ``os.system``...) is refused with the list of the globals it references, unless the
user opted in with ``--trust-pickle``. The scan reads pickle opcodes only: it never imports or
calls anything from the file.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import warnings
import zipfile
from pathlib import Path

from ..errors import BadInput, UnsafeCheckpoint, first_line
from .arch import exit_reason

MAX_NAMES = 6


def unsafe_globals(path: Path) -> list[str]:
    """Globals the pickle(s) in ``path`` reference that ``weights_only`` loading refuses."""
    import torch

    if zipfile.is_zipfile(path):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        except Exception:
            pass
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith(".pkl")]
                found: list[str] = []
                for n in names:
                    found += _scan(zf.read(n))
                return _filter_safe(found)
        except Exception:
            return []
    try:
        data = path.read_bytes()
    except OSError:
        return []
    return _filter_safe(_scan(data))


def _scan(data: bytes) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in the first pickle(s) of ``data``."""
    out: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(8):  # legacy torch files hold several pickles back to back
        strings: list[str] = []
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    out.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    out.append(f"{strings[-2]}.{strings[-1]}")
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name == "STOP":
                    break
        except Exception:
            break
        if stream.tell() >= len(data):
            break
    return out


def _filter_safe(names: list[str]) -> list[str]:
    import torch

    safe = set()
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        safe = set(_get_allowed_globals().keys())
    except Exception:
        pass
    for g in torch.serialization.get_safe_globals():
        g = g[0] if isinstance(g, tuple) else g
        safe.add(f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', '')}")
    seen: dict[str, None] = {}
    for n in names:
        if n not in safe and not n.startswith(("torch._utils.", "collections.OrderedDict")):
            seen[n] = None
    return list(seen)


def refuse(path: Path, names: list[str]) -> UnsafeCheckpoint:
    names = sorted(names, key=lambda n: n.startswith("torch."))  # the model's own classes first
    shown = ", ".join(names[:MAX_NAMES])
    more = f" (+{len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else ""
    return UnsafeCheckpoint(
        f"{path.name} holds pickled code objects ({shown}{more}); loading it would run code "
        f"from the file: pass --trust-pickle if you trust its source"
    )


def torch_load(path: Path, trust_pickle: bool, mmap: bool = False):
    """``torch.load`` on CPU, safe unless trusted; ``mmap`` (a zip checkpoint only) for a copy
    that is only read (the original's float64 run, verify/exact.py)."""
    import torch

    is_zip = zipfile.is_zipfile(path)
    if is_zip and _is_torchscript(path):
        raise BadInput(
            f"{path.name} is a TorchScript archive (torch.jit.save): its ops cannot be rewritten "
            f"and re-saved exactly; pass the eager checkpoint (pickled module, state_dict, ...)"
        )
    # Read into memory, not memory-mapped: surgery rewrites most weights in place, and writing
    # into a private mapping costs a copy-on-write fault per page -- measured 1.6x slower on a
    # 1 GB checkpoint at the same peak RSS (docs/performance.md).
    kwargs = dict(map_location="cpu", mmap=bool(mmap and is_zip))
    try:
        with warnings.catch_warnings():  # torch warns about raw pickles (protocol >= 4): one line only
            warnings.simplefilter("ignore")
            return torch.load(str(path), weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        names = unsafe_globals(path)
        if not names:
            raise unreadable(path, e, _unpickler_reason(e))
        if not trust_pickle:
            raise refuse(path, names) from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError,
            IndexError, TypeError, zipfile.BadZipFile) as e:
        raise unreadable(path, e, first_line(e))
    # the user trusts the file: a full unpickle
    try:
        return torch.load(str(path), weights_only=False, **kwargs)
    except ModuleNotFoundError as e:
        raise BadInput(
            f"{path.name} needs the Python module '{e.name}' to load: pass the model's source "
            f"tree with --code-path DIR"
        )
    except SystemExit as e:  # code the file runs (or imports) ended the program
        raise BadInput(f"{path.name} could not be unpickled: its code exited ({exit_reason(e)})")
    except Exception as e:
        raise BadInput(f"{path.name} could not be unpickled: {type(e).__name__}: {first_line(e)}")


def unreadable(path: Path, e: BaseException, reason: str) -> BadInput:
    """Why ``torch.load`` could not read ``path``, said from what the file is: a text file is not
    a checkpoint; a zip archive that is not a whole one, or a pickle that ends early, is a
    truncated or corrupt checkpoint (torch says "[Errno 22] Invalid argument" or "failed
    finding central directory")."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"PK\x03\x04"):
        end = "its zip archive has no end (the file was cut short)" if not zipfile.is_zipfile(path) else reason
        return BadInput(f"{path.name} is a truncated or corrupt checkpoint: {end}", code="truncated-checkpoint")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        if isinstance(e, EOFError) or "truncated" in str(e) or "ran out of input" in str(e).lower():
            return BadInput(f"{path.name} is a truncated or corrupt checkpoint: its pickle ends early",
                            code="truncated-checkpoint")
        return BadInput(f"{path.name} is not a readable PyTorch checkpoint: {reason}", code="not-a-checkpoint")
    if _looks_like_text(head):
        return BadInput(f"{path.name} is not a checkpoint: it is a text file", code="not-a-checkpoint")
    return BadInput(f"{path.name} is not a readable PyTorch checkpoint: {reason}", code="not-a-checkpoint")


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at the 4 KiB boundary is fine
        if e.start < len(head) - 4:
            return False
    return True


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or "/code/__torch__/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _unpickler_reason(e: BaseException) -> str:
    """What torch's weights-only unpickler objected to, without its advice to load with
    ``weights_only=False`` (here that is ``--trust-pickle``, offered only for code objects)."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
        reason = " ".join(reason.split())
        if reason:
            return reason[:300]
    return first_line(e)

