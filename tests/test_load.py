"""Loading: safe by default, every container kind, --arch, safetensors, clear errors."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from testmodels import seeded_resnet
from modelsurgeon.errors import BadInput, UnsafeCheckpoint
from modelsurgeon.read import load_checkpoint


class _Payload:
    """Unpickling this calls os.system: it would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_code_running_pickle_is_not_executed_without_trust(tmp_path, legacy):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker)}, p, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpoint) as e:
        load_checkpoint(p)
    assert e.value.code == "unsafe-checkpoint" and "system" in str(e.value)  # the callable, named
    assert not marker.exists()
    r = run_cli("fold-bn", p, "-o", tmp_path / "out.pt")
    assert r.code == 2 and "--trust-pickle" in r.err and not marker.exists()
    assert not (tmp_path / "out.pt").exists()


def test_raw_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "raw.pth"
    p.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpoint):
        load_checkpoint(p)
    assert not marker.exists()


def test_full_module_needs_trust_and_names_classes(ckpts):
    with pytest.raises(UnsafeCheckpoint) as e:
        load_checkpoint(ckpts / "resnet.pt", code_paths=[Path(__file__).parent.parent / "examples"])
    assert "zoo.resnet.ResNet" in str(e.value)
    ck = load_checkpoint(ckpts / "resnet.pt", trust_pickle=True)
    assert ck.format == "module" and isinstance(ck.slots[0].module, torch.nn.Module)


def test_yolo_dict_slots(ckpts):
    ck = load_checkpoint(ckpts / "yolov5s-focus.pt", trust_pickle=True)
    assert ck.format == "container"
    assert [s.name for s in ck.slots] == ["model", "ema"]
    assert ck.container["epoch"] == 299
    assert ck.primary().name == "ema"


def test_state_dict_needs_arch(ckpts):
    with pytest.raises(BadInput) as e:
        load_checkpoint(ckpts / "mobilenetv2.pt")
    assert e.value.code == "needs-arch"
    ck = load_checkpoint(ckpts / "mobilenetv2.pt", arch="zoo.mobilenetv2:mobilenet_v2")
    assert ck.format == "state_dict" and ck.slots[0].module.features[0][0].out_channels == 8


def test_lightning_style_prefixed_state_dict(tmp_path):
    from zoo.mobilenetv2 import mobilenet_v2

    sd = {f"model.{k}": v for k, v in mobilenet_v2().state_dict().items()}
    p = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "hyper_parameters": {"lr": 0.1}}, p)
    ck = load_checkpoint(p, arch="zoo.mobilenetv2:mobilenet_v2")
    assert ck.sd_key == "state_dict" and ck.slots[0].sd_prefix == "model."


def test_arch_kwargs_and_mismatch_messages(tmp_path, ckpts):
    with pytest.raises(BadInput, match="mis-shaped"):
        load_checkpoint(ckpts / "mobilenetv2.pt", arch="zoo.mobilenetv2:mobilenet_v2",
                        arch_kwargs='{"num_classes": 7}')
    with pytest.raises(BadInput, match="missing"):
        load_checkpoint(ckpts / "mobilenetv2.pt", arch="zoo.resnet:resnet")
    with pytest.raises(BadInput, match="JSON"):
        load_checkpoint(ckpts / "mobilenetv2.pt", arch="zoo.mobilenetv2:mobilenet_v2", arch_kwargs="{num")
    with pytest.raises(BadInput, match="package.module:factory"):
        load_checkpoint(ckpts / "mobilenetv2.pt", arch="zoo.mobilenetv2")
    with pytest.raises(BadInput, match="cannot import"):
        load_checkpoint(ckpts / "mobilenetv2.pt", arch="nope.nothing:f")


def test_safetensors_with_arch(ckpts):
    ck = load_checkpoint(ckpts / "mobilenetv2.safetensors", arch="zoo.mobilenetv2:mobilenet_v2")
    assert ck.format == "safetensors"


@pytest.mark.parametrize("content,name,msg", [
    (b"", "empty.pt", "empty"),
    (os.urandom(4096), "random.pt", "not a readable"),
    (b"<html><body>404 Not Found</body></html>", "page.pt", "not a checkpoint"),
    (b"not a safetensors header" * 4, "bad.safetensors", "not a readable safetensors"),
])
def test_unreadable_files(tmp_path, content, name, msg):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(BadInput, match=msg):
        load_checkpoint(p, arch="zoo.mobilenetv2:mobilenet_v2")


def test_truncated_zip(tmp_path, ckpts):
    data = (ckpts / "mobilenetv2.pt").read_bytes()
    p = tmp_path / "trunc.pt"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput):
        load_checkpoint(p, arch="zoo.mobilenetv2:mobilenet_v2")


def test_missing_and_directory(tmp_path):
    with pytest.raises(BadInput) as e:
        load_checkpoint(tmp_path / "nope.pt")
    assert e.value.code == "not-found"
    with pytest.raises(BadInput) as e:
        load_checkpoint(tmp_path)
    assert e.value.code == "not-a-checkpoint"


