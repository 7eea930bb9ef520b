"""Adapters as modules compute what the hook-based adapters computed: tests/data/lora_reference.* were written by the
hook-based code (tests/data/make_lora_reference.py, at 120278a); the same seeds through today's code must give the
same teacher, student, target and D outputs, merged and kohya-loaded models, two full LoRA train_steps (losses and
every parameter update) within 1e-6 relative (fp32, one thread), and kohya files with the same bytes."""
import copy
import dataclasses
import hashlib
import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import export
import train
from consistency import ConsistencyConfig
from discriminator import Discriminator, DiscriminatorConfig
from lora import Adapters, LoRAConfig, LoRAStudent, load_kohya, merge, save_adapters, save_kohya
from sd15 import load_sd15
from tiny_models import write_tiny_sd15
from unet import UNet, UNetConfig

DATA = Path(__file__).parent / "data"


def canonical_sha256(path, without=()) -> str:
    """sha256 of a safetensors file with its header's JSON keys sorted, as make_lora_reference.py records it:
    safetensors (0.8) writes the header's metadata in a random order per process, so the raw bytes of two runs of the
    same code differ; equal headers and equal tensor bytes give equal hashes. `without`: metadata keys left out."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for key in without:
        header["__metadata__"].pop(key)
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode() + raw[8 + n:]).hexdigest()


def perturb_up(loras, seed, std):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in loras:
            lora.up.weight.copy_(torch.randn(lora.up.weight.shape, generator=g) * std)


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference was recorded on one thread (reductions differ in the last bits)
    yield load_file(str(DATA / "lora_reference.safetensors")), json.loads((DATA / "lora_reference.json").read_text())
    torch.set_num_threads(threads)


def assert_matches(ours: dict, ref: dict, prefix: str):
    keys = sorted(k for k in ref if k.startswith(prefix))
    assert keys and sorted(ours) == keys, set(ours) ^ set(keys)
    for k in keys:
        error = ((ours[k].double() - ref[k].double()).norm() / ref[k].double().norm().clamp_min(1e-30)).item()
        assert error <= 1e-6 or ref[k].abs().max() == ours[k].abs().max() == 0, f"{k}: relative error {error:.2e}"


def test_outputs_and_kohya_file_match_the_hook_based_code(reference, tmp_path):
    ref, recorded = reference
    torch.manual_seed(0)
    teacher = UNet(UNetConfig.tiny()).eval().requires_grad_(False)
    student = Adapters.for_config(teacher, LoRAConfig(rank=4, alpha=8.0))
    target = copy.deepcopy(student)
    disc = Discriminator(teacher, DiscriminatorConfig(lora_rank=4, lora_alpha=2.0))
    perturb_up(student.values(), 1, 0.05)
    perturb_up(target.values(), 2, 0.05)
    perturb_up(disc.lora.values(), 3, 0.1)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([10, 700])
    out = {}
    with torch.no_grad():
        lora_student, lora_target = LoRAStudent(teacher, student, "student"), LoRAStudent(teacher, target, "target")
        out["forward.teacher"] = teacher(x, t, ctx)
        out["forward.student"] = lora_student(x, t, ctx)
        out["forward.target"] = lora_target(x, t, ctx)
        out["forward.disc"] = disc(teacher, x, t, ctx)
        out["forward.merged"] = merge(student, teacher)(x, t, ctx)
    finetune = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in finetune.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    save_kohya(student, tmp_path / "k.safetensors", dtype=torch.float32)
    loaded = load_kohya(tmp_path / "k.safetensors", finetune)
    with torch.no_grad():
        out["forward.finetune_merged"] = merge(loaded, finetune)(x, t, ctx)
    assert_matches(out, ref, "forward.")
    save_kohya(student, tmp_path / "k16.safetensors")
    assert canonical_sha256(tmp_path / "k16.safetensors") == recorded["sha256"]["save_kohya_fp16"]


def test_two_lora_train_steps_match_the_hook_based_code(reference, tmp_path):
    ref, _ = reference
    root = tmp_path / "sd15"
    write_tiny_sd15(root)
    torch.manual_seed(0)
    cfg = train.TrainConfig(model=str(root), adv_weight=0.4, lr=1e-3, d_lr=1e-2, bf16=False, student_lora_rank=4)
    consistency = ConsistencyConfig(ema_decay=0.95)
    models = train.build_models(load_sd15(root), cfg, consistency, DiscriminatorConfig(lora_rank=2, lora_alpha=2.0),
                                torch.device("cpu"), world=1)
    perturb_up(models.student.adapters.values(), 5, 0.05)
    perturb_up(models.disc.lora.values(), 6, 0.1)
    models.target.adapters.load_state_dict(models.student.adapters.state_dict())
    opt, d_opt = train.build_optimizers(models, cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    size = models.teacher.config.sample_size
    cond = models.bundle.encode_prompts(["a cat", "a dog"])
    batches = [train.MicroBatch(torch.randn(2, 4, size, size, generator=g), cond) for _ in range(2)]
    modules = {"student": models.student, "target": models.target, "disc": models.disc}
    out = {}
    for step, (weighting, renoise) in enumerate([("fixed", False), ("adaptive", True)]):
        before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in modules.items()}
        stats = train.train_step(models, opt, d_opt, batches, dataclasses.replace(cfg, adv_weighting=weighting),
                                 consistency, renoise, torch.Generator().manual_seed(8 + step), nullcontext(), step)
        assert stats.applied
        for name in ("loss_cd", "loss_g", "adv_weight", "loss_d", "grad_norm"):
            out[f"step{step}.{name}"] = getattr(stats, name).detach().reshape(1)
        for n, m in modules.items():
            for k, v in m.state_dict().items():
                out[f"step{step}.update.{n}.{k}"] = v - before[n][k]
    assert_matches(out, ref, "step")


def test_export_to_lora_writes_the_same_file(reference, tmp_path, monkeypatch):
    _, recorded = reference
    root = tmp_path / "sd15"
    write_tiny_sd15(root)
    torch.manual_seed(9)
    adapters = Adapters.for_config(load_sd15(root).unet, LoRAConfig(rank=4, alpha=4.0))
    perturb_up(adapters.values(), 10, 0.2)
    step = root / "run" / "step-0000010"
    step.mkdir(parents=True)
    save_adapters(adapters, step / "adapters.safetensors")
    monkeypatch.chdir(tmp_path)  # relative paths: the file's header records --model and --lora
    export.main(["--model", "sd15", "--lora", "sd15/run/step-0000010", "--to", "lora", "--out", "exported.safetensors"])
    # The same bytes but for one metadata entry added after the reference was recorded: the `scott.export` marker by
    # which `--overwrite` recognises an earlier export (export.EXPORT_MARKER).
    with safe_open(str(tmp_path / "exported.safetensors"), "pt") as f:
        assert f.metadata()[export.EXPORT_MARKER] == "lora"
    assert canonical_sha256(tmp_path / "exported.safetensors", without=[export.EXPORT_MARKER]) == \
        recorded["sha256"]["export_to_lora"]
