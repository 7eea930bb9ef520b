"""The adversarial term's weight (--adv-weighting fixed|adaptive) and D's warm-up (--d-warmup), on tiny SD1.5-shaped
models: the adaptive weight is VQGAN's formula at the student's last layer, it makes the adversarial share of the
gradient independent of L_cd's scale, the fixed weight is the loss of before, and during D's warm-up the student
gets the consistency gradient alone while D trains. Each test is written so that the wrong wiring fails it."""
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import train
from consistency import ConsistencyConfig, scott_loss
from datasets import write_folder_dataset
from discriminator import DiscriminatorConfig, g_hinge_loss
from sd15 import load_sd15
from tiny_models import TINY_RUN

ROOT = Path(__file__).resolve().parent.parent
NO_AUTOCAST = nullcontext()


def build(tiny_model, student_lora_rank=0, **train_flags):
    """Models, optimisers and configs as train.main builds them (world size 1, fp32); D's and a LoRA student's
    `up` factors perturbed so that every path carries gradient."""
    torch.manual_seed(0)
    cfg = train.TrainConfig(model=str(tiny_model), lr=1e-3, d_lr=1e-2, bf16=False,
                            student_lora_rank=student_lora_rank, **train_flags)
    consistency = ConsistencyConfig()
    models = train.build_models(load_sd15(tiny_model), cfg, consistency,
                                DiscriminatorConfig(lora_rank=2, lora_alpha=2.0), torch.device("cpu"), world=1)
    with torch.no_grad():
        for lora in models.disc.lora.values():
            lora.up.weight.normal_(std=0.1)
        for lora in (models.student.adapters.values() if student_lora_rank else []):
            lora.up.weight.normal_(std=0.05)
    opt, d_opt = train.build_optimizers(models, cfg, torch.device("cpu"))
    return models, opt, d_opt, cfg, consistency


