"""CI runs the benchmark suite in its smoke mode: every section is produced (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_smoke(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path), "--no-docs"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    fb = res["fold_bn"][0]
    assert fb["a"]["exit_codes"] == [0] and fb["b"]["exit_codes"] == [0]
    assert fb["ratio_wall"]["median"] > 0 and fb["ratio_rss"]["median"] > 0
    # the per-stage breakdown ran (a failed run or a renamed timing would print "-" silently)
    assert set(fb["breakdown"]["modelsurgeon"]) == {"import", "load", "capture", "reference", "rewrite", "verify", "save"}
    assert set(fb["breakdown"]["baseline"]) == {"load", "save"}
    assert set(res["startup"]) == {"--help", "--version"}
    names = [m["model"] for m in res["models"]]
    assert len(names) == 3
    for m in res["models"]:
        assert m["bn_calls"]["original"] > 0 and m["bn_calls"]["modelsurgeon"] == 0
        assert m["max_rel_error_vs_float64"]["modelsurgeon"] < 1e-5
    assert any("fx_fuse" in m and "fails" in str(m["fx_fuse"]) for m in res["models"])  # the YOLO model
    assert "## fold-bn vs plain torch.load" in r.stdout


def test_onnx_bench_smoke(tmp_path):
    """The ONNX optimize table in its smoke mode: every row written, modelsurgeon's results exact
    and free of BatchNorm; peers that are not installed are said so, not failed."""
    r = subprocess.run([sys.executable, "-m", "bench.onnx_optimize", "--smoke", "--modes", "nofold", "--out",
                        str(tmp_path), "--no-docs"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "onnx_results.json").read_text())
    assert len(res["rows"]) == 3
    for row in res["rows"]:
        ours = row["counts"]["modelsurgeon"]
        assert ours["bn"] == 0 and ours["nodes"] < row["counts"]["original"]["nodes"]
        assert row["max_rel_error"]["modelsurgeon"] < 1e-4
        assert set(row["latency_1_thread"]) >= {"original", "modelsurgeon"}
        for peer in ("onnxsim", "onnxslim", "onnxscript"):
            assert peer in row["counts"] or peer in row.get("not_installed", []) or peer in row.get("failed", {})
    assert "## ONNX optimize" in r.stdout
