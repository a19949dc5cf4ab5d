"""truncate on PyTorch models: stage detection, the cut, head repair, refusals, outputs.

BatchNorm statistics and affine parameters are randomised everywhere. The kept prefix is checked
here independently of the pass's own verification: the truncated model (reloaded from what was
written) must reproduce the original's intermediate output exactly, on fresh inputs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modelsurgeon as ms
from conftest import EXAMPLES, files_in, run_cli
from zoo import randomize
from zoo.mobilenetv2 import mobilenet_v2
from zoo.resnet import resnet

MB = ["--arch", "zoo.mobilenetv2:mobilenet_v2", "--code-path", str(EXAMPLES)]
MB_FULL = MB + ["--arch-kwargs", '{"width_mult": 1.0}']  # full width: 160 / 320 / 1280 channels


def _mb(seed: int = 3, width_mult: float = 0.25):
    return randomize(mobilenet_v2(width_mult=width_mult), seed).eval()


def _features_upto(model, n, x):
    with torch.no_grad():
        for i in range(n):
            x = model.features[i](x)
    return x


# -- MobileNetV2: features = stem + 17 inverted residuals + 1x1 -> 1280 ------------------------


def test_mobilenetv2_blocks_2_keeps_17_blocks_ending_at_160(tmp_path):
    original = _mb(width_mult=1.0)
    src = tmp_path / "mb.pt"
    torch.save(original.state_dict(), src)
    out = tmp_path / "small.pt"
    r = run_cli("truncate", src, *MB_FULL, "--blocks", "2", "-s", "1,3,32,32", "--trials", "2",
                "-o", out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    t = rep["truncate"]
    assert t["stage"] == "features" and "found automatically" in t["reason"]
    assert len(t["blocks"]) == 19 and t["kept_blocks"] == 17
    assert t["removed"] == ["features.17", "features.18"]
    assert t["output_channels"] == {"before": 1280, "after": 160}
    assert [b["out_channels"] for b in t["blocks"][-3:]] == [160, 320, 1280]
    (layer,) = t["head"]["layers"]
    assert layer["path"] == "classifier.1" and layer["action"] == "rebuilt" and layer["reinitialised"]
    assert layer["before"] == "Linear(1280→10)" and layer["after"] == "Linear(160→10)"
    assert any("classifier.1" in w and "fine-tuning" in w for w in rep["warnings"])
    # parity: the kept prefix, exactly, on both trials
    assert rep["parity"]["passed"] and rep["parity"]["atol"] == 0 and rep["parity"]["rtol"] == 0
    assert [o["name"] for o in rep["parity"]["outputs"]] == ["kept prefix features.16"]
    assert rep["parity"]["max_abs"] == 0.0 and t["prefix_exact"] is True
    # figures: what the removed blocks and the smaller head account for
    removed_params = sum(p.numel() for i in (17, 18) for p in original.features[i].parameters())
    head_delta = (1280 - 160) * 10
    assert t["params"]["before"] - t["params"]["after"] == removed_params + head_delta
    assert t["params"]["saved"] == pytest.approx(1 - t["params"]["after"] / t["params"]["before"], abs=1e-4)
    assert t["flops"]["after"] < t["flops"]["before"] and t["flops"]["before"] == rep["before"]["flops"]
    assert t["output_shapes"] == {"before": [[1, 10]], "after": [[1, 10]]}
    # the written state_dict rebuilds the truncated structure from the factory (recipe)
    small = ms.load(out, arch="zoo.mobilenetv2:mobilenet_v2", arch_kwargs={"width_mult": 1.0})
    assert len(small.features) == 19
    assert isinstance(small.features[17], nn.Identity) and isinstance(small.features[18], nn.Identity)
    assert small.classifier[1].in_features == 160 and small.classifier[1].out_features == 10
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.equal(small.eval().features(x), _features_upto(original, 17, x))
        assert small(x).shape == (3, 10)


def test_after_names_the_last_kept_block(ckpts):
    # a path relative to the stage (or the full path features.16, or the index)
    r = run_cli("truncate", ckpts / "mobilenetv2.pt", *MB, "--after", "16", "-s", "1,3,32,32", "--dry-run", "--json")
    assert r.code == 0, r.err
    t = r.json()["truncate"]
    assert t["removed"] == ["features.17", "features.18"] and t["last_kept"] == "features.16"
    m = randomize(resnet(), 4).eval()
    _, report = ms.truncate(m, (1, 3, 32, 32), after="layer2")
    assert report.extra["truncate"]["removed"] == ["layer3", "layer4"] and m.fc.in_features == 32


def test_dry_run_changes_and_writes_nothing(ckpts, tmp_path):
    r = run_cli("truncate", ckpts / "mobilenetv2.pt", *MB, "-n", "3", "-s", "1,3,32,32", "-o", tmp_path / "o.pt", "--dry-run", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["written"] is False and files_in(tmp_path) == set()
    assert rep["applied"][0]["detail"] == "would be rewritten"
    assert rep["truncate"]["removed"] == ["features.16", "features.17", "features.18"]


def test_head_drop_returns_the_backbone_features():
    original = _mb(5)
    m = copy.deepcopy(original)
    _, report = ms.truncate(m, (2, 3, 32, 32), blocks=2, head="drop")
    t = report.extra["truncate"]
    assert isinstance(m.classifier[1], nn.Identity)
    assert t["head"]["layers"][0]["action"] == "dropped"
    assert t["output_shapes"]["after"] == [[2, 40]]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.flatten(F.adaptive_avg_pool2d(_features_upto(original, 17, x), 1), 1)
        assert torch.equal(m(x), expected)


# -- ResNet: forward calls layer1..layer4 by name -----------------------------------------------


def test_resnet_full_module_auto_stage_fc_rebuilt(ckpts, tmp_path):
    out = tmp_path / "r.pt"
    r = run_cli("truncate", ckpts / "resnet.pt", "--trust-pickle", "--code-path", EXAMPLES, "--blocks", "1",
                "-s", "1,3,64,64", "-o", out, "--json")
    assert r.code == 0, r.err
    t = r.json()["truncate"]
    assert t["stage"] == "" and t["host"] == "" and "the model's forward" in t["reason"]
    # a block is a child with parameters; the parameter-free relu and maxpool ride with bn1
    assert [b["path"] for b in t["blocks"]] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert [w["path"] for w in t["blocks"][1]["with"]] == ["relu", "maxpool"]
    assert t["not_blocks"] == ["avgpool", "fc"]  # the pooling and the classifier it leads to are the head
    assert t["removed"] == ["layer4"] and t["output_channels"] == {"before": 128, "after": 64}
    assert t["head"]["layers"][0]["after"] == "Linear(64→10)"
    original = ms.load(ckpts / "resnet.pt", trust_pickle=True)
    small = torch.load(out, weights_only=False).eval()
    assert isinstance(small.layer4, nn.Identity) and small.fc.in_features == 64
    got = {}
    small.layer3.register_forward_hook(lambda m, a, o: got.__setitem__("small", o))
    original.layer3.register_forward_hook(lambda m, a, o: got.__setitem__("orig", o))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert small(x).shape == (2, 10)
        original(x)
    assert torch.equal(got["small"], got["orig"])


def test_stage_option_picks_an_inner_stage_and_keeps_an_unchanged_head():
    m = randomize(resnet(), 2).eval()
    fc = m.fc
    _, report = ms.truncate(m, (1, 3, 64, 64), blocks=1, stage="layer4")
    t = report.extra["truncate"]
    assert t["stage"] == "layer4" and "--stage" in t["reason"]
    assert isinstance(m.layer4[1], nn.Identity) and not isinstance(m.layer4[0], nn.Identity)
    assert m.fc is fc  # layer4.0 already outputs 128 channels: the head needs no change
    assert t["head"]["unchanged"] is True and t["head"]["layers"] == [] and not report.warnings


# -- refusals -------------------------------------------------------------------------------------


class SkipNet(nn.Module):
    """Blocks called in a loop; an auxiliary head reads the output of blocks.2 (a skip)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        widths = [8, 8, 16, 24, 32]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())
            for cin, cout in zip(widths, widths[1:]))
        self.aux = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 3))
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for b in self.blocks:
            x = b(x)
            feats.append(x)
        return self.head(x.mean((2, 3))) + self.aux(feats[2])


