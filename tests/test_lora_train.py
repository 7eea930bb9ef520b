"""SCott-LoRA in train.py (--student-lora-rank): one UNet in memory, the teacher plain outside the adapters' blocks,
the EMA of the adapters, gradients for the adapters only, bit-exact resume, 2-process torchrun, and a run's step
folder through export.py --to lora into sample.py --lora. Tiny SD1.5-shaped models, CPU."""
import copy
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import export
import sample
import train
from consistency import ConsistencyConfig, scott_loss
from discriminator import DiscriminatorConfig
from lora import ADAPTERS_FILE, TARGET_ADAPTERS_FILE, LoRAStudent
from sd15 import load_sd15
from tiny_models import write_tiny_run

ROOT = Path(__file__).resolve().parent.parent
NO_AUTOCAST = nullcontext()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tiny model, data, the flags every LoRA run here shares)."""
    return write_tiny_run(tmp_path_factory.mktemp("lora_train"), "--student-lora-rank", "4")


def build(model, ema_decay=0.95, adv_weight=0.4):
    """A LoRA student's models and optimisers as train.main builds them (world size 1, fp32), its adapters' `up`
    perturbed so that the student differs from the teacher."""
    torch.manual_seed(0)
    cfg = train.TrainConfig(model=str(model), adv_weight=adv_weight, lr=1e-3, d_lr=1e-2, bf16=False,
                            student_lora_rank=4)
    consistency = ConsistencyConfig(ema_decay=ema_decay)
    models = train.build_models(load_sd15(model), cfg, consistency, DiscriminatorConfig(lora_rank=2, lora_alpha=2.0),
                                torch.device("cpu"), world=1)
    with torch.no_grad():
        for lora in models.student.adapters.values():
            lora.up.weight.normal_(std=0.05)
    opt, d_opt = train.build_optimizers(models, cfg, torch.device("cpu"))
    return models, opt, d_opt, cfg, consistency


def micro_batches(models, n=2, batch=2):
    g = torch.Generator().manual_seed(0)
    size = models.teacher.config.sample_size
    cond = models.bundle.encode_prompts(["a cat", "a dog"][:batch])
    return [(torch.randn(batch, 4, size, size, generator=g), cond) for _ in range(n)]


def step(models, opt, d_opt, cfg, consistency, seed=1):
    return train.train_step(models, opt, d_opt, micro_batches(models), cfg, consistency, False,
                            torch.Generator().manual_seed(seed), NO_AUTOCAST)


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def numel(*modules):
    return sum(p.numel() for m in modules for p in m.parameters())


# ---- the models in memory --------------------------------------------------------------------------------------

def test_one_unet_in_memory_shared_by_teacher_student_target_and_d(setup):
    model, _, _ = setup
    models, opt, d_opt, _, _ = build(model)
    assert isinstance(models.student, LoRAStudent) and isinstance(models.target, LoRAStudent)
    everything = [models.bundle.unet, models.bundle.vae, models.bundle.text_encoder, models.student, models.target,
                  models.teacher, models.disc, models.student_fwd, models.target_fwd, models.teacher_fwd]
    storages = {}
    for module in everything:
        for p in module.parameters():
            storages[p.untyped_storage().data_ptr()] = p.numel()
    bundle = models.bundle
    assert sum(storages.values()) == (numel(bundle.unet, bundle.vae, bundle.text_encoder) + 2 * numel(
        models.student.adapters) + numel(models.disc))  # one UNet + the student's and the target's adapters + D
    assert models.teacher is bundle.unet and models.student.backbone is models.teacher
    assert models.target.adapters is not models.student.adapters
    assert numel(models.student) == numel(models.student.adapters) < numel(models.teacher) / 2
    # the optimiser sees the adapters only
    optimised = {id(p) for group in opt.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in models.student.adapters.parameters()}


def test_only_the_adapters_get_gradients(setup):
    model, _, _ = setup
    models, opt, d_opt, cfg, consistency = build(model)
    train.student_backward(models, micro_batches(models), cfg, consistency, False, torch.Generator().manual_seed(1),
                           NO_AUTOCAST)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in models.student.adapters.parameters())
    assert all(p.grad is None for p in models.target.parameters())
    assert all(p.grad is None for p in models.disc.parameters())
    for module in (models.bundle.unet, models.bundle.vae, models.bundle.text_encoder):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())


def test_the_teacher_is_the_plain_teacher_after_steps_and_inside_the_loss(setup):
    model, _, _ = setup
    models, opt, d_opt, cfg, consistency = build(model)
    plain = copy.deepcopy(load_sd15(model).unet).eval()
    for seed in (1, 2):
        assert step(models, opt, d_opt, cfg, consistency, seed).applied
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([999, 400])
    cond = models.bundle.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        assert torch.equal(models.teacher(x, t, cond), plain(x, t, cond))  # no adapter left switched on
        assert not torch.allclose(models.student(x, t, cond, None), plain(x, t, cond))  # the student is not it
    assert all(torch.equal(a, b) for a, b in zip(models.teacher.parameters(), plain.parameters()))
    # inside the loss, the teacher's transition is the plain teacher's, between the student's and target's calls
    z0, c = micro_batches(models)[0]
    shared, separate = (scott_loss(models.student_fwd, models.target_fwd, teacher, z0, c, models.uncond,
                                   models.schedule, consistency, torch.Generator().manual_seed(5))
                        for teacher in (models.teacher_fwd, plain))
    assert torch.equal(shared.x_target, separate.x_target) and torch.equal(shared.loss, separate.loss)


@pytest.mark.parametrize("mu", [0.9, 0.0])
def test_ema_of_the_adapters_moves_by_one_minus_mu(setup, mu):
    model, _, _ = setup
    models, opt, d_opt, cfg, consistency = build(model, ema_decay=mu)
    models.target.adapters.load_state_dict({k: v + 0.01 for k, v in state(models.target.adapters).items()})
    before = state(models.target.adapters)
    assert step(models, opt, d_opt, cfg, consistency).applied
    online = state(models.student.adapters)
    for name, old in before.items():
        expected = old + (1 - mu) * (online[name] - old)  # θ⁻ ← μ θ⁻ + (1 − μ) θ; μ = 0: the online ones
        torch.testing.assert_close(models.target.adapters.state_dict()[name], expected, rtol=1e-6, atol=1e-7)


# ---- train.main in LoRA mode -----------------------------------------------------------------------------------

def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_a_checkpointed_lora_step_has_the_plain_steps_gradients(setup):
    """--grad-checkpointing with a LoRA student: backward recomputes each block of the shared UNet with the adapter
    set it ran with (the student's in the student's pass, D's in D's), so every gradient is the plain step's."""
    model, _, _ = setup
    result = {}
    for checkpointing in (False, True):
        models, opt, d_opt, cfg, consistency = build(model)
        models.teacher.gradient_checkpointing = checkpointing
        with torch.no_grad():
            for lora in models.disc.lora.values():
                lora.up.weight.normal_(std=0.1)  # so that D's pass carries its adapters' delta
        train.student_backward(models, micro_batches(models), cfg, consistency, False,
                               torch.Generator().manual_seed(1), NO_AUTOCAST)
        student = grads(models.student)
        models.disc.requires_grad_(True)
        z0, cond = micro_batches(models)[0]
        train.d_hinge_loss(models.disc(models.teacher_fwd, z0, torch.zeros(2), cond),
                           models.disc(models.teacher_fwd, z0.flip(0), torch.zeros(2), cond)).backward()
        result[checkpointing] = student, grads(models.disc)
    for plain, checkpointed in zip(result[False], result[True]):
        assert plain.keys() == checkpointed.keys() and len(plain) > 0
        for name, g in plain.items():
            torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_lora_defaults_to_lcm_loras_guidance_range(setup):
    model, data, _ = setup
    assert train.parse_args(["--model", str(model), "--student-lora-rank", "4"])[1].w_max == 15.0
    assert train.parse_args(["--model", str(model), "--student-lora-rank", "4", "--w-max", "9"])[1].w_max == 9.0
    assert train.parse_args(["--model", str(model)])[1].w_max == 16.0


