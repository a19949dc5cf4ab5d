"""Every `modelsurgeon ...` command shown in the README runs, as written, on the examples."""

from __future__ import annotations

import re
import shlex

import pytest

from conftest import EXAMPLES, ROOT, run_cli


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" # ")[0].strip()
            if "modelsurgeon " not in line or line.startswith("#"):
                continue
            commands.append(line[line.rindex("modelsurgeon "):])  # after `... && ` in the setup line
    return commands


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
    assert (tmp_path / "resnet-folded.pt").exists() and (tmp_path / "mobilenetv2-folded.safetensors").exists()
