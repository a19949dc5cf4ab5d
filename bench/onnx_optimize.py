"""ONNX optimize against the usual simplifiers, on the same exports.

    python -m bench.onnx_optimize            # the full table (tens of minutes)
    python -m bench.onnx_optimize --smoke    # three tiny models, a short timing (used by CI)

For every architecture of :mod:`bench.onnx_models` and every export mode: node count,
BatchNormalization count and onnxruntime latency (default optimisations, as deployed; 1 intra-op
thread and the default; median of every run, the files run in turn) of the original file and of
what onnxsim, onnxslim and ``modelsurgeon optimize`` write from it; onnxscript's optimizer is
counted too (the library a dependency would be). Peers that are not installed are said so.
Every result is also checked against the original in onnxruntime at batch 1 and 2.
Writes ``<out>/onnx_results.json`` and, unless ``--no-docs``, the "ONNX optimize" section of
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import time
from pathlib import Path

from .onnx_models import MODES, ROOT, build, cases, export
from .sections import write_section

TOOLS = ("onnxsim", "onnxslim", "onnxscript", "modelsurgeon")
TIMED = ("original", "onnxsim", "onnxslim", "modelsurgeon")
SECTION = "## ONNX optimize"


def _modelsurgeon(src: Path, dst: Path) -> dict:
    from .run import _exe

    r = subprocess.run(_exe() + ["optimize", str(src), "-o", str(dst), "--json"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError((r.stderr.strip().splitlines() or ["failed"])[-1][:200])
    rep = json.loads(r.stdout)
    return {"parity_passed": rep["parity"]["passed"], "rounds": rep.get("rounds")}


def _peer(tool: str, src: Path, dst: Path) -> dict:
    import onnx

    if tool == "onnxsim":
        from onnxsim import simplify

        model, ok = simplify(onnx.load(str(src)))
        if not ok:
            raise RuntimeError("its own check failed")
        onnx.save(model, str(dst))
    elif tool == "onnxslim":
        import contextlib
        import io

        import onnxslim

        with contextlib.redirect_stdout(io.StringIO()):  # its summary table
            onnxslim.slim(str(src), str(dst))
    elif tool == "onnxscript":
        import onnxscript.optimizer

        onnx.save(onnxscript.optimizer.optimize(onnx.load(str(src))), str(dst))
    return {}


def _installed(tool: str) -> bool:
    import importlib.util

    return tool == "modelsurgeon" or importlib.util.find_spec(tool) is not None


def _counts(path: Path) -> dict:
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return {"nodes": len(nodes), "bn": sum(n.op_type == "BatchNormalization" for n in nodes)}


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _max_rel(original, other, size: int) -> float:
    """Largest |Δ| / max|ref| over the outputs, at batch 1 and 2."""
    import numpy as np

    worst = 0.0
    for batch in (1, 2):
        x = np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)
        for a, b in zip(original.run(None, {"x": x}), other.run(None, {"x": x})):
            if a.shape != b.shape:
                return float("inf")
            scale = float(np.abs(a).max()) or 1.0
            worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()) / scale)
    return worst


def _latency(paths: dict, size: int, threads: int, budget: float, min_runs: int = 5) -> dict:
    """Median seconds per run of each file. The sessions run one after another, one run each,
    in a rotating order, until ``budget`` seconds have passed: the machine's drift (other
    processes on the same cores) affects them alike. ``original (again)`` is a second session of
    the original file: how far it lands from the first is the noise of the measurement."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    sessions[AGAIN] = _session(paths["original"], threads)
    names = list(sessions)
    runs: dict = {k: [] for k in names}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"x": x})
    end, i = time.perf_counter() + budget, 0
    while time.perf_counter() < end or min(len(v) for v in runs.values()) < min_runs:
        for k in names[i % len(names):] + names[:i % len(names)]:
            t = time.perf_counter()
            sessions[k].run(None, {"x": x})
            runs[k].append(time.perf_counter() - t)
        i += 1
    out = {}
    orig = np.array(runs["original"][:min(len(v) for v in runs.values())])
    for k, v in runs.items():
        q1, q3 = np.percentile(v, [25, 75])
        out[k] = {"median": statistics.median(v), "iqr": [float(q1), float(q3)], "runs": len(v)}
        if k != "original":  # paired: each run against the original's run of the same rotation
            ratio = np.array(v[:len(orig)]) / orig
            out[k]["ratio"] = {"median": float(np.median(ratio)), "ci95": _ci(ratio)}
    return out


def _ci(x, n: int = 2000) -> list[float]:
    """95% bootstrap interval of the median of ``x``."""
    import numpy as np

    rng = np.random.default_rng(0)
    meds = np.median(x[rng.integers(0, len(x), (n, len(x)))], axis=1)
    return [float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))]


AGAIN = "original (again)"


def latency_ok(lat: dict) -> bool:
    """modelsurgeon is not slower than the original: the 95% interval of the median of its paired
    time ratios reaches 1 or below."""
    return lat["modelsurgeon"]["ratio"]["ci95"][0] <= 1.0


