"""The run folder (--out) of train.py: checkpoints written atomically, rotated by step, recovered after a crash,
found and validated for a resume, compared with the current run's config, and restored into the built models.

--out holds step-N folders (student/ and target/, or a LoRA student's adapters.safetensors and
target-adapters.safetensors; state.pt), `latest` (the newest one's name) and log.jsonl. A checkpoint is written to
.tmp-step-N, then renamed in. Saving a step that already has a folder first renames that folder to
.old-step-N and deletes it last, so at every instant a complete copy exists under one of the two names;
recover_out() puts an orphaned .old-step-N back and deletes partial .tmp-step-N folders when the next run starts.
One run writes a --out at a time: it holds an exclusive lock on out/.lock (lock_out) for its whole life.
"""
import dataclasses
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint import (CheckpointError, OutputRefused, atomic_write, check_regular_file, clean_leftovers,
                        process_alive, refuse_overlap)
from lora import ADAPTERS_FILE, TARGET_ADAPTERS_FILE, LoRAStudent, read_adapters, save_adapters
from unet import UNet, load_unet, save_unet


STATE_KEYS = ("step", "optimizer", "d_optimizer", "discriminator", "rng", "counters", "config")
CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder in `out`, sorted by the step number (not the name)."""
    found = [(int(m.group(1)), p) for p in out.glob("step-*") if (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return sorted(found)


def save_checkpoint(out: Path, step: int, models, opt, d_opt, generator, counters, configs, keep: int,
                    rank: int):
    """Write out/step-N (write_checkpoint, publish), point out/latest at it, then delete the oldest checkpoints of the
    run beyond `keep` (rotate). A failed write (disk full) removes its partial folder and stops the run with the
    path and the OSError; the previous checkpoint is untouched.

    Every rank's RNG state is gathered so a resumed run draws the same noise on every rank. `configs` is
    describe_run's record, compared at resume."""
    rng = {"generator": generator.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    all_rng = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(all_rng, rng)
    if rank == 0:
        final, tmp = out / f"step-{step:07d}", out / f".tmp-step-{step:07d}"
        state = {"step": step, "optimizer": opt.state_dict(), "d_optimizer": d_opt.state_dict() if d_opt else None,
                 "discriminator": models.disc.state_dict() if models.disc else None, "rng": all_rng,
                 "counters": counters, "config": configs,
                 "scalers": [sc.state_dict() for sc in models.scalers] if models.scalers else None}
        try:
            write_checkpoint(tmp, models, state)
            publish(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            latest = out / "latest"
            kept = f"{out / latest.read_text().strip()} is intact" if latest.is_file() else "no earlier checkpoint"
            raise SystemExit(f"could not write the checkpoint of step {step} to {tmp} ({e}); removed the partial "
                             f"folder; {kept}. Free space on that disk (or choose another --out), then continue with "
                             f"--resume auto --out {out}.") from None
        rotate(out, step, keep)
        print(f"saved checkpoint {final}", flush=True)
    if dist.is_initialized():
        dist.barrier()


def write_checkpoint(tmp: Path, models, state: dict):
    """The checkpoint's files into the (new) folder `tmp`: student/ and target/ (a LoRA student: adapters.safetensors
    and target-adapters.safetensors instead), and state.pt."""
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(models.student, LoRAStudent):
        tmp.mkdir(parents=True)
        save_adapters(models.student.adapters, tmp / ADAPTERS_FILE)
        save_adapters(models.target.adapters, tmp / TARGET_ADAPTERS_FILE)
    else:
        save_unet(models.student, tmp / "student")
        save_unet(models.target, tmp / "target")
    torch.save(state, tmp / "state.pt")


def publish(tmp: Path, final: Path):
    """Rename the complete folder `tmp` to `final` and point `latest` at it. An existing `final` (the same step
    saved again) is renamed to .old-<name> first and deleted last: a kill at any instant leaves a complete copy
    under one of the two names (recover_out restores it)."""
    old = final.with_name(".old-" + final.name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    atomic_write(final.parent / "latest", lambda path: path.write_text(final.name))
    shutil.rmtree(old, ignore_errors=True)


def rotate(out: Path, step: int, keep: int):
    """Delete checkpoints of steps below `step` until `keep` remain with step-N itself, oldest (by step number)
    first. Folders of later steps are left alone: they are not this run's to delete."""
    older = [folder for s, folder in list_checkpoints(out) if s < step]
    for folder in older[:max(0, len(older) - (keep - 1))]:
        shutil.rmtree(folder)


def recover_out(out: Path) -> list[str]:
    """Undo what a killed or failed checkpoint write left in `out`: an .old-step-N whose step-N is missing is
    renamed back, any other .old-step-N and every partial .tmp-step-N is deleted. Returns what was done, in words."""
    notes = []
    for old in sorted(out.glob(".old-step-*")):
        final = out / old.name.removeprefix(".old-")
        if final.exists():
            shutil.rmtree(old)
            notes.append(f"removed {old} (left by an interrupted re-save; {final.name} is complete)")
        else:
            os.replace(old, final)
            notes.append(f"restored {final} from {old.name} (an interrupted re-save)")
    for tmp in sorted(out.glob(".tmp-step-*")):
        shutil.rmtree(tmp)
        notes.append(f"removed the partial checkpoint {tmp} (an interrupted or failed write)")
    return notes + clean_leftovers(out)  # e.g. .latest.<pid>@<host>.tmp


# ---- one writer per --out -------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"
_held_locks = {}  # resolved folder -> its open lock file, held until this process ends (the kernel then releases it)
HOLDER = re.compile(r"pid (\d+) on host (\S+), since ")  # in the line lock_out writes
NAME_WAIT_S = 2.0  # how long a refused run waits for the holder to write its name


def lock_out(out: Path, command: str) -> None:
    """Take an exclusive flock on out/.lock for the rest of this process's life, or SystemExit at once naming the
    process (pid, host) that holds it: two runs writing one --out would interleave their logs and delete each
    other's checkpoints. The kernel drops the lock when the holder dies, however it dies, so a killed run never
    blocks the next. Re-entrant within a process. A filesystem without locks gets a warning, not a refusal."""
    key = out.resolve()
    if key in _held_locks:
        return
    handle = open(out / LOCK_FILE, "a+")
    deadline = time.monotonic() + NAME_WAIT_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = holder_name(handle)
            if holder is not None or time.monotonic() > deadline:
                handle.close()
                holder = holder or "a process that has not written its name yet"
                raise SystemExit(f"{out} is in use by another run ({holder}); two writers would mix their outputs. "
                                 f"Wait for it to end (or stop it), or choose another --out.") from None
            time.sleep(0.05)  # the holder writes its name just after it takes the lock; or it ends, and we take it
        except OSError as e:
            handle.close()
            print(f"warning: cannot lock {out / LOCK_FILE} ({e}; a filesystem without locks?): make sure no other "
                  f"run writes to {out}.", file=sys.stderr, flush=True)
            return
    handle.seek(0)
    handle.truncate()
    handle.write(f"{command}, pid {os.getpid()} on host {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _held_locks[key] = handle


def holder_name(handle) -> str | None:
    """The name in a held lock file, or None while it may not be the holder's yet: empty (the holder took the lock
    but has not written) or naming a process of this host that no longer exists (a killed run's name, which the
    holder is about to replace)."""
    handle.seek(0)
    name = handle.read().strip()
    found = HOLDER.search(name)
    if not name or (found and found[2] == socket.gethostname() and not process_alive(int(found[1]))):
        return None
    return name


def on_rank_zero(action, *args) -> None:
    """action(*args) on rank 0 only (all of them without torchrun). A SystemExit it raises (a refusal) is raised on
    every rank with the same one-line message: rank 0 broadcasts it before any barrier, so the other ranks exit
    with it rather than crash at their next collective (gloo's "Connection closed by peer")."""
    message, ranks = None, dist.is_initialized()
    if not ranks or dist.get_rank() == 0:
        try:
            action(*args)
        except SystemExit as e:
            message = str(e.code) if e.code is not None else "stopped"
    if ranks:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
        if message is not None:
            dist.destroy_process_group()
    if message is not None:
        error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")  # set by torchrun: its failure summary shows this
        if error_file:
            with open(error_file, "w") as f:
                json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                         "timestamp": str(int(time.time()))}}}, f)
        if ranks:
            # Every rank prints the line at once into one pipe: one write each, so two lines never run together
            # (SystemExit's own printing writes the text and its newline separately).
            os.write(2, f"{message}\n".encode())
            raise SystemExit(1)
        raise SystemExit(message)


def check_paths(cfg, model: Path) -> None:
    """The trainer's outputs against its inputs, before anything is loaded (SystemExit): an --out or --cache-to
    that is, holds or lies inside --model, --data or --tokenizer."""
    inputs = {"--model": model, "--data": cfg.data, "--tokenizer": cfg.tokenizer}
    try:
        flag, output = ("--cache-to", cfg.cache_to) if cfg.cache_to else ("--out", cfg.out)  # what this run writes
        refuse_overlap(output, inputs, flag)
    except OutputRefused as e:
        raise SystemExit(str(e)) from None


def prepare_out(out: Path, cfg):
    """Make --out ready (rank 0, before anything is loaded): create it, lock it (lock_out), recover_out, and refuse a fresh start into
    a folder that holds checkpoints (their rotation would mix two runs) unless --overwrite, which moves the earlier
    run's checkpoints, latest, log and grids into out/replaced-<time>/."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot create the folder ({e}); choose another --out.") from None
    lock_out(out, "train.py")
    for note in recover_out(out):
        print(note, flush=True)
    checkpoints = list_checkpoints(out)
    if cfg.resume or not checkpoints:
        return
    if not cfg.overwrite:
        raise SystemExit(f"--out {out} holds checkpoints of an earlier run (newest {checkpoints[-1][1].name}). "
                         f"Continue it with --resume auto, choose another --out, or pass --overwrite to move them "
                         f"into {out}/replaced-<time>/ and start afresh.")
    earlier = [folder for _, folder in checkpoints] + sorted(out.glob("samples-*.png")) + [
        p for p in (out / "latest", out / "log.jsonl") if p.exists()]
    set_aside(out, earlier, "--overwrite: the earlier run's checkpoints, log and grids")


def set_aside(out: Path, paths: list[Path], what: str):
    """Move `paths` into a new out/replaced-<time>/ folder (nothing is deleted) and say so."""
    aside = out / time.strftime("replaced-%Y%m%d-%H%M%S")
    aside.mkdir(exist_ok=True)
    for path in paths:
        os.replace(path, aside / path.name)
    print(f"{what}: moved {len(paths)} file(s) and folder(s) to {aside}", flush=True)


@dataclass
class Resume:
    """A checkpoint found valid by load_checkpoint: its folder, state.pt, and its student and target (on the CPU):
    UNets, or a LoRA student's adapter weights (state dicts)."""
    folder: Path
    state: dict
    student: UNet | dict
    target: UNet | dict


