"""Run onnxsim and onnxslim on an ONNX file as their users do; print node counts and times as one
JSON line (``python onnx_tools.py MODEL.onnx``). In its own process: a crash or a blow-up of
either tool is a figure in the table, not the end of the suite."""

from __future__ import annotations

import json
import sys
import time


def _count(model) -> dict:
    g = model.graph
    return {"nodes": len(g.node), "bn_nodes": sum(n.op_type == "BatchNormalization" for n in g.node)}


def run(path: str) -> dict:
    import onnx

    res: dict = {}
    for tool in ("onnxsim", "onnxslim"):
        model = onnx.load(path)
        t = time.perf_counter()
        try:
            if tool == "onnxsim":
                import onnxsim

                out, ok = onnxsim.simplify(model)
                if not ok:
                    raise RuntimeError("onnxsim's own check failed")
            else:
                import onnxslim

                out = onnxslim.slim(model)
            res[tool] = {**_count(out), "seconds": round(time.perf_counter() - t, 2)}
        except Exception as e:
            res[tool] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    return res


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1])))
