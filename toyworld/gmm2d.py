"""SCott vs vanilla consistency distillation on a 2-D Gaussian mixture whose teacher is exact.

    python -m toyworld.gmm2d                 # the README table: 3 seeds, a few minutes on 2 CPU cores
    python -m toyworld.gmm2d --quick         # a smoke run: 1 seed, fewer steps, fewer configurations (< 1 min)
    python -m toyworld.gmm2d --out gmm2d.md  # also write the markdown table to a file

The data is a known mixture of 8 Gaussians in two classes. Under SD1.5's own VP schedule each component stays
Gaussian, N(√ᾱ μ_k, ᾱ Σ_k + (1 − ᾱ) I), so the teacher's ε(x_t, t, c) = −√(1 − ᾱ) ∇ log p_t(x_t | c) is closed-form:
no teacher error, only the solver's and the student's. A small MLP student (ε-prediction, ω-conditioned like an
LCM UNet, initialised by regressing the conditional ε, as LCM initialises its student from the teacher) is then
distilled with the same `scott_loss` the SD1.5 trainer uses: vanilla CD (η = 0, h = 1) and SCott (η > 0, h sub-steps),
each also with the SD trainer's adversarial term (a conditional MLP critic D(x0, c), hinge losses, fixed or VQGAN's
adaptive λ).
Samples after 1, 2 and 4 consistency steps are scored by sliced Wasserstein distance to a reference:
the exact mixture at ω = 1, the teacher's 50-step DDIM at ω = 2 (CFG has no closed-form target).
"""
import argparse
import copy
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from consistency import ConsistencyConfig, consistency_timesteps, ema_update, sample_consistency, scott_loss
from discriminator import d_hinge_loss, g_hinge_loss
from sde_solver import NoiseSchedule, generator_noise, sample_teacher, teacher_timesteps
from unet import guidance_embedding, sinusoidal_embedding


# ---- the data: a Gaussian mixture with an exact ε --------------------------------------------------------------

