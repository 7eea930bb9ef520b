"""toyworld/gmm2d.py: the mixture's closed-form ε is the true −√(1 − ᾱ) ∇log p_t, its sampler is right, the conditional critic
learns, the adaptive λ is VQGAN's formula, and the experiment runs end to end through the trainer's own loss and
sampler."""
import torch

from toyworld import gmm2d
from consistency import ConsistencyConfig, scott_loss
from discriminator import g_hinge_loss
from toyworld.gmm2d import (AdversarialConfig, ExperimentConfig, GaussianMixture, MLPDiscriminator, MLPStudent,
                   discriminator_step, sliced_wasserstein, student_objective)
from sde_solver import NoiseSchedule


def autograd_eps(mixture, x, t, cond, schedule):
    """ε = −√(1 − ᾱ) ∇ log p_t(x | c) by autograd through torch.distributions (an independent implementation)."""
    ab = schedule.alpha_bar(t, x).view(-1)
    cov = ab[:, None, None, None] * mixture.covs + (1 - ab)[:, None, None, None] * torch.eye(2, dtype=torch.float64)
    components = torch.distributions.MultivariateNormal(ab.sqrt()[:, None, None] * mixture.means, covariance_matrix=cov)
    x = x.clone().requires_grad_(True)
    log_p = (components.log_prob(x[:, None, :]) + mixture.weights.log() + mixture.component_mask(cond).log())
    (grad,) = torch.autograd.grad(log_p.logsumexp(1).sum(), x)
    return -(1 - ab).sqrt()[:, None] * grad


def test_closed_form_eps_is_the_score_of_the_noisy_mixture():
    mixture, schedule = GaussianMixture.ring(), NoiseSchedule.sd15()
    g = torch.Generator().manual_seed(0)
    x = 1.5 * torch.randn(96, 2, dtype=torch.float64, generator=g)
    t = torch.randint(0, 1000, (96,), generator=g)
    cond = torch.zeros(96, 2, dtype=torch.float64)
    cond[:32, 0], cond[32:64, 1] = 1, 1  # class 0, class 1, unconditional
    torch.testing.assert_close(mixture.eps(x, t, cond, schedule), autograd_eps(mixture, x, t, cond, schedule))
    assert not torch.allclose(mixture.eps(x[:32], t[:32], cond[:32], schedule),
                              mixture.eps(x[:32], t[:32], cond[64:], schedule))  # the condition matters


def test_mixture_sampler_and_assignment():
    mixture = GaussianMixture.ring()
    x, comp = mixture.sample(20000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(torch.bincount(comp, minlength=8).double() / 20000, mixture.weights, rtol=0, atol=0.01)
    assert (mixture.assign(x) == comp).double().mean() > 0.99  # well-separated components
    only_class_0 = mixture.sample(1000, torch.Generator().manual_seed(2), torch.zeros(1000, dtype=torch.long))[1]
    assert torch.all(mixture.classes[only_class_0] == 0)


def test_sliced_wasserstein_separates_distributions():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3000, 2, generator=g), torch.randn(3000, 2, generator=g)
    same = sliced_wasserstein(a, b, 64, g)
    shifted = sliced_wasserstein(a, b + torch.tensor([0.5, 0.0]), 64, g)
    assert same < 0.05 < shifted


def test_student_takes_the_trainer_signature():
    student = MLPStudent(n_classes=2, hidden=16)
    x, t = torch.randn(5, 2), torch.randint(0, 1000, (5,))
    out = student(x, t, torch.eye(2)[[0, 1, 0, 1, 0]], torch.full((5,), 3.0))
    assert out.shape == (5, 2)
    assert not torch.allclose(out, student(x, t, torch.eye(2)[[0, 1, 0, 1, 0]], torch.full((5,), 1.0)))  # ω matters


def train_critic(make_batch, steps: int = 300):
    """D trained alone with gmm2d's own hinge step on (real, fake, cond) batches; returns D and its hinge loss on a
    held-out batch."""
    torch.manual_seed(0)
    disc = MLPDiscriminator(n_classes=2, hidden=64)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.0, 0.999))
    g = torch.Generator().manual_seed(4)
    first = discriminator_step(disc, d_opt, *make_batch(g))
    for _ in range(steps):
        discriminator_step(disc, d_opt, *make_batch(g))
    real, fake, cond = make_batch(g)
    with torch.no_grad():
        held_out = torch.relu(1 - disc(real, cond)).mean() + torch.relu(1 + disc(fake, cond)).mean()
    return disc, first, held_out.item(), (real, fake, cond)


