"""The README stays a reader's page and its commands stay true: at most 260 lines, every relative link in README.md
and docs/ resolves, and every command in README's code blocks names a file or module that exists and answers
--help (run from an unrelated folder, as a user would after `cd` elsewhere) with a meaning for every flag."""
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


def flag_help(text: str) -> dict[str, str]:
    """{flag: its help text, "(default …)" removed} from argparse's --help output."""
    found, flag = {}, None
    for line in text.splitlines():
        if m := re.match(r"  (-\S.*?)(?:\s{2,}(.*))?$", line):  # "  --flag METAVAR   help" (or help below)
            flag = max(re.findall(r"--?[\w-]+", m.group(1)), key=len)
            found[flag] = m.group(2) or ""
        elif flag and line.startswith("    ") and line.strip():
            found[flag] += " " + line.strip()
        else:
            flag = None
    return {f: re.sub(r"\(default[^)]*\)", "", h).strip() for f, h in found.items()}


def test_flag_help_finds_a_flag_without_meaning():
    text = "options:\n  -h, --help  show this\n  --seed SEED\n  --n N   images per prompt\n  --out OUT\n" \
           "                 (default x)\n"
    assert flag_help(text) == {"--help": "show this", "--seed": "", "--n": "images per prompt", "--out": ""}


@pytest.mark.parametrize("command", sorted(commands(README) | {("-m", "tools.bench"), ("-m", "tools.gpu_check")}),
                         ids=" ".join)
def test_every_readme_command_answers_help(tmp_path, command):
    argv = [sys.executable, *command] if command[0] == "-m" else [sys.executable, str(ROOT / command[0])]
    result = subprocess.run([*argv, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    silent = [f for f, meaning in flag_help(result.stdout).items() if len(meaning.split()) < 2]
    assert not silent, f"{' '.join(command)} --help: no meaning given for {silent}"
