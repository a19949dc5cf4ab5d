"""modelsurgeon benchmark suite.

    python -m bench                 # full: 10 MB, 250 MB, 1 GB checkpoints (several minutes)
    python -m bench --smoke         # seconds: a tiny checkpoint, one run each (used by CI)

Measures, each in separate processes, several runs, median and spread:

* ``fold-bn`` with verification vs a plain ``torch.load`` + ``torch.save`` of the same file
  (wall time and peak RSS, run alternately so that the ratio is taken pair by pair);
* CLI start-up (``--help``, ``--version``);
* latency of original vs rewritten models (torch eager, onnxruntime) and against
  ``torch.fx.experimental.optimization.fuse`` (BN calls removed, error vs a float64 reference);
* surgery time against checkpoint size.

Writes ``<out>/results.json`` and, unless ``--no-docs``, ``docs/performance.md`` and
``docs/performance.png`` (the plot needs matplotlib: ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from .procs import paired, repeat

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
sys.path[:0] = [str(EXAMPLES), str(EXAMPLES / "yolo")]


def _exe() -> list[str]:
    cli = Path(sys.executable).with_name("modelsurgeon")
    return [str(cli)] if cli.exists() else [sys.executable, "-m", "modelsurgeon"]


# ---------------------------------------------------------------------------------------------
# checkpoints


def _resnet(width: int, device: str = "cpu"):
    import torch

    from zoo.resnet import ResNet

    with torch.device(device):
        return ResNet(layers=(2, 2, 2, 2), widths=(width, 2 * width, 4 * width, 8 * width))


def width_for(size_mb: float) -> int:
    """ResNet width whose float32 parameters take about ``size_mb`` megabytes."""
    lo, hi = 4, 1024
    while lo < hi:
        mid = (lo + hi + 1) // 2
        n = sum(p.numel() for p in _resnet(mid, "meta").parameters()) * 4 / 1e6
        lo, hi = (mid, hi) if n <= size_mb else (lo, mid - 1)
    return lo


def build_checkpoint(out: Path, size_mb: float) -> Path:
    import torch

    from zoo import randomize

    w = width_for(size_mb)
    path = out / f"resnet-w{w}.pt"
    if not path.exists():
        torch.manual_seed(0)
        model = randomize(_resnet(w), 0).eval()
        tmp = path.with_suffix(".tmp")
        torch.save(model, tmp)
        tmp.rename(path)
        del model
    return path


# ---------------------------------------------------------------------------------------------
# whole-process measurements


BASELINE = (
    "import sys, torch\n"
    "sys.path.insert(0, sys.argv[3])\n"
    "m = torch.load(sys.argv[1], weights_only=False)\n"
    "torch.save(m, sys.argv[2])\n"
)


def bench_fold_bn(ckpt: Path, work: Path, n: int, warmup: int, shape: str) -> dict:
    out_a, out_b = work / "fold-bn.out.pt", work / "baseline.out.pt"
    cmd_a = _exe() + ["fold-bn", str(ckpt), "--trust-pickle", "--code-path", str(EXAMPLES),
                      "-s", shape, "-o", str(out_a), "-q"]
    cmd_b = [sys.executable, "-c", BASELINE, str(ckpt), str(out_b), str(EXAMPLES)]
    res = paired(cmd_a, cmd_b, n=n, warmup=warmup)
    res["checkpoint"] = ckpt.name
    res["size_mb"] = ckpt.stat().st_size / 1e6
    for p in (out_a, out_b):
        p.unlink(missing_ok=True)
    return res


BASELINE_TIMED = (
    "import json, os, sys, time, torch\n"
    "sys.path.insert(0, sys.argv[3])\n"
    "t0 = time.perf_counter(); m = torch.load(sys.argv[1], weights_only=False); t1 = time.perf_counter()\n"
    "torch.save(m, sys.argv[2]); t2 = time.perf_counter()\n"
    "print(json.dumps({'load': t1 - t0, 'save': t2 - t1}))\n"
)


def breakdown(ckpt: Path, work: Path, shape: str) -> dict:
    """Where the time goes: modelsurgeon's own stage timings (``--json``) beside the baseline's
    load and save, one run each after a flush of the page cache."""
    import subprocess

    out = work / "breakdown.out.pt"
    os.sync()
    r = subprocess.run(_exe() + ["fold-bn", str(ckpt), "--trust-pickle", "--code-path", str(EXAMPLES), "-s", shape,
                                 "-o", str(out), "--json"], capture_output=True, text=True)
    ours = json.loads(r.stdout)["timings"] if r.returncode == 0 else {}
    os.sync()
    r = subprocess.run([sys.executable, "-c", BASELINE_TIMED, str(ckpt), str(out), str(EXAMPLES)],
                       capture_output=True, text=True)
    base = json.loads(r.stdout) if r.returncode == 0 else {}
    out.unlink(missing_ok=True)
    return {"modelsurgeon": {k: round(v, 3) for k, v in ours.items()}, "baseline": {k: round(v, 3) for k, v in base.items()}}


def bench_startup(n: int, warmup: int) -> dict:
    return {arg: repeat(_exe() + [arg], n=n, warmup=warmup) for arg in ("--help", "--version")}


# ---------------------------------------------------------------------------------------------
# in-process: latency, fx comparison, accuracy


def _latency(fn, min_time: float) -> float:
    """Median seconds per call (torch.utils.benchmark)."""
    import torch.utils.benchmark as tb

    m = tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time)
    return float(m.median)


def _latencies(fns: dict, min_time: float, rounds: int = 5) -> dict:
    """Median latency of each callable, measured in alternating rounds (A B C A B C ...) so
    that the machine's drift affects all of them alike."""
    per: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            per[k].append(_latency(fn, min_time / rounds))
    return {k: statistics.median(v) for k, v in per.items()}