def test_lora_resume_is_bit_exact_and_checkpoints_hold_the_adapters(tmp_path, setup):
    _, _, common = setup
    common = [*common, "--steps", "4"]
    train.main([*common, "--out", str(tmp_path / "straight"), "--sample-every", "2"])
    train.main([*common, "--out", str(tmp_path / "split"), "--stop-after", "2"])
    train.main([*common, "--out", str(tmp_path / "split"), "--resume", "auto"])
    a, b = tmp_path / "straight" / "step-0000004", tmp_path / "split" / "step-0000004"
    assert sorted(p.name for p in a.iterdir()) == sorted([ADAPTERS_FILE, TARGET_ADAPTERS_FILE, "state.pt"])
    for name in (ADAPTERS_FILE, TARGET_ADAPTERS_FILE):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(v.abs().sum() > 0 for k, v in wa.items() if k.endswith(".up.weight"))  # the adapters trained
    sa, sb = (torch.load(p / "state.pt", weights_only=True) for p in (a, b))
    assert all(torch.equal(v, sb["discriminator"][k]) for k, v in sa["discriminator"].items())
    assert [r["loss_cd"] for r in read_log(tmp_path / "straight")][2:] == \
        [r["loss_cd"] for r in read_log(tmp_path / "split")][2:]
    assert (tmp_path / "straight" / "samples-0000002.png").is_file()  # grids sample the LoRA student, no CFG


