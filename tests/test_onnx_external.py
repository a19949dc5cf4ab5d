"""ONNX files whose weights are external data, as exporters write them by default.

torch 2.13's ``torch.onnx.export(m, x, "m.onnx")`` (the dynamo exporter, ``external_data=True``)
writes every initializer but the tiniest into ``m.onnx.data`` at dense offsets, biases
included; ``onnx.save(..., save_as_external_data=True)`` writes tensors of 1 KiB and more to
one file named by a uuid. Both used to crash the writer (``BufferError: cannot close exported
pointers exist``): it closed the memory maps of the input's small external tensors while
arrays the passes had read from them were still alive.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from conftest import files_in, run_cli
from onnx_graphs import assert_same_function, ops


def _detector_backbone() -> nn.Module:
    """~5 MB of weights: a conv -> BN -> ReLU, a conv with no BN after it (its 1 KiB bias stays
    external, is read by the matcher and never rewritten), a conv -> BN and a linear."""
    torch.manual_seed(3)
    m = nn.Sequential(
        nn.Conv2d(3, 256, 3), nn.BatchNorm2d(256), nn.ReLU(),
        nn.Conv2d(256, 256, 3), nn.ReLU(),
        nn.Conv2d(256, 256, 3), nn.BatchNorm2d(256),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10),
    )
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 2)
            mod.bias.data.uniform_(-1, 1)
    return m.eval()


def _export(d: Path) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_detector_backbone(), (torch.randn(1, 3, 24, 24),), str(d / "plain.onnx"), dynamo=False,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE,
                          input_names=["images"])
    return onnx.load(str(d / "plain.onnx"))


def _exporter_layout(d: Path) -> Path:
    """As the default exporter writes it: ``m.onnx`` + ``m.onnx.data``, the tensors external at
    dense offsets (1 KiB biases and BN vectors too)."""
    proto = _export(d)
    onnx.save(proto, str(d / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    return d / "m.onnx"


def _onnx_save_default(d: Path) -> Path:
    """``onnx.save(model, path, save_as_external_data=True)`` with every default."""
    proto = _export(d)
    onnx.save(proto, str(d / "m.onnx"), save_as_external_data=True)
    return d / "m.onnx"


LAYOUTS = {"exporter": _exporter_layout, "onnx.save": _onnx_save_default}


def _external(path: Path) -> list[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("command", ["fold-bn", "optimize"])
def test_external_data_input_is_rewritten_to_a_new_file(tmp_path, layout, command):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = LAYOUTS[layout](src_dir)
    assert len(_external(src)) >= 4 and "BatchNormalization" in ops(src)
    before = {p.name: p.read_bytes() for p in src_dir.iterdir()}
    dst = tmp_path / "out.onnx"
    r = run_cli(command, src, "-o", dst, "--json")
    assert r.code == 0, r.err
    assert r.json()["written"] is True
    assert "BatchNormalization" not in ops(dst)
    assert files_in(tmp_path) == {"src", "out.onnx", "out.onnx.data"}
    assert _external(dst), "an external-data input is written with external data"
    assert {p.name: p.read_bytes() for p in src_dir.iterdir()} == before  # input untouched
    assert_same_function(src, dst, batch=1)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_external_data_in_place(tmp_path, layout):
    src = LAYOUTS[layout](tmp_path)
    reference = tmp_path.parent / f"{tmp_path.name}-reference"
    reference.mkdir()
    for p in tmp_path.iterdir():  # a copy of the original, to compare the result with
        (reference / p.name).write_bytes(p.read_bytes())
    r = run_cli("fold-bn", src, "--in-place", "--json")
    assert r.code == 0, r.err
    assert "BatchNormalization" not in ops(src)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary left behind"
    assert (tmp_path / "m.onnx.data").exists()
    assert_same_function(reference / "m.onnx", src, batch=1)
    # the rewritten file reads again (its data file was replaced under the first run's maps)
    again = run_cli("fold-bn", src, "-o", tmp_path / "again.onnx", "--json")
    assert again.code == 0, again.err
    assert again.json()["passes"][0]["applied"] == 0


def test_written_external_data_matches_onnxruntime_of_the_input(tmp_path):
    """The bytes moved, not just the layout: every external tensor that was not rewritten is the
    same array in the output as in the input."""
    src = _exporter_layout(tmp_path)
    dst = tmp_path / "out.onnx"
    r = run_cli("fold-bn", src, "-o", dst, "--json")
    assert r.code == 0, r.err
    a = {t.name: onnx.numpy_helper.to_array(t, base_dir=str(tmp_path)) for t in onnx.load(str(src)).graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t, base_dir=str(tmp_path)) for t in onnx.load(str(dst)).graph.initializer}
    kept = [n for n in a if n in b and n.startswith(("3.", "9."))]  # the conv without BN, the linear
    assert len(kept) >= 3
    for n in kept:
        np.testing.assert_array_equal(a[n], b[n])