def _ort_session(model, x, work: Path, name: str):
    """A callable running ``model`` exported to ONNX in onnxruntime (default optimisations)."""
    import numpy as np
    import onnxruntime as ort

    from modelsurgeon.write.onnx_export import export

    path = work / f"{name}.onnx"
    export(model, [x], path)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    path.unlink(missing_ok=True)
    feed = {sess.get_inputs()[0].name: np.asarray(x.numpy())}
    return lambda: sess.run(None, feed)


def _bn_calls(model, x) -> int:
    from modelsurgeon.capture import capture

    g, _, _ = capture(model, [x])
    return g.op_count("batch_norm")


def _rel_err(out, ref) -> float:
    from modelsurgeon.verify.compare import flatten_outputs

    worst = 0.0
    for (_, o), (_, r) in zip(flatten_outputs(out), flatten_outputs(ref)):
        if hasattr(r, "shape"):
            scale = float(r.abs().max()) or 1.0
            worst = max(worst, float((o.double() - r).abs().max()) / scale)
    return worst


def bench_models(work: Path, min_time: float, smoke: bool) -> list[dict]:
    import torch

    import modelsurgeon as ms
    from zoo import randomize
    from zoo.mobilenetv2 import mobilenet_v2
    from zoo.resnet import resnet

    from models.yolo import Model

    size = 64 if smoke else 224
    cases = [
        ("resnet18-style", lambda: resnet(width=64 if not smoke else 8, depth=2), (1, 3, size, size)),
        ("mobilenetv2", lambda: mobilenet_v2(width_mult=1.0 if not smoke else 0.25), (1, 3, size, size)),
        ("yolov5s-style (Focus, not fx-traceable)", lambda: Model(width=0.5 if not smoke else 0.25), (1, 3, 2 * size if not smoke else 64, 2 * size if not smoke else 64)),
    ]
    rows = []
    torch.manual_seed(0)
    for name, build, shape in cases:
        original = randomize(build(), 1).eval()
        x = torch.randn(shape)
        with torch.no_grad():
            ref64 = copy.deepcopy(original).double()(x.double())
            ours = copy.deepcopy(original)
            ms.fold_bn(ours, shape)

            def err64(m):  # the folded float32 weights, evaluated in float64 arithmetic
                return _rel_err(copy.deepcopy(m).double()(x.double()), ref64)

            row = {"model": name, "input": list(shape),
                   "bn_calls": {"original": _bn_calls(original, x), "modelsurgeon": _bn_calls(ours, x)},
                   "max_rel_error_vs_float64": {"original": err64(original), "modelsurgeon": err64(ours)}}
            runners = {"original": lambda: original(x), "modelsurgeon": lambda: ours(x)}
            try:
                from torch.fx.experimental.optimization import fuse

                fused = fuse(copy.deepcopy(original))
                row["bn_calls"]["fx_fuse"] = _bn_calls(fused, x)
                row["max_rel_error_vs_float64"]["fx_fuse"] = err64(fused)
                runners["fx_fuse"] = lambda: fused(x)
            except Exception as e:  # symbolic tracing fails on data-dependent control flow
                row["fx_fuse"] = f"fails: {type(e).__name__}"
            row["torch_latency_s"] = _latencies(runners, min_time * len(runners))
            row["onnxruntime_latency_s"] = _latencies({
                "original": _ort_session(original, x, work, "orig"),
                "modelsurgeon": _ort_session(ours, x, work, "ours"),
            }, min_time * 2)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# report


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "date": _dt.date.today().isoformat()}


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    return f"{x:.3g}{unit}"


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Performance",
        "",
        f"Measured on {m['date']}: {m['cpu']}, {m['cores']} cores, Python {m['python']}, torch {m['torch']}"
        f" ({m['platform']}). Produced by `python -m bench`, which also writes the raw figures to `bench/out/results.json` (not committed)."
        " Medians of several runs of separate processes; min–max in brackets; ratios are taken pair"
        " by pair (A and B run alternately).",
        "",
        "## fold-bn vs plain torch.load + torch.save of the same checkpoint",
        "",
        "| checkpoint | size | fold-bn wall | load+save wall | ratio (target ≤ 1.3) | fold-bn peak RSS | load+save peak RSS | ratio (target ≤ 1.2) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["fold_bn"]:
        a, b = r["a"], r["b"]
        lines.append(
            f"| {r['checkpoint']} | {r['size_mb']:.0f} MB | {a['wall_s']['median']:.2f} s "
            f"[{a['wall_s']['min']:.2f}–{a['wall_s']['max']:.2f}] | {b['wall_s']['median']:.2f} s "
            f"| **{r['ratio_wall']['median']:.2f}** [{r['ratio_wall']['min']:.2f}–{r['ratio_wall']['max']:.2f}] "
            f"| {a['peak_rss_mb']['median']:.0f} MiB | {b['peak_rss_mb']['median']:.0f} MiB "
            f"| **{r['ratio_rss']['median']:.2f}** [{r['ratio_rss']['min']:.2f}–{r['ratio_rss']['max']:.2f}] |")
    lines += ["", "Where the time goes (one run each, seconds; modelsurgeon's `--json` timings; the example "
              "input is 1×3×64×64: *capture* is one forward pass, which is also trial 0's reference; *reference* "
              "is the second trial's, at batch 2; *verify* runs the rewritten model on both):", "",
              "| checkpoint | import torch | load | capture | reference | rewrite | verify | save (incl. fsync) | baseline load | baseline save |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["fold_bn"]:
        o, b = r.get("breakdown", {}).get("modelsurgeon", {}), r.get("breakdown", {}).get("baseline", {})
        lines.append(f"| {r['checkpoint']} | " + " | ".join(_fmt(o.get(k)) for k in ("import", "load", "capture", "reference", "rewrite", "verify", "save"))
                     + f" | {_fmt(b.get('load'))} | {_fmt(b.get('save'))} |")
    if res.get("scaling"):
        s = res["scaling"]
        lines += ["", f"Surgery time against size: {s['seconds_per_gb']:.2f} s per GB above a fixed "
                      f"{s['intercept_s']:.2f} s (least-squares fit over the checkpoints above, "
                      f"largest residual {s['max_residual_s']:.2f} s)."]
    st = res["startup"]
    lines += ["", "## CLI start-up (target ≤ 0.3 s)", "", "| command | median | min–max |", "|---|---|---|"]
    for k, v in st.items():
        lines.append(f"| `modelsurgeon {k}` | {v['wall_s']['median']:.3f} s | {v['wall_s']['min']:.3f}–{v['wall_s']['max']:.3f} s |")
    lines += ["", "## Rewritten models: latency, BatchNorm calls and accuracy", "",
              "Latency is the median per forward (torch.utils.benchmark, the models measured in "
              "alternating rounds; onnxruntime with its default optimisations, as deployed). Error: each model's float32 weights evaluated in float64 "
              "arithmetic, largest |out − ref| / max|ref| against the original model in float64 -- "
              "so it measures only the rounding of the folded weights.", "",
              "| model | input | BN calls (orig → ours / fx) | torch eager ms (orig / ours / fx) | speed-up vs orig | onnxruntime ms (orig / ours) | rel. error (orig / ours / fx) |",
              "|---|---|---|---|---|---|---|"]
    for r in res["models"]:
        bn, lat, err, ort = r["bn_calls"], r["torch_latency_s"], r["max_rel_error_vs_float64"], r["onnxruntime_latency_s"]
        fx_bn = bn.get("fx_fuse", r.get("fx_fuse", "-"))
        fx_lat = f"{lat['fx_fuse'] * 1e3:.2f}" if "fx_fuse" in lat else r.get("fx_fuse", "-")
        fx_err = f"{err['fx_fuse']:.1e}" if "fx_fuse" in err else "-"
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input']))} | {bn['original']} → {bn['modelsurgeon']} / {fx_bn} "
            f"| {lat['original'] * 1e3:.2f} / {lat['modelsurgeon'] * 1e3:.2f} / {fx_lat} "
            f"| {lat['original'] / lat['modelsurgeon']:.2f}× "
            f"| {_fmt(ort['original'] and ort['original'] * 1e3)} / {_fmt(ort['modelsurgeon'] and ort['modelsurgeon'] * 1e3)} "
            f"| {err['original']:.1e} / {err['modelsurgeon']:.1e} / {fx_err} |")
    if res.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    if res.get("plot"):
        lines += ["", f"![time and memory against checkpoint size]({res['plot']})"]
    return "\n".join(lines) + "\n"


def target_notes(rows: list[dict]) -> list[str]:
    """For each checkpoint where fold-bn misses a target: what, beyond one load and one save,
    the measured run spent its time on (the breakdown's own figures)."""
    notes = []
    for r in rows:
        ratio, rss = r["ratio_wall"]["median"], r["ratio_rss"]["median"]
        o, b = r.get("breakdown", {}).get("modelsurgeon", {}), r.get("breakdown", {}).get("baseline", {})
        if ratio <= 1.3 and rss <= 1.2 or not o or not b:
            continue
        run = o.get("capture", 0) + o.get("reference", 0) + o.get("verify", 0)
        base, ours = r["b"]["wall_s"]["median"], r["a"]["wall_s"]["median"]
        save_extra = o.get("save", 0) - b.get("save", 0)
        explained = run + o.get("rewrite", 0) + save_extra + (o.get("load", 0) - b.get("load", 0))
        parts = [f"running the model {run:.2f} s (the capture, which is also the first reference; the second "
                 f"trial's reference at batch 2; the verification of both trials)",
                 f"the fold arithmetic {o.get('rewrite', 0):.2f} s (float64, one rounding)",
                 f"saving {save_extra:+.2f} s against the baseline (the same torch writer, plus the fsync before "
                 "the atomic rename that a plain torch.save does not do)",
                 f"the rest, {ours - base - explained:+.2f} s, is the difference of the medians not seen in "
                 "the one-run breakdown: CLI imports, and the spread of one-run I/O times on this machine"]
        notes.append(f"{r['checkpoint']} ({r['size_mb']:.0f} MB): fold-bn takes {ratio:.2f}x the wall time of "
                     f"load+save ({ours:.2f} s against {base:.2f} s)" + (f" and {rss:.2f}x its peak RSS" if rss > 1.2 else "")
                     + ": beyond one load and one save it spends " + "; ".join(parts) + ". The verification is "
                     "the point of the tool (`--trials 1` drops the second trial, `--no-verify` all of it).")
    return notes


