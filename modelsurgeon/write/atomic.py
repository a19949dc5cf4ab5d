"""Atomic output: write a temporary file next to the target, fsync, then rename over it.

A crash, SIGKILL or full disk at any moment leaves either no output or the complete previous
one, never half a file; on any error (and on Ctrl-C) the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..errors import BadInput, SurgeryError


def check_output_path(path: Path, input_path: Path | None = None, in_place: bool = False) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise BadInput(f"output directory does not exist: {parent}")
    if not parent.is_dir():
        raise BadInput(f"output directory is not a directory: {parent}")
    if path.is_dir():
        raise BadInput(f"output {path} is a directory", code="output-is-directory")
    if input_path is not None and not in_place:
        try:
            same = path.exists() and os.path.samefile(path, input_path)
        except OSError:
            same = False
        if same or path.resolve() == input_path.resolve():
            raise BadInput(f"output {path} is the input file: choose another -o, or pass --in-place")
    if not os.access(parent, os.W_OK):
        raise BadInput(f"output directory is not writable: {parent}")


def _create_temporary(path: Path, make) -> tuple[Any, list]:
    """``make()`` (which creates a temporary file or directory for ``path``), with Ctrl-C held
    back while it runs: an interrupt landing after the creation but before the caller's
    cleanup is armed would leave the temporary behind. Returns ``(result, held)``; the caller
    raises ``KeyboardInterrupt`` inside its cleanup block when ``held`` is not empty."""
    import signal
    import threading

    held: list = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        try:
            previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
        except (ValueError, OSError):
            previous = None
    try:
        return make(), held
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror or e}")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success it replaces ``path``."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")

    def make() -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        return Path(tmp)

    tmp_path, held = _create_temporary(path, make)
    try:
        if held:
            raise KeyboardInterrupt
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
        _fsync_dir(parent)
    except SurgeryError:
        _unlink(tmp_path)
        raise
    except OSError as e:
        _unlink(tmp_path)
        raise BadInput(f"cannot write {path}: {os.strerror(e.errno) if e.errno else e.strerror or e}") from e
    except Exception as e:
        _unlink(tmp_path)
        code = io_errno(e)
        if code is not None:  # a writer (torch, safetensors) reported the OS error its own way
            raise BadInput(f"cannot write {path}: {os.strerror(code)}") from e
        raise
    except BaseException:
        _unlink(tmp_path)
        raise


def io_errno(exc: BaseException) -> int | None:
    """The OS error number behind a writer's exception: an ``OSError`` in its chain, or the
    ``(os error N)`` that Rust writers (safetensors) put in their messages."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m:
            return int(m.group(1))
        e = e.__cause__ or e.__context__
    return None


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_files(path: Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; whatever is written there under
    ``path``'s name, plus companion files (external data), replaces the targets on success:
    companions first, ``path`` itself last, so a complete ``path`` always has its data.
    The directory is removed in any case."""
    import shutil

    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    tmp_dir, held = _create_temporary(
        path, lambda: Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)))
    try:
        if held:
            raise KeyboardInterrupt
        yield tmp_dir
        main = tmp_dir / path.name
        umask = os.umask(0)
        os.umask(umask)
        files = [p for p in tmp_dir.iterdir() if p.is_file() and p != main] + [main]
        for f in files:
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(f, 0o666 & ~umask)
        for f in files:
            os.replace(f, parent / f.name)
        _fsync_dir(parent)
    except SurgeryError:
        raise
    except OSError as e:
        raise BadInput(f"cannot write {path}: {os.strerror(e.errno) if e.errno else e.strerror or e}") from e
    except Exception as e:
        code = io_errno(e)
        if code is not None:  # a writer (onnx, safetensors) reported the OS error its own way
            raise BadInput(f"cannot write {path}: {os.strerror(code)}") from e
        raise
    finally:
        # with Ctrl-C held back: an interrupt landing in the middle of the removal (the run was
        # just finishing) would leave the temporary directory half removed
        _, held_now = _create_temporary(path, lambda: shutil.rmtree(tmp_dir, ignore_errors=True))
        if held_now:
            raise KeyboardInterrupt


def disk_full(directory: Path, margin: int = 1 << 20) -> bool:
    """Is (almost) no space left where ``directory`` lives? For writers whose errors lose the
    OS error (torch's C++ zip writer reports a full disk as a position mismatch)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin
