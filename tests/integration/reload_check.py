"""Load what modelsurgeon wrote the way its users do -- ``torch.load``, a state_dict into the
factory's model, onnxruntime -- with modelsurgeon made unimportable, run it, and compare with
the original model's outputs recorded beforehand.

Run as ``python reload_check.py JOB.json``; prints one JSON object. The comparison helpers are
also the ones the parent process uses (torch.fx ``fuse``), so every figure is measured alike.
"""

from __future__ import annotations

import importlib
import importlib.abc
import json
import sys
from pathlib import Path

ATOL, RTOL = 1e-6, 1e-4  # modelsurgeon's float32 defaults, applied to every output


class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modelsurgeon" or name.startswith("modelsurgeon."):
            raise ImportError("modelsurgeon is not importable here: its outputs must load without it")
        return None


def bn_like(m) -> bool:
    """A module with BatchNorm statistics: every ``_BatchNorm``, timm's ``BatchNormAct2d``,
    torchvision's ``FrozenBatchNorm2d`` (buffers only), ... (instance norms excluded)."""
    import torch

    if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm):
        return False
    return all(isinstance(getattr(m, a, None), torch.Tensor) for a in ("running_mean", "running_var"))


def flatten(obj) -> list:
    """The tensors of an output, in a fixed order (nested tuples, lists, dicts, dataclass-like)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in flatten(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flatten(v)]
    if hasattr(obj, "__dict__"):
        return [t for v in vars(obj).values() for t in flatten(v)]
    return []


def compare(outs: list, refs32: list, refs64: list, atol: float = ATOL, rtol: float = RTOL) -> dict:
    """Errors of ``outs`` against the original's float32 and float64 outputs. An output passes
    within modelsurgeon's float32 tolerance of the float32 reference, or when it is no further
    from the float64 one than twice the original's own float32 rounding (``noise``)."""
    import torch

    if len(outs) != len(refs32):
        return {"error": f"{len(outs)} outputs, the original has {len(refs32)}"}
    worst = {"max_abs": 0.0, "max_rel": 0.0, "noise_rel": 0.0, "ok": True, "compared": 0}
    for o, r, r64 in zip(outs, refs32, refs64):
        o = torch.as_tensor(o)
        if not r.is_floating_point():
            continue
        if o.shape != r.shape:
            return {"error": f"output shape {tuple(o.shape)} differs from the original's {tuple(r.shape)}"}
        o, r, r64 = o.double(), r.double(), r64.double()
        scale = float(r64.abs().max()) if r64.numel() else 0.0
        err = float((o - r).abs().max()) if o.numel() else 0.0
        err64 = float((o - r64).abs().max()) if o.numel() else 0.0
        noise = float((r - r64).abs().max()) if o.numel() else 0.0
        ok = err <= atol + rtol * scale or err64 <= 2 * noise
        worst["max_abs"] = max(worst["max_abs"], err)
        worst["max_rel"] = max(worst["max_rel"], err / scale if scale else err)
        worst["noise_rel"] = max(worst["noise_rel"], noise / scale if scale else noise)
        worst["ok"] = worst["ok"] and ok
        worst["compared"] += 1
    return worst


def hooked_outputs(model, paths: list[str], inputs: list) -> tuple[list, dict]:
    """Run ``model`` once; its flattened outputs and those of the modules at ``paths``."""
    import torch

    seen: dict[str, list] = {}

    def keep(path: str):
        def hook(module, args, out) -> None:  # returns None: the module's output stays as it is
            seen.setdefault(path, [t.detach().clone() for t in flatten(out)])
        return hook

    handles = [model.get_submodule(p).register_forward_hook(keep(p)) for p in paths]
    try:
        with torch.no_grad():
            out = flatten(model(*inputs))
    finally:
        for h in handles:
            h.remove()
    return out, seen


# --------------------------------------------------------------------------------------------
# loading the way users load


