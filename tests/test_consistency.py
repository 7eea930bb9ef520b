"""consistency.py: LCM's boundary scalings, timesteps and samplers (diffusers as the oracle); the SCott loss is zero
for an exact consistency function, its gradient reaches the student only, and its teacher transition is the
configured one (η, h, noise kind); EMA; clear errors."""
import copy
from functools import partial

import pytest
import torch
from diffusers import LCMScheduler, TCDScheduler

from consistency import (ConsistencyConfig, boundary_scalings, consistency_fn, consistency_timesteps, ema_update,
                         renoise_tcd, sample_consistency, sample_timesteps, scott_loss)
from sde_solver import NoiseSchedule, generator_noise, randn_like, teacher_transition
from unet import guidance_embedding

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.sd15()


class TinyEps(torch.nn.Module):
    """An ε-network with the student's signature net(x, t, cond, w): small, but every input matters."""

    def __init__(self, channels=4, cond_dim=3, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.mix = torch.nn.Conv2d(channels, channels, 1)
            self.cond = torch.nn.Linear(cond_dim, channels)
            self.w = torch.nn.Linear(16, channels)

    def forward(self, x, t, cond, w=None):
        dtype = self.mix.weight.dtype
        w = torch.ones(x.shape[0]) if w is None else w
        bias = (self.cond(cond.to(dtype)) + self.w(guidance_embedding(w - 1, 16).to(dtype))
                + torch.cos(t.to(dtype) / 300)[:, None])
        return self.mix(x.to(dtype)) + bias[:, :, None, None]


# ---- LCM's pieces equal diffusers' ------------------------------------------------------------------------------

def test_boundary_scalings_equal_lcm_and_f_at_zero_is_identity(schedule):
    ref = LCMScheduler(**SD15)
    t = torch.tensor([0, 1, 19, 259, 499, 999])
    c_skip, c_out = boundary_scalings(t)
    for i, ti in enumerate(t.tolist()):
        e_skip, e_out = ref.get_scalings_for_boundary_condition_discrete(ti)
        assert abs(c_skip[i].item() - e_skip) < 1e-12 and abs(c_out[i].item() - e_out) < 1e-12
    assert c_skip[0] == 1 and c_out[0] == 0
    x = torch.randn(2, 4, 8, 8)
    f0 = consistency_fn(TinyEps(), x, torch.zeros(2, dtype=torch.long), torch.randn(2, 3), torch.tensor([2.0, 7.0]),
                        schedule)
    assert torch.equal(f0, x)  # f(x, 0) = x exactly


@pytest.mark.parametrize("steps", range(1, 9))
def test_sampler_timesteps_equal_lcm(steps):
    ref = LCMScheduler(**SD15)
    ref.set_timesteps(steps)
    assert consistency_timesteps(steps).tolist() == ref.timesteps.tolist()
    assert consistency_timesteps(2).tolist() == [999, 499]


def test_lcm_sampler_equals_diffusers_loop(schedule):
    student, g = TinyEps(), torch.Generator().manual_seed(0)
    noise, cond, w = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, generator=g), torch.tensor([4.0, 8.0])
    ref = LCMScheduler(**SD15)
    ref.set_timesteps(4)
    x, gen = noise, torch.Generator().manual_seed(1)
    for t in ref.timesteps:
        x, denoised = ref.step(student(x, t.expand(2), cond, w), t, x, generator=gen, return_dict=False)
    got = sample_consistency(student, noise, cond, w, consistency_timesteps(4), schedule,
                             generator_noise(torch.Generator().manual_seed(1)))
    torch.testing.assert_close(got, denoised, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_sampler_follows_diffusers_tcd(schedule, gamma):
    """Same path as TCDScheduler up to the last step (TCD predicts x̂0 without c_skip/c_out, which differ by ~1e-5
    at t ≥ 19); at the end TCD returns x at t = 0, we return the clean x̂0 of the last input."""
    student, g = TinyEps(), torch.Generator().manual_seed(2)
    noise, cond, w = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, generator=g), torch.tensor([4.0, 8.0])
    ref = TCDScheduler(**SD15)
    ref.set_timesteps(4)
    x, gen = noise, torch.Generator().manual_seed(3)
    for t in ref.timesteps[:-1]:
        x = ref.step(student(x, t.expand(2), cond, w), t, x, eta=gamma, generator=gen).prev_sample
    t_last = ref.timesteps[-1].expand(2)
    expected = schedule.predict_x0(x, student(x, t_last, cond, w), t_last)
    tcd = partial(renoise_tcd, gamma=gamma)
    got = sample_consistency(student, noise, cond, w, ref.timesteps, schedule,
                             generator_noise(torch.Generator().manual_seed(3)), renoise=tcd)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    if gamma == 0:  # deterministic: no noise sampler needed
        torch.testing.assert_close(sample_consistency(student, noise, cond, w, ref.timesteps, schedule, renoise=tcd),
                                   got)


