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
import copy
import dataclasses
import io
import json
import platform
import resource
import statistics
import tempfile
import time
from contextlib import nullcontext, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

import train
from config import check_settings, parse_settings, setting
from consistency import ConsistencyConfig
from discriminator import DiscriminatorConfig
from sample import generate, prepare_sampler
from sd15 import load_sd15
from sde_solver import NoiseSchedule
from toyworld.toy import build_tokenizer
from unet import UNet, UNetConfig, guidance_embedding, make_student, save_unet
from vae import VAE, VAEConfig, decode_dtype, save_vae

try:
    import diffusers
except ImportError:  # tools/bench.py runs without it: diffusers' rows are then left out
    diffusers = None

SWITCHES = ("compile", "cuda_graphs", "channels_last", "fuse_qkv", "bf16_decode")
SDPA_BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
# the SCott-LoRA step rows: each mode's train.py settings
LORA_MODES = {"eager": {}, "checkpointed": {"grad_checkpointing": True}, "compiled": {"compile": True}}


@dataclass
class BenchConfig:
    device: str = setting("cuda" if torch.cuda.is_available() else "cpu", "where to run: cuda, cuda:N or cpu")
    tiny: bool = setting(False, "tiny random shapes (a CPU dry run, as CI does); otherwise SD1.5's")
    rows: str = setting("unet,step,sample", "comma-separated rows to measure: unet (forward), step (the training "
                        "steps, SCott-LoRA's included), lora (only the SCott-LoRA steps), sample (2-step generation)")
    bf16: bool = setting(True, "bf16 weights for the forward-only rows, bf16 autocast for the step (GPU only)")
    channels_last: bool = setting(False, "channels_last memory format for the UNets")
    sdpa: str = setting("auto", "attention kernel", choices=SDPA_BACKENDS)
    compile: bool = setting(False, "torch.compile the UNets (ours and diffusers' alike)")
    cuda_graphs: bool = setting(False, "sample rows: compile the UNet with mode reduce-overhead (CUDA graphs)")
    compile_backend: str = setting("inductor", "torch.compile's backend (eager: Dynamo tracing only, quick on CPU)")
    variants: str = setting("base", "unet/sample rows: our UNet once per comma-separated variant, each a "
                            "+-joined set of switches on top of the flags (compile, cuda_graphs, channels_last, "
                            "fuse_qkv, bf16_decode)")
    sample_px: int = setting(0, "sample rows: image side in px (0: the model's own, 512 for SD1.5)", at_least=0)
    sample_batches: str = setting("1,8", "sample rows: comma-separated batch sizes")
    lora_modes: str = setting(",".join(LORA_MODES), "SCott-LoRA step rows (unsupported ones say so)")
    suite: bool = setting(False, "every GPU question in one run (tools/gpu_run.sh): the rows with each switch on "
                          "and off, then tools.gpu_check; the tables go into --docs between markers")
    docs: str = setting("", "with --suite: the markdown file whose marked section is regenerated")
    budget_s: int = setting(540, "with --suite: items not started within this many seconds are listed as not run",
                            at_least=0)
    impls: str = setting("ours,diffusers", "comma-separated implementations to time side by side")
    shapes: str = setting("1x512,8x512,32x512,1x1024", "unet rows: BATCHxPX, comma-separated (latents are 8× "
                          "smaller)")
    micro_batch: int = setting(10, "the step rows' micro-batch (paper: 10 per GPU)", at_least=1)
    warmup: int = setting(3, "untimed runs before timing", at_least=0)
    repeats: int = setting(10, "timed runs; the median is reported", at_least=1)
    out: str = setting("runs/bench", "folder for bench.md and bench.json")

    def __post_init__(self):
        check_settings(self)
        unknown = set(self.rows.split(",")) - {"unet", "step", "lora", "sample"}
        if unknown:
            raise ValueError(f"--rows: unknown {sorted(unknown)}; choose from unet,step,lora,sample")
        for variant in self.variants.split(","):
            variant_switches(variant)  # a ValueError naming an unknown switch
        if set(self.lora_modes.split(",")) - set(LORA_MODES):
            raise ValueError(f"--lora-modes {self.lora_modes}: choose from {','.join(LORA_MODES)}")
        if self.suite and not self.docs:
            raise ValueError("--suite needs --docs FILE: the markdown file whose marked section it regenerates")


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
    return {"ms": statistics.median(times), "peak_gib": peak, "max_rss_gib": max_rss_gib()}


