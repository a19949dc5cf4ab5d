"""Safe loading: nothing from a file runs code unless the user said ``--trust-pickle``.

Every payload here would create a marker file if it ran. Without trust: exit 2, one line naming
what the file wanted to import, no marker. With trust, the same payload does run (run in a
subprocess) -- which proves the payloads are real.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import modelsurgeon as ms
from conftest import files_in, run_cli, run_console
from modelsurgeon.errors import BadInput, UnsafeCheckpoint
from modelsurgeon.read import load_checkpoint


class Payload:
    """Unpickling this calls ``os.system("touch <marker>")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state_dict_with_hidden_payload(marker: Path) -> OrderedDict:
    sd = OrderedDict(w=torch.ones(2))
    sd._metadata = OrderedDict({"": {"version": 1, "x": Payload(marker)}})
    return sd


WRITERS = {
    "zip": lambda p, m: torch.save({"model": Payload(m)}, p),
    "legacy": lambda p, m: torch.save({"model": Payload(m)}, p, _use_new_zipfile_serialization=False),
    "raw-pickle-protocol-0": lambda p, m: p.write_bytes(pickle.dumps(Payload(m), protocol=0)),
    "raw-pickle-protocol-2": lambda p, m: p.write_bytes(pickle.dumps(Payload(m), protocol=2)),
    "raw-pickle-protocol-5": lambda p, m: p.write_bytes(pickle.dumps({"a": [Payload(m)]}, protocol=5)),
    "nested-in-a-dict": lambda p, m: torch.save({"epoch": 3, "opt": {"hooks": [1, {"cb": Payload(m)}]},
                                                "state_dict": {"w": torch.ones(1)}}, p),
    "state-dict-_metadata": lambda p, m: torch.save(_state_dict_with_hidden_payload(m), p),
    "state-dict-_metadata-legacy": lambda p, m: torch.save(_state_dict_with_hidden_payload(m), p,
                                                           _use_new_zipfile_serialization=False),
}


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_payload_is_never_run_without_trust(tmp_path, kind):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    WRITERS[kind](p, marker)
    data = p.read_bytes()
    with pytest.raises(UnsafeCheckpoint) as e:
        load_checkpoint(p)
    assert e.value.code == "unsafe-checkpoint" and "system" in str(e.value)  # the callable, named
    before = files_in(tmp_path)
    r = run_cli("fold-bn", p, "-s", "1,3,8,8", "-o", tmp_path / "out.pt")
    assert r.code == 2 and r.err.count("\n") == 1 and r.err.startswith("modelsurgeon: error: ")
    assert "system" in r.err and "--trust-pickle" in r.err
    assert not marker.exists() and files_in(tmp_path) == before and p.read_bytes() == data


@pytest.mark.parametrize("kind", ["zip", "legacy", "state-dict-_metadata"])
def test_payload_is_never_run_via_console_script(tmp_path, kind):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    WRITERS[kind](p, marker)
    r = run_console("fold-bn", p, "-o", tmp_path / "out.pt")
    assert r.code == 2 and "--trust-pickle" in r.err and r.err.count("\n") == 1
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["zip", "legacy", "raw-pickle-protocol-2"])
def test_the_payloads_are_real(tmp_path, kind):
    """With --trust-pickle the payload runs: the refusal above is what kept it from running."""
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    WRITERS[kind](p, marker)
    r = run_console("fold-bn", p, "--trust-pickle", "-o", tmp_path / "out.pt")
    assert marker.exists()
    assert r.code == 2  # and the result is no model: a clear line, nothing written
    assert not (tmp_path / "out.pt").exists()


def test_untrusted_loading_only_ever_calls_the_weights_only_unpickler(tmp_path, monkeypatch):
    """Without trust, torch.load is only ever called with weights_only=True, and no pickle
    Unpickler is built; the refusal's list of globals comes from reading opcodes."""
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pt"
    WRITERS["legacy"](p, marker)
    q = tmp_path / "evil2.pt"
    WRITERS["state-dict-_metadata"](q, marker)
    calls = []
    real_load = torch.load

    def spy_load(*a, **k):
        calls.append(k.get("weights_only"))
        return real_load(*a, **k)

    class NoUnpickler(pickle.Unpickler):
        def __init__(self, *a, **k):
            raise AssertionError("a full Unpickler was built on an untrusted file")

    monkeypatch.setattr(torch, "load", spy_load)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    for f in (p, q):
        with pytest.raises(UnsafeCheckpoint):
            load_checkpoint(f)
    assert calls and all(c is True for c in calls)
    assert not marker.exists()


