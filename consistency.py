"""The student's side of SCott: the consistency function, the SCott loss, the EMA target and the few-step sampler.

A consistency function f_θ(x_t, t) maps every point of one teacher trajectory to the same clean sample, with
f_θ(x, 0) = x (Song et al. 2023). Consistency distillation trains it so that f_θ(x_{t_n}, t_n) matches the EMA
network at the teacher's next point, f_θ⁻(x_{t_m}, t_m). SCott (Liu et al. 2024, arXiv 2403.01505) makes the
teacher's t_n -> t_m transition stochastic: h DDIM-η sub-steps with fresh noise (sde_solver.teacher_transition).

Networks are callables: the student and its EMA target are `net(x, t, cond, w) -> ε̂`, conditioned on the guidance
scale ω (they embed it themselves, LCM-style: unet.guidance_embedding), the teacher is `teacher(x, t, cond) -> ε̂`.
Guidance is the standard CFG form ε_u + ω (ε_c − ε_u); LCM's "w" is ω − 1 (see sde_solver.py).
"""
import math
from dataclasses import dataclass

import torch

from config import check_settings, setting
from sde_solver import (NOISE_KINDS, NoiseSampler, NoiseSchedule, check_timesteps, draw_noise, randn_like,
                        teacher_transition)


@dataclass
class ConsistencyConfig:
    k: int = setting(24, "t_n − t_m, the interval the teacher spans, in DDPM timesteps (paper: 24)",
                     at_least=1, at_most=999)
    substeps: int = setting(3, "h, the teacher's DDIM-η sub-steps inside one interval, k/h timesteps each "
                               "(paper: 3)", at_least=1)
    # The paper ablates η ∈ {0, 0.1, 0.2, 0.3, 0.6} and does not say which it ships. 0.1: in our 2-D experiment and
    # toy study (docs/toy-study.md) η = 0.3 was never better than 0.1, and worse at 1 step; 0.1 tied CD in both.
    eta: float = setting(0.1, "η, the noise strength of the teacher's transition; 0 = vanilla CD (LCM), 1 = DDPM",
                         at_least=0.0, at_most=1.0)
    noise_kind: str = setting("ddim", "how η sets the sub-step noise: ddim (DDIM-η) or er_sde (ER-SDE power "
                                      "scale), sde_solver.transition_std", choices=NOISE_KINDS)
    # The paper gives no ω range: [6, 16] is LCM's w ∈ [5, 15] (ω = w + 1), known to work.
    w_min: float = setting(6.0, "guidance ω ~ U[w_min, w_max] per sample, CFG form ε_u + ω (ε_c − ε_u)",
                           lora_student=3.0)
    w_max: float = setting(16.0, "upper end of the guidance range", lora_student=15.0)
    # uniform is the default because sampler timesteps 499, 259… are on no k = 24 grid.
    timestep_sampling: str = setting("uniform", "uniform: t_n ~ U{k, …, 999}; grid: t_n ∈ {999, 999 − k, …} ≥ k",
                                     choices=("uniform", "grid"))
    loss: str = setting("l2", "the consistency distance: l2 (paper) or huber (pseudo-Huber, LCM's option)",
                        choices=("l2", "huber"))
    huber_c: float = setting(0.001, "the pseudo-Huber constant c (LCM)", above=0.0)
    ema_decay: float = setting(0.95, "μ of the target's EMA θ⁻ ← μ θ⁻ + (1 − μ) θ (LCM); 0 = the online network",
                               at_least=0.0, below=1.0)
    timestep_scaling: float = setting(10.0, "s of the boundary scalings c_skip, c_out at s·t (LCM); recorded in "
                                            "the student", above=0.0)
    sigma_data: float = setting(0.5, "σ_data of the boundary scalings (LCM); recorded in the student", above=0.0)
    w_embed_dim: int = setting(256, "size of the student's sinusoidal ω embedding (LCM's time_cond_proj_dim)",
                               at_least=1)

    def __post_init__(self):
        check_settings(self)
        if self.k % self.substeps:
            raise ValueError(f"--k {self.k} does not split into --substeps {self.substeps} equal sub-steps: "
                             f"choose k a multiple of h (paper: k=24, h=3).")
        if not self.w_min <= self.w_max:
            raise ValueError(f"need --w-min ≤ --w-max, got w_min={self.w_min}, w_max={self.w_max}.")


