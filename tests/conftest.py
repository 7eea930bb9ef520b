"""Settings shared by every test (sys.path is set by `pythonpath` in pytest.ini).

Tests never touch the checkout: each runs in its own temporary folder (in_a_temporary_folder), so the commands'
working-folder defaults (runs/scott, sample.png, runs/eval, ...) land there and a user's own runs/ beside the code
is neither read nor written; and the session checks itself at the end (pytest_sessionfinish): if anything in the
checkout was created, changed or deleted, the run fails and names it.
"""
import os
from pathlib import Path

import pytest
import torch

from tiny_models import write_tiny_sd15

torch.set_num_threads(1)  # tiny models: more threads only add contention on a 2-core machine

ROOT = Path(__file__).resolve().parent.parent
# Not the checkout's content: the environment CI and users create beside it, and Python's own caches.
UNWATCHED = {".git", ".venv", ".ci-oracle", ".whl", "__pycache__", ".pytest_cache"}


@pytest.fixture(autouse=True)
def in_a_temporary_folder(tmp_path, monkeypatch):
    """Every test starts in its own empty folder (subprocesses it starts inherit it)."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny SD1.5-shaped model folder (tiny_models.write_tiny_sd15), one per test module."""
    root = tmp_path_factory.mktemp("sd15")
    write_tiny_sd15(root)
    return root


def snapshot(root: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file and folder under root, but the UNWATCHED ones."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in UNWATCHED]
        for name in dirs + files:
            path = Path(folder) / name
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            found[str(path.relative_to(root))] = (st.st_size if name in files else 0, st.st_mtime_ns)
    return found


def pytest_sessionstart(session):
    session.config._checkout_before = snapshot(ROOT)


def pytest_sessionfinish(session, exitstatus):
    before, after = session.config._checkout_before, snapshot(ROOT)
    changed = sorted(set(before) ^ set(after) | {p for p in set(before) & set(after) if before[p] != after[p]})
    if changed:
        shown = "\n  ".join(changed[:20]) + (f"\n  … and {len(changed) - 20} more" if len(changed) > 20 else "")
        print(f"\nFAILED: the tests created, changed or deleted {len(changed)} path(s) in the checkout {ROOT} "
              f"(a test must work in its own temporary folder):\n  {shown}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
