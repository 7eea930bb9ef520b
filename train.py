"""SCott distillation of SD1.5 (or of the shipped toy model): torchrun DDP, bf16 autocast, resumable.

    torchrun --nproc_per_node=4 train.py --model /path/to/sd15 --data /path/to/shards   # the paper's run
    python train.py --model /path/to/sd15 --data /path/to/images --micro-batch 4        # one GPU, accumulates to 40
    torchrun --nproc_per_node=2 train.py                                                # the toy world, on CPU

One optimisation step (DESIGN.md, "One SCott training step"), per micro-batch:
    z0 = VAE(image) · 0.18215,  c = CLIP(caption),  c_null = CLIP("")
    consistency loss: student f_θ(z_tn) vs the EMA target at the teacher's SDE transition t_n -> t_m (consistency.py)
    adversarial loss: λ_adv · hinge generator term of D(f_θ(z_tn))          (discriminator.py)
then an AdamW step of the student, a hinge step of D on real z0 vs the detached fake, and the EMA update.
Three UNets are alive: the student (fp32 weights, trained), its EMA target (fp32, frozen) and the teacher (frozen;
bf16 on GPU), which also serves as D's backbone with D's LoRA delta switched on.
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import atomic_write
from consistency import ConsistencyConfig, ema_update, scott_loss
from data import DataConfig, build_latent_cache, make_loader
from discriminator import Discriminator, DiscriminatorConfig, d_hinge_loss, g_hinge_loss
from sd15 import load_sd15
from sde_solver import NoiseSchedule
from unet import load_unet, make_student, save_unet

TOY_MODEL = Path(__file__).resolve().parent / "toy"


@dataclass
class TrainConfig:
    model: str = ""               # SD1.5 diffusers folder or single file; "" = the shipped toy model (toy/)
    tokenizer: str = ""           # tokenizer folder, needed with a single-file --model
    data: str = ""                # image folder, tar shards or latent cache; "" = the toy world's synthetic data
    out: str = "runs/scott"       # checkpoints, log.jsonl and sample grids go here
    resume: str = ""              # "auto" = the latest checkpoint in --out if there is one; or a checkpoint folder
    cache_to: str = ""            # encode --data with the model's VAE and text encoder into a latent cache here, exit
    steps: int = 40_000           # total optimisation steps (paper: 40K)
    stop_after: int = 0           # stop (with a checkpoint) after this many steps in this invocation; 0 = never
    global_batch: int = 40        # paper: 40 = 4 GPUs × 10
    micro_batch: int = 10         # per GPU per forward; accumulation = global / (micro × world); 0 = global / world
    lr: float = 8e-6              # student (paper)
    d_lr: float = 2e-5            # discriminator (paper)
    warmup: int = 100             # linear learning-rate warm-up steps, then constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    adv_weight: float = 0.4       # λ_adv (paper); 0 switches the discriminator off entirely
    seed: int = 0
    bf16: bool = torch.cuda.is_available()   # autocast bf16, frozen nets stored in bf16
    compile: bool = False         # torch.compile the student, target and teacher
    grad_checkpointing: bool = False
    channels_last: bool = False
    log_every: int = 10
    ckpt_every: int = 1000
    sample_every: int = 1000      # PNG grid of fixed prompts at 1, 2 and 4 steps; 0 = never
    keep_checkpoints: int = 2
    max_nonfinite: int = 5        # stop after this many non-finite steps in a row
    check_sync_every: int = 0     # every N steps assert that all ranks hold identical weights (a DDP sanity check)


# The toy world (toy/, or any pixel-space model): what changes unless set explicitly on the command line. A 1.7M-
# parameter UNet learns faster than SD1.5's at the paper's learning rates, and a rank-128 LoRA would be most of it.
# No adversarial term: on the toy it cost quality at 2 and 4 steps at every weight tried (README, "The toy world").
# Micro-batch 0: the global batch split over the ranks (no accumulation), so any `torchrun` of 1, 2, 4... works.
TOY_DEFAULTS = dict(steps=400, global_batch=16, micro_batch=0, lr=1e-4, d_lr=1e-4, warmup=20, adv_weight=0.0,
                    ckpt_every=200, sample_every=200, log_every=20, resolution=32, lora_rank=4, lora_alpha=4.0,
                    w_min=2.0, w_max=6.0)
SAMPLE_PROMPTS = {"toy": ["a red circle on the left", "a blue square at the top", "a green triangle on the right"],
                  "sd15": ["a photo of an astronaut riding a horse on the moon", "a watercolor painting of a fox",
                           "a bowl of ramen, studio lighting, 85mm"]}


# ---- configuration --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    """One argparse group per config dataclass; flags are the field names (--micro-batch, --eta, --lora-rank...)."""
    groups = {"train": TrainConfig, "consistency": ConsistencyConfig, "discriminator": DiscriminatorConfig,
              "data": DataConfig}
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for title, cls in groups.items():
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if title == "data" and f.name == "path":
                continue  # that is --data
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, bool):
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})")
            else:
                group.add_argument(flag, type=type(default), default=None, help=f"(default {default})")
    args = vars(parser.parse_args(argv))
    explicit = {k for k, v in args.items() if v is not None}
    if is_pixel_space(Path(args["model"]) if args["model"] else TOY_MODEL):
        args.update({k: v for k, v in TOY_DEFAULTS.items() if k not in explicit})
    build = lambda cls, **extra: cls(**{f.name: args[f.name] for f in dataclasses.fields(cls)  # noqa: E731
                                        if args.get(f.name) is not None}, **extra)
    return (build(TrainConfig), build(ConsistencyConfig), build(DiscriminatorConfig),
            build(DataConfig, path=args["data"] or ""))


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


def average_gradients(module: torch.nn.Module):
    """Mean of the gradients over ranks, for D (its forward runs inside the teacher's, outside any DDP wrapper)."""
    if dist.is_initialized():
        for p in module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


# ---- checkpoints -----------------------------------------------------------------------------------------------

def save_checkpoint(out: Path, step: int, student, target, disc, opt, d_opt, generator, counters, configs,
                    keep: int, rank: int):
    """Write out/step-N atomically (temp folder + rename), then point out/latest at it (temp file + rename).

    Every rank's RNG state is gathered so a resumed run draws the same noise on every rank."""
    rng = {"generator": generator.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    all_rng = [None] * dist.get_world_size() if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(all_rng, rng)
    if rank == 0:
        final, tmp = out / f"step-{step:07d}", out / f".tmp-step-{step:07d}"
        save_unet(student, tmp / "student")
        save_unet(target, tmp / "target")
        torch.save({"step": step, "optimizer": opt.state_dict(), "d_optimizer": d_opt.state_dict() if d_opt else None,
                    "discriminator": disc.state_dict() if disc else None, "rng": all_rng, "counters": counters,
                    "config": {k: dataclasses.asdict(c) for k, c in configs.items()}}, tmp / "state.pt")
        if final.exists():  # a re-run of the same step (e.g. a stop right after a periodic checkpoint)
            _remove(final)
        os.replace(tmp, final)
        atomic_write(out / "latest", lambda tmp: tmp.write_text(final.name))
        for old in sorted(out.glob("step-*"))[:-keep]:
            _remove(old)
        print(f"saved checkpoint {final}", flush=True)
    if dist.is_initialized():
        dist.barrier()


def _remove(folder: Path):
    for p in sorted(folder.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    folder.rmdir()


def find_resume(cfg: TrainConfig) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        latest = Path(cfg.out) / "latest"
        return Path(cfg.out) / latest.read_text().strip() if latest.is_file() else None
    path = Path(cfg.resume)
    if not (path / "state.pt").is_file():
        raise SystemExit(f"--resume {path}: not a checkpoint folder (no state.pt); pass a step-N folder or 'auto'.")
    return path


# ---- the training step -------------------------------------------------------------------------------------------

def encode_batch(batch, bundle, device, autocast):
    """Latents z0 (B, 4, h, w) and text embeddings (B, 77, 768), from the latent cache when it provides them."""
    with torch.no_grad(), autocast:
        if "latent" in batch:
            return batch["latent"].to(device), batch["text_embedding"].to(device)
        z0 = bundle.vae.encode(batch["image"].to(device))
        return z0.float(), bundle.encode_prompts(batch["caption"])


def discriminator_inputs(z0, generator, n_timesteps=1000):
    """Shared timestep and noise for real and fake (used only when D re-noises its inputs)."""
    t = torch.randint(0, n_timesteps, (z0.shape[0],), generator=generator, device=z0.device)
    return t, torch.randn(z0.shape, generator=generator, device=z0.device, dtype=z0.dtype)


def main(argv=None):
    cfg, ccfg, dcfg, data_cfg = parse_args(argv)
    rank, world, device = setup_distributed()
    master = rank == 0
    out = Path(cfg.out)

    # Cheap checks first: a wrong path or an empty dataset fails here, before any model is loaded.
    model_path = Path(cfg.model) if cfg.model else TOY_MODEL
    if not model_path.exists():
        raise SystemExit(f"--model {model_path}: no such file or folder (an SD1.5 diffusers folder or single file).")
    if cfg.micro_batch == 0:  # no accumulation: each rank takes an equal share of the global batch
        cfg = dataclasses.replace(cfg, micro_batch=max(1, cfg.global_batch // world))
    if cfg.global_batch % (cfg.micro_batch * world):
        raise SystemExit(f"--global-batch {cfg.global_batch} is not a multiple of micro-batch {cfg.micro_batch} × "
                         f"world size {world}; choose --micro-batch so that it is.")
    accumulation = cfg.global_batch // (cfg.micro_batch * world)
    if cfg.cache_to:
        return cache_latents(cfg, data_cfg, model_path, device)
    resume_from = find_resume(cfg)
    start_step = 0 if resume_from is None else torch.load(resume_from / "state.pt", weights_only=True)["step"]
    loader = make_batches(cfg, data_cfg, rank, world, start_batch=start_step * accumulation)

    torch.manual_seed(cfg.seed)  # the same on every rank: D's LoRA initialisation must be identical everywhere
    generator = torch.Generator(device).manual_seed(cfg.seed + rank)  # all of SCott's noise goes through it
    frozen_dtype = torch.bfloat16 if cfg.bf16 and device.type == "cuda" else torch.float32
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()

    # Models: load in fp32 once, make the student from it, then cast the frozen copies.
    bundle = load_sd15(model_path, tokenizer=cfg.tokenizer or None, device=device)
    student = make_student(bundle.unet, ccfg.w_embed_dim)
    target = make_student(bundle.unet, ccfg.w_embed_dim).requires_grad_(False).eval()
    if resume_from is not None:  # load into the same modules, so the optimiser's parameter order is unchanged
        student.load_state_dict(load_unet(resume_from / "student", device).state_dict())
        target.load_state_dict(load_unet(resume_from / "target", device).state_dict())
    teacher = bundle.unet.to(frozen_dtype).requires_grad_(False).eval()
    bundle.vae.to(frozen_dtype).requires_grad_(False)
    bundle.text_encoder.to(frozen_dtype)
    student.train().requires_grad_(True)
    student.gradient_checkpointing = cfg.grad_checkpointing
    if cfg.channels_last:
        for m in (student, target, teacher):
            m.to(memory_format=torch.channels_last)
    schedule = NoiseSchedule(bundle.alphas_cumprod.to(device))
    disc = Discriminator(teacher, dcfg) if cfg.adv_weight > 0 else None

    fused = device.type == "cuda"
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    # β1 = 0 for the discriminator, as in PCM and most GAN trainers: momentum lags the moving fake distribution.
    d_opt = (torch.optim.AdamW(disc.parameters(), lr=cfg.d_lr, betas=(0.0, 0.999), fused=fused) if disc else None)
    counters = {"skipped_images": 0, "nonfinite_steps": 0}
    if resume_from is not None:
        state = torch.load(resume_from / "state.pt", weights_only=True, map_location=device)
        opt.load_state_dict(state["optimizer"])
        if disc:
            disc.load_state_dict(state["discriminator"])
            d_opt.load_state_dict(state["d_optimizer"])
        rng = state["rng"][rank]
        generator.set_state(rng["generator"].cpu() if device.type == "cpu" else rng["generator"])
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu())
        counters = state["counters"]

    student_ddp = DDP(student, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else student
    run_student, run_target, run_teacher = student_ddp, target, teacher
    if cfg.compile:
        run_student, run_target, run_teacher = (torch.compile(m) for m in (student_ddp, target, teacher))
    with torch.no_grad():
        uncond = bundle.encode_prompts([""])  # (1, 77, 768), broadcast over the batch

    if master:
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in student.parameters())
        kind = "toy world" if is_pixel_space(model_path) else "SD1.5"
        print(f"model {model_path} ({kind}), student {n_params / 1e6:.1f}M params, device {device}, world {world}, "
              f"bf16 {cfg.bf16}")
        print(f"global batch {cfg.global_batch} = micro-batch {cfg.micro_batch} × accumulation {accumulation} × "
              f"world {world}; steps {start_step} -> {cfg.steps}")
        if disc:
            print(f"discriminator: LoRA rank {dcfg.lora_rank} on {len(disc.targets)} decoder layers + head, "
                  f"trainable fraction {100 * disc.trainable_fraction(teacher):.2f}% of the UNet")
        print(f"SCott: k={ccfg.k}, h={ccfg.substeps}, eta={ccfg.eta}, w∈[{ccfg.w_min}, {ccfg.w_max}], "
              f"ema={ccfg.ema_decay}, loss={ccfg.loss}; resume from {resume_from}", flush=True)

    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))

    configs = {"train": cfg, "consistency": ccfg, "discriminator": dcfg, "data": data_cfg}
    save = lambda step: save_checkpoint(out, step, student, target, disc, opt, d_opt, generator,  # noqa: E731
                                        counters, configs, cfg.keep_checkpoints, rank)
    nonfinite_in_a_row, t_last, step = 0, time.time(), start_step
    while step < cfg.steps:
        lr_scale = min(1.0, (step + 1) / max(1, cfg.warmup))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_scale

        # -- student step: consistency + adversarial loss, accumulated over micro-batches
        fakes, cd_sum, g_sum = [], torch.zeros((), device=device), torch.zeros((), device=device)
        for micro in range(accumulation):
            batch = next(loader)
            counters["skipped_images"] = batch.get("skipped", counters["skipped_images"])
            z0, cond = encode_batch(batch, bundle, device, autocast)
            sync = micro == accumulation - 1 or world == 1
            with (nullcontext() if sync else student_ddp.no_sync()), autocast:
                res = scott_loss(run_student, run_target, run_teacher, z0, cond, uncond, schedule, ccfg, generator)
                loss = res.loss
                if disc:
                    t_d, noise_d = discriminator_inputs(z0, generator)
                    disc.requires_grad_(False)  # D is a fixed critic in the student's step
                    g_loss = g_hinge_loss(disc(run_teacher, res.x_student, cond, t_d, noise_d, schedule.alphas_cumprod))
                    disc.requires_grad_(True)
                    loss = loss + cfg.adv_weight * g_loss
                    g_sum += g_loss.detach() / accumulation
                    fakes.append((z0, res.x_student.detach(), cond, t_d, noise_d))
                (loss / accumulation).backward()
            cd_sum += res.loss.detach() / accumulation
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)

        # Non-finite loss or gradient on any rank, or a signal on any rank: every rank decides the same way.
        flags = all_reduce_max(torch.stack([(~torch.isfinite(cd_sum + g_sum + grad_norm)).float(),
                                            torch.tensor(float(stop["signal"] is not None), device=device)]))
        if flags[0] > 0:
            opt.zero_grad(set_to_none=True)
            counters["nonfinite_steps"] += 1
            nonfinite_in_a_row += 1
            if master:
                print(f"step {step}: non-finite loss or gradient, step skipped ({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= cfg.max_nonfinite:
                save(step)
                raise SystemExit(f"stopping: {nonfinite_in_a_row} non-finite steps in a row at step {step}. The last "
                                 f"good weights are in {out}/latest. Lower --lr, check the data, or disable --bf16.")
            continue
        nonfinite_in_a_row = 0
        opt.step()
        opt.zero_grad(set_to_none=True)

        # -- discriminator step: real z0 vs the student's detached prediction
        d_sum = torch.zeros((), device=device)
        if disc:
            for z0, fake, cond, t_d, noise_d in fakes:
                with autocast:
                    d_loss = d_hinge_loss(disc(run_teacher, z0, cond, t_d, noise_d, schedule.alphas_cumprod),
                                          disc(run_teacher, fake, cond, t_d, noise_d, schedule.alphas_cumprod))
                (d_loss / accumulation).backward()
                d_sum += d_loss.detach() / accumulation
            average_gradients(disc)
            torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg.grad_clip)
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)

        ema_update(target, student, ccfg.ema_decay)
        step += 1
        if cfg.check_sync_every and step % cfg.check_sync_every == 0:
            assert_replicas_in_sync(step, student=student, target=target, **({"discriminator": disc} if disc else {}))

        if step % cfg.log_every == 0 or step == cfg.steps:
            skipped = torch.tensor(float(counters["skipped_images"]), device=device)
            if dist.is_initialized():  # every rank reads its own share of the data: report the sum
                dist.all_reduce(skipped)
        if master and (step % cfg.log_every == 0 or step == cfg.steps):
            dt, t_last = time.time() - t_last, time.time()
            steps_done = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            per_step = dt / steps_done
            record = {"step": step, "loss_cd": cd_sum.item(), "loss_g": g_sum.item(), "loss_d": d_sum.item(),
                      "lr": cfg.lr * lr_scale, "grad_norm": grad_norm.item(),
                      "images_per_s": cfg.global_batch / per_step, "eta_s": per_step * (cfg.steps - step),
                      "skipped_images": int(skipped.item()), "nonfinite_steps": counters["nonfinite_steps"]}
            print(f"step {step}/{cfg.steps} | cd {record['loss_cd']:.5f} | g {record['loss_g']:.3f} | "
                  f"d {record['loss_d']:.3f} | lr {record['lr']:.2e} | gnorm {record['grad_norm']:.3f} | "
                  f"{record['images_per_s']:.1f} img/s | skipped {record['skipped_images']} | "
                  f"eta {record['eta_s'] / 60:.1f} min", flush=True)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if master and cfg.sample_every and step % cfg.sample_every == 0:
            write_sample_grid(out / f"samples-{step:07d}.png", bundle, student, schedule,
                              SAMPLE_PROMPTS["toy" if is_pixel_space(model_path) else "sd15"], data_cfg.resolution, ccfg)
        stopping = flags[1] > 0 or (cfg.stop_after and step - start_step >= cfg.stop_after)
        if step % cfg.ckpt_every == 0 or step == cfg.steps or stopping:
            save(step)
        if stopping:
            if master:
                print(f"stopped at step {step} ({'signal' if flags[1] > 0 else '--stop-after'}); resume with "
                      f"--resume auto --out {out}", flush=True)
            break
    if dist.is_initialized():
        dist.destroy_process_group()


