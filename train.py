"""SCott distillation of SD1.5 (or of the shipped toy model): torchrun DDP, bf16 autocast, resumable.

    torchrun --nproc_per_node=4 train.py --config configs/sd15-paper.toml --model SD15 --data SHARDS  # the paper's
    python train.py --config configs/sd15-1gpu.toml --model SD15 --data IMAGES        # one GPU, accumulates to 40
    torchrun --nproc_per_node=2 train.py                                              # the toy model, on CPU
    torchrun --nproc_per_node=4 train.py ... --resume auto    # after a pre-emption: the newest valid checkpoint

Every flag is a setting declared once in its config dataclass (config.py); a --config TOML preset sets any of them
and the command line wins; a model folder's scott.toml holds that model's own defaults (the toy model's does).

A run is never lost: checkpoints are written to a temporary folder and renamed in; SIGTERM or SIGINT (to the whole
process group, as SLURM sends it) means "finish the step, checkpoint, exit 0"; resuming checks the checkpoint and
refuses a change of what is trained (--allow-config-change to force it).

The file reads top to bottom: configuration -> models -> the optimisation step -> main (restore state, then the
loop); what lives in --out (checkpoints, resume, recovery) is run_folder.py. One optimisation step (docs/paper.md, "The SCott training step"), per micro-batch:
    z0 = VAE(image) · 0.18215,  c = CLIP(caption),  c∅ = CLIP("")
    consistency loss: student f_θ(z_tn) vs the EMA target at the teacher's SDE transition t_n -> t_m (consistency.py)
    adversarial loss: λ_adv · hinge generator term of D(f_θ(z_tn))          (discriminator.py)
        λ fixed, or VQGAN's adaptive weight (--adv-weighting); none in the first --d-warmup steps
then an AdamW step of the student, a hinge step of D on real z0 vs the detached fake, and the EMA update.
Three UNets are alive: the student (fp32 weights, trained), its EMA target (fp32, frozen) and the teacher (frozen;
bf16 on GPU), which also serves as D's backbone with D's LoRA delta switched on. With --student-lora-rank R
(SCott-LoRA, docs/lora.md) only the teacher is: the student is LCM-LoRA's rank-R adapters, a named set in the
teacher's layers switched on for the student's passes (lora.attach / use_adapters; no hooks, so --compile and
--grad-checkpointing apply), the target an EMA copy of those adapters (a second set); the student has no ω input
(the teacher's ω is still drawn per sample, by default from LCM-LoRA's [3, 15]), checkpoints hold the two adapters
files, and export.py --to lora ships them.
"""
import argparse
import copy
import dataclasses
import gc
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CheckpointError
from config import add_arguments, check_settings, declared, flags_given, model_settings, read_preset, setting
from consistency import ConsistencyConfig, ema_update, scott_loss
from data import DataConfig, build_latent_cache, make_loader
from discriminator import Discriminator, DiscriminatorConfig, d_hinge_loss, g_hinge_loss
from lora import Adapters, LoRAConfig, LoRAStudent, key_of
from run_folder import (Trackers, check_paths, compare_configs, describe_run, find_resume, list_checkpoints,
                        on_rank_zero, prepare_out, restore, save_checkpoint, set_aside, tracker_names)
from sample import generate, save_grid
from sd15 import SD15, check_model, load_sd15, model_path
from sde_solver import NoiseSchedule
from unet import UNet, make_student


