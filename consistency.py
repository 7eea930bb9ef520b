"""The student's side of SCott: the consistency function, the SCott loss, the EMA target and the few-step sampler.

A consistency function f_θ(x_t, t) maps every point of one teacher trajectory to the same clean sample, with
f_θ(x, 0) = x (Song et al. 2023). Consistency distillation trains it so that f_θ(x_{t_n}, t_n) matches the EMA
network at the teacher's next point, f_θ⁻(x_{t_m}, t_m). SCott (Liu et al. 2024, arXiv 2403.01505) makes the
teacher's t_n -> t_m transition stochastic: h DDIM-η sub-steps with fresh noise (sde_solver.teacher_transition).

Networks are callables: the student and its EMA target are `net(x, t, cond, w) -> ε̂`, conditioned on the guidance
scale ω (they embed it themselves, LCM-style), the teacher is `teacher(x, t, cond) -> ε̂`. Guidance is the standard
CFG form ε_u + ω (ε_c − ε_u); LCM's "w" is ω − 1 (see sde_solver.py).
"""
import math
from dataclasses import dataclass

import torch

from sde_solver import NOISE_KINDS, NoiseSchedule, check_eta, check_substeps, randn_like, teacher_transition


@dataclass
class ConsistencyConfig:
    k: int = 24                    # t_m = t_n − k, in DDPM timesteps (paper: 24)
    substeps: int = 3              # h, teacher sub-steps inside one interval, k/h timesteps each (paper: 3)
    eta: float = 0.3               # DDIM-η noise strength of the teacher transition; 0 = vanilla CD (LCM). The paper
                                   # ablates {0, 0.1, 0.2, 0.3, 0.6} and does not say which it ships: 0.3 is the middle
                                   # of that range, noisy enough to differ from CD, small enough to keep targets sharp
    noise_kind: str = "ddim"       # "ddim" (DDIM-η) or "er_sde" (ER-SDE power noise scale), sde_solver.transition_std
    w_min: float = 6.0             # guidance ω ~ U[w_min, w_max] per sample, in the CFG form ε_u + ω (ε_c − ε_u).
    w_max: float = 16.0            # The paper gives no range: this is LCM's w ∈ [5, 15] (ω = w + 1), known to work
    timestep_sampling: str = "uniform"  # "uniform": t_n ~ U{k, …, 999}; "grid": t_n ∈ {999, 999 − k, …} ≥ k
                                   # (uniform is the default because sampler timesteps 499, 259… are on no k=24 grid)
    loss: str = "l2"               # "l2" (paper) or "huber" (pseudo-Huber, LCM's option)
    huber_c: float = 0.001         # pseudo-Huber constant (LCM)
    ema_decay: float = 0.95        # target θ⁻ ← μ θ⁻ + (1 − μ) θ (LCM); 0 = the online network is the target
    timestep_scaling: float = 10.0 # boundary scalings use s = 10·t (LCM)
    sigma_data: float = 0.5        # σ_data of the boundary scalings (LCM)
    w_embed_dim: int = 256         # size of the sinusoidal ω embedding (LCM's time_cond_proj_dim)

    def __post_init__(self):
        check_substeps(self.substeps)
        check_eta(self.eta)
        if not (isinstance(self.k, int) and 1 <= self.k <= 999):
            raise ValueError(f"k (t_n − t_m) must be an integer in [1, 999], got {self.k!r}.")
        if self.k % self.substeps:
            raise ValueError(f"k={self.k} does not split into substeps={self.substeps} equal sub-steps: "
                             f"choose k a multiple of h (paper: k=24, h=3).")
        if not self.w_min <= self.w_max:
            raise ValueError(f"need w_min ≤ w_max, got w_min={self.w_min}, w_max={self.w_max}.")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {NOISE_KINDS}, got {self.noise_kind!r}.")
        if self.timestep_sampling not in ("uniform", "grid"):
            raise ValueError(f"timestep_sampling must be 'uniform' or 'grid', got {self.timestep_sampling!r}.")
        if self.loss not in ("l2", "huber"):
            raise ValueError(f"loss must be 'l2' or 'huber', got {self.loss!r}.")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}.")


# ---- boundary parameterisation and ω embedding -----------------------------------------------------------------

