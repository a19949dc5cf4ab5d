"""YOLO checkpoints in their host projects' own terms: built from the package's yaml, saved as
its trainer saves (fp16 ``model`` / ``ema`` in a dict with the training state), loaded back by
its own loader -- YOLOv5's ``attempt_load``, Ultralytics' ``load_checkpoint`` (formerly
``attempt_load_one_weight``) -- which fuse Conv + BatchNorm themselves.

The parent side (:func:`measure_yolo`, :func:`judge_yolo`) runs the host code only in child
processes: ``python hosts.py build|run ...``, with modelsurgeon unimportable in ``run``.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

from cases import Problem, YoloCase

HERE = Path(__file__).resolve().parent
FP16_ATOL, FP16_RTOL = 1e-4, 1e-2  # modelsurgeon's float16 defaults: the checkpoints store fp16
# YOLOv5 7.0 calls torch.load without weights_only; since torch 2.6 its users set this
HOST_ENV = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}


def _cfg_path(host: str, cfg: str) -> str:
    if (HERE / cfg).exists():
        return str(HERE / cfg)
    if host == "yolov5":
        import yolov5

        return str(Path(yolov5.__path__[0]) / "models" / cfg)
    return cfg  # Ultralytics resolves its own names (yolov8n.yaml -> v8/yolov8.yaml, scale n)


def build(host: str, cfg: str, out: str, shape: str) -> dict:
    """A random model with random BatchNorm statistics, saved like the host's trainer does."""
    from copy import deepcopy

    import torch
    from measure import randomize_bn
    from reload_check import bn_like

    torch.manual_seed(0)
    if host == "yolov5":
        from yolov5.models.yolo import Model

        model = Model(_cfg_path(host, cfg), ch=3, nc=80)
        model.nc, model.names, model.hyp = 80, [f"class{i}" for i in range(80)], {"lr0": 0.01}
    else:
        from ultralytics.nn.tasks import DetectionModel

        model = DetectionModel(_cfg_path(host, cfg), nc=80, verbose=False)
        model.names = {i: f"class{i}" for i in range(80)}
    n = randomize_bn(model, seed=0)
    ema = deepcopy(model)
    randomize_bn(ema, seed=1)  # the EMA's weights are not the model's
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.937)
    common = {"epoch": 299, "best_fitness": 0.0, "updates": 1000, "optimizer": opt.state_dict(),
              "date": datetime.now().isoformat()}
    if host == "yolov5":  # yolov5/train.py
        ckpt = {**common, "model": deepcopy(model).half(), "ema": deepcopy(ema).half(),
                "opt": {"imgsz": 64, "epochs": 300}, "git": {"remote": "", "branch": "", "commit": ""}}
    else:  # ultralytics/engine/trainer.py: the EMA is the model
        ckpt = {**common, "model": None, "ema": deepcopy(ema).half(), "train_args": {"imgsz": 64},
                "train_metrics": {}, "train_results": {}, "version": "8", "license": "AGPL-3.0"}
    torch.save(ckpt, out)
    x = torch.randn(tuple(int(v) for v in shape.split(",")), generator=torch.Generator().manual_seed(1234))
    torch.save([x], str(Path(out).with_name("inputs.pt")))
    return {"params": sum(p.numel() for p in model.parameters()), "bn": n,
            "bn_ema": sum(bn_like(m) for m in ema.modules())}


def host_load(host: str, path: str):
    """The host's own loader, fusing: what detect.py / val.py / export.py / YOLO() do."""
    if host == "yolov5":
        from yolov5.models.experimental import attempt_load

        return attempt_load(path, device="cpu", fuse=True)
    import ultralytics.nn.tasks as tasks

    load = getattr(tasks, "load_checkpoint", None) or tasks.attempt_load_one_weight
    return load(path, device="cpu", fuse=True)[0]


def run(host: str, original: str, output: str, inputs: str) -> dict:
    """Both files through the host's loader (modelsurgeon unimportable); the output's
    detections compared with the original's."""
    from reload_check import _Blocked, compare, flatten

    sys.meta_path.insert(0, _Blocked())
    import torch

    x = torch.load(inputs, weights_only=True)
    res: dict = {"loaded": False}
    try:
        ref = host_load(host, original).eval()
        with torch.no_grad():
            r = flatten(ref(*x))[0]
        res["bn_in_fused_original"] = sum(type(m).__name__.startswith("BatchNorm") for m in ref.modules())
        out = host_load(host, output).eval()
        res["loaded"] = True
        with torch.no_grad():
            o = flatten(out(*x))[0]
        res.update(compare([o], [r], [r], atol=FP16_ATOL, rtol=FP16_RTOL))
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    res["modelsurgeon_imported"] = any(m.split(".")[0] == "modelsurgeon" for m in sys.modules)
    return res


# --------------------------------------------------------------------------------------------
# parent side


def _child(*args: str | Path) -> dict:
    from measure import python

    return python("hosts.py", *args, env=HOST_ENV)


def measure_yolo(case: YoloCase, workdir: Path) -> dict:
    from measure import _summary, cli

    d = Path(workdir) / case.name
    d.mkdir(parents=True, exist_ok=True)
    src = d / "last.pt"
    shape = ",".join(map(str, case.shape))
    rec = {"case": case.name, "host": case.host, "cfg": case.cfg, "shape": list(case.shape),
           "built": _child("build", case.host, case.cfg, src, shape), "runs": {}}
    if "error" in rec["built"]:
        return rec
    for cmd in case.commands:
        out = d / f"{cmd}.pt"
        out.unlink(missing_ok=True)
        run = _summary(cli(cmd, src, "-o", out, "-s", shape, "--trust-pickle"))
        if run["code"] == 0:
            run["host"] = _child("run", case.host, src, out, d / "inputs.pt")
        rec["runs"][cmd] = run
    return rec


def judge_yolo(case: YoloCase, rec: dict) -> list[Problem]:
    if "error" in rec["built"]:
        return [Problem(case.name, "build", rec["built"]["error"])]
    problems = []
    for cmd, run in rec["runs"].items():
        if run["code"] != 0:
            problems.append(Problem(cmd, "exit", f"{run['code']}: {run.get('stderr', '')}"))
            continue
        h = run.get("host", {})
        if "error" in h:
            problems.append(Problem(cmd, "loader", h["error"]))
        elif not h.get("ok"):
            problems.append(Problem(cmd, "parity", f"max rel {h.get('max_rel', float('nan')):.2e} "
                                                   "through the host's loader"))
        if h.get("modelsurgeon_imported"):
            problems.append(Problem(cmd, "needs-modelsurgeon", "the host's loader imported modelsurgeon"))
    return problems


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    print(json.dumps(build(*rest) if mode == "build" else run(*rest)))