class GaussianMixture:
    """p(x0 | c) = Σ_{k ∈ c} π_k N(μ_k, Σ_k) / Σ_{k ∈ c} π_k; cond is a one-hot class (B, C), an all-zero row means
    no condition (the whole mixture), as the empty prompt does for SD."""

    def __init__(self, means: torch.Tensor, covs: torch.Tensor, weights: torch.Tensor, classes: torch.Tensor):
        K, D = means.shape
        if covs.shape != (K, D, D) or weights.shape != (K,) or classes.shape != (K,):
            raise ValueError(f"mixture of K={K} components in D={D}: need covs (K, D, D), weights (K,), classes (K,), "
                             f"got {tuple(covs.shape)}, {tuple(weights.shape)}, {tuple(classes.shape)}.")
        self.means, self.covs = means.double(), covs.double()
        self.weights = weights.double() / weights.sum()
        self.classes = classes.long()
        self.n_classes = int(classes.max()) + 1
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.covs)  # (K, D), (K, D, D): Σ_k = U diag(λ) Uᵀ

    @classmethod
    def ring(cls, n: int = 8, radius: float = 1.5, stds=(0.2, 0.06)) -> "GaussianMixture":
        """n elongated components on a circle, unequal weights, class = index mod 2 (alternate around the ring)."""
        angles = torch.arange(n, dtype=torch.float64) * 2 * torch.pi / n
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        rot = torch.stack([torch.stack([-angles.sin(), -angles.cos()], 1),
                           torch.stack([angles.cos(), -angles.sin()], 1)], 1)  # (n, 2, 2): tangent, radial columns
        covs = rot @ torch.diag(torch.tensor(stds, dtype=torch.float64) ** 2) @ rot.transpose(1, 2)
        weights = torch.tensor([1.0, 2.0, 3.0, 4.0] * (n // 4) + [1.0] * (n % 4))
        return cls(means, covs, weights, torch.arange(n) % 2)

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(labels, self.n_classes).double()

    def class_probs(self) -> torch.Tensor:
        return torch.zeros(self.n_classes, dtype=torch.float64).index_add_(0, self.classes, self.weights)

    def sample(self, n: int, generator: torch.Generator, labels: torch.Tensor | None = None):
        """(x0 (n, D), component (n,)): labels (n,) pick each sample's class; None samples the whole mixture."""
        logits = self.weights.log().expand(n, -1)
        if labels is not None:
            logits = logits + self.component_mask(self.one_hot(labels)).log()
        comp = torch.multinomial(logits.softmax(1), 1, generator=generator).squeeze(1)
        chol = torch.linalg.cholesky(self.covs)[comp]  # (n, D, D)
        z = torch.randn(n, self.means.shape[1], dtype=torch.float64, generator=generator)
        return self.means[comp] + (chol @ z.unsqueeze(-1)).squeeze(-1), comp

    def component_mask(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, K) 1 where component k belongs to the condition's class; all ones for a zero (unconditional) row."""
        mask = cond.double() @ nn.functional.one_hot(self.classes, self.n_classes).double().T
        return torch.where(cond.abs().sum(1, keepdim=True) > 0, mask, torch.ones_like(mask))

    def log_responsibilities(self, x: torch.Tensor, ab: torch.Tensor, cond: torch.Tensor):
        """log r_k(x_t) of the noisy components N(√ᾱ μ_k, ᾱ Σ_k + (1 − ᾱ) I), ab (B,) = ᾱ_t, and each component's
        precision-weighted offset (ᾱΣ_k + (1 − ᾱ)I)⁻¹ (x − √ᾱ μ_k), (B, K, D). Σ_k = U diag(λ) Uᵀ makes the noisy
        covariance U diag(ᾱλ + 1 − ᾱ) Uᵀ: no matrix inverse per timestep."""
        var = ab[:, None, None] * self.eigvals + (1 - ab)[:, None, None]  # (B, K, D)
        diff = x[:, None, :] - ab.sqrt()[:, None, None] * self.means  # (B, K, D)
        y = torch.einsum("kij,bki->bkj", self.eigvecs, diff) / var  # Uᵀ (x − m) / v
        maha = (y * y * var).sum(-1)
        log_p = self.weights.log() + self.component_mask(cond).log() - 0.5 * (maha + var.log().sum(-1))
        return log_p.log_softmax(1), torch.einsum("kij,bkj->bki", self.eigvecs, y)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        """Exact ε(x_t, t | c) = −√(1 − ᾱ) ∇ log p_t(x_t | c),
        with ∇ log p_t = −Σ_k r_k (ᾱΣ_k + (1 − ᾱ)I)⁻¹ (x − √ᾱ μ_k)."""
        x = x_t.double()
        ab = schedule.alpha_bar(t, x).view(-1)
        log_r, offsets = self.log_responsibilities(x, ab, cond)
        score = -(log_r.exp()[:, :, None] * offsets).sum(1)
        return (-(1 - ab).sqrt()[:, None] * score).to(x_t.dtype)

    def teacher(self, schedule: NoiseSchedule):
        """The exact teacher as the ε-callable `teacher(x, t, cond)` that sde_solver and scott_loss take."""
        return lambda x, t, cond: self.eps(x, t, cond, schedule)

    def assign(self, x0: torch.Tensor) -> torch.Tensor:
        """The most likely component of each clean sample (for mode-weight checks)."""
        ab = torch.ones(x0.shape[0], dtype=torch.float64)
        zeros = torch.zeros(x0.shape[0], self.n_classes, dtype=torch.float64)
        return self.log_responsibilities(x0.double(), ab, zeros)[0].argmax(1)


# ---- the student: an ε-predicting MLP conditioned on t, the class and ω ----------------------------------------

class MLPStudent(nn.Module):
    """ε̂(x, t, c, ω): the 2-D stand-in for the student UNet. Like LCM's UNet it embeds LCM's w = ω − 1
    (sinusoidal of 1000·w); t gets the usual sinusoidal embedding."""

    def __init__(self, n_classes: int, dim: int = 2, hidden: int = 128, depth: int = 3, t_dim: int = 64,
                 w_dim: int = 32):
        super().__init__()
        self.t_dim, self.w_dim = t_dim, w_dim
        layers, width = [], dim + t_dim + n_classes + w_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    def forward(self, x, t, cond, w=None):
        w = torch.ones(x.shape[0], device=x.device) if w is None else w
        h = torch.cat([x.float(), sinusoidal_embedding(t, self.t_dim), cond.float(),
                       guidance_embedding(w - 1, self.w_dim)], dim=1)
        return self.net(h).to(x.dtype)


# ---- the adversarial term: a conditional MLP critic, as train.py uses discriminator.py's --------------------------

class MLPDiscriminator(nn.Module):
    """D(x0, c) -> one logit per sample: the 2-D stand-in for discriminator.py's LoRA-UNet critic. Conditional like
    it (it sees the class one-hot as the SD critic sees the text) and scoring clean samples at t = 0 (the SD
    trainer's default; no --renoise here)."""

    def __init__(self, n_classes: int, dim: int = 2, hidden: int = 128, depth: int = 3):
        super().__init__()
        layers, width = [], dim + n_classes
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, x0, cond):
        return self.net(torch.cat([x0.float(), cond.float()], dim=1)).squeeze(1)


@dataclass
class AdversarialConfig:
    weight: float            # λ: fixed, or the base of the adaptive weight
    adaptive: bool = False   # λ_eff = λ · ‖∇_{w_L} L_cd‖ / ‖∇_{w_L} L_adv‖ (VQGAN) instead of λ
    d_lr: float = 7.5e-4     # 2.5 × the student's lr, the paper's D/student ratio (2e-5 / 8e-6)
    d_hidden: int = 128


def adaptive_weight(loss_cd: torch.Tensor, loss_g: torch.Tensor, last_layer: torch.Tensor, weight: float):
    """VQGAN's adaptive weight (Esser et al. 2021, eq. 7), the same formula as the SD trainer's adaptive λ, taken at
    the student's last linear layer w_L and detached:
        λ_eff = λ · clamp(‖∇_{w_L} L_cd‖ / (‖∇_{w_L} L_adv‖ + 1e-4), 0, 1e4)
    (clamped before the multiplication by λ, as in VQGAN's code)."""
    grad_cd = torch.autograd.grad(loss_cd, last_layer, retain_graph=True)[0]
    grad_g = torch.autograd.grad(loss_g, last_layer, retain_graph=True)[0]
    return weight * (grad_cd.norm() / (grad_g.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def student_objective(student, disc, res, cond, adv: AdversarialConfig | None):
    """train.student_backward's loss for one batch: L_cd + λ_adv · g_hinge(D(x̂0, c)), D frozen as a fixed critic
    (its gradients are off, the student's x̂0 keeps its graph). Returns (loss, λ_eff; 0 without D)."""
    if adv is None:
        return res.loss, torch.zeros(())
    disc.requires_grad_(False)
    loss_g = g_hinge_loss(disc(res.x_student, cond))
    disc.requires_grad_(True)
    weight = (adaptive_weight(res.loss, loss_g, student.net[-1].weight, adv.weight) if adv.adaptive
              else torch.tensor(adv.weight))
    return res.loss + weight * loss_g, weight


def discriminator_step(disc, d_opt, x_real, x_fake, cond) -> float:
    """train.discriminator_backward + D's optimiser step: hinge loss on real x0 vs the (detached) fake."""
    loss = d_hinge_loss(disc(x_real, cond), disc(x_fake.detach(), cond))
    d_opt.zero_grad(set_to_none=True)
    loss.backward()
    d_opt.step()
    return loss.item()


# ---- the experiment --------------------------------------------------------------------------------------------

@dataclass
class ExperimentConfig:
    seeds: int = 3
    pretrain_steps: int = 2000     # ε-regression of the student's initialisation (its "teacher weights")
    distill_steps: int = 1000      # CD / SCott steps per configuration, cosine learning-rate decay
    batch: int = 256
    hidden: int = 128              # MLP width (3 hidden layers)
    lr_pretrain: float = 2e-3
    lr_distill: float = 3e-4
    w_min: float = 1.0             # ω range of distillation (CFG form; ω = 1: no guidance)
    w_max: float = 3.0
    eval_w: tuple = (1.0, 2.0)     # ω = 1 is scored against the exact mixture, others against 50-step DDIM
    eval_steps: tuple = (1, 2, 4)
    n_eval: int = 4000
    n_projections: int = 256
    etas: tuple = (0.1, 0.3, 0.6, 1.0)
    substeps: tuple = (1, 2, 3)
    adv_etas: tuple = (0.1, 0.3, 0.6)  # the SCott η that also get the adversarial term (with h = max(substeps))
    adv_weight: float = 0.005      # fixed λ_adv: 0.4 × ‖∇_{w_L} L_cd‖ / ‖∇_{w_L} L_adv‖ ≈ 0.4 × 0.013, the ratio
                                   # measured once D has learned (L_cd is an MSE of 2-D points, ≈ 1e-3 here)
    adv_adaptive: float = 0.4      # λ of the adaptive weight: the paper's λ_adv, as a ratio of last-layer gradients
    workers: int = 2               # processes (one thread each); tiny MLPs scale better this way than with threads


def methods(cfg: ExperimentConfig):
    """(row name, η, h, AdversarialConfig or None): vanilla CD, CD with h ODE sub-steps (separates the effect of h
    from that of noise), SCott; then CD and SCott (η in adv_etas, h = max) + adversarial, fixed and adaptive λ."""
    h_max = max(cfg.substeps)
    rows = [("CD (η=0, h=1)", 0.0, 1, None)]
    if h_max > 1:
        rows.append((f"CD with ODE sub-steps (η=0, h={h_max})", 0.0, h_max, None))
    rows += [(f"SCott η={eta:g}, h={h}", eta, h, None) for eta in cfg.etas for h in cfg.substeps]
    variants = [(f"fixed λ={cfg.adv_weight:g}", AdversarialConfig(cfg.adv_weight))] if cfg.adv_weight > 0 else []
    if cfg.adv_adaptive > 0:
        variants.append((f"adaptive λ={cfg.adv_adaptive:g}", AdversarialConfig(cfg.adv_adaptive, adaptive=True)))
    settings = [("CD", 0.0, 1)] + [("SCott", eta, h_max) for eta in cfg.adv_etas]
    return rows + [(f"{kind} + adversarial, {label} (η={eta:g}, h={h})", eta, h, adv)
                   for kind, eta, h in settings for label, adv in variants]


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_projections: int, generator: torch.Generator) -> float:
    """Sliced W1: the mean over random unit directions of the 1-D Wasserstein-1 distance of the projections
    (equal sample sizes: the mean absolute difference of sorted projections)."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size samples, got {tuple(a.shape)} and {tuple(b.shape)}.")
    dirs = torch.randn(a.shape[1], n_projections, dtype=torch.float64, generator=generator)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ dirs).sort(0).values, (b.double() @ dirs).sort(0).values
    return (pa - pb).abs().mean().item()


def training_batch(mixture, batch: int, generator):
    """(x0 (B, 2), one-hot class (B, C)): classes drawn with their mixture weight, then x0 from that class."""
    labels = torch.multinomial(mixture.class_probs(), batch, replacement=True, generator=generator)
    return mixture.sample(batch, generator, labels)[0], mixture.one_hot(labels)


def pretrain(student, mixture, schedule, cfg: ExperimentConfig, generator) -> float:
    """The student's initialisation: regress ε_θ(x_t, t, c, ω) onto the exact conditional ε (ω is an input the
    target ignores, as for a teacher UNet before distillation). Returns the last batch's ε-MSE."""
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr_pretrain)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_steps)
    for _ in range(cfg.pretrain_steps):
        x0, cond = training_batch(mixture, cfg.batch, generator)
        t = torch.randint(0, 1000, (cfg.batch,), generator=generator)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, dtype=x0.dtype, generator=generator), t)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(cfg.batch, generator=generator)
        loss = (student(x_t.float(), t, cond, w) - mixture.eps(x_t, t, cond, schedule).float()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_decay.step()
    return loss.item()


def distill(init, mixture, schedule, consistency: ConsistencyConfig, cfg: ExperimentConfig, generator,
            adv: AdversarialConfig | None = None, log_weights: list | None = None):
    """CD / SCott from the pretrained student with the trainer's own `scott_loss` and EMA target; with `adv`, in
    train.train_step's order: the student's step on L_cd + λ_adv L_adv, D's hinge step on real x0 vs the detached
    x̂0, then the EMA update. `log_weights` collects λ_eff per step."""
    student, target = copy.deepcopy(init), copy.deepcopy(init).requires_grad_(False)
    teacher = mixture.teacher(schedule)
    uncond = torch.zeros(1, mixture.n_classes, dtype=torch.float64)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr_distill)
    lr_decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.distill_steps)
    disc = MLPDiscriminator(mixture.n_classes, hidden=adv.d_hidden) if adv else None
    d_opt = torch.optim.Adam(disc.parameters(), lr=adv.d_lr, betas=(0.0, 0.999)) if adv else None  # β1 = 0: train.py
    for _ in range(cfg.distill_steps):
        x0, cond = training_batch(mixture, cfg.batch, generator)
        res = scott_loss(student, target, teacher, x0.float(), cond, uncond, schedule, consistency, generator)
        loss, weight = student_objective(student, disc, res, cond, adv)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_decay.step()
        if adv:
            discriminator_step(disc, d_opt, x0.float(), res.x_student, cond)
        if log_weights is not None:
            log_weights.append(float(weight))
        ema_update(target, student, consistency.ema_decay)
    return student