def micro_batches(models, n=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = models.teacher.config.sample_size
    cond = models.bundle.encode_prompts(["a cat", "a dog"])
    return [(torch.randn(2, 4, size, size, generator=g), cond) for _ in range(n)]


def student_grad(models) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in models.student.parameters()])


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def the_two_losses(models, consistency, z0, cond, seed):
    """L_cd and L_adv of one micro-batch, drawn as student_backward draws them from a generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    res = scott_loss(models.student_fwd, models.target_fwd, models.teacher_fwd, z0, cond, models.uncond,
                     models.schedule, consistency, generator)
    torch.randint(0, models.schedule.num_timesteps, (z0.shape[0],), generator=generator)  # t_d (D at t = 0 here)
    torch.randn(z0.shape, generator=generator)                                             # noise_d
    models.disc.requires_grad_(False)
    loss_adv = g_hinge_loss(models.disc(models.teacher_fwd, res.x_student, torch.zeros(2, dtype=torch.long), cond))
    return res.loss, loss_adv


def last_layer_grad(loss, weight) -> torch.Tensor:
    """∇_w loss by a plain backward (not autograd.grad, which the code under test uses)."""
    weight.grad = None
    loss.backward(retain_graph=True)
    grad, weight.grad = weight.grad.clone(), None
    return grad


# ---- the adaptive weight ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora", [0, 4])
def test_adaptive_weight_is_vqgans_ratio_of_last_layer_gradient_norms(tiny_model, lora):
    """λ_eff = λ_adv · ‖∇_w L_cd‖ / (‖∇_w L_adv‖ + 1e-4) at the student's last layer w, detached; and the student's
    gradient is that of L_cd + λ_eff L_adv with λ_eff a constant."""
    models, opt, d_opt, cfg, consistency = build(tiny_model, lora, adv_weight=0.4, adv_weighting="adaptive")
    (z0, cond), = micro_batches(models)
    w = train.student_last_layer(models.student)
    loss_cd, loss_adv = the_two_losses(models, consistency, z0, cond, seed=1)
    expected = 0.4 * last_layer_grad(loss_cd, w).norm() / (last_layer_grad(loss_adv, w).norm() + 1e-4)
    assert 1e-3 < expected < 1e3  # a ratio that the clamp leaves alone
    opt.zero_grad(set_to_none=True)
    weight = train.adaptive_adv_weight(loss_cd, loss_adv, w, 0.4)
    torch.testing.assert_close(weight, expected, rtol=1e-5, atol=0)
    assert not weight.requires_grad and all(p.grad is None for p in models.student.parameters())
    (loss_cd + expected * loss_adv).backward()  # the gradient λ_eff must give: λ_eff a constant
    wanted = student_grad(models)
    opt.zero_grad(set_to_none=True)

    _, _, adv_weight, _ = train.student_backward(models, [(z0, cond)], cfg, consistency, False,
                                                 torch.Generator().manual_seed(1), NO_AUTOCAST)
    torch.testing.assert_close(adv_weight, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(student_grad(models), wanted, rtol=1e-4, atol=1e-5 * wanted.abs().max().item())


def test_the_lora_students_last_layer_is_the_up_factor_of_the_last_adapter_run(tiny_model):
    models = build(tiny_model, student_lora_rank=4)[0]
    layers = dict(models.teacher.named_modules())
    ran = []
    hooks = [layers[path].register_forward_hook(lambda m, i, o, path=path: ran.append(path))
             for path in models.student.adapters.targets]
    x = torch.randn(1, 4, 8, 8)
    models.student(x, torch.tensor([500]), models.bundle.encode_prompts(["a cat"]))
    for h in hooks:
        h.remove()
    assert "conv_out" not in models.student.adapters.targets  # LCM-LoRA's targets leave conv_out alone
    assert train.student_last_layer(models.student) is models.student.adapters[ran[-1].replace(".", "__")].up.weight
    assert train.student_last_layer(build(tiny_model)[0].student).shape[0] == 4  # a full student: conv_out (ε)


def share_of_the_adversarial_gradient(tiny_model, weighting, scale, monkeypatch) -> float:
    """‖adversarial part‖ / ‖consistency part‖ of the student's last-layer gradient with L_cd multiplied by `scale`
    (one micro-batch; the parts separated by a second run in D's warm-up, which draws the same noise)."""
    real_loss = train.scott_loss

    def scaled(*args, **kwargs):
        result = real_loss(*args, **kwargs)
        result.loss = result.loss * scale
        return result
    monkeypatch.setattr(train, "scott_loss", scaled)
    grads = {}
    for adversarial in (False, True):
        models, _, _, cfg, consistency = build(tiny_model, adv_weight=0.4, adv_weighting=weighting)
        train.student_backward(models, micro_batches(models), cfg, consistency, False,
                               torch.Generator().manual_seed(1), NO_AUTOCAST, adversarial=adversarial)
        grads[adversarial] = train.student_last_layer(models.student).grad.clone()
    return ((grads[True] - grads[False]).norm() / grads[False].norm()).item()


def test_adaptive_weighting_is_scale_free(tiny_model, monkeypatch):
    """Multiplying L_cd by 10 leaves the adversarial share of the last-layer gradient at λ_adv = 0.4 with the
    adaptive weight (a little under it: δ = 1e-4 in the denominator); with the fixed weight it falls tenfold."""
    adaptive = [share_of_the_adversarial_gradient(tiny_model, "adaptive", c, monkeypatch) for c in (1.0, 10.0)]
    fixed = [share_of_the_adversarial_gradient(tiny_model, "fixed", c, monkeypatch) for c in (1.0, 10.0)]
    assert adaptive[1] == pytest.approx(adaptive[0], rel=1e-5) and adaptive[0] == pytest.approx(0.4, rel=1e-2)
    assert fixed[1] == pytest.approx(fixed[0] / 10, rel=1e-3) and fixed[0] != pytest.approx(0.4, rel=0.05)


def test_adaptive_weight_under_bf16_autocast_is_a_finite_fp32_number(tiny_model):
    models, opt, d_opt, cfg, consistency = build(tiny_model, adv_weight=0.4, adv_weighting="adaptive")
    stats = train.train_step(models, opt, d_opt, micro_batches(models, n=2), cfg, consistency, False,
                             torch.Generator().manual_seed(1), torch.autocast("cpu", dtype=torch.bfloat16))
    assert stats.applied and stats.adv_weight.dtype == torch.float32
    assert torch.isfinite(stats.adv_weight) and stats.adv_weight > 0 and stats.adv_weight != 0.4


# ---- the fixed weight -------------------------------------------------------------------------------------------

def test_fixed_weighting_is_the_loss_of_before(tiny_model, monkeypatch):
    """L_cd + λ_adv L_adv with λ_adv = --adv-weight, bit for bit, and no gradient-norm work."""
    models, opt, d_opt, cfg, consistency = build(tiny_model, adv_weight=0.4)
    assert cfg.adv_weighting == "fixed" and cfg.d_warmup == 0  # the defaults
    (z0, cond), = micro_batches(models)
    loss_cd, loss_adv = the_two_losses(models, consistency, z0, cond, seed=1)
    (loss_cd + 0.4 * loss_adv).backward()
    wanted = student_grad(models)
    opt.zero_grad(set_to_none=True)
    monkeypatch.setattr(train, "adaptive_adv_weight", None)  # calling it would raise
    _, loss_g, adv_weight, _ = train.student_backward(models, [(z0, cond)], cfg, consistency, False,
                                                      torch.Generator().manual_seed(1), NO_AUTOCAST)
    assert torch.equal(student_grad(models), wanted) and torch.equal(loss_g, loss_adv.detach())
    assert adv_weight.item() == pytest.approx(0.4)


# ---- D's warm-up --------------------------------------------------------------------------------------------------

def test_d_warmup_trains_d_but_gives_the_student_only_the_consistency_gradient(tiny_model):
    """Steps 0 and 1 of --d-warmup 2 move the student exactly as λ_adv = 0 does (same draws) while D trains on its
    x̂0; D is not run in the student's backward; step 2 has the adversarial term."""
    runs = {}
    for name, adv_weight in (("warm-up", 0.4), ("no adversarial term", 0.0)):
        models, opt, d_opt, cfg, consistency = build(tiny_model, adv_weight=0.4, d_warmup=2)
        cfg = replace(cfg, adv_weight=adv_weight, d_warmup=2 if adv_weight else 0)
        d_before = state(models.disc)
        generator = torch.Generator().manual_seed(1)
        d_calls = []
        hook = models.disc.register_forward_hook(lambda *_: d_calls.append(1))
        stats = [train.train_step(models, opt, d_opt, micro_batches(models, n=2, seed=s), cfg, consistency, False,
                                  generator, NO_AUTOCAST, step=s) for s in range(2)]
        hook.remove()
        runs[name] = models, opt, d_opt, cfg, consistency, generator, stats, d_calls
        assert any(not torch.equal(v, d_before[k]) for k, v in models.disc.state_dict().items())  # D trained
    warm, plain = runs["warm-up"], runs["no adversarial term"]
    for a, b in zip(warm[0].student.parameters(), plain[0].student.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(warm[0].disc.parameters(), plain[0].disc.parameters()):
        assert torch.equal(a, b)
    assert all(s.loss_g == 0 and s.adv_weight == 0 for s in warm[6])
    assert len(warm[7]) == 2 * 2 * 2  # D's own step only: real and fake, 2 micro-batches, 2 steps
    after = [train.train_step(*run[:3], micro_batches(run[0], n=2, seed=2), *run[3:5], False, run[5], NO_AUTOCAST,
                              step=2) for run in (warm, plain)]
    assert after[0].loss_g != 0 and after[0].adv_weight.item() == pytest.approx(0.4)
    assert any(not torch.equal(a, b) for a, b in zip(warm[0].student.parameters(), plain[0].student.parameters()))


# ---- flags, the log, resume, DDP ------------------------------------------------------------------------------------

def test_flags_refuse_what_they_cannot_mean(tiny_model, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", str(tiny_model), "--adv-weighting", "vqgan"])
    assert "--adv-weighting: invalid choice: 'vqgan'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--model", str(tiny_model), "--d-warmup", "-1"])
    assert "--d-warmup -1: must be an integer ≥ 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--adv-weighting 'vqgan'"):
        train.TrainConfig(adv_weighting="vqgan")
    cfg = train.parse_args(["--model", str(tiny_model), "--adv-weighting", "adaptive", "--d-warmup", "5"])[0]
    assert (cfg.adv_weighting, cfg.d_warmup) == ("adaptive", 5)


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_the_log_shows_the_effective_weight(tmp_path, tiny_model, capsys):
    data = write_folder_dataset(tmp_path / "data", n=8, size=40)
    out = tmp_path / "run"
    train.main(["--model", str(tiny_model), "--data", str(data), "--out", str(out), "--steps", "2",
                "--num-workers", "0", "--adv-weighting", "adaptive", "--d-warmup", "1", *TINY_RUN])
    log = read_log(out)
    assert log[0]["adv_weight"] == 0 and log[0]["loss_g"] == 0  # D's warm-up
    assert log[1]["adv_weight"] > 0 and log[1]["adv_weight"] != 0.4 and log[1]["loss_g"] != 0
    assert f"λ {log[1]['adv_weight']:.3g} |" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("lora", [[], ["--student-lora-rank", "4"]], ids=["full", "lora"])
def test_torchrun_two_processes_adaptive(tmp_path, tiny_model, lora):
    """autograd.grad on the DDP-wrapped student leaves DDP's reducer intact: the replicas stay identical
    (--check-sync-every 1) through D's warm-up and the adaptive steps after it."""
    data = write_folder_dataset(tmp_path / "data", n=16, size=40)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--model", str(tiny_model), "--data", str(data), "--out", str(out), "--steps", "3",
           "--check-sync-every", "1", "--num-workers", "0", "--adv-weighting", "adaptive", "--d-warmup", "1",
           *TINY_RUN, *lora]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3] and log[0]["adv_weight"] == 0
    assert all(r["adv_weight"] > 0 and r["loss_g"] != 0 for r in log[1:])