def test_sampler_uses_the_given_boundary_scalings(schedule):
    """The sampler's f = c_skip x + c_out x̂0 takes the student's own scalings: a 1-step sample is exactly that."""
    student, g = TinyEps(), torch.Generator().manual_seed(4)
    x, cond, w = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, generator=g), torch.tensor([4.0, 8.0])
    t = torch.tensor([999, 999])
    for scaling, sigma in ((10.0, 0.5), (1e-3, 0.5), (1e-3, 2.0)):
        c_skip, c_out = boundary_scalings(t, scaling, sigma)
        expected = (c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) *
                    schedule.predict_x0(x, student(x, t, cond, w), t)).float()
        got = sample_consistency(student, x, cond, w, [999], schedule, timestep_scaling=scaling, sigma_data=sigma)
        torch.testing.assert_close(got, expected)
    default = sample_consistency(student, x, cond, w, [999], schedule)
    assert (default - got).abs().max() > 0.1  # at s·t = 1 the scalings matter


def test_sampler_bad_input(schedule):
    x, cond = torch.randn(1, 4, 4, 4), torch.randn(1, 3)
    for bad in ([], [499, 999], [999, 999], [1000, 499], [999, -1]):
        with pytest.raises(ValueError, match="strictly descending"):
            sample_consistency(TinyEps(), x, cond, 2.0, bad, schedule)
    with pytest.raises(ValueError, match="noise_sampler"):
        sample_consistency(TinyEps(), x, cond, 2.0, [999, 499], schedule)  # LCM re-noising is random
    with pytest.raises(ValueError, match="gamma"):
        sample_consistency(TinyEps(), x, cond, 2.0, [999, 499], schedule, generator_noise(torch.Generator()),
                           renoise=partial(renoise_tcd, gamma=1.5))


# ---- the SCott loss ----------------------------------------------------------------------------------------------

class ExactConsistencyStudent(torch.nn.Module):
    """A student whose f(x, t) is exactly the consistency function of the teacher's deterministic chain
    t -> t − k -> … -> t mod k -> clean (η = 0, h sub-steps per link, the teacher's own transition code). It returns
    the ε that makes consistency_fn's c_skip x + c_out x̂0 equal that f. float64 throughout."""

    def __init__(self, teacher, uncond, schedule, cfg):
        super().__init__()
        self.teacher, self.uncond, self.schedule, self.cfg = teacher, uncond, schedule, cfg
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # a parameter, so gradients have somewhere to go

    def chain_end(self, x, t, cond, w):
        out = []
        for i in range(x.shape[0]):
            xi, ti = x[i:i + 1], int(t[i])
            ci, wi = cond[i:i + 1], w[i:i + 1]
            while ti >= self.cfg.k:  # the teacher's links, exactly as scott_loss calls them
                xi = teacher_transition(self.teacher, xi, ti, ti - self.cfg.k, ci, self.uncond, wi, self.schedule,
                                        0.0, self.cfg.substeps)
                ti -= self.cfg.k
            if ti > 0:  # t mod k > 0: finish with one (unguided) teacher step to clean; any fixed map would do
                eps = self.teacher(xi, torch.tensor([ti]), ci)
                xi = self.schedule.predict_x0(xi, eps, ti)
            out.append(xi)
        return torch.cat(out)

    def forward(self, x, t, cond, w):
        f = self.chain_end(x, t, cond, w)
        c_skip, c_out = boundary_scalings(t, self.cfg.timestep_scaling, self.cfg.sigma_data)
        c_out = torch.where(t > 0, c_out, torch.ones_like(c_out)).view(-1, 1, 1, 1)  # at t = 0 f = x regardless
        x0_hat = (f - c_skip.view(-1, 1, 1, 1) * x) / c_out
        return self.schedule.predict_eps(x, x0_hat, t) + 0 * self.dummy


