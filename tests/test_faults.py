"""Fault injection on every write path (issue 26): the writer is killed (os._exit in a forked child, so no `finally`
runs, as under kill -9) at each rename and in the middle of each file write, and the next run must end with exactly
one complete output and no leftovers. Paths: a single-file export, a pipeline folder, a kohya LoRA, a training
checkpoint, the evaluation's reference-feature cache."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import export
import run_folder
from checkpoint import clean_leftovers
from lora import Adapters, LoRAConfig, load_kohya, save_adapters
from metrics import coco
from sd15 import load_sd15
from tiny_models import write_tiny_sd15
from unet import UNet, UNetConfig, load_unet, make_student, save_unet

KILLED = 137
WRITERS = [(safetensors.torch, "save_file"), (export, "save_file"), (torch, "save"), (coco, "save_file")] + [
    (__import__(m), "save_file") for m in ("unet", "vae", "lora")]


def counting(fault: tuple | None):
    """Install wrappers of os.replace and of every file writer (safetensors' save_file as each module imported it,
    torch.save) that count their calls; with fault = (kind, n) the n-th call of that kind ("rename" or "write")
    kills the process: before the rename, or after writing half the file. Returns the counters."""
    counts = {"rename": 0, "write": 0}
    real_replace = os.replace

    def replace(src, dst):
        counts["rename"] += 1
        if fault == ("rename", counts["rename"]):
            os._exit(KILLED)
        return real_replace(src, dst)
    os.replace = replace
    for module, name in WRITERS:
        real = getattr(module, name)
        if getattr(real, "counted", False):
            continue

        def write(obj, path, *args, _real=real, **kwargs):
            counts["write"] += 1
            result = _real(obj, path, *args, **kwargs)
            if fault == ("write", counts["write"]):
                size = os.path.getsize(path)
                with open(path, "r+b") as f:
                    f.truncate(size // 2)  # a kill mid-write: half of the bytes on disk
                os._exit(KILLED)
            return result
        write.counted = True
        setattr(module, name, write)
    return counts


def stages(action, prepare) -> list:
    """Every (kind, n) at which `action` (after prepare()) can be killed: counted in a child that runs it unharmed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        prepare()
        counts = counting(None)
        action()
        os.write(write, json.dumps(counts).encode())
        os._exit(0)
    os.close(write)
    counts = json.loads(os.read(read, 1000))
    os.waitpid(pid, 0)
    return [(kind, n) for kind in ("rename", "write") for n in range(1, counts[kind] + 1)]


def run_killed(action, fault) -> None:
    """action() in a forked child killed at `fault`; asserts that it was."""
    pid = os.fork()
    if pid == 0:
        try:
            torch.set_num_threads(1)
            counting(fault)
            action()
        finally:
            os._exit(0)  # not killed: the fault was never reached
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == KILLED, f"the writer was not killed at {fault}"


def check_every_stage(action, prepare, rerun, check, after_kill=None):
    """For each stage: prepare() (a fresh or an earlier output), the write killed there, after_kill(fault) (what
    is on disk then), rerun() (the next run), then check() (exactly one complete output, no leftovers)."""
    faults = stages(action, prepare)
    assert {kind for kind, _ in faults} == {"rename", "write"}
    for fault in faults:
        prepare()
        run_killed(action, fault)
        if after_kill:
            after_kill(fault)
        rerun()
        check(fault)
    return faults


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    model = tmp_path_factory.mktemp("faults") / "sd15"
    teacher, _, _ = write_tiny_sd15(model)
    save_unet(make_student(teacher, 16), model / "student")
    adapters = Adapters.for_config(load_unet(model), LoRAConfig(rank=2, alpha=2.0))
    save_adapters(adapters, model.parent / "adapters.safetensors")
    return model


def clear(folder: Path):
    for entry in folder.iterdir():
        run_folder.shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


EXPORTS = {  # --to: (--out name, extra flags)
    "single-file": ("s.safetensors", ["--guidance", "3"]),
    "pipeline": ("pipe", []),
    "lora": ("l.safetensors", []),
}


@pytest.mark.parametrize("to", EXPORTS)
@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "overwrite"])
def test_a_killed_export_leaves_one_complete_output_after_the_next_run(work, tmp_path, capsys, to, earlier):
    """fresh: no --out yet, the rerun is the same command. overwrite: an earlier export (--steps 2) is being
    replaced (--steps 4 --overwrite); the rerun repeats that. Either way the rerun's output is complete (it reads
    back, with the rerun's settings) and alone in its folder."""
    name, extra = EXPORTS[to]
    out = tmp_path / "exports" / name
    out.parent.mkdir()
    inputs = ["--lora", str(work.parent / "adapters.safetensors")] if to == "lora" else ["--student",
                                                                                         str(work / "student")]
    argv = ["--model", str(work), *inputs, "--to", to, "--out", str(out), *extra]

    def prepare():
        clear(out.parent)
        if earlier:
            export.main(argv + ["--steps", "2"])

    action = lambda: export.main(argv + ["--steps", "4"] + (["--overwrite"] if earlier else []))  # noqa: E731

    def complete(fault, steps):
        """out is a complete export made with one of `steps`."""
        if to == "pipeline":
            assert json.loads((out / "model_index.json").read_text())[export.FOLDER_MARKER] == "pipeline"
            assert any(f"num_inference_steps={n}" in (out / "README.md").read_text() for n in steps), fault
            assert load_sd15(out).unet is not None and load_unet(out / "unet").config.guidance_embed_dim == 16
        else:
            assert safe_open(str(out), "pt").metadata()["scott.steps"] in steps, fault
            if to == "lora":
                assert len(load_kohya(out, load_unet(work))) > 0
            else:
                assert all(torch.isfinite(v).all() for v in load_file(str(out)).values())

    def after_kill(fault):  # with --overwrite, a complete output survives the kill: the old one or the new one
        if earlier:
            clean_leftovers(out.parent, out.name)  # puts an .old moved aside back
            complete(fault, ("2", "4"))

    def check(fault):
        assert os.listdir(out.parent) == [name], (fault, os.listdir(out.parent))
        complete(fault, ("4",))

    faults = check_every_stage(action, prepare, action, check, after_kill)
    capsys.readouterr()
    with capsys.disabled():
        print(f"{to} ({'overwrite' if earlier else 'fresh'}): killed at {len(faults)} stages: {faults}")


def tiny_models():
    student = UNet(UNetConfig.tiny())
    models = SimpleNamespace(student=student, target=UNet(UNetConfig.tiny()), disc=None, scalers=None)
    return models, torch.optim.AdamW(student.parameters())


@pytest.mark.parametrize("again", [False, True], ids=["next-step", "same-step"])
def test_a_killed_checkpoint_save_leaves_one_complete_checkpoint(tmp_path, again):
    """step-1 exists; step-2 is saved (or, same-step, step-1 saved again: publish's .old-step-N rename) and killed;
    the next run (prepare_out's recover_out, then the save again) leaves complete checkpoints, `latest` on the
    newest, and nothing else but the lock."""
    models, opt = tiny_models()
    out = tmp_path / "run"
    step = 1 if again else 2
    save = lambda s: run_folder.save_checkpoint(out, s, models, opt, None, torch.Generator(), {}, {}, 3, 0)  # noqa

    def prepare():
        run_folder.shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        save(1)

    def rerun():
        run_folder.recover_out(out)
        save(step)

    def check(fault):
        assert sorted(os.listdir(out)) == sorted(["latest"] + [f"step-{s:07d}" for s in range(1, step + 1)]), fault
        assert (out / "latest").read_text() == f"step-{step:07d}"
        for s in range(1, step + 1):
            assert run_folder.load_checkpoint(out / f"step-{s:07d}").state["step"] == s

    faults = check_every_stage(lambda: save(step), prepare, rerun, check)
    print(f"checkpoint ({'same' if again else 'next'} step): killed at {len(faults)} stages: {faults}")


def test_a_killed_reference_cache_write_leaves_one_complete_cache(tmp_path, monkeypatch):
    """coco.reference_features computes the features (here: a fixed tensor) and caches them; killed, the next run
    computes and caches them again, and nothing else is left in the folder."""
    features = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(coco, "inception_features", lambda *args, **kwargs: features.clone())
    protocol = coco.PROTOCOLS["coco2017-5k"]
    entries = [{"image_id": i, "file": f"{i}.jpg"} for i in range(6)]
    cache = tmp_path / "eval" / "reference.safetensors"
    cache.parent.mkdir()
    action = lambda: coco.reference_features(tmp_path, protocol, entries, None, "sha", cache)  # noqa: E731

    def check(fault):
        assert os.listdir(cache.parent) == [cache.name], fault
        assert torch.equal(load_file(str(cache))["features"], features)

    faults = check_every_stage(action, lambda: clear(cache.parent), action, check)
    print(f"reference cache: killed at {len(faults)} stages: {faults}")
