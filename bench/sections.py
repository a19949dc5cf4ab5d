"""The ``## `` sections of docs/performance.md that each bench writes: read one, or put one in
place of its earlier version (appended when new); the main bench keeps every other bench's."""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def _span(doc: str, title: str) -> tuple[int, int] | None:
    start = doc.find(title)
    if start < 0:
        return None
    end = doc.find("\n## ", start + len(title))
    return start, (end + 1 if end >= 0 else len(doc))


def section(title: str, path: Path = DOC) -> str:
    """The section ``title`` as ``path`` holds it ("" if none)."""
    doc = path.read_text() if path.exists() else ""
    span = _span(doc, title)
    return doc[span[0]:span[1]] if span else ""


def write_section(title: str, text: str, path: Path = DOC) -> None:
    """Put ``text`` (a section starting with ``title``) into ``path``, where the earlier one stood."""
    doc = path.read_text() if path.exists() else "# Performance\n"
    text = text.rstrip("\n") + "\n"
    span = _span(doc, title)
    if span:
        doc = doc[:span[0]] + text + ("\n" if span[1] < len(doc) else "") + doc[span[1]:].lstrip("\n")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)
