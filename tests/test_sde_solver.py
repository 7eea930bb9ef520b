"""sde_solver.py: the schedule and DDIM-η step equal diffusers' schedulers; with the exact ε of a Gaussian mixture the
teacher samplers reproduce the mixture and SCott's stochastic transition keeps the marginals q_t."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from toyworld.gmm2d import GaussianMixture
from sde_solver import (NoiseSchedule, cfg_eps, ddim_eta_step, generator_noise, sample_teacher, teacher_timesteps,
                        teacher_transition, transition_std)

SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.sd15()


def linear_eps(seed=0, channels=4):
    """A fixed, cheap stand-in for a UNet: ε̂ = A x + b(t) + C c, so cond and t both matter."""
    g = torch.Generator().manual_seed(seed)
    A = 0.3 * torch.randn(channels, channels, generator=g)
    C = 0.3 * torch.randn(channels, 3, generator=g)

    def eps_fn(x, t, cond):
        bias = torch.sin(t.float() / 100)[:, None, None, None]
        return torch.einsum("ij,bjhw->bihw", A, x) + bias + (cond @ C.T)[:, :, None, None]
    return eps_fn


# ---- schedule --------------------------------------------------------------------------------------------------

def test_sd15_schedule_equals_diffusers_and_checkpoint_tensor(schedule):
    ref = DDPMScheduler(**SD15).alphas_cumprod
    assert schedule.alphas_cumprod.shape == (1000,) and schedule.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(schedule.alphas_cumprod.float(), ref, rtol=1e-6, atol=1e-7)
    from_ckpt = NoiseSchedule(ref)  # a checkpoint's float32 `alphas_cumprod`
    assert from_ckpt.num_timesteps == 1000 and from_ckpt.alphas_cumprod.dtype == torch.float64


def test_schedule_rejects_wrong_tensors():
    with pytest.raises(ValueError, match="1-D"):
        NoiseSchedule(torch.rand(10, 10))
    betas = torch.linspace(0.00085, 0.012, 1000)
    with pytest.raises(ValueError, match="decrease"):
        NoiseSchedule(betas)  # betas instead of alphas_cumprod


def test_timesteps_are_checked_on_the_host_only(schedule):
    """Out-of-range timesteps from the host (ints, CPU tensors) are clear errors; device tensors are not read back
    (that would synchronise with the device at every call). A meta tensor, whose values cannot be read at all,
    stands in for a GPU tensor: ᾱ and a whole teacher transition must work without reading them."""
    x = torch.zeros(2, 3)
    for bad in (1000, -2, torch.tensor([5, 1000])):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[-1, 999\]"):
            schedule.alpha_bar(bad, x)
    meta = torch.zeros(2, 3, device="meta")
    assert schedule.alpha_bar(torch.tensor([5, 7], device="meta"), meta).shape == (2, 1)
    eps_fn = lambda x, t, c: x  # noqa: E731
    z = teacher_transition(eps_fn, meta, torch.tensor([30, 60], device="meta"), torch.tensor([6, 36], device="meta"),
                           meta, meta[:1], 2.0, schedule, 0.3, 3, noise=torch.zeros(3, 2, 3, device="meta"))
    assert z.shape == (2, 3) and z.device.type == "meta"


def test_add_noise_and_predict_x0_invert_each_other(schedule):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = schedule.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t, DDPMScheduler(**SD15).add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(schedule.predict_x0(x_t, noise, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(schedule.predict_eps(x_t, x0, t), noise, rtol=1e-4, atol=1e-4)


def test_low_precision_inputs_keep_their_dtype(schedule):
    x = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    assert schedule.add_noise(x, x, 10).dtype == torch.bfloat16
    assert schedule.predict_x0(x, x.float(), 10).dtype == torch.float32  # bf16 latents, fp32 ε -> fp32


# ---- one step: equals diffusers ------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_eta_step_equals_diffusers_ddim(schedule, eta):
    ref = DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ref.set_timesteps(10)
    ours = teacher_timesteps(10).tolist()
    assert ref.timesteps.tolist() == ours
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(ours):
        prev = ours[i + 1] if i + 1 < len(ours) else -1
        x, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        expected = ref.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        got = ddim_eta_step(schedule.predict_x0(x, eps, t), eps, t, prev, schedule, eta, z)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_eta_one_equals_diffusers_ddpm_posterior(schedule):
    ref = DDPMScheduler(**SD15, clip_sample=False, timestep_spacing="trailing")
    ref.set_timesteps(20)
    ts = ref.timesteps.tolist()
    g = torch.Generator().manual_seed(2)
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        expected = ref.step(eps, t, x, generator=torch.Generator().manual_seed(i)).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        got = ddim_eta_step(schedule.predict_x0(x, eps, t), eps, t, prev, schedule, 1.0, z)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_er_sde_noise_scale_meets_ddim_at_the_ends(schedule):
    x = torch.zeros(3, 2)
    t, s = torch.tensor([999, 500, 30]), torch.tensor([900, 400, -1])
    for eta in (0.0, 1.0):
        torch.testing.assert_close(transition_std(schedule, t, s, eta, x, "er_sde"),
                                   transition_std(schedule, t, s, eta, x))
    mid_ddim, mid_er = transition_std(schedule, t, s, 0.3, x), transition_std(schedule, t, s, 0.3, x, "er_sde")
    assert torch.all(mid_er[:2] > mid_ddim[:2])  # ρ^{2η} < ... : the ER-SDE power family injects more noise at η=0.3
    with pytest.raises(ValueError, match="noise kind"):
        transition_std(schedule, t, s, 0.3, x, "euler")


def test_full_teacher_samplers_equal_diffusers_loops(schedule):
    """sample_teacher = a diffusers DDIM loop (η=0) / DDPM loop (η=1), CFG ω = 7.5, same noise and generator."""
    eps_fn, g = linear_eps(), torch.Generator().manual_seed(3)
    noise, cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, generator=g), torch.zeros(1, 3)

    def guided(x, t):
        tt = torch.full((2,), int(t))
        e_u, e_c = eps_fn(x, tt, uncond.expand(2, -1)), eps_fn(x, tt, cond)
        return e_u + 7.5 * (e_c - e_u)
    ddim = DDIMScheduler(**SD15, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ddpm = DDPMScheduler(**SD15, clip_sample=False, timestep_spacing="trailing")
    for eta, ref in ((0.0, ddim), (1.0, ddpm)):
        ref.set_timesteps(10)
        x, gen = noise, torch.Generator().manual_seed(4)
        for t in ref.timesteps:
            x = ref.step(guided(x, t), t, x, generator=gen).prev_sample
        got = sample_teacher(eps_fn, noise, cond, uncond, 7.5, teacher_timesteps(10), schedule,
                             generator_noise(torch.Generator().manual_seed(4)), eta)
        torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="noise_sampler"):
        sample_teacher(eps_fn, noise, cond, uncond, 7.5, teacher_timesteps(10), schedule, eta=1.0)
    with pytest.raises(ValueError, match="strictly descending"):
        sample_teacher(eps_fn, noise, cond, uncond, 7.5, [499, 999], schedule)


def test_teacher_timesteps_are_trailing():
    assert teacher_timesteps(50).tolist() == list(range(999, 0, -20))  # = LCM's distillation grid
    assert teacher_timesteps(4).tolist() == [999, 749, 499, 249]
    assert teacher_timesteps(1).tolist() == [999]


# ---- guidance and the SCott transition -------------------------------------------------------------------------

def test_cfg_is_one_batched_call_with_uncond_broadcast():
    calls, eps_fn = [], linear_eps()

    def counting(x, t, cond):
        calls.append(x.shape[0])
        return eps_fn(x, t, cond)
    g = torch.Generator().manual_seed(5)
    x, cond = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 3, generator=g)
    uncond, t, w = torch.zeros(1, 3), torch.tensor([10, 500, 900]), torch.tensor([1.0, 2.0, 7.5])
    got = cfg_eps(counting, x, t, cond, uncond, w)
    assert calls == [6]  # cond and uncond in ONE forward of batch 2B
    e_u, e_c = eps_fn(x, t, uncond.expand(3, -1)), eps_fn(x, t, cond)
    torch.testing.assert_close(got, e_u + w.view(3, 1, 1, 1) * (e_c - e_u))
    torch.testing.assert_close(got[0], e_c[0])  # ω = 1: no guidance
    calls.clear()
    torch.testing.assert_close(cfg_eps(counting, x, t, cond, uncond, 1.0), e_c)
    assert calls == [3]  # a float ω = 1 skips the unconditional half


def test_h1_eta0_transition_is_lcm_ddim_target(schedule):
    """LCM's target: x̂0 and ε̂ guided in LCM's form (x̂0_c + w (x̂0_c − x̂0_u)), one DDIM step; ours with ω = w + 1."""
    eps_fn, g = linear_eps(), torch.Generator().manual_seed(6)
    x, cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, generator=g), torch.zeros(1, 3)
    t_n, t_m, w_lcm = torch.tensor([999, 419]), torch.tensor([979, 399]), torch.tensor([5.0, 14.0])
    e_c, e_u = eps_fn(x, t_n, cond), eps_fn(x, t_n, uncond.expand(2, -1))
    x0_c, x0_u = schedule.predict_x0(x, e_c, t_n), schedule.predict_x0(x, e_u, t_n)
    wv = w_lcm.view(2, 1, 1, 1)
    x0_w, e_w = x0_c + wv * (x0_c - x0_u), e_c + wv * (e_c - e_u)
    ab_prev = schedule.alphas_cumprod[t_m].float().view(2, 1, 1, 1)
    lcm_target = ab_prev.sqrt() * x0_w + (1 - ab_prev).sqrt() * e_w
    ours = teacher_transition(eps_fn, x, t_n, t_m, cond, uncond, w_lcm + 1, schedule, eta=0.0, substeps=1)
    torch.testing.assert_close(ours, lcm_target, rtol=1e-4, atol=1e-4)


def test_substeps_are_equal_guided_steps_with_fresh_noise(schedule):
    eps_fn, g = linear_eps(), torch.Generator().manual_seed(7)
    x, cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, generator=g), torch.zeros(1, 3)
    t_n, t_m, w = torch.tensor([600, 30]), torch.tensor([576, 6]), torch.tensor([3.0, 8.0])  # per-sample times
    noise = torch.randn(3, *x.shape, generator=g)
    got = teacher_transition(eps_fn, x, t_n, t_m, cond, uncond, w, schedule, 0.6, 3, noise=noise)
    expected = x
    for j in range(3):
        t, s = t_n - 8 * j, t_n - 8 * (j + 1)
        eps = cfg_eps(eps_fn, expected, t, cond, uncond, w)
        expected = ddim_eta_step(schedule.predict_x0(expected, eps, t), eps, t, s, schedule, 0.6, noise[j])
    torch.testing.assert_close(got, expected)
    one_noise = noise.clone()
    one_noise[1:] = noise[0]  # the same draw at every sub-step would give another result
    assert not torch.allclose(got, teacher_transition(eps_fn, x, t_n, t_m, cond, uncond, w, schedule, 0.6, 3,
                                                      noise=one_noise))


def test_generator_replays_and_eta_to_zero_is_the_ode_path(schedule):
    eps_fn, g = linear_eps(), torch.Generator().manual_seed(8)
    x, cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, generator=g), torch.zeros(1, 3)
    run = lambda eta, seed: teacher_transition(eps_fn, x, 500, 476, cond, uncond, 4.0, schedule, eta, 3,  # noqa: E731
                                               generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(0.3, 1), run(0.3, 1), rtol=0, atol=0)
    assert not torch.allclose(run(0.3, 1), run(0.3, 2))
    ode = teacher_transition(eps_fn, x, 500, 476, cond, uncond, 4.0, schedule, 0.0, 3)  # needs no randomness
    torch.testing.assert_close(run(1e-6, 1), ode, rtol=0, atol=1e-5)
    assert (run(0.3, 1) - ode).abs().max() > 1e-2


def test_bad_input_gives_clear_errors(schedule):
    eps_fn = linear_eps()
    x, cond, uncond = torch.randn(2, 4, 4, 4), torch.randn(2, 3), torch.zeros(1, 3)
    defaults = dict(eps_fn=eps_fn, x_tn=x, t_n=30, t_m=6, cond=cond, uncond=uncond, w=2.0, schedule=schedule,
                    eta=0.3, substeps=3, generator=torch.Generator())
    go = lambda **kw: teacher_transition(**{**defaults, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="0 ≤ t_m"):
        go(t_n=20, t_m=-4)
    with pytest.raises(ValueError, match="substeps"):
        go(substeps=0)
    with pytest.raises(ValueError, match="eta"):
        go(eta=1.5)
    with pytest.raises(ValueError, match="eta"):
        go(eta=-0.1)
    with pytest.raises(ValueError, match="not divisible"):
        go(t_m=5)
    with pytest.raises(ValueError, match="t_m < t_n"):
        go(t_n=6, t_m=30)
    with pytest.raises(ValueError, match="integer"):
        go(t_n=torch.tensor([30.0, 30.0]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        go(t_n=torch.tensor([30, 30, 30]))
    with pytest.raises(ValueError, match="cond has batch"):
        go(cond=torch.randn(3, 3))
    with pytest.raises(ValueError, match="uncond"):
        go(uncond=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="noise must have shape"):
        go(noise=torch.randn(2, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="generator"):
        go(generator=None)
    with pytest.raises(ValueError, match="same shape"):
        ddim_eta_step(x, x[:1], 30, 6, schedule, 0.0)
    with pytest.raises(ValueError, match="s must be < t"):
        ddim_eta_step(x, x, 6, 30, schedule, 0.0)


# ---- with an exact teacher: a Gaussian mixture ------------------------------------------------------------------

def moments(x):
    return x.mean(0), torch.cov(x.T)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_50_step_teacher_samplers_reproduce_the_mixture(schedule, eta):
    mixture = GaussianMixture.ring()
    n, g = 8000, torch.Generator().manual_seed(9)
    noise, zeros = torch.randn(n, 2, dtype=torch.float64, generator=g), torch.zeros(1, 2, dtype=torch.float64)
    x = sample_teacher(mixture.teacher(schedule), noise, zeros.expand(n, -1), zeros, 1.0, teacher_timesteps(50),
                       schedule, generator_noise(torch.Generator().manual_seed(10)), eta)
    truth = mixture.sample(n, torch.Generator().manual_seed(11))[0]
    for a, b in zip(moments(x), moments(truth)):
        torch.testing.assert_close(a, b, rtol=0, atol=0.06)
    freq = torch.bincount(mixture.assign(x), minlength=8).double() / n
    torch.testing.assert_close(freq, mixture.weights, rtol=0, atol=0.02)
    # conditional sampling: class 1 only, with the class's own weights
    labels = torch.ones(n, dtype=torch.long)
    x1 = sample_teacher(mixture.teacher(schedule), noise, mixture.one_hot(labels), zeros, 1.0, teacher_timesteps(50),
                        schedule, generator_noise(torch.Generator().manual_seed(12)), eta)
    freq1 = torch.bincount(mixture.assign(x1), minlength=8).double() / n
    in_class = mixture.weights * (mixture.classes == 1)
    torch.testing.assert_close(freq1, in_class / in_class.sum(), rtol=0, atol=0.02)


@pytest.mark.parametrize("eta,substeps,t_n,t_m", [(0.0, 1, 600, 576), (0.3, 3, 600, 576), (1.0, 3, 999, 975),
                                                  (0.3, 30, 600, 360), (1.0, 30, 600, 360), (0.6, 20, 300, 140)])
def test_scott_transition_keeps_the_marginals(schedule, eta, substeps, t_n, t_m):
    """x_{t_n} ~ q_{t_n}, carried by h DDIM-η sub-steps of the exact teacher, lands on q_{t_m}, whose moments are
    known: mean √ᾱ m, covariance ᾱ C + (1 − ᾱ) I. This is what makes a stochastic target legitimate. The first rows
    are the paper's sub-step (8 timesteps); the last ones cross a wide interval in such sub-steps, so that staying
    at q_{t_n} would fail. (With few long sub-steps η = 1 loses Var(x0 | x_t) terms: its covariance drifts.)"""
    mixture = GaussianMixture.ring()
    n, g = 20000, torch.Generator().manual_seed(13)
    x0 = mixture.sample(n, g)[0]
    x_tn = schedule.add_noise(x0, torch.randn(x0.shape, dtype=x0.dtype, generator=g), t_n)
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    x_tm = teacher_transition(mixture.teacher(schedule), x_tn, t_n, t_m, zeros.expand(n, -1), zeros, 1.0, schedule,
                              eta, substeps, generator=g)
    mean0 = (mixture.weights[:, None] * mixture.means).sum(0)
    offsets = mixture.means - mean0
    cov0 = (mixture.weights[:, None, None] * (mixture.covs + offsets[:, :, None] * offsets[:, None, :])).sum(0)
    exact = lambda t: (schedule.alphas_cumprod[t].sqrt() * mean0,  # noqa: E731
                       schedule.alphas_cumprod[t] * cov0 + (1 - schedule.alphas_cumprod[t]) * torch.eye(2).double())
    (mean, cov), (mean_tm, cov_tm), (_, cov_tn) = moments(x_tm), exact(t_m), exact(t_n)
    torch.testing.assert_close(mean, mean_tm, rtol=0, atol=0.03)
    torch.testing.assert_close(cov, cov_tm, rtol=0, atol=0.045)
    if t_n - t_m > 100:
        assert (cov_tn - cov_tm).abs().max() > 0.08  # the test can tell q_{t_m} from q_{t_n}
