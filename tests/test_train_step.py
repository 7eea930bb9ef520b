"""The wiring of one optimisation step (train.train_step), in-process on a tiny SD1.5-shaped model: one test per
invariant, each written so that the wrong wiring fails it (swapped EMA arguments, D trained by the student's loss,
the student trained by D's, D shown clean latents when it should see noised ones, a teacher that moves)."""
from contextlib import nullcontext

import pytest
from PIL import Image
import torch

import train
from lora import adapted_layers
from consistency import ConsistencyConfig, boundary_scalings, scott_loss
from discriminator import Discriminator, DiscriminatorConfig, g_hinge_loss
from sd15 import load_sd15
from sde_solver import teacher_transition

NO_AUTOCAST = nullcontext()


def build(tiny_model, adv_weight=0.4, renoise=False, ema_decay=0.95, lr=1e-3):
    """Models, optimisers and configs exactly as train.main builds them (world size 1, fp32)."""
    torch.manual_seed(0)
    cfg = train.TrainConfig(model=str(tiny_model), adv_weight=adv_weight, lr=lr, d_lr=1e-2, bf16=False)
    consistency = ConsistencyConfig(ema_decay=ema_decay)
    disc_cfg = DiscriminatorConfig(lora_rank=2, lora_alpha=2.0, renoise=renoise)
    models = train.build_models(load_sd15(tiny_model), cfg, consistency, disc_cfg, torch.device("cpu"), world=1)
    if models.disc:  # B starts at zero; perturb it so that D's LoRA path carries gradient in these tests
        for lora in models.disc.lora.values():
            torch.nn.init.normal_(lora.up.weight, std=0.1)
    opt, d_opt = train.build_optimizers(models, cfg, torch.device("cpu"))
    return models, opt, d_opt, cfg, consistency


