"""What people and scripts read: --json on errors (stable codes), the report of a state_dict
output, one-line messages that name the real problem, the figures of the report, --help."""

from __future__ import annotations

import json
import os
import shlex

import pytest
import torch
import torch.nn as nn

from conftest import EXAMPLES, files_in, run_cli, run_console
from testmodels import FrozenBatchNorm2d, randomize_all

ARCH = ["--arch", "zoo.mobilenetv2:mobilenet_v2", "--code-path", str(EXAMPLES)]
COMMANDS = ["fold-bn", "focus-to-conv", "truncate", "fold-fusion", "optimize"]


# -- --json: one object on stdout, every run ----------------------------------------------------

def _error_of(r) -> dict:
    doc = json.loads(r.out)  # exactly one JSON document, nothing else on stdout
    err = doc["error"]
    assert set(err) == {"code", "message", "exit_code"} and err["exit_code"] == r.code
    assert r.err.count("\n") == 1 and "Traceback" not in r.err
    return err


def test_json_success_has_a_null_error(ckpts, tmp_path):
    r = run_cli("fold-bn", ckpts / "resnet.pt", "--trust-pickle", "--code-path", EXAMPLES, "-s", "1,3,32,32",
                "-o", tmp_path / "o.pt", "--json")
    assert r.code == 0 and r.json()["error"] is None


@pytest.mark.parametrize("args,code", [
    (["{tmp}/missing.pt"], "not-found"),
    (["{tmp}/text.pt"], "not-a-checkpoint"),
    (["{tmp}/cut.pt", "--trust-pickle"], "truncated-checkpoint"),
    (["{ckpts}/resnet.pt"], "unsafe-checkpoint"),
    (["{ckpts}/mobilenetv2.pt"], "needs-arch"),
    (["{ckpts}/mobilenetv2.pt", *ARCH, "-s", "1,3,64,64", "-o", "{tmp}/o.bin"], "output-format"),
    (["{ckpts}/mobilenetv2.pt", *ARCH, "-s", "1,3,64,64", "-o", "{tmp}/dir"], "output-is-directory"),
    (["{ckpts}/mobilenetv2.pt", *ARCH, "-s", "1,3,64,64", "--dtype", "float16"], "input-dtype"),
    (["{ckpts}/mobilenetv2.pt", *ARCH, "-s", "1,5,64,64"], "model-cannot-run"),
    (["{ckpts}/mobilenetv2.pt", "--bogus-option"], "usage"),
])
def test_json_error_object_with_a_stable_code(ckpts, tmp_path, args, code):
    (tmp_path / "text.pt").write_text("epoch: 10\nweights: see the other file\n")
    (tmp_path / "cut.pt").write_bytes((ckpts / "resnet.pt").read_bytes()[:50_000])
    (tmp_path / "dir").mkdir()
    before = files_in(tmp_path)
    argv = [a.format(tmp=tmp_path, ckpts=ckpts) for a in args]
    r = run_cli("fold-bn", *argv, "--json")
    assert r.code == 2
    assert _error_of(r)["code"] == code
    assert files_in(tmp_path) == before and files_in(tmp_path / "dir") == set()


def test_json_parity_failure_is_the_report_and_the_error(ckpts, tmp_path, monkeypatch):
    import modelsurgeon.passes.fold_bn.torch as fb

    real = fb.fold_bias
    monkeypatch.setattr(fb, "fold_bias", lambda b, s, t: real(b, s, t) + 1.0)  # a wrong bias
    r = run_cli("fold-bn", ckpts / "mobilenetv2.pt", *ARCH, "-s", "1,3,64,64", "-o", tmp_path / "o.pt", "--json")
    assert r.code == 1
    assert _error_of(r)["code"] == "parity-failed"
    assert r.json()["parity"]["passed"] is False and r.json()["written"] is False
    assert files_in(tmp_path) == set()


def test_a_usage_error_without_json_prints_nothing_on_stdout(ckpts):
    r = run_cli("fold-bn", ckpts / "mobilenetv2.pt", "--bogus-option")
    assert r.code == 2 and r.out == ""


# -- messages that name the problem -----------------------------------------------------------

@pytest.mark.parametrize("cut", [100, 4_000, 50_000])
def test_truncated_checkpoint_at_any_point(ckpts, tmp_path, cut):
    data = (ckpts / "resnet.pt").read_bytes()
    assert cut < len(data)
    src = tmp_path / "cut.pt"
    src.write_bytes(data[:cut])
    for trust in ([], ["--trust-pickle"]):
        r = run_cli("fold-bn", src, *trust, "--json")
        assert r.code == 2 and _error_of(r)["code"] == "truncated-checkpoint"


def test_dot_bin_output_is_refused_and_a_bin_input_defaults_to_pt(ckpts, tmp_path):
    src = tmp_path / "pytorch_model.bin"
    src.write_bytes((ckpts / "mobilenetv2.pt").read_bytes())
    r = run_cli("fold-bn", src, *ARCH, "-s", "1,3,64,64", "-o", tmp_path / "out.bin")
    assert r.code == 2 and not (tmp_path / "out.bin").exists()
    r = run_cli("fold-bn", src, *ARCH, "-s", "1,3,64,64", "-q")
    assert r.code == 0, r.err
    assert (tmp_path / "pytorch_model.fold-bn.pt").exists()


