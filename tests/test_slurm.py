"""configs/slurm/train.sbatch under stub srun/scontrol: the torchrun it starts on every node (world, rendezvous on
the first node, --resume auto, the run folder), and on the scheduler's SIGTERM: the signal forwarded, the job
requeued."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "configs" / "slurm" / "train.sbatch"

SRUN = """#!/bin/bash
trap 'echo TERM >> "$LOG/srun-signals"; exit 143' TERM
echo "$@" >> "$LOG/srun"
if [ -n "${SRUN_SLEEP:-}" ]; then for i in $(seq 200); do sleep 0.05; done; fi
"""
SCONTROL = """#!/bin/bash
echo "$@" >> "$LOG/scontrol"
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-a17\\ngpu-b03\\n'; fi
"""


@pytest.fixture
def stubs(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(tmp_path), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-a17,gpu-b03", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4",
           "MODEL": "/models/sd15", "DATA": "/data/shards", "OUT": "/shared/runs/scott"}
    return tmp_path, env


def test_one_torchrun_per_node_with_c10d_on_the_first_node(stubs):
    log, env = stubs
    result = subprocess.run(["bash", str(SCRIPT), "--steps", "10"], env=env, capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    (line,) = (log / "srun").read_text().splitlines()
    words = line.split()
    value = lambda flag: words[words.index(flag) + 1]  # noqa: E731
    assert words[:2] == ["--kill-on-bad-exit=0", "torchrun"]
    assert (value("--nnodes"), value("--nproc-per-node")) == ("2", "4")  # 8 ranks
    assert (value("--rdzv-backend"), value("--rdzv-endpoint"), value("--rdzv-id")) == ("c10d", "gpu-a17:29500",
                                                                                       "scott-4242")
    assert words[words.index("train.py") + 1:] == ["--config", "configs/sd15-2nodes.toml", "--model",
                                                    "/models/sd15", "--data", "/data/shards", "--out",
                                                    "/shared/runs/scott", "--resume", "auto", "--steps", "10"]
    assert "requeue" not in (log / "scontrol").read_text()  # a run that ended is not requeued


def test_the_schedulers_sigterm_is_forwarded_and_the_job_requeued(stubs):
    log, env = stubs
    proc = subprocess.Popen(["bash", str(SCRIPT)], env={**env, "SRUN_SLEEP": "1"}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log / "srun").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends the batch script
    out, err = proc.communicate(timeout=30)
    assert (log / "srun-signals").read_text().split() == ["TERM"], err
    assert "requeue 4242" in (log / "scontrol").read_text()
    assert "requeueing job 4242" in out


def test_missing_settings_are_named(stubs):
    _, env = stubs
    env.pop("DATA")
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode != 0 and "DATA" in result.stderr