@dataclass
class TrainConfig:
    # -- what is trained, on what, and where it goes
    model: str = setting("", "the teacher: an SD1.5 diffusers folder or single file; \"\" = the shipped toy model "
                             "(toy/)")
    tokenizer: str = setting("", "tokenizer folder (vocab.json + merges.txt), needed with a single-file --model")
    data: str = setting("", "image folder, tar shards, latent cache, or MODULE:FUNCTION for synthetic batches (the "
                            "toy model's scott.toml names its own)")
    out: str = setting("runs/scott", "the run folder: checkpoints, log.jsonl and sample grids")
    resume: str = setting("", "\"auto\" = the newest valid checkpoint in --out, if any; or a checkpoint folder")
    cache_to: str = setting("", "encode --data with the model's VAE and text encoder into a latent cache here, "
                                "then exit")
    config: str = setting("", "a TOML preset (configs/*.toml) whose keys are these flags; flags given here win")
    # -- the optimisation
    steps: int = setting(40_000, "total optimisation steps (paper: 40K)", at_least=1)
    stop_after: int = setting(0, "stop with a checkpoint after this many steps in this invocation; 0 = never",
                              at_least=0)
    global_batch: int = setting(40, "images per optimisation step (paper: 40 = 4 GPUs × 10)", at_least=1)
    micro_batch: int = setting(10, "images per GPU per forward; accumulation = global / (micro × world); "
                                   "0 = global / world", at_least=0)
    lr: float = setting(8e-6, "the student's learning rate (paper)", above=0)
    d_lr: float = setting(2e-5, "the discriminator's learning rate (paper)", above=0)
    warmup: int = setting(100, "linear learning-rate warm-up steps, then constant", at_least=0)
    weight_decay: float = setting(0.0, "AdamW weight decay of the student", at_least=0)
    grad_clip: float = setting(1.0, "clip the student's and D's gradient norms to this", above=0)
    seed: int = setting(0, "seed of the initialisations and of SCott's noise (rank r uses seed + r)", at_least=0)
    # -- the adversarial term
    adv_weight: float = setting(0.4, "λ_adv (paper: 0.4); 0 switches the discriminator off entirely", at_least=0)
    adv_weighting: str = setting("fixed", "fixed: the student's loss is L_cd + λ_adv L_adv; adaptive: λ_adv is "
                                          "rescaled by ‖∇L_cd‖ / ‖∇L_adv‖ at the student's last layer (VQGAN's "
                                          "adaptive weight, one more backward through D)",
                                 choices=("fixed", "adaptive"))
    d_warmup: int = setting(0, "the first N steps train D but give the student no adversarial term", at_least=0)
    # -- speed and memory
    bf16: bool = setting(torch.cuda.is_available(), "bf16 autocast, frozen nets stored in bf16")
    fp16: bool = setting(False, "fp16 autocast with gradient scalers instead of bf16, for GPUs without fast bf16 "
                                "(T4, V100); frozen nets stored in fp16")
    compile: bool = setting(False, "torch.compile the student, target and teacher")
    grad_checkpointing: bool = setting(False, "recompute the student's activations in backward (less memory)")
    channels_last: bool = setting(False, "channels-last memory format for the UNets' convolutions")
    # -- logs, checkpoints, safety
    log_every: int = setting(10, "steps between progress lines (and log.jsonl records)", at_least=1)
    log_to: str = setting("", "experiment trackers, comma-separated: tensorboard, wandb (rank 0; a resumed run "
                              "continues the same run; needs the package)")
    ckpt_every: int = setting(1000, "steps between checkpoints", at_least=1)
    sample_every: int = setting(1000, "steps between PNG grids of fixed prompts at 1, 2 and 4 steps; 0 = never",
                                at_least=0)
    sample_prompts: str = setting("", "a text file of the grids' prompts, one a line (# comments and blank lines "
                                      "ignored); \"\" = the model folder's own, else three SD1.5 prompts")
    keep_checkpoints: int = setting(2, "the newest N checkpoints of this run are kept", at_least=1)
    max_nonfinite: int = setting(5, "stop after this many non-finite steps in a row", at_least=1)
    check_sync_every: int = setting(0, "every N steps assert that all ranks hold identical weights; 0 = never",
                                    at_least=0)
    deterministic: bool = setting(False, "deterministic GPU kernels (slower): a resumed run then matches bit for bit")
    overwrite: bool = setting(False, "start afresh in an --out that holds checkpoints: they move to "
                                     "out/replaced-<time>/")
    allow_config_change: bool = setting(False, "resume although the teacher, D, its LoRA or the batch layout changed")
    # -- SCott-LoRA (docs/lora.md)
    student_lora_rank: int = setting(0, "> 0: the student is a LoRA of this rank on the teacher (SCott-LoRA); "
                                        "0 = a full UNet", at_least=0)
    student_lora_alpha: float = setting(0.0, "the student LoRA's alpha (delta scale alpha / rank); 0 = the rank "
                                             "(LCM-LoRA)", at_least=0)

    def __post_init__(self):
        check_settings(self)
        if self.fp16:
            self.bf16 = False  # one autocast dtype: --fp16 replaces the bf16 default


SD15_SAMPLE_PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a watercolor painting of a fox",
                       "a bowl of ramen, studio lighting, 85mm"]


# ---- configuration --------------------------------------------------------------------------------------------

CONFIGS = {"train": TrainConfig, "consistency": ConsistencyConfig, "discriminator": DiscriminatorConfig,
           "data": DataConfig}


def parse_args(argv=None):
    """The four configs from the command line. Every flag is a field declared in its config dataclass
    (config.setting). Where a value comes from, lowest precedence first: the declared default, the model folder's
    scott.toml `[train]` table (the toy model's own run), the --config preset, the command line; then a LoRA
    student's own defaults for what none of them set. Every value is checked here, before anything is loaded."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=(
        "Defaults are SD1.5's (the paper's run). A model folder's scott.toml may set its own (the shipped toy "
        "model's does); --config FILE presets (configs/*.toml) win over those, and flags given here win over both."))
    for title, cls in CONFIGS.items():
        add_arguments(parser, title, cls)
    given = flags_given(parser, argv)
    fields = declared(CONFIGS.values())
    try:
        preset = read_preset(Path(given["config"]), fields) if given.get("config") else {}
        model = model_path(given.get("model", preset.get("model", "")))
        chosen = {**preset, **given}  # what the user asked for, by preset or flag
        if chosen.get("data") and not chosen.get("model"):
            raise ValueError(f"--data {chosen['data']} without --model: that would train the shipped toy model "
                             f"(32×32 synthetic shapes) on your data. Pass --model PATH (an SD1.5 folder or single "
                             f"file); to train the toy model on this data anyway, pass --model {model}.")
        values = {**model_settings(model, "train", fields), **chosen}
        if values.get("student_lora_rank"):
            values = {**{n: f.metadata["lora_student"] for n, f in fields.items()
                         if f.metadata["lora_student"] is not None}, **values}
        values["path"] = values.get("data", "")  # DataConfig.path is --data
        return tuple(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})
                     for cls in CONFIGS.values())
    except (ValueError, OSError) as e:  # a bad preset, a value out of bounds, or a config's cross-field check
        parser.error(str(e))


# ---- distributed set-up ----------------------------------------------------------------------------------------

def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on GPUs, gloo on CPU. Plain `python train.py` is world size 1."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def average_gradients(module: torch.nn.Module):
    """Mean of the gradients over ranks in one all-reduce, for D (its forward runs inside the teacher's, outside any
    DDP wrapper)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if dist.is_initialized() and grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for g, averaged in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(averaged.view_as(g))


