"""Regenerate docs/coverage.md from the integration cases, in the venv ``setup.sh`` builds:

    .venv-integration/bin/python tests/integration/coverage_table.py                 # measure all, write
    .venv-integration/bin/python tests/integration/coverage_table.py --only 'tv_*'   # one chunk, write
    .venv-integration/bin/python tests/integration/coverage_table.py --render        # stored records only

Measuring is the tests' own code (``sweep.Sweep``); every record is stored under
``.integration-out/records/`` (the tests store theirs too), and the table is rendered from all
stored records of the current case list.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import CLASSIFIERS, DETECTORS, YOLO, select  # noqa: E402
from sweep import RECORDS, ROOT, Sweep, parts_of, problems_of, verdict  # noqa: E402

DOC = ROOT / "docs" / "coverage.md"
SURGERY_COLUMNS = ("model", "form", "params", "BN", "fold-bn .pt BN left", "fold-bn .onnx BN left",
                   "optimize .pt BN left", "torch.fx fuse", "parity .pt (abs / rel)", "parity .onnx (abs / rel)",
                   "own fp32 noise", "fold-bn s", "result")
VERSIONS = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "onnxsim", "onnxslim", "onnxscript",
            "yolov5", "ultralytics")


def _e(v) -> str:
    return "–" if v is None else f"{v:.1e}"


def _parity(ind: dict | None) -> str:
    if not ind:
        return "–"
    if "error" in ind or not ind.get("loaded"):
        return "reload failed"
    return f"{_e(ind.get('max_abs'))} / {_e(ind.get('max_rel'))}" + ("" if ind.get("ok") else " ✗")


def _left(run: dict | None) -> str:
    if not run or run.get("code") != 0:
        return f"exit {run['code']}" if run else "–"
    ind = run.get("independent") or {}
    n = len(ind["bn_left"]) if "bn_left" in ind else ind.get("bn_nodes")
    return "?" if n is None else str(n)


def _verdict(case, rec: dict, part: str) -> tuple[str, str]:
    status, text = verdict(case.name, problems_of(case, rec, part))
    return {"pass": "pass", "xfail": "known", "fail": "**FAIL**"}[status], text


def _fx(fx: dict | None) -> str:
    if not fx:
        return "–"
    if not fx.get("traced"):
        return "does not trace"
    return f"{fx['bn_after']} left, {_e(fx.get('max_rel'))}"


def surgery_rows(recs: dict, cases: list) -> tuple[list[str], list[tuple]]:
    rows, notes = [], []
    for c in cases:
        rec = recs.get(c.name)
        if not rec or "surgery" not in rec:
            continue
        s = rec["surgery"]
        fold = s.get("fold-bn.pt") or {}
        v, text = _verdict(c, rec, "surgery")
        rows.append(f"| {c.name} | {c.form} | {rec['params'] / 1e6:.1f}M | {rec['bn_before']} | {_left(fold)} | "
                    f"{_left(s.get('fold-bn.onnx'))} | {_left(s.get('optimize.pt'))} | {_fx(rec.get('fx'))} | "
                    f"{_parity(fold.get('independent'))} | "
                    f"{_parity((s.get('fold-bn.onnx') or {}).get('independent'))} | {_e(rec.get('noise_rel'))} | "
                    f"{fold.get('seconds', '–')} | {v} |")
        reasons = _grouped(k for r in s.values() for k in r.get("skipped", []))
        if reasons:
            notes.append((c.name, "BatchNorms left: " + "; ".join(reasons)))
        if text:
            notes.append((c.name, text))
    return rows, notes


def onnx_rows(recs: dict, cases: list) -> tuple[list[str], list[tuple]]:
    rows, notes = [], []
    for c in cases:
        rec = recs.get(c.name)
        for exporter, r in sorted(((rec or {}).get("onnx") or {}).items()):
            ex = r["export"]
            if not ex["ok"]:
                rows.append(f"| {c.name} | {exporter} | export failed | | | | | | n/a |")
                notes.append((c.name, f"{exporter} export: {ex['error']}"))
                continue
            ours = r.get("ours") or {}
            ind = ours.get("independent") or {}
            mine = f"{ind['nodes']} ({ind['bn_nodes']})" if "nodes" in ind else f"exit {ours.get('code')}"
            tools = [f"{r[t]['nodes']} ({r[t]['bn_nodes']})" if "nodes" in r.get(t, {}) else "error"
                     for t in ("onnxsim", "onnxslim")]
            v, text = _verdict(c, rec, f"onnx-{exporter}")
            ext = " ext" if ex.get("external_data") else ""
            rows.append(f"| {c.name} | {exporter}{ext} | {ex['nodes']} ({ex['bn_nodes']}) | {mine} | {tools[0]} | "
                        f"{tools[1]} | {_parity(ind)} | {ours.get('seconds', '–')} | {v} |")
            if text:
                notes.append((f"{c.name} ({exporter})", text))
    return rows, notes


def yolo_rows(recs: dict) -> tuple[list[str], list[tuple]]:
    rows, notes = [], []
    for c in YOLO:
        rec = recs.get(c.name)
        if not rec:
            continue
        built = rec.get("built", {})
        v, text = _verdict(c, rec, "host")
        for cmd, run in rec.get("runs", {}).items():
            h = run.get("host") or {}
            host = "loads, runs" if h.get("loaded") and "error" not in h else h.get("error", "–")[:60]
            rows.append(f"| {c.name} | {c.host} | {built.get('bn', '?')} | {cmd} | {run['code']} | "
                        f"{run.get('bn_after', '–')} | {host} | {_parity(h) if h.get('loaded') else '–'} | {v} |")
        if text:
            notes.append((c.name, text))
    return rows, notes


def render(recs: dict) -> str:
    classifiers, detectors = surgery_rows(recs, CLASSIFIERS), surgery_rows(recs, DETECTORS)
    onnx, yolo = onnx_rows(recs, CLASSIFIERS), yolo_rows(recs)
    statuses = [_verdict(c, recs[c.name], p)[0] for c in CLASSIFIERS + DETECTORS if c.name in recs
                for p in parts_of(c) if (p == "surgery" and "surgery" in recs[c.name])
                or p.removeprefix("onnx-") in recs[c.name].get("onnx", {})]
    statuses += [_verdict(c, recs[c.name], "host")[0] for c in YOLO if c.name in recs]
    seconds = sum(sum(r.get("seconds", {}).values()) for r in recs.values())
    versions = ", ".join(f"{p} {_version(p)}" for p in VERSIONS)
    commits = sorted({m["commit"] for r in recs.values() for m in r.get("measured", {}).values()
                      if m.get("commit")})
    head = "| " + " | ".join(SURGERY_COLUMNS) + " |"
    sep = "|" + "---|" * len(SURGERY_COLUMNS)
    out = [
        "# Coverage on real models",
        "",
        "Generated by `tests/integration/coverage_table.py` (see [testing.md](testing.md)) from the",
        "integration suite's records: random weights, random BatchNorm statistics and affine",
        "parameters, every command run through the CLI, every output reloaded *without* modelsurgeon",
        "(`torch.load`, a state_dict into its factory's model with the recipe replayed by plain torch,",
        "onnxruntime) and compared with the original on an input of its own. Do not edit by hand.",
        "",
        f"Measured at commit {', '.join(commits) or '?'} on {datetime.now(timezone.utc):%Y-%m-%d}; {versions}.",
        f"Parts: {statuses.count('pass')} pass, {statuses.count('known')} known failures (open issues), "
        f"{statuses.count('**FAIL**')} failures; {seconds / 60:.0f} min of measuring on 2 shared cores.",
        "",
        "**Columns.** *BN*: BatchNorm-like modules in the model (every `_BatchNorm`, timm's",
        "`BatchNormAct2d`, torchvision's `FrozenBatchNorm2d`). *BN left*: counted in the reloaded",
        "output (modules, or `BatchNormalization` nodes); each one is reported by the tool with its",
        "reason (below). *torch.fx fuse*: `torch.fx.experimental.optimization.fuse` on the same model:",
        "BatchNorms it leaves and its relative error, or that the model does not trace. *parity*: max",
        "abs / max rel (to the output's largest magnitude) error against the original in float32; ✗",
        "marks an output outside 1e-6 + 1e-4·max|ref| that is also further from the float64 original",
        "than twice the original's *own fp32 noise* (its float32-vs-float64 gap, also shown).",
        "",
        "## Classifiers", "", head, sep, *classifiers[0], "",
        "## Detectors (`--verify-at` the heads)", "", head, sep, *detectors[0], "",
        "## ONNX: both exporters, then `optimize` / onnxsim / onnxslim on the same file", "",
        "Node counts (BatchNormalization nodes in brackets); *default*: `torch.onnx.export(m, x, f)`",
        "(dynamo, optimised, *ext*: weights as external data); *legacy*: `dynamo=False,",
        "do_constant_folding=False`. Parity of our output through onnxruntime against the PyTorch original.", "",
        "| model | exporter | exported | ours | onnxsim | onnxslim | parity ours (abs / rel) | ours s | result |",
        "|" + "---|" * 9, *onnx[0], "",
        "## YOLO checkpoints through their own loaders", "",
        "Built from the package's yaml, saved as its trainer saves (fp16 `model` / `ema`), the output",
        "loaded by YOLOv5's `attempt_load` / Ultralytics' `load_checkpoint` with `fuse=True` and run",
        "against the original loaded the same way (fp16 tolerance).", "",
        "| model | host | BN | command | exit | BN after | host loader | parity (abs / rel) | result |",
        "|" + "---|" * 9, *yolo[0], "",
        "## Notes: BatchNorms left, known failures, failures", "",
    ]
    for name, text in classifiers[1] + detectors[1] + onnx[1] + yolo[1]:
        out.append(f"- **{name}**: " + text.replace("\n", "; "))
    return "\n".join(out) + "\n"


def _grouped(skipped) -> list[str]:
    """One line per kind of reason (its code when the tool gave one, else its text with module
    paths taken out), counted over every skipped candidate of every part: "62 × ..."."""
    counts: dict[str, set] = {}
    for k in skipped:
        key = k.get("code") or re.sub(r"\b\w+(?:\.\w+)+\b", "…", k["reason"])
        counts.setdefault(key, set()).add(k.get("target", k["reason"]))
    return [f"{len(t)} × {key}" for key, t in sorted(counts.items(), key=lambda kv: -len(kv[1]))]


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def load_records(records: Path = RECORDS) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(records).glob("*.json"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated shell patterns of case names (default: all)")
    ap.add_argument("--render", action="store_true", help="write the table from stored records, measure nothing")
    ap.add_argument("--out", type=Path, default=DOC)
    args = ap.parse_args(argv)
    if not args.render:
        with tempfile.TemporaryDirectory(prefix="ms-integration-") as tmp:
            sweep = Sweep(Path(tmp))
            for c in select(CLASSIFIERS + DETECTORS, args.only):
                for part in parts_of(c):
                    print(f"{c.name} {part}: {_verdict(c, sweep.part(c, part), part)[0]}", flush=True)
            for c in select(YOLO, args.only):
                print(f"{c.name}: {_verdict(c, sweep.yolo(c), 'host')[0]}", flush=True)
            sweep.close()
    args.out.write_text(render(load_records()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