def test_nan_weights_are_bad_input(tmp_path):
    from zoo.resnet import resnet

    m = resnet()
    with torch.no_grad():
        m.fc.weight[0, 0] = float("nan")
    p = tmp_path / "nan.pt"
    torch.save(m.state_dict(), p)
    r = run_cli("fold-bn", p, "--arch", "zoo.resnet:resnet", "-s", "1,3,32,32", "-o", tmp_path / "o.pt")
    assert r.code == 2 and "fc.weight" in r.err and "NaN" in r.err
    assert not (tmp_path / "o.pt").exists()


def test_torchscript_archive_is_refused_clearly(tmp_path):
    m = torch.jit.script(torch.nn.Conv2d(3, 4, 3))
    p = tmp_path / "scripted.pt"
    torch.jit.save(m, str(p))
    with pytest.raises(BadInput) as e:
        load_checkpoint(p)
    assert "TorchScript" in str(e.value)  # says what the file is


# -- containers and state_dicts as real checkpoints hold them ------------------------------------


def test_same_module_under_two_keys_is_one_slot_rewritten_once(tmp_path):
    m = seeded_resnet(1)
    p = tmp_path / "shared.pt"
    torch.save({"model": m, "ema": m, "epoch": 4}, p)
    ck = load_checkpoint(p, trust_pickle=True)
    assert [s.key for s in ck.slots] == ["model"] and ck.aliases == {"ema": "model"}
    assert ck.primary().module is ck.container["ema"] is ck.container["model"]
    out = tmp_path / "t.pt"
    r = run_cli("truncate", p, "--trust-pickle", "-s", "1,3,32,32", "--blocks", "1", "-o", out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert len(rep["applied"]) == 1 and any("'ema' is the same module object as 'model'" in n for n in rep["notes"])
    got = torch.load(out, weights_only=False)
    assert got["model"] is got["ema"] and got["epoch"] == 4  # the aliasing survives the pickle
    removed = [isinstance(getattr(got["model"], f"layer{i}"), torch.nn.Identity) for i in range(1, 5)]
    assert removed == [False, False, False, True]  # one block removed, not two
    out2 = tmp_path / "f.pt"
    r = run_cli("fold-bn", p, "--trust-pickle", "-s", "1,3,32,32", "-o", out2, "--json")
    assert r.code == 0, r.err
    got = torch.load(out2, weights_only=False)
    assert got["model"] is got["ema"]
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in got["ema"].modules())
    ref = seeded_resnet(1)
    assert ms_verify(got["ema"], ref)


def ms_verify(model, ref, shape=(1, 3, 32, 32)) -> bool:
    import modelsurgeon as ms

    return ms.compare(model.float(), ref.float(), shape, trials=2).passed


def test_lightning_state_dict_keeps_keys_outside_the_model(tmp_path):
    import modelsurgeon as ms

    m = seeded_resnet(2)
    loss_w = torch.tensor([0.5, 1.0, 2.0])
    sd = {**{f"model.{k}": v for k, v in m.state_dict().items()}, "loss.weight": loss_w,
          "metric.count": torch.tensor(7)}
    p = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "hyper_parameters": {"lr": 0.1}}, p)
    ck = load_checkpoint(p, arch="zoo.resnet:resnet")
    assert set(ck.slots[0].sd_extra) == {"loss.weight", "metric.count"}
    out = tmp_path / "folded.ckpt"
    r = run_cli("fold-bn", p, "--arch", "zoo.resnet:resnet", "-s", "1,3,32,32", "-o", out, "--json")
    assert r.code == 0, r.err
    assert not any("loss" in w or "metric" in w for w in r.json()["warnings"] + r.json()["notes"])
    got = torch.load(out, weights_only=True)
    assert got["epoch"] == 3 and got["hyper_parameters"] == {"lr": 0.1}
    assert torch.equal(got["state_dict"]["loss.weight"], loss_w)
    assert torch.equal(got["state_dict"]["metric.count"], torch.tensor(7))
    assert not any(k.startswith("model.") and "bn" in k for k in got["state_dict"])
    again = ms.load(out, arch="zoo.resnet:resnet")  # the extra keys do not disturb a reload
    assert ms_verify(again, seeded_resnet(2))
    st = tmp_path / "folded.safetensors"
    r = run_cli("fold-bn", p, "--arch", "zoo.resnet:resnet", "-s", "1,3,32,32", "-o", st, "-q")
    assert r.code == 0, r.err
    from safetensors.torch import load_file

    tensors = load_file(str(st))
    assert torch.equal(tensors["loss.weight"], loss_w) and torch.equal(tensors["metric.count"], torch.tensor(7))
    assert ms_verify(ms.load(st, arch="zoo.resnet:resnet"), seeded_resnet(2))


