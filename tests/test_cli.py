"""The CLI: exit codes, one-line errors, --json, --dry-run, nothing written on failure."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES, files_in, run_cli, run_console

ARCH = ["--arch", "zoo.mobilenetv2:mobilenet_v2", "--code-path", str(EXAMPLES)]


def test_version_and_help_via_console_script():
    r = run_console("--version")
    assert r.code == 0 and r.out.startswith("modelsurgeon ")
    r = run_console("--help")
    assert r.code == 0 and "fold-bn" in r.out


def test_fold_bn_via_console_script(ckpts, tmp_path):
    out = tmp_path / "o.pt"
    r = run_console("fold-bn", ckpts / "resnet.pt", "--trust-pickle", "--code-path", EXAMPLES,
                    "-s", "1,3,32,32", "-o", out, "--json")
    assert r.code == 0, r.err
    rep = json.loads(r.out)
    for key in ("command", "input", "output", "applied", "skipped", "parity", "before", "after"):
        assert key in rep
    assert rep["parity"]["passed"] is True and rep["parity"]["max_abs"] >= 0
    assert out.exists()


def test_json_report_fields(ckpts, tmp_path):
    r = run_cli("fold-bn", ckpts / "mobilenetv2.pt", *ARCH, "-s", "1,3,64,64", "-o", tmp_path / "o.pt", "--json")
    rep = r.json()
    assert rep["command"] == "fold-bn" and rep["written"] is True
    assert rep["before"]["bn"] == 52 and rep["after"]["bn"] == 0
    assert rep["before"]["flops"] >= rep["after"]["flops"] > 0
    assert rep["after"]["params"] < rep["before"]["params"]
    assert all({"pass", "target", "detail"} <= set(a) for a in rep["applied"])
    assert r.err == ""


def test_dry_run_writes_nothing(ckpts, tmp_path):
    before = files_in(tmp_path)
    r = run_cli("fold-bn", ckpts / "mobilenetv2.pt", *ARCH, "-s", "1,3,64,64", "-o", tmp_path / "o.pt", "--dry-run", "--json")
    assert r.code == 0
    assert r.json()["dry_run"] is True and r.json()["written"] is False
    assert len(r.json()["applied"]) == 52
    # nothing was rewritten, so nothing was verified: the report must not claim parity
    assert r.json()["parity"]["checked"] is False and "dry-run" in r.json()["parity"]["note"]
    assert files_in(tmp_path) == before


def test_default_output_name_and_no_overwrite_of_input(ckpts, tmp_path):
    import shutil

    src = tmp_path / "mb.pt"
    shutil.copy(ckpts / "mobilenetv2.pt", src)
    data = src.read_bytes()
    r = run_cli("fold-bn", src, *ARCH, "-s", "1,3,64,64", "-q")
    assert r.code == 0 and (tmp_path / "mb.fold-bn.pt").exists()
    r = run_cli("fold-bn", src, *ARCH, "-s", "1,3,64,64", "-o", src)
    assert r.code == 2 and "--in-place" in r.err
    assert src.read_bytes() == data
    r = run_cli("fold-bn", src, *ARCH, "-s", "1,3,64,64", "--in-place", "-q")
    assert r.code == 0 and src.read_bytes() != data


@pytest.mark.parametrize("args,msg", [
    (["-s", "1,3,x"], "--input-shape"),
    (["-s", "1,5,64,64"], "cannot run on inputs"),
    (["-s", "1,3,64,64", "--trials", "0"], "--trials"),
    (["-s", "1,3,64,64", "--dtype", "float8"], "--dtype"),
    (["-s", "1,3,64,64", "-o", "/nonexistent/dir/o.pt"], "output directory does not exist"),
    (["-s", "1,3,64,64", "-o", "out.txt"], "output format"),
    (["--bogus-option"], "No such option"),
])
def test_bad_input_is_one_line_exit_2(ckpts, tmp_path, args, msg):
    before = files_in(tmp_path)
    if "-o" not in args:
        args = args + ["-o", str(tmp_path / "o.pt")]
    r = run_cli("fold-bn", ckpts / "mobilenetv2.pt", *ARCH, *args)
    assert r.code == 2, (r.code, r.err)
    assert msg in r.err
    assert r.err.count("\n") == 1 and "Traceback" not in r.err
    assert files_in(tmp_path) == before


def test_parity_failure_exits_1_and_writes_nothing(ckpts, tmp_path, monkeypatch):
    from modelsurgeon.rewrite import affine

    real = affine.fold_bias

    def broken(bias, scale, shift):
        return real(bias, scale, shift) + 1.0  # a wrong bias

    import modelsurgeon.passes.fold_bn.torch as fb

    monkeypatch.setattr(fb, "fold_bias", broken)
    out = tmp_path / "o.pt"
    r = run_cli("fold-bn", ckpts / "mobilenetv2.pt", *ARCH, "-s", "1,3,64,64", "-o", out, "--json")
    assert r.code == 1
    assert r.json()["parity"]["passed"] is False
    assert "parity failed" in r.err
    assert not out.exists() and files_in(tmp_path) == set()
    r = run_cli("fold-bn", ckpts / "mobilenetv2.pt", *ARCH, "-s", "1,3,64,64", "-o", out, "--force", "-q")
    assert r.code == 0 and out.exists()


def test_no_verify_skips_parity(ckpts, tmp_path):
    r = run_cli("fold-bn", ckpts / "mobilenetv2.pt", *ARCH, "-s", "1,3,64,64", "-o", tmp_path / "o.pt",
                "--no-verify", "--json")
    assert r.code == 0 and r.json()["parity"]["checked"] is False


def test_debug_shows_traceback(ckpts, tmp_path):
    r = run_cli("fold-bn", tmp_path / "missing.pt", "--debug")
    assert r.code == 2 and "Traceback" in r.err


def test_human_report(ckpts, tmp_path):
    r = run_cli("fold-bn", ckpts / "caffenet.pt", "--trust-pickle", "-o", tmp_path / "c.pt")
    assert r.code == 0
    assert "Rewritten" in r.out and "Parity" in r.out and "BatchNorm" in r.out
    assert "guessed" in r.out
