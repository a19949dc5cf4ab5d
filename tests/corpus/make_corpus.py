"""Write the bad-input corpus (tests/corpus/*): small, deterministic, committed.

    python tests/corpus/make_corpus.py

Every file is something a pipeline may really be handed -- an empty or interrupted download, an
HTML error page saved as ``.pt``, a damaged safetensors header, a state_dict from another
version of the model, weights or statistics that went bad. ``tests/test_bad_inputs.py`` runs the
CLI on each and expects one error line, exit 2, nothing written, the file unchanged. Files are
regenerated bit-for-bit by this script (fixed seeds) with the torch version that wrote them.
"""

from __future__ import annotations

import json
import random
import struct
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tinynet import tiny  # noqa: E402


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = tiny()
    with torch.no_grad():  # random statistics, as in every test
        bn = m[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.normal_(1.0, 0.3)
        bn.bias.normal_()
    return m


def _state(**changes) -> dict:
    sd = {k: v.clone() for k, v in _model().state_dict().items()}
    for key, fn in changes.items():
        fn(sd)
    return sd


def _safetensors(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def build(out: Path = HERE) -> list[Path]:
    rng = random.Random(8)
    files: dict[str, bytes | dict] = {}
    files["empty.pt"] = b""
    files["random-bytes.pt"] = bytes(rng.getrandbits(8) for _ in range(4096))
    files["text.pt"] = b"model weights: see https://example.com/weights\n" * 4
    files["page.pt"] = (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
                        b"<body><h1>Not Found</h1><p>The requested URL was not found.</p></body></html>\n")
    files["nan-weights.pt"] = _state(nan=lambda sd: sd["0.weight"].view(-1)[5].fill_(float("nan")))
    files["inf-weights.pt"] = _state(inf=lambda sd: sd["3.bias"].fill_(float("inf")))
    files["negative-variance.pt"] = _state(neg=lambda sd: sd["1.running_var"].__setitem__(1, -0.25))
    files["zero-variance.pt"] = _state(zero=lambda sd: sd["1.running_var"].__setitem__(2, 0.0))
    files["missing-keys.pt"] = _state(drop=lambda sd: [sd.pop(k) for k in ("3.weight", "3.bias")])
    files["unexpected-keys.pt"] = _state(add=lambda sd: sd.update({"4.weight": torch.ones(2), "head.bias": torch.zeros(2)}))
    files["misshaped-keys.pt"] = _state(shape=lambda sd: sd.update({"3.weight": torch.ones(3, 4, 1, 1), "3.bias": torch.ones(3)}))
    for name, obj in list(files.items()):
        if isinstance(obj, dict):
            p = out / name
            torch.save(obj, p)
            files[name] = p.read_bytes()
    good = _state()
    torch.save(good, out / "_good.pt")
    good_bytes = (out / "_good.pt").read_bytes()
    (out / "_good.pt").unlink()
    files["truncated-zip.pt"] = good_bytes[: len(good_bytes) // 2]
    files["truncated-zip-tail.pt"] = good_bytes[:-40]  # only the end of the central directory lost
    files["garbage.onnx"] = bytes(rng.getrandbits(8) for _ in range(2048))
    files["page.onnx"] = files["page.pt"]
    w = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
    files["header-too-long.safetensors"] = struct.pack("<Q", 10**12) + b'{"w":{}}' + w
    files["header-not-json.safetensors"] = _safetensors(b"this is not a json header!", w)
    files["header-bad-offsets.safetensors"] = _safetensors(
        json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]}}).encode(), w)
    files["header-truncated.safetensors"] = _safetensors(
        json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode(), w)[:20]
    written = []
    for name, data in sorted(files.items()):
        p = out / name
        p.write_bytes(data)
        written.append(p)
    return written


if __name__ == "__main__":
    for p in build():
        print(f"{p.name:34s} {p.stat().st_size:6d} bytes")