@pytest.mark.parametrize("substeps", [1, 3])
def test_exact_consistency_function_has_zero_loss(schedule, substeps):
    cfg = ConsistencyConfig(eta=0.0, substeps=substeps, k=240, w_min=1.0, w_max=5.0)  # a long k keeps chains short
    teacher = TinyEps(seed=1).double()
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(6, 4, 4, 4, dtype=torch.float64, generator=g)
    cond = torch.randn(6, 3, dtype=torch.float64, generator=g)
    uncond = torch.zeros(1, 3, dtype=torch.float64)
    eps_teacher = lambda x, t, c: teacher(x, t, c)  # noqa: E731  (the teacher takes no ω)
    exact = ExactConsistencyStudent(eps_teacher, uncond, schedule, cfg)
    res = scott_loss(exact, exact, eps_teacher, z0, cond, uncond, schedule, cfg, torch.Generator().manual_seed(5))
    assert res.loss.dtype == torch.float32 and res.loss.item() < 1e-12
    assert torch.all(res.t_m == res.t_n - cfg.k) and torch.all(res.t_m >= 0)
    wrong = ExactConsistencyStudent(eps_teacher, uncond, schedule, ConsistencyConfig(eta=0.0, substeps=substeps, k=120))
    res = scott_loss(wrong, exact, eps_teacher, z0, cond, uncond, schedule, cfg, torch.Generator().manual_seed(5))
    assert res.loss.item() > 1e-4  # a function consistent along another chain is not


