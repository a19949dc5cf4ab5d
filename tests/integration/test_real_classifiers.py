"""timm and torchvision classifiers (random weights, random BatchNorm statistics) through
``fold-bn`` and ``optimize`` to .pt and .onnx, each output reloaded without modelsurgeon and
compared with the original; then ONNX files from both of torch's exporters through
``optimize``, next to onnxsim and onnxslim. What a case may keep, and the known failures, are
in ``cases.py``."""

from __future__ import annotations

import pytest
from cases import CLASSIFIERS
from sweep import check, parts_of, problems_of, sweeper  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

PARAMS = [pytest.param(c, part, id=f"{c.name}-{part}") for c in CLASSIFIERS for part in parts_of(c)]


@pytest.mark.parametrize("case,part", PARAMS)
def test_classifier(sweeper, case, part):
    rec = sweeper.part(case, part)
    check(case.name, problems_of(case, rec, part))
