"""Measure one case: build the model (random weights, random BatchNorm statistics), save it in
its user's form, run the CLI on it, reload every output without modelsurgeon, compare with
torch.fx's ``fuse``, export ONNX with both exporters and run ``optimize``, onnxsim and onnxslim
on each file. Returns plain JSON records; ``judge_*`` turn a record into problems. Shared by
the tests and ``coverage_table.py``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import arch_factory
from cases import Case, Problem
from reload_check import bn_like, compare, flatten, hooked_outputs

HERE = Path(__file__).resolve().parent
TIMEOUT = 1800
EXPORTERS = ("default", "legacy")


def randomize_bn(model, seed: int = 0) -> int:
    """Random running statistics and affine parameters in every BatchNorm-like module (also
    buffer-only ones such as ``FrozenBatchNorm2d``); returns how many there are."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for m in model.modules():
            if not bn_like(m):
                continue
            n += 1
            c = m.running_mean.shape
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.4 + 0.3)
            for name, scale, shift in (("weight", 0.25, 1.0), ("bias", 0.2, 0.0)):
                t = getattr(m, name, None)
                if isinstance(t, torch.Tensor):
                    t.copy_(torch.randn(t.shape, generator=g) * scale + shift)
    return n


def build(case: Case, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = arch_factory.build(case.source, case.model, **case.kwargs)
    randomize_bn(model, seed)
    return model.eval()


def form_args(case: Case) -> list[str]:
    if case.form == "module":
        return ["--trust-pickle"]
    factory = arch_factory.FACTORIES[case.source].__name__
    return ["--arch", f"arch_factory:{factory}", "--arch-kwargs", json.dumps(case.arch_kwargs), "--code-path", str(HERE)]


def cli(*args: str | Path, timeout: float = TIMEOUT) -> dict:
    """One ``modelsurgeon ... --json`` run in a fresh process: exit code, wall time, report."""
    exe = Path(sys.executable).with_name("modelsurgeon")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "modelsurgeon"]
    t = time.perf_counter()
    p = subprocess.run(cmd + [str(a) for a in args] + ["--json"], capture_output=True, text=True, timeout=timeout)
    res = {"code": p.returncode, "seconds": round(time.perf_counter() - t, 2), "report": None}
    with contextlib.suppress(json.JSONDecodeError):
        res["report"] = json.loads(p.stdout)
    if p.returncode != 0:
        lines = [ln.strip(" │╭╮╰╯─") for ln in p.stderr.splitlines()]  # typer's usage box too
        lines = [ln for ln in lines if any(c.isalnum() for c in ln)]
        res["stderr"] = lines[-1][:400] if lines else p.stdout.strip()[-400:]
    return res


def python(script: str, *args: str | Path, env: dict | None = None, timeout: float = TIMEOUT) -> dict:
    """Run one of this directory's helper scripts in a fresh process; its last JSON line."""
    p = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, cwd=HERE, env=None if env is None else {**os.environ, **env})
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"error": f"{script} exited {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:300]}"}


@dataclass
class Prepared:
    case: Case
    dir: Path
    model: object
    x: object
    file: Path
    bn_before: int
    params: int
    noise_rel: float

    def job(self, outputs: list[dict]) -> dict:
        return {"inputs": str(self.dir / "inputs.pt"), "refs": str(self.dir / "refs.pt"),
                "verify_at": list(self.case.verify_at), "code_paths": [str(HERE)], "outputs": outputs}


def prepare(case: Case, workdir: Path, reference=None) -> Prepared:
    """Build the case's model, save it as its user has it, record its outputs on a seeded
    input (float32, and float64 for the model's own rounding) -- or ``reference(model)``'s, the
    model an output is to be compared with when that is not the original."""
    import torch

    d = Path(workdir) / case.name
    d.mkdir(parents=True, exist_ok=True)
    model = build(case)
    ref = model if reference is None else reference(copy.deepcopy(model)).eval()
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(1234))
    out32, at32 = hooked_outputs(ref, list(case.verify_at), [x])
    out64, at64 = hooked_outputs(copy.deepcopy(ref).double(), list(case.verify_at), [x.double()])
    torch.save({"out32": out32, "out64": out64, "at32": at32, "at64": at64}, d / "refs.pt")
    torch.save([x], d / "inputs.pt")
    file = d / "model.pt"
    torch.save(model if case.form == "module" else model.state_dict(), file)
    noise = compare(out32, out32, out64)["noise_rel"] if not case.verify_at else 0.0
    return Prepared(case, d, model, x, file, sum(bn_like(m) for m in model.modules()),
                    sum(p.numel() for p in model.parameters()), noise)


