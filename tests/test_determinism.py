"""The same input and options give byte-identical output (CI caches depend on it), whatever the
output's name, the working directory, the Python hash seed or the process; several runs at
once on one input all succeed and agree -- also when they write the same output path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import torch

from conftest import EXAMPLES, run_cli

CORPUS = Path(__file__).resolve().parent / "corpus"

EXE = Path(sys.executable).with_name("modelsurgeon")

CASES = {  # name -> (input file in the example checkpoints, options)
    "module-to-pt": ("caffenet.pt", ["--trust-pickle", "--code-path", str(EXAMPLES), "-s", "1,3,16,16"], ".pt"),
    "module-to-safetensors": ("resnet.pt", ["--trust-pickle", "--code-path", str(EXAMPLES), "-s", "1,3,32,32"],
                              ".safetensors"),
    "module-to-onnx": ("resnet.pt", ["--trust-pickle", "--code-path", str(EXAMPLES), "-s", "1,3,32,32"], ".onnx"),
    "yolo-dict-to-pt": ("yolov5s-focus.pt", ["--trust-pickle", "--code-path", str(EXAMPLES / "yolo"),
                                             "-s", "1,3,64,64"], ".pt"),
    "state-dict-to-pt": ("tiny.pt", ["--arch", "tinynet:tiny", "--code-path", str(CORPUS), "-s", "1,3,16,16"], ".pt"),
    "safetensors-to-safetensors": ("tiny.safetensors", ["--arch", "tinynet:tiny", "--code-path", str(CORPUS),
                                                        "-s", "1,3,16,16"], ".safetensors"),
    "darknet-to-weights": ("yolov3-tiny.weights", [], ".weights"),
    "darknet-to-onnx": ("yolov3-tiny.weights", [], ".onnx"),
    "caffe-to-caffemodel": ("resnet-deploy.caffemodel", [], ".caffemodel"),
}


@pytest.fixture(scope="module")
def inputs(ckpts, tmp_path_factory) -> Path:
    """The example checkpoints, plus a tiny state_dict / safetensors pair (random BN stats)."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(CORPUS))
    from make_corpus import _model

    d = tmp_path_factory.mktemp("inputs")
    for f in ckpts.iterdir():
        (d / f.name).symlink_to(f)
    sd = _model(3).state_dict()
    torch.save(sd, d / "tiny.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "tiny.safetensors"))
    return d


def _console(args, cwd: Path, hash_seed: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_input_and_options_give_identical_bytes(inputs, tmp_path, case):
    src, opts, ext = CASES[case]
    a = tmp_path / f"first{ext}"
    r = run_cli("fold-bn", inputs / src, *opts, "-o", a, "-q")
    assert r.code == 0, r.err
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    b = elsewhere / f"a-different-name{ext}"
    p = _console(["fold-bn", inputs / src, *opts, "-o", b, "-q"], cwd=elsewhere, hash_seed="4242")
    assert p.returncode == 0, p.stderr
    assert a.read_bytes() == b.read_bytes()


def _parallel(cmds: list[list], cwd: Path) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen([str(EXE), *map(str, c)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=cwd, env=dict(os.environ, PYTHONHASHSEED=str(i)))
             for i, c in enumerate(cmds)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.mark.parametrize("case", ["safetensors-to-safetensors"])
def test_concurrent_runs_on_one_input_agree(inputs, tmp_path, case):
    src, opts, ext = CASES[case]
    outs = [tmp_path / f"out{i}{ext}" for i in range(3)]
    results = _parallel([["fold-bn", inputs / src, *opts, "-o", o, "-q"] for o in outs], tmp_path)
    assert [r.returncode for r in results] == [0] * 3, [r.stderr for r in results]
    data = {o.read_bytes() for o in outs}
    assert len(data) == 1
    single = tmp_path / f"single{ext}"
    assert run_cli("fold-bn", inputs / src, *opts, "-o", single, "-q").code == 0
    assert data == {single.read_bytes()}


def test_concurrent_runs_writing_the_same_output(inputs, tmp_path):
    src, opts, ext = CASES["state-dict-to-pt"]
    out = tmp_path / f"shared{ext}"
    results = _parallel([["fold-bn", inputs / src, *opts, "-o", out, "-q"]] * 3, tmp_path)
    assert [r.returncode for r in results] == [0] * 3, [r.stderr for r in results]
    single = tmp_path / f"single{ext}"
    assert run_cli("fold-bn", inputs / src, *opts, "-o", single, "-q").code == 0
    assert out.read_bytes() == single.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, single.name])  # no temporary file left
