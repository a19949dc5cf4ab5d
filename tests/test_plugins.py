"""Passes from other packages: examples/plugin installed without network, its command in
--help, run with parity on PyTorch and ONNX, picked by optimize; a broken plugin is one line
and the tool goes on; register_pass in process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import modelsurgeon as ms
from conftest import ROOT, run_console
from modelsurgeon.passes import registry
from modelsurgeon.passes.spec import PassSpec
from onnx_graphs import Builder, out, ort_outputs, random_feeds, save, tensor
from testmodels import randomize_all


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    """examples/plugin installed into a folder of its own, offline (no index, no build isolation:
    the setuptools torch depends on builds it), from a copy (the build leaves files in the tree)."""
    target = tmp_path_factory.mktemp("plugin-site")
    source = tmp_path_factory.mktemp("plugin-source") / "plugin"
    shutil.copytree(ROOT / "examples" / "plugin", source)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                        "--no-build-isolation", "--target", str(target), str(source)],
                       capture_output=True, text=True, timeout=600, cwd=source,
                       env=dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (target / "strip_dropout" / "__init__.py").exists()
    assert list(target.glob("modelsurgeon_strip_dropout-*.dist-info/entry_points.txt"))
    return target


def _cli(plugin_path: Path, *args) -> object:
    env = {"PYTHONPATH": os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return run_console(*args, env=env)


def with_dropout(seed: int) -> nn.Module:
    """conv -> Dropout2d -> BatchNorm (foldable once the dropout is gone) -> ... -> Linear ->
    AlphaDropout; torch classes only, so a pickle loads with torch alone."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Dropout2d(0.3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                      nn.Dropout(0.5), nn.Linear(8 * 8 * 8, 4), nn.AlphaDropout(0.1))
    return randomize_all(m, seed).eval()


def _checkpoint(tmp_path: Path) -> Path:
    src = tmp_path / "m.pt"
    torch.save(with_dropout(3), src)
    return src


def test_installed_plugin_adds_a_command_that_runs_with_parity(plugin_path, tmp_path):
    r = _cli(plugin_path, "--help")
    assert r.code == 0 and "strip-dropout" in r.out and r.err == "", r.err
    src = _checkpoint(tmp_path)
    dst = tmp_path / "o.pt"
    r = _cli(plugin_path, "strip-dropout", src, "--trust-pickle", "-s", "2,3,8,8", "-o", dst, "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert rep["parity"]["passed"] is True and rep["parity"]["checked"] is True
    assert [a["target"] for a in rep["applied"]] == ["1", "5", "7"]
    kept = torch.load(dst, weights_only=False)
    assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in kept.modules())
    x = torch.randn(2, 3, 8, 8)
    original = torch.load(src, weights_only=False)
    with torch.no_grad():
        assert torch.equal(kept(x), original(x))  # nothing else changed: bit for bit


def test_optimize_picks_the_installed_plugin(plugin_path, tmp_path):
    src = _checkpoint(tmp_path)
    base = [src, "--trust-pickle", "-s", "2,3,8,8", "--json"]
    r = _cli(plugin_path, "optimize", *base, "--passes", "strip-dropout,fold-bn", "-o", tmp_path / "a.pt")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    assert [p["name"] for p in rep["passes"]] == ["strip-dropout", "fold-bn"]  # its declared order: before fold-bn
    assert rep["after"]["bn"] == 0 and rep["parity"]["passed"] is True
    r = _cli(plugin_path, "optimize", *base, "-o", tmp_path / "b.pt")  # an exact pass: run by default too
    assert r.code == 0, r.err
    names = [p["name"] for p in json.loads(r.out)["passes"]]
    assert "strip-dropout" in names and names.index("strip-dropout") < names.index("fold-bn")


def _onnx_with_dropout(path: Path) -> Path:
    b = Builder(7)
    c = b.conv("x", 3, 4, name="conv")
    d = b.node("Dropout", [c], name="drop", n_out=1)
    y = b.node("Relu", [d], name="relu")
    m = b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 4, 8, 8])], 13)
    return save(m, path)


