"""train.py across two "machines": two torchrun agents (one per node, one process each) meet through a c10d
rendezvous, exactly as on two hosts, except that both run here and the endpoint is 127.0.0.1.

On two real machines the command is the same on both, with HOST the address of one of them:
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id scott train.py ...
With c10d the agents number the nodes themselves (first come, first served): --node-rank is ignored (torchrun says
so), and rank 0, the one that prints, may be either agent's worker.
"""
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it); the rendezvous store binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_agent(port: int, run_id: str, log: Path, *train_args) -> subprocess.Popen:
    """One torchrun agent = one node with one worker process; its stdout and stderr go to `log`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", run_id,
           str(ROOT / "train.py"), *train_args]
    with open(log, "w") as f:  # the child keeps its own copy of the file descriptor
        return subprocess.Popen(cmd, env=env(), stdout=f, stderr=subprocess.STDOUT)


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc): an agent's workers, which torchrun puts in sessions of their own."""
    pids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            pids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def wait_for(agents, timeout_s: float) -> bool:
    """Wait until every agent has exited, or one failed, or the time is up; True if every agent exited on its own.
    Agents still running are then stopped: SIGTERM (torchrun stops its worker, SIGKILL after 30 s), and if that
    does not do it, SIGKILL to the agent and to its workers (a worker stuck in a collective ignores SIGTERM)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = [a.poll() for a in agents]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.5)
    finished = all(a.poll() is not None for a in agents)
    for agent in agents:
        if agent.poll() is None:
            workers = children(agent.pid)
            agent.terminate()
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
            for pid in workers:
                try:
                    if "train.py" in Path(f"/proc/{pid}/cmdline").read_text():  # still our worker, not a reused pid
                        os.kill(pid, signal.SIGKILL)
                except OSError:  # already gone
                    pass
    return finished


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text()[-n:] if path.exists() else "(no output)"


@pytest.mark.slow
def test_two_nodes_one_process_each_train_the_toy_model(tmp_path):
    """The shipped toy model (no --model, no --data) for 2 steps over 2 nodes, with the replica check after every
    step: both agents exit 0, a checkpoint is written, and rank 0 reports a world of 2."""
    out = tmp_path / "run"
    port, run_id = free_port(), f"scott-test-{uuid.uuid4().hex[:8]}"
    args = ("--out", str(out), "--steps", "2", "--log-every", "1", "--sample-every", "0", "--check-sync-every", "1")
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    agents = [start_agent(port, run_id, log, *args) for log in logs]
    if not wait_for(agents, TIMEOUT_S):
        raise AssertionError(f"the run did not finish: an agent failed or it took over {TIMEOUT_S} s. Output tails:\n"
                             + "\n".join(f"--- {p.name} (exit {a.returncode})\n{tail(p)}" for a, p in zip(agents, logs)))
    for i, (agent, log) in enumerate(zip(agents, logs)):
        assert agent.returncode == 0, f"agent {i} exited with {agent.returncode}:\n{tail(log)}"

    texts = [log.read_text() for log in logs]
    printed = [text for text in texts if "global batch" in text]  # only rank 0 prints, whichever node it is on
    assert len(printed) == 1, "expected exactly one rank 0:\n" + "\n".join(t[-2000:] for t in texts)
    assert ", world 2," in printed[0], printed[0][-3000:]
    assert "global batch 16 = micro-batch 8 × accumulation 1 × world 2" in printed[0], printed[0][-3000:]
    latest = out / "latest"
    assert latest.is_file(), f"no checkpoint pointer in {out}:\n{printed[0][-3000:]}"
    final = out / latest.read_text()
    assert (final / "student" / "diffusion_pytorch_model.safetensors").is_file()
    assert (final / "state.pt").is_file()