def test_skip_connection_from_a_removed_block_refuses():
    m = randomize(SkipNet()).eval()
    _, report = ms.truncate(copy.deepcopy(m), (1, 3, 8, 8), blocks=1, stage="blocks")
    assert report.extra["truncate"]["head"]["layers"][0]["after"] == "Linear(24→3)"
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ms.BadInput) as e:
        ms.truncate(m, (1, 3, 8, 8), blocks=2, stage="blocks")
    msg = str(e.value)
    assert e.value.code == "other-readers" and "blocks.2" in msg and "aux" in msg  # both named
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # refused before any edit
    assert not any(isinstance(b, nn.Identity) for b in m.blocks)


def test_yolo_routing_into_the_removed_range_refuses(ckpts, tmp_path):
    r = run_cli("truncate", ckpts / "yolov5s-focus.pt", "--trust-pickle", "--code-path", EXAMPLES / "yolo",
                "--blocks", "4", "-s", "1,3,64,64", "-o", tmp_path / "y.pt")
    assert r.code == 2
    assert "model.4" in r.err and "model.9 (Concat)" in r.err
    assert r.err.count("\n") == 1 and "Traceback" not in r.err
    assert files_in(tmp_path) == set()


def test_head_that_is_no_linear_or_conv_refuses_unless_dropped():
    class BNHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Conv2d(16, 32, 3))
            self.norm = nn.BatchNorm1d(32)
            self.fc = nn.Linear(32, 4)

        def forward(self, x):
            return self.fc(self.norm(self.body(x).mean((2, 3))))

    with pytest.raises(ms.BadInput, match=r"norm \(BatchNorm1d\)") as e:  # the layer, named
        ms.truncate(randomize(BNHead()).eval(), (2, 3, 12, 12), blocks=1)
    assert e.value.code == "head-not-rebuildable"
    m = randomize(BNHead()).eval()
    _, report = ms.truncate(m, (2, 3, 12, 12), blocks=1, head="drop")
    assert isinstance(m.norm, nn.Identity) and isinstance(m.fc, nn.Identity)
    assert report.extra["truncate"]["output_shapes"]["after"] == [[2, 16]]