def make_references(mixture, schedule, cfg: ExperimentConfig, seed: int, draw: int = 0) -> dict:
    """{ω: (class labels, reference x0)}: the exact mixture at ω = 1, the teacher's 50-step DDIM otherwise.
    Another `draw` is an independent sample of the same reference (for the SWD noise floor)."""
    g = torch.Generator().manual_seed(20_000 + 2 * seed + draw)
    refs = {}
    for w in cfg.eval_w:
        labels = torch.multinomial(mixture.class_probs(), cfg.n_eval, replacement=True, generator=g)
        if w == 1.0:
            x = mixture.sample(cfg.n_eval, g, labels)[0].float()
        else:
            noise = torch.randn(cfg.n_eval, 2, generator=g)
            x = sample_teacher(mixture.teacher(schedule), noise, mixture.one_hot(labels).float(),
                               torch.zeros(1, mixture.n_classes), w, teacher_timesteps(50), schedule)
        refs[w] = (labels, x)
    return refs


def evaluate(sampler, mixture, schedule, cfg: ExperimentConfig, seed: int) -> dict:
    """{(ω, steps): sliced W1} of `sampler(noise, cond, w, steps, generator)` against the reference of each ω."""
    scores = {}
    for w, (labels, ref) in make_references(mixture, schedule, cfg, seed).items():
        for steps in cfg.eval_steps:
            g = torch.Generator().manual_seed(10_000 + seed)
            noise = torch.randn(cfg.n_eval, 2, generator=g)
            x = sampler(noise, mixture.one_hot(labels).float(), torch.full((cfg.n_eval,), w), steps, g)
            scores[(w, steps)] = sliced_wasserstein(x, ref, cfg.n_projections, torch.Generator().manual_seed(seed))
    return scores


