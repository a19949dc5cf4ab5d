"""Bad input: one clear line on stderr, exit 2, no traceback, nothing written, input unchanged.

The files are the committed corpus in ``tests/corpus/`` (made by ``make_corpus.py``); the
other cases (options, paths, permissions, a full disk) are built here. Most run the CLI
in-process; a few run the installed console script, as a pipeline would.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import Result, files_in, run_cli, run_console

CORPUS = Path(__file__).resolve().parent / "corpus"
TINY = ["--arch", "tinynet:tiny", "--code-path", str(CORPUS)]
SHAPE = ["-s", "1,3,8,8"]

# corpus file -> a fragment the error line must contain (None: any clear line will do)
FILE_CASES = {
    "empty.pt": "file is empty",
    "random-bytes.pt": "not a readable PyTorch checkpoint",
    "text.pt": "not a checkpoint",
    "page.pt": "not a checkpoint",
    "truncated-zip.pt": "truncated or corrupt checkpoint",
    "truncated-zip-tail.pt": "truncated or corrupt checkpoint",
    "garbage.onnx": "garbage.onnx",
    "page.onnx": "page.onnx",
    "header-too-long.safetensors": "not a readable safetensors file",
    "header-not-json.safetensors": "not a readable safetensors file",
    "header-bad-offsets.safetensors": "not a readable safetensors file",
    "header-truncated.safetensors": "not a readable safetensors file",
    "nan-weights.pt": "0.weight holds NaN or Inf",
    "inf-weights.pt": "3.bias holds NaN or Inf",
    "negative-variance.pt": "1.running_var holds 1 negative value",
    "zero-variance.pt": "1.running_var holds 1 zero value",
    "missing-keys.pt": "2 missing (3.weight, 3.bias)",
    "unexpected-keys.pt": "2 unexpected (4.weight, head.bias)",
    "misshaped-keys.pt": "mis-shaped (3.weight (3, 4, 1, 1) vs (2, 4, 1, 1)",
}


def assert_refused(r: Result, fragment: str | None, dirs: dict[Path, set], inputs: dict[Path, bytes]) -> None:
    """Exit 2, exactly one ``modelsurgeon: error:`` line, no traceback, no file appeared or
    disappeared in ``dirs``, the input files hold the same bytes."""
    assert r.code == 2, (r.code, r.err)
    assert "Traceback" not in r.err and "Traceback" not in r.out, r.err
    lines = r.err.splitlines()
    assert len(lines) == 1 and r.err.endswith("\n"), r.err
    assert lines[0].startswith("modelsurgeon: error: ") and len(lines[0]) > len("modelsurgeon: error: ") + 10
    if fragment is not None:
        assert fragment in lines[0], lines[0]
    for d, before in dirs.items():
        assert files_in(d) == before, f"{d}: {sorted(files_in(d) ^ before)}"
    for p, data in inputs.items():
        assert p.read_bytes() == data, f"{p} changed"


def snapshot(*dirs: Path) -> dict[Path, set]:
    return {d: files_in(d) for d in dirs}


@pytest.fixture
def good(tmp_path) -> Path:
    """A valid tiny state_dict for the option cases (random BN statistics)."""
    sys.path.insert(0, str(CORPUS))
    from make_corpus import _model

    p = tmp_path / "in" / "tiny.pt"
    p.parent.mkdir()
    torch.save(_model().state_dict(), p)
    return p


@pytest.fixture
def outdir(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_the_corpus_is_the_list_of_cases():
    on_disk = {p.name for p in CORPUS.iterdir() if p.suffix != ".py" and p.name != "__pycache__"}
    assert on_disk == set(FILE_CASES)


@pytest.mark.parametrize("name", sorted(FILE_CASES))
@pytest.mark.parametrize("out", ["o.pt", "o.safetensors", "o.onnx"])
def test_corpus_file(name, out, outdir):
    src = CORPUS / name
    before = snapshot(CORPUS, outdir)
    data = src.read_bytes()
    r = run_cli("fold-bn", src, *TINY, *SHAPE, "-o", outdir / out)
    assert_refused(r, FILE_CASES[name], before, {src: data})


@pytest.mark.parametrize("name", ["empty.pt", "page.pt", "garbage.onnx", "header-not-json.safetensors", "zero-variance.pt"])
def test_corpus_file_via_console_script(name, outdir):
    src = CORPUS / name
    before = snapshot(CORPUS, outdir)
    data = src.read_bytes()
    r = run_console("fold-bn", src, *TINY, *SHAPE, "-o", outdir / "o.pt")
    assert_refused(r, FILE_CASES[name], before, {src: data})


def test_directory_and_missing_file(tmp_path, outdir):
    before = snapshot(tmp_path, outdir)
    assert_refused(run_cli("fold-bn", tmp_path, *SHAPE, "-o", outdir / "o.pt"), "is a directory", before, {})
    assert_refused(run_cli("fold-bn", tmp_path / "nope.pt", *SHAPE, "-o", outdir / "o.pt"), "no such file", before, {})
    assert_refused(run_console("fold-bn", tmp_path / "nope.pt", "-o", outdir / "o.pt"), "no such file", before, {})


def test_unreadable_file(good, outdir):
    good.chmod(0)
    try:
        if os.access(good, os.R_OK):
            pytest.skip("running as root: permissions do not stop reading (see the setpriv variant)")
        before = snapshot(good.parent, outdir)
        r = run_cli("fold-bn", good, *TINY, *SHAPE, "-o", outdir / "o.pt")
        assert_refused(r, good.name, before, {})
        assert "not readable" in r.err or "permission denied" in r.err
    finally:
        good.chmod(0o644)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_unreadable_file_as_an_unprivileged_user(good):
    """As root nothing is unreadable: run the console script as ``nobody`` instead."""
    base = Path(tempfile.mkdtemp(prefix="ms-unreadable-"))
    try:
        base.chmod(0o777)
        src = base / "secret.pt"
        shutil.copy(good, src)
        src.chmod(0)
        exe = Path(sys.executable).with_name("modelsurgeon")
        p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(exe), "fold-bn",
                            str(src), *TINY, *SHAPE, "-o", str(base / "o.pt")],
                           capture_output=True, text=True, timeout=300, cwd=base)
        src.chmod(0o644)
        assert_refused(Result(p.returncode, p.stdout, p.stderr), "secret.pt", {base: {"secret.pt"}},
                       {src: good.read_bytes()})
        assert "not readable" in p.stderr or "permission denied" in p.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("shape,fragment", [
    ("1,3,x", "expected comma-separated integers"),
    ("", "expected comma-separated integers"),
    ("1,-3,8,8", "expected comma-separated integers"),
    ("0,3,8,8", "every dimension must be a positive integer"),
    ("1x3x", "expected comma-separated integers"),
    ("1,3,8,8,1,1,1,1,1", "more than 8 dimensions"),
    ("1,5,8,8", "cannot run on inputs 1,5,8,8"),  # wrong channel count
    ("1,3,8", "cannot run on inputs 1,3,8"),  # wrong rank
    ("99999999999999999999,3,8,8", "a dimension above 2**31 - 1"),
    ("1,3,1000000,1000000", "more than half of the memory available"),  # refused before allocating
])
def test_malformed_or_wrong_input_shape(good, outdir, shape, fragment):
    before = snapshot(good.parent, outdir)
    r = run_cli("fold-bn", good, *TINY, "-s", shape, "-o", outdir / "o.pt")
    assert_refused(r, fragment, before, {good: good.read_bytes()})


@pytest.mark.parametrize("option,fragment", [
    (["--atol", "-1"], "a tolerance must be a finite number >= 0"),
    (["--rtol", "nan"], "a tolerance must be a finite number >= 0"),
    (["--seed", str(2**70)], "choose a seed from 0 to 2**32 - 1"),
    (["--seed", "-1"], "choose a seed from 0 to 2**32 - 1"),
    (["--opset", "99", "-o", "{out}/o.onnx"], "can use opsets 7 to"),
    (["--opset", "5", "-o", "{out}/o.onnx"], "can use opsets 7 to"),
])
def test_impossible_option_values(good, outdir, option, fragment):
    """Refused before any work (not reported as a parity failure or an internal error), and
    --json's stdout holds the error object and nothing else (the exporter used to print whole
    graphs there)."""
    import json

    before = snapshot(good.parent, outdir)
    option = [o.replace("{out}", str(outdir)) for o in option]
    out = [] if "-o" in option else ["-o", outdir / "o.pt"]
    r = run_cli("fold-bn", good, *TINY, *SHAPE, *option, *out, "--json")
    assert_refused(r, fragment, before, {good: good.read_bytes()})
    assert set(json.loads(r.out)) == {"error"} and json.loads(r.out)["error"]["exit_code"] == 2


def test_no_command_names_what_is_missing():
    r = run_cli()
    assert r.code == 2 and "missing command" in r.err


def test_missing_output_directory(good, outdir):
    before = snapshot(good.parent, outdir)
    r = run_cli("fold-bn", good, *TINY, *SHAPE, "-o", outdir / "not" / "there" / "o.pt")
    assert_refused(r, "output directory does not exist", before, {good: good.read_bytes()})
    r = run_console("fold-bn", good, *TINY, *SHAPE, "-o", outdir / "not" / "o.pt")
    assert_refused(r, "output directory does not exist", before, {good: good.read_bytes()})


def test_output_equal_to_input(good, outdir):
    data = good.read_bytes()
    link = outdir / "link.pt"
    link.symlink_to(good)
    hard = outdir / "hard.pt"
    os.link(good, hard)
    before = snapshot(good.parent, outdir)
    spellings = [good, good.parent / ".." / "in" / good.name, link, hard]
    for out in spellings:
        r = run_cli("fold-bn", good, *TINY, *SHAPE, "-o", out)
        assert_refused(r, "is the input file", before, {good: data})


# -- a full disk ---------------------------------------------------------------------------------


def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(monkeypatch):
    """Every writer modelsurgeon uses fails with ENOSPC after writing part of the file: torch's
    C++ zip writer (``.pt``: reports a position mismatch, the free space tells), ``os.write``,
    safetensors' writer (raises its own error type, with the OS error in the message), the ONNX
    exporter's file write."""
    import safetensors.torch

    real_write = os.write

    def write(fd, data):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if name.endswith(".tmp"):
            if os.fstat(fd).st_size > 1000:
                raise _enospc()
            return real_write(fd, bytes(data)[:700])
        return real_write(fd, data)

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def export(model, args, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"\0" * 1000)
            raise _enospc()

    real_save = torch.save

    def torch_save(obj, f, *a, **k):  # torch's C++ zip writer hides ENOSPC as a position error
        if isinstance(f, (str, Path)) and ".tmp" in str(f):
            Path(f).write_bytes(b"\0" * 700)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *a, **k)

    import modelsurgeon.write.torch as save_torch

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(save_torch, "disk_full", lambda d: True)  # what statvfs says then
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(torch.onnx, "export", export)


