"""One pass over the cases, part by part, as the tests and the coverage table both run it: a
case's model is built once for all its parts, its files are removed when the next case starts,
and every record is stored as JSON (``.integration-out/records/``) for the table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

import measure
from cases import Case, Problem, YoloCase, known_reasons

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
RECORDS = ROOT / ".integration-out" / "records"
PARTS = ("surgery", "onnx-default", "onnx-legacy")
PACKAGES = ("torchvision", "timm", "onnxsim", "onnxslim")


def require(*modules: str) -> None:
    """Skip unless the integration packages are installed (found, not imported: yolov5 edits
    sys.path when imported, so the host packages are only imported in child processes)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: bash tests/integration/setup.sh")


def parts_of(case: Case) -> tuple[str, ...]:
    """Detectors: the PyTorch surgery only (their post-processing is not what ONNX export is for)."""
    return ("surgery",) if case.verify_at else PARTS


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=30).stdout.strip()
    except OSError:
        return ""


class Sweep:
    def __init__(self, workdir: Path, records: Path = RECORDS, keep_files: bool = False):
        self.workdir, self.records, self.keep = Path(workdir), Path(records), keep_files
        self.records.mkdir(parents=True, exist_ok=True)
        self._prep: measure.Prepared | None = None
        self._done: dict[str, dict] = {}
        self.commit = _commit()

    def _prepared(self, case: Case) -> measure.Prepared:
        if self._prep is None or self._prep.case.name != case.name:
            self._release()
            self._prep = measure.prepare(case, self.workdir)
        return self._prep

    def _release(self) -> None:
        if self._prep is not None and not self.keep:
            shutil.rmtree(self._prep.dir, ignore_errors=True)
        self._prep = None

    def _record(self, name: str, base: dict) -> dict:
        if name not in self._done:
            path = self.records / f"{name}.json"
            old = json.loads(path.read_text()) if path.exists() else {}
            self._done[name] = {**old, **base, "onnx": old.get("onnx", {}), "seconds": old.get("seconds", {})}
        return self._done[name]

    def _store(self, name: str, part: str, t0: float) -> dict:
        rec = self._done[name]
        rec["seconds"][part] = round(time.perf_counter() - t0, 1)
        rec.setdefault("measured", {})[part] = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                                "commit": self.commit}
        tmp = self.records / f".{name}.json.tmp"
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(self.records / f"{name}.json")
        return rec

    def part(self, case: Case, part: str) -> dict:
        """Measure one part of a case (``surgery`` also runs torch.fx's fuse); the record so far."""
        t0 = time.perf_counter()
        prep = self._prepared(case)
        rec = self._record(case.name, {
            "case": case.name, "source": case.source, "model": case.model, "form": case.form,
            "shape": list(case.shape), "params": prep.params, "bn_before": prep.bn_before,
            "noise_rel": prep.noise_rel})
        if part == "surgery":
            rec["surgery"] = measure.surgery(prep)
            rec["fx"] = measure.fx_fuse(prep)
        else:
            rec["onnx"][part.removeprefix("onnx-")] = measure.onnx_route(prep, part.removeprefix("onnx-"))
        if part == parts_of(case)[-1]:
            self._release()
        return self._store(case.name, part, t0)

    def yolo(self, case: YoloCase) -> dict:
        import hosts

        self._release()
        t0 = time.perf_counter()
        self._done[case.name] = {**hosts.measure_yolo(case, self.workdir), "seconds": {}}
        if not self.keep:
            shutil.rmtree(self.workdir / case.name, ignore_errors=True)
        return self._store(case.name, "host", t0)

    def close(self) -> None:
        self._release()


def problems_of(case: Case | YoloCase, rec: dict, part: str) -> list[Problem]:
    import hosts

    if isinstance(case, YoloCase):
        return hosts.judge_yolo(case, rec)
    if part == "surgery":
        return measure.judge_surgery(case, rec)
    return measure.judge_onnx(case, rec, part.removeprefix("onnx-"))


def verdict(name: str, problems: list[Problem]) -> tuple[str, str]:
    """``pass``, ``xfail`` (every problem is a known one; the reasons) or ``fail`` (the problems)."""
    if not problems:
        return "pass", ""
    reasons, unknown = known_reasons(name, problems)
    if unknown:
        return "fail", "\n".join(map(str, problems))
    return "xfail", "; ".join(reasons)


def check(name: str, problems: list[Problem]) -> None:
    """End a test as its verdict says."""
    status, text = verdict(name, problems)
    if status == "fail":
        pytest.fail(text, pytrace=False)
    if status == "xfail":
        pytest.xfail(text)


_shared: list[Sweep] = []


@pytest.fixture(scope="session")
def sweeper(tmp_path_factory):
    """The one Sweep of a test session (the test modules import this fixture; a conftest.py
    here would shadow the suite's own ``conftest`` module)."""
    require(*PACKAGES)
    if not _shared:
        _shared.append(Sweep(tmp_path_factory.mktemp("integration")))
    yield _shared[0]
    _shared[0].close()