def assert_replicas_in_sync(step: int, **modules):
    """Raise if any rank's weights differ from rank 0's (float64 sum and sum of squares per module: any drift
    between replicas changes them)."""
    if not dist.is_initialized():
        return
    checksum = lambda m: torch.stack([sum(p.detach().double().sum() for p in m.parameters()),  # noqa: E731
                                      sum(p.detach().double().square().sum() for p in m.parameters())])
    sums = torch.stack([checksum(m) for m in modules.values()])
    gathered = [torch.empty_like(sums) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, sums)
    for rank, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            raise RuntimeError(f"step {step}: rank {rank}'s weights differ from rank 0's in "
                               f"{[n for n, a, b in zip(modules, other, gathered[0]) if not torch.equal(a, b)]}")


# ---- models ----------------------------------------------------------------------------------------------------

@dataclass
class Models:
    """Everything the step runs. `*_fwd` are what gets called (DDP-wrapped and/or compiled); the plain modules are
    what the optimiser, the EMA update and the checkpoints see."""
    bundle: SD15                   # tokenizer, text encoder, VAE (frozen) and the teacher UNet
    student: UNet | LoRAStudent    # f_θ: fp32, trained (a LoRA student: its adapters on the teacher)
    target: UNet | LoRAStudent     # f_θ⁻: the EMA of the student, frozen
    teacher: UNet                  # frozen; also D's backbone, and a LoRA student's
    disc: Discriminator | None     # LoRA adapters + head on the teacher; None when adv_weight = 0
    schedule: NoiseSchedule
    uncond: torch.Tensor           # CLIP("") (1, 77, 768), broadcast over the batch
    student_fwd: torch.nn.Module
    target_fwd: torch.nn.Module
    teacher_fwd: torch.nn.Module
    ddp: DDP | None                # the student's DDP wrapper (for no_sync), None at world size 1
    scalers: tuple | None = None   # --fp16: the student's and D's GradScaler, saved with every checkpoint


