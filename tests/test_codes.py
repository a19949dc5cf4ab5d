"""Stable codes: the registry (modelsurgeon/report/codes.py), the tables of docs/json.md and
every code the source hands out agree; skips carry their codes in the JSON report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from modelsurgeon.passes.base import Skipped
from modelsurgeon.report.codes import BUILTIN_CODES, CODES, ERRORS, Refusal, register_code, registered

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "modelsurgeon"


def _table(text: str, heading: str) -> dict[str, str]:
    """``code -> meaning`` of the first table after ``heading`` (its last column)."""
    part = text[text.index(heading):]
    rows = {}
    for line in part.splitlines():
        m = re.match(r"\| `([a-z0-9-]+)` \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2).split(" | ")[-1].strip()
        elif rows and not line.startswith("|"):
            break
    return rows


def test_docs_tables_are_the_registry():
    doc = (ROOT / "docs" / "json.md").read_text(encoding="utf-8")
    assert _table(doc, "## Skip and refusal codes") == BUILTIN_CODES
    assert _table(doc, "## Failure") == ERRORS


def test_codes_are_kebab_case_and_meanings_one_line():
    for code, meaning in {**BUILTIN_CODES, **ERRORS}.items():
        assert re.fullmatch(r"[a-z]+(-[a-z0-9]+)*", code), code
        assert meaning and "\n" not in meaning, code


def test_every_code_in_the_source_is_registered():
    """Codes are string literals at the place a refusal or error is made: each one is listed."""
    literal = re.compile(r'(?:\bcode\s*=\s*|Refus(?:al|ed)\()"([a-z0-9-]+)"')
    named = re.compile(r'Refus(?:al|ed)\(([A-Z][A-Z_]+),')
    constant = re.compile(r'^([A-Z][A-Z_]+) = "([a-z0-9-]+)"', re.M)
    found: dict[str, str] = {}
    constants: dict[str, str] = {}
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        if path.name == "codes.py":
            continue
        text = path.read_text(encoding="utf-8")
        for m in literal.finditer(text):
            found[m.group(1)] = str(path.relative_to(ROOT))
        names.update(named.findall(text))  # named codes: Refused(NOT_REPRODUCED, ...), Refusal(HOST_READS, ...)
        constants.update((m.group(1), m.group(2)) for m in constant.finditer(text))
    assert names and names <= set(constants)
    found.update((constants[n], n) for n in names)
    assert len(found) > 30
    missing = {c: where for c, where in found.items() if not registered(c)}
    assert not missing


def test_skipped_takes_a_refusal_with_its_code_and_reports_it_in_json():
    s = Skipped("conv1", Refusal("tied-tensor", "its weight is shared with conv2 (tied)"), pass_name="fold-bn")
    assert (s.code, s.reason) == ("tied-tensor", "its weight is shared with conv2 (tied)")
    d = s.to_json()
    assert d["code"] == "tied-tensor" and d["reason"] == s.reason and d["target"] == "conv1"
    r = Refusal("hook", "x")
    assert str(r) == "x" and r.reworded("y: x") == Refusal("hook", "y: x")


def test_register_code_keeps_existing_meanings():
    register_code("hook", CODES["hook"])  # the same meaning again: fine
    with pytest.raises(ValueError):
        register_code("hook", "something else")
    register_code("example-plugin-code", "a code a pass from another package adds")
    try:
        assert registered("example-plugin-code")
    finally:
        CODES.pop("example-plugin-code")


class _Skips(nn.Module):
    """A model with several kinds of unfoldable BatchNorms."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 1)
        self.bn_a = nn.BatchNorm2d(8)
        self.bn_b = nn.BatchNorm2d(8)
        self.bn_in = nn.BatchNorm2d(3)  # reads the model input; the conv after it pads
        self.unused = nn.BatchNorm2d(8)  # never runs

    def forward(self, x):
        y = self.conv(self.bn_in(x))
        a = self.bn_a(self.shared(y))
        b = self.bn_b(self.shared(y))  # the conv is called twice
        return a + b


def test_skips_of_a_run_carry_codes_in_the_json_report():
    import modelsurgeon as ms

    torch.manual_seed(0)
    m = _Skips().eval()
    for bn in (m.bn_a, m.bn_b, m.bn_in, m.unused):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2), bn.bias.data.uniform_(-1, 1)
    _, report = ms.fold_bn(m, input_shape=(1, 3, 8, 8))
    skipped = json.loads(json.dumps(report.to_json()))["skipped"]
    codes = {s["target"]: s["code"] for s in skipped}
    assert codes["unused"] == "not-executed"
    assert codes["bn_in"] == "padding"
    assert {codes["bn_a"], codes["bn_b"]} == {"shared-module"}
    assert all(s["code"] in CODES for s in skipped)