# -- conv heads ---------------------------------------------------------------------------------


class ConvHead(nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1),
                                  nn.Conv2d(16, 32, 3, padding=1))
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Conv2d(32, 8, 3, stride=2, padding=1, groups=groups, bias=False)

    def forward(self, x):
        return self.head(F.relu(self.body(x)))


def test_conv_head_is_rebuilt_with_its_configuration():
    m = randomize(ConvHead()).eval()
    _, report = ms.truncate(m, (1, 3, 8, 8), blocks=1)
    h = m.head
    assert type(h) is nn.Conv2d and h.in_channels == 16 and h.out_channels == 8
    assert h.stride == (2, 2) and h.padding == (1, 1) and h.bias is None
    assert report.extra["truncate"]["output_shapes"]["after"] == [[1, 8, 4, 4]]
    with pytest.raises(ms.BadInput) as e:
        ms.truncate(randomize(ConvHead(groups=4)).eval(), (1, 3, 8, 8), blocks=1)
    assert e.value.code == "head-not-rebuildable" and "head" in str(e.value)


# -- --list -----------------------------------------------------------------------------------


def test_list_json_reports_every_block_and_writes_nothing(ckpts, tmp_path):
    original = ms.load(ckpts / "mobilenetv2.pt", arch="zoo.mobilenetv2:mobilenet_v2")
    r = run_cli("truncate", ckpts / "mobilenetv2.pt", *MB, "--list", "-s", "1,3,32,32", "-o", tmp_path / "o.pt", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["written"] is False and rep["stopped"].startswith("listed the 19 blocks of features")
    assert rep["applied"] == [] and rep["parity"]["checked"] is False
    assert files_in(tmp_path) == set()
    rows = rep["truncate"]["blocks"]
    assert [b["index"] for b in rows] == list(range(19))
    assert [b["path"] for b in rows] == [f"features.{i}" for i in range(19)]
    assert rows[0]["type"] == "ConvBNReLU" and rows[1]["type"] == "InvertedResidual"
    for b in rows:
        assert b["params"] == sum(p.numel() for p in original.features[b["index"]].parameters())
    # the 1x1 conv 80 -> 1280 on a 1x1 map: 2 * 80 * 1280 FLOPs (BatchNorm is not counted)
    assert rows[18]["out_shape"] == [1, 1280, 1, 1] and rows[18]["flops"] == 2 * 80 * 1280
    assert sum(b["flops"] for b in rows) <= rep["before"]["flops"]


def test_list_prints_a_table(ckpts, tmp_path):
    r = run_cli("truncate", ckpts / "resnet.pt", "--trust-pickle", "--code-path", EXAMPLES, "--list",
                "-s", "1,3,32,32", "-o", tmp_path / "o.pt")
    assert r.code == 0, r.err
    assert "Blocks of <model> (6)" in r.out and "layer4" in r.out and "MaxPool2d" in r.out
    assert "nothing written" in r.out and files_in(tmp_path) == set()


# -- bad values -----------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--blocks", "0"], "--blocks 0: must be at least 1"),
    (["--blocks", "-2"], "--blocks -2: must be at least 1"),
    (["--blocks", "19"], "has 19 blocks, so at most 18 can be removed"),
    (["--blocks", "40"], "has 19 blocks, so at most 18 can be removed"),
    (["--blocks", "1", "--after", "features.3"], "mutually exclusive"),
    ([], "needs --blocks N or --after BLOCK"),
    (["--after", "features.18"], "last block of features; nothing to remove"),
    (["--after", "classifier"], "not a block of the stage features"),
    (["--blocks", "1", "--head", "keep"], "choose reinit or drop"),
    (["--blocks", "1", "--stage", "nope"], "no module at that path"),
    (["--blocks", "1", "--stage", "features.1"], "the stage features.1 has one block (features.1.conv), so none"),
    (["--blocks", "1", "--stage", "classifier"], "--stage classifier: its children (classifier.0 … classifier.1) are the head"),
    (["--blocks", "1", "--at", "x"], "ONNX"),
])
def test_bad_values_exit_2_and_write_nothing(ckpts, tmp_path, args, message):
    r = run_cli("truncate", ckpts / "mobilenetv2.pt", *MB, "-s", "1,3,32,32", "-o", tmp_path / "o.pt", *args)
    assert r.code == 2
    assert r.err.startswith("modelsurgeon: error: ") and r.err.count("\n") == 1
    assert message in r.err
    assert files_in(tmp_path) == set()


