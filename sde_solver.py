"""The teacher's side of SCott: SD1.5's noise schedule, one DDIM-η transition, and the h-sub-step SDE transition.

Every function takes an ε-predictor `eps_fn(x, t, cond) -> eps` (the SD1.5 UNet, a tiny UNet, the exact ε of a
2-D Gaussian mixture), so the same code serves the trainer, the sampler and the tests.

Notation (VP process, DDPM): x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε, t ∈ {0, …, 999}; t = −1 stands for "clean" (ᾱ = 1),
the end point of a sampler. Guidance ω is the standard classifier-free form ε_u + ω (ε_c − ε_u): ω = 1 is no
guidance. LCM writes the same guidance as x̂0_c + w (x̂0_c − x̂0_u), so its w is ω − 1 (LCM's w ∈ [5, 15] is
ω ∈ [6, 16] here).

Randomness enters only through an explicit `torch.Generator`, a noise tensor, or (in the samplers) a noise sampler
`noise_sampler(like) -> z`, standard normal and shaped like `like`, so a stochastic transition can be replayed exactly.
"""
import math
from typing import Callable

import torch

NoiseSampler = Callable[[torch.Tensor], torch.Tensor]  # like -> standard normal noise of like's shape, device, dtype


class NoiseSchedule:
    """ᾱ_t of a discrete DDPM schedule, kept in float64 so that 1 − ᾱ_t keeps its digits near t = 0; every
    coefficient is cast to the working tensor's dtype only at the point of use (latents may be bf16)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ab = torch.as_tensor(alphas_cumprod).detach()
        if ab.ndim != 1 or ab.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor of ᾱ_t (SD1.5: 1000 values), "
                             f"got shape {tuple(ab.shape)}.")
        ab = ab.to(torch.float64)
        if not (bool(torch.all((ab > 0) & (ab < 1))) and bool(torch.all(ab[1:] < ab[:-1]))):
            raise ValueError("alphas_cumprod must lie in (0, 1) and decrease with t (it is ∏(1 − β)); check that the "
                             "checkpoint's `alphas_cumprod` and not `betas` or `sqrt_alphas_cumprod` was passed.")
        self.alphas_cumprod = ab  # (T,) float64

    @classmethod
    def sd15(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_timesteps: int = 1000,
             device=None) -> "NoiseSchedule":
        """SD1.5's training schedule ("scaled_linear"): β_t = linspace(√β_start, √β_end, T)², ᾱ_t = ∏_{s≤t}(1 − β_s)."""
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64, device=device)
        betas = betas ** 2
        return cls(torch.cumprod(1 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def alpha_bar(self, t, like: torch.Tensor) -> torch.Tensor:
        """ᾱ at per-sample timesteps t (B,), shaped (B, 1, …, 1) to broadcast against `like`, in float64.
        t = −1 gives ᾱ = 1 (the clean end point of a sampler). Range-checked when t is on the host (see on_host)."""
        if on_host(t) and bool(torch.any((torch.as_tensor(t) < -1) | (torch.as_tensor(t) >= self.num_timesteps))):
            raise ValueError(f"timesteps must lie in [-1, {self.num_timesteps - 1}] (−1 = clean), got "
                             f"{torch.as_tensor(t).tolist()}.")
        t = as_timesteps(t, like.shape[0], like.device, "t")
        table = self.alphas_cumprod.to(like.device)
        ab = torch.where(t >= 0, table[t.clamp(min=0)], torch.ones((), dtype=torch.float64, device=like.device))
        return ab.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """The forward process q(x_t | x0): √ᾱ_t x0 + √(1 − ᾱ_t) ε (DDPM eq. 4)."""
        check_same_shape(x0=x0, noise=noise)
        ab = self.alpha_bar(t, x0)
        dtype = torch.promote_types(x0.dtype, noise.dtype)
        return ab.sqrt().to(dtype) * x0 + (1 - ab).sqrt().to(dtype) * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x̂0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t: the clean estimate implied by an ε-prediction (DDIM eq. 9)."""
        check_same_shape(x_t=x_t, eps=eps)
        ab = self.alpha_bar(t, x_t)
        dtype = torch.promote_types(x_t.dtype, eps.dtype)
        return (x_t - (1 - ab).sqrt().to(dtype) * eps) / ab.sqrt().to(dtype)

    def predict_eps(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
        """ε̂ = (x_t − √ᾱ_t x̂0) / √(1 − ᾱ_t): the noise implied by a clean estimate (t ≥ 0)."""
        check_same_shape(x_t=x_t, x0=x0)
        ab = self.alpha_bar(t, x_t)
        dtype = torch.promote_types(x_t.dtype, x0.dtype)
        return (x_t - ab.sqrt().to(dtype) * x0) / (1 - ab).sqrt().to(dtype)


# ---- one transition x_t -> x_s ---------------------------------------------------------------------------------

NOISE_KINDS = ("ddim", "er_sde")


def transition_std(schedule: NoiseSchedule, t, s, eta: float, like: torch.Tensor, kind: str = "ddim") -> torch.Tensor:
    """The std σ of the fresh noise in one step t -> s, (B, 1, …) float64. With ρ = σ_s/σ_t the ratio of the VE noise
    levels σ_t = √((1 − ᾱ_t)/ᾱ_t):
      "ddim":   σ² = η² (1 − ᾱ_s)/(1 − ᾱ_t) (1 − ᾱ_t/ᾱ_s) = η² (1 − ᾱ_s)(1 − ρ²)   (DDIM eq. 16)
      "er_sde": σ² = (1 − ᾱ_s)(1 − ρ^{2η})   (ER-SDE-Solver-1, Cui et al. 2023, with noise-scale function
                φ(σ) = σ^{1+η}; the SCott paper's Table 5 ablates an ER-SDE noise scale, its exact φ is not given).
    Both give the ODE (DDIM) at η = 0 and the DDPM posterior at η = 1; they differ in between."""
    check_kind(kind)
    ab_t, ab_s = schedule.alpha_bar(t, like), schedule.alpha_bar(s, like)
    rho2 = ((1 - ab_s) * ab_t) / (ab_s * (1 - ab_t))  # ρ² = σ_s²/σ_t² ∈ [0, 1) for s < t
    gain = eta ** 2 * (1 - rho2) if kind == "ddim" else 1 - rho2 ** eta
    return ((1 - ab_s) * gain).clamp(min=0).sqrt()


def ddim_eta_step(x0_hat: torch.Tensor, eps_hat: torch.Tensor, t, s, schedule: NoiseSchedule, eta: float,
                  noise: torch.Tensor | None = None, kind: str = "ddim") -> torch.Tensor:
    """One step x_t -> x_s (s < t, s = −1 means clean) from the model's (x̂0, ε̂) (DDIM eq. 12):
        x_s = √ᾱ_s x̂0 + √(1 − ᾱ_s − σ²) ε̂ + σ z,   σ from `transition_std`.
    η = 0 is the deterministic DDIM (probability-flow ODE) step; η = 1 is a draw from the DDPM posterior
    q(x_s | x_t, x0 = x̂0). `noise` z (same shape as x) is required when σ > 0 is possible (η > 0)."""
    check_same_shape(x0_hat=x0_hat, eps_hat=eps_hat)
    check_eta(eta)
    t = as_timesteps(t, x0_hat.shape[0], x0_hat.device, "t")
    s = as_timesteps(s, x0_hat.shape[0], x0_hat.device, "s")
    if on_host(t, s) and bool(torch.any(s >= t)):
        raise ValueError(f"a step goes down in time: every s must be < t, got t={t.tolist()}, s={s.tolist()}.")
    if eta > 0:
        if noise is None:
            raise ValueError(f"eta={eta} > 0 makes the step stochastic: pass `noise` (a tensor shaped like x).")
        check_same_shape(x=x0_hat, noise=noise)
    return ddim_eta_update(x0_hat, eps_hat, t, s, schedule, eta, noise, kind)


def ddim_eta_update(x0_hat, eps_hat, t: torch.Tensor, s: torch.Tensor, schedule: NoiseSchedule, eta: float,
                    noise: torch.Tensor | None, kind: str) -> torch.Tensor:
    """ddim_eta_step's maths, on arguments its callers have checked (t, s as (B,) tensors)."""
    dtype = torch.promote_types(x0_hat.dtype, eps_hat.dtype)
    ab_s = schedule.alpha_bar(s, x0_hat)
    std = transition_std(schedule, t, s, eta, x0_hat, kind)                          # σ
    x_s = ab_s.sqrt().to(dtype) * x0_hat + (1 - ab_s - std ** 2).clamp(min=0).sqrt().to(dtype) * eps_hat
    if eta > 0:
        x_s = x_s + std.to(dtype) * noise                                             # + σ z
    return x_s


# ---- classifier-free guidance and the SCott teacher transition ------------------------------------------------

def cfg_eps(eps_fn, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, w) -> torch.Tensor:
    """Guided ε = ε_u + ω (ε_c − ε_u) (Ho & Salimans 2022) from ONE batched call of the teacher on
    [uncond; cond], as SD pipelines do. `uncond` may have batch 1 (broadcast); ω is a float or (B,).
    A float ω = 1 is plain conditional ε, so the unconditional half is skipped."""
    B = x.shape[0]
    t = as_timesteps(t, B, x.device, "t")
    if cond.shape[0] != B:
        raise ValueError(f"cond has batch {cond.shape[0]} but x has batch {B}: pass one condition per sample.")
    if isinstance(w, (int, float)) and w == 1:
        return eps_fn(x, t, cond)
    if uncond.shape[0] == 1:
        uncond = uncond.expand(B, *uncond.shape[1:])
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond has shape {tuple(uncond.shape)}, expected batch 1 or {B} and the per-sample shape "
                         f"of cond {tuple(cond.shape[1:])}: encode the empty prompt like the others.")
    eps_u, eps_c = eps_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)  # each (B, ...)
    w = torch.as_tensor(w, device=x.device)
    if w.ndim == 1 and w.shape[0] != B:
        raise ValueError(f"w has {w.shape[0]} entries but x has batch {B}: pass one guidance scale per sample.")
    w = w.view(-1, *([1] * (x.ndim - 1))) if w.ndim == 1 else w
    return eps_u + w * (eps_c - eps_u)


def teacher_transition(eps_fn, x_tn: torch.Tensor, t_n, t_m, cond: torch.Tensor, uncond: torch.Tensor, w,
                       schedule: NoiseSchedule, eta: float, substeps: int, generator: torch.Generator | None = None,
                       noise: torch.Tensor | None = None, kind: str = "ddim") -> torch.Tensor:
    """SCott's target solver (Liu et al. 2024, arXiv 2403.01505): carry x_{t_n} to x_{t_m} in h = `substeps` equal
    DDIM-η sub-steps, guided ε at every sub-step and fresh noise per sub-step. η = 0, h = 1 is exactly LCM's
    one-step DDIM target.
    t_n, t_m: ints or per-sample (B,) integer tensors with 0 ≤ t_m < t_n ≤ T−1 and (t_n − t_m) divisible by h.
    Noise: `noise` of shape (h, *x.shape), or drawn from `generator` (one draw of x's shape per sub-step)."""
    t_n, t_m = check_transition(x_tn, t_n, t_m, schedule, eta, substeps, generator, noise)
    stride = (t_n - t_m) // substeps                          # (B,) sub-step length k / h per sample
    x = x_tn
    for j in range(substeps):
        t, s = t_n - j * stride, t_n - (j + 1) * stride       # sub-step j: t -> s
        eps = cfg_eps(eps_fn, x, t, cond, uncond, w)          # ε_u + ω (ε_c − ε_u)
        x0_hat = schedule.predict_x0(x, eps, t)               # x̂0 = (x − √(1 − ᾱ_t) ε) / √ᾱ_t
        z = None
        if eta > 0:                                           # fresh noise for every sub-step
            z = noise[j] if noise is not None else randn_like(x, generator)
        x = ddim_eta_update(x0_hat, eps, t, s, schedule, eta, z, kind)
    return x


def check_transition(x_tn, t_n, t_m, schedule: NoiseSchedule, eta: float, substeps: int, generator, noise):
    """teacher_transition's arguments, checked once: (t_n, t_m) as (B,) tensors, or a ValueError saying what is
    wrong. Timestep values are checked only where that costs no host sync (on_host)."""
    B = x_tn.shape[0]
    check_substeps(substeps)
    check_eta(eta)
    host = on_host(t_n, t_m)
    t_n = as_timesteps(t_n, B, x_tn.device, "t_n")
    t_m = as_timesteps(t_m, B, x_tn.device, "t_m")
    if host and (bool(torch.any(t_m < 0)) or bool(torch.any(t_n > schedule.num_timesteps - 1))):
        raise ValueError(f"need 0 ≤ t_m and t_n ≤ {schedule.num_timesteps - 1}, got t_n={t_n.tolist()}, "
                         f"t_m={t_m.tolist()}.")
    if host and bool(torch.any(t_m >= t_n)):
        raise ValueError(f"the teacher goes down in time: need t_m < t_n, got t_n={t_n.tolist()}, t_m={t_m.tolist()}.")
    if host and bool(torch.any((t_n - t_m) % substeps != 0)):
        raise ValueError(f"t_n − t_m = {(t_n - t_m).tolist()} is not divisible by substeps={substeps}: the sub-steps "
                         f"must be equal; choose k a multiple of h.")
    if noise is not None and noise.shape != (substeps, *x_tn.shape):
        raise ValueError(f"noise must have shape {(substeps, *x_tn.shape)} (one draw per sub-step), "
                         f"got {tuple(noise.shape)}.")
    if eta > 0 and noise is None and generator is None:
        raise ValueError(f"eta={eta} > 0 needs randomness: pass `generator` or `noise`.")
    return t_n, t_m


# ---- full teacher samplers (baselines) -------------------------------------------------------------------------

def teacher_timesteps(steps: int, num_timesteps: int = 1000) -> torch.Tensor:
    """N "trailing" timesteps round(T − i·T/N) − 1, i = 0..N−1 (Lin et al. 2024, diffusers'
    timestep_spacing="trailing"): they start at T−1 = 999, where the sampler's pure noise lives, and for N = 50 they
    are LCM's grid {999, 979, …, 19}. The sampler then steps to −1 (clean, diffusers' set_alpha_to_one=True)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}.")
    i = torch.arange(steps, dtype=torch.float64)
    return (torch.round(num_timesteps - i * num_timesteps / steps) - 1).long()


@torch.no_grad()
def sample_teacher(eps_fn, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, w, timesteps,
                   schedule: NoiseSchedule, noise_sampler: NoiseSampler | None = None, eta: float = 0.0,
                   kind: str = "ddim") -> torch.Tensor:
    """x0 from x = x_{τ_0} in guided DDIM-η steps over descending `timesteps` τ_0 > τ_1 > … and then to clean (−1)
    (teacher_timesteps(N) for N trailing steps from pure noise at 999): η = 0 is DDIM, η = 1 is ancestral DDPM over
    the same (skipped) timesteps. With η > 0 one draw of `noise_sampler` per step."""
    check_eta(eta)
    timesteps = check_timesteps(timesteps, schedule)
    if eta > 0 and noise_sampler is None:
        raise ValueError(f"eta={eta} > 0 needs randomness: pass `noise_sampler`.")
    B = x.shape[0]
    for t, s in zip(timesteps, timesteps[1:] + [-1]):
        eps = cfg_eps(eps_fn, x, t, cond, uncond, w)
        z = draw_noise(noise_sampler, x) if eta > 0 else None
        t_, s_ = as_timesteps(t, B, x.device, "t"), as_timesteps(s, B, x.device, "s")
        x = ddim_eta_update(schedule.predict_x0(x, eps, t), eps, t_, s_, schedule, eta, z, kind)
    return x


# ---- small helpers: argument checks with clear messages --------------------------------------------------------

def as_timesteps(t, batch: int, device, name: str) -> torch.Tensor:
    """An int or a (B,)/(1,) integer tensor -> a (B,) long tensor on `device`."""
    t = torch.as_tensor(t, device=device)
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must be integer timesteps, got dtype {t.dtype}; use .long().")
    if t.ndim == 0 or (t.ndim == 1 and t.shape[0] == 1):
        return t.reshape(1).long().expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must be an int or a (B,) tensor with B = {batch}, got shape {tuple(t.shape)}.")
    return t.long()


def check_same_shape(**tensors: torch.Tensor) -> None:
    (name_a, a), *rest = tensors.items()
    for name_b, b in rest:
        if a.shape != b.shape:
            raise ValueError(f"{name_a} and {name_b} must have the same shape, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}.")


def check_eta(eta: float) -> None:
    if not (isinstance(eta, (int, float)) and 0 <= eta <= 1 and math.isfinite(eta)):
        raise ValueError(f"eta (noise strength) must be a number in [0, 1] (0 = ODE/DDIM, 1 = DDPM), got {eta!r}.")


def check_kind(kind: str) -> None:
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}.")


def check_substeps(substeps: int) -> None:
    if not (isinstance(substeps, int) and substeps >= 1):
        raise ValueError(f"substeps (h) must be an integer ≥ 1, got {substeps!r}.")


def on_host(*timesteps) -> bool:
    """Whether timesteps can be checked without waiting for an accelerator: Python numbers and CPU tensors. Checking a
    GPU tensor's values would synchronise the host at every call of the training step's hot path; GPU timesteps
    come from our own code (scott_loss), in range by construction, while user input arrives as numbers."""
    return all(not isinstance(t, torch.Tensor) or t.device.type == "cpu" for t in timesteps)


def check_timesteps(timesteps, schedule: NoiseSchedule) -> list[int]:
    """A sampler's timesteps as a list of ints, after checking they are non-empty, strictly descending, in [0, T−1]."""
    timesteps = [int(t) for t in timesteps]
    if not timesteps or any(a <= b for a, b in zip(timesteps, timesteps[1:])) or \
            not 0 <= timesteps[-1] <= timesteps[0] < schedule.num_timesteps:
        raise ValueError(f"timesteps must be a non-empty, strictly descending list in [0, {schedule.num_timesteps - 1}]"
                         f" (e.g. consistency_timesteps(2) or teacher_timesteps(50)), got {timesteps}.")
    return timesteps


def generator_noise(generator: torch.Generator) -> NoiseSampler:
    """A noise sampler drawing the whole batch at once from one generator (as diffusers' samplers draw, so a test can
    replay them); sample.image_noise draws each image from its own generator instead."""
    return lambda like: randn_like(like, generator)


def draw_noise(noise_sampler: NoiseSampler | None, like: torch.Tensor) -> torch.Tensor:
    """One draw shaped like `like`, with a clear error where a stochastic step was given no noise sampler."""
    if noise_sampler is None:
        raise ValueError("this step is stochastic: pass a noise_sampler (e.g. sde_solver.generator_noise(generator)).")
    return noise_sampler(like)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn from `generator` (as diffusers' randn_tensor draws it, so a test
    can replay a diffusers scheduler with the same generator)."""
    if generator is None:
        raise ValueError("this step is stochastic: pass a torch.Generator.")
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