def _summary(run: dict) -> dict:
    rep = run.pop("report") or {}
    if rep:
        run["bn_before"] = rep.get("before", {}).get("bn")
        run["bn_after"] = rep.get("after", {}).get("bn")
        run["skipped"] = [{"target": s["target"], "reason": s["reason"]} for s in rep.get("skipped", [])
                          if s.get("pass") == "fold-bn"]
        par = rep.get("parity") or {}
        run["parity"] = {k: par.get(k) for k in ("checked", "passed", "max_abs", "max_rel")}
        run["timings"] = rep.get("timings")
    return run


def surgery(prep: Prepared) -> dict:
    """fold-bn and optimize to .pt and .onnx (detectors: .pt only), every output reloaded."""
    runs, outputs = {}, []
    exts = ("pt",) if prep.case.verify_at else ("pt", "onnx")
    extra = [a for p in prep.case.verify_at for a in ("--verify-at", p)]
    shape = ",".join(map(str, prep.case.shape))
    for cmd in ("fold-bn", "optimize"):
        for ext in exts:
            key, out = f"{cmd}.{ext}", prep.dir / f"{cmd}.{ext}"
            out.unlink(missing_ok=True)
            runs[key] = _summary(cli(cmd, prep.file, "-o", out, "-s", shape, *form_args(prep.case), *extra))
            if runs[key]["code"] == 0 and out.exists():
                outputs.append({"key": key, "path": str(out), "kind": ext})
    if outputs:
        (prep.dir / "job.json").write_text(json.dumps(prep.job(outputs)))
        checked = python("reload_check.py", prep.dir / "job.json")
        for o in outputs:
            runs[o["key"]]["independent"] = checked.get(o["key"], {"error": checked.get("error", "not checked")})
    return runs


def fx_fuse(prep: Prepared) -> dict:
    """torch.fx.experimental.optimization.fuse on a copy: whether it traces, BNs it leaves."""
    import torch
    import torch.fx
    from torch.fx.experimental.optimization import fuse

    t = time.perf_counter()
    try:
        fused = fuse(copy.deepcopy(prep.model))
        with torch.no_grad():
            outs = flatten(fused(prep.x))
    except Exception as e:
        return {"traced": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    refs = torch.load(prep.dir / "refs.pt", weights_only=True)
    # fuse() folds BatchNorm modules the trace calls as leaves (torch.nn's own); the others (timm's
    # BatchNormAct2d, torchvision's FrozenBatchNorm2d) are traced through and stay as ops
    def leaf_bns(gm) -> int:
        return sum(n.op == "call_module" and bn_like(gm.get_submodule(n.target)) for n in gm.graph.nodes)

    folded = leaf_bns(torch.fx.symbolic_trace(prep.model)) - leaf_bns(fused)
    res = {"traced": True, "seconds": round(time.perf_counter() - t, 2), "bn_after": prep.bn_before - folded}
    res.update(compare(outs, refs["out32"], refs["out64"]))
    return res


def export(prep: Prepared, exporter: str, path: Path) -> dict:
    """The original model to ONNX: torch's default exporter (dynamo, external data) as a user
    calls it, or the legacy TorchScript one with constant folding off."""
    import torch

    for p in path.parent.glob(path.name + "*"):
        p.unlink()
    kw = {} if exporter == "default" else {"dynamo": False, "do_constant_folding": False}
    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(prep.model, (prep.x,), str(path), **kw)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer)
    return {"ok": True, "seconds": round(time.perf_counter() - t, 2), "nodes": len(g.node),
            "bn_nodes": sum(n.op_type == "BatchNormalization" for n in g.node), "external_data": external}


def onnx_route(prep: Prepared, exporter: str) -> dict:
    src, out = prep.dir / f"{exporter}.onnx", prep.dir / f"{exporter}.optimized.onnx"
    rec = {"export": export(prep, exporter, src)}
    if not rec["export"]["ok"]:
        return rec
    for p in out.parent.glob(out.name + "*"):
        p.unlink()
    rec["ours"] = _summary(cli("optimize", src, "-o", out))
    if rec["ours"]["code"] == 0 and out.exists():
        job = prep.dir / f"job-{exporter}.json"
        job.write_text(json.dumps(prep.job([{"key": "ours", "path": str(out), "kind": "onnx"}])))
        rec["ours"]["independent"] = python("reload_check.py", job).get("ours", {})
    rec.update(python("onnx_tools.py", src))
    return rec


