"""One function gives the first line of an exception's message (modelsurgeon.errors.first_line):
an empty or blank message gives the exception's type, never a crash (exit 3)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelsurgeon.errors import BadInput, first_line


class _BrokenStr(Exception):
    def __str__(self):
        raise RuntimeError("no text")


@pytest.mark.parametrize("exc,expected,typed", [
    (ValueError(), "ValueError", "ValueError"),
    (ValueError("\n  \n"), "ValueError", "ValueError"),
    (RuntimeError("\n  first\nsecond"), "first", "RuntimeError: first"),
    (KeyError("k"), "'k'", "KeyError: 'k'"),
    (_BrokenStr(), "_BrokenStr", "_BrokenStr"),
])
def test_first_line(exc, expected, typed):
    assert first_line(exc) == expected
    assert first_line(exc, typed=True) == typed


def test_first_line_is_bounded():
    assert first_line(ValueError("x" * 1000), 20) == "x" * 20


class _Refuses(nn.Module):
    """A model whose load_state_dict fails with an empty message."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def load_state_dict(self, *a, **k):
        raise RuntimeError()


def test_arch_whose_load_fails_without_a_message_is_bad_input():
    from modelsurgeon.read.arch import load_state

    m = _Refuses()
    with pytest.raises(BadInput) as e:
        load_state(m, m.state_dict(), "sd.pt")
    assert str(e.value).endswith(": RuntimeError") and e.value.exit_code == 2


def test_write_failing_without_a_message_is_bad_input(tmp_path, monkeypatch):
    from modelsurgeon.write.torch import write_pt

    def fail(*a, **k):
        raise RuntimeError("")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(BadInput) as e:
        write_pt({"a": 1}, tmp_path / "o.pt")
    assert str(e.value).endswith(": RuntimeError") and not (tmp_path / "o.pt").exists()
