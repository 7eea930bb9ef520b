"""Speed and memory of scott's UNet, training step and sampler, side by side with diffusers' on the same weights.

    python -m tools.bench                                    # one GPU, SD1.5 shapes (random weights), every row, eager
    python -m tools.bench --compile --channels-last          # the same with the optimisations on
    python -m tools.bench --device cpu --tiny                # tiny shapes on CPU: keeps this file working in CI

Rows (each the median of --repeats timed runs after --warmup untimed ones, with peak memory):
  unet    one UNet forward at B = 1, 8, 32 on 64×64 latents (512 px) and B = 1 at 128×128 (1024 px)
  step    one SCott optimisation step through train.train_step (h = 3, CFG teacher, EMA target, D's two passes,
          AdamW) at micro-batch 10, the LCM-style step (η = 0, h = 1, no D) with our modules and with diffusers',
          and the SCott-LoRA step (train.py --student-lora-rank 64: one UNet, the student LCM-LoRA's adapters on it;
          always eager, as train.py refuses --compile for a LoRA student)
  sample  2-step 512 px generation at B = 1 and 8, text encoding and VAE decode included: sample.generate vs
          diffusers' LatentConsistencyModelPipeline assembled from the same modules
FLOPs are counted (torch.utils.flop_counter on one eager call), not assumed; "% peak" is over the bf16 matrix-
product rate measured on this device at start (an 8192³ product). The weights are random, SD1.5-shaped, written
once to a temporary folder in diffusers' layout and loaded by both libraries. diffusers is optional: without it
its rows are left out, with a note. Writes --out/bench.md and --out/bench.json.
"""
import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

import train
from consistency import ConsistencyConfig
from discriminator import DiscriminatorConfig
from sample import generate
from sd15 import load_sd15
from sde_solver import NoiseSchedule
from toyworld.toy import build_tokenizer
from unet import UNet, UNetConfig, guidance_embedding, make_student, save_unet
from vae import VAE, VAEConfig, save_vae

try:
    import diffusers
except ImportError:  # tools/bench.py runs without it: diffusers' rows are then left out
    diffusers = None

SDPA_BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


@dataclass
class BenchConfig:
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    tiny: bool = False           # tiny shapes (CI on CPU); otherwise SD1.5's
    rows: str = "unet,step,sample"
    bf16: bool = True            # bf16 weights for forward-only rows, bf16 autocast for the step (GPU only)
    channels_last: bool = False
    sdpa: str = "auto"           # attention kernel: auto, flash, efficient, cudnn, math
    compile: bool = False        # torch.compile the UNets (ours and diffusers' alike)
    cuda_graphs: bool = False    # sampling: compile the UNet with mode="reduce-overhead" (CUDA graphs)
    impls: str = "ours,diffusers"
    shapes: str = "1x512,8x512,32x512,1x1024"  # unet rows: batch x image size in px (latents are 8× smaller)
    micro_batch: int = 10        # the step rows (paper: 10 per GPU)
    warmup: int = 3
    repeats: int = 10
    out: str = "runs/bench"


# ---- measuring ---------------------------------------------------------------------------------------------------