def test_discriminator_separates_real_from_shifted_fake():
    mixture = GaussianMixture.ring()

    def batch(g):
        labels = torch.randint(0, 2, (256,), generator=g)
        x = mixture.sample(256, g, labels)[0].float()
        return x, x + torch.tensor([0.5, 0.0]), mixture.one_hot(labels).float()

    disc, first, held_out, (real, fake, cond) = train_critic(batch)
    assert first > 1.8 and held_out < 0.6  # hinge loss from ≈ 2 (chance) down
    with torch.no_grad():
        assert (disc(real, cond) > disc(fake, cond)).double().mean() > 0.9


def test_discriminator_sees_the_condition():
    """Fake = samples of the *other* class with this class's label, labels 50/50: real and fake have the same x
    marginal, so a critic blind to c cannot push the hinge loss below 2."""
    mixture = GaussianMixture.ring()

    def batch(g):
        labels = torch.arange(256) % 2
        real = mixture.sample(256, g, labels)[0].float()
        fake = mixture.sample(256, g, 1 - labels)[0].float()
        return real, fake, mixture.one_hot(labels).float()

    assert train_critic(batch)[2] < 1.0


def adversarial_setup(adv: AdversarialConfig):
    """A tiny student, a critic and one scott_loss result on a mixture batch."""
    mixture, schedule = GaussianMixture.ring(), NoiseSchedule.sd15()
    torch.manual_seed(5)
    student, disc = MLPStudent(2, hidden=16), MLPDiscriminator(2, hidden=16)
    g = torch.Generator().manual_seed(6)
    x0, cond = gmm2d.training_batch(mixture, 64, g)
    res = scott_loss(student, student, mixture.teacher(schedule), x0.float(), cond, torch.zeros(1, 2), schedule,
                     ConsistencyConfig(eta=0.3, substeps=2, w_min=1.0, w_max=3.0), g)
    loss, weight = student_objective(student, disc, res, cond, adv)
    return student, disc, res, cond, loss, weight


def last_layer_grad(student, loss):
    """∇_{w_L} loss by a plain backward into .grad (independent of autograd.grad)."""
    student.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    grad = student.net[-1].weight.grad.clone()
    student.zero_grad(set_to_none=True)
    return grad


def test_adaptive_weight_is_the_vqgan_formula():
    student, disc, res, cond, loss, weight = adversarial_setup(AdversarialConfig(0.4, adaptive=True))
    loss_g = g_hinge_loss(disc(res.x_student, cond))
    expected = 0.4 * (last_layer_grad(student, res.loss).norm() / (last_layer_grad(student, loss_g).norm() + 1e-4))
    torch.testing.assert_close(weight, expected.clamp(0, 1e4).detach())
    assert not weight.requires_grad  # λ_eff is a constant of the step
    torch.testing.assert_close(loss, res.loss + expected * loss_g)


def test_generator_term_trains_the_student_not_the_critic():
    student, disc, res, cond, loss, weight = adversarial_setup(AdversarialConfig(0.005))
    assert abs(float(weight) - 0.005) < 1e-9
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())  # D is a fixed critic in the student's step
    assert all(p.requires_grad for p in disc.parameters())  # and trainable again for its own step
    assert student.net[-1].weight.grad is not None


def test_experiment_runs_end_to_end_and_prints_the_table():
    cfg = ExperimentConfig(seeds=2, pretrain_steps=30, distill_steps=5, batch=32, hidden=16, n_eval=300,
                           n_projections=16, etas=(1.0,), substeps=(1, 3), adv_etas=(1.0,), workers=1)
    results = gmm2d.run(cfg, log=lambda line: None)
    names = [name for name, *_ in gmm2d.methods(cfg)]
    assert names == ["CD (η=0, h=1)", "CD with ODE sub-steps (η=0, h=3)", "SCott η=1, h=1", "SCott η=1, h=3",
                     "CD + adversarial, fixed λ=0.005 (η=0, h=1)", "CD + adversarial, adaptive λ=0.4 (η=0, h=1)",
                     "SCott + adversarial, fixed λ=0.005 (η=1, h=3)", "SCott + adversarial, adaptive λ=0.4 (η=1, h=3)"]
    assert all(len(results[name]) == 2 for name in names)
    assert results["CD + adversarial, adaptive λ=0.4 (η=0, h=1)"][0] != results["CD (η=0, h=1)"][0]  # D acts
    floor = results["reference vs. a second reference draw (noise floor)"][0]
    one_step_teacher = results["teacher DDIM, same number of steps (no distillation)"][0]
    assert floor[(1.0, 1)] < one_step_teacher[(1.0, 1)]  # one DDIM step from noise is far from the mixture
    table = gmm2d.markdown_table(results, cfg)
    assert table.count("\n") == 2 + 2 + len(names) - 1 and "± " in table and "ω=2, 4 steps" in table
    assert "SCott + adversarial, adaptive λ=0.4 (η=1, h=3) |" in table
