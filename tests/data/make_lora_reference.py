"""How tests/data/lora_reference.* were made: run on the hook-based adapters (commit 120278a, before adapters
became modules), from the repository root:  python tests/data/make_lora_reference.py OUT_DIR

It records, on fixed seeds and tiny random models, the outputs of the teacher, a LoRA student, its target and D, the
merged and kohya-loaded models, two full LoRA train_steps (losses and parameter updates), and the sha256 of the kohya
files save_kohya and `export.py --to lora` write. tests/test_lora_reference.py recomputes all of it with the current
code and compares. This script uses the old API (Adapters.active, LoRAStudent around hooks) and is kept as the
record of what the numbers are; it is not run by the tests."""
import copy
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
import export  # noqa: E402
import train  # noqa: E402
from consistency import ConsistencyConfig  # noqa: E402
from discriminator import Discriminator, DiscriminatorConfig  # noqa: E402
from lora import Adapters, LoRAConfig, LoRAStudent, load_kohya, merge, save_adapters, save_kohya  # noqa: E402
from sd15 import load_sd15  # noqa: E402
from tiny_models import write_tiny_sd15  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402


def canonical_sha256(path) -> str:
    """sha256 of a safetensors file with its header's JSON keys sorted. safetensors (0.8) writes the header's
    metadata entries in a random order per process (a Rust HashMap), so two runs of the same code write different
    bytes; with the keys sorted, equal headers and equal tensor bytes give equal hashes."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True).encode()
    return hashlib.sha256(header + raw[8 + n:]).hexdigest()


def perturb_up(loras, seed, std):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in loras:
            lora.up.weight.copy_(torch.randn(lora.up.weight.shape, generator=g) * std)


def forwards(out: dict):
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
    with torch.no_grad():
        out["forward.teacher"] = teacher(x, t, ctx)
        out["forward.student"] = LoRAStudent(teacher, student)(x, t, ctx)
        out["forward.target"] = LoRAStudent(teacher, target)(x, t, ctx)
        out["forward.disc"] = disc(teacher, x, t, ctx)
        out["forward.merged"] = merge(student, teacher)(x, t, ctx)
    finetune = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in finetune.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    with tempfile.TemporaryDirectory() as tmp:
        save_kohya(student, Path(tmp) / "k.safetensors", dtype=torch.float32)
        loaded = load_kohya(Path(tmp) / "k.safetensors", finetune)
        with torch.no_grad():
            out["forward.finetune_merged"] = merge(loaded, finetune)(x, t, ctx)
        save_kohya(student, Path(tmp) / "k16.safetensors")
        return {"save_kohya_fp16": canonical_sha256(Path(tmp) / "k16.safetensors")}


def train_steps(out: dict, root: Path):
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


def exported_lora_sha(root: Path) -> str:
    """export.py --to lora on a run folder's adapters, with relative paths (the file's header records them)."""
    torch.manual_seed(9)
    unet = load_sd15(root).unet
    adapters = Adapters.for_config(unet, LoRAConfig(rank=4, alpha=4.0))
    perturb_up(adapters.values(), 10, 0.2)
    step = root / "run" / "step-0000010"
    step.mkdir(parents=True)
    save_adapters(adapters, step / "adapters.safetensors")
    cwd = os.getcwd()
    os.chdir(root.parent)
    try:
        export.main(["--model", root.name, "--lora", f"{root.name}/run/step-0000010", "--to", "lora",
                     "--out", "exported.safetensors"])
        return canonical_sha256("exported.safetensors")
    finally:
        os.chdir(cwd)


def main(dest: Path):
    torch.set_num_threads(1)  # CPU reductions differ in the last bits between thread counts
    out = {}
    hashes = forwards(out)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_sd15(Path(tmp) / "sd15")
        train_steps(out, Path(tmp) / "sd15")
        hashes["export_to_lora"] = exported_lora_sha(Path(tmp) / "sd15")
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dest / "lora_reference.safetensors"))
    (dest / "lora_reference.json").write_text(json.dumps({"torch": torch.__version__, "sha256": hashes}, indent=2))
    print(json.dumps(hashes, indent=2), len(out), "tensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
