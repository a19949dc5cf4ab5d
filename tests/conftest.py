"""Shared fixtures: reference architectures on the path, example checkpoints, CLI runners."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
for p in (str(EXAMPLES), str(EXAMPLES / "yolo"), str(Path(__file__).parent)):
    if p not in sys.path:
        sys.path.insert(0, p)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


def run_cli(*args: str | Path) -> Result:
    """Run the CLI in-process (fast); returns exit code and captured streams."""
    from modelsurgeon.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main([str(a) for a in args])
    return Result(code, out.getvalue(), err.getvalue())


def run_console(*args: str | Path, env: dict | None = None, timeout: float = 300) -> Result:
    """Run the installed ``modelsurgeon`` console script in a subprocess."""
    exe = Path(sys.executable).with_name("modelsurgeon")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "modelsurgeon"]
    e = dict(os.environ, **(env or {}))
    p = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=e)
    return Result(p.returncode, p.stdout, p.stderr)


def run_without_modelsurgeon(model_path: Path, x_path: Path, out_path: Path, show: str) -> list[str]:
    """Load a pickled model with torch alone (``modelsurgeon`` cannot be imported), deep-copy
    it, save ``[model(x), copy(x)]`` to ``out_path``; returns the words ``show`` (an expression
    of ``m`` and ``c``, the model and its copy) printed."""
    code = (
        "import copy, sys; sys.modules['modelsurgeon'] = None\n"
        "import torch\n"
        f"m = torch.load({str(model_path)!r}, weights_only=False)\n"
        f"x = torch.load({str(x_path)!r})\n"
        "c = copy.deepcopy(m)\n"
        f"print(*({show}))\n"
        f"torch.save([m(x), c(x)], {str(out_path)!r})\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                       env={"PYTHONPATH": str(Path(__file__).parent), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    return p.stdout.split()


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> Path:
    """The example checkpoints (examples/build.py), built once per test session."""
    from build import build

    out = tmp_path_factory.mktemp("ckpts")
    build(out)
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` (long property runs) only run when asked for: ``pytest -m slow``."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="long run: select it with pytest -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def files_in(d: Path) -> set[str]:
    return {p.name for p in Path(d).iterdir()}


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global RNG state: the random statistics and weights a
    test draws without its own generator are the same whatever else runs (``-k``, order)."""
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _skips_carry_registered_codes(monkeypatch):
    """Every ``Skipped`` a pass emits in any test (every model of the suite) carries a stable
    code listed in ``modelsurgeon/report/codes.py``: a test fails at its end otherwise."""
    from modelsurgeon.passes.base import Skipped
    from modelsurgeon.report.codes import CODES

    made: list = []
    real = Skipped.__post_init__

    def record(self):
        real(self)
        made.append(self)

    monkeypatch.setattr(Skipped, "__post_init__", record)
    yield
    bad = [(s.target, s.reason, s.code) for s in made if s.code not in CODES]
    assert not bad, f"skips without a registered code: {bad[:5]}"