def baseline_job(cfg: ExperimentConfig, seed: int) -> dict:
    """The rows that need no student: the SWD noise floor and the undistilled teacher at 1/2/4 DDIM steps."""
    mixture, schedule = GaussianMixture.ring(), NoiseSchedule.sd15()
    second = make_references(mixture, schedule, cfg, seed, draw=1)
    floor = evaluate(lambda noise, cond, w, steps, g: second[float(w[0])][1], mixture, schedule, cfg, seed)
    uncond = torch.zeros(1, mixture.n_classes)
    teacher = evaluate(lambda noise, cond, w, steps, g: sample_teacher(mixture.teacher(schedule), noise, cond, uncond,
                                                                       w, teacher_timesteps(steps), schedule),
                       mixture, schedule, cfg, seed)
    return {"reference vs. a second reference draw (noise floor)": floor,
            "teacher DDIM, same number of steps (no distillation)": teacher}


def pretrain_job(cfg: ExperimentConfig, seed: int) -> tuple:
    """(state dict of the pretrained ε-MLP, its final ε-MSE) for one seed."""
    mixture, schedule = GaussianMixture.ring(), NoiseSchedule.sd15()
    torch.manual_seed(seed)  # the MLP's initial weights
    init = MLPStudent(mixture.n_classes, hidden=cfg.hidden)
    loss = pretrain(init, mixture, schedule, cfg, torch.Generator().manual_seed(seed))
    return init.state_dict(), loss