def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM's c_skip, c_out (diffusers LCMScheduler.get_scalings_for_boundary_condition_discrete), float64, (B,):
        c_skip = σ_d² / ((s t)² + σ_d²),   c_out = s t / √((s t)² + σ_d²),   s = timestep_scaling.
    c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x exactly (the boundary condition of consistency models,
    Song et al. 2023). With s = 10, c_skip(19) ≈ 7e-6: away from t = 0, f is the network's x̂0."""
    st = t.to(torch.float64) * timestep_scaling
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def sinusoidal_embedding(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) -> (B, dim): [sin(x f_i), cos(x f_i)], f_i = 10000^{−i/(half−1)}, sin half first (VDM's convention,
    which LCM's guidance embedding follows); an odd `dim` is zero-padded. The frequencies are computed exactly as
    diffusers' `get_guidance_scale_embedding` does, so the embedding matches it bit for bit."""
    half = dim // 2
    spacing = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=x.device) * -spacing.to(x.device))
    angles = x.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def guidance_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """LCM's guidance embedding (diffusers get_guidance_scale_embedding): sinusoidal embedding of 1000·w, (B, dim).
    LCM's UNets embed its w = ω − 1 (unet.py does the same); what a student embeds is its choice, kept fixed."""
    if w.ndim != 1:
        raise ValueError(f"w must be a (B,) tensor of guidance scales, got shape {tuple(w.shape)}.")
    return sinusoidal_embedding(1000.0 * w, dim)


def consistency_fn(student, x_t: torch.Tensor, t: torch.Tensor, cond, w: torch.Tensor, schedule: NoiseSchedule,
                   cfg: ConsistencyConfig) -> torch.Tensor:
    """f_θ(x_t, t) = c_skip(t) x_t + c_out(t) x̂0(x_t, ε̂_θ(x_t, t, c, ω)): LCM's parameterisation (Luo et al. 2023)
    of an ε-predicting network, which keeps the teacher's weights meaningful as the student's initialisation."""
    eps = student(x_t, t, cond, w)
    if eps.shape != x_t.shape:
        raise ValueError(f"the student returned shape {tuple(eps.shape)} for input {tuple(x_t.shape)}: it must "
                         f"predict ε with the input's shape.")
    x0_hat = schedule.predict_x0(x_t, eps, t)
    c_skip, c_out = boundary_scalings(t, cfg.timestep_scaling, cfg.sigma_data)
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
    """One SCott consistency-distillation loss (PAPER.md "Idea"; DESIGN.md "One SCott training step"):
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

    x_student = consistency_fn(student, z_tn, t_n, cond, w, schedule, cfg)
    with torch.no_grad():
        z_tm = teacher_transition(teacher, z_tn, t_n, t_m, cond, uncond, w, schedule, cfg.eta, cfg.substeps,
                                  generator=generator, kind=cfg.noise_kind)
        x_target = consistency_fn(target, z_tm, t_m, cond, w, schedule, cfg)
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


@torch.no_grad()
def sample_consistency(student, noise: torch.Tensor, cond, w: torch.Tensor, steps: int, schedule: NoiseSchedule,
                       generator: torch.Generator | None = None, gamma: float | None = None,
                       cfg: ConsistencyConfig | None = None) -> torch.Tensor:
    """Multi-step consistency sampling (Song et al. 2023 Alg. 1, as LCMScheduler does it) from x_{999} = `noise`:
    at each timestep τ_i the student predicts x̂0 = f_θ(x, τ_i); the last one is returned. In between:
      gamma None (LCM):  x ← √ᾱ_{τ_{i+1}} x̂0 + √(1 − ᾱ_{τ_{i+1}}) z                       (full re-noise)
      gamma γ ∈ [0, 1] (TCD, Zheng et al. 2024, diffusers TCDScheduler): a deterministic DDIM jump from τ_i past
        τ_{i+1} to s' = floor((1 − γ) τ_{i+1}), then forward noise from s' back up to τ_{i+1}; γ = 0 is deterministic.
    TCD returns its last step's DDIM jump to t = 0; this sampler returns the clean x̂0 instead."""
    cfg = cfg or ConsistencyConfig()
    if gamma is not None and not 0 <= gamma <= 1:
        raise ValueError(f"gamma must be in [0, 1] (0 = deterministic, 1 = LCM-like), got {gamma}.")
    B = noise.shape[0]
    w = torch.as_tensor(w, dtype=torch.float32, device=noise.device).expand(B)
    timesteps = consistency_timesteps(steps, num_timesteps=schedule.num_timesteps).tolist()
    x = noise
    for i, tau in enumerate(timesteps):
        t = torch.full((B,), tau, dtype=torch.long, device=x.device)
        x0_hat = consistency_fn(student, x, t, cond, w, schedule, cfg)
        if i == steps - 1:
            return x0_hat
        nxt = timesteps[i + 1]
        if gamma is None:
            x = schedule.add_noise(x0_hat, randn_like(x0_hat, generator), nxt)
            continue
        s_prime = math.floor((1 - gamma) * nxt)  # TCD's s' ≤ τ_{i+1}
        x = schedule.add_noise(x0_hat, schedule.predict_eps(x, x0_hat, t), s_prime)  # DDIM jump τ_i -> s'
        if gamma > 0:  # forward q(x_{τ_{i+1}} | x_{s'}): scale by √(ᾱ_{τ}/ᾱ_{s'}), add the missing variance
            ratio = schedule.alpha_bar(nxt, x) / schedule.alpha_bar(s_prime, x)
            x = ratio.sqrt().to(x.dtype) * x + (1 - ratio).sqrt().to(x.dtype) * randn_like(x, generator)
    return x