# ---- boundary parameterisation --------------------------------------------------------------------------------

def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM's c_skip, c_out (diffusers LCMScheduler.get_scalings_for_boundary_condition_discrete), float64, (B,):
        c_skip = σ_d² / ((s t)² + σ_d²),   c_out = s t / √((s t)² + σ_d²),   s = timestep_scaling.
    c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x exactly (the boundary condition of consistency models,
    Song et al. 2023). With s = 10, c_skip(19) ≈ 7e-6: away from t = 0, f is the network's x̂0."""
    st = t.to(torch.float64) * timestep_scaling
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def consistency_fn(student, x_t: torch.Tensor, t: torch.Tensor, cond, w: torch.Tensor, schedule: NoiseSchedule,
                   timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> torch.Tensor:
    """f_θ(x_t, t) = c_skip(t) x_t + c_out(t) x̂0(x_t, ε̂_θ(x_t, t, c, ω)): LCM's parameterisation (Luo et al. 2023)
    of an ε-predicting network, which keeps the teacher's weights meaningful as the student's initialisation.
    The scalings are the student's own (UNetConfig.timestep_scaling, sigma_data): training and sampling must agree."""
    eps = student(x_t, t, cond, w)
    if eps.shape != x_t.shape:
        raise ValueError(f"the student returned shape {tuple(eps.shape)} for input {tuple(x_t.shape)}: it must "
                         f"predict ε with the input's shape.")
    x0_hat = schedule.predict_x0(x_t, eps, t)
    c_skip, c_out = boundary_scalings(t, timestep_scaling, sigma_data)
    shape = (-1, *([1] * (x_t.ndim - 1)))
    return c_skip.view(shape).to(x0_hat.dtype) * x_t + c_out.view(shape).to(x0_hat.dtype) * x0_hat


# ---- the SCott loss --------------------------------------------------------------------------------------------

@dataclass
class ScottLoss:
    loss: torch.Tensor        # scalar, fp32, differentiable w.r.t. the student only
    x_student: torch.Tensor   # f_θ(z_{t_n}, t_n), with grad (the trainer also feeds it to the discriminator)
    x_target: torch.Tensor    # f_θ⁻(z_{t_m}, t_m), no grad
    t_n: torch.Tensor         # (B,) long
    t_m: torch.Tensor         # (B,) long
    w: torch.Tensor           # (B,) guidance scales ω


def sample_timesteps(batch: int, cfg: ConsistencyConfig, generator: torch.Generator, device) -> tuple:
    """(t_n, t_m = t_n − k), each (B,) long. "uniform": t_n ~ U{k, …, 999}; "grid": t_n uniform over
    {999, 999 − k, 999 − 2k, …} ∩ [k, 999], a grid anchored at 999, where every consistency sampler starts."""
    if cfg.timestep_sampling == "uniform":
        t_n = torch.randint(cfg.k, 1000, (batch,), generator=generator, device=generator.device)
    else:
        n_points = (999 - cfg.k) // cfg.k + 1
        t_n = 999 - cfg.k * torch.randint(0, n_points, (batch,), generator=generator, device=generator.device)
    t_n = t_n.to(device)
    return t_n, t_n - cfg.k


def distance(a: torch.Tensor, b: torch.Tensor, cfg: ConsistencyConfig) -> torch.Tensor:
    """Mean over all elements, in fp32: squared L2, or pseudo-Huber √((a − b)² + c²) − c (Song & Dhariwal 2023,
    LCM's `huber`), which is L2-like for small and L1-like for large errors."""
    diff2 = (a.float() - b.float()) ** 2
    if cfg.loss == "l2":
        return diff2.mean()
    return (torch.sqrt(diff2 + cfg.huber_c ** 2) - cfg.huber_c).mean()


def scott_loss(student, target, teacher, z0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               schedule: NoiseSchedule, cfg: ConsistencyConfig, generator: torch.Generator) -> ScottLoss:
    """One SCott consistency-distillation loss (Liu et al. 2024, arXiv 2403.01505; docs/paper.md):
        z_{t_n} = √ᾱ z0 + √(1 − ᾱ) ε,  t_m = t_n − k,  ω ~ U[w_min, w_max]
        z_{t_m} = teacher SDE t_n -> t_m in h guided DDIM-η sub-steps              (no grad)
        loss    = d(f_θ(z_{t_n}, t_n), stopgrad f_θ⁻(z_{t_m}, t_m))
    All randomness (timesteps, ω, ε, the teacher's noise) comes from `generator`, in that order."""
    B = z0.shape[0]
    if cond.shape[0] != B:
        raise ValueError(f"cond has batch {cond.shape[0]} but z0 has batch {B}: pass one condition per sample.")
    t_n, t_m = sample_timesteps(B, cfg, generator, z0.device)
    u = torch.rand(B, generator=generator, device=generator.device).to(z0.device)
    w = cfg.w_min + (cfg.w_max - cfg.w_min) * u  # (B,) ω
    z_tn = schedule.add_noise(z0, randn_like(z0, generator), t_n)

    scalings = dict(timestep_scaling=cfg.timestep_scaling, sigma_data=cfg.sigma_data)  # = the student's (make_student)
    x_student = consistency_fn(student, z_tn, t_n, cond, w, schedule, **scalings)
    with torch.no_grad():
        z_tm = teacher_transition(teacher, z_tn, t_n, t_m, cond, uncond, w, schedule, cfg.eta, cfg.substeps,
                                  generator=generator, kind=cfg.noise_kind)
        x_target = consistency_fn(target, z_tm, t_m, cond, w, schedule, **scalings)
    loss = distance(x_student, x_target, cfg)
    return ScottLoss(loss=loss, x_student=x_student, x_target=x_target, t_n=t_n, t_m=t_m, w=w)


@torch.no_grad()
def ema_update(target_module: torch.nn.Module, online_module: torch.nn.Module, decay: float) -> None:
    """θ⁻ ← μ θ⁻ + (1 − μ) θ in place (consistency models, Song et al. 2023 Alg. 2); μ = 0 copies the online weights
    (then the online network itself is the target). Buffers are copied. The target may be stored in another dtype."""
    if not 0 <= decay < 1:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}.")
    online = dict(online_module.named_parameters())
    target = dict(target_module.named_parameters())
    if online.keys() != target.keys():
        missing = sorted(online.keys() ^ target.keys())[:5]
        raise ValueError(f"target and online networks differ in parameters (e.g. {missing}): the target must be a "
                         f"copy of the student.")
    for name, p_target in target.items():
        p_online = online[name]
        if p_online.shape != p_target.shape:
            raise ValueError(f"parameter {name}: target shape {tuple(p_target.shape)} vs online "
                             f"{tuple(p_online.shape)}; the target must be a copy of the student.")
        p_target.lerp_(p_online.to(p_target.dtype), 1.0 - decay)
    for (name, b_target), (_, b_online) in zip(target_module.named_buffers(), online_module.named_buffers()):
        b_target.copy_(b_online)