def _ort_nodes(path: Path) -> int | None:
    """Nodes after onnxruntime's own graph optimisations (what it actually runs)."""
    import onnx
    import onnxruntime as ort

    target = path.with_name(path.stem + ".ort.onnx")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(target)
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return len(onnx.load(str(target), load_external_data=False).graph.node)
    except Exception:
        return None


def bench_case(name: str, family: str, builder, size: int, mode: str, work: Path, budget: float) -> dict:
    row: dict = {"model": name, "family": family, "mode": mode, "input": [1, 3, size, size]}
    src = work / f"{re.sub('[^a-z0-9]+', '-', name.lower()).strip('-')}-{mode}.onnx"
    made = export(build(builder), size, src, mode)
    if isinstance(made, str):
        row["skipped"] = made
        return row
    row["counts"] = {"original": _counts(src)}
    paths = {"original": src}
    original = _session(src, 1)
    for tool in TOOLS:
        if not _installed(tool):
            row.setdefault("not_installed", []).append(tool)
            continue
        dst = src.with_name(f"{src.stem}.{tool}.onnx")
        t = time.perf_counter()
        try:
            info = _modelsurgeon(src, dst) if tool == "modelsurgeon" else _peer(tool, src, dst)
            seconds = time.perf_counter() - t
            error = _max_rel(original, _session(dst, 1), size)
        except Exception as e:  # a peer failing on a model (or writing one onnxruntime refuses) is a result
            row.setdefault("failed", {})[tool] = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
            continue
        row.setdefault("seconds", {})[tool] = seconds
        row["counts"][tool] = _counts(dst)
        row.setdefault("max_rel_error", {})[tool] = error
        if info:
            row.setdefault("info", {})[tool] = info
        if tool in TIMED:
            paths[tool] = dst
    row["onnxruntime_nodes"] = {k: _ort_nodes(p) for k, p in paths.items()}
    row["latency_1_thread"] = _latency(paths, size, 1, budget)
    row["latency_default_threads"] = _latency(paths, size, 0, budget)
    return row


# ---------------------------------------------------------------------------------------------
# report


def _ms(row: dict, key: str, tool: str) -> str:
    lat = row.get(key, {}).get(tool)
    return f"{lat['median'] * 1e3:.2f}" if lat else "-"


def _ratio(row: dict, key: str, who: str) -> str:
    r = row.get(key, {}).get(who, {}).get("ratio")
    return f"{r['median']:.2f} [{r['ci95'][0]:.2f}–{r['ci95'][1]:.2f}]" if r else "-"


def _ort(row: dict) -> str:
    n = row.get("onnxruntime_nodes", {})
    return f"{n.get('original', '-')} / {n.get('modelsurgeon', '-')}"


def _nodes(row: dict, tool: str) -> str:
    if tool in row.get("not_installed", []):
        return "n/i"
    if tool in row.get("failed", {}):
        return "fails"
    c = row["counts"].get(tool)
    return str(c["nodes"]) if c else "-"


