"""The suite leaves the checkout alone: the README's quick start (which writes runs/scott where it is run) followed
by the README's test command passes, because every test runs in its own temporary folder (conftest.py)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_runs_in_its_own_temporary_folder(tmp_path):
    assert Path.cwd() == tmp_path and ROOT not in Path.cwd().parents


def test_a_quick_start_run_beside_the_tests_does_not_break_them(tmp_path):
    """Once the failure this reproduces: `torchrun ... train.py --stop-after 2` left runs/scott/step-0000002 in the
    folder the user then ran pytest from, and test_clear_errors_before_heavy_work (which leaves --out at its default
    runs/scott) died with "--out runs/scott holds checkpoints of an earlier run"."""
    user_folder = tmp_path / "where-the-user-is"
    leftover = user_folder / "runs" / "scott" / "step-0000002"
    leftover.mkdir(parents=True)
    (leftover / "state.pt").write_bytes(b"an earlier run")
    (user_folder / "runs" / "scott" / "latest").write_text("step-0000002")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pytest.ini"),
         "--rootdir", str(ROOT), str(ROOT / "tests" / "test_train.py") + "::test_clear_errors_before_heavy_work"],
        cwd=user_folder, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert sorted(p.name for p in (user_folder / "runs" / "scott").iterdir()) == ["latest", "step-0000002"]
