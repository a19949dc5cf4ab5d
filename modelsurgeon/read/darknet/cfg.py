"""The ``.cfg`` grammar as darknet's own parser reads it.

* Every space, tab and line break is removed from a line before anything else (``a = 1, 2``
  is ``a=1,2``); a line that is then empty or starts with ``#`` or ``;`` is skipped.
* A line starting with ``[`` opens a section; the whole stripped line is its type, so
  ``[convolutional]`` and ``[conv]`` name the same layer, ``[conv] # x`` names none.
* Any other line is ``key=value`` split at the first ``=``; a key given twice keeps its first
  value (darknet looks options up from the front of the list).
* Numbers are read like C's ``atoi`` / ``atof``: the longest numeric prefix, 0 if none
  (``size=3#kernel`` is 3). Lists are split at commas, each piece read the same way.

The text is kept, with each section's lines, so that a writer can change a few options in
place and leave comments and training settings as they were.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ...errors import BadInput

ALIASES = {
    "[net]": "net", "[network]": "net",
    "[convolutional]": "convolutional", "[conv]": "convolutional",
    "[connected]": "connected", "[conn]": "connected",
    "[maxpool]": "maxpool", "[max]": "maxpool",
    "[avgpool]": "avgpool", "[avg]": "avgpool",
    "[softmax]": "softmax", "[soft]": "softmax",
    "[route]": "route", "[shortcut]": "shortcut", "[upsample]": "upsample",
    "[reorg]": "reorg", "[reorg3d]": "reorg3d",
    "[yolo]": "yolo", "[region]": "region", "[Gaussian_yolo]": "gaussian_yolo",
    "[dropout]": "dropout", "[scale_channels]": "scale_channels", "[sam]": "sam",
    "[batchnorm]": "batchnorm", "[activation]": "activation",
    "[empty]": "empty", "[silence]": "empty", "[cost]": "cost",
    "[local]": "local", "[crnn]": "crnn", "[rnn]": "rnn", "[gru]": "gru", "[lstm]": "lstm",
    "[conv_lstm]": "conv_lstm", "[history]": "history", "[crop]": "crop", "[detection]": "detection",
    "[local_avgpool]": "local_avgpool", "[local_avg]": "local_avgpool", "[lrn]": "normalization",
    "[normalization]": "normalization", "[contrastive]": "contrastive", "[implicit]": "implicit",
}

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|inf(?:inity)?|nan)", re.I)


def atoi(text: str) -> int:
    m = _INT.match(text)
    return int(m.group(0)) if m else 0


def atof(text: str) -> float:
    m = _FLOAT.match(text)
    return float(m.group(0)) if m else 0.0


def strip(line: str) -> str:
    return re.sub(r"[ \t\r\n]", "", line)


@dataclass
class Section:
    header: str  # the stripped header line, e.g. "[conv]"
    line: int  # 1-based line of the header
    options: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (value, line); first wins
    last_line: int = 0  # last line of the section (before the next header)

    @property
    def kind(self) -> str | None:
        return ALIASES.get(self.header)

    def where(self) -> str:
        return f"{self.header} at line {self.line}"

    def has(self, key: str) -> bool:
        return key in self.options

    def text(self, key: str, default: str | None = None) -> str | None:
        hit = self.options.get(key)
        return hit[0] if hit else default

    def int(self, key: str, default: int = 0) -> int:
        hit = self.options.get(key)
        return atoi(hit[0]) if hit else default

    def float(self, key: str, default: float = 0.0) -> float:
        hit = self.options.get(key)
        return atof(hit[0]) if hit else default

    def ints(self, key: str) -> list[int] | None:
        """A comma-separated list read like darknet's route/shortcut ``layers`` / ``from``:
        each piece with ``atoi`` (an empty piece is 0)."""
        hit = self.options.get(key)
        if hit is None:
            return None
        return [atoi(p) for p in hit[0].split(",")]


@dataclass
class Cfg:
    name: str
    lines: list[str]  # the file's lines, line endings kept
    sections: list[Section]

    @property
    def net(self) -> Section:
        return self.sections[0]

    @property
    def layers(self) -> list[Section]:
        return self.sections[1:]


def parse_cfg(text: str, name: str) -> Cfg:
    lines = text.splitlines(keepends=True)
    sections: list[Section] = []
    for number, raw in enumerate(lines, start=1):
        line = strip(raw)
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if sections:
                sections[-1].last_line = number - 1
            sections.append(Section(header=line, line=number))
            continue
        if not sections:
            raise BadInput(f"{name}: line {number}: option {line[:40]!r} before the first [section]")
        key, eq, value = line.partition("=")
        if not eq or not value:
            raise BadInput(f"{name}: line {number}: expected key=value, got {line[:40]!r}")
        sections[-1].options.setdefault(key, (value, number))
    if not sections:
        raise BadInput(f"{name}: no [net] section: not a darknet .cfg file")
    sections[-1].last_line = len(lines)
    if sections[0].kind != "net":
        raise BadInput(f"{name}: the first section must be [net] or [network], got {sections[0].where()}")
    if len(sections) == 1:
        raise BadInput(f"{name}: no layers after [net]")
    return Cfg(name=name, lines=lines, sections=sections)