def measure(case: Case, workdir: Path, parts: tuple[str, ...] = ("surgery", "fx", *EXPORTERS)) -> dict:
    """Everything the table shows for one classifier or detector."""
    t = time.perf_counter()
    prep = prepare(case, workdir)
    rec = {"case": case.name, "source": case.source, "model": case.model, "form": case.form,
           "shape": list(case.shape), "params": prep.params, "bn_before": prep.bn_before,
           "noise_rel": prep.noise_rel, "onnx": {}}
    if "surgery" in parts:
        rec["surgery"] = surgery(prep)
    if "fx" in parts:
        rec["fx"] = fx_fuse(prep)
    for exporter in EXPORTERS:
        if exporter in parts and not case.verify_at:
            rec["onnx"][exporter] = onnx_route(prep, exporter)
    rec["seconds"] = round(time.perf_counter() - t, 1)
    return rec


# --------------------------------------------------------------------------------------------
# judging a record


def _independent_problems(step: str, ind: dict) -> list[Problem]:
    if not ind.get("loaded"):
        return [Problem(step, "reload", ind.get("error", "not loaded"))]
    out = []
    if ind.get("modelsurgeon_imported"):
        out.append(Problem(step, "needs-modelsurgeon", "loading the output imported modelsurgeon"))
    if "error" in ind:
        out.append(Problem(step, "reload", ind["error"]))
    elif not ind.get("ok"):
        out.append(Problem(step, "parity", f"max rel {ind['max_rel']:.2e} (abs {ind['max_abs']:.2e}), "
                                           f"the original's own fp32 noise {ind['noise_rel']:.2e}"))
    return out


def run_problems(case: Case, step: str, run: dict) -> list[Problem]:
    if run["code"] != 0:
        return [Problem(step, "exit", f"{run['code']}: {run.get('stderr', '')}")]
    ind = run.get("independent") or {"error": "not checked"}
    out = _independent_problems(step, ind)
    left = ind.get("bn_left")
    if left is None:
        left_n = ind.get("bn_nodes", 0)
    else:
        left_n = len(left)
        reported = {p for s in run.get("skipped", []) for p in s["target"].split(" → ")}
        silent = [p for p in left if p not in reported]
        if silent:
            out.append(Problem(step, "bn-unreported", f"{len(silent)} BatchNorms left without a reason: {silent[:3]}"))
    skipped = run.get("skipped", [])
    if step.endswith(".pt"):  # the host that loads a .pt folds these itself
        host = [s for s in skipped if _HOST_LEFT.search(s["reason"])]
        skipped, left_n = [s for s in skipped if s not in host], left_n - len(host)
    if left_n > case.bn_left:  # one problem per kind of reason, so each is judged on its own
        kinds = Counter(_PATHS.sub("…", s["reason"]) for s in skipped)
        for reason, n in sorted(kinds.items()) or [("no reason given", left_n)]:
            out.append(Problem(step, "bn-left", f"{n} of {left_n} left (the case allows {case.bn_left}): {reason}"))
    return out


_HOST_LEFT = re.compile(r"^the host's \S+ reads .*: left to it$")
_PATHS = re.compile(r"(?<![\w.])(?!Tensor\.)/?[\w-]+(?:[./][\w-]+)+")  # module paths, ONNX node names


def judge_surgery(case: Case, rec: dict) -> list[Problem]:
    out = [p for step, run in rec["surgery"].items() for p in run_problems(case, step, run)]
    counted = {run.get("bn_before") for run in rec["surgery"].values()} - {None}
    if counted and counted != {rec["bn_before"]}:
        out.append(Problem("report", "bn-count", f"the report counts {sorted(counted)} BatchNorms, "
                                                 f"the model has {rec['bn_before']} BatchNorm-like modules"))
    return out


def judge_onnx(case: Case, rec: dict, exporter: str) -> list[Problem]:
    r = rec["onnx"][exporter]
    step = f"onnx-{exporter}"
    if not r["export"]["ok"]:
        return []  # the exporter's own limit, shown in the table
    return run_problems(case, step, r["ours"])
