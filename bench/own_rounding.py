"""The cost of the own-rounding rule (the original run in float64, verify/exact.py): made before
the rewrite on every run (as before) against made only when an output fails the fixed tolerance
(now); fold-bn on the 250 MB ResNet checkpoint of ``python -m bench``.

    python -m bench.own_rounding [--size-mb 250] [--shape 1,3,224,224] [--runs 3] [--no-docs]

Writes its section of ``docs/performance.md`` (kept by ``python -m bench``)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from .procs import run_once
from .sections import write_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## The own-rounding check (float64)"

UPFRONT = (  # the previous behaviour: the float64 run before the rewrite, whatever the outcome
    "import sys\n"
    "import modelsurgeon.pipeline_torch as p\n"
    "real = p.operate\n"
    "def eager(run):\n"
    "    run.original = None\n"
    "    return real(run)\n"
    "p.operate = eager\n"
    "from modelsurgeon.cli.app import main\n"
    "main(sys.argv[1:])\n"
)


def measure(ckpt: Path, work: Path, shape: str, runs: int) -> dict:
    import subprocess

    from .run import EXAMPLES

    out = work / "out.pt"
    args = ["fold-bn", str(ckpt), "--trust-pickle", "--code-path", str(EXAMPLES), "-s", shape, "-o", str(out)]
    modes = {"lazy (now)": [sys.executable, "-m", "modelsurgeon"], "upfront (before)": [sys.executable, "-c", UPFRONT]}
    res: dict = {}
    for _ in range(runs):
        for mode, exe in modes.items():
            wall, rss, code = run_once(exe + args + ["-q"])
            r = subprocess.run(exe + args + ["--json"], capture_output=True, text=True)
            t = json.loads(r.stdout)["timings"] if r.returncode == 0 else {}
            d = res.setdefault(mode, {"wall": [], "rss": [], "reference": [], "verify": [], "code": code})
            d["wall"].append(wall)
            d["rss"].append(rss)
            d["reference"].append(t.get("reference", float("nan")))
            d["verify"].append(t.get("verify", float("nan")))
    out.unlink(missing_ok=True)
    return {m: {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in d.items()} for m, d in res.items()}


def markdown(res: dict, ckpt: Path, shape: str, runs: int) -> str:
    size = ckpt.stat().st_size / 1e6
    lines = [SECTION, "",
             f"fold-bn on {ckpt.name} ({size:.0f} MB, float32), input {shape.replace(',', '×')}, median of {runs} "
             "runs each (wall and peak RSS of the whole command; *reference* and *verify*: its `--json` timings). "
             "The original's float64 run (the rule that lets a deep net's own float32 rounding pass, "
             "`verify/exact.py`) is made only when an output fails the fixed tolerance -- on the original read "
             "again from the file, memory-mapped -- instead of before every rewrite; the verdicts are the same.", "",
             "| float64 run | wall | peak RSS | reference | verify |", "|---|---|---|---|---|"]
    for mode, d in res.items():
        lines.append(f"| {mode} | {d['wall']:.2f} s | {d['rss']:.0f} MiB | {d['reference']:.2f} s | {d['verify']:.2f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from .run import build_checkpoint

    ap = argparse.ArgumentParser(prog="python -m bench.own_rounding", description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=250)
    ap.add_argument("--shape", default="1,3,224,224")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-docs", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = build_checkpoint(work, args.size_mb)
        res = measure(ckpt, work, args.shape, args.runs)
        text = markdown(res, ckpt, args.shape, args.runs)
    print(text)
    if not args.no_docs:
        write_section(SECTION, text)
    return res


if __name__ == "__main__":
    main()