def method_job(cfg: ExperimentConfig, seed: int, init_state: dict, eta: float, substeps: int,
               adv: AdversarialConfig | None = None) -> dict:
    """Distil one (η, h, adversarial) configuration from the seed's pretrained student and score its 1/2/4-step
    samples."""
    mixture, schedule = GaussianMixture.ring(), NoiseSchedule.sd15()
    init = MLPStudent(mixture.n_classes, hidden=cfg.hidden)
    init.load_state_dict(init_state)
    consistency = ConsistencyConfig(eta=eta, substeps=substeps, w_min=cfg.w_min, w_max=cfg.w_max)
    student = distill(init, mixture, schedule, consistency, cfg, torch.Generator().manual_seed(1000 + seed), adv)
    return evaluate(lambda noise, cond, w, steps, g: sample_consistency(student, noise, cond, w,
                                                                        consistency_timesteps(steps), schedule,
                                                                        generator_noise(g)),
                    mixture, schedule, cfg, seed)


def run(cfg: ExperimentConfig, log=print) -> dict:
    """All seeds × rows, spread over `cfg.workers` processes; returns {row name: [scores of each seed]}."""
    pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=torch.set_num_threads, initargs=(1,)) if cfg.workers > 1 else None
    submit = (lambda fn, *args: pool.submit(fn, *args)) if pool else (lambda fn, *args: _Done(fn(*args)))
    tick = time.time()
    try:
        baselines = [submit(baseline_job, cfg, seed) for seed in range(cfg.seeds)]
        inits = [submit(pretrain_job, cfg, seed) for seed in range(cfg.seeds)]
        jobs = []
        for seed, future in enumerate(inits):
            state, loss = future.result()
            log(f"seed {seed}: pretrained ε-MLP, last-batch ε-MSE {loss:.4f} ({time.time() - tick:.0f}s)")
            jobs += [(name, seed, submit(method_job, cfg, seed, state, eta, h, adv))
                     for name, eta, h, adv in methods(cfg)]
        results = {}
        for future in baselines:
            for name, scores in future.result().items():
                results.setdefault(name, []).append(scores)
        for name, seed, future in jobs:
            scores = future.result()
            results.setdefault(name, []).append(scores)
            log(f"seed {seed}: {name}: " + ", ".join(f"ω={w:g} {s}-step {100 * v:.2f}" for (w, s), v in scores.items())
                + f" ({time.time() - tick:.0f}s)")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return results