# ---- few-step sampling -----------------------------------------------------------------------------------------

def consistency_timesteps(steps: int, original_steps: int = 50, num_timesteps: int = 1000) -> torch.Tensor:
    """LCM's inference timesteps (diffusers LCMScheduler.set_timesteps): the distillation grid
    {k − 1, 2k − 1, …, T − 1}, k = T // original_steps, reversed, at indices floor(linspace(0, original_steps, steps,
    endpoint=False)). 1 step: [999]; 2: [999, 499]; 4: [999, 759, 499, 259]."""
    if not 1 <= original_steps <= num_timesteps:
        raise ValueError(f"original_steps must be in [1, {num_timesteps}], got {original_steps}.")
    if not 1 <= steps <= original_steps:
        raise ValueError(f"steps must be in [1, {original_steps}] (original_steps), got {steps}.")
    k = num_timesteps // original_steps
    grid = torch.arange(original_steps, 0, -1) * k - 1  # (original_steps,) descending: 999, 979, ...
    index = torch.floor(torch.arange(steps, dtype=torch.float64) * original_steps / steps).long()
    return grid[index]


def renoise_lcm(x: torch.Tensor, x0_hat: torch.Tensor, t: int, s: int, schedule: NoiseSchedule,
                noise_sampler: NoiseSampler | None) -> torch.Tensor:
    """LCM's (and Song et al. 2023 Alg. 1's) step between two consistency evaluations: forget x, re-noise x̂0 to s,
        x_s = √ᾱ_s x̂0 + √(1 − ᾱ_s) z,   z fresh.    (diffusers LCMScheduler.step)"""
    return schedule.add_noise(x0_hat, draw_noise(noise_sampler, x0_hat), s)


