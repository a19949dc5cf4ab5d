"""Outputs keep the input's container, load without modelsurgeon, and round-trip via load()."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import modelsurgeon as ms
from conftest import EXAMPLES, run_cli
from testmodels import seeded_resnet

NO_MODELSURGEON = "import sys; sys.modules['modelsurgeon'] = None\n"


def _plain_python(code: str, *paths: Path) -> str:
    env_path = ":".join(str(p) for p in paths)
    r = subprocess.run([sys.executable, "-c", NO_MODELSURGEON + code], capture_output=True, text=True,
                       env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_yolo_dict_keeps_metadata_and_loads_without_modelsurgeon(ckpts, tmp_path):
    out = tmp_path / "y.pt"
    r = run_cli("fold-bn", ckpts / "yolov5s-focus.pt", "--trust-pickle", "--code-path", EXAMPLES / "yolo",
                "-s", "1,3,64,64", "-o", out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert {a["slot"] for a in rep["applied"]} == {"model", "ema"}
    assert rep["parity"]["passed"] and rep["after"]["bn"] == 0
    text = _plain_python(
        "import torch\n"
        f"ck = torch.load({str(out)!r}, weights_only=False)\n"
        "print(sorted(ck))\n"
        "m = ck['ema']\n"
        "print(next(m.parameters()).dtype, m.model[0].i, m.model[0].f, m.model[0].type)\n"
        "print(m.float().eval()(torch.randn(1, 3, 64, 64))[0].shape)\n",
        EXAMPLES / "yolo",
    )
    lines = text.splitlines()
    assert lines[0] == str(sorted(["best_fitness", "date", "ema", "epoch", "model", "opt", "optimizer", "updates"]))
    assert lines[1] == "torch.float16 0 -1 models.common.Focus"
    assert "torch.Size([1, 240, 8])" in lines[2]


def test_state_dict_output_rebuilds_with_load(ckpts, tmp_path):
    out = tmp_path / "mb.pt"
    r = run_cli("fold-bn", ckpts / "mobilenetv2.pt", "--arch", "zoo.mobilenetv2:mobilenet_v2",
                "--code-path", EXAMPLES, "-s", "1,3,64,64", "-o", out, "-q")
    assert r.code == 0, r.err
    raw = torch.load(out, weights_only=True)  # plain data: loads safely
    assert set(raw) == {"state_dict", "modelsurgeon"}
    assert raw["modelsurgeon"]["recipe"]
    original = ms.load(ckpts / "mobilenetv2.pt", arch="zoo.mobilenetv2:mobilenet_v2")
    folded = ms.load(out, arch="zoo.mobilenetv2:mobilenet_v2")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert ms.compare(folded, original, (1, 3, 64, 64), trials=2).passed
    with pytest.raises(ms.BadInput, match="--arch zoo.mobilenetv2:mobilenet_v2"):
        ms.load(out)  # the arch recorded in the file is named, not imported on the file's word
    assert isinstance(ms.load(out, trust_pickle=True), torch.nn.Module)


def test_safetensors_output_rebuilds_with_load(ckpts, tmp_path):
    out = tmp_path / "mb.safetensors"
    r = run_cli("fold-bn", ckpts / "mobilenetv2.safetensors", "--arch", "zoo.mobilenetv2:mobilenet_v2",
                "-s", "1,3,64,64", "-o", out, "-q")
    assert r.code == 0, r.err
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["modelsurgeon"])
    assert meta["arch"] == "zoo.mobilenetv2:mobilenet_v2"
    original = ms.load(ckpts / "mobilenetv2.safetensors", arch="zoo.mobilenetv2:mobilenet_v2")
    folded = ms.load(out, trust_pickle=True)  # arch recorded in the file: trusted explicitly
    assert ms.compare(folded, original, (1, 3, 64, 64)).passed


def test_full_module_to_safetensors_reloads_with_original_arch(ckpts, tmp_path):
    out = tmp_path / "r.safetensors"
    r = run_cli("fold-bn", ckpts / "resnet.pt", "--trust-pickle", "-s", "1,3,32,32", "-o", out, "-q")
    assert r.code == 0, r.err
    original = ms.load(ckpts / "resnet.pt", trust_pickle=True)
    folded = ms.load(out, arch="zoo.resnet:resnet")
    assert ms.compare(folded, original, (1, 3, 32, 32)).passed


def test_onnx_output_has_no_batchnorm_and_matches_torch(ckpts, tmp_path):
    out = tmp_path / "r.onnx"
    r = run_cli("fold-bn", ckpts / "resnet.pt", "--trust-pickle", "-s", "1,3,32,32", "-o", out, "--json",
                "--trials", "2")
    assert r.code == 0, r.err
    rep = r.json()
    assert any(o["name"].startswith("onnx:") for o in rep["parity"]["outputs"])
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}


def test_api_round_trip(tmp_path):
    from zoo import randomize
    from zoo.resnet import resnet

    m = randomize(resnet(), 3).eval()
    ref = resnet()
    ref.load_state_dict(m.state_dict())
    _, report = ms.fold_bn(m, (1, 3, 32, 32))
    assert report.after.bn == 0
    path = ms.save(m, tmp_path / "m.pt")
    again = torch.load(path, weights_only=False)
    assert ms.compare(again, ref.eval(), (1, 3, 32, 32)).passed




def dp_resnet():
    """A factory that returns the model wrapped in DataParallel (``--arch test_outputs:dp_resnet``)."""
    from zoo.resnet import resnet

    return torch.nn.DataParallel(resnet())


@pytest.mark.parametrize("command", ["fold-bn", "truncate"])
def test_dataparallel_module_to_safetensors_reloads_with_the_models_factory(tmp_path, command):
    from safetensors import safe_open

    net = seeded_resnet(6)
    src = tmp_path / "dp.pt"
    torch.save(torch.nn.DataParallel(net), src)
    extra = ["--blocks", "1"] if command == "truncate" else []
    full, st = tmp_path / "out.pt", tmp_path / "out.safetensors"
    for out in (full, st):
        r = run_cli(command, src, "--trust-pickle", "-s", "1,3,32,32", *extra, "-o", out, "--json")
        assert r.code == 0, r.err
    with safe_open(str(st), "pt") as f:
        meta = json.loads(f.metadata()["modelsurgeon"])
        assert all(k.startswith("module.") for k in f.keys())  # the keys stay as the wrapper wrote them
    assert meta["recipe"] and not any(e["path"].startswith("module") for e in meta["recipe"])
    rewritten = torch.load(full, weights_only=False).module  # the rewritten model, pickled whole
    for arch in ("zoo.resnet:resnet", "test_outputs:dp_resnet"):
        again = ms.load(st, arch=arch)
        inner = again.module if isinstance(again, torch.nn.DataParallel) else again
        assert [type(m) for m in inner.modules()] == [type(m) for m in rewritten.modules()]
        assert ms.compare(inner, rewritten, (1, 3, 32, 32), trials=2, atol=0, rtol=0).passed
        if command == "fold-bn":
            assert ms.compare(inner, net, (1, 3, 32, 32), trials=2).passed
        else:
            assert isinstance(inner.layer4, torch.nn.Identity) and inner.fc.in_features == 64
    # a file an older modelsurgeon wrote, with the wrapper's "module." in the recipe's paths
    from safetensors.torch import load_file, save_file

    with safe_open(str(st), "pt") as f:
        metadata = dict(f.metadata())
    legacy = json.loads(metadata["modelsurgeon"])
    legacy["recipe"] = [dict(e, path="module." + e["path"]) for e in legacy["recipe"]]
    old = tmp_path / "legacy.safetensors"
    save_file(load_file(str(st)), str(old), metadata={**metadata, "modelsurgeon": json.dumps(legacy)})
    assert ms.compare(ms.load(old, arch="zoo.resnet:resnet"), rewritten, (1, 3, 32, 32), atol=0, rtol=0).passed
    # rewriting the reloaded state again keeps the recipe relative to the model
    st2 = tmp_path / "again.safetensors"
    r = run_cli("fold-bn", st, "--arch", "test_outputs:dp_resnet", "-s", "1,3,32,32", "-o", st2, "-q")
    assert r.code == 0, r.err
    assert ms.compare(ms.load(st2, arch="zoo.resnet:resnet"), rewritten, (1, 3, 32, 32), trials=2).passed


def test_container_to_safetensors_records_the_written_models_recipe(tmp_path):
    model, ema = seeded_resnet(7), seeded_resnet(8)
    src = tmp_path / "ck.pt"
    torch.save({"model": model, "ema": ema, "epoch": 9}, src)
    out = tmp_path / "ema.safetensors"
    r = run_cli("fold-bn", src, "--trust-pickle", "-s", "1,3,32,32", "-o", out, "-q")
    assert r.code == 0, r.err
    again = ms.load(out, arch="zoo.resnet:resnet")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in again.modules())
    assert ms.compare(again, ema, (1, 3, 32, 32), trials=2).passed