def _replay(model, recipe: list[dict]):
    """A modelsurgeon state_dict's structural edits, replayed with torch alone (the edits are
    plain data: torch.nn classes and their arguments, a fused forward of the model's class)."""
    import torch

    def build(spec):
        if "from" in spec:
            return model.get_submodule(spec["from"])
        cls = getattr(torch.nn, spec["class"])
        if spec["class"] == "Sequential":
            return cls(*(build(c) for c in spec.get("children", [])))
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("kwargs", {}).items()})

    for e in recipe:
        parent, _, name = e["path"].rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if e["op"] == "replace":
            setattr(owner, name, build(e["module"]))
        elif e["op"] == "add_bias":
            m = model.get_submodule(e["path"])
            n = m.out_channels if hasattr(m, "out_channels") else m.out_features
            m.bias = torch.nn.Parameter(torch.zeros(n, dtype=m.weight.dtype))
        elif e["op"] == "setattr":
            setattr(model.get_submodule(e["path"]), e["name"], e["value"])
        elif e["op"] == "use_forward":  # what a host's fuse() does: m.forward = m.forward_fuse
            m = model.get_submodule(e["path"])
            for name in e["remove"]:
                delattr(m, name)
            m.forward = getattr(m, e["method"])
        else:
            raise RuntimeError(f"recipe edit {e['op']!r} cannot be replayed without modelsurgeon")
    return model


def load_torch(path: str):
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, dict) and "modelsurgeon" in obj and "state_dict" in obj:
        meta = obj["modelsurgeon"]
        mod_name, _, attr = meta["arch"].partition(":")
        model = getattr(importlib.import_module(mod_name), attr)(**meta["arch_kwargs"])
        _replay(model, meta["recipe"])
        model.load_state_dict(obj["state_dict"], strict=True)
        return model
    raise RuntimeError(f"{path}: a {type(obj).__name__} this check does not know how to run")


def run_one(out: dict, inputs: list, refs: dict, verify_at: list[str]) -> dict:
    import torch

    res: dict = {"loaded": False}
    try:
        if out["kind"] == "onnx":
            import onnx
            import onnxruntime as ort

            sess = ort.InferenceSession(out["path"], providers=["CPUExecutionProvider"])
            feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
            res["loaded"] = True
            outs = [torch.from_numpy(a) for a in sess.run(None, feed)]
            g = onnx.load(out["path"], load_external_data=False).graph
            res["bn_nodes"] = sum(n.op_type == "BatchNormalization" for n in g.node)
            res["nodes"] = len(g.node)
            res.update(compare(outs, refs["out32"], refs["out64"]))
            return res
        model = load_torch(out["path"]).float().eval()
        res["loaded"] = True
        res["bn_left"] = [p for p, m in model.named_modules() if bn_like(m)]
        res["params"] = sum(p.numel() for p in model.parameters())
        outs, at = hooked_outputs(model, verify_at, inputs)
        if verify_at:
            per = {p: compare(at.get(p, []), refs["at32"][p], refs["at64"][p]) for p in verify_at}
            res["verify_at"] = per
            res["final"] = compare(outs, refs["out32"], refs["out64"])
            bad = [p for p, r in per.items() if "error" in r or not r["ok"]]
            res.update({"max_abs": max(r.get("max_abs", 0) for r in per.values()),
                        "max_rel": max(r.get("max_rel", 0) for r in per.values()),
                        "noise_rel": max(r.get("noise_rel", 0) for r in per.values()), "ok": not bad})
            if any("error" in r for r in per.values()):
                res["error"] = "; ".join(f"{p}: {r['error']}" for p, r in per.items() if "error" in r)
        else:
            res.update(compare(outs, refs["out32"], refs["out64"]))
    except Exception as e:  # reported, judged by the parent
        res["error"] = f"{type(e).__name__}: {e}"[:500]
    return res


def main(job_path: str) -> None:
    sys.meta_path.insert(0, _Blocked())
    import torch

    job = json.loads(Path(job_path).read_text())
    for p in job.get("code_paths", []):
        sys.path.insert(0, p)
    torch.manual_seed(0)
    inputs = torch.load(job["inputs"], weights_only=True)
    refs = torch.load(job["refs"], weights_only=True)
    results = {o["key"]: run_one(o, inputs, refs, job.get("verify_at", [])) for o in job["outputs"]}
    for r in results.values():
        r["modelsurgeon_imported"] = any(m == "modelsurgeon" or m.startswith("modelsurgeon.") for m in sys.modules)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