def max_rss_gib() -> float:
    """The process's peak resident memory so far (Linux ru_maxrss, KiB): a high-water mark over every earlier row."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


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


def prepare(module, cfg: BenchConfig, mode: str | None = None, fullgraph: bool = False):
    """channels_last and torch.compile as cfg says (the same for ours and diffusers')."""
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if not (cfg.compile or mode):
        return module
    if cfg.compile_backend != "inductor":
        return torch.compile(module, backend=cfg.compile_backend, fullgraph=fullgraph)
    return torch.compile(module, mode=mode, fullgraph=fullgraph)


def variant_switches(variant: str) -> set:
    """"base" or "+"-joined SWITCHES, e.g. "compile+fuse_qkv", as a set."""
    switches = set(variant.split("+")) - {"base"}
    unknown = switches - set(SWITCHES)
    if unknown:
        raise ValueError(f"--variants {variant}: unknown switches {sorted(unknown)}; choose from base, "
                         f"{', '.join(SWITCHES)}")
    return switches


def variant_cfg(cfg: BenchConfig, switches: set) -> BenchConfig:
    """cfg with a variant's switches turned on (cuda_graphs implies compile)."""
    return dataclasses.replace(cfg, compile=cfg.compile or bool(switches & {"compile", "cuda_graphs"}),
                               cuda_graphs=cfg.cuda_graphs or "cuda_graphs" in switches,
                               channels_last=cfg.channels_last or "channels_last" in switches)


def our_unet(unet: UNet, cfg: BenchConfig, switches: set):
    """(eager copy, callable) of our UNet for one variant: fused q/k/v on a copy, then prepare (fullgraph: a graph
    break in our UNet is an error here, not a slower row)."""
    vcfg = variant_cfg(cfg, switches)
    eager = copy.deepcopy(unet).fuse_qkv() if "fuse_qkv" in switches else unet
    torch._dynamo.reset()  # each variant compiles afresh (and none hits the recompile limit)
    return eager, prepare(eager, vcfg, "reduce-overhead" if vcfg.cuda_graphs else None, fullgraph=True)


def variant_label(variant: str) -> str:
    return "ours" if variant == "base" else f"ours {variant}"


def unet_rows(folder: Path, cfg: BenchConfig, peak: float | None) -> list[dict]:
    device, dtype = torch.device(cfg.device), torch.bfloat16 if cfg.bf16 else torch.float32
    bundle = load_sd15(folder, device=device, dtype=dtype)
    ours = bundle.unet
    mode = "reduce-overhead" if cfg.cuda_graphs else None
    impls = {variant_label(v): our_unet(ours, cfg, variant_switches(v)) for v in cfg.variants.split(",")}
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
            call = (lambda: run(x, t, c)) if name != "diffusers" else (lambda: run(x, t, encoder_hidden_states=c).sample)
            with torch.no_grad():
                rows.append(row("unet forward", name, f"B={batch} {size * factor}px", flops, measure(call, cfg), peak))
            print(rows[-1], flush=True)
    return rows


def step_settings(cfg: BenchConfig) -> list:
    """(label, consistency config, λ_adv, LoRA rank, extra TrainConfig settings) of each step row."""
    # η = 0.3, the setting docs/performance.md was measured with (the default is 0.1); η does not change the cost.
    lora = ConsistencyConfig(eta=0.3, w_min=3.0, w_max=15.0)
    full = [("SCott step (h=3, η=0.3, CFG, EMA, D)", ConsistencyConfig(eta=0.3), 0.4, 0, {}),
            ("LCM-style step (η=0, h=1, CFG, EMA)", ConsistencyConfig(eta=0.0, substeps=1), 0.0, 0, {})]
    lora_rows = [(f"SCott-LoRA step {mode} (rank 64, h=3, η=0.3, CFG, EMA, D)", lora, 0.4, 64,
                  {"compile": False, **LORA_MODES[mode]}) for mode in cfg.lora_modes.split(",")]
    return (full if "step" in cfg.rows.split(",") else []) + lora_rows


def step_rows(folder: Path, cfg: BenchConfig, peak: float | None) -> list[dict]:
    """The trainer's own step: train.build_models + build_optimizers + train_step, as train.main runs them. A
    combination train.py refuses (TrainConfig raises) is a row that says "unsupported" and why."""
    device = torch.device(cfg.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    rows = []
    for label, consistency, adv_weight, lora_rank, extra in step_settings(cfg):
        impls = ["ours", "diffusers"] if adv_weight == 0 and diffusers else ["ours"]
        shape = label + f" B={cfg.micro_batch}"
        for impl in impls:
            try:
                tcfg = train.TrainConfig(**{"model": str(folder), "micro_batch": cfg.micro_batch,
                                            "global_batch": cfg.micro_batch, "adv_weight": adv_weight,
                                            "bf16": cfg.bf16, "compile": cfg.compile,
                                            "channels_last": cfg.channels_last, "student_lora_rank": lora_rank,
                                            **extra})
            except ValueError as e:
                rows.append(unsupported("training step", impl, shape, str(e)))
                print(rows[-1], flush=True)
                continue
            torch._dynamo.reset()
            rows.append(step_row(folder, cfg, tcfg, consistency, impl, shape, autocast, peak))
            print(rows[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def step_row(folder, cfg: BenchConfig, tcfg, consistency, impl, shape, autocast, peak) -> dict:
    """One timed training step configuration (see step_rows)."""
    device = torch.device(cfg.device)
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
    batches = [train.MicroBatch(z0, c)]
    step = lambda: train.train_step(models, opt, d_opt, batches, tcfg, consistency, False, g, autocast)  # noqa: E731
    flops = count_flops(step)
    return row("training step", impl, shape, flops, measure(step, cfg), peak)


def unsupported(section, impl, shape, why: str) -> dict:
    return {"section": section, "impl": impl, "shape": shape, "ms": None, "gflop": None, "tflops": None,
            "pct_peak": None, "peak_gib": None, "max_rss_gib": None, "note": f"unsupported: {why}"}


def sample_rows(folder: Path, cfg: BenchConfig, peak: float | None) -> list[dict]:
    """2-step generation from prompts to images: text encoding, two student evaluations, VAE decode; our sampler
    once per variant (sample.prepare_sampler: compiled UNet and decode, CUDA graphs, fused q/k/v, bf16 decode)."""
    device, dtype = torch.device(cfg.device), torch.bfloat16 if cfg.bf16 else torch.float32
    bundle = load_sd15(folder, device=device, dtype=dtype)
    student = make_student(bundle.unet).eval()
    pipe = lcm_pipeline(folder, bundle, student) if diffusers and "diffusers" in cfg.impls else None
    if pipe and (cfg.compile or cfg.cuda_graphs):
        pipe.unet = prepare(pipe.unet, cfg, mode="reduce-overhead" if cfg.cuda_graphs else None)
    size = cfg.sample_px or student.config.sample_size * bundle.vae.spatial_factor
    schedule = NoiseSchedule(bundle.alphas_cumprod.to(device))
    batches = [int(b) for b in cfg.sample_batches.split(",")] if not cfg.tiny else [1, 2]
    rows = []
    for variant in cfg.variants.split(","):
        run, decode = our_sampler(student, bundle.vae, cfg, variant_switches(variant))
        for batch in batches:
            prompts = ["a red circle on the left"] * batch
            ours = lambda: generate(bundle, run, schedule, prompts, steps=2, guidance=7.5,  # noqa: E731
                                    height=size, width=size, decode=decode)
            with torch.no_grad():
                flops = count_flops(lambda: generate(bundle, student, schedule, prompts, steps=2, guidance=7.5,
                                                     height=size, width=size))
                rows.append(row("2-step generation", variant_label(variant), f"B={batch} {size}px", flops,
                                measure(ours, cfg), peak))
            print(rows[-1], flush=True)
        del run, decode
    for batch in batches if pipe else []:
        prompts = ["a red circle on the left"] * batch
        theirs = lambda: pipe(prompts, num_inference_steps=2, guidance_scale=7.5, height=size,  # noqa: E731
                              width=size, output_type="pt")
        with torch.no_grad():
            flops = count_flops(lambda: generate(bundle, student, schedule, prompts, steps=2, guidance=7.5,
                                                 height=size, width=size))
            rows.append(row("2-step generation", "diffusers", f"B={batch} {size}px", flops, measure(theirs, cfg),
                            peak))
        print(rows[-1], flush=True)
    return rows


def our_sampler(student: UNet, vae, cfg: BenchConfig, switches: set):
    """(unet, decode) of one sampler variant, on copies (fused q/k/v, the decode dtype), so variants don't mix.
    Without bf16_decode the decode is fp32, as sample.py does on a CPU."""
    vcfg = variant_cfg(cfg, switches)
    eager = copy.deepcopy(student).fuse_qkv() if "fuse_qkv" in switches else student
    if vcfg.channels_last:
        eager = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    dtype = decode_dtype("bf16" if "bf16_decode" in switches else "fp32", cfg.device)
    torch._dynamo.reset()
    return prepare_sampler(eager, copy.deepcopy(vae), compile=vcfg.compile, cuda_graphs=vcfg.cuda_graphs,
                           dtype=dtype, backend=cfg.compile_backend)


def row(section, impl, shape, flops, timing, peak) -> dict:
    tflops = flops / timing["ms"] / 1e9
    return {"section": section, "impl": impl, "shape": shape, "ms": round(timing["ms"], 3),
            "gflop": round(flops / 1e9, 3), "tflops": round(tflops, 3),
            "pct_peak": round(100 * tflops / peak, 1) if peak else None,
            "peak_gib": round(timing["peak_gib"], 2) if timing["peak_gib"] is not None else None,
            "max_rss_gib": round(timing["max_rss_gib"], 2), "note": ""}


def markdown(rows: list[dict], header: str) -> str:
    """The rows as a markdown table; "max RSS GiB" is the process's high-water mark when the row finished."""
    lines = [header, "", "| section | impl | shape | ms | GFLOP | TFLOP/s | % peak | peak GiB | max RSS GiB | note |",
             "|---" * 10 + "|"]
    cell = lambda v: "–" if v is None or v == "" else v  # noqa: E731
    for r in rows:
        lines.append("| " + " | ".join(str(cell(r.get(k))) for k in ("section", "impl", "shape", "ms", "gflop", "tflops",
                                                                     "pct_peak", "peak_gib", "max_rss_gib", "note"))
                     + " |")
    return "\n".join(lines) + "\n"


def environment(device: torch.device, peak: float | None) -> dict:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__ if diffusers else
            None, "measured_peak_bf16_tflops": round(peak, 1) if peak else None}


def parse_args(argv=None) -> BenchConfig:
    cfg = parse_settings(argparse.ArgumentParser(description=__doc__.split("\n")[0]), BenchConfig, argv)
    if cfg.device == "cpu":
        cfg = dataclasses.replace(cfg, bf16=False)  # bf16 timings on CPU say nothing about a GPU
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.suite:
        return run_suite(cfg)
    for limit in ("cache_size_limit", "recompile_limit"):  # every variant × shape is its own graph: no eager fallback
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
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
        for names, name, fn in (({"unet"}, "unet", unet_rows), ({"step", "lora"}, "step", step_rows),
                                ({"sample"}, "sample", sample_rows)):
            if names & set(cfg.rows.split(",")):
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


# ---- every GPU question in one run (tools/gpu_run.sh) ----------------------------------------------------------

BEGIN, END = "<!-- gpu_run.sh: begin (generated; edits between these markers are overwritten) -->", \
    "<!-- gpu_run.sh: end -->"


def suite_items(cfg: BenchConfig) -> list:
    """(title, bench flags) of the suite, most important first: each switch on and off on the same rows."""
    graphs = [] if cfg.device == "cpu" else ["cuda_graphs+fuse_qkv"]  # CUDA graphs exist only on a GPU
    sample_variants = ["base", "bf16_decode", "fuse_qkv", "channels_last", "compile", "compile+fuse_qkv+bf16_decode",
                       *[g + "+bf16_decode" for g in graphs], "compile+fuse_qkv+channels_last+bf16_decode"]
    unet_variants = ["base", "channels_last", "fuse_qkv", "compile", "compile+fuse_qkv",
                     "compile+fuse_qkv+channels_last", *graphs]
    return [
        ("2-step generation, B = 1: each switch",
         ["--rows", "sample", "--sample-batches", "1", "--variants", ",".join(sample_variants)]),
        ("UNet forward: each switch", ["--rows", "unet", "--shapes", "1x512,32x512", "--variants", ",".join(unet_variants)]),
        ("training steps, eager (SCott, LCM-style, SCott-LoRA eager/checkpointed/compiled)", ["--rows", "step"]),
        ("training steps, compiled", ["--rows", "step", "--compile", "--lora-modes", "eager", "--impls", "ours"]),
    ]


def run_suite(cfg: BenchConfig) -> list[dict]:
    """Run suite_items, then tools.gpu_check, within cfg.budget_s (an item not started in time is listed as not run),
    and write every table into cfg.docs between BEGIN and END (the rest of the file is left as it is)."""
    from tools import gpu_check  # gpu_check imports this module
    t0, sections, rows = time.time(), [], []
    common = ["--device", cfg.device, "--warmup", str(cfg.warmup), "--repeats", str(cfg.repeats),
              "--micro-batch", str(cfg.micro_batch), "--compile-backend", cfg.compile_backend,
              *(["--tiny"] if cfg.tiny else [])]
    for title, flags in suite_items(cfg):
        if time.time() - t0 > cfg.budget_s:
            sections.append(f"### {title}\n\nnot run: the {cfg.budget_s} s budget was spent\n")
            continue
        out = Path(cfg.out) / title.split(",")[0].replace(" ", "-").replace("=", "")
        new = main([*common, *flags, "--out", str(out)])
        rows += new
        sections.append(f"### {title}\n\n`python -m tools.bench {' '.join(common + flags)}`\n\n" +
                        markdown(new, f"{time.time() - t0:.0f} s into the run"))
    log = io.StringIO()
    if time.time() - t0 <= cfg.budget_s:
        with redirect_stdout(log):
            status = gpu_check.main(["--device", cfg.device, *(["--tiny"] if cfg.tiny else []),
                                     "--out", str(Path(cfg.out) / "gpu_check")])
        print(log.getvalue(), flush=True)
        sections.append(f"### tools/gpu_check.py (exit status {status})\n\n```\n{log.getvalue().strip()}\n```\n")
    else:
        sections.append(f"### tools/gpu_check.py\n\nnot run: the {cfg.budget_s} s budget was spent\n")
    env = environment(torch.device(cfg.device), None)
    header = (f"Generated by `tools/gpu_run.sh` ({time.time() - t0:.0f} s): {env['device']}, torch {env['torch']}, "
              f"CUDA {env['cuda']}, diffusers {env['diffusers']}; warm-up {cfg.warmup}, repeats {cfg.repeats}"
              f"{'; TINY shapes (a dry run, not a measurement)' if cfg.tiny else ''}.\n")
    write_section(Path(cfg.docs), header + "\n" + "\n".join(sections))
    print(f"wrote the tables into {cfg.docs}")
    return rows


def write_section(path: Path, text: str) -> None:
    """Replace what lies between BEGIN and END in `path` by `text` (append the markers if absent), atomically."""
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        before, after = old.split(BEGIN)[0], old.split(END, 1)[1]
    else:
        before, after = old + ("\n" if old and not old.endswith("\n") else ""), "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{before}{BEGIN}\n{text.rstrip()}\n{END}{after}")
    tmp.replace(path)


if __name__ == "__main__":
    main()
