"""Checkpoints and resume (train.py): rotation by step number, a fresh start into a used --out, `--resume auto`
without `latest` or with a corrupt newest checkpoint, a disk-full write, a kill at every instant of a re-save, stale
temporary folders, and the saved config compared with the current flags. In-process on tiny SD1.5-shaped models."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_folder
import train
from tiny_models import write_tiny_run, write_tiny_sd15

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny model, data, the flags every run here shares)."""
    return write_tiny_run(tmp_path_factory.mktemp("resume"))


def names(out):
<<<<<<< HEAD
    """What a run folder holds, but the lock file every trainer keeps there (run_folder.lock_out)."""
=======
    """What --out holds, but the lock file every run keeps there (run_folder.lock_out)."""
>>>>>>> guards
    return sorted(p.name for p in out.iterdir() if p.name != ".lock")


def latest(out):
    return (out / "latest").read_text()


def read_steps(out):
    return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]


# ---- rotation and a used --out (issue 1) ----------------------------------------------------------------------

def test_rotation_sorts_by_step_number_and_keeps_later_folders(tmp_path):
    for step in (5, 9_999_999, 10_000_000, 10_000_001):  # names of 7 and 8 digits: name order is not step order
        (tmp_path / f"step-{step:07d}").mkdir()
    run_folder.rotate(tmp_path, 10_000_000, keep=2)
    # 10000000 was just written and 9999999 is the one before it; 10000001 is a later step: not this run's to delete
    assert names(tmp_path) == ["step-10000000", "step-10000001", "step-9999999"]
    run_folder.rotate(tmp_path, 10_000_000, keep=1)
    assert names(tmp_path) == ["step-10000000", "step-10000001"]


def test_fresh_run_into_a_used_out_is_refused_then_overwrite_moves_the_old_run_aside(tmp_path, setup):
    _, _, common = setup
    out = tmp_path / "run"
    train.main([*common, "--out", str(out), "--steps", "3", "--ckpt-every", "1"])  # the earlier, longer run
    assert latest(out) == "step-0000003"
    # The issue: a fresh 1-step run here kept step-0000003 (the highest name) and deleted its own step-0000001.
    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run.*--resume auto.*--overwrite"):
        train.main([*common, "--out", str(out), "--steps", "1"])
    assert names(out) == ["latest", "log.jsonl", "step-0000002", "step-0000003"]  # untouched
    train.main([*common, "--out", str(out), "--steps", "1", "--overwrite"])
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and names(aside[0]) == ["latest", "log.jsonl", "step-0000002", "step-0000003"]
    assert latest(out) == "step-0000001" and (out / "step-0000001" / "state.pt").is_file()
    assert read_steps(out) == [1]


def test_keep_one_keeps_the_checkpoint_just_written(tmp_path, setup):
    _, _, common = setup
    out = tmp_path / "run"
    train.main([*common, "--out", str(out), "--steps", "2", "--ckpt-every", "1", "--keep-checkpoints", "1"])
    assert [p.name for p in out.glob("step-*")] == ["step-0000002"] and latest(out) == "step-0000002"


# ---- --resume auto (issues 3 and 5) ---------------------------------------------------------------------------

def test_resume_auto_without_latest_continues_from_the_newest_checkpoint(tmp_path, setup, capsys):
    _, _, common = setup
    out = tmp_path / "run"
    train.main([*common, "--out", str(out), "--steps", "4", "--stop-after", "2"])
    (out / "latest").unlink()  # e.g. lost with a copy of the folder
    train.main([*common, "--out", str(out), "--steps", "3", "--resume", "auto"])
    assert "steps 2 -> 3" in capsys.readouterr().out
    assert read_steps(out) == [1, 2, 3]  # continued; not restarted at 0 over the old checkpoints
    assert latest(out) == "step-0000003"


