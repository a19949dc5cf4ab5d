"""Structural re-parameterisation against timm's own ``reparameterize_model``: RepVGG,
MobileOne, FastViT, RepGhost and RepViT re-parameterised by modelsurgeon must compute what
timm's deploy-mode model computes, with no more parameters. Skipped until modelsurgeon has a
``reparam`` command; the body below is what then runs."""

from __future__ import annotations

import json
import subprocess
import sys

import measure
import pytest
from cases import CLASSIFIERS
from sweep import PACKAGES, require

pytestmark = pytest.mark.integration

REPARAM = [c for c in CLASSIFIERS if c.reparam]


def has_command(name: str) -> bool:
    p = subprocess.run([sys.executable, "-m", "modelsurgeon", name, "--help"], capture_output=True, timeout=300)
    return p.returncode == 0


@pytest.mark.parametrize("case", REPARAM, ids=lambda c: c.name)
def test_reparam_matches_timm(case, tmp_path):
    require(*PACKAGES)
    if not has_command("reparam"):
        pytest.skip("modelsurgeon has no `reparam` command yet: this test runs as soon as it does")
    from timm.utils.model import reparameterize_model

    prep = measure.prepare(case, tmp_path, reference=reparameterize_model)
    out = prep.dir / "reparam.pt"
    run = measure.cli("reparam", prep.file, "-o", out, "-s", ",".join(map(str, case.shape)),
                      *measure.form_args(case))
    assert run["code"] == 0, run.get("stderr")
    (prep.dir / "job.json").write_text(json.dumps(prep.job([{"key": "reparam", "path": str(out), "kind": "pt"}])))
    res = measure.python("reload_check.py", prep.dir / "job.json")["reparam"]
    assert res.get("loaded") and not res.get("modelsurgeon_imported"), res
    assert res.get("ok"), f"differs from timm's reparameterize_model: {res}"
    timm_params = sum(p.numel() for p in reparameterize_model(measure.build(case)).parameters())
    assert res["params"] <= timm_params, f"{res['params']} parameters left, timm's deploy model has {timm_params}"
