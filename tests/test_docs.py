"""The README stays a reader's page and its commands stay true: at most 260 lines, every relative link in README.md
and docs/ resolves, and every command in README's code blocks names a file or module that exists and answers
--help (run from an unrelated folder, as a user would after `cd` elsewhere)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_lines(markdown: str) -> list[str]:
    """The lines of ``` blocks, continuation backslashes joined."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", markdown, re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def commands(markdown: str) -> set[tuple[str, ...]]:
    """How each command line starts the program: ('train.py',) or ('-m', 'tools.bench')."""
    found = set()
    for line in code_lines(markdown):
        if line.startswith("#"):
            continue
        if m := re.search(r"python -m ([\w.]+)", line):
            found.add(("-m", m.group(1)))
        elif m := re.search(r"(?:python|torchrun\b.*?)\s+(\w+\.py)\b", line):
            found.add((m.group(1),))
    return found


def test_readme_is_a_readers_page():
    assert len(README.splitlines()) <= 260
    for heading in ("## Set-up", "## Quick start", "## Reading the code with the paper", "## SD1.5", "## Tests",
                    "## Files"):
        assert heading in README


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
        if not target.startswith(("http://", "https://", "mailto:")):
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_every_file_the_readme_commands_name_exists():
    for line in code_lines(README):
        for path in re.findall(r"(?:--config|sbatch)\s+(\S+)", line):
            assert (ROOT / path).is_file(), f"README names {path}, which does not exist"
    assert commands(README) >= {("train.py",), ("sample.py",), ("export.py",), ("evaluate.py",)}


@pytest.mark.parametrize("command", sorted(commands(README)), ids=" ".join)
def test_every_readme_command_answers_help(tmp_path, command):
    argv = [sys.executable, *command] if command[0] == "-m" else [sys.executable, str(ROOT / command[0])]
    result = subprocess.run([*argv, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