# -- outputs --------------------------------------------------------------------------------


def test_container_with_model_and_ema_in_fp16_keeps_its_keys(tmp_path):
    m = _mb(7)
    ema = copy.deepcopy(m)
    src = tmp_path / "ckpt.pt"
    torch.save({"model": copy.deepcopy(m).half(), "ema": copy.deepcopy(ema).half(), "epoch": 12}, src)
    out = tmp_path / "small.pt"
    r = run_cli("truncate", src, "--trust-pickle", "--code-path", EXAMPLES, "-n", "2", "-s", "1,3,32,32",
                "-o", out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["parity"]["passed"] and rep["parity"]["max_abs"] == 0.0
    assert [o["name"] for o in rep["parity"]["outputs"]] == ["model: kept prefix features.16", "ema: kept prefix features.16"]
    ck = torch.load(out, weights_only=False)
    assert ck["epoch"] == 12
    for key in ("model", "ema"):
        mod = ck[key]
        assert isinstance(mod.features[17], nn.Identity) and mod.classifier[1].in_features == 40
        assert mod.classifier[1].weight.dtype == torch.float16  # stored like the rest of the model
    # same fresh initialisation in both slots: the pair stays consistent
    assert torch.equal(ck["model"].classifier[1].weight, ck["ema"].classifier[1].weight)


def test_safetensors_and_onnx_outputs(ckpts, tmp_path):
    import onnx
    import onnxruntime as ort

    st = tmp_path / "small.safetensors"
    r = run_cli("truncate", ckpts / "mobilenetv2.safetensors", *MB, "-n", "2", "-s", "1,3,32,32", "-o", st, "-q")
    assert r.code == 0, r.err
    small = ms.load(st, arch="zoo.mobilenetv2:mobilenet_v2").eval()  # + the recipe recorded in the file
    assert isinstance(small.features[18], nn.Identity) and small.classifier[1].in_features == 40
    original = ms.load(ckpts / "mobilenetv2.safetensors", arch="zoo.mobilenetv2:mobilenet_v2").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(small.features(x), _features_upto(original, 17, x))

    out = tmp_path / "small.onnx"
    r = run_cli("truncate", ckpts / "mobilenetv2.pt", *MB, "-n", "2", "-s", "1,3,32,32", "-o", out, "--json",
                "--trials", "2")
    assert r.code == 0, r.err
    rep = r.json()
    onnx_rows = [o for o in rep["parity"]["outputs"] if o["name"].startswith("onnx:")]
    assert onnx_rows and all(o["passed"] for o in onnx_rows)
    assert "rewritten torch model" in rep["parity"]["note"]
    onnx.checker.check_model(onnx.load(str(out)))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    assert y.shape == (1, 10)
    assert json.loads(json.dumps(rep["truncate"]))["output_channels"]["after"] == 40


# -- where the stage ends and the head begins (QA: the classifier was counted as a block) ---------


def _cbr(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class VGGBN(nn.Sequential):
    """A plain Sequential from the first conv to the logits, torchvision's vgg*_bn layout."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),       # 0-3
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),                      # 4-6
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),    # 7-10
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),                     # 11-13
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.1), nn.Linear(32, 10))          # 14-17


def _prefix(seq, n, x):
    with torch.no_grad():
        for m in list(seq)[:n]:
            x = m(x)
    return x


def test_plain_sequential_keeps_its_classifier_and_counts_only_layers_with_parameters():
    original = randomize(VGGBN(), 21).eval()
    m = copy.deepcopy(original)
    t = ms.truncate(m, (2, 3, 16, 16), list_blocks=True)[1].extra["truncate"]
    assert t["stage"] == ""
    # a block is a child with parameters, the parameter-free ones after it ride along
    assert [b["path"] for b in t["blocks"]] == ["0", "1", "4", "5", "7", "8", "11", "12"]
    assert [[w["path"] for w in b["with"]] for b in t["blocks"]] == [[], ["2", "3"], [], ["6"], [], ["9", "10"], [], []]
    assert [b["type"] for b in t["blocks"]][:2] == ["Conv2d", "BatchNorm2d"]
    # the trailing relu, pooling, flatten, dropout and the Linear they lead to are the head
    assert t["not_blocks"] == ["13", "14", "15", "16", "17"]

    _, report = ms.truncate(m, (2, 3, 16, 16), blocks=1)
    t = report.extra["truncate"]
    assert t["removed"] == ["12"] and t["removed_modules"] == ["12"] and t["last_kept"] == "11"
    assert isinstance(m[12], nn.Identity) and type(m[11]) is nn.Conv2d and type(m[13]) is nn.ReLU
    assert type(m[17]) is nn.Linear and m[17].in_features == 32  # same width: the classifier is kept
    assert t["head"]["unchanged"] is True and t["output_shapes"] == {"before": [[2, 10]], "after": [[2, 10]]}

    m = copy.deepcopy(original)
    _, report = ms.truncate(m, (2, 3, 16, 16), blocks=3)  # 7, 8 (+9, 10), 11, 12 go: bn 5 (+relu 6) is last
    t = report.extra["truncate"]
    assert t["removed"] == ["8", "11", "12"] and t["last_kept"] == "7"
    assert t["removed_modules"] == ["8", "9", "10", "11", "12"]
    assert all(isinstance(m[i], nn.Identity) for i in range(8, 13))
    assert not any(isinstance(m[i], nn.Identity) for i in (*range(8), *range(13, 18)))
    (layer,) = t["head"]["layers"]
    assert layer["path"] == "17" and layer["after"] == "Linear(16→10)" and layer["reinitialised"]
    assert any("17 was rebuilt" in w for w in report.warnings)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(_prefix(m, 8, x), _prefix(original, 8, x))  # conv 7 kept, its BN gone
        assert m(x).shape == (3, 10)
        expected = m[17](torch.flatten(F.adaptive_avg_pool2d(F.relu(_prefix(original, 8, x)), 1), 1))
        assert torch.equal(m(x), expected)


class FeaturesClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 8, 2), _cbr(8, 16, 2), _cbr(16, 24, 2))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(24, 5))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_stage_naming_the_model_or_the_classifier_never_cuts_the_head(tmp_path):
    m = randomize(FeaturesClassifier(), 8).eval()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ms.BadInput) as e:  # <model> = [features] + its head [classifier]
        ms.truncate(m, (1, 3, 16, 16), blocks=1, stage="")
    assert "the stage <model> has one block (features; classifier is its head), so none can be removed" in str(e.value)
    with pytest.raises(ms.BadInput) as e:
        ms.truncate(m, (1, 3, 16, 16), blocks=1, stage="classifier")
    # the API names the parameter (the CLI the flag: test_bad_values_exit_2_and_write_nothing)
    assert e.value.option == "stage"
    assert str(e.value).startswith("stage='classifier': its children (classifier.0 … classifier.3) are the head")
    assert "stages found: features (3 blocks)" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not any(isinstance(x, nn.Identity) for x in m.modules())
    # the CLI: exit 2, one line, nothing written
    src = tmp_path / "fc.pt"
    torch.save(m, src)
    r = run_cli("truncate", src, "--trust-pickle", "--stage", "classifier", "-n", "1", "-s", "1,3,16,16",
                "-o", tmp_path / "o.pt")
    assert r.code == 2 and r.err.count("\n") == 1 and "are the head" in r.err
    assert files_in(tmp_path) == {"fc.pt"}
    # what is meant: the last block of features, the Linear rebuilt
    _, report = ms.truncate(m, (1, 3, 16, 16), blocks=1)
    assert report.extra["truncate"]["removed"] == ["features.2"] and m.classifier[3].in_features == 16


class HeadInBlock(nn.Module):
    """The classifier sits inside the last block, behind a BatchNorm: the block is a block."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.norm(x).mean((2, 3)))


def test_cut_that_removes_the_output_layer_refuses_under_reinit():
    original = randomize(nn.Sequential(_cbr(3, 8, 2), _cbr(8, 16, 2), HeadInBlock()), 3).eval()
    m = copy.deepcopy(original)
    t = ms.truncate(m, (2, 3, 16, 16), list_blocks=True)[1].extra["truncate"]
    assert [b["path"] for b in t["blocks"]] == ["0", "1", "2"] and "not_blocks" not in t
    with pytest.raises(ms.BadInput) as e:
        ms.truncate(m, (2, 3, 16, 16), blocks=1)
    msg = str(e.value)
    assert e.value.code == "model-output" and "2.fc" in msg
    assert not any(isinstance(x, nn.Identity) for x in m.modules())
    # asked for on purpose: the features of the last kept block
    _, report = ms.truncate(m, (2, 3, 16, 16), blocks=1, head="drop")
    assert isinstance(m[2], nn.Identity)
    assert report.extra["truncate"]["output_shapes"]["after"] == [[2, 16, 4, 4]]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(m(x), original[1](original[0](x)))


# -- a chain stays inside its container (QA: FPN laterals called inside the backbone loop) --------


class InlineFPN(nn.Module):
    def __init__(self):
        super().__init__()
        widths = [3, 8, 8, 16, 16, 24, 24, 32, 32]
        self.features = nn.Sequential(*[_cbr(a, b, 2 if b != a and i in (0, 2, 4) else 1)
                                        for i, (a, b) in enumerate(zip(widths, widths[1:]))])
        self.lat3 = nn.Conv2d(16, 8, 1)
        self.lat6 = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        outs = []
        for i, m in enumerate(self.features):
            x = m(x)
            if i == 3:
                outs.append(self.lat3(x))
            if i == 6:
                outs.append(self.lat6(x))
        return outs[0], outs[1], x


def test_backbone_loop_feeding_laterals_inline_is_one_stage_of_all_its_blocks():
    original = randomize(InlineFPN(), 12).eval()
    m = copy.deepcopy(original)
    _, report = ms.truncate(m, (2, 3, 32, 32), blocks=1)
    t = report.extra["truncate"]
    assert t["stage"] == "features" and "found automatically" in t["reason"]
    assert [b["path"] for b in t["blocks"]] == [f"features.{i}" for i in range(8)]
    assert t["removed"] == ["features.7"] and t["head"]["unchanged"] is True
    assert isinstance(m.features[7], nn.Identity)
    assert not any(isinstance(x, nn.Identity) for x in list(m.features)[:7])
    assert type(m.lat3) is nn.Conv2d and type(m.lat6) is nn.Conv2d and m.features[4][0].in_channels == 16
    assert torch.equal(m.lat3.weight, original.lat3.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, ref = m(x), original(x)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert torch.equal(got[2], _prefix(original.features, 7, x))
    # two blocks: features.6 feeds lat6 -> refused, by the automatic choice and by --stage
    for stage in (None, "features"):
        m = copy.deepcopy(original)
        with pytest.raises(ms.BadInput) as e:
            ms.truncate(m, (2, 3, 32, 32), blocks=2, stage=stage)
        msg = str(e.value)
        assert e.value.code == "other-readers" and "features.6" in msg and "lat6" in msg
        assert not any(isinstance(x, nn.Identity) for x in m.modules())
    t = ms.truncate(copy.deepcopy(original), (2, 3, 32, 32), list_blocks=True, stage="features")[1].extra["truncate"]
    assert len(t["blocks"]) == 8 and "chosen with --stage" in t["reason"]


class SplitLoop(nn.Module):
    """The host transforms x between features.3 and features.4: features is not one chain."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 8, 2), _cbr(8, 8), _cbr(8, 16), _cbr(16, 16),
                                      _cbr(16, 16), _cbr(16, 24), _cbr(24, 24), _cbr(24, 24))
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        for i, m in enumerate(self.features):
            x = m(x)
            if i == 3:
                x = x * 2.0
        return self.fc(x.mean((2, 3)))


def test_stage_option_takes_all_of_the_containers_children_and_cuts_only_at_its_end():
    m = randomize(SplitLoop(), 6).eval()
    with pytest.raises(ms.BadInput) as e:
        ms.truncate(m, (1, 3, 16, 16), blocks=1, stage="features")
    assert e.value.option == "stage"
    assert ("stage='features': its blocks are not called one after another on the input→output path, each "
            "reading the previous one's output: features.4 (Sequential) does not take features.3's output as its "
            "first input, so features is not one chain of blocks that can be cut at its end") in str(e.value)
    # the first run, features.0 … features.3, may not be cut: the rest of features reads its output
    with pytest.raises(ms.BadInput) as e:
        ms.truncate(m, (1, 3, 16, 16), after="features.2")
    assert e.value.code == "mid-stage" and "features.4" in str(e.value)
    assert not any(isinstance(x, nn.Identity) for x in m.modules())
    # the last run ends where features ends: cut there, the head rebuilt
    _, report = ms.truncate(m, (1, 3, 16, 16), after="features.5")
    t = report.extra["truncate"]
    assert [b["path"] for b in t["blocks"]] == [f"features.{i}" for i in range(4, 8)]
    assert "the run features.4 … features.7" in t["reason"]
    assert t["removed"] == ["features.6", "features.7"] and m.fc.in_features == 24


# -- a backbone called through slices (QA: 199% of the FLOPs, <unregistered Sequential> blocks) ---


class SliceNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 8, 2), _cbr(8, 8), _cbr(8, 16, 2), _cbr(16, 16),
                                      _cbr(16, 24, 2), _cbr(24, 24), _cbr(24, 32), _cbr(32, 32))
        self.p3 = nn.Conv2d(16, 4, 1)
        self.p5 = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        c3 = self.features[:4](x)
        c5 = self.features[4:](c3)
        return self.p3(c3), self.p5(c5)


def test_backbone_called_through_slices_is_the_container_with_every_block(tmp_path):
    original = randomize(SliceNet(), 9).eval()
    m = copy.deepcopy(original)
    t = ms.truncate(m, (1, 3, 32, 32), list_blocks=True)[1].extra["truncate"]
    assert t["stage"] == "features" and [b["path"] for b in t["blocks"]] == [f"features.{i}" for i in range(8)]
    assert "through slices of features (features[0:4], features[4:8]) by the model's forward" in t["reason"]
    # FLOPs: each block counted once; the two 1x1 heads are the rest
    heads = 2 * 16 * 4 * 8 * 8 + 2 * 32 * 4 * 4 * 4
    assert sum(b["flops"] for b in t["blocks"]) + heads == t["flops"]["before"]
    share = t["candidates"][0]["share"]
    assert t["candidates"][0]["stage"] == "features" and 0.9 < share < 1
    assert f"carrying {share:.0%} of the model's FLOPs" in t["reason"]
    # one block: same width, the head stays
    _, report = ms.truncate(m, (1, 3, 32, 32), blocks=1)
    assert report.extra["truncate"]["removed"] == ["features.7"] and isinstance(m.features[7], nn.Identity)
    assert m.p5.in_channels == 32 and report.extra["truncate"]["head"]["unchanged"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x)[0], original(x)[0])
        assert torch.equal(m(x)[1], original.p5(_prefix(original.features, 7, x)))
    # four blocks, through the CLI: p5 rebuilt for features.3's 16 channels, p3 untouched
    src = tmp_path / "slices.pt"
    torch.save(original, src)
    out = tmp_path / "small.pt"
    r = run_cli("truncate", src, "--trust-pickle", "-n", "4", "-s", "1,3,32,32", "-o", out, "--json")
    assert r.code == 0, r.err
    t = r.json()["truncate"]
    assert t["removed"] == ["features.4", "features.5", "features.6", "features.7"]
    assert [l["path"] for l in t["head"]["layers"]] == ["p5"] and t["head"]["layers"][0]["after"] == "Conv2d(16→4, 1x1)"
    small = torch.load(out, weights_only=False).eval()
    assert all(isinstance(small.features[i], nn.Identity) for i in range(4, 8))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a3, a5 = small(x)
        r3, _ = original(x)
        assert torch.equal(a3, r3) and a5.shape == (2, 4, 8, 8)
        assert torch.equal(a5, small.p5(_prefix(original.features, 4, x)))


def test_cut_that_changes_the_feature_size_a_neck_needs_exits_2(tmp_path):
    """BiFPN upsamples c5's output and adds it to c4's: removing c5 leaves c4's output (twice
    the size) in its place, so the neck cannot run. The cut is refused with the size change,
    not reported as a parity failure of a rewrite that was made."""
    from zoo.bifpn import bifpn

    src = tmp_path / "bifpn.pt"
    torch.save(randomize(bifpn(), seed=3), src)
    before = src.read_bytes()
    r = run_cli("truncate", src, "--trust-pickle", "--code-path", EXAMPLES, "-n", "1", "-s", "1,3,64,64",
                "-o", tmp_path / "o.pt")
    assert r.code == 2, r.err
    assert r.err.count("\n") == 1 and "cannot truncate <model> after c4: the truncated model fails" in r.err
    assert "from 1×256×4×4 to 1×128×8×8" in r.err
    assert files_in(tmp_path) == {"bifpn.pt"} and src.read_bytes() == before
