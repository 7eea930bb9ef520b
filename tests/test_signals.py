"""A scheduler's SIGTERM (SLURM scancel / pre-emption, systemd) or Ctrl-C's SIGINT goes to the whole process group,
DataLoader workers included: train.py must checkpoint at the step boundary and exit 0, not die with "DataLoader
worker ... killed by signal". Real subprocesses in their own process group, signalled with os.killpg."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_folder
from lora import ADAPTERS_FILE, TARGET_ADAPTERS_FILE
from datasets import write_folder_dataset
from tiny_models import TINY_RUN, write_tiny_sd15

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    write_tiny_sd15(root / "sd15")
    return root / "sd15", write_folder_dataset(root / "data", n=16, size=40)


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def signal_group_after_first_step(cmd, out: Path, signum) -> tuple[int, str]:
    """Start `cmd` as the leader of a new process group, wait for its first logged step, signal the whole group
    (as SLURM and systemd do), and return (exit code, output)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signum)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, output


@pytest.mark.parametrize("signum, student", [(signal.SIGTERM, []), (signal.SIGINT, []),
                                              (signal.SIGTERM, ["--student-lora-rank", "2"])])
def test_signal_to_the_process_group_with_dataloader_workers_checkpoints_and_exits_0(tmp_path, setup, signum, student):
    model, data = setup
    out = tmp_path / "run"
    code, output = signal_group_after_first_step(
        [sys.executable, str(ROOT / "train.py"), "--model", str(model), "--data", str(data), "--out", str(out),
         "--steps", "100000", "--num-workers", "2", *TINY_RUN, *student], out, signum)
    assert code == 0, output[-3000:]
    assert "stopped at step" in output and "killed by signal" not in output
    step = out / (out / "latest").read_text()
    resume = run_folder.load_checkpoint(step)  # complete and loadable
    assert resume.state["step"] >= 1
    if student:  # a LoRA student's checkpoint holds its adapters and their EMA, not UNets
        assert (step / ADAPTERS_FILE).is_file() and (step / TARGET_ADAPTERS_FILE).is_file()
        assert not (step / "student").exists()


@pytest.mark.slow
def test_sigterm_to_a_torchrun_process_group_checkpoints_on_every_rank(tmp_path, setup):
    """torchrun, its 2 ranks and their DataLoader workers all get SIGTERM: the ranks checkpoint and exit 0; torchrun
    itself reports the signal as a failure (exit 1, "Received 15 death signal") whatever its workers did, so a job
    script must judge the run by the checkpoint (or `--resume auto`), not by torchrun's exit code."""
    model, data = setup
    out = tmp_path / "run"
    code, output = signal_group_after_first_step(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
         "--model", str(model), "--data", str(data), "--out", str(out), "--steps", "100000", "--num-workers", "2",
         *TINY_RUN], out, signal.SIGTERM)
    assert "stopped at step" in output and "killed by signal" not in output, output[-3000:]
    assert code == 1 and "Received 15 death signal" in output, (code, output[-3000:])
    resume = run_folder.load_checkpoint(out / (out / "latest").read_text())
    assert resume.state["step"] >= 1 and len(resume.state["rng"]) == 2