# -- code a weights-only file names ----------------------------------------------------------


def _folded_state_dict_file(tmp_path, fmt: str, arch: str, kwargs: dict, recipe=None) -> Path:
    """A state_dict / safetensors file carrying modelsurgeon metadata that names ``arch``."""
    meta = {"format_version": 1, "tool": "modelsurgeon", "arch": arch, "arch_kwargs": kwargs,
            "recipe": recipe or [], "slot": "model", "source": "x.pt", "source_format": "state_dict"}
    sd = {"0.weight": torch.ones(2, 3, 3, 3)}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        p = tmp_path / "weights.safetensors"
        save_file(sd, str(p), metadata={"modelsurgeon": json.dumps(meta)})
    else:
        p = tmp_path / "weights.pt"
        torch.save({"state_dict": sd, "modelsurgeon": meta}, p)
    return p


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_weights_only_file_cannot_name_code_to_run(tmp_path, fmt):
    """The factory recorded in a modelsurgeon-written file is imported and called only with
    --arch (the user names it) or --trust-pickle: otherwise a safetensors file could run
    ``subprocess.run(args=[...])``."""
    marker = tmp_path / "pwned"
    p = _folded_state_dict_file(tmp_path, fmt, "subprocess:run", {"args": ["touch", str(marker)]})
    r = run_cli("fold-bn", p, "-s", "1,3,8,8", "-o", tmp_path / "o.pt")
    assert r.code == 2 and r.err.count("\n") == 1 and "--arch subprocess:run" in r.err
    assert not marker.exists()
    with pytest.raises(BadInput):
        ms.load(p)
    assert not marker.exists()


def test_a_recipe_only_builds_torch_nn_classes(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "corpus"))
    recipe = [{"op": "replace", "path": "0", "module": {"class": "system", "kwargs": {"command": "touch x"}}}]
    p = _folded_state_dict_file(tmp_path, "safetensors", "tinynet:tiny", {}, recipe)
    r = run_cli("fold-bn", p, "--arch", "tinynet:tiny", "--code-path", Path(__file__).parent / "corpus",
                "-o", tmp_path / "o.pt")
    assert r.code == 2 and "unknown torch.nn class: 'system'" in r.err and r.err.count("\n") == 1


# -- ONNX external data ------------------------------------------------------------------------

ONNX_LOADER = importlib.util.find_spec("modelsurgeon.read.onnx") is not None


def _onnx_with_external_data(d: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import numpy as np

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    p = d / "model.onnx"
    onnx.save(model, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin",
              size_threshold=0)
    return p


def _relocate(p: Path, location: str) -> None:
    import onnx

    m = onnx.load(str(p), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(p))


@pytest.mark.skipif(not ONNX_LOADER, reason="no ONNX loader on this branch (modelsurgeon.read.onnx)")
@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink"])
def test_onnx_external_data_outside_the_model_directory_is_refused(tmp_path, escape):
    """The weights exist and are valid where the location points: following it would work,
    so only the refusal keeps the file from reading outside its directory."""
    inner = tmp_path / "models"
    inner.mkdir()
    p = _onnx_with_external_data(inner)
    outside = tmp_path / "secret.bin"
    (inner / "weights.bin").rename(outside)
    if escape == "parent":
        _relocate(p, "../secret.bin")
    elif escape == "absolute":
        _relocate(p, str(outside))
    else:
        (inner / "weights.bin").symlink_to(outside)
    out = tmp_path / "out"
    out.mkdir()
    r = run_cli("fold-bn", p, "-o", out / "o.onnx")
    assert r.code == 2 and r.err.count("\n") == 1 and r.err.startswith("modelsurgeon: error: "), r.err
    assert "external data" in r.err and "Traceback" not in r.err
    assert files_in(out) == set()


def test_onnx_with_external_data_inside_its_directory_is_not_refused_as_an_escape(tmp_path):
    """The control case for the test above: the same model, its data next to it."""
    p = _onnx_with_external_data(tmp_path)
    r = run_cli("fold-bn", p, "-o", tmp_path / "o.onnx")
    assert "outside" not in r.err
