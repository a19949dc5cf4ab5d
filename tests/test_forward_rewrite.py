"""The shared forward-rewrite tool (modelsurgeon.rewrite.forward): how a program is chosen and
proved (torch.fx trace aligned with the recording, or the recording checked at other input and
batch sizes), what is refused (by stable code), the edits its users make -- re-parameterisation
replacing a block's branches by one conv, a folded child removed the way YOLOv5's deploy path
removes it -- and what the result must survive: pickling without modelsurgeon, deepcopy, one
state_dict key per tensor, recipe replay from plain JSON, ONNX export."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import run_without_modelsurgeon
from modelsurgeon.capture import capture
from modelsurgeon.rewrite import forward
from modelsurgeon.rewrite.forward import spec as fspec
from modelsurgeon.rewrite.modules import ModuleEditor
from modelsurgeon.rewrite.recipe import Recipe, apply
from forward_models import (X, Conv, DataBranch, FixedSize, Net, OwnCall, PlainConv, RepVGGBlock, SizeBaked, Untraceable,
                            Weighted)
from testmodels import randomize_all


def _open(model, module, shape=X):
    x = torch.randn(shape)
    g, _, _ = capture(model, [x])
    (call,) = g.calls_of(module)
    return g, call, forward.open_forwards(g, [call], model, [x])[call.id]


def _weight(seq):
    """A conv + BatchNorm as one float64 ``(weight, bias)``."""
    bn = seq.bn
    std = (bn.running_var.double() + bn.eps).sqrt()
    t = bn.weight.double() / std
    return seq.conv.weight.double() * t.view(-1, 1, 1, 1), bn.bias.double() - bn.running_mean.double() * t


def _merged(block):
    """RepVGG's re-parameterisation, in float64: one 3x3 conv computing the three branches."""
    k3, b3 = _weight(block.rbr_dense)
    k1, b1 = _weight(block.rbr_1x1)
    c = k3.shape[0]
    ident = nn.Sequential()
    ident.add_module("conv", nn.Conv2d(c, c, 1, bias=False))
    ident.add_module("bn", block.rbr_identity)
    with torch.no_grad():
        ident.conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
    ki, bi = _weight(ident)
    conv = nn.Conv2d(c, c, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(k3 + F.pad(k1, [1, 1, 1, 1]) + F.pad(ki, [1, 1, 1, 1]))
        conv.bias.copy_(b3 + b1 + bi)
    return conv


def _repvgg():
    torch.manual_seed(0)
    return randomize_all(Net(RepVGGBlock(4)), 1).eval()


def _reparam(model):
    """What the re-parameterisation pass does with the tool: the sum before the activation
    becomes one conv of the block's input, registered on the block."""
    g, call, plan = _open(model, model.block)
    assert isinstance(plan, forward.ForwardPlan), plan
    act = next(g.call(c) for c in call.children if g.call(c).module is model.block.nonlinearity)
    merged = plan.call_module(_merged(model.block), [call.inputs[0]], "rbr_reparam")
    plan.substitute(act.inputs[0], merged)
    editor = ModuleEditor(model, None)
    done = plan.commit(editor)
    assert isinstance(done, forward.Committed), done
    return done, editor


def test_reparameterisation_replaces_the_branches_by_one_conv_keeping_the_class():
    model = _repvgg()
    original = copy.deepcopy(model)
    done, editor = _reparam(model)
    block = model.block
    assert type(block) is RepVGGBlock and done.source == "fx"
    assert sorted(done.removed) == ["rbr_1x1", "rbr_dense", "rbr_identity"] and done.added == ["rbr_reparam"]
    assert set(block._modules) == {"nonlinearity", "rbr_reparam", "fused"}
    g, _, _ = capture(model, [torch.randn(X)])
    ops = [e.name for e in g.events if g.call(e.scope).path.startswith("block")]
    assert ops == ["conv2d", "relu"]  # one conv and its activation: no branch, no add, no BatchNorm
    for shape in [(2, 4, 8, 8), (3, 4, 5, 11)]:
        x = torch.randn(shape)
        assert torch.allclose(model(x), original(x), rtol=1e-5, atol=1e-5)
    # the block's own deploy path agrees: its class forward with rbr_reparam computes the same
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(type(block).forward(block, x), block(x))


def test_generated_forward_survives_pickling_without_modelsurgeon_and_deepcopy(tmp_path):
    model = _repvgg()
    _reparam(model)
    x = torch.randn(2, 4, 6, 10)
    expected = model(x)
    torch.save(model, tmp_path / "m.pt")
    torch.save(x, tmp_path / "x.pt")
    shown = run_without_modelsurgeon(tmp_path / "m.pt", tmp_path / "x.pt", tmp_path / "y.pt",
                                     "type(m.block).__name__, m.block.forward.args[0] is m.block, "
                                     "c.block.forward.args[0] is c.block")
    assert shown == ["RepVGGBlock", "True", "True"]
    assert all(torch.equal(y, expected) for y in torch.load(tmp_path / "y.pt"))
    clone = copy.deepcopy(model)  # its own generated forward, bound to the copy
    assert clone.block.fused is not model.block.fused and clone.block.forward.args[0] is clone.block
    with torch.no_grad():
        clone.block.rbr_reparam.bias.add_(1)
    assert torch.equal(model(x), expected) and not torch.equal(clone(x), expected)
    sd = model.state_dict()  # every tensor one key
    assert len({t.data_ptr() for t in sd.values()}) == len(sd)


def test_a_state_dict_rebuilds_the_new_structure_from_the_recipe():
    model = _repvgg()
    _, editor = _reparam(model)
    recipe = Recipe.from_json(json.loads(json.dumps(editor.recipe.to_json())))  # plain data
    (edit,) = recipe.edits
    assert edit["op"] == "set_forward" and edit["bind"] == "owner" and edit["module"]["kind"] == "graph"
    assert edit["add"] == {"rbr_reparam": {"class": "Conv2d", "kwargs": {
        "in_channels": 4, "out_channels": 4, "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
        "dilation": [1, 1], "groups": 1, "padding_mode": "zeros", "bias": True}}}
    rebuilt = apply(recipe, Net(RepVGGBlock(4)).eval())
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 4, 7, 9)
    assert torch.equal(rebuilt(x), model(x)) and type(rebuilt.block) is RepVGGBlock