def cache_latents(cfg: TrainConfig, data_cfg: DataConfig, model_path, device):
    """Run the VAE and CLIP over --data once (centre crops, bf16 on GPU) so training reads latents instead."""
    if not cfg.data:
        raise SystemExit("--cache-to needs --data (the images to encode).")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bundle = load_sd15(model_path, tokenizer=cfg.tokenizer or None, device=device, dtype=dtype)
    with torch.no_grad():
        manifest = build_latent_cache(data_cfg, lambda images: bundle.vae.encode(images.to(device, dtype)).cpu(),
                                      lambda captions: bundle.encode_prompts(captions).cpu(), cfg.cache_to)
    print(f"wrote a latent cache of {manifest.get('count')} samples to {cfg.cache_to}; train with --data {cfg.cache_to}")


def is_pixel_space(model_path: Path) -> bool:
    """The toy world's models are pixel-space folders (model_index.json says so); SD1.5 never is."""
    index = model_path / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("pixel_space", False)


def make_batches(cfg: TrainConfig, data_cfg: DataConfig, rank, world, start_batch):
    """The micro-batch stream: the toy world's generator when --data is not given, else data.py's loader."""
    if not cfg.data:
        if not is_pixel_space(Path(cfg.model) if cfg.model else TOY_MODEL):
            raise SystemExit("--data is required with --model (the synthetic data only fits the toy model).")
        from toy import make_toy_loader
        return make_toy_loader(cfg.micro_batch, rank=rank, world_size=world, start_batch=start_batch, seed=cfg.seed)
    return make_loader(data_cfg, cfg.micro_batch, rank, world, start_batch=start_batch)


def write_sample_grid(path, bundle, student, schedule, prompts, resolution, ccfg):
    """Fixed prompts and seeds at 1, 2 and 4 steps, one row per step count (sample.py does the work)."""
    from sample import generate, save_grid
    student.eval()
    rows = [generate(bundle, student, schedule, prompts, steps=s, guidance=(ccfg.w_min + ccfg.w_max) / 2,
                     height=resolution, width=resolution, seed=0) for s in (1, 2, 4)]
    student.train()
    save_grid(torch.cat(rows), path, columns=len(prompts), metadata={"prompts": json.dumps(prompts),
                                                                       "rows": "1, 2, 4 steps", "seed": "0"})


if __name__ == "__main__":
    sys.exit(main())
