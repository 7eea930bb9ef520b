"""Prompts -> PNG with a SCott student in 1–8 steps, or with the teacher (N-step DDIM / DDPM + CFG) as a baseline.

    python sample.py --prompt "a red circle on the left"                          # the shipped toy model, CPU
    python sample.py --model PATH/sd15 --student runs/scott/step-0040000/student --steps 2 --prompt "a fox"
    python sample.py --model PATH/sd15 --teacher --steps 50 --guidance 7.5 --prompt "a fox"   # baseline

One PNG per run (a grid when there are several images) with prompt, seed, steps and model in its text metadata.
"""
import argparse
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from checkpoint import CheckpointError, OutputRefused, refuse_overlap
from consistency import boundary_scalings, consistency_timesteps
from lora import load_kohya, merge
from config import model_settings
from sd15 import load_sd15, model_path
from sde_solver import NoiseSampler, NoiseSchedule, check_timesteps, sample_teacher, teacher_timesteps
from unet import load_unet
from vae import decode_dtype


def image_noise(seeds) -> NoiseSampler:
    """A noise sampler with one CPU generator per image, image i's seeded with seeds[i]: its stream gives that image's
    start noise x_999 first and then every later draw of the sampler, so no two draws of a run share a stream, and an
    image depends only on its own seed (not on its batch, nor on the device: the draws are made on the CPU)."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def draw(like: torch.Tensor) -> torch.Tensor:  # (B, ...) standard normal, like's device and dtype
        if like.shape[0] != len(generators):
            raise ValueError(f"image_noise: {len(generators)} seeds but a batch of {like.shape[0]}.")
        return torch.stack([torch.randn(like.shape[1:], generator=g) for g in generators]).to(like.device, like.dtype)
    return draw


@torch.no_grad()
def generate(bundle, unet, schedule, prompts, steps, guidance, height, width, seed=0, n=1, teacher_eta=None,
             decode=None):
    """(images (len(prompts)·n, 3, H, W) in [0, 1], {stage: seconds}). `unet` is a student (consistency sampling on
    LCM's grid, ω-conditioned, with the boundary scalings its config records) or, with `teacher_eta` set, the teacher
    (η = 0: DDIM, η = 1: DDPM) with classifier-free guidance ω. `unet` may be compiled, and `decode` (latents ->
    images in [-1, 1]; default the VAE in fp32) too: see prepare_sampler.

    Image i of the call (prompts repeated n times each, in order) is drawn from seed + i alone (image_noise), so a
    caller that generates captions in batches, passing each batch's global index of its first image as `seed`, gets
    each caption's image whatever the batching."""
    timings = {}
    device = next(unet.parameters()).device
    prompts = [p for p in prompts for _ in range(n)]
    tick = _clock(device)
    cond = bundle.encode_prompts(prompts)
    timings["text"] = tick()
    factor = bundle.vae.spatial_factor
    if height % factor or width % factor:
        raise ValueError(f"--height/--width must be multiples of {factor} for this model, got {height}×{width}.")
    noise_sampler = image_noise(range(seed, seed + len(prompts)))
    x = noise_sampler(torch.empty(len(prompts), unet.config.in_channels, height // factor, width // factor,
                                  device=device, dtype=cond.dtype))  # x_999
    plain = teacher_eta is None and not unet.config.guidance_embed_dim  # a LoRA student: no ω input, no CFG
    w = None if plain else torch.full((len(prompts),), float(guidance), device=device)
    if teacher_eta is None:
        c = unet.config
        plan = consistency_plan(consistency_timesteps(steps), schedule, x, noise_sampler, c.timestep_scaling,
                                c.sigma_data)
        latents = consistency_loop(unet, x, cond, w, plan)
    else:
        uncond = bundle.encode_prompts([""])
        latents = sample_teacher(unet, x, cond, uncond, w, teacher_timesteps(steps), schedule, noise_sampler,
                                 eta=teacher_eta)
    timings["unet"] = tick()
    images = decode(latents) if decode is not None else bundle.vae.decode(latents, fp32=True)
    timings["decode"] = tick()
    return ((images.float() + 1) / 2).clamp(0, 1), timings


# ---- the consistency sampler without host syncs --------------------------------------------------------------------

@dataclass
class ConsistencyPlan:
    """Everything the N-step consistency loop needs, computed on the host and moved to the device before it starts,
    so the loop itself is device work only (no .item(), no branch on a tensor's value, no host-to-device copy): per
    step i the timesteps t_i (B,), √ᾱ and √(1 − ᾱ) at t_i, the boundary scalings c_skip, c_out at t_i (all float64,
    (B, 1, 1, 1), cast at use exactly as consistency.consistency_fn and NoiseSchedule do), and the re-noising draws
    (N − 1, B, C, H, W) that take x̂0 to t_{i+1}."""
    t: list
    sqrt_alpha: list
    sqrt_one_minus: list
    c_skip: list
    c_out: list
    noise: torch.Tensor


def consistency_plan(timesteps, schedule: NoiseSchedule, x: torch.Tensor, noise_sampler: NoiseSampler,
                     timestep_scaling: float, sigma_data: float) -> ConsistencyPlan:
    """The plan of consistency.sample_consistency with LCM's re-noising (renoise_lcm) over `timesteps` for start
    latents x. The noise sampler is drawn N − 1 times now, on the host (image_noise draws on the CPU anyway), in the
    order the loop would draw, and the draws go to the device in one copy."""
    timesteps = check_timesteps(timesteps, schedule)
    B, shape = x.shape[0], (-1, *([1] * (x.ndim - 1)))
    host = torch.empty(x.shape, dtype=x.dtype)
    draws = [noise_sampler(host) for _ in timesteps[1:]]
    noise = torch.stack(draws) if draws else host.new_empty((0, *x.shape))
    t = torch.tensor(timesteps, dtype=torch.long)[:, None].expand(-1, B)  # (N, B)
    ab = schedule.alphas_cumprod.cpu()[t]  # (N, B) float64
    c_skip, c_out = boundary_scalings(t, timestep_scaling, sigma_data)
    to_device = lambda v: v.to(x.device, non_blocking=True)  # noqa: E731
    rows = lambda v: [to_device(r.reshape(shape)) for r in v]  # noqa: E731
    return ConsistencyPlan(t=[to_device(r.contiguous()) for r in t], sqrt_alpha=rows(ab.sqrt()),
                           sqrt_one_minus=rows((1 - ab).sqrt()), c_skip=rows(c_skip), c_out=rows(c_out),
                           noise=to_device(noise))


def consistency_loop(unet, x: torch.Tensor, cond, w, plan: ConsistencyPlan) -> torch.Tensor:
    """Multi-step consistency sampling (Song et al. 2023 Alg. 1, LCM's scheduler): at each t_i
        x̂0 = c_skip x + c_out (x − √(1 − ᾱ) ε̂(x, t_i, c, ω)) / √ᾱ,   then   x = √ᾱ_{i+1} x̂0 + √(1 − ᾱ_{i+1}) z_i,
    returning the last x̂0: the same operations, in the same order and dtypes, as consistency.sample_consistency
    (tests/test_sample.py checks equality), but with every host-side quantity precomputed in `plan`, so the loop
    makes no host syncs and torch.compile traces it whole (fullgraph=True; tests/test_sample.py)."""
    steps = len(plan.t)
    for i in range(steps):
        eps = unet(x, plan.t[i], cond, w)
        dtype = torch.promote_types(x.dtype, eps.dtype)
        x0_hat = (x - plan.sqrt_one_minus[i].to(dtype) * eps) / plan.sqrt_alpha[i].to(dtype)  # predict_x0
        x0_hat = plan.c_skip[i].to(x0_hat.dtype) * x + plan.c_out[i].to(x0_hat.dtype) * x0_hat
        if i + 1 < steps:  # renoise_lcm: x̂0 forward to t_{i+1} with fresh noise
            dtype = torch.promote_types(x0_hat.dtype, plan.noise.dtype)
            x = plan.sqrt_alpha[i + 1].to(dtype) * x0_hat + plan.sqrt_one_minus[i + 1].to(dtype) * plan.noise[i]
    return x0_hat


def prepare_sampler(unet, vae, compile: bool = False, cuda_graphs: bool = False, dtype=torch.float32,
                    backend: str = "inductor"):
    """(unet, decode) for generate: the UNet as it is or torch.compile'd whole (fullgraph=True: a graph break is an
    error, not a silent slow path; `cuda_graphs`: mode="reduce-overhead", CUDA graphs replaying the kernels), and
    the VAE decode in `dtype` (vae.decode_dtype), compiled with it. A VAE whose weights are not in `dtype` is
    converted once, in place, so the decode makes no per-call weight copies. `backend`: torch.compile's ("eager"
    traces with Dynamo only: a quick check that the graphs are whole)."""
    if next(vae.parameters(), torch.empty(0, dtype=dtype)).dtype != dtype:
        vae.to(dtype)
    decode = lambda z: vae.decode(z, dtype=dtype)  # noqa: E731
    if compile or cuda_graphs:
        mode = "reduce-overhead" if cuda_graphs and backend == "inductor" else None
        unet = torch.compile(unet, fullgraph=True, dynamic=False, backend=backend, mode=mode)
        decode = torch.compile(decode, fullgraph=True, dynamic=False, backend=backend)
    return unet, decode


def _clock(device):
    """A stopwatch that waits for the GPU, so each stage's time is its own."""
    last = [time.perf_counter()]

    def tick():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now, elapsed = time.perf_counter(), time.perf_counter() - last[0]
        last[0] = now
        return elapsed
    return tick


def save_grid(images: torch.Tensor, path, columns: int, metadata: dict):
    """Images (N, 3, H, W) in [0, 1] -> one PNG grid, `metadata` stored as PNG text chunks."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i, im in enumerate(pixels):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    info = PngImagePlugin.PngInfo()
    for k, v in metadata.items():
        info.add_text(k, str(v))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, pnginfo=info)


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse bad numbers and an --out that cannot be written, before any model is loaded (p.error exits 2)."""
    for flag, value, minimum in (("--n", args.n, 1), ("--steps", args.steps, 1), ("--height", args.height, 1),
                                 ("--width", args.width, 1), ("--seed", args.seed, 0)):
        if value is not None and value < minimum:
            p.error(f"{flag} {value}: must be an integer ≥ {minimum}.")
    for flag, value in (("--guidance", args.guidance), ("--eta", args.eta)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            p.error(f"{flag} {value}: must be a finite number ≥ 0.")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        p.error(f"--out {out}: must name a .png file (the grid is a PNG with its prompts in the metadata).")
    if out.is_dir():
        p.error(f"--out {out} is a folder; name a .png file, e.g. {out / 'sample.png'}.")
    folder = next(parent for parent in out.absolute().parents if parent.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        p.error(f"--out {out}: cannot write under {folder}; choose another path.")
    try:
        refuse_overlap(out, {"--model": model_path(args.model), "--student": args.student, "--lora": args.lora,
                             "--tokenizer": args.tokenizer, "--prompts-file": args.prompts_file})
    except OutputRefused as e:
        p.error(str(e))
    for flag, value in (("--model", args.model), ("--student", args.student), ("--lora", args.lora),
                        ("--tokenizer", args.tokenizer), ("--prompts-file", args.prompts_file)):
        if value and not Path(value).exists():
            p.error(f"{flag} {value}: no such file or folder.")


def load_student_unet(p: argparse.ArgumentParser, folder: Path, device, dtype):
    """load_unet(--student), with a hint when `folder` is a checkpoint's step-N folder rather than its student/."""
    if not (folder / "config.json").exists() and (folder / "student").is_dir():
        p.error(f"--student {folder}: a checkpoint folder, not a UNet; did you mean {folder / 'student'}?")
    if not (folder / "config.json").exists() and (folder / "adapters.safetensors").is_file():
        p.error(f"--student {folder}: a LoRA student's checkpoint; export it with `python export.py --to lora --lora "
                f"{folder} --out FILE.safetensors` and sample it with --lora FILE.safetensors.")
    try:
        return load_unet(folder, device, dtype).eval()
    except CheckpointError as e:
        p.error(f"--student: {e}")


def check_student(p: argparse.ArgumentParser, student_folder, unet, bundle, model) -> None:
    """Refuse a student that is not one, or that was distilled from another model (its input channels or its text
    width differ from --model's): it would fail with a matrix-shape error, or sample noise."""
    if not unet.config.guidance_embed_dim:
        p.error(f"--student {student_folder}: this UNet has no guidance (ω) input, so it is not a distilled student")
    teacher, text_width = bundle.unet.config, bundle.text_encoder.config.hidden_size
    if (unet.config.in_channels, unet.config.cross_attention_dim) != (teacher.in_channels, text_width):
        p.error(f"--student {student_folder}: distilled from another model: it takes {unet.config.in_channels} "
                f"latent channels and text width {unet.config.cross_attention_dim}, --model {model} gives "
                f"{teacher.in_channels} and {text_width}. Pass the --model it was distilled from.")


def warn_truncated(tokenizer, text_encoder, prompts) -> None:
    """Say once if any prompt is longer than the text encoder reads (77 tokens for CLIP): the rest is ignored."""
    length = text_encoder.config.max_position_embeddings
    long = [i for i, ids in enumerate(tokenizer(list(prompts)).input_ids) if len(ids) > length]
    if long:
        print(f"note: {len(long)} prompt(s) (first: #{long[0] + 1}) are longer than the {length} tokens the text "
              f"encoder reads; only their first {length} tokens are used.")


def add_speed_arguments(p: argparse.ArgumentParser) -> None:
    """The sampler's speed switches (prepare_for_speed): none changes what is sampled beyond rounding."""
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (one whole graph, no breaks) and "
                   "the VAE decode: faster per image after a slow first call (minutes on a CPU)")
    p.add_argument("--cuda-graphs", action="store_true", help="with --compile on a GPU: mode reduce-overhead (CUDA "
                   "graphs), for small batches")
    p.add_argument("--fuse-qkv", action="store_true", help="fuse each self-attention's q/k/v projections into one "
                   "matrix product (inference only; the same outputs up to rounding)")
    p.add_argument("--decode-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="VAE decode precision: auto = bf16 on a GPU that supports it, fp32 elsewhere")


def unet_to_sample(p: argparse.ArgumentParser, args, bundle, model: Path, own: dict, device, dtype):
    """(UNet, label) of what main samples: the --lora student merged into --model's UNet, the teacher, or the
    --student folder (default: the model folder's own student)."""
    if args.lora:
        if args.teacher or args.student:
            p.error("--lora is a student of its own: pass it without --teacher and --student")
        try:
            adapters = load_kohya(args.lora, bundle.unet)
        except CheckpointError as e:
            p.error(f"--lora: {e}")
        return merge(adapters, bundle.unet).eval(), f"LoRA student {args.lora}"
    if args.teacher:
        return bundle.unet, f"teacher {'DDIM' if args.eta == 0 else f'DDPM eta={args.eta}'}"
    student = Path(args.student) if args.student else (model / own["student"] if "student" in own else None)
    if student is None:
        p.error("--student FOLDER is required with --model (or pass --teacher for the teacher baseline)")
    unet = load_student_unet(p, student, device, dtype)
    check_student(p, student, unet, bundle, model)
    return unet, f"student {student}"


def prepare_for_speed(args, unet, vae, device):
    """(unet, decode) for generate, as --fuse-qkv, --compile, --cuda-graphs and --decode-dtype ask: fused q/k/v on
    the loaded, merged or teacher UNet (UNet.fuse_qkv), then prepare_sampler (compiled UNet and decode)."""
    if args.fuse_qkv:
        unet.fuse_qkv()
    return prepare_sampler(unet, vae, compile=args.compile or args.cuda_graphs, cuda_graphs=args.cuda_graphs,
                           dtype=decode_dtype(args.decode_dtype, device))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt", action="append", default=[], help="the text to draw; repeat the flag for several")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--model", default="", help="SD1.5 diffusers folder or single file (default: the toy model)")
    p.add_argument("--tokenizer", default="", help="tokenizer folder, needed with a single-file --model")
    p.add_argument("--student", default="", help="distilled UNet folder (default: the toy model's student/)")
    p.add_argument("--lora", default="", help="kohya LoRA file of a LoRA student (export.py --to lora), merged into "
                   "--model's UNet; sampled without CFG (--guidance is ignored)")
    p.add_argument("--teacher", action="store_true", help="sample the teacher instead (baseline)")
    p.add_argument("--eta", type=float, default=0.0, help="teacher sampler noise: 0 = DDIM, 1 = DDPM")
    p.add_argument("--steps", type=int, default=None, help="1–8 for a student (default 2); any for --teacher (50)")
    p.add_argument("--guidance", type=float, default=None,
                   help="ω (CFG scale; default 7.5, or the model folder's own: 3 for the toy)")
    p.add_argument("--seed", type=int, default=0, help="image i is drawn from seed + i alone (default 0)")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--height", type=int, default=None, help="image height in px (default: the model's own)")
    p.add_argument("--width", type=int, default=None, help="image width in px (default: the model's own)")
    p.add_argument("--out", default="sample.png", help="the PNG to write")
    add_speed_arguments(p)
    args = p.parse_args(argv)
    check_args(p, args)

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    model = model_path(args.model)
    own = model_settings(model, "sample")  # the model folder's scott.toml [sample]: the toy model's defaults
    if not prompts:
        prompts = [own["prompt"]] if "prompt" in own else p.error("give --prompt or --prompts-file")
    if args.cuda_graphs and not torch.cuda.is_available():
        p.error("--cuda-graphs needs a GPU (none is visible); use --compile alone on a CPU")
    steps = args.steps or (50 if args.teacher else 2)
    if not args.teacher and not 1 <= steps <= 8:
        p.error(f"--steps {steps}: a consistency student samples in 1–8 steps (use --teacher for more)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not args.model:
        print(f"Using the built-in toy model ({model}): 32×32 synthetic shapes. For SD1.5 pass --model PATH "
              f"(a diffusers folder or a .safetensors/.ckpt single file) and --student FOLDER.")

    tick = _clock(device)
    try:
        bundle = load_sd15(model, tokenizer=args.tokenizer or None, device=device, dtype=dtype)
    except CheckpointError as e:
        p.error(f"--model: {e}")
    unet, label = unet_to_sample(p, args, bundle, model, own, device, dtype)
    unet, decode = prepare_for_speed(args, unet, bundle.vae, device)
    print(f"load {tick():.2f}s" + (" (compiling on the first call)" if args.compile or args.cuda_graphs else ""))
    warn_truncated(bundle.tokenizer, bundle.text_encoder, prompts)
    size = bundle.unet.config.sample_size * bundle.vae.spatial_factor  # the resolution the model was trained at
    guidance = args.guidance if args.guidance is not None else own.get("guidance", 7.5)
    no_cfg = not args.teacher and not unet.config.guidance_embed_dim  # a LoRA student: no ω input, no CFG pass
    if no_cfg and args.guidance is not None:
        print(f"note: --guidance {args.guidance} is ignored: {label} has no ω input and is sampled without CFG.")
    images, timings = generate(bundle, unet, NoiseSchedule(bundle.alphas_cumprod.to(device)), prompts, steps,
                               guidance, args.height or size, args.width or size, args.seed, args.n,
                               teacher_eta=args.eta if args.teacher else None, decode=decode)
    print(" | ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items()))
    if not torch.isfinite(images).all():
        raise SystemExit(f"{label}: the images hold non-finite pixels (NaN/Inf), so {args.out} was not written. "
                         "The weights are probably damaged (NaN) or the run diverged: try an earlier checkpoint.")
    save_grid(images, args.out, columns=args.n if len(prompts) > 1 else min(args.n, 8),
              metadata={"prompt": " | ".join(prompts), "seed": args.seed, "steps": steps,
                        "guidance": "none (no CFG)" if no_cfg else guidance, "model": str(model), "sampler": label})
    print(f"wrote {args.out} ({len(images)} image(s), {label}, {steps} steps, "
          f"{'no CFG' if no_cfg else f'ω={guidance}'}, seed {args.seed})")


if __name__ == "__main__":
    main()
