"""Every `modelsurgeon ...` command shown in the README and docs/usage.md runs, as written, on the
examples; the README stays short; every relative link of the docs resolves."""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import EXAMPLES, ROOT, run_cli


DOCS = [ROOT / "README.md", ROOT / "docs" / "usage.md"]


def _readme_commands() -> list[str]:
    text = "\n".join(p.read_text() for p in DOCS)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            if "modelsurgeon " not in line or line.startswith("#"):
                continue
            commands.append(line[line.rindex("modelsurgeon "):])  # after `... && ` in the setup line
    return list(dict.fromkeys(commands))


COMMANDS = _readme_commands()


def test_readme_shows_every_command():
    shown = {shlex.split(c)[1] for c in COMMANDS}
    assert {"fold-bn", "focus-to-conv", "truncate", "fold-fusion", "optimize"} <= shown


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i}:{c.split()[1]}" for i, c in enumerate(COMMANDS)])
def test_readme_command_runs(command, ckpts, tmp_path):
    args = []
    words = shlex.split(command)[1:]
    for i, w in enumerate(words):
        if w.startswith("examples/checkpoints/"):
            w = str(ckpts / w.split("/", 2)[2])
        elif w.startswith("examples"):
            w = str(EXAMPLES.parent / w)
        elif i > 0 and words[i - 1] in ("-o", "--output"):
            w = str(tmp_path / w.rsplit("/", 1)[-1])
        args.append(w)
    r = run_cli(*args)
    assert r.code == 0, (command, r.err)


def test_readme_python_example_runs(ckpts, tmp_path):
    """The README's Python block, run as written from a directory laid out like the repository
    (``examples/checkpoints`` built, ``examples/zoo`` the model code), in a fresh interpreter."""
    import subprocess
    import sys

    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(block) == 1
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "checkpoints").symlink_to(ckpts)
    (tmp_path / "examples" / "zoo").symlink_to(EXAMPLES / "zoo")
    r = subprocess.run([sys.executable, "-c", block[0]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "['layer4']" in r.stdout  # what the block prints: the removed blocks
    out = tmp_path / "scratch"  # examples write into a scratch folder, not the repository root
    assert (out / "resnet-folded.pt").exists() and (out / "mobilenetv2-folded.safetensors").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"examples", "scratch"}


def test_readme_is_short_and_keeps_the_test_command():
    text = (ROOT / "README.md").read_text()
    assert len(text) <= 12_000
    assert ".venv/bin/python -m pytest -q" in text  # .ci/run runs the README's test command
    assert ".venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        assert all(len(line) <= 110 for line in block.splitlines())  # set-up: short lines, no chain


def test_examples_write_into_a_scratch_folder():
    for c in COMMANDS:
        words = shlex.split(c)
        for flag in ("-o", "--output"):
            if flag in words:
                assert words[words.index(flag) + 1].startswith("scratch/"), c


def test_relative_links_in_the_docs_resolve():
    broken = []
    for doc in [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", doc.read_text(), flags=re.S))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.name}: {target}")
    assert not broken