def build_models(bundle: SD15, cfg: TrainConfig, consistency: ConsistencyConfig, disc_cfg: DiscriminatorConfig,
                 device, world: int) -> Models:
    """From the teacher bundle loaded in fp32 on `device`: make the student and its target from the teacher, then
    cast the frozen nets (bf16 on GPU when --bf16). D's and a LoRA student's initialisations draw from torch's
    global RNG: seed it identically on every rank before calling this."""
    frozen_dtype = {(True, False): torch.bfloat16, (False, True): torch.float16}.get((cfg.bf16, cfg.fp16))
    frozen_dtype = frozen_dtype if frozen_dtype and device.type == "cuda" else torch.float32
    if cfg.student_lora_rank:
        student, target = make_lora_student(bundle.unet, cfg, consistency)
        bundle.unet.gradient_checkpointing = cfg.grad_checkpointing  # only passes that record gradients recompute
    else:  # the student records the boundary scalings it is trained with, so every sampler reads them from it
        student, target = (make_student(bundle.unet, consistency.w_embed_dim, consistency.timestep_scaling,
                                        consistency.sigma_data) for _ in range(2))
        student.gradient_checkpointing = cfg.grad_checkpointing
    student.train().requires_grad_(True)
    target.requires_grad_(False).eval()
    teacher = bundle.unet.to(frozen_dtype).requires_grad_(False).eval()
    bundle.vae.to(frozen_dtype).requires_grad_(False)
    bundle.text_encoder.to(frozen_dtype).requires_grad_(False)
    if cfg.channels_last:
        for m in (student, target, teacher):
            m.to(memory_format=torch.channels_last)
    disc = Discriminator(teacher, disc_cfg) if cfg.adv_weight > 0 else None
    with torch.no_grad():
        uncond = bundle.encode_prompts([""])
    ddp = DDP(student, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else None
    maybe_compile = torch.compile if cfg.compile else (lambda m: m)
    scalers = (torch.amp.GradScaler(device.type), torch.amp.GradScaler(device.type)) if cfg.fp16 else None
    teacher_fwd = maybe_compile(teacher)
    if cfg.student_lora_rank:  # one compiled UNet; each LoRAStudent selects its set outside it (Dynamo guards on it)
        student.call_through(teacher_fwd)
        target.call_through(teacher_fwd)
        student_fwd, target_fwd = ddp or student, target
    else:
        student_fwd, target_fwd = maybe_compile(ddp or student), maybe_compile(target)
    return Models(bundle, student, target, teacher, disc, NoiseSchedule(bundle.alphas_cumprod.to(device)), uncond,
                  student_fwd, target_fwd, teacher_fwd, ddp, scalers)


def make_lora_student(teacher: torch.nn.Module, cfg: TrainConfig, consistency: ConsistencyConfig):
    """(student, target) of SCott-LoRA: LCM-LoRA's adapters (lora.LoRAConfig's targets, --student-lora-rank/alpha)
    on the one teacher UNet, and the target's copy of them (the EMA; at --ema-decay 0 the online adapters)."""
    lora_cfg = LoRAConfig(rank=cfg.student_lora_rank, alpha=cfg.student_lora_alpha or float(cfg.student_lora_rank))
    adapters = Adapters.for_config(teacher, lora_cfg)
    scalings = dict(timestep_scaling=consistency.timestep_scaling, sigma_data=consistency.sigma_data)
    return (LoRAStudent(teacher, adapters, "student", **scalings),
            LoRAStudent(teacher, copy.deepcopy(adapters), "target", **scalings))


def build_optimizers(models: Models, cfg: TrainConfig, device):
    """AdamW for the student (paper); AdamW with β1 = 0 for D, as in PCM and most GAN trainers: momentum lags the
    moving fake distribution. Fused kernels on GPU."""
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(models.student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    d_opt = (torch.optim.AdamW(models.disc.parameters(), lr=cfg.d_lr, betas=(0.0, 0.999), fused=fused)
             if models.disc else None)
    return opt, d_opt


# ---- the optimisation step ---------------------------------------------------------------------------------------

class MicroBatch(NamedTuple):
    """One micro-batch as the step consumes it."""
    z0: torch.Tensor               # clean latents z0 = VAE(image) · 0.18215, (B, 4, h, w)
    cond: torch.Tensor             # c = CLIP(caption), (B, 77, 768)


class Fake(NamedTuple):
    """What D's step scores of one micro-batch: real z0 against the student's detached x̂0, at one t_d and noise."""
    z0: torch.Tensor               # the real latents
    x_student: torch.Tensor        # f_θ(z_tn), detached
    cond: torch.Tensor
    t_d: torch.Tensor              # (B,) D's timestep (used with --renoise)
    noise_d: torch.Tensor          # D's noise draw, shared by real and fake


@dataclass
class StepStats:
    loss_cd: torch.Tensor     # consistency loss, mean over the micro-batches
    loss_g: torch.Tensor      # generator hinge term (0 without D, or in D's warm-up)
    adv_weight: torch.Tensor  # λ_eff, the weight the generator term got, mean over the micro-batches (0 without it)
    loss_d: torch.Tensor      # discriminator hinge loss (0 without D, or when the step was skipped)
    grad_norm: torch.Tensor   # the student's gradient norm before clipping
    applied: bool             # False: a non-finite loss or gradient on some rank, nothing was updated
    overflow: bool = False    # --fp16: finite losses but overflowing gradients; the scaler lowered its scale


def encode_batch(batch: dict, bundle: SD15, device, autocast) -> MicroBatch:
    """Latents z0 (B, 4, h, w) and text embeddings (B, 77, 768), from the latent cache when it provides them."""
    with torch.no_grad(), autocast:
        if "latent" in batch:
            return MicroBatch(batch["latent"].to(device), batch["text_embedding"].to(device))
        z0 = bundle.vae.encode(batch["image"].to(device))
        return MicroBatch(z0.float(), bundle.encode_prompts(batch["caption"]))


def discriminator_view(z: torch.Tensor, t_d: torch.Tensor, noise_d: torch.Tensor, schedule: NoiseSchedule,
                       renoise: bool):
    """What D scores for a latent z (real z0 or fake x̂0): z itself at t = 0 (the paper's clean real/fake), or with
    `renoise` the forward process at t_d with noise_d: the caller passes the same t_d and noise_d for real and
    fake, so D compares the two at one noise level and one noise draw."""
    if renoise:
        return schedule.add_noise(z, noise_d.to(z.dtype), t_d), t_d
    return z, torch.zeros_like(t_d)


def student_last_layer(student: UNet | LoRAStudent) -> torch.nn.Parameter:
    """w_L of the adaptive weight: the weight of the student's last layer, as VQGAN takes the decoder's last conv.
    A full student: conv_out.weight. A LoRA student cannot train conv_out (LCM-LoRA's targets leave it out), so: the
    adapter of conv_out if there is one, else of the last adapted layer, which in unet.py's module order is the
    last adapted layer the forward runs (on SD1.5 up_blocks.3.attentions.2.proj_out, whose output is added to the
    features conv_out reads); of that adapter its `up` factor, the one that writes the layer's output (`down`'s
    gradient is zero while `up` is at its zero initialisation)."""
    if isinstance(student, LoRAStudent):
        adapters = student.adapters
        return adapters[key_of("conv_out") if key_of("conv_out") in adapters else list(adapters)[-1]].up.weight
    return student.conv_out.weight


def adaptive_adv_weight(loss_cd: torch.Tensor, loss_adv: torch.Tensor, last_layer: torch.Tensor, adv_weight: float,
                        delta: float = 1e-4) -> torch.Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, "Taming Transformers", eq. 7), detached:
        λ_eff = λ_adv · clamp(‖∇_{w_L} L_cd‖ / (‖∇_{w_L} L_adv‖ + δ), 0, 10⁴)
    (the clamp on the ratio, as taming-transformers' calculate_adaptive_weight). The adversarial gradient at the
    last layer w_L is then λ_adv times the consistency gradient there, whatever L_cd's scale or reduction. Both
    graphs are kept for the backward that follows; the norms are taken in fp32."""
    grad_cd, = torch.autograd.grad(loss_cd, last_layer, retain_graph=True)
    grad_adv, = torch.autograd.grad(loss_adv, last_layer, retain_graph=True)
    ratio = grad_cd.float().norm() / (grad_adv.float().norm() + delta)
    return adv_weight * ratio.clamp(0.0, 1e4).detach()


def student_backward(models: Models, micro_batches: list[MicroBatch], cfg: TrainConfig, consistency: ConsistencyConfig,
                     renoise: bool, generator: torch.Generator, autocast, adversarial: bool = True):
    """Backward of L_cd + λ L_adv over the micro-batches (gradients averaged over them), D frozen as a fixed
    critic; λ = --adv-weight, or with --adv-weighting adaptive adaptive_adv_weight's per micro-batch. With
    `adversarial` False (D's warm-up) the student gets L_cd alone and D is not run, but D's t_d and noise_d are
    still drawn for its own step. Returns L_cd, L_adv and λ averaged, detached, and per micro-batch the
    Fake that D's step scores."""
    n = len(micro_batches)
    zero = torch.zeros((), device=models.uncond.device)
    loss_cd, loss_g, adv_weight, fakes = zero.clone(), zero.clone(), zero.clone(), []
    if models.disc:
        models.disc.requires_grad_(False)  # the generator term must not train D
    for i, (z0, cond) in enumerate(micro_batches):
        # DDP all-reduces the gradients in backward; on every micro-batch but the last, no_sync skips that.
        sync = nullcontext() if models.ddp is None or i == n - 1 else models.ddp.no_sync()
        with sync, autocast:
            res = scott_loss(models.student_fwd, models.target_fwd, models.teacher_fwd, z0, cond, models.uncond,
                             models.schedule, consistency, generator)
            loss = res.loss
            if models.disc:
                t_d = torch.randint(0, models.schedule.num_timesteps, (z0.shape[0],), generator=generator,
                                    device=generator.device).to(z0.device)
                noise_d = torch.randn(z0.shape, generator=generator, device=generator.device).to(z0.device)
                if adversarial:
                    x_d, t_in = discriminator_view(res.x_student, t_d, noise_d, models.schedule, renoise)
                    g_loss = g_hinge_loss(models.disc(models.teacher_fwd, x_d, t_in, cond))
                    weight = cfg.adv_weight
                    if cfg.adv_weighting == "adaptive":
                        weight = adaptive_adv_weight(res.loss, g_loss, student_last_layer(models.student), weight)
                    loss = loss + weight * g_loss
                    loss_g += g_loss.detach() / n
                    adv_weight += weight / n
                fakes.append(Fake(z0, res.x_student.detach(), cond, t_d, noise_d))
            scaled(models, 0, loss / n).backward()
        loss_cd += res.loss.detach() / n
    if models.disc:
        models.disc.requires_grad_(True)
    return loss_cd, loss_g, adv_weight, fakes


def scaled(models: Models, which: int, loss: torch.Tensor) -> torch.Tensor:
    """The loss to call backward on: with --fp16, multiplied by the student's (0) or D's (1) gradient scale."""
    return models.scalers[which].scale(loss) if models.scalers else loss


def discriminator_backward(models: Models, fakes: list[Fake], renoise: bool, autocast) -> torch.Tensor:
    """Backward of D's hinge loss, real z0 vs the student's detached x̂0 (same t_d and noise_d for both); the
    gradients are averaged over micro-batches and ranks. Returns the loss, detached."""
    loss_d = torch.zeros((), device=models.uncond.device)
    for f in fakes:
        with autocast:
            logits = [models.disc(models.teacher_fwd, *discriminator_view(z, f.t_d, f.noise_d, models.schedule,
                                                                          renoise), f.cond)
                      for z in (f.z0, f.x_student)]                         # D(real), D(fake)
            d_loss = d_hinge_loss(*logits)
        scaled(models, 1, d_loss / len(fakes)).backward()
        loss_d += d_loss.detach() / len(fakes)
    average_gradients(models.disc)
    return loss_d


def train_step(models: Models, opt, d_opt, micro_batches: list[MicroBatch], cfg: TrainConfig,
               consistency: ConsistencyConfig, renoise: bool, generator: torch.Generator, autocast,
               step: int = 0) -> StepStats:
    """Optimisation step `step` (0-based) of SCott on `micro_batches`: the student's step (skipped on every rank if
    any rank saw a non-finite loss or gradient; no adversarial term in the first --d-warmup steps), D's step, then
    the EMA update of the target. The trainer's loop, the tests and tools/bench.py all run exactly this."""
    loss_cd, loss_g, adv_weight, fakes = student_backward(models, micro_batches, cfg, consistency, renoise, generator,
                                                          autocast, adversarial=step >= cfg.d_warmup)
    scaler, d_scaler = models.scalers or (None, None)
    if scaler:
        scaler.unscale_(opt)  # clip and check the true gradients
    grad_norm = torch.nn.utils.clip_grad_norm_(models.student.parameters(), cfg.grad_clip)
    bad = all_reduce_max(torch.stack([~torch.isfinite(loss_cd + loss_g), ~torch.isfinite(grad_norm)]).float())
    bad_loss, bad_grad = bad.tolist()  # the one host sync of the step: every rank takes the same branch
    if bad_loss or bad_grad:
        if scaler:
            scaler.update()  # lowers the scale: unscale_ recorded the overflow
        opt.zero_grad(set_to_none=True)
        return StepStats(loss_cd, loss_g, adv_weight, torch.zeros_like(loss_cd), grad_norm, applied=False,
                         overflow=bool(scaler and not bad_loss))
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)

    loss_d = torch.zeros_like(loss_cd)
    if models.disc:
        loss_d = discriminator_backward(models, fakes, renoise, autocast)
        if d_scaler:
            d_scaler.unscale_(d_opt)
        torch.nn.utils.clip_grad_norm_(models.disc.parameters(), cfg.grad_clip)
        if d_scaler:
            d_scaler.step(d_opt)  # skips the step itself if D's gradients overflowed
            d_scaler.update()
        else:
            d_opt.step()
        d_opt.zero_grad(set_to_none=True)

    ema_update(models.target, models.student, consistency.ema_decay)  # θ⁻ ← μ θ⁻ + (1 − μ) θ
    return StepStats(loss_cd, loss_g, adv_weight, loss_d, grad_norm, applied=True)


# ---- data and sample grids ---------------------------------------------------------------------------------------

def make_batches(cfg: TrainConfig, data_cfg: DataConfig, rank, world, start_batch):
    """The micro-batch stream of this rank (data.make_loader), from batch `start_batch` on."""
    if not cfg.data:
        raise SystemExit("--data is required with --model: an image folder, tar shards or a latent cache.")
    try:
        return make_loader(data_cfg, cfg.micro_batch, rank, world, start_batch=start_batch, seed=cfg.seed)
    except (ValueError, OSError, RuntimeError) as e:  # data.py's checks of the source, before any model is loaded
        raise SystemExit(f"--data: {e}") from None


def write_sample_grid(path, models: Models, prompts, resolution, consistency: ConsistencyConfig, autocast):
    """Fixed prompts and seeds at 1, 2 and 4 steps, one row per step count (sample.py does the work), under the
    step's autocast: the student is fp32 while the text encoder and the noise may be bf16."""
    models.student.eval()
    with autocast:
        rows = [generate(models.bundle, models.student, models.schedule, prompts, steps=s,
                         guidance=(consistency.w_min + consistency.w_max) / 2, height=resolution,
                         width=resolution, seed=0)[0].float() for s in (1, 2, 4)]
    models.student.train()
    save_grid(torch.cat(rows), path, columns=len(prompts), metadata={"prompts": json.dumps(prompts),
                                                                       "rows": "1, 2, 4 steps", "seed": "0"})


def cache_latents(cfg: TrainConfig, data_cfg: DataConfig, device):
    """Run the VAE and CLIP over --data once (centre crops, bf16 on GPU) so training reads latents instead."""
    if not cfg.data:
        raise SystemExit("--cache-to needs --data (the images to encode).")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bundle = load_sd15(model_path(cfg.model), tokenizer=cfg.tokenizer or None, device=device, dtype=dtype)
    with torch.no_grad():
        manifest = build_latent_cache(data_cfg, lambda images: bundle.vae.encode(images.to(device, dtype)).cpu(),
                                      lambda captions: bundle.encode_prompts(captions).cpu(), cfg.cache_to)
    print(f"wrote a latent cache of {manifest.get('count')} samples to {cfg.cache_to}; train with --data {cfg.cache_to}")


# ---- main: set up the run, build the models, then the loop ------------------------------------------------------

@dataclass
class Run:
    """Where this process stands in the run: its configs, its rank, the batch layout and --out."""
    cfg: TrainConfig
    consistency: ConsistencyConfig
    disc_cfg: DiscriminatorConfig
    data_cfg: DataConfig
    rank: int
    world: int
    device: torch.device
    accumulation: int              # micro-batches per optimisation step on each rank
    out: Path
    model: Path
    grid_prompts: list[str]        # the training grids' prompts: the model folder's own, else SD1.5's
    trackers: Trackers | None = None  # rank 0's --log-to trackers, once the run has started

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def autocast(self):
        if not (self.cfg.bf16 or self.cfg.fp16):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.float16 if self.cfg.fp16 else torch.bfloat16)

    def configs(self) -> dict:
        """The effective configuration, as every checkpoint records it (run_folder.describe_run)."""
        return describe_run({"train": self.cfg, "consistency": self.consistency, "discriminator": self.disc_cfg,
                             "data": self.data_cfg}, self.model, self.world, self.accumulation)


def start_run(cfg: TrainConfig, consistency, disc_cfg, data_cfg) -> Run:
    """The cheap part of the set-up, before any model is loaded: deterministic kernels, the process group, the
    batch layout (micro-batch × accumulation × world = global batch), the --model path."""
    if cfg.deterministic:  # cuBLAS reads this variable when it starts, so before any CUDA work
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    rank, world, device = setup_distributed()
    model = model_path(cfg.model)
    try:
        check_model(model, cfg.tokenizer or None)
    except CheckpointError as e:
        raise SystemExit(f"--model {e}") from None
    check_paths(cfg, model)  # an --out or --cache-to that is, holds or lies inside an input
    tracker_names(cfg.log_to)  # an unknown tracker or a missing package, before anything is loaded
    if cfg.micro_batch == 0:  # no accumulation: each rank takes an equal share of the global batch
        cfg = dataclasses.replace(cfg, micro_batch=max(1, cfg.global_batch // world))
    if cfg.global_batch % (cfg.micro_batch * world):
        raise SystemExit(f"--global-batch {cfg.global_batch} is not a multiple of micro-batch {cfg.micro_batch} × "
                         f"world size {world}; choose --micro-batch so that it is.")
    prompts = (read_prompts(cfg.sample_prompts) if cfg.sample_prompts else
               model_settings(model, "sample").get("grid_prompts", SD15_SAMPLE_PROMPTS))
    return Run(cfg, consistency, disc_cfg, data_cfg, rank, world, device,
               cfg.global_batch // (cfg.micro_batch * world), Path(cfg.out), model, prompts)


def read_prompts(path: str) -> list[str]:
    """--sample-prompts: one prompt a line, blank lines and # comments left out; SystemExit if it has none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"--sample-prompts {path}: cannot read it ({e}); pass a UTF-8 text file, one prompt a line.")
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise SystemExit(f"--sample-prompts {path}: holds no prompt (one a line; # starts a comment).")
    return prompts


def open_out(run: Run):
    """Prepare and lock --out (rank 0; a refusal ends every rank with the same one-line message) and find the
    checkpoint to resume from, refusing a change of what is trained; the checkpoints after it are set aside
    (another branch of the run, or damaged: --resume auto must not return to them). Returns the resume (or None)
    and the step the run starts at."""
    on_rank_zero(prepare_out, run.out, run.cfg)
    if dist.is_initialized():
        dist.barrier()  # every rank looks for checkpoints once rank 0 has cleaned --out up
    resume = find_resume(run.cfg, run.out, run.master)
    if resume:
        saved = {"run": {"world": len(resume.state["rng"])}, **resume.state["config"]}  # older ones lack "run"
        compare_configs(saved, run.configs(), run.cfg.allow_config_change, run.master)
    start_step = resume.state["step"] if resume else 0
    later = [folder for step, folder in list_checkpoints(run.out) if step > start_step] if run.master else []
    if later:
        set_aside(run.out, later, f"--resume from step {start_step}: the later checkpoints in --out")
    return resume, start_step


def catch_stop_signals() -> dict:
    """A scheduler's SIGTERM (or Ctrl-C's SIGINT) reaches the whole process group: each rank notes it, finishes its
    step, checkpoints and exits 0 (data.py's workers ignore both signals, so the data keeps flowing until then)."""
    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
    return stop


def print_summary(run: Run, models: Models, start_step: int, resume):
    """Rank 0's start-up lines: the model, the batch layout, D and SCott's settings."""
    cfg, c = run.cfg, run.consistency
    n_params = sum(p.numel() for p in models.student.parameters())
    print(f"model {run.model}, student {n_params / 1e6:.1f}M params, device {run.device}, world {run.world}, "
          f"autocast {'fp16 (gradient scalers)' if cfg.fp16 else 'bf16' if cfg.bf16 else 'off'}")
    if isinstance(models.student, LoRAStudent):
        print(f"LoRA student: rank {cfg.student_lora_rank} on {len(models.student.adapters)} layers of the "
              f"teacher, {100 * n_params / sum(p.numel() for p in models.teacher.parameters()):.2f}% of the UNet; "
              f"no ω input (the teacher's ω ∈ [{c.w_min}, {c.w_max}])")
    print(f"global batch {cfg.global_batch} = micro-batch {cfg.micro_batch} × accumulation {run.accumulation} × "
          f"world {run.world}; steps {start_step} -> {cfg.steps}")
    if models.disc:
        print(f"discriminator: LoRA rank {run.disc_cfg.lora_rank} on {len(models.disc.targets)} decoder layers + "
              f"head, trainable fraction {100 * models.disc.trainable_fraction(models.teacher):.2f}% of the UNet")
    print(f"SCott: k={c.k}, h={c.substeps}, eta={c.eta}, w∈[{c.w_min}, {c.w_max}], ema={c.ema_decay}, "
          f"loss={c.loss}; resume from {resume.folder if resume else None}", flush=True)


def log_progress(run: Run, step: int, stats: StepStats, lr: float, per_step: float, counters: dict):
    """The progress line (rank 0 prints it and appends it to out/log.jsonl); the skipped images are summed over
    the ranks, so every rank calls this."""
    skipped = torch.tensor(float(counters["skipped_images"]), device=run.device)
    if dist.is_initialized():  # every rank reads its own share of the data: report the sum
        dist.all_reduce(skipped)
    if not run.master:
        return
    record = {"step": step, "loss_cd": stats.loss_cd.item(), "loss_g": stats.loss_g.item(),
              "adv_weight": stats.adv_weight.item(), "loss_d": stats.loss_d.item(), "lr": lr,
              "grad_norm": stats.grad_norm.item(), "images_per_s": run.cfg.global_batch / per_step,
              "eta_s": per_step * (run.cfg.steps - step), "skipped_images": int(skipped.item()),
              "nonfinite_steps": counters["nonfinite_steps"]}
    print(f"step {step}/{run.cfg.steps} | cd {record['loss_cd']:.5f} | g {record['loss_g']:.3f} | "
          f"λ {record['adv_weight']:.3g} | d {record['loss_d']:.3f} | lr {record['lr']:.2e} | "
          f"gnorm {record['grad_norm']:.3f} | {record['images_per_s']:.1f} img/s | "
          f"skipped {record['skipped_images']} | eta {record['eta_s'] / 60:.1f} min", flush=True)
    with open(run.out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if run.trackers:
        run.trackers.log(step, record)


def train(run: Run, models: Models, opt, d_opt, generator, loader, counters: dict, start_step: int, stop: dict,
          save) -> str | None:
    """The loop, from `start_step` to --steps (or a signal, or --stop-after): micro-batches -> train_step -> log,
    grid, checkpoint. Returns why it stopped early if that was a failure, else None."""
    cfg = run.cfg
    nonfinite_in_a_row, t_last, step = 0, time.time(), start_step
    while step < cfg.steps:
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))   # linear warm-up, then constant
        for group in opt.param_groups:
            group["lr"] = lr
        micro_batches = []
        for _ in range(run.accumulation):
            batch = next(loader)
            counters["skipped_images"] = batch.get("skipped", counters["skipped_images"])
            micro_batches.append(encode_batch(batch, models.bundle, run.device, run.autocast))

        stats = train_step(models, opt, d_opt, micro_batches, cfg, run.consistency, run.disc_cfg.renoise,
                           generator, run.autocast, step)

        if stats.overflow:  # --fp16: the gradients overflowed at this scale; the scaler lowered it, try again
            counters["overflow_steps"] = counters.get("overflow_steps", 0) + 1
            continue
        if not stats.applied:  # a non-finite loss or gradient on some rank: nothing was updated
            counters["nonfinite_steps"] += 1
            nonfinite_in_a_row += 1
            if run.master:
                print(f"step {step}: non-finite loss or gradient, step skipped ({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= cfg.max_nonfinite:
                save(step)
                return (f"stopping: {nonfinite_in_a_row} non-finite steps in a row at step {step}. The last good "
                        f"weights are in {run.out}/latest. Lower --lr, check the data, or disable --bf16.")
            continue
        nonfinite_in_a_row = 0
        step += 1
        if cfg.check_sync_every and step % cfg.check_sync_every == 0:
            assert_replicas_in_sync(step, student=models.student, target=models.target,
                                    **({"discriminator": models.disc} if models.disc else {}))
        if step % cfg.log_every == 0 or step == cfg.steps:
            dt, t_last = time.time() - t_last, time.time()
            log_progress(run, step, stats, lr, dt / (step % cfg.log_every or cfg.log_every), counters)
        if run.master and cfg.sample_every and step % cfg.sample_every == 0:
            grid = run.out / f"samples-{step:07d}.png"
            write_sample_grid(grid, models, run.grid_prompts, run.data_cfg.resolution, run.consistency, run.autocast)
            if run.trackers:
                run.trackers.image(step, "samples", grid)

        # A signal may reach one rank only: every rank stops at the same step boundary.
        signalled = all_reduce_max(torch.tensor(float(stop["signal"] is not None), device=run.device)).item() > 0
        stopping = signalled or bool(cfg.stop_after and step - start_step >= cfg.stop_after)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
            save(step)
        if stopping:
            if run.master:
                print(f"stopped at step {step} ({'signal' if signalled else '--stop-after'}); resume with "
                      f"--resume auto --out {run.out}", flush=True)
            return None
    return None


def main(argv=None):
    # -- configuration and --out; cheap checks first, so a wrong path or empty data fails before any model loads
    run = start_run(*parse_args(argv))
    if run.cfg.cache_to:
        return cache_latents(run.cfg, run.data_cfg, run.device)
    resume, start_step = open_out(run)
    loader = make_batches(run.cfg, run.data_cfg, run.rank, run.world, start_batch=start_step * run.accumulation)
    stop = catch_stop_signals()

    # -- models, optimisers, random streams; then the saved state, if resuming
    torch.manual_seed(run.cfg.seed)  # the same on every rank: D's LoRA initialisation must be identical everywhere
    generator = torch.Generator(run.device).manual_seed(run.cfg.seed + run.rank)  # all of SCott's noise
    bundle = load_sd15(run.model, tokenizer=run.cfg.tokenizer or None, device=run.device)
    models = build_models(bundle, run.cfg, run.consistency, run.disc_cfg, run.device, run.world)
    opt, d_opt = build_optimizers(models, run.cfg, run.device)
    counters = {"skipped_images": 0, "nonfinite_steps": 0}
    if resume:
        restore(resume, models, opt, d_opt, generator, run.cfg, run.rank, run.world, run.device, run.master)
        counters = resume.state["counters"]
    configs = run.configs()
    if run.master:
        print_summary(run, models, start_step, resume)
        if run.cfg.log_to:
            run.trackers = Trackers(tracker_names(run.cfg.log_to), run.out, configs, start_step)
    save = lambda step: save_checkpoint(run.out, step, models, opt, d_opt, generator, counters, configs,  # noqa: E731
                                        run.cfg.keep_checkpoints, run.rank)
    del resume  # its CPU copies of the student and target are no longer needed

    # -- the loop
    failure = train(run, models, opt, d_opt, generator, loader, counters, start_step, stop, save)

    # DDP's reducer holds the process group. Freed after destroy_process_group, it would tear the group down while
    # holding the GIL, which can deadlock gloo's worker thread at exit (pytorch/pytorch#56297): free it first.
    if run.trackers:
        run.trackers.close()
    del models, save
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
    if failure:
        raise SystemExit(failure)


if __name__ == "__main__":
    sys.exit(main())