@pytest.mark.parametrize("flags, refused", [
    (["--student-lora-rank", "8"], "the LoRA student's rank.*4 -> 8"),
    (["--student-lora-rank", "0"], "the LoRA student's rank.*4 -> 0"),
    (["--student-lora-alpha", "2"], "the LoRA student's alpha.*0.0 -> 2.0"),
])
def test_resume_refuses_a_change_of_the_lora_student(tmp_path, setup, flags, refused):
    _, _, common = setup
    out = tmp_path / "run"
    train.main([*common, "--out", str(out), "--steps", "2", "--stop-after", "1"])
    with pytest.raises(SystemExit, match=f"(?s)differs from the checkpoint in what is trained.*{refused}"):
        train.main([*common, "--out", str(out), "--steps", "2", "--resume", "auto", *flags])


def test_a_run_exports_to_a_kohya_lora_that_sample_py_applies(tmp_path, setup):
    model, _, common = setup
    out = tmp_path / "run"
    train.main([*common, "--out", str(out), "--steps", "1"])
    folder = out / (out / "latest").read_text()
    kohya = tmp_path / "scott-lora.safetensors"
    export.main(["--model", str(model), "--lora", str(folder), "--to", "lora", "--out", str(kohya)])
    assert any(k.startswith("lora_unet_") for k in load_file(str(kohya)))
    png = tmp_path / "s.png"
    sample.main(["--model", str(model), "--lora", str(kohya), "--prompt", "a cat", "--steps", "2", "--height", "32",
                 "--width", "32", "--out", str(png)])
    assert png.is_file()


@pytest.mark.slow
def test_torchrun_two_processes_lora(tmp_path, setup):
    model, data, common = setup
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *common, "--out", str(out), "--steps", "3", "--check-sync-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    adapters = load_file(str(out / (out / "latest").read_text() / ADAPTERS_FILE))
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if k.endswith(".up.weight"))
    assert "LoRA student: rank 4" in result.stdout
    # every rank held identical adapters, target adapters and D after every step, or --check-sync-every 1 would
    # have failed the run