def micro_batches(models, n=2, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = models.student.config.sample_size
    cond = models.bundle.encode_prompts(["a cat", "a dog"][:batch])
    return [(torch.randn(batch, 4, size, size, generator=g), cond) for _ in range(n)]


def state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_ema_target_moves_toward_the_student_by_one_minus_mu(tiny_model):
    models, opt, d_opt, cfg, consistency = build(tiny_model, ema_decay=0.9)
    models.target.load_state_dict({k: v + 0.01 for k, v in state(models.target).items()})  # let target ≠ student
    target_before = state(models.target)
    stats = train.train_step(models, opt, d_opt, micro_batches(models), cfg, consistency, False,
                             torch.Generator().manual_seed(1), NO_AUTOCAST)
    assert stats.applied
    student_after = state(models.student)
    for name, before in target_before.items():
        expected = before + (1 - 0.9) * (student_after[name] - before)  # θ⁻ ← μ θ⁻ + (1 − μ) θ
        torch.testing.assert_close(models.target.state_dict()[name], expected, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(models.target.state_dict()[k], v) for k, v in target_before.items())


def test_student_step_gives_d_no_gradient_and_d_step_gives_the_student_none(tiny_model):
    models, opt, d_opt, cfg, consistency = build(tiny_model)
    batches = micro_batches(models)
    _, loss_g, _, fakes = train.student_backward(models, batches, cfg, consistency, False,
                                              torch.Generator().manual_seed(1), NO_AUTOCAST)
    assert loss_g.abs() > 0  # the generator term was there ...
    assert all(p.grad is not None for p in models.student.parameters() if p.requires_grad)  # ... and trained f_θ
    assert all(p.grad is None for p in models.disc.parameters())  # D is a fixed critic in the student's step
    assert all(p.requires_grad for p in models.disc.parameters())  # and trainable again afterwards
    opt.zero_grad(set_to_none=True)
    train.discriminator_backward(models, fakes, False, NO_AUTOCAST)
    assert all(p.grad is None for p in models.student.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in models.disc.parameters())
    assert all(p.grad is None for p in models.teacher.parameters())


class RecordingDiscriminator(Discriminator):
    """Records what D is shown: (x_t, t) per call."""
    def forward(self, backbone, x_t, t, context):
        self.calls.append((x_t.detach().clone(), t.clone()))
        return super().forward(backbone, x_t, t, context)


def record_d_inputs(models):
    models.disc.__class__ = RecordingDiscriminator
    models.disc.calls = []
    return models.disc.calls


@pytest.mark.parametrize("renoise", [True, False])
def test_d_scores_real_and_fake_at_one_t_with_one_noise(tiny_model, renoise):
    models, opt, d_opt, cfg, consistency = build(tiny_model, renoise=renoise)
    batches = micro_batches(models, n=1)
    _, _, _, fakes = train.student_backward(models, batches, cfg, consistency, renoise,
                                         torch.Generator().manual_seed(1), NO_AUTOCAST)
    calls = record_d_inputs(models)
    train.discriminator_backward(models, fakes, renoise, NO_AUTOCAST)
    (x_real, t_real), (x_fake, t_fake) = calls
    z0, fake = fakes[0][0], fakes[0][1]
    assert torch.equal(t_real, t_fake)
    if not renoise:  # the paper's clean real/fake at t = 0
        assert torch.equal(t_real, torch.zeros_like(t_real)) and torch.equal(x_real, z0) and torch.equal(x_fake, fake)
        return
    assert (t_real > 0).all()  # noised ...
    assert not torch.allclose(x_real, z0)  # ... so D's input is not the clean latent
    ab = models.schedule.alpha_bar(t_real, z0).float()
    noise_real = (x_real - ab.sqrt() * z0) / (1 - ab).sqrt()
    noise_fake = (x_fake - ab.sqrt() * fake) / (1 - ab).sqrt()
    torch.testing.assert_close(noise_real, noise_fake, rtol=1e-4, atol=1e-4)  # one noise draw for both
    assert 0.5 < noise_real.std() < 1.5  # and it is a Gaussian draw, not zeros


def test_the_teacher_never_changes(tiny_model):
    models, opt, d_opt, cfg, consistency = build(tiny_model, renoise=True)
    teacher_before = state(models.teacher)
    generator = torch.Generator().manual_seed(1)
    for seed in range(3):
        assert train.train_step(models, opt, d_opt, micro_batches(models, seed=seed), cfg, consistency, True,
                                generator, NO_AUTOCAST).applied
    assert all(torch.equal(v, teacher_before[k]) for k, v in models.teacher.state_dict().items())
    # and outside D's block the teacher computes the plain teacher (no LoRA set left switched on)
    assert not any(m._forward_hooks for m in models.teacher.modules())
    assert adapted_layers(models.teacher) and all(m.active == "" for m in adapted_layers(models.teacher))


def test_one_scott_step_as_the_readme_writes_it(tiny_model):
    """The README box "One SCott step", line by line with explicit draws, equals scott_loss with the same
    generator; then one AdamW step of the trainer, replayed on the same noise, lowers the loss."""
    models, opt, d_opt, cfg, consistency = build(tiny_model, adv_weight=0.0, lr=3e-5)
    (z0, c), = micro_batches(models, n=1)
    schedule, k, h = models.schedule, consistency.k, consistency.substeps

    def readme_box(seed):
        g = torch.Generator().manual_seed(seed)
        t_n = torch.randint(k, 1000, (2,), generator=g)                           # t_n ~ U{k..999}
        t_m = t_n - k                                                              # t_m = t_n − k
        w = consistency.w_min + (consistency.w_max - consistency.w_min) * torch.rand(2, generator=g)  # ω ~ U
        eps = torch.randn(z0.shape, generator=g)
        ab = schedule.alpha_bar(t_n, z0).float()
        z_tn = ab.sqrt() * z0 + (1 - ab).sqrt() * eps                              # z_tn = √ᾱ z0 + √(1−ᾱ) ε
        x_student = f(models.student, z_tn, t_n, c, w)                             # f_θ(z_tn, t_n, c, ω)
        with torch.no_grad():
            z_tm = teacher_transition(models.teacher, z_tn, t_n, t_m, c, models.uncond, w, schedule,
                                      consistency.eta, h, generator=g)             # h DDIM-η sub-steps, CFG
            target = f(models.target, z_tm, t_m, c, w)                             # f_θ⁻(z_tm, t_m, c, ω)
        return ((x_student - target) ** 2).mean()                                  # ‖x_student − target‖²

    def f(net, x, t, c, w):  # c_skip x + c_out x̂0(ε_θ)
        c_skip, c_out = boundary_scalings(t)
        eps = net(x, t, c, w)
        x0 = schedule.predict_x0(x, eps, t)
        return c_skip.float().view(-1, 1, 1, 1) * x + c_out.float().view(-1, 1, 1, 1) * x0

    before = readme_box(seed=7)
    ours = scott_loss(models.student, models.target, models.teacher, z0, c, models.uncond, schedule, consistency,
                      torch.Generator().manual_seed(7)).loss
    torch.testing.assert_close(ours, before, rtol=1e-5, atol=1e-7)
    stats = train.train_step(models, opt, d_opt, [(z0, c)], cfg, consistency, False,
                             torch.Generator().manual_seed(7), NO_AUTOCAST)
    assert stats.applied and torch.equal(stats.loss_cd, ours.detach())
    assert readme_box(seed=7) < before  # the same noise, after one step: lower


def test_a_nonfinite_loss_skips_the_whole_step(tiny_model, monkeypatch):
    models, opt, d_opt, cfg, consistency = build(tiny_model)
    before = {name: state(m) for name, m in (("student", models.student), ("target", models.target),
                                             ("disc", models.disc))}
    real_loss = train.scott_loss

    def nan_loss(*args, **kwargs):
        result = real_loss(*args, **kwargs)
        result.loss = result.loss * float("nan")
        return result
    monkeypatch.setattr(train, "scott_loss", nan_loss)
    stats = train.train_step(models, opt, d_opt, micro_batches(models), cfg, consistency, False,
                             torch.Generator().manual_seed(1), NO_AUTOCAST)
    assert not stats.applied
    for name, m in (("student", models.student), ("target", models.target), ("disc", models.disc)):
        assert all(torch.equal(v, before[name][k]) for k, v in m.state_dict().items()), name
    assert all(p.grad is None for p in models.student.parameters())


def test_generator_term_reaches_the_student_through_d(tiny_model):
    """λ_adv · hinge_G(D(x_student)) is part of the student's loss: with λ_adv > 0 its gradient differs from the
    consistency loss alone (same draws)."""
    grads = {}
    for adv_weight in (0.0, 0.4):
        models, opt, d_opt, cfg, consistency = build(tiny_model, adv_weight=0.4)
        cfg.adv_weight = adv_weight
        train.student_backward(models, micro_batches(models, n=1), cfg, consistency, False,
                               torch.Generator().manual_seed(1), NO_AUTOCAST)
        grads[adv_weight] = torch.cat([p.grad.flatten() for p in models.student.parameters()])
    assert not torch.allclose(grads[0.0], grads[0.4])
    assert g_hinge_loss is train.g_hinge_loss  # the trainer uses the documented hinge term


def test_sample_grid_rows_are_1_2_4_steps(tiny_model, tmp_path):
    """As on a GPU with --bf16: a bf16 text encoder (so bf16 noise) and the fp32 student, under the step's autocast."""
    models = build(tiny_model, adv_weight=0.0)[0]
    models.bundle.text_encoder.to(torch.bfloat16)
    train.write_sample_grid(tmp_path / "grid.png", models, ["a cat", "a dog"], 32, ConsistencyConfig(),
                            torch.autocast("cpu", dtype=torch.bfloat16))
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (2 * 32, 3 * 32) and grid.text["rows"] == "1, 2, 4 steps"
    assert models.student.training  # back in training mode afterwards
