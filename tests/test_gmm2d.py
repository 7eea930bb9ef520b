"""gmm2d.py: the mixture's closed-form ε is the true −√(1 − ᾱ) ∇log p_t, its sampler is right, and the experiment
runs end to end through the trainer's own loss and sampler."""
import torch

import gmm2d
from gmm2d import ExperimentConfig, GaussianMixture, MLPStudent, sliced_wasserstein
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


def test_experiment_runs_end_to_end_and_prints_the_table():
    cfg = ExperimentConfig(seeds=2, pretrain_steps=30, distill_steps=5, batch=32, hidden=16, n_eval=300,
                           n_projections=16, etas=(1.0,), substeps=(1, 3), workers=1)
    results = gmm2d.run(cfg, log=lambda line: None)
    names = [name for name, *_ in gmm2d.methods(cfg)]
    assert names == ["CD (η=0, h=1)", "CD with ODE sub-steps (η=0, h=3)", "SCott η=1, h=1", "SCott η=1, h=3"]
    assert all(len(results[name]) == 2 for name in names)
    floor = results["reference vs. a second reference draw (noise floor)"][0]
    one_step_teacher = results["teacher DDIM, same number of steps (no distillation)"][0]
    assert floor[(1.0, 1)] < one_step_teacher[(1.0, 1)]  # one DDIM step from noise is far from the mixture
    table = gmm2d.markdown_table(results, cfg)
    assert table.count("\n") == 2 + 2 + len(names) - 1 and "± " in table and "ω=2, 4 steps" in table
