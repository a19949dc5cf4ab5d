"""The pass contract, the declared order, the round loop and options declared once: the API
names the Python parameter, the CLI the flag, --help groups the shared options in panels."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from torch import nn

import modelsurgeon as ms
from conftest import run_cli, run_console
from modelsurgeon.options import OptionError, Options, RunOptions, option
from modelsurgeon.passes import registry
from modelsurgeon.passes.base import Applied, Match, Pass, PassContext, PassReport
from modelsurgeon.passes.manager import MAX_ROUNDS, run_rounds
from modelsurgeon.passes.spec import OrderError, PassSpec, ordered
from testmodels import randomize_all


def _small():
    return randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), 2).eval()


# -- order ------------------------------------------------------------------------------------------

def test_optimize_order_comes_from_declarations_not_registration():
    specs = [s for s in registry.specs() if s.group is None]
    expected = ["focus-to-conv", "fold-fusion", "reparam", "fold-bn"]
    assert [n for n in registry.exact_passes() if registry.spec(n).group is None] == expected
    for shuffled in (list(reversed(specs)), specs[1:] + specs[:1], specs[2:] + specs[:2]):
        assert ordered(shuffled, expected) == expected
    everything = registry.specs()  # the ONNX clean-up's declarations hold in any registration order too
    for shuffled in (list(reversed(everything)), everything[5:] + everything[:5]):
        order = ordered(shuffled, registry.exact_passes())
        for s in everything:
            if s.exact:
                assert all(order.index(s.name) < order.index(b) for b in s.before if b in order)
                assert all(order.index(a) < order.index(s.name) for a in s.after if a in order)


def test_ties_follow_registration_and_a_cycle_is_refused():
    a, b, c = (PassSpec(n, n, torch="m:C") for n in ("a", "b", "c"))
    assert ordered([a, b, c]) == ["a", "b", "c"] and ordered([c, b, a]) == ["c", "b", "a"]
    a2 = PassSpec("a", "a", torch="m:C", after=("c",))
    assert ordered([a2, b, c]) == ["b", "c", "a"]
    c2 = PassSpec("c", "c", torch="m:C", after=("b",), before=("x-unknown",))  # unknown names are ignored
    b2 = PassSpec("b", "b", torch="m:C", after=("a",))
    d = PassSpec("d", "d", torch="m:C", after=("a",))  # held up behind the cycle, not on it
    with pytest.raises(OrderError, match="cycle: a before b before c before a"):
        ordered([d, a2, b2, c2])


def test_a_spec_is_checked_when_declared():
    for bad in (dict(name="Fold BN", summary="x", torch="m:C"), dict(name="x", summary="x"),
                dict(name="x", summary="x", torch="no-colon"), dict(name="x", summary="x", torch="m:C", options=dict)):
        with pytest.raises(ValueError):
            PassSpec(**bad)
    assert PassSpec("x-y", "s", torch="m:C").cli == "x-y" and PassSpec("x", "s", onnx="m:C", cli=None).cli is None


def test_a_pass_option_may_not_take_a_run_option_s_name():
    @dataclasses.dataclass
    class Clashing(Options):
        seed: int = option(0, help="x")

    with pytest.raises(ValueError, match="run options"):
        registry.register_pass(PassSpec("clash", "x", torch="m:C", options=Clashing))
    with pytest.raises(ValueError, match="command name"):
        registry.register_pass(PassSpec("optimize", "x", torch="m:C"))
    assert "clash" not in registry.REGISTRY and "optimize" not in registry.REGISTRY


# -- the contract and the loop ----------------------------------------------------------------------

class Counting(Pass):
    """Changes the model every time, up to ``limit`` rewrites."""

    name = "counting"

    def __init__(self, limit: int):
        self.limit, self.done = limit, 0

    def match(self, ctx):
        if self.done < self.limit:
            yield Match(f"t{self.done}")

    def rewrite(self, ctx, m):
        self.done += 1
        return Applied(m.target, "changed")


def _loop(limit: int, repeat: bool = True):
    p = Counting(limit)
    reports = {p.name: PassReport(p.name)}
    contexts = []

    def context(_p):
        contexts.append(PassContext())
        return contexts[-1]

    return run_rounds([p], reports, context=context, repeat=repeat), reports[p.name], contexts


def test_rounds_repeat_until_nothing_changes():
    rounds, report, contexts = _loop(3)
    assert rounds.count == 4 and not rounds.exhausted and rounds.warning() is None
    assert len(report.applied) == 3 and len(rounds.applied["counting"]) == 3 and len(contexts) == 4
    rounds, report, _ = _loop(3, repeat=False)
    assert rounds.count == 1 and len(report.applied) == 1


def test_the_round_bound_is_a_named_limit_that_warns():
    rounds, report, _ = _loop(100)
    assert rounds.count == MAX_ROUNDS and rounds.exhausted and len(report.applied) == MAX_ROUNDS
    assert str(MAX_ROUNDS) in rounds.warning()


def test_pass_defaults_and_no_duck_typing():
    p = Counting(0)
    assert p.prepare(PassContext()) is None and p.verify(PassContext(), [], None) is None
    for name in ("prepare", "match", "rewrite", "verify"):
        assert callable(getattr(Pass, name))
    # every registered implementation is a Pass subclass with its spec's name and back end
    for spec in registry.specs():
        for backend in ("torch", "onnx"):
            if spec.implementation(backend):
                p = registry.get(spec.name, backend)
                assert isinstance(p, Pass) and p.name == spec.name and p.backend == backend


def test_truncate_keeps_no_state_on_the_pass():
    from modelsurgeon.passes.truncate.torch import Truncate, TruncateApplied

    assert not vars(Truncate())
    assert {f.name for f in dataclasses.fields(TruncateApplied)} >= {"match", "prefix_refs", "info"}


# -- options ----------------------------------------------------------------------------------------

def test_api_errors_name_the_parameter_cli_errors_the_flag(ckpts, tmp_path):
    with pytest.raises(OptionError) as e:
        ms.truncate(_small(), (1, 3, 8, 8), blocks=0)
    assert e.value.option == "blocks" and str(e.value).startswith("blocks=0:") and "--" not in str(e.value)
    assert e.value.code == "bad-option"
    with pytest.raises(OptionError) as e:
        ms.fold_bn(_small(), (1, 3, 8, 8), trials=0)
    assert e.value.option == "trials" and str(e.value).startswith("trials=0:")
    with pytest.raises(OptionError) as e:
        ms.truncate(_small(), (1, 3, 8, 8))
    assert "blocks=N" in str(e.value) and "list_blocks=True" in str(e.value)
    r = run_cli("truncate", ckpts / "resnet.pt", "--trust-pickle", "-s", "1,3,8,8", "-o", tmp_path / "o.pt",
                "--blocks", "0", "--json")
    assert r.code == 2 and "--blocks 0:" in r.err and r.json()["error"]["code"] == "bad-option"


def test_unknown_keywords_and_wrong_types_are_refused_like_python_does():
    with pytest.raises(TypeError, match="fold_bn.. got an unexpected keyword argument 'blocks'"):
        ms.fold_bn(_small(), (1, 3, 8, 8), blocks=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'arch'"):
        ms.fold_bn(_small(), (1, 3, 8, 8), arch="x:y")  # a file's option, not a model's
    with pytest.raises(OptionError, match="expected an integer"):
        ms.fold_bn(_small(), (1, 3, 8, 8), trials="2")
    with pytest.raises(OptionError, match="input_shape="):
        ms.fold_bn(_small(), "1,3,x")


def test_api_keywords_are_the_options_fields():
    from modelsurgeon.passes.truncate import TruncateOptions

    params = inspect.signature(ms.truncate).parameters
    assert set(TruncateOptions.option_fields()) <= set(params)
    assert set(RunOptions.MODEL) <= set(params)
    run_params = inspect.signature(ms.run).parameters
    assert list(run_params)[:3] == ["command", "input", "output"]


def test_every_declared_option_is_a_flag_in_its_panel():
    text = run_console("truncate", "--help", env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}).out
    for panel in ("Input", "Verification", "Output", "General"):
        assert f"─ {panel} " in text
    from modelsurgeon.passes.truncate import TruncateOptions

    for cls in (RunOptions, TruncateOptions):
        for f in cls.option_fields().values():
            if not f.info.argument:
                assert f.flag in text, f.flag


def test_help_and_version_import_no_torch_and_no_pass():
    import subprocess
    import sys

    code = ("import sys; from modelsurgeon.cli.app import main; main(['--help']); "
            "bad = [m for m in ('torch', 'onnx', 'onnx_ir', 'modelsurgeon.passes.fold_bn.torch') if m in sys.modules]; "
            "sys.stderr.write(repr(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().endswith("[]"), r.stderr
    assert "fold-bn" in r.stdout


def test_run_takes_the_command_s_options(ckpts, tmp_path):
    report = ms.run("truncate", ckpts / "resnet.pt", tmp_path / "o.pt", trust_pickle=True, input_shape=(1, 3, 32, 32),
                    list_blocks=True)
    assert report.stopped and report.extra["truncate"]["blocks"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'blocks'"):
        ms.run("fold-bn", ckpts / "resnet.pt", tmp_path / "o.pt", blocks=1)
    with pytest.raises(ms.BadInput, match="unknown command"):
        ms.run("fold-everything", ckpts / "resnet.pt")
    assert not (tmp_path / "o.pt").exists()
    with pytest.raises(OptionError, match="passes="):
        ms.run("optimize", ckpts / "resnet.pt", tmp_path / "o.pt", passes=["truncate"])