def measure(fn, cfg: BenchConfig) -> dict:
    """Median milliseconds of `fn()` over cfg.repeats after cfg.warmup runs, and the peak memory of the timed runs."""
    device = torch.device(cfg.device)
    for _ in range(cfg.warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(cfg.repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return {"ms": statistics.median(times), "peak_gib": peak}


def count_flops(fn) -> int:
    """Floating-point operations of one call (matrix products, convolutions and attention, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_tflops(device: torch.device) -> float | None:
    """The bf16 matrix-product rate this device reaches on an 8192³ product (random data), TFLOP/s."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = measure(lambda: a @ b, BenchConfig(device=str(device), warmup=3, repeats=10))["ms"]
    return 2 * 8192 ** 3 / ms / 1e9


# ---- random SD1.5-shaped weights ---------------------------------------------------------------------------------

def text_config(tiny: bool) -> CLIPTextConfig:
    """SD1.5's CLIP ViT-L/14 text tower (or a tiny one), as its text_encoder/config.json describes it."""
    width, layers, heads = (32, 2, 4) if tiny else (768, 12, 12)
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=width)


def write_random_sd15(folder: Path, tiny: bool, seed: int = 0) -> Path:
    """A diffusers-layout folder of an SD1.5-shaped model with random weights (fp32), loadable by both libraries.
    The tokenizer is the toy world's word-level one (it needs no download); CLIP's runs on the same 77 tokens."""
    torch.manual_seed(seed)
    save_unet(UNet(UNetConfig.tiny() if tiny else UNetConfig.sd15()), folder / "unet")
    save_vae(VAE(VAEConfig.tiny() if tiny else VAEConfig.sd15()), folder / "vae")
    CLIPTextModel(text_config(tiny)).save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


# ---- diffusers' side (only here and in tests: the runtime files never import diffusers) ----------------------------

def diffusers_unet(ours: UNet):
    """diffusers' UNet2DConditionModel holding our UNet's weights (the key names are the same)."""
    ref = diffusers.UNet2DConditionModel.from_config(ours.config.to_diffusers_config())
    ref.load_state_dict(ours.state_dict())
    return ref.to(next(ours.parameters()).device, next(ours.parameters()).dtype).eval()


class DiffusersEps(torch.nn.Module):
    """diffusers' UNet behind our calling convention, net(x, t, c[, ω]) -> ε, so train.train_step can run it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context, w=None):
        dim = self.unet.config.time_cond_proj_dim
        cond = None if w is None else guidance_embedding(w - 1, dim).to(x.dtype)  # LCM embeds w = ω − 1
        return self.unet(x, t, encoder_hidden_states=context, timestep_cond=cond).sample


def lcm_pipeline(folder: Path, bundle, student: UNet):
    """diffusers' LatentConsistencyModelPipeline assembled from the same modules' weights."""
    dtype, device = next(student.parameters()).dtype, next(student.parameters()).device
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).to(device)
    scheduler = diffusers.LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", original_inference_steps=50)
    pipe = diffusers.LatentConsistencyModelPipeline(
        vae=vae, text_encoder=bundle.text_encoder, tokenizer=bundle.tokenizer, unet=diffusers_unet(student),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- rows --------------------------------------------------------------------------------------------------------

def options(cfg: BenchConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("bf16", "channels_last", "sdpa", "compile", "cuda_graphs")}


def prepare(module, cfg: BenchConfig, mode: str | None = None):
    """channels_last and torch.compile as cfg says (the same for ours and diffusers')."""
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return torch.compile(module, mode=mode) if cfg.compile or mode else module


def unet_rows(folder: Path, cfg: BenchConfig, peak: float | None) -> list[dict]:
    device, dtype = torch.device(cfg.device), torch.bfloat16 if cfg.bf16 else torch.float32
    bundle = load_sd15(folder, device=device, dtype=dtype)
    ours = bundle.unet
    mode = "reduce-overhead" if cfg.cuda_graphs else None
    impls = {"ours": (ours, prepare(ours, cfg, mode))}
    if diffusers and "diffusers" in cfg.impls:
        ref = diffusers_unet(ours)
        impls["diffusers"] = (ref, prepare(ref, cfg, mode))
    latent, width = ours.config.sample_size, ours.config.cross_attention_dim
    factor = bundle.vae.spatial_factor  # latent -> image side
    shapes = ([(1, latent), (2, latent), (1, 2 * latent)] if cfg.tiny else
              [(int(b), int(px) // factor) for b, px in (s.split("x") for s in cfg.shapes.split(","))])
    rows = []
    for batch, size in shapes:
        x = torch.randn(batch, 4, size, size, device=device, dtype=dtype)
        t = torch.randint(0, 1000, (batch,), device=device)
        c = torch.randn(batch, 77, width, device=device, dtype=dtype)
        if cfg.channels_last:
            x = x.to(memory_format=torch.channels_last)
        flops = count_flops(lambda: ours(x, t, c))
        for name, (eager, run) in impls.items():
            call = (lambda: run(x, t, c)) if name == "ours" else (lambda: run(x, t, encoder_hidden_states=c).sample)
            with torch.no_grad():
                rows.append(row("unet forward", name, f"B={batch} {size * factor}px", flops, measure(call, cfg), peak))
            print(rows[-1], flush=True)
    return rows


def step_rows(folder: Path, cfg: BenchConfig, peak: float | None) -> list[dict]:
    """The trainer's own step: train.build_models + build_optimizers + train_step, as train.main runs them."""
    device = torch.device(cfg.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    rows = []
    # η = 0.3, the setting docs/performance.md was measured with (the default is 0.1); η does not change the cost.
    settings = {"SCott step (h=3, η=0.3, CFG, EMA, D)": (ConsistencyConfig(eta=0.3), 0.4, 0),
                "LCM-style step (η=0, h=1, CFG, EMA)": (ConsistencyConfig(eta=0.0, substeps=1), 0.0, 0),
                "SCott-LoRA step (rank 64, h=3, η=0.3, CFG, EMA, D)":
                    (ConsistencyConfig(eta=0.3, w_min=3.0, w_max=15.0), 0.4, 64)}
    for label, (consistency, adv_weight, lora_rank) in settings.items():
        impls = ["ours", "diffusers"] if adv_weight == 0 and diffusers else ["ours"]
        for impl in impls:
            tcfg = train.TrainConfig(model=str(folder), micro_batch=cfg.micro_batch, global_batch=cfg.micro_batch,
                                     adv_weight=adv_weight, bf16=cfg.bf16, compile=cfg.compile and not lora_rank,
                                     channels_last=cfg.channels_last, student_lora_rank=lora_rank)
            torch.manual_seed(0)
            models = train.build_models(load_sd15(folder, device=device), tcfg, consistency, DiscriminatorConfig(),
                                        device, world=1)
            size, width = models.teacher.config.sample_size, models.teacher.config.cross_attention_dim
            if impl == "diffusers":  # the same step code with diffusers' modules in place of ours
                student, target, teacher = (DiffusersEps(prepare(diffusers_unet(m), cfg)) for m in
                                            (models.student, models.target, models.teacher))
                student.train().requires_grad_(True)
                models = dataclasses.replace(models, student=student, target=target, teacher=teacher,
                                             student_fwd=student, target_fwd=target, teacher_fwd=teacher)
            opt, d_opt = train.build_optimizers(models, tcfg, device)
            g = torch.Generator(device).manual_seed(0)
            z0 = torch.randn(cfg.micro_batch, 4, size, size, device=device, generator=g)  # (B, 4, 64, 64) latents
            c = torch.randn(cfg.micro_batch, 77, width, device=device, generator=g)       # (B, 77, 768) CLIP features
            step = lambda: train.train_step(models, opt, d_opt, [(z0, c)], tcfg, consistency, False, g,  # noqa: E731
                                            autocast)
            flops = count_flops(step)
            rows.append(row("training step", impl, label + f" B={cfg.micro_batch}", flops, measure(step, cfg), peak))
            del models, opt, d_opt, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def sample_rows(folder: Path, cfg: BenchConfig, peak: float | None) -> list[dict]:
    """2-step generation from prompts to images: text encoding, two student evaluations, VAE decode."""
    device, dtype = torch.device(cfg.device), torch.bfloat16 if cfg.bf16 else torch.float32
    bundle = load_sd15(folder, device=device, dtype=dtype)
    student = make_student(bundle.unet).eval()
    run = prepare(student, cfg, mode="reduce-overhead" if cfg.cuda_graphs else None)
    pipe = lcm_pipeline(folder, bundle, student) if diffusers else None
    if pipe and (cfg.compile or cfg.cuda_graphs):
        pipe.unet = prepare(pipe.unet, cfg, mode="reduce-overhead" if cfg.cuda_graphs else None)
    size = student.config.sample_size * bundle.vae.spatial_factor
    schedule = NoiseSchedule(bundle.alphas_cumprod.to(device))
    rows = []
    for batch in (1, 8) if not cfg.tiny else (1, 2):
        prompts = ["a red circle on the left"] * batch
        ours = lambda: generate(bundle, run, schedule, prompts, steps=2,  # noqa: E731
                                guidance=7.5, height=size, width=size)
        with torch.no_grad():
            flops = count_flops(ours)
            rows.append(row("2-step generation", "ours", f"B={batch} {size}px", flops, measure(ours, cfg), peak))
            if pipe:
                theirs = lambda: pipe(prompts, num_inference_steps=2, guidance_scale=7.5, height=size,  # noqa: E731
                                      width=size, output_type="pt")
                rows.append(row("2-step generation", "diffusers", f"B={batch} {size}px", flops, measure(theirs, cfg),
                                peak))
    return rows


def row(section, impl, shape, flops, timing, peak) -> dict:
    tflops = flops / timing["ms"] / 1e9
    return {"section": section, "impl": impl, "shape": shape, "ms": round(timing["ms"], 3),
            "gflop": round(flops / 1e9, 3), "tflops": round(tflops, 3),
            "pct_peak": round(100 * tflops / peak, 1) if peak else None,
            "peak_gib": round(timing["peak_gib"], 2) if timing["peak_gib"] is not None else None}


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| section | impl | shape | ms | GFLOP | TFLOP/s | % peak | peak GiB |", "|---" * 8 + "|"]
    for r in rows:
        lines.append(f"| {r['section']} | {r['impl']} | {r['shape']} | {r['ms']} | {r['gflop']} | {r['tflops']} | "
                     f"{r['pct_peak'] if r['pct_peak'] is not None else '–'} | "
                     f"{r['peak_gib'] if r['peak_gib'] is not None else '–'} |")
    return "\n".join(lines) + "\n"


def environment(device: torch.device, peak: float | None) -> dict:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__ if diffusers else
            None, "measured_peak_bf16_tflops": round(peak, 1) if peak else None}


def parse_args(argv=None) -> BenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=f"(default {f.default})")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f"(default {f.default})")
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    if cfg.sdpa not in SDPA_BACKENDS:
        parser.error(f"--sdpa {cfg.sdpa}: choose one of {sorted(SDPA_BACKENDS)}")
    unknown = set(cfg.rows.split(",")) - {"unet", "step", "sample"}
    if unknown:
        parser.error(f"--rows: unknown {sorted(unknown)}; choose from unet,step,sample")
    if cfg.device == "cpu":
        cfg = dataclasses.replace(cfg, bf16=False)  # bf16 timings on CPU say nothing about a GPU
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    device = torch.device(cfg.device)
    peak = peak_tflops(device)
    env = environment(device, peak)
    print(json.dumps({**env, **options(cfg)}), flush=True)
    if diffusers is None:
        print("diffusers is not installed: its rows are left out (pip install diffusers to compare)")
    rows = []
    backend = SDPA_BACKENDS[cfg.sdpa]
    with tempfile.TemporaryDirectory() as tmp, (sdpa_kernel(backend) if backend else nullcontext()):
        folder = write_random_sd15(Path(tmp), cfg.tiny)
        for name, fn in (("unet", unet_rows), ("step", step_rows), ("sample", sample_rows)):
            if name in cfg.rows.split(","):
                new = fn(folder, cfg, peak)
                print(markdown(new, f"### {name}"), flush=True)
                rows += new
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    header = f"{env['device']}, torch {env['torch']}, diffusers {env['diffusers']}; options {options(cfg)}"
    (out / "bench.md").write_text(markdown(rows, header))
    (out / "bench.json").write_text(json.dumps({"environment": env, "options": options(cfg), "rows": rows},
                                               indent=1))
    print(f"wrote {out / 'bench.md'} and {out / 'bench.json'}")
    return rows


if __name__ == "__main__":
    main()