def test_resume_auto_skips_a_corrupt_or_dangling_checkpoint_and_says_why(tmp_path, setup, capsys):
    _, _, common = setup
    out = tmp_path / "run"
    train.main([*common, "--out", str(out), "--steps", "2", "--ckpt-every", "1"])
    state = out / "step-0000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated (a crash of a foreign copy, a full disk)
    # The issue: --resume of it raised a raw EOFError/RuntimeError traceback.
    with pytest.raises(SystemExit, match=r"--resume .*step-0000002.*state\.pt: unreadable.*truncated or corrupt"):
        train.main([*common, "--out", str(out), "--steps", "3", "--resume", str(out / "step-0000002")])
    capsys.readouterr()
    train.main([*common, "--out", str(out), "--steps", "3", "--resume", "auto"])
    printed = capsys.readouterr().out
    assert "skipped step-0000002" in printed and "unreadable" in printed and "steps 1 -> 3" in printed
    aside = next(out.glob("replaced-*"))  # kept for inspection, where `--resume auto` no longer looks
    assert (aside / "step-0000002" / "state.pt").stat().st_size == 100

    (out / "latest").write_text("step-0000042")  # dangling
    train.main([*common, "--out", str(out), "--steps", "4", "--resume", "auto"])
    printed = capsys.readouterr().out
    assert "names 'step-0000042', which does not exist" in printed and "steps 3 -> 4" in printed