def test_the_plugin_s_onnx_pass(plugin_path, tmp_path):
    src = _onnx_with_dropout(tmp_path / "m.onnx")
    dst = tmp_path / "o.onnx"
    r = _cli(plugin_path, "strip-dropout", src, "-o", dst, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["parity"]["passed"] is True
    import onnx

    assert [n.op_type for n in onnx.load(dst).graph.node] == ["Conv", "Relu"]
    feeds = random_feeds(src)
    assert all((a == b).all() for a, b in zip(ort_outputs(src, feeds), ort_outputs(dst, feeds)))


def test_a_broken_plugin_is_one_line_and_the_tool_goes_on(tmp_path):
    site = tmp_path / "site"
    info = site / "broken_pass-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-pass\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[modelsurgeon.passes]\nbroken = no_such_module_here:SPEC\n")
    env = {"PYTHONPATH": str(site), "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    r = run_console("--help", env=env)
    assert r.code == 0 and "fold-bn" in r.out and "optimize" in r.out
    assert r.err.count("\n") == 1 and "broken" in r.err and "Traceback" not in r.err
    r = run_console("--version", env=env)  # no command asked for: no plugin read
    assert r.code == 0 and r.err == ""


# -- in process -------------------------------------------------------------------------------------

@pytest.fixture
def registered():
    """Register PassSpecs for one test; the registry is put back afterwards."""
    before = dict(registry.REGISTRY)
    yield registry.register_pass
    registry.REGISTRY.clear()
    registry.REGISTRY.update(before)


def test_register_pass_joins_optimize_in_its_declared_place(registered):
    registered(PassSpec("drop-things", "remove things", torch="strip_dropout.torch:StripDropout",
                        before=("fold-bn",), after=("fold-fusion",)))
    exact = registry.exact_passes()
    assert exact.index("fold-fusion") < exact.index("drop-things") < exact.index("fold-bn")
    with pytest.raises(ValueError, match="cycle"):
        registered(PassSpec("late", "x", torch="a.b:C", after=("fold-bn",), before=("drop-things",)))
    with pytest.raises(ValueError, match="already registered"):
        registered(PassSpec("fold-bn", "x", torch="a.b:C"))
    assert "late" not in registry.REGISTRY


def test_register_pass_from_python_runs_through_the_api(registered, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "plugin"))
    import strip_dropout

    if "strip-dropout" not in registry.REGISTRY:  # not installed in this environment
        registered(strip_dropout.SPEC)
    m = with_dropout(5)
    model, report = ms.optimize(m, (2, 3, 8, 8), passes=["strip-dropout", "fold-bn"])
    assert model is m and [p.name for p in report.passes] == ["strip-dropout", "fold-bn"]
    assert isinstance(m[1], nn.Identity) and report.parity.passed and report.after.bn == 0


class DropPath(nn.Module):
    """timm's drop path: an identity in eval mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1) > self.p
        return x * keep / (1 - self.p)


class ScaledDropPath(DropPath):
    def forward(self, x):  # not an identity in eval: named like one, measured otherwise
        return x * 2


def test_drop_path_modules_are_recognised_by_what_they_do(registered, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "plugin"))
    import strip_dropout

    if "strip-dropout" not in registry.REGISTRY:  # not installed in this environment
        registered(strip_dropout.SPEC)
    m = nn.Sequential(nn.Conv2d(3, 4, 1), DropPath(0.2), ScaledDropPath(0.1)).eval()
    _, report = ms.optimize(m, (1, 3, 4, 4), passes=["strip-dropout"])
    assert [a.target for a in report.applied] == ["1"]
    assert [(s.target, s.code) for s in report.skipped] == [("2", "not-identity")]
    assert isinstance(m[1], nn.Identity) and isinstance(m[2], ScaledDropPath)


def test_examples_plugin_files_are_small_and_declare_one_entry_point():
    text = (ROOT / "examples" / "plugin" / "pyproject.toml").read_text()
    assert textwrap.dedent('[project.entry-points."modelsurgeon.passes"]\nstrip-dropout = "strip_dropout:SPEC"') in text
