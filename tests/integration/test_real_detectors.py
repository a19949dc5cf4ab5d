"""torchvision detectors: ``fold-bn`` / ``optimize`` with ``--verify-at`` on the parts whose
outputs are not post-processed (the backbone, the heads): top-k and NMS break ties differently
after any rewrite, so comparing final detections says nothing about the fold."""

from __future__ import annotations

import pytest
from cases import DETECTORS
from sweep import check, problems_of, sweeper  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("case", DETECTORS, ids=lambda c: c.name)
def test_detector(sweeper, case):
    rec = sweeper.part(case, "surgery")
    check(case.name, problems_of(case, rec, "surgery"))
