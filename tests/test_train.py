"""train.py end to end on tiny SD1.5-shaped models: 2-process torchrun (gloo) on a folder and on tar shards,
bit-exact resume, SIGTERM, and a clear error before any heavy work for a missing model or an empty dataset."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sample
import train
from datasets import write_folder_dataset, write_tar_dataset
from sd15 import TOY_FOLDER
from tiny_models import TINY_RUN
from unet import load_unet

ROOT = Path(__file__).resolve().parent.parent


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def torchrun_two_processes(*args) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 train.py ARGS` on CPU (gloo); fails the test with the output's tail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *args]
    try:
        result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:  # show where it stopped
        raise AssertionError(f"torchrun timed out; stdout tail:\n{(e.stdout or b'')[-3000:]!r}\n"
                             f"stderr tail:\n{(e.stderr or b'')[-3000:]!r}") from None
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_torchrun_two_processes(tmp_path, tiny_model, layout):
    data = (write_folder_dataset(tmp_path / "data", n=24, size=40, with_bad=True) if layout == "folder" else
            write_tar_dataset(tmp_path / "data", n_shards=4, per_shard=6, size=40, with_bad=True))
    out = tmp_path / "run"
    result = torchrun_two_processes("--model", str(tiny_model), "--data", str(data), "--out", str(out), "--steps", "3",
                                    "--check-sync-every", "1", "--num-workers", "0", *TINY_RUN)
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss_cd"], r["loss_g"], r["loss_d"]])).all() for r in log)
    assert log[-1]["skipped_images"] > 0  # the dataset holds corrupt and tiny images: skipped and counted
    final = out / (out / "latest").read_text()
    student, teacher = weights(final / "student"), weights(tiny_model / "unet")
    assert any(not torch.equal(student[k], teacher[k]) for k in teacher)  # the student trained
    assert "global batch 4 = micro-batch 2 × accumulation 1 × world 2" in result.stdout
    # every rank held identical weights after every step, or --check-sync-every 1 would have failed the run


@pytest.mark.slow
def test_torchrun_with_no_model_distils_the_shipped_toy_teacher(tmp_path):
    """The README's `torchrun --nproc_per_node=2 train.py` with a step limit: no --model, no --data, so the shipped
    toy teacher (toy/), its synthetic data and the toy defaults; the student it writes samples with sample.py."""
    out = tmp_path / "run"
    result = torchrun_two_processes("--out", str(out), "--steps", "2", "--log-every", "1", "--sample-every", "0",
                                    "--check-sync-every", "1")
    assert f"model {TOY_FOLDER}," in result.stdout  # no --model: the shipped toy model
    assert "w∈[2.0, 6.0]" in result.stdout  # its scott.toml's [train] defaults were applied
    assert "global batch 16 = micro-batch 8 × accumulation 1 × world 2" in result.stdout
    assert [r["step"] for r in read_log(out)] == [1, 2]
    student = out / (out / "latest").read_text() / "student"
    trained, teacher = weights(student), weights(TOY_FOLDER / "unet")  # the teacher is stored in float16
    assert any(not torch.equal(trained[k], teacher[k].float()) for k in teacher)  # the student trained
    sample.main(["--student", str(student), "--prompt", "a red circle on the left", "--steps", "1",
                 "--out", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").is_file()


def test_resume_is_bit_exact(tmp_path, tiny_model):
    data = write_folder_dataset(tmp_path / "data", n=16, size=40)
    # world size 1: global batch 4 = 2 micro-batches of 2 per step, so gradient accumulation is covered too
    common = ["--model", str(tiny_model), "--data", str(data), "--steps", "4", "--num-workers", "0", *TINY_RUN]
    train.main([*common, "--out", str(tmp_path / "straight")])
    train.main([*common, "--out", str(tmp_path / "split"), "--stop-after", "2"])
    assert (tmp_path / "split" / "latest").read_text() == "step-0000002"
    train.main([*common, "--out", str(tmp_path / "split"), "--resume", "auto"])
    a, b = tmp_path / "straight" / "step-0000004", tmp_path / "split" / "step-0000004"
    for part in ("student", "target"):
        wa, wb = weights(a / part), weights(b / part)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (torch.load(p / "state.pt", weights_only=True) for p in (a, b))
    assert all(torch.equal(v, sb["discriminator"][k]) for k, v in sa["discriminator"].items())
    assert [r["loss_cd"] for r in read_log(tmp_path / "straight")][2:] == \
        [r["loss_cd"] for r in read_log(tmp_path / "split")][2:]


def test_sigterm_leaves_a_loadable_checkpoint(tmp_path, tiny_model):
    data = write_folder_dataset(tmp_path / "data", n=16, size=40)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--model", str(tiny_model), "--data", str(data),
                             "--out", str(out), "--steps", "100000", "--num-workers", "0", *TINY_RUN],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped at step" in output
    final = out / (out / "latest").read_text()
    student = load_unet(final / "student")
    assert student.config.guidance_embed_dim > 0
    assert torch.load(final / "state.pt", weights_only=True)["step"] >= 1


def test_clear_errors_before_heavy_work(tmp_path, tiny_model):
    with pytest.raises(SystemExit, match="no such file or folder"):
        train.main(["--model", str(tmp_path / "missing"), "--data", str(tmp_path)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="(?i)no images|empty"):
        train.main(["--model", str(tiny_model), "--data", str(tmp_path / "empty"), *TINY_RUN])
    with pytest.raises(SystemExit, match="not a multiple"):  # --out left at its default, runs/scott
        train.main(["--model", str(tiny_model), "--data", str(tmp_path / "empty"), "--global-batch", "5",
                    "--micro-batch", "2"])


def test_nonfinite_steps_are_skipped_then_stop_with_a_checkpoint(tmp_path, tiny_model, monkeypatch):
    data = write_folder_dataset(tmp_path / "data", n=16, size=40)
    real_loss = train.scott_loss

    def poisoned(*args, **kwargs):  # a NaN loss from step 2 on (the first call sets up a good step)
        result = real_loss(*args, **kwargs)
        poisoned.calls += 1
        if poisoned.calls > 2:
            result.loss = result.loss * float("nan")
        return result
    poisoned.calls = 0
    monkeypatch.setattr(train, "scott_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="3 non-finite steps in a row"):
        train.main(["--model", str(tiny_model), "--data", str(data), "--out", str(out), "--steps", "50",
                    "--max-nonfinite", "3", "--num-workers", "0", *TINY_RUN])
    state = torch.load(out / (out / "latest").read_text() / "state.pt", weights_only=True)
    assert state["step"] == 1 and state["counters"]["nonfinite_steps"] == 3


@pytest.mark.parametrize("student", [[], ["--student-lora-rank", "2"]])
def test_latent_cache_then_train_from_it(tmp_path, tiny_model, student):
    data = write_folder_dataset(tmp_path / "data", n=8, size=40)
    cache = tmp_path / "cache"
    train.main(["--model", str(tiny_model), "--data", str(data), "--cache-to", str(cache), *TINY_RUN, *student])
    assert (cache / "manifest.json").is_file()
    out = tmp_path / "run"
    train.main(["--model", str(tiny_model), "--data", str(cache), "--out", str(out), "--steps", "1",
                "--num-workers", "0", *TINY_RUN, *student])
    assert torch.isfinite(torch.tensor(read_log(out)[-1]["loss_cd"]))