def test_gradient_reaches_only_the_student(schedule):
    cfg = ConsistencyConfig()
    student, teacher = TinyEps(seed=0), TinyEps(seed=1)
    target = copy.deepcopy(student).requires_grad_(True)  # even a target that would accept gradients gets none
    g = torch.Generator().manual_seed(6)
    z0, cond = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 3, generator=g)
    res = scott_loss(student, target, lambda x, t, c: teacher(x, t, c), z0, cond, torch.zeros(1, 3), schedule, cfg,
                     torch.Generator().manual_seed(7))
    res.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in target.parameters()) and all(p.grad is None for p in teacher.parameters())
    assert res.x_student.requires_grad and not res.x_target.requires_grad

    # ema_decay 0: the online network is its own target; the gradient is the same as with a frozen copy
    grads = []
    for tgt in (student, copy.deepcopy(student).requires_grad_(False)):
        student.zero_grad()
        scott_loss(student, tgt, lambda x, t, c: teacher(x, t, c), z0, cond, torch.zeros(1, 3), schedule, cfg,
                   torch.Generator().manual_seed(7)).loss.backward()
        grads.append([p.grad.clone() for p in student.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_loss_samples_timesteps_and_guidance_as_configured(schedule):
    student, teacher = TinyEps(), TinyEps(seed=1)
    z0, cond = torch.randn(64, 4, 2, 2), torch.randn(64, 3)
    run = lambda cfg, seed=8: scott_loss(student, student, lambda x, t, c: teacher(x, t, c), z0, cond,  # noqa: E731
                                         torch.zeros(1, 3), schedule, cfg, torch.Generator().manual_seed(seed))
    res = run(ConsistencyConfig(w_min=6.0, w_max=16.0))
    assert res.t_n.dtype == torch.long and res.t_n.min() >= 24 and res.t_n.max() <= 999
    assert torch.all(res.t_m == res.t_n - 24) and 6.0 <= res.w.min() and res.w.max() <= 16.0
    grid = run(ConsistencyConfig(timestep_sampling="grid", k=24))
    assert torch.all((999 - grid.t_n) % 24 == 0) and grid.t_m.min() >= 0
    torch.testing.assert_close(run(ConsistencyConfig()).loss, run(ConsistencyConfig()).loss)  # same generator
    huber = run(ConsistencyConfig(loss="huber", huber_c=0.001))
    diff = res.x_student.detach() - res.x_target
    torch.testing.assert_close(huber.loss, ((diff ** 2 + 1e-6).sqrt() - 1e-3).mean())


def test_loss_target_is_the_configured_teacher_transition(schedule):
    """x_target = f_θ⁻(z_{t_m}, t_m) where z_{t_m} is teacher_transition with the config's η, h and noise kind, replayed
    from the same generator draws (timesteps, ω, ε, then the teacher's noise). A loss that silently ran CD (η = 0, or
    h = 1, or the DDIM noise kind) would give another target."""
    cfg = ConsistencyConfig(eta=0.3, substeps=3, noise_kind="er_sde", w_min=2.0, w_max=6.0)
    student, target, teacher = TinyEps(seed=0), TinyEps(seed=3), TinyEps(seed=1)
    eps_teacher = lambda x, t, c: teacher(x, t, c)  # noqa: E731
    g = torch.Generator().manual_seed(9)
    z0, cond, uncond = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 3, generator=g), torch.zeros(1, 3)
    res = scott_loss(student, target, eps_teacher, z0, cond, uncond, schedule, cfg, torch.Generator().manual_seed(10))

    def replay(eta, substeps, kind):
        g = torch.Generator().manual_seed(10)
        t_n, t_m = sample_timesteps(4, cfg, g, z0.device)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(4, generator=g)
        z_tn = schedule.add_noise(z0, randn_like(z0, g), t_n)
        z_tm = teacher_transition(eps_teacher, z_tn, t_n, t_m, cond, uncond, w, schedule, eta, substeps, generator=g,
                                  kind=kind)
        return consistency_fn(target, z_tm, t_m, cond, w, schedule, cfg.timestep_scaling, cfg.sigma_data)
    with torch.no_grad():
        torch.testing.assert_close(res.x_target, replay(0.3, 3, "er_sde"), rtol=0, atol=0)
        for cd in ((0.0, 3, "er_sde"), (0.3, 1, "er_sde"), (0.3, 3, "ddim")):
            assert (res.x_target - replay(*cd)).abs().max() > 1e-3, cd


def test_config_and_loss_bad_input(schedule):
    for bad, match in ((dict(k=24, substeps=5), "multiple of h"), (dict(k=1000), "--k 1000: must be an integer ≤ 999"),
                       (dict(substeps=0), "substeps"), (dict(eta=1.2), "eta"), (dict(loss="l1"), "loss"),
                       (dict(w_min=9.0, w_max=3.0), "--w-min"), (dict(timestep_sampling="log"), "--timestep-sampling"),
                       (dict(noise_kind="sde"), "--noise-kind"),
                       (dict(ema_decay=1.0), "--ema-decay")):
        with pytest.raises(ValueError, match=match):
            ConsistencyConfig(**bad)
    student = TinyEps()
    with pytest.raises(ValueError, match="cond has batch"):
        scott_loss(student, student, lambda x, t, c: x, torch.randn(2, 4, 2, 2), torch.randn(3, 3), torch.zeros(1, 3),
                   schedule, ConsistencyConfig(), torch.Generator())
    with pytest.raises(ValueError, match="student returned shape"):
        consistency_fn(lambda x, t, c, w: x[:, :1], torch.randn(2, 4, 2, 2), torch.tensor([5, 6]), None,
                       torch.ones(2), schedule)


# ---- EMA ---------------------------------------------------------------------------------------------------------

def test_ema_update():
    online, target = TinyEps(seed=0), TinyEps(seed=1)
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.95)
    for p_t, p_0, p_o in zip(target.parameters(), before, online.parameters()):
        torch.testing.assert_close(p_t, 0.95 * p_0 + 0.05 * p_o)
    ema_update(target, online, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), online.parameters()))
    low = TinyEps(seed=2).to(torch.bfloat16)
    ema_update(low, online, 0.5)  # a bf16 target of an fp32 student
    assert next(low.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="differ in parameters"):
        ema_update(torch.nn.Linear(2, 2), online, 0.9)
    with pytest.raises(ValueError, match="decay"):
        ema_update(target, online, 1.0)