def scaling(rows: list[dict]) -> dict | None:
    if len(rows) < 2:
        return None
    xs = [r["size_mb"] / 1000 for r in rows]
    ys = [r["a"]["wall_s"]["median"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    icpt = my - slope * mx
    return {"seconds_per_gb": slope, "intercept_s": icpt,
            "max_residual_s": max(abs(y - (icpt + slope * x)) for x, y in zip(xs, ys))}


def plot(res: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = res["fold_bn"]
    sizes = [r["size_mb"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("a", "modelsurgeon fold-bn"), ("b", "torch.load + torch.save")):
        ax1.plot(sizes, [r[key]["wall_s"]["median"] for r in rows], "o-", label=label)
        ax2.plot(sizes, [r[key]["peak_rss_mb"]["median"] for r in rows], "o-", label=label)
    for ax, title, unit in ((ax1, "wall time", "s"), (ax2, "peak RSS", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("checkpoint size (MB)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"modelsurgeon fold-bn vs load+save ({res['machine']['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="seconds-long run for CI: tiny checkpoint, one run each")
    ap.add_argument("--sizes", default=None, help="checkpoint sizes in MB, comma-separated (default 10,250,1000)")
    ap.add_argument("--runs", type=int, default=None, help="runs per measurement (default 5; 3 above 500 MB)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.md")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) for s in (args.sizes or ("2" if args.smoke else "10,250,1000")).split(",")]
    res: dict = {"machine": machine(), "smoke": args.smoke, "fold_bn": [], "notes": []}
    for size in sizes:
        ckpt = build_checkpoint(args.out, size)
        n = args.runs or (1 if args.smoke else (3 if size > 500 else 5))
        print(f"fold-bn vs load+save on {ckpt.name} ({ckpt.stat().st_size / 1e6:.0f} MB), {n} runs", flush=True)
        row = bench_fold_bn(ckpt, args.out, n, 0 if args.smoke else 1, "1,3,64,64")
        row["breakdown"] = breakdown(ckpt, args.out, "1,3,64,64")
        res["fold_bn"].append(row)
    res["scaling"] = scaling(res["fold_bn"])
    res["notes"] += target_notes(res["fold_bn"])
    print("CLI start-up", flush=True)
    res["startup"] = bench_startup(n=3 if args.smoke else 10, warmup=0 if args.smoke else 2)
    print("latency / fx comparison", flush=True)
    res["models"] = bench_models(args.out, min_time=0.05 if args.smoke else 1.0, smoke=args.smoke)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    if not args.no_docs and not args.smoke:
        res["plot"] = plot(res, ROOT / "docs" / "performance.png")
        from . import onnx_optimize, own_rounding, reparam
        from .sections import section

        doc = ROOT / "docs" / "performance.md"
        # the sections the other benches write (python -m bench.onnx_optimize / .own_rounding / .reparam)
        kept = "".join(section(m.SECTION, doc) for m in (onnx_optimize, own_rounding, reparam))
        doc.write_text(markdown(res) + ("\n" + kept if kept else ""))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
