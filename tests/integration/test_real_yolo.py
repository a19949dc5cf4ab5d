"""YOLOv5 and Ultralytics checkpoints built from their packages' own yaml files and saved as
their trainers save, through ``fold-bn`` / ``focus-to-conv`` / ``optimize``, then loaded by
the host's own loader (which fuses Conv + BatchNorm itself) and run."""

from __future__ import annotations

import pytest
from cases import YOLO
from sweep import PACKAGES, check, problems_of, require, sweeper  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("case", YOLO, ids=lambda c: c.name)
def test_yolo_host_loader(sweeper, case):
    require(case.host, *PACKAGES)
    rec = sweeper.yolo(case)
    assert rec["built"].get("bn"), rec["built"]
    check(case.name, problems_of(case, rec, "host"))