def load_checkpoint(folder: Path) -> Resume:
    """Load and check a checkpoint folder: state.pt readable with all STATE_KEYS, student/ and target/ (or a LoRA
    student's adapters files) loadable. A CheckpointError says what is wrong."""
    state_file = folder / "state.pt"
    check_regular_file(state_file, "the checkpoint's state.pt")
    try:
        state = torch.load(state_file, weights_only=True, map_location="cpu")
    except Exception as e:  # a truncated or corrupt pickle raises many types: EOFError, RuntimeError, ...
        raise CheckpointError(f"{state_file}: unreadable ({type(e).__name__}: {str(e)[:200]}); the file is "
                              "truncated or corrupt.") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise CheckpointError(f"{state_file}: lacks {missing}; not a checkpoint written by train.py.")
    if (folder / ADAPTERS_FILE).exists():
        return Resume(folder, state, read_adapters(folder / ADAPTERS_FILE)[1],
                      read_adapters(folder / TARGET_ADAPTERS_FILE)[1])
    return Resume(folder, state, load_unet(folder / "student"), load_unet(folder / "target"))


def find_resume(cfg, out: Path, master: bool) -> Resume | None:
    """The checkpoint to resume from: --resume PATH (which must be valid), or with `auto` the newest valid one in
    --out, saying which were skipped and why (None when --out holds none: a fresh start)."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        try:
            return load_checkpoint(Path(cfg.resume))
        except (CheckpointError, OSError) as e:
            raise SystemExit(f"--resume {cfg.resume}: not a usable checkpoint folder: {e} Pass a step-N folder "
                             "written by train.py, or 'auto' for the newest valid one in --out.") from None
    skipped = []
    latest = out / "latest"
    if latest.is_file() and not (out / latest.read_text().strip()).is_dir():
        skipped.append(f"{latest} names {latest.read_text().strip()!r}, which does not exist")
    for _, folder in reversed(list_checkpoints(out)):
        try:
            found = load_checkpoint(folder)
        except (CheckpointError, OSError) as e:
            skipped.append(f"skipped {folder.name}: {e}")
            continue
        if master:
            for note in skipped:
                print(f"--resume auto: {note}", flush=True)
        return found
    if list_checkpoints(out):
        raise SystemExit(f"--resume auto: no valid checkpoint in {out}:\n  " + "\n  ".join(skipped) + "\nRepair or "
                         "remove them, pass --resume PATH, or start afresh with --overwrite.")
    return None


# What a resumed run may not change without --allow-config-change: what is trained, and on which batches. Keys are
# describe_run's, flattened ("section.field"). Every other setting that differs is printed.
GUARDED = {"run.model": "the teacher (--model)", "run.world": "the world size", "run.discriminator":
           "the discriminator on/off (--adv-weight)", "discriminator.lora_rank": "D's LoRA rank",
           "discriminator.lora_alpha": "D's LoRA alpha", "train.global_batch": "the global batch",
           "train.adv_weighting": "the adversarial weighting (--adv-weighting)",
           "train.micro_batch": "the micro-batch", "run.accumulation": "the gradient accumulation",
           "consistency.w_embed_dim": "the student's ω embedding (architecture)",
           "consistency.timestep_scaling": "the student's boundary scalings",
           "consistency.sigma_data": "the student's boundary scalings",
           "train.student_lora_rank": "the LoRA student's rank (0 = a full UNet student)",
           "train.student_lora_alpha": "the LoRA student's alpha"}
# Settings that only say where to write, how often, and how to stop: never compared.
UNCOMPARED = {"train.resume", "train.out", "train.stop_after", "train.cache_to", "train.log_every", "train.ckpt_every",
              "train.sample_every", "train.keep_checkpoints", "train.check_sync_every", "train.overwrite",
              "train.allow_config_change", "train.model", "train.steps"}


def describe_run(configs: dict, model: Path, world: int, accumulation: int) -> dict:
    """What a checkpoint records of the run: every config's fields, plus the resolved teacher path, the world size,
    the accumulation and whether D is on (the "run" section)."""
    described = {name: dataclasses.asdict(c) for name, c in configs.items()}
    described["run"] = {"model": str(model.resolve()), "world": world, "accumulation": accumulation,
                        "discriminator": configs["train"].adv_weight > 0}
    return described


def compare_configs(saved: dict, current: dict, allow_change: bool, master: bool):
    """Differences between a checkpoint's describe_run record and this run's. A GUARDED one raises SystemExit
    unless `allow_change`; the others are printed (rank 0)."""
    flat = lambda d: {f"{section}.{k}": v for section, fields in d.items() for k, v in fields.items()}  # noqa: E731
    before, now = flat(saved), flat(current)
    changed = {k: (before[k], now[k]) for k in now if k in before and k not in UNCOMPARED and before[k] != now[k]}
    guarded = [f"{GUARDED[k]}: {old!r} -> {new!r}" for k, (old, new) in changed.items() if k in GUARDED]
    if guarded and not allow_change:
        raise SystemExit("--resume: this run differs from the checkpoint in what is trained:\n  " + "\n  ".join(
            guarded) + "\nResume with the checkpoint's settings, start afresh in another --out, or pass "
            "--allow-config-change to continue anyway (the noise streams are re-derived if the world size changed).")
    if master:
        for k, (old, new) in changed.items():
            print(f"--resume: {'allowed change of ' + GUARDED[k] if k in GUARDED else k}: {old!r} -> {new!r}")


def shapes(weights: dict) -> dict:
    """Name -> shape of a state dict: two fit each other when these are equal."""
    return {k: tuple(v.shape) for k, v in weights.items()}


def restore_student(module: UNet | LoRAStudent, saved: UNet | dict, name: str, folder: Path):
    """Load the checkpoint's student or target (a UNet, or a LoRA student's adapter weights) into this run's; a
    SystemExit when they do not fit (another architecture, LoRA rank or kind of student)."""
    lora = isinstance(module, LoRAStudent)
    if lora != isinstance(saved, dict):
        raise SystemExit(f"--resume {folder}: its {name} is {'a full UNet' if lora else 'a LoRA'}, this run's is "
                         f"{'a LoRA' if lora else 'a full UNet'} (--student-lora-rank); resume with its setting.")
    if lora:
        if shapes(saved) != shapes(module.adapters.state_dict()):
            raise SystemExit(f"--resume {folder}: its {name}'s adapters have other targets or another rank than "
                             f"this run's (--student-lora-rank); resume with the checkpoint's settings.")
        module.adapters.load_state_dict(saved)
        return
    if module.config != saved.config:
        raise SystemExit(f"--resume {folder}: its {name} is another architecture than this run's (--model and the "
                         f"consistency settings make {module.config}, the checkpoint holds {saved.config}); resume "
                         f"with the teacher it was trained from.")
    module.load_state_dict(saved.state_dict())


def restore(resume: Resume, models, opt, d_opt, generator, cfg, rank: int, world: int,
            device, master: bool):
    """Load a checkpoint into the modules the run already built (so the optimiser's parameter order is unchanged)
    and continue every random stream where it stopped; after a world-size change (--allow-config-change) the
    streams are re-derived from --seed, the step and the rank instead. D and its optimiser are restored when both
    the checkpoint and this run have D."""
    state = resume.state
    for module, saved, name in ((models.student, resume.student, "student"), (models.target, resume.target, "target")):
        restore_student(module, saved, name, resume.folder)
    opt.load_state_dict(state["optimizer"])
    if models.scalers and state.get("scalers"):  # --fp16: the gradient scales where they were
        for scaler, saved in zip(models.scalers, state["scalers"]):
            scaler.load_state_dict(saved)
    saved_d = state["discriminator"]
    if models.disc and saved_d is not None and shapes(saved_d) == shapes(models.disc.state_dict()):
        models.disc.load_state_dict(saved_d)
        d_opt.load_state_dict(state["d_optimizer"])
    elif master and (models.disc or saved_d is not None):  # only with --allow-config-change (compare_configs)
        print("--resume: " + ("the checkpoint's D and its optimiser are dropped (this run has no D)" if not models.disc
                              else "D starts afresh (the checkpoint has " + (
                                  "none)" if saved_d is None else "another LoRA shape)")), flush=True)
    if len(state["rng"]) != world:
        seed = (cfg.seed * 1_000_003 + state["step"]) * 4096 + rank
        generator.manual_seed(seed)
        torch.manual_seed(seed)
        if master:
            print(f"--resume: world size {len(state['rng'])} -> {world}: every rank's noise stream is re-derived from "
                  "--seed, the step and the rank (the run will not match an uninterrupted one bit for bit)",
                  flush=True)
        return
    rng = state["rng"][rank]
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])


# ---- experiment trackers (--log-to) -------------------------------------------------------------------------------

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log-to name: the package to pip install


def tracker_names(log_to: str) -> list[str]:
    """--log-to "tensorboard,wandb" -> the names, each checked to be importable (SystemExit naming the package to
    install otherwise), before anything is loaded."""
    names = [n.strip() for n in log_to.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise SystemExit(f"--log-to {log_to}: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}.")
        try:
            __import__("torch.utils.tensorboard" if name == "tensorboard" else name)
        except ImportError as e:
            raise SystemExit(f"--log-to {name}: the {TRACKERS[name]} package is not installed ({e}); "
                             f"pip install {TRACKERS[name]}") from None
    return names


class Trackers:
    """Rank 0's experiment trackers: every scalar of the progress line, the sample grids and the run's effective
    config as hyper-parameters. A resumed run continues the same TensorBoard folder (out/tensorboard; points after
    the resumed step are dropped) and the same wandb run (its id is kept in out/wandb_id)."""

    def __init__(self, names: list[str], out: Path, config: dict, start_step: int):
        flat = {f"{section}.{k}": v for section, fields in config.items() for k, v in fields.items()}
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
            # A resume drops what an interrupted run logged after its checkpoint (steps > start_step).
            self.tensorboard = SummaryWriter(str(out / "tensorboard"),
                                             purge_step=start_step + 1 if start_step else None)
            hyper = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}
            for summary in hparams(hyper, {}):  # in this run's own folder, beside its scalars
                self.tensorboard.file_writer.add_summary(summary)
        if "wandb" in names:
            import wandb
            id_file = out / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            atomic_write(id_file, lambda tmp: tmp.write_text(run_id))
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "scott"), id=run_id, resume="allow",
                                    dir=str(out), config=flat)

    def log(self, step: int, scalars: dict):
        for name, value in scalars.items():
            if name != "step" and self.tensorboard:
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb:
            self.wandb.log({k: v for k, v in scalars.items() if k != "step"}, step=step)

    def image(self, step: int, name: str, path: Path):
        """A PNG the run wrote (a sample grid)."""
        if self.tensorboard:
            import numpy as np
            from PIL import Image
            self.tensorboard.add_image(name, np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        if self.wandb:
            import wandb
            self.wandb.log({name: wandb.Image(str(path))}, step=step)

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