def test_resume_from_an_earlier_step_sets_the_later_checkpoints_aside(tmp_path, setup):
    _, _, common = setup
    out = tmp_path / "run"
    train.main([*common, "--out", str(out), "--steps", "3", "--ckpt-every", "1", "--keep-checkpoints", "3"])
    train.main([*common, "--out", str(out), "--steps", "2", "--resume", str(out / "step-0000001"), "--lr", "2e-3"])
    # a later `--resume auto` continues this branch (step 2), not the abandoned step-0000003
    assert [p.name for _, p in run_folder.list_checkpoints(out)] == ["step-0000001", "step-0000002"]
    assert latest(out) == "step-0000002" and (next(out.glob("replaced-*")) / "step-0000003").is_dir()


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(tmp_path, setup):
    _, _, common = setup
    out = tmp_path / "run"
    train.main([*common, "--out", str(out), "--steps", "1"])
    (out / "step-0000001" / "student" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="(?s)no valid checkpoint.*step-0000001.*empty"):
        train.main([*common, "--out", str(out), "--steps", "2", "--resume", "auto"])
    state = torch.load(out / "step-0000001" / "state.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, out / "step-0000001" / "state.pt")
    with pytest.raises(SystemExit, match=r"lacks \['optimizer'\]"):
        train.main([*common, "--out", str(out), "--steps", "2", "--resume", str(out / "step-0000001")])


# ---- failed and interrupted writes (issue 5) ------------------------------------------------------------------

def test_disk_full_write_is_cleaned_up_and_reported(tmp_path, setup, monkeypatch):
    _, _, common = setup
    out = tmp_path / "run"
    train.main([*common, "--out", str(out), "--steps", "1"])
    real_save = run_folder.save_unet

    def save_then_fill_the_disk(unet, folder, *args):  # the student is written, the target hits a full disk
        if folder.name == "target":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        real_save(unet, folder, *args)
    monkeypatch.setattr(run_folder, "save_unet", save_then_fill_the_disk)
    with pytest.raises(SystemExit) as failed:
        train.main([*common, "--out", str(out), "--steps", "2", "--resume", "auto"])
    message = str(failed.value)
    assert ".tmp-step-0000002" in message and "No space left on device" in message
    assert "step-0000001 is intact" in message and "--resume auto" in message
    assert names(out) == ["latest", "log.jsonl", "step-0000001"]  # the partial folder is gone
    monkeypatch.setattr(run_folder, "save_unet", real_save)
    train.main([*common, "--out", str(out), "--steps", "2", "--resume", "auto"])  # resumes once there is room
    assert latest(out) == "step-0000002"


def test_stale_temporary_folders_are_removed_at_start(tmp_path, setup, capsys):
    _, _, common = setup
    out = tmp_path / "run"
    train.main([*common, "--out", str(out), "--steps", "1"])
    (out / ".tmp-step-0000007" / "student").mkdir(parents=True)  # a killed write's leftovers
    (out / ".tmp-step-0000007" / "student" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 1000)
    train.main([*common, "--out", str(out), "--steps", "2", "--resume", "auto"])
    assert "removed the partial checkpoint" in capsys.readouterr().out
    assert not list(out.glob(".tmp-*")) and latest(out) == "step-0000002"


class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing in train.py catches a BaseException, so no clean-up code runs."""


def fake_checkpoint(folder: Path, content: str) -> Path:
    folder.mkdir()
    (folder / "content").write_text(content)
    return folder


# publish() re-saving an existing step does, in order: remove a stale .old (1), rename step-N aside (2), rename the
# new folder in (3), write `latest` (4, os.replace of its temp file), delete the old folder (5).
@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5, None])
def test_a_kill_at_any_instant_of_a_resave_leaves_a_complete_checkpoint(tmp_path, monkeypatch, kill_at):
    out = tmp_path
    final = fake_checkpoint(out / "step-0000005", "old")
    (out / "latest").write_text("step-0000005")
    tmp = fake_checkpoint(out / ".tmp-step-0000005", "new")
    calls = []

    def counted(real):
        def call(*args, **kwargs):
            calls.append(real.__name__)
            if len(calls) == kill_at:
                raise Killed
            return real(*args, **kwargs)
        return call
    monkeypatch.setattr(run_folder.os, "replace", counted(os.replace))
    monkeypatch.setattr(run_folder.shutil, "rmtree", counted(run_folder.shutil.rmtree))
    try:
        run_folder.publish(tmp, final)
    except Killed:
        pass
    monkeypatch.undo()
    assert kill_at is not None or calls == ["rmtree", "replace", "replace", "replace", "rmtree"]
    run_folder.recover_out(out)  # what the next run does first
    assert names(out) == ["latest", "step-0000005"]
    assert (out / latest(out) / "content").read_text() == ("old" if kill_at in (1, 2, 3) else "new")


def test_a_real_kill_between_the_renames_of_a_resave(tmp_path):
    """The same with os._exit in a subprocess, between moving the old folder aside and moving the new one in."""
    fake_checkpoint(tmp_path / "step-0000005", "old")
    (tmp_path / "latest").write_text("step-0000005")
    fake_checkpoint(tmp_path / ".tmp-step-0000005", "new")
    script = (
        "import os, sys, run_folder\n"
        "from pathlib import Path\n"
        "real, calls = os.replace, []\n"
        "def replace(a, b):\n"
        "    calls.append(a)\n"
        "    if len(calls) == 2:\n"
        "        os._exit(137)\n"
        "    real(a, b)\n"
        "os.replace = replace\n"
        "out = Path(sys.argv[1])\n"
        "run_folder.publish(out / '.tmp-step-0000005', out / 'step-0000005')\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 137, result.stderr
    assert names(tmp_path) == [".old-step-0000005", ".tmp-step-0000005", "latest"]  # killed inside the window
    notes = run_folder.recover_out(tmp_path)
    assert any("restored" in n for n in notes)
    assert (tmp_path / latest(tmp_path) / "content").read_text() == "old"


# ---- the saved config against the current flags (issue 4) ------------------------------------------------------

@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory, setup):
    """A D run (--adv-weight 0.4 by default) stopped after 1 of 3 steps; tests copy it before resuming."""
    _, _, common = setup
    out = tmp_path_factory.mktemp("stopped") / "run"
    train.main([*common, "--out", str(out), "--steps", "3", "--stop-after", "1"])
    return out


def copy_run(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


@pytest.mark.parametrize("flags, refused", [
    (["--adv-weight", "0"], "the discriminator on/off.*True -> False"),
    (["--adv-weighting", "adaptive"], "the adversarial weighting \\(--adv-weighting\\): 'fixed' -> 'adaptive'"),
    (["--lora-rank", "4"], "D's LoRA rank: 2 -> 4"),
    (["--global-batch", "8"], "the global batch: 4 -> 8"),
    (["--micro-batch", "4"], "the micro-batch: 2 -> 4.*the gradient accumulation: 2 -> 1"),
])
def test_resume_refuses_a_change_of_what_is_trained(tmp_path, setup, one_step_run, flags, refused):
    _, _, common = setup
    out = copy_run(one_step_run, tmp_path / "run")
    with pytest.raises(SystemExit, match=f"(?s)differs from the checkpoint in what is trained.*{refused}"
                                         ".*--allow-config-change"):
        train.main([*common, "--out", str(out), "--steps", "3", "--resume", "auto", *flags])
    assert names(out) == ["latest", "log.jsonl", "step-0000001"]


def test_resume_refuses_another_teacher_unless_allowed(tmp_path, setup, one_step_run, capsys):
    _, _, common = setup
    other = tmp_path / "other"
    write_tiny_sd15(other, seed=1)  # same architecture, other weights: the CD loss 0.002 -> 2.8
    out = copy_run(one_step_run, tmp_path / "run")
    flags = [*common, "--out", str(out), "--steps", "2", "--resume", "auto", "--model", str(other)]
    with pytest.raises(SystemExit, match="the teacher \\(--model\\)"):
        train.main(flags)
    train.main([*flags, "--allow-config-change"])
    assert "allowed change of the teacher" in capsys.readouterr().out and latest(out) == "step-0000002"


@pytest.mark.parametrize("flags, said", [
    (["--lora-rank", "4"], "D starts afresh (the checkpoint has another LoRA shape)"),
    (["--adv-weight", "0"], "the checkpoint's D and its optimiser are dropped"),
])
def test_an_allowed_change_of_d_says_what_happens_to_it(tmp_path, setup, one_step_run, capsys, flags, said):
    _, _, common = setup
    out = copy_run(one_step_run, tmp_path / "run")
    train.main([*common, "--out", str(out), "--steps", "2", "--resume", "auto", "--allow-config-change", *flags])
    assert said in capsys.readouterr().out and latest(out) == "step-0000002"


def test_resume_prints_other_changes_and_continues(tmp_path, setup, one_step_run, capsys):
    _, _, common = setup
    out = copy_run(one_step_run, tmp_path / "run")
    train.main([*common, "--out", str(out), "--steps", "2", "--resume", "auto", "--lr", "2e-3", "--eta", "0.3",
                "--seed", "3"])
    printed = capsys.readouterr().out
    assert "train.lr: 0.001 -> 0.002" in printed and "consistency.eta: 0.1 -> 0.3" in printed
    assert "train.seed: 0 -> 3" in printed and "steps 1 -> 2" in printed


def fake_world_size(out: Path, world: int):
    """Rewrite the checkpoint as if `world` ranks had written it (each rank's RNG states, the recorded world)."""
    path = out / latest(out) / "state.pt"
    state = torch.load(path, weights_only=True)
    state["rng"] = state["rng"] * world
    state["config"]["run"]["world"] = world
    torch.save(state, path)


def test_world_size_change_is_refused_or_rederives_the_noise_streams(tmp_path, setup, one_step_run, capsys):
    _, _, common = setup
    out = copy_run(one_step_run, tmp_path / "run")
    fake_world_size(out, 2)
    flags = [*common, "--out", str(out), "--steps", "2", "--resume", "auto"]
    with pytest.raises(SystemExit, match="the world size: 2 -> 1"):
        train.main(flags)
    train.main([*flags, "--allow-config-change"])
    assert "world size 2 -> 1: every rank's noise stream is re-derived" in capsys.readouterr().out
    assert latest(out) == "step-0000002"


@pytest.mark.slow
def test_world_size_1_to_2_is_refused_then_allowed_under_torchrun(tmp_path, setup, one_step_run):
    """The issue: a world-size-1 checkpoint resumed by 2 ranks died with an IndexError (rank 1's RNG state)."""
    _, _, common = setup
    out = copy_run(one_step_run, tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *common, "--out", str(out), "--steps", "2", "--resume", "auto"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "the world size: 1 -> 2" in refused.stdout + refused.stderr
    assert "IndexError" not in refused.stdout + refused.stderr
    allowed = subprocess.run([*cmd, "--allow-config-change"], env=env, capture_output=True, text=True, timeout=600)
    assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    assert "world size 1 -> 2: every rank's noise stream is re-derived" in allowed.stdout
    assert len(torch.load(out / latest(out) / "state.pt", weights_only=True)["rng"]) == 2