@pytest.mark.parametrize("out", ["o.pt", "o.safetensors", "o.onnx"])
def test_full_disk(good, outdir, full_disk, out):
    before = snapshot(good.parent, outdir)
    r = run_cli("fold-bn", good, *TINY, *SHAPE, "-o", outdir / out)
    assert_refused(r, "No space left on device", before, {good: good.read_bytes()})


def test_full_disk_in_place_keeps_the_input(good, full_disk):
    data = good.read_bytes()
    before = snapshot(good.parent)
    r = run_cli("fold-bn", good, *TINY, *SHAPE, "--in-place")
    assert_refused(r, "No space left on device", before, {good: data})


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    p = subprocess.run(["unshare", "-m", "sh", "-c",
                        'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"; rc=$?; umount "$d"; rmdir "$d"; exit $rc'],
                       capture_output=True)
    return p.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a private mount namespace (unshare -m) to mount a small tmpfs")
@pytest.mark.parametrize("out", ["o.pt", "o.safetensors", "o.onnx"])
def test_really_full_disk(good, tmp_path, out):
    """A real ENOSPC: the console script writes to a 64 KiB tmpfs (in a private mount
    namespace, gone when the shell exits) an output of ~300 KB."""
    sys.path.insert(0, str(CORPUS))
    from tinynet import tiny

    big = tmp_path / "big.pt"

    m = tiny(width=2048)
    with torch.no_grad():
        m[1].running_var.uniform_(0.5, 1.5)
        m[1].running_mean.normal_()
    torch.save(m.state_dict(), big)
    data = big.read_bytes()
    mnt = tmp_path / "disk"
    mnt.mkdir()
    exe = Path(sys.executable).with_name("modelsurgeon")
    script = (f"mount -t tmpfs -o size=64k tmpfs {mnt} && "
              f"{exe} fold-bn {big} {' '.join(TINY)} --arch-kwargs '{{\"width\": 2048}}' {' '.join(SHAPE)} "
              f"-o {mnt / out}; rc=$?; ls -A {mnt} >&2; exit $rc")
    p = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    err = p.stderr.splitlines()
    assert p.returncode == 2, p.stderr
    assert len(err) == 1, f"one error line and an empty directory listing expected: {err}"
    assert err[0].startswith("modelsurgeon: error: cannot write") and "No space left on device" in err[0], err
    assert big.read_bytes() == data
