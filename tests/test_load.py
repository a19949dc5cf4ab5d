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
from modelsurgeon.errors import BadInput, UnsafeCheckpoint
from modelsurgeon.load import load_checkpoint


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
    assert "system" in str(e.value) and "--trust-pickle" in str(e.value)
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
    with pytest.raises(BadInput, match="--arch"):
        load_checkpoint(ckpts / "mobilenetv2.pt")
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
    (b"<html><body>404 Not Found</body></html>", "page.pt", "not a readable"),
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
    with pytest.raises(BadInput, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(BadInput, match="directory"):
        load_checkpoint(tmp_path)


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
    with pytest.raises(BadInput, match="TorchScript"):
        load_checkpoint(p)
