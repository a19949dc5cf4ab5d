"""``-o model.onnx`` from a PyTorch model: export, then onnxruntime parity against torch."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import Any

from ..errors import BadInput, first_line


ORT_MIN_OPSET = 7  # the oldest opset onnxruntime runs


def check_opset(opset: int) -> None:
    """An opset the exporter can write and onnxruntime can run, or exit 2 before any work."""
    from torch.onnx import _constants

    lo, hi = max(_constants.ONNX_MIN_OPSET, ORT_MIN_OPSET), _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    if not lo <= opset <= hi:
        raise BadInput(f"--opset {opset}: ONNX outputs exported from PyTorch can use opsets {lo} to {hi}")


def export(model: Any, inputs: list, path: Path, opset: int = 17) -> None:
    """Export with the TorchScript-based exporter: it records the path the example input takes,
    so models with data-dependent Python control flow export as they ran."""
    import torch

    names_in = [f"input{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _stdout_to_devnull():  # the exporter prints whole graphs on failure
                torch.onnx.export(model, tuple(inputs), str(path), dynamo=False, opset_version=opset,
                                  do_constant_folding=True, input_names=names_in)
        except OSError:
            raise  # the write failed: reported by the atomic writer as "cannot write"
        except Exception as e:
            raise BadInput(f"ONNX export failed: {first_line(e, typed=True)}")


@contextlib.contextmanager
def _stdout_to_devnull():
    """Point file descriptor 1 at /dev/null (C++ code writes there directly): stdout carries
    the report, and ``--json`` promises nothing else."""
    import os
    import sys

    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable stdout: nothing to protect
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def ort_run(path_or_bytes: Any, inputs: list) -> list:
    """Run an ONNX model with onnxruntime, all graph optimisations off (so runtime fusions
    cannot hide a mistake). ``inputs`` are numpy arrays or tensors, in graph-input order."""
    import numpy as np
    import onnxruntime as ort

    from ..verify.compare import to_numpy

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.asarray(to_numpy(x)) for i, x in zip(sess.get_inputs(), inputs)}
    return sess.run(None, feeds)
