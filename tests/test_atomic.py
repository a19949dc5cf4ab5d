"""Atomic output: SIGKILL at any moment leaves no output or a complete one, never half a file;
SIGINT exits 130 and removes the temporary file.

The console script writes a ~38 MB checkpoint (so writing takes measurable time) and is killed
at chosen moments: as its temporary file ``.<name>.<random>.tmp`` appears, part-way through
writing it, and at fixed delays covering loading, capture, verification and the write. After
SIGKILL the temporary file may remain (nothing can remove it: the process is gone) -- it never
bears the target's name, and the next run is not disturbed by it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_cli

CORPUS = Path(__file__).resolve().parent / "corpus"
EXE = Path(sys.executable).with_name("modelsurgeon")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict:
    """A 38 MB state_dict (``tinynet:wide``), the complete output of a run on it, and another
    complete, different output (the "previous" file a kill must leave intact)."""
    sys.path.insert(0, str(CORPUS))
    from tinynet import wide

    d = tmp_path_factory.mktemp("wide")
    paths = {}
    for name, seed in (("input", 0), ("other", 1)):
        torch.manual_seed(seed)
        m = wide()
        with torch.no_grad():
            m[1].running_var.uniform_(0.5, 1.5)
            m[1].running_mean.normal_()
            m[1].weight.normal_(1.0, 0.2)
        paths[name] = d / f"{name}.pt"
        torch.save(m.state_dict(), paths[name])
    complete = {}
    for name in ("input", "other"):
        out = d / f"{name}-folded.pt"
        p = subprocess.run(_cmd(paths[name], out), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        complete[name] = out.read_bytes()
    return {"input": paths["input"], "expected": complete["input"], "previous": complete["other"]}


def _cmd(src: Path, out: Path) -> list[str]:
    return [str(EXE), "fold-bn", str(src), "--arch", "tinynet:wide", "--code-path", str(CORPUS),
            "-s", "1,1024,4,4", "-o", str(out), "-q"]


def _temps(d: Path, out: Path) -> list[Path]:
    return list(d.glob(f".{out.name}.*.tmp"))


def _run_until(cmd, when, timeout: float = 120) -> tuple[subprocess.Popen, bool]:
    """Start ``cmd``; poll ``when()`` every 0.2 ms; True if it held before the process ended."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < timeout:
        if when():
            return p, True
        time.sleep(0.0002)
    return p, False


KILLS = {
    "temp-file-appears": lambda d, out, size, t0: bool(_temps(d, out)),
    "a-third-written": lambda d, out, size, t0: any(_size(t) > size // 3 for t in _temps(d, out)),
    "nearly-all-written": lambda d, out, size, t0: any(_size(t) > size * 9 // 10 for t in _temps(d, out)),
    "after-0.4s": lambda d, out, size, t0: time.monotonic() - t0 > 0.4,
    "after-1.5s": lambda d, out, size, t0: time.monotonic() - t0 > 1.5,
}


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


CASES = [  # (moment, a previous complete output exists)
    ("temp-file-appears", False), ("temp-file-appears", True), ("a-third-written", True),
    ("nearly-all-written", False), ("nearly-all-written", True), ("after-0.4s", True), ("after-1.5s", False),
]


@pytest.mark.parametrize("moment,previous", CASES, ids=[f"{m}-{'previous' if p else 'none'}" for m, p in CASES])
def test_sigkill_never_leaves_half_a_file(wide, tmp_path, moment, previous):
    out = tmp_path / "folded.pt"
    if previous:
        out.write_bytes(wide["previous"])
    size, t0 = len(wide["expected"]), time.monotonic()
    p, hit = _run_until(_cmd(wide["input"], out), lambda: KILLS[moment](tmp_path, out, size, t0))
    p.kill()
    p.communicate()
    if moment == "temp-file-appears":
        assert hit and p.returncode == -signal.SIGKILL, "the kill did not land while writing"
    if out.exists():
        data = out.read_bytes()
        assert data == wide["expected"] or (previous and data == wide["previous"]), \
            f"{out.name}: {len(data)} bytes, neither the complete new output nor the previous one"
    else:
        assert not previous, "the previous output disappeared"
    # a leftover temporary file never bears the target's name, and does not disturb a rerun
    assert all(t.name != out.name and t.name.endswith(".tmp") for t in _temps(tmp_path, out))
    if moment == "temp-file-appears" and not previous:
        assert _temps(tmp_path, out), "SIGKILL cannot clean up: the temporary file is expected to remain"
        r = subprocess.run(_cmd(wide["input"], out), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == wide["expected"]


def _open_files(pid: int) -> str:
    """Paths the process has open, one per line ("" once it has gone)."""
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    except OSError:
        return ""
    return "\n".join(out)


@pytest.mark.parametrize("moment", ["while-loading", "while-writing"])
def test_sigint_exits_130_and_removes_the_temporary_file(wide, tmp_path, moment):
    out = tmp_path / "folded.pt"
    out.write_bytes(wide["previous"])
    box: dict = {}
    if moment == "while-loading":  # the input is open for reading: the pipeline has started
        cond = lambda: str(wide["input"]) in _open_files(box["p"].pid)  # noqa: E731
    else:
        cond = lambda: bool(_temps(tmp_path, out))  # noqa: E731
    p = box["p"] = subprocess.Popen(_cmd(wide["input"], out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
    while p.poll() is None and not cond():
        time.sleep(0.0002)
    assert p.poll() is None, "the run ended before the moment to interrupt it"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err)
    assert err == "modelsurgeon: error: interrupted\n"
    assert _temps(tmp_path, out) == []
    assert out.read_bytes() == wide["previous"]


def test_keyboard_interrupt_is_exit_130_in_process(monkeypatch, tmp_path):
    """typer turns KeyboardInterrupt into an exit code it returns; the CLI used to ignore it
    and exit 0 -- an interrupted run looked like a success."""
    import modelsurgeon.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    r = run_cli("fold-bn", tmp_path / "x.pt", "-o", tmp_path / "o.pt")
    assert r.code == 130 and r.err == "modelsurgeon: error: interrupted\n"


def test_interrupt_inside_torch_save_is_not_an_internal_error(monkeypatch, tmp_path):
    """A Ctrl-C arriving in the middle of torch.save's writes used to come out as a RuntimeError
    from the zip writer (exit 3); it is an interrupt (130), and the temporary file is gone."""
    from modelsurgeon.write.torch import write_pt

    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):  # Ctrl-C lands once the staged file has been partly written
        calls["n"] += 1
        real({"partial": torch.ones(100)}, f)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "o.pt"
    with pytest.raises(KeyboardInterrupt):
        write_pt({"w": torch.ones(1000), "v": torch.zeros(10)}, out)
    assert calls["n"] == 1
    assert list(tmp_path.iterdir()) == []