def renoise_tcd(x: torch.Tensor, x0_hat: torch.Tensor, t: int, s: int, schedule: NoiseSchedule,
                noise_sampler: NoiseSampler | None, gamma: float = 0.3) -> torch.Tensor:
    """TCD's step (Zheng et al. 2024, diffusers TCDScheduler.step with eta = γ): a deterministic DDIM jump from t past
    s to s' = floor((1 − γ) s), then the forward process q(x_s | x_{s'}) back up to s. γ = 0 is deterministic (needs
    no noise), γ = 1 re-noises x̂0 fully like LCM. Pass it as `functools.partial(renoise_tcd, gamma=γ)`."""
    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1] (0 = deterministic, 1 = LCM-like), got {gamma}.")
    s_prime = math.floor((1 - gamma) * s)  # TCD's s' ≤ s
    x = schedule.add_noise(x0_hat, schedule.predict_eps(x, x0_hat, t), s_prime)  # DDIM jump t -> s'
    if gamma == 0:
        return x
    ratio = schedule.alpha_bar(s, x) / schedule.alpha_bar(s_prime, x)  # ᾱ_s/ᾱ_{s'}: scale, add the missing variance
    return ratio.sqrt().to(x.dtype) * x + (1 - ratio).sqrt().to(x.dtype) * draw_noise(noise_sampler, x)


@torch.no_grad()
def sample_consistency(student, x: torch.Tensor, cond, w, timesteps, schedule: NoiseSchedule,
                       noise_sampler: NoiseSampler | None = None, renoise=renoise_lcm, timestep_scaling: float = 10.0,
                       sigma_data: float = 0.5) -> torch.Tensor:
    """Multi-step consistency sampling (Song et al. 2023 Alg. 1, as diffusers' LCMScheduler does it) from x = x_{τ_0}
    over descending `timesteps` τ_0 > τ_1 > … (consistency_timesteps(N) for LCM's N-step grid): at each τ_i the
    student predicts x̂0 = f_θ(x, τ_i), the last x̂0 is returned, and in between `renoise(x, x̂0, τ_i, τ_{i+1},
    schedule, noise_sampler)` (renoise_lcm or renoise_tcd) moves to τ_{i+1}. `timestep_scaling`, `sigma_data`: the
    student's boundary scalings (student.config for a UNet). TCD's own last step jumps to t = 0; we return x̂0.
    w = None samples a student without an ω input (a LoRA student: the teacher's UNet with its adapters merged)."""
    timesteps = check_timesteps(timesteps, schedule)
    B = x.shape[0]
    w = None if w is None else torch.as_tensor(w, dtype=torch.float32, device=x.device).expand(B)  # None: no ω input
    for i, tau in enumerate(timesteps):
        t = torch.full((B,), tau, dtype=torch.long, device=x.device)
        x0_hat = consistency_fn(student, x, t, cond, w, schedule, timestep_scaling, sigma_data)
        if i == len(timesteps) - 1:
            return x0_hat
        x = renoise(x, x0_hat, tau, timesteps[i + 1], schedule, noise_sampler)
