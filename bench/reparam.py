"""Latency before and after ``reparam`` on RepVGG- and MobileOne-style models.

    python -m bench.reparam            # RepVGG-A0- and MobileOne-S0-like at 224×224
    python -m bench.reparam --smoke    # small models, a short timing (no figures worth keeping)

For each model (the training-form blocks of ``tests/reparam_models.py``, random BatchNorm
statistics): torch eager latency of the training form and of what ``ms.optimize`` makes of it
(one conv per block), and onnxruntime latency (default optimisations, 1 intra-op thread) of the
training form exported as is and of ``modelsurgeon optimize`` run on that ONNX file. Medians
of alternating runs. Writes ``<out>/reparam_results.json`` and, unless ``--no-docs``, the
"reparam" section of ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .sections import write_section

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## reparam: latency before and after"


def _models(smoke: bool):
    sys.path.insert(0, str(ROOT / "tests"))
    import reparam_models as R

    if smoke:
        return [("repvgg-style", lambda: R.RepVGG(), 32), ("mobileone-style", lambda: R.MobileOne(), 32)]
    return [("RepVGG-A0-like (blocks 2/4/14/1, widths 48/96/192/1280)",
             lambda: R.RepVGG((2, 4, 14, 1), (48, 96, 192, 1280)), 224),
            ("MobileOne-S0-like (k=4 branches, widths 48/128/256/1024)",
             lambda: R.MobileOne((48, 128, 256, 1024), k=4), 224)]


def _randomized(model):
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(1 + torch.randn(m.weight.shape, generator=g) * 0.1)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


def _alternate(fns: dict, seconds: float) -> dict:
    """Median seconds per call of each function, called in turn until ``seconds`` have passed."""
    times: dict = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or min(len(v) for v in times.values()) < 3:
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _ort(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def measure(name, make, size, seconds, tmp: Path) -> dict:
    import numpy as np
    import onnx
    import torch

    import modelsurgeon as ms

    torch.manual_seed(0)
    orig = _randomized(make())
    ours, report = ms.optimize(copy.deepcopy(orig), (1, 3, size, size))
    rp = next(p for p in report.passes if p.name == "reparam")
    flops = [sum(b["flops"][i] for a in rp.applied for b in a.to_json()["blocks"]) for i in (0, 1)]
    x = torch.randn(1, 3, size, size)
    torch.set_num_threads(1)
    with torch.no_grad():
        eager = _alternate({"original": lambda: orig(x), "reparam": lambda: ours(x)}, seconds)
        err = float((ours(x) - orig(x)).abs().max() / orig(x).abs().max())
    src, out = tmp / "train.onnx", tmp / "ours.onnx"
    torch.onnx.export(orig, (x,), str(src), dynamo=False, opset_version=17)
    ms.run("optimize", src, out, input_shape=(1, 3, size, size))
    sessions = {"original": _ort(src), "reparam": _ort(out)}
    feed = {sessions["original"].get_inputs()[0].name: x.numpy()}
    onnx_ms = _alternate({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, seconds)
    res = sessions["reparam"].run(None, feed)[0]
    ref = sessions["original"].run(None, feed)[0]
    nodes = {k: len(onnx.load(str(p)).graph.node) for k, p in (("original", src), ("reparam", out))}
    return {"model": name, "input": f"1x3x{size}x{size}", "blocks": sum(len(a.to_json()["blocks"]) for a in rp.applied),
            "eager_ms": {k: v * 1e3 for k, v in eager.items()}, "onnxruntime_ms": {k: v * 1e3 for k, v in onnx_ms.items()},
            "flops_in_blocks": flops, "onnx_nodes": nodes, "rel_error_torch": err,
            "rel_error_onnx": float(np.abs(res - ref).max() / np.abs(ref).max())}


def render(rows: list[dict]) -> str:
    from .run import machine

    m = machine()
    lines = [SECTION, "",
             f"Measured on {time.strftime('%Y-%m-%d')}: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
             f"torch {m['torch']}. Produced by `python -m bench.reparam`. Training-form blocks "
             "(`tests/reparam_models.py`, random BatchNorm statistics) against what `optimize` makes of them: "
             "torch eager (1 thread) and onnxruntime (default optimisations, 1 intra-op thread; the training form "
             "exported as is against `modelsurgeon optimize` of that file), batch 1, medians of alternating runs. "
             "FLOPs: the blocks' convolutions, from the pass's report.", "",
             "| model | input | blocks | eager ms (train / reparam) | speed-up | onnxruntime ms (train / reparam) "
             "| speed-up | ONNX nodes | block GFLOPs | rel. error (torch / onnx) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, o = r["eager_ms"], r["onnxruntime_ms"]
        lines.append(f"| {r['model']} | {r['input']} | {r['blocks']} | {e['original']:.2f} / {e['reparam']:.2f} | "
                     f"{e['original'] / e['reparam']:.2f}× | {o['original']:.2f} / {o['reparam']:.2f} | "
                     f"{o['original'] / o['reparam']:.2f}× | {r['onnx_nodes']['original']} → "
                     f"{r['onnx_nodes']['reparam']} | {r['flops_in_blocks'][0] / 1e9:.3f} → "
                     f"{r['flops_in_blocks'][1] / 1e9:.3f} | {r['rel_error_torch']:.1e} / {r['rel_error_onnx']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.reparam", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="small models, short timing")
    ap.add_argument("--seconds", type=float, default=None, help="timing per measurement (default 20, smoke 0.5)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.md")
    a = ap.parse_args(argv)
    seconds = a.seconds if a.seconds is not None else (0.5 if a.smoke else 20.0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, make, size in _models(a.smoke):
            rows.append(measure(name, make, size, seconds, Path(d)))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "reparam_results.json").write_text(json.dumps(rows, indent=1))
    text = render(rows)
    print(text)
    if not a.no_docs and not a.smoke:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