def misses(row: dict) -> list[str]:
    """What ``modelsurgeon optimize`` misses of the targets on this row."""
    out = []
    c = row.get("counts", {})
    ours = c.get("modelsurgeon")
    if ours is None:
        return ["modelsurgeon failed: " + row.get("failed", {}).get("modelsurgeon", "?")] if "counts" in row else []
    if "onnxslim" in c and ours["nodes"] > c["onnxslim"]["nodes"]:
        out.append(f"{ours['nodes']} nodes > onnxslim's {c['onnxslim']['nodes']}")
    if ours["bn"]:
        out.append(f"{ours['bn']} BatchNormalization left")
    for key in ("latency_1_thread", "latency_default_threads"):
        lat = row.get(key, {})
        if "modelsurgeon" in lat and not latency_ok(lat):
            r = lat["modelsurgeon"]["ratio"]
            out.append(f"{key.replace('_', ' ')}: {r['median']:.3f}× the original [{r['ci95'][0]:.3f}–{r['ci95'][1]:.3f}]")
    if row.get("max_rel_error", {}).get("modelsurgeon", 0) > 1e-4:
        out.append(f"max rel error {row['max_rel_error']['modelsurgeon']:.1e}")
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [SECTION, "",
             f"Measured on {m['date']}: {m['cpu']}, {m['cores']} cores, Python {m['python']}, onnxruntime "
             f"{res['versions'].get('onnxruntime', '?')}; peers: "
             + ", ".join(f"{k} {v}" for k, v in res["versions"].items() if k != "onnxruntime")
             + ". Produced by `python -m bench.onnx_optimize`. Each model (defined in `examples/`, random BatchNorm "
             "statistics) is exported with a symbolic batch: "
             + "; ".join(f"*{k}* = {v}" for k, v in MODES.items())
             + ". Nodes: after each tool (onnxscript = `onnxscript.optimizer.optimize`; n/i = not installed). "
             "Latency: onnxruntime with its default graph optimisations, batch 1, the median of every run, the "
             f"files run in turn one run at a time for {res['budget']:g} s per thread setting. *ours / orig*: the median of "
             "the paired time ratios (each run against the original's run of the same turn) with its 95% bootstrap "
             "interval; *A/A*: the same for a second session of the original file -- the noise of the measurement "
             "on this machine, which other jobs share. *ORT nodes*: what onnxruntime runs after its own graph "
             "optimisations (extended level). Error: largest |Δ| / max|ref| of modelsurgeon's file against the "
             "original, at batch 1 and 2.", "",
             "| model | export | nodes: original / onnxsim / onnxslim / onnxscript / **modelsurgeon** | BN left (orig → ours) "
             "| ms, 1 thread: orig / onnxsim / onnxslim / **ours** | ms, default threads: orig / onnxsim / onnxslim / **ours** "
             "| ours / orig (1 thread / default) | A/A (1 thread / default) | ORT nodes: orig / ours | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['mode']} | {r['skipped']} | | | | | | | |")
            continue
        c = r["counts"]
        bn = f"{c['original']['bn']} → {c['modelsurgeon']['bn']}" if "modelsurgeon" in c else "-"
        err = r.get("max_rel_error", {}).get("modelsurgeon")
        lines.append(
            f"| {r['model']} | {r['mode']} | {c['original']['nodes']} / {_nodes(r, 'onnxsim')} / {_nodes(r, 'onnxslim')} / "
            f"{_nodes(r, 'onnxscript')} / **{_nodes(r, 'modelsurgeon')}** | {bn} | "
            + " / ".join(_ms(r, "latency_1_thread", t) for t in TIMED[:-1]) + f" / **{_ms(r, 'latency_1_thread', 'modelsurgeon')}** | "
            + " / ".join(_ms(r, "latency_default_threads", t) for t in TIMED[:-1])
            + f" / **{_ms(r, 'latency_default_threads', 'modelsurgeon')}** | "
            + " / ".join(_ratio(r, k, "modelsurgeon") for k in ("latency_1_thread", "latency_default_threads")) + " | "
            + " / ".join(_ratio(r, k, AGAIN) for k in ("latency_1_thread", "latency_default_threads"))
            + f" | {_ort(r)} | {'-' if err is None else f'{err:.0e}'} |")
    notes = [(r, misses(r)) for r in res["rows"] if "counts" in r]
    missed = [(r, m) for r, m in notes if m]
    lines += ["", f"Targets (nodes ≤ onnxslim's, latency not above the original's -- the interval of the ratio reaches 1 "
              f"or below --, no BatchNormalization left, error ≤ 1e-4): "
              f"met on {len(notes) - len(missed)} of {len(notes)} exports."]
    for r, m in missed:
        lines.append(f"- {r['model']}, {r['mode']}: " + "; ".join(m) + (f" -- {EXPLAINED[r['family']]}" if r["family"] in EXPLAINED else ""))
    failed = [(r, t, why) for r in res["rows"] for t, why in r.get("failed", {}).items()]
    for r, t, why in failed:
        why = re.sub(r"/\S*/", "", re.sub(r"Load model from \S+ failed:\s*", "", why))  # no machine paths
        lines.append(f"- {t} fails on {r['model']}, {r['mode']}: {why}")
    return "\n".join(lines) + "\n"


EXPLAINED = {
    "repvgg": "the identity branches' BatchNorms read a block input, not a conv output: only structural "
              "re-parameterisation (merging the branches into one conv) removes them",
}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("onnxruntime", "onnxsim", "onnxslim", "onnxscript"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main(argv: list[str] | None = None) -> dict:
    from .run import machine

    ap = argparse.ArgumentParser(prog="python -m bench.onnx_optimize", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="three tiny models, one short timing round")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--models", default=None, help="comma-separated substrings of model names to run")
    ap.add_argument("--modes", default=",".join(MODES), help=f"export modes (default {','.join(MODES)})")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per model and thread setting "
                    "(default 20; 0.2 with --smoke)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.md")
    args = ap.parse_args(argv)
    work = args.out / "onnx"
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget or (0.2 if args.smoke else 20.0)
    res: dict = {"machine": machine(), "versions": versions(), "budget": budget, "smoke": args.smoke, "rows": []}
    wanted = [w.strip() for w in args.models.split(",")] if args.models else None
    for name, family, builder, size in cases(args.smoke):
        if wanted and not any(w in name for w in wanted):
            continue
        for mode in args.modes.split(","):
            print(f"{name} [{mode}]", flush=True)
            res["rows"].append(bench_case(name, family, builder, size, mode, work, budget))
            (args.out / "onnx_results.json").write_text(json.dumps(res, indent=2))
    text = markdown(res)
    if not args.no_docs and not args.smoke:
        write_section(SECTION, text)
    print(text)
    return res


if __name__ == "__main__":
    main()