def test_state_dict_output_says_how_to_load_it(ckpts, tmp_path):
    import modelsurgeon as ms

    out = tmp_path / "folded.pt"
    r = run_cli("fold-bn", ckpts / "mobilenetv2.pt", *ARCH, "-s", "1,3,64,64", "-o", out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["warnings"] == []  # a state_dict has no train/eval mode to warn about
    load = rep["load"]
    assert load["structure_changed"] is True and "arch='zoo.mobilenetv2:mobilenet_v2'" in load["api"]
    model = ms.load(out, arch="zoo.mobilenetv2:mobilenet_v2", code_paths=[EXAMPLES])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model.eval()(torch.randn(1, 3, 64, 64))


# -- figures of the report ---------------------------------------------------------------------

class FrozenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, bias=False), FrozenBatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, bias=False), FrozenBatchNorm2d(8)

    def forward(self, x):
        return self.b2(self.c2(self.b1(self.c1(x)).relu()))


class Gridded(nn.Module):
    """A YOLO-style head building a grid from constants on every forward."""

    def __init__(self, grid: bool):
        super().__init__()
        self.conv, self.grid = nn.Conv2d(3, 4, 1), grid

    def forward(self, x):
        y = self.conv(x)
        if self.grid:
            yv, xv = torch.meshgrid(torch.arange(x.shape[2]), torch.arange(x.shape[3]), indexing="ij")
            g = torch.stack((xv, yv), 0).float().view(1, 2, x.shape[2], x.shape[3])
            return y[:, :2] + g
        return y[:, :2] + 1.0


def test_bn_count_includes_frozen_batchnorm(tmp_path):
    src = tmp_path / "frozen.pt"
    torch.save(randomize_all(FrozenNet(), 3).eval(), src)
    r = run_cli("fold-bn", src, "--trust-pickle", "-s", "1,3,16,16", "-o", tmp_path / "o.pt", "--json")
    assert r.code == 0, r.err
    assert len(r.json()["applied"]) == 2
    assert r.json()["before"]["bn"] == 2 and r.json()["after"]["bn"] == 0


def test_ops_per_forward_leaves_out_constant_grids(tmp_path):
    ops = {}
    for grid in (False, True):
        src = tmp_path / f"g{grid}.pt"
        torch.save(Gridded(grid).eval(), src)
        r = run_cli("fold-bn", src, "--trust-pickle", "-s", "1,3,8,8", "--dry-run", "--json")
        assert r.code == 0, r.err
        ops[grid] = r.json()["before"]["ops"]
    assert ops[True] == ops[False]  # conv, slice, add: the grid's arange/meshgrid/stack are not per-input work


def test_truncate_list_does_not_warn_about_zero_outputs(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        model[-1].weight.zero_()
        model[-1].bias.zero_()
    src = tmp_path / "zero.pt"
    torch.save(model.eval(), src)
    listed = run_cli("truncate", src, "--trust-pickle", "-s", "1,3,16,16", "--list", "--json")
    assert listed.code == 0, listed.err
    assert listed.json()["stopped"] and listed.json()["warnings"] == []
    folded = run_cli("fold-bn", src, "--trust-pickle", "-s", "1,3,16,16", "-o", tmp_path / "o.pt", "--json")
    assert folded.code == 0 and len(folded.json()["warnings"]) == 1  # a real run does say so


# -- --help ------------------------------------------------------------------------------------

def _help(*args: str) -> str:
    r = run_console(*args, "--help", env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})
    assert r.code == 0, r.err
    return r.out


def test_root_help_lists_the_exit_codes():
    text = _help()
    assert "Exit codes" in text
    for code in ("0 done", "1 parity failed", "2 bad input", "3 internal error", "130 interrupted"):
        assert code in text


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_reads_plainly(command):
    text = _help(command)
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert usage.split()[-1] == "INPUT" and "{" not in usage
    assert "<bool>" not in text and "<list[" not in text


@pytest.mark.parametrize("command", COMMANDS)
def test_help_example_runs_as_printed(ckpts, tmp_path, monkeypatch, command):
    """The example of every command's --help, run unchanged from a folder laid out like the
    repository after ``python examples/build.py``."""
    line = next(line for line in _help(command).splitlines() if "Example" in line)
    argv = shlex.split(line.split(":", 1)[1].strip())
    assert argv[0] == "modelsurgeon" and argv[1] == command
    (tmp_path / "examples").mkdir()
    os.symlink(ckpts, tmp_path / "examples" / "checkpoints")
    for sub in ("zoo", "yolo"):
        os.symlink(EXAMPLES / sub, tmp_path / "examples" / sub)
    monkeypatch.chdir(tmp_path)
    r = run_cli(*argv[1:], "--json")
    assert r.code == 0, r.err
    assert r.json()["written"] is True and (tmp_path / r.json()["output"]).exists()