def test_a_folded_child_is_removed_the_way_yolov5_fuse_removes_it():
    torch.manual_seed(0)
    model = randomize_all(Net(Conv(4, 4, 3)), 2).eval()
    original = copy.deepcopy(model)
    g, call, plan = _open(model, model.block)
    bn_call = next(g.call(c) for c in call.children if g.call(c).module is model.block.bn)
    conv = model.block.conv
    editor = ModuleEditor(model, None)
    w, b = torch.nn.utils.fusion.fuse_conv_bn_weights(conv.weight.double(), None, *(
        t.double() for t in (model.block.bn.running_mean, model.block.bn.running_var)), model.block.bn.eps,
        model.block.bn.weight.double(), model.block.bn.bias.double())
    plan.remove_call(bn_call)
    editor.set_param(conv.weight, w.detach())
    editor.add_bias(conv, b.detach())
    done = plan.commit(editor)
    assert done.removed == ["bn"] and not hasattr(model.block, "bn")
    model.fuse()  # the host's own deploy path finds nothing left to fuse
    x = torch.randn(2, 4, 9, 7)
    assert torch.allclose(model(x), original(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(model.block(x), model.block.forward_fuse(x))


def test_a_placeholder_fold_bn_left_goes_where_the_host_has_no_fused_forward():
    """fold-bn leaves an ``nn.Identity`` where a BatchNorm was when the class has no fused
    forward to switch to; ``remove_child`` removes it the way a host's ``fuse()`` would."""
    import modelsurgeon as ms

    torch.manual_seed(0)
    model = randomize_all(Net(PlainConv(4, 4, 3)), 3).eval()
    original = copy.deepcopy(model)
    assert ms.fold_bn(model, X)[1].parity.passed
    assert isinstance(model.block.bn, nn.Identity)
    x = torch.randn(2, 4, 6, 9)
    folded = model(x)
    _, _, plan = _open(model, model.block)
    plan.remove_child("bn")
    done = plan.commit(ModuleEditor(model, None))
    assert done.removed == ["bn"] and not hasattr(model.block, "bn") and type(model.block) is PlainConv
    model.fuse()  # the host's own deploy path finds no bn
    assert torch.equal(model(x), folded) and torch.allclose(model(x), original(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,host,source_or_code", [
    (Weighted, Net, "fx"), (Untraceable, Net, "recording"),
    (SizeBaked, Net, forward.NOT_REPRODUCED), (DataBranch, Net, forward.DATA_DEPENDENT),
    (OwnCall, Net, forward.CANNOT_TAKE), (Untraceable, FixedSize, forward.NOT_CHECKABLE),
    (Weighted, FixedSize, "fx")])
def test_how_a_program_is_chosen_and_what_is_refused(cls, host, source_or_code):
    torch.manual_seed(0)
    model = host(cls()).eval()
    hooks_before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    _, _, plan = _open(model, model.block)
    if isinstance(plan, forward.ForwardPlan):
        assert plan.source == source_or_code and plan.folded  # softmax(w) evaluated once
    else:
        assert plan.code == source_or_code, plan
        assert "forward" not in vars(model.block)
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == hooks_before


def test_shared_modules_are_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Weighted()

        def forward(self, x):
            return self.block(self.block(x))

    model = Twice().eval()
    x = torch.randn(X)
    g, _, _ = capture(model, [x])
    first = g.calls_of(model.block)[0]
    assert forward.open_forwards(g, [first], model, [x])[first.id].code == forward.SHARED


def test_parameter_only_expressions_become_constants_and_nothing_else_changes():
    torch.manual_seed(0)
    model = Net(Untraceable()).eval()
    original = copy.deepcopy(model)
    _, _, plan = _open(model, model.block)
    done = plan.commit(ModuleEditor(model, None))
    assert done.source == "recording" and done.removed == ["w"] and done.ops_after < done.ops_before
    g, _, _ = capture(model, [torch.randn(X)])
    assert not [e.name for e in g.events if e.inputs and not g.reads_variable(e)]  # no softmax, no getitem
    for shape in [(2, 4, 8, 8), (1, 4, 3, 5)]:
        x = torch.randn(shape)
        assert torch.equal(model(x), original(x))  # the same ops on the same numbers: bit for bit


def test_a_value_set_to_a_constant_and_a_child_call_replaced():
    torch.manual_seed(0)
    model = Net(Weighted()).eval()
    block = model.block
    w = torch.softmax(block.w.detach(), 0)
    g, call, plan = _open(model, block)
    (a_call,), (b_call,) = g.calls_of(block.a), g.calls_of(block.b)
    doubled = copy.deepcopy(block.b)
    with torch.no_grad():
        doubled.weight.mul_(2)
        doubled.bias.mul_(2)
    const = torch.randn(X)
    plan.set_constant(a_call.outputs[0], const)
    assert plan.replace_call(b_call, doubled, "b2") == "b2"
    done = plan.commit(ModuleEditor(model, None))
    assert sorted(done.removed) == ["a", "b", "w"] and done.added == ["b2"] and block.b2 is doubled
    x = torch.randn(X)
    with torch.no_grad():
        stem = model.stem(x)
        expected = model.head(w[0] * const + w[1] * doubled(stem))
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


def test_an_edit_on_a_value_changed_in_place_later_is_refused():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.a(x)
            z = y * 2
            y.add_(1)
            return z + y

    model = Net(InPlace()).eval()
    g, call, plan = _open(model, model.block)
    y = g.calls_of(model.block.a)[0].outputs[0]
    mul = next(e for e in g.events_in(call, direct=True) if e.name == "Tensor.mul")
    with pytest.raises(forward.EditError):
        plan.substitute(mul.outputs[0], y)  # y's numbers change after the multiply


def test_a_child_with_a_hook_keeps_being_called():
    """A branch carrying a hook runs on (its output unused) rather than losing its hook."""
    model = _repvgg()
    seen = []
    model.block.rbr_1x1.register_forward_hook(lambda *a: seen.append(1))
    g, call, plan = _open(model, model.block)
    act = next(g.call(c) for c in call.children if g.call(c).module is model.block.nonlinearity)
    plan.substitute(act.inputs[0], plan.call_module(_merged(model.block), [call.inputs[0]], "rbr_reparam"))
    done = plan.commit(ModuleEditor(model, None))
    assert sorted(done.removed) == ["rbr_dense", "rbr_identity"] and hasattr(model.block, "rbr_1x1")
    seen.clear()
    model(torch.randn(X))
    assert seen == [1]


def test_onnx_export_of_a_generated_forward_computes_no_weight():
    import onnx

    torch.manual_seed(0)
    model = Net(Weighted()).eval()
    _, _, plan = _open(model, model.block)
    plan.commit(ModuleEditor(model, None))
    f = io.BytesIO()
    torch.onnx.export(model, (torch.randn(X),), f, dynamo=False, do_constant_folding=False, opset_version=17)
    g = onnx.load_from_string(f.getvalue()).graph
    assert "Softmax" not in {n.op_type for n in g.node}
    assert {n.op_type for n in g.node} == {"Conv", "Mul", "Add"}


@pytest.mark.parametrize("tamper", [
    lambda n: n.update(target="torch.load") if str(n.get("target")).endswith(".conv2d") else None,
    lambda n: n.update(target="os.system") if str(n.get("target")).endswith(".conv2d") else None,
    lambda n: n.update(target="register_hook") if n["op"] == "call_method" and n["target"] == "view" else None,
    lambda n: n.update(target="__class__.__init__") if n["op"] == "owner_attr" else None,
    lambda n: n.update(args=[{"pickle": "x"}]) if n["op"] == "output" else None,
])
def test_a_recipe_builds_nothing_but_allowed_calls(tamper):
    import operator

    g = torch.fx.Graph()
    m, x = g.placeholder("m"), g.placeholder("x")
    w = g.call_function(getattr, (g.call_function(getattr, (m, "conv")), "weight"))
    y = g.call_function(torch.conv2d, (x, w))
    y = g.call_method("view", (y, -1))
    g.output(g.call_function(operator.mul, (y, 2)))
    spec = json.loads(json.dumps(fspec.to_spec(g, {}, owner="m")))
    fspec.build(spec)  # as written: fine
    for n in spec["nodes"]:
        tamper(n)
    with pytest.raises(ValueError):
        fspec.build(spec)