def test_state_dict_with_a_non_tensor_entry(tmp_path):
    import modelsurgeon as ms

    p = tmp_path / "versioned.pt"
    torch.save({**seeded_resnet(3).state_dict(), "version": 3}, p)
    ck = load_checkpoint(p, arch="zoo.resnet:resnet")
    assert ck.format == "state_dict" and ck.slots[0].sd_extra == {"version": 3}
    out = tmp_path / "f.pt"
    r = run_cli("fold-bn", p, "--arch", "zoo.resnet:resnet", "-s", "1,3,32,32", "-o", out, "-q")
    assert r.code == 0, r.err
    got = torch.load(out, weights_only=True)
    assert got["state_dict"]["version"] == 3
    assert ms_verify(ms.load(out, arch="zoo.resnet:resnet"), seeded_resnet(3))
    st = tmp_path / "f.safetensors"
    r = run_cli("fold-bn", p, "--arch", "zoo.resnet:resnet", "-s", "1,3,32,32", "-o", st, "--json")
    assert r.code == 0, r.err  # safetensors holds tensors only: said so
    assert any("non-tensor entries (version)" in w for w in r.json()["warnings"])
    assert ms_verify(ms.load(st, arch="zoo.resnet:resnet"), seeded_resnet(3))
    # a container is not a state_dict with extras: its nested dicts keep it one
    q = tmp_path / "meta-only.pt"
    torch.save({"epoch": 3, "opt": {"lr": 0.1}, "best": torch.tensor(0.5)}, q)
    with pytest.raises(BadInput, match="no model or state_dict found"):
        load_checkpoint(q, arch="zoo.resnet:resnet")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("command", ["fold-bn", "truncate"])
def test_fp16_state_dict_stays_fp16(tmp_path, suffix, command):
    from safetensors.torch import load_file, save_file

    import modelsurgeon as ms

    m = seeded_resnet(4)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in m.state_dict().items()}
    p = tmp_path / f"half{suffix}"
    if suffix == ".pt":
        torch.save(sd, p)
    else:
        save_file(sd, str(p))
    loaded = load_checkpoint(p, arch="zoo.resnet:resnet").slots[0].module
    assert all(v.dtype == sd[k].dtype and torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    extra = ["--blocks", "1"] if command == "truncate" else []
    for out_suffix in (".pt", ".safetensors"):
        out = tmp_path / f"out{out_suffix}"
        r = run_cli(command, p, "--arch", "zoo.resnet:resnet", "-s", "1,3,32,32", *extra, "-o", out, "--json")
        assert r.code == 0, r.err
        rep = r.json()
        assert any("stored in float16" in n for n in rep["notes"])
        if command == "fold-bn":
            assert rep["parity"]["rtol"] == pytest.approx(1e-2)  # fp16 tolerances
        tensors = load_file(str(out)) if out_suffix == ".safetensors" else torch.load(out, weights_only=True)["state_dict"]
        assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.float16}
        again = ms.load(out, arch="zoo.resnet:resnet")
        assert {p.dtype for p in again.parameters()} == {torch.float16}
        if command == "fold-bn":
            assert ms.compare(again.float(), m, (1, 3, 32, 32), trials=2, rtol=1e-2).passed


def test_float64_state_dict_keeps_its_precision(tmp_path):
    m = seeded_resnet(5).double()
    p = tmp_path / "f64.pt"
    torch.save(m.state_dict(), p)
    loaded = load_checkpoint(p, arch="zoo.resnet:resnet").slots[0].module
    assert {t.dtype for t in loaded.state_dict().values() if t.is_floating_point()} == {torch.float64}
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_raw_pickle_error_is_one_line(tmp_path):
    from conftest import run_console

    p = tmp_path / "raw.pt"
    p.write_bytes(pickle.dumps([1, 2, 3], protocol=5))
    r = run_console("fold-bn", p, "-s", "1,3,32,32", "-o", tmp_path / "o.pt")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1, r.err
    assert "UserWarning" not in r.err and "weights_only" not in r.err
    marker = tmp_path / "pwned"
    q = tmp_path / "evil.pt"
    q.write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    r = run_console("fold-bn", q, "-s", "1,3,32,32", "-o", tmp_path / "o.pt")
    assert r.code == 2 and len(r.err.strip().splitlines()) == 1 and "--trust-pickle" in r.err, r.err
    assert not marker.exists()


@pytest.mark.parametrize("where", ["import", "call"])
def test_arch_that_exits_is_bad_input(tmp_path, ckpts, where):
    name = f"exits_at_{where}_{os.getpid()}"
    body = "import sys\nsys.exit(5)\n" if where == "import" else "import sys\ndef build():\n    sys.exit(5)\n"
    (tmp_path / f"{name}.py").write_text(body)
    r = run_cli("fold-bn", ckpts / "mobilenetv2.pt", "--arch", f"{name}:build", "--code-path", tmp_path,
                "-s", "1,3,32,32", "-o", tmp_path / "o.pt")
    assert r.code == 2 and r.err.count("\n") == 1, r.err
    assert f"--arch {name}:build exited (SystemExit 5)" in r.err
    assert not (tmp_path / "o.pt").exists()