class _Done:
    """A finished "future", so that workers=1 runs the same code path in-process."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def markdown_table(results: dict, cfg: ExperimentConfig) -> str:
    """Mean ± std over seeds of the sliced W1 (×100) per ω and number of steps."""
    cols = [(w, s) for w in cfg.eval_w for s in cfg.eval_steps]
    header = "| method | " + " | ".join(f"ω={w:g}, {s} step{'s' if s > 1 else ''}" for w, s in cols) + " |"
    lines = [header, "|" + "---|" * (len(cols) + 1)]
    for name, runs in results.items():
        cells = []
        for c in cols:
            v = torch.tensor([r[c] for r in runs]) * 100
            cells.append(f"{v.mean():.2f} ± {v.std():.2f}" if len(v) > 1 else f"{v.mean():.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=ExperimentConfig.seeds, help="independent seeds per configuration")
    p.add_argument("--distill-steps", type=int, default=ExperimentConfig.distill_steps,
                   help="CD / SCott steps per configuration")
    p.add_argument("--pretrain-steps", type=int, default=ExperimentConfig.pretrain_steps,
                   help="ε-regression steps of the student's initialisation")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 300 steps, η ∈ {0.3, 1}, h ∈ {1, 3}, adversarial SCott at η = 0.3: a smoke run")
    p.add_argument("--adv-weight", type=float, default=ExperimentConfig.adv_weight, help="fixed λ_adv (0: no rows)")
    p.add_argument("--adv-adaptive", type=float, default=ExperimentConfig.adv_adaptive,
                   help="λ of the adaptive weight (0: no rows)")
    p.add_argument("--workers", type=int, default=ExperimentConfig.workers, help="processes, one CPU thread each")
    p.add_argument("--out", default="", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = ExperimentConfig(seeds=args.seeds, distill_steps=args.distill_steps, pretrain_steps=args.pretrain_steps,
                           workers=args.workers, adv_weight=args.adv_weight, adv_adaptive=args.adv_adaptive)
    if args.quick:
        cfg = replace(cfg, seeds=1, pretrain_steps=500, distill_steps=300, n_eval=2000, etas=(0.3, 1.0),
                      substeps=(1, 3), adv_etas=(0.3,))
    tick = time.time()
    results = run(cfg)
    table = markdown_table(results, cfg)
    note = (f"\nSliced W1 ×100 to the reference (ω=1: the exact mixture; ω>1: the teacher's 50-step DDIM), "
            f"mean ± std over {cfg.seeds} seed(s); {cfg.distill_steps} distillation steps, batch {cfg.batch}, "
            f"k=24, ω∈[{cfg.w_min:g}, {cfg.w_max:g}]. {time.time() - tick:.0f}s.")
    print(table + note)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n" + note + "\n")


if __name__ == "__main__":
    main()
