"""The toy world: captioned 32×32 images of patterned shapes, made on the fly, and a tiny pixel-space teacher.

Nobody needs to download SD1.5 to watch SCott work: the toy world has the same pieces at laptop size.
  - data: a shape (circle, square, triangle) of a colour (red, green, blue, yellow) with a pattern (plain, striped,
    dotted) at a position (left, right, top, bottom, centre) on a mid-grey, faintly textured background, with random
    size, exact place, rotation, shade and pattern angle and phase. A caption names each attribute or leaves it open
    ("a striped red circle on the left", "a red shape", "a circle", "a shape": 480 captions), so the images of one
    caption are many modes with fine, randomly placed detail: what a teacher needs many steps to draw, and what a
    few-step sampler is tempted to average into a blur;
  - text: a word-level tokenizer and a tiny CLIP text encoder (transformers), randomly initialised with a fixed seed
    and frozen. It does not need to understand language: its only job is to turn each caption into a distinct
    sequence of token features for the UNet to cross-attend to, exactly where SD1.5 puts CLIP;
  - teacher: a small UNet (unet.py) trained with the standard ε-prediction loss (plus offset noise, see
    train_teacher) on SD1.5's own noise schedule, in pixel space (sd15.py's IdentityVAE stands in for the VAE),
    shipped in toy/ in the diffusers layout so `sd15.load_sd15("toy")` loads it like SD1.5.

    python -m toyworld.toy train-teacher --out toy/      # regenerates the teacher in toy/ (resumable: see --state)
    python -m toyworld.toy show --out toy_data.png        # a grid of training images
"""
import argparse
import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from checkpoint import atomic_write
from sample import save_grid
from sd15 import TOY_FOLDER, encode_prompts
from sde_solver import NoiseSchedule
from unet import UNet, UNetConfig, save_unet

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
PATTERNS = ("plain", "striped", "dotted")
POSITIONS = ("left", "right", "top", "bottom", "centre")
ATTRIBUTES = ("shape", "colour", "pattern", "position")  # the order of a label row
VALUES = (SHAPES, COLOURS, PATTERNS, POSITIONS)
OPEN = -1  # a label entry the caption leaves open: any value, drawn uniformly at random
# Caption words for each position: "a red circle on the left", "a blue square at the top", ...
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "centre": "in the centre"}
NAMED_PROBABILITY = 0.6  # a training caption names each attribute with this probability, independently

# Rendering constants, in units of the image side (so any resolution draws the same picture).
COLOUR_RGB = torch.tensor([[0.90, 0.16, 0.14], [0.18, 0.78, 0.22], [0.20, 0.36, 0.96], [0.95, 0.84, 0.16]])
POSITION_XY = torch.tensor([[0.28, 0.50], [0.72, 0.50], [0.50, 0.28], [0.50, 0.72], [0.50, 0.50]])  # (x, y), y down
POSITION_JITTER = 0.06          # the shape's centre moves up to this far in x and y
RADIUS_RANGE = (0.15, 0.20)     # circle radius; square and triangle are sized to a similar area
MAX_ROTATION = math.pi / 12     # squares and triangles turn up to ±15°
SHADE_RANGE = (0.7, 1.0)        # brightness factor of the shape's colour
PATTERN_PERIOD = 0.15           # stripes and the dot lattice repeat every 0.15 of the side (4.8 px at 32 px)
PATTERN_DEPTH = 0.65            # stripes and dots darken the shape's colour by this fraction
DOT_RADIUS = 0.3                # dot radius, in periods
# Mid-grey background, before a faint tint and texture. Not dark, on purpose: SD1.5's schedule keeps √ᾱ_999 ≈ 0.07 of
# the image at t = 999, so a model learns to read the image's mean colour there, and a sampler's pure-noise start
# (mean 0) then asks for a mean-zero image. SD's latents are near zero-mean; toy images centred on 0 ([-1, 1]) are too.
# (A dark data set trains fine but samples come out with washed-out, tinted backgrounds.)
BACKGROUND_RANGE = (0.40, 0.56)


# ---- prompts ------------------------------------------------------------------------------------------------------

def make_prompt(shape=None, colour=None, pattern=None, position=None) -> str:
    """The caption naming the given attributes, None = left open: ("circle", "red", "striped", "left") ->
    "a striped red circle on the left"; (None, "red", None, None) -> "a red shape"; all None -> "a shape"."""
    words = ["a", pattern, colour, shape or "shape", POSITION_PHRASES[position] if position else None]
    return " ".join(w for w in words if w)


def parse_prompt(prompt: str) -> tuple:
    """The inverse of make_prompt: "a striped red circle on the left" -> ("circle", "red", "striped", "left"),
    "a blue shape" -> (None, "blue", None, None)."""
    words = prompt.lower().split()
    phrases = {v: k for k, v in POSITION_PHRASES.items()}
    if words[:1] == ["a"]:
        words = words[1:]
        pattern = words.pop(0) if words and words[0] in PATTERNS else None
        colour = words.pop(0) if words and words[0] in COLOURS else None
        noun = words.pop(0) if words and words[0] in SHAPES + ("shape",) else None
        position = phrases.get(" ".join(words)) if words else None
        if noun and (position or not words):
            return (None if noun == "shape" else noun), colour, pattern, position
    raise ValueError(f"prompt {prompt!r} is not a toy-world caption. Expected 'a [PATTERN] [COLOUR] SHAPE [POSITION]' "
                     f"with PATTERN in {PATTERNS}, COLOUR in {COLOURS}, SHAPE in {SHAPES + ('shape',)} ('shape' = "
                     f"any) and POSITION one of {tuple(POSITION_PHRASES.values())}; the bracketed words may be left "
                     f"out, e.g. {make_prompt('circle', 'red', None, 'left')!r}.")


def all_prompts() -> list[str]:
    """Every caption of the toy world (480: each attribute named or left open), in a fixed order."""
    options = [(None, *values) for values in VALUES]
    return [make_prompt(s, c, pa, po) for s in options[0] for c in options[1] for pa in options[2] for po in options[3]]


def labels_to_prompts(labels: torch.Tensor) -> list[str]:
    """Labels (B, 4) of (shape, colour, pattern, position) indices, OPEN for an attribute left open -> captions."""
    return [make_prompt(*(values[i] if i != OPEN else None for values, i in zip(VALUES, row))) for row in labels.tolist()]


def prompts_to_labels(prompts: list[str]) -> torch.Tensor:
    """Captions -> labels (B, 4) of (shape, colour, pattern, position) indices, OPEN where the caption names none."""
    rows = [[values.index(a) if a else OPEN for values, a in zip(VALUES, parse_prompt(p))] for p in prompts]
    return torch.tensor(rows, dtype=torch.long).reshape(len(prompts), len(ATTRIBUTES))


# ---- images -------------------------------------------------------------------------------------------------------

def sample_labels(n: int, generator: torch.Generator) -> torch.Tensor:
    """n uniformly random (shape, colour, pattern, position) index rows, (n, 4), none open."""
    sizes = torch.tensor([len(values) for values in VALUES])
    return (torch.rand(n, len(VALUES), generator=generator) * sizes).long().clamp(max=sizes - 1)


def fill_open(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels (B, 4) with every OPEN entry replaced by a uniformly random value (a caption's images)."""
    drawn = sample_labels(labels.shape[0], generator)
    return torch.where(labels == OPEN, drawn, labels)


def render(labels: torch.Tensor, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """Images (B, 3, size, size) in [-1, 1] of the shapes named by labels (B, 4), none OPEN (see fill_open), with
    random jitter from `generator`.

    Every random number is drawn for every image in the same order whatever its labels, so an image depends only on
    its labels and the generator state. Shapes and dots are drawn from signed distances with a one-pixel soft edge
    (anti-aliasing), stripes as a clipped cosine; all in torch, vectorised over the batch. A pattern has a random
    orientation and phase: the detail a few-step sampler must commit to, not average away.
    """
    n = labels.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    shape, colour, pattern, position = labels.unbind(1)
    centre = POSITION_XY[position] + (2 * rand(n, 2) - 1) * POSITION_JITTER       # (B, 2)
    radius = RADIUS_RANGE[0] + (RADIUS_RANGE[1] - RADIUS_RANGE[0]) * rand(n)      # (B,)
    angle = (2 * rand(n) - 1) * MAX_ROTATION                                       # (B,)
    shade = SHADE_RANGE[0] + (SHADE_RANGE[1] - SHADE_RANGE[0]) * rand(n, 1)
    rgb = (COLOUR_RGB[colour] * shade + (rand(n, 3) - 0.5) * 0.1).clamp(0, 1)      # (B, 3)
    grey = BACKGROUND_RANGE[0] + (BACKGROUND_RANGE[1] - BACKGROUND_RANGE[0]) * rand(n, 1)
    tint = (rand(n, 3) - 0.5) * 0.04
    # Faint texture: smooth noise, a 4×4 grid of random values upsampled to the image.
    texture = F.interpolate((rand(n, 1, 4, 4) - 0.5) * 0.08, size=(size, size), mode="bilinear", align_corners=False)
    background = (grey + tint)[:, :, None, None] + texture                         # (B, 3, H, W)
    pattern_angle, phase = rand(n) * math.pi, rand(n, 2)                           # (B,), (B, 2) in periods

    # Pixel centres, (1, 1, W) and (1, H, 1), then relative to the shape's centre, rotated into the shape's frame.
    coords = (torch.arange(size) + 0.5) / size
    px, py = coords[None, None, :], coords[None, :, None]
    dx, dy = px - centre[:, 0, None, None], py - centre[:, 1, None, None]          # (B, H, W) each
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    x, y = cos * dx + sin * dy, -sin * dx + cos * dy
    r = radius[:, None, None]
    circle = torch.sqrt(x ** 2 + y ** 2) - r
    square = torch.maximum(x.abs(), y.abs()) - 0.886 * r  # half-side 0.886 r: the circle's area
    # Upward equilateral triangle: the largest signed distance to its three edges (normals down, up-left, up-right).
    triangle = torch.maximum(torch.maximum(y, -0.5 * y + 0.866 * x), -0.5 * y - 0.866 * x) - 0.7 * r
    distance = torch.where(shape[:, None, None] == 0, circle, torch.where(shape[:, None, None] == 1, square, triangle))
    coverage = (0.5 - distance * size).clamp(0, 1)[:, None]                        # (B, 1, H, W), soft edge

    # The pattern, in image coordinates turned by pattern_angle, in periods (u, v), shifted by the random phase.
    pc, ps = pattern_angle.cos()[:, None, None], pattern_angle.sin()[:, None, None]
    u = (pc * px + ps * py) / PATTERN_PERIOD + phase[:, 0, None, None]
    v = (-ps * px + pc * py) / PATTERN_PERIOD + phase[:, 1, None, None]
    stripes = (0.5 + torch.cos(2 * math.pi * u) * size * PATTERN_PERIOD / 4).clamp(0, 1)  # edges about a pixel wide
    to_dot = torch.sqrt((u - u.round()) ** 2 + (v - v.round()) ** 2) * PATTERN_PERIOD   # to the nearest lattice point
    dots = (0.5 - (to_dot - DOT_RADIUS * PATTERN_PERIOD) * size).clamp(0, 1)
    p = pattern[:, None, None]
    mark = torch.where(p == 0, torch.zeros_like(dots), torch.where(p == 1, stripes, dots))[:, None]
    fill = rgb[:, :, None, None] * (1 - PATTERN_DEPTH * mark)                      # (B, 3, H, W)
    image = background * (1 - coverage) + fill * coverage
    return image.clamp(0, 1) * 2 - 1


def batch_seed(seed: int, rank: int, index: int) -> int:
    """A 63-bit seed for batch `index` of `rank`: numpy's SeedSequence mixes the three so no two batches share one."""
    return int(np.random.SeedSequence([seed, rank, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def make_toy_batch(batch_size: int, generator: torch.Generator, size: int = 32) -> dict:
    """One batch: image (B, 3, size, size) in [-1, 1], caption list[str] naming each attribute with probability
    NAMED_PROBABILITY, labels (B, 4) of what the image shows, skipped 0."""
    labels = sample_labels(batch_size, generator)
    named = torch.rand(labels.shape, generator=generator) < NAMED_PROBABILITY
    return {"image": render(labels, generator, size), "caption": labels_to_prompts(labels.where(named, OPEN)),
            "labels": labels, "skipped": 0}


def make_toy_loader(batch_size: int, rank: int = 0, world_size: int = 1, start_batch: int = 0, seed: int = 0,
                    size: int = 32):
    """Endless batches of the toy world for one DDP rank, the same interface as data.py's loaders.

    Batch i of rank r is a pure function of (seed, r, i), so a trainer resumed at `start_batch` sees exactly the
    batches it would have seen, and ranks never see the same batch. Nothing is shared between ranks, so `world_size`
    is only checked.
    """
    if batch_size < 1 or not 0 <= rank < world_size or start_batch < 0:
        raise ValueError(f"make_toy_loader: need batch_size ≥ 1, 0 ≤ rank < world_size and start_batch ≥ 0; got "
                         f"batch_size {batch_size}, rank {rank}, world_size {world_size}, start_batch {start_batch}.")
    index = start_batch
    while True:
        yield make_toy_batch(batch_size, torch.Generator().manual_seed(batch_seed(seed, rank, index)), size)
        index += 1


# ---- the toy world as train.py's and sample.py's model --------------------------------------------------------

# The toy model folder's own defaults, written beside its weights as scott.toml: train.py reads the [train] table
# and sample.py the [sample] table of any model folder that has one, below --config and the command line. A 1.7M-
# parameter UNet learns faster than SD1.5's at the paper's learning rates, and a rank-128 LoRA would be most of it.
# No adversarial term: on the first toy world it cost quality at 2 and 4 steps at every weight tried
# (docs/toy-v1.md); the toy study tests it again (docs/toy-study.md). Micro-batch 0 = the global batch split over
# the ranks, so a `torchrun` of any size works.
SCOTT_TOML = """\
# The toy model's own defaults (written by toyworld/toy.py). train.py reads [train], sample.py [sample];
# a --config preset and flags on the command line win over them.
[train]
data = "toyworld.toy:make_toy_loader"   # synthetic captioned shapes, made on the fly (no files)
steps = 400
global_batch = 16
micro_batch = 0
lr = 1e-4
d_lr = 1e-4
warmup = 20
adv_weight = 0.0
ckpt_every = 200
sample_every = 200
log_every = 20
resolution = 32
lora_rank = 4
lora_alpha = 4.0
w_min = 2.0
w_max = 6.0

[sample]
student = "student"                     # the distilled student shipped beside the teacher
guidance = 3.0
prompt = "a red circle on the left"
grid_prompts = ["a striped red circle on the left", "a dotted shape", "a green triangle"]
"""


# ---- text: word-level tokenizer and a tiny, frozen, random CLIP text encoder ------------------------------------

PAD, UNK = "<pad>", "<unk>"
CONTEXT_LENGTH = 16  # tokens per caption, padded; captions have 6 words


def vocabulary() -> list[str]:
    """Every word of every caption, after the pad and unknown tokens (pad is id 0)."""
    words = sorted({w for p in all_prompts() for w in p.split()})
    return [PAD, UNK] + words


def build_tokenizer():
    """A word-level tokenizer (lower-cased, split on whitespace and punctuation, unknown words -> <unk>), padded to
    CONTEXT_LENGTH, wrapped as a transformers tokenizer so `save_pretrained` / `AutoTokenizer` handle it like CLIP's."""
    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK,
                                   model_max_length=CONTEXT_LENGTH)


def build_text_encoder(hidden_size: int, seed: int = 0):
    """A 2-layer CLIPTextModel with random weights from `seed`, frozen. It never learns: random token and position
    embeddings mixed by random (causal) attention already give each caption a distinct feature sequence, and the
    UNet learns to read them, which is all SD1.5 asks of CLIP. Its width must be the UNet's cross_attention_dim.
    The empty prompt (all <pad>) is the unconditional input of classifier-free guidance."""
    config = CLIPTextConfig(vocab_size=len(vocabulary()), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=CONTEXT_LENGTH,
                            hidden_act="quick_gelu", pad_token_id=0, bos_token_id=0,
                            eos_token_id=0)  # "eos" = the first pad after the words: the pooled output (unused)
    torch.manual_seed(seed)  # CLIPTextModel draws its init from the global generator
    return CLIPTextModel(config).eval().requires_grad_(False)


# ---- the teacher: a small pixel-space UNet trained with the ε-prediction loss ----------------------------------

@dataclass
class TeacherConfig:
    steps: int = 6000
    batch_size: int = 32
    lr: float = 1e-3             # peak, after a linear warm-up; cosine decay to lr/10 at `steps`
    warmup: int = 200
    ema_decay: float = 0.999     # the saved teacher is the EMA of the weights (smoother samples)
    caption_dropout: float = 0.1 # fraction of captions replaced by "" so the teacher also learns ε(x, t, ""): CFG
    offset_noise: float = 0.1    # std of an extra per-image, per-channel constant in ε (see train_teacher)
    grad_clip: float = 1.0
    save_every: int = 1000
    log_every: int = 50
    seed: int = 0                # data and noise; the text encoder has its own fixed seed
    text_seed: int = 0


def write_toy_folder(out, unet, text_encoder, tokenizer) -> None:
    """The diffusers layout that sd15.load_sd15 reads: model_index.json (pixel_space: no vae/), scheduler/, tokenizer/,
    text_encoder/, unet/. Each part is written to a temporary folder and swapped in, so an interrupted save never
    leaves a half-written part; other contents of `out` (classifier.safetensors, student/) are left alone."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "ScottToyPipeline", "pixel_space": True,
             "_comment": "the scott toy world (toyworld/toy.py): 32x32 RGB pixel space, no VAE; load with sd15.load_sd15"}
    scheduler = {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon"}  # SD1.5's schedule
    _swap_in(out / "scheduler", lambda d: (d / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2)))
    _swap_in(out / "tokenizer", lambda d: tokenizer.save_pretrained(str(d)))
    _swap_in(out / "text_encoder", lambda d: text_encoder.save_pretrained(str(d)))
    _swap_in(out / "unet", lambda d: save_unet(unet, d))
    atomic_write(out / "scott.toml", lambda tmp: tmp.write_text(SCOTT_TOML))
    atomic_write(out / "model_index.json", lambda tmp: tmp.write_text(json.dumps(index, indent=2)))


def _swap_in(folder: Path, write) -> None:
    """Write a folder's contents into a fresh temporary sibling, then replace `folder` with it."""
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def train_teacher(cfg: TeacherConfig, out, state_file=None) -> None:
    """The standard DDPM objective (Ho et al. 2020, eq. 14): E‖ε − ε_θ(√ᾱ_t x0 + √(1 − ᾱ_t) ε, t, c)‖², t uniform in
    [0, 999] of SD1.5's schedule, c the caption's token features (the empty prompt 10 % of the time). AdamW, EMA of
    the weights, bf16 autocast on CUDA (fp32 on CPU); the EMA teacher is saved to `out` every `save_every` steps.

    One deviation, offset noise (N. Guttenberg, "Diffusion with offset noise", 2023): ε gets an extra constant per
    image and channel. At t = 999 SD1.5's schedule leaves √ᾱ ≈ 0.07 of the image, so x̂0's mean colour is the small
    difference mean(x_t) − mean(ε̂), amplified 15×. With plain Gaussian ε that mean is 1/1024 of the loss and this
    GroupNorm-heavy UNet learned to ignore it (mean(ε̂) ≈ 0.1 · mean(x_t) at t = 999 after 3000 steps), so every
    sample got a random, strongly tinted background. The offset makes the mean a real part of ε to predict (with it:
    mean(ε̂) ≈ 0.99 · mean(x_t) after 6000 steps, and grey backgrounds).

    With `state_file`, the full training state (weights, EMA, optimiser, step, random generator) is written there at
    every save, atomically, and read back if it exists, so an interrupted training continues exactly where its last
    save left it (the data of step i is a pure function of the seed and i)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unet_cfg = UNetConfig.toy()
    tokenizer, text_encoder = build_tokenizer(), build_text_encoder(unet_cfg.cross_attention_dim, cfg.text_seed)
    torch.manual_seed(cfg.seed)  # the UNet's initial weights
    unet = UNet(unet_cfg).to(device).train()
    ema = UNet(unet_cfg).to(device).eval().requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    text_encoder.to(device)
    schedule = NoiseSchedule.sd15(device=device)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator(device).manual_seed(cfg.seed + 1)  # timesteps, noise, caption dropout
    start = resume_teacher(state_file, cfg, unet, ema, opt, generator, device)
    loader = make_toy_loader(cfg.batch_size, seed=cfg.seed, start_batch=start)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"toy teacher: {n_params / 1e6:.2f}M parameters, device {device}, batch {cfg.batch_size}, "
          f"{cfg.steps} steps -> {out}", flush=True)

    t0, loss_sum = time.time(), 0.0
    for step in range(start + 1, cfg.steps + 1):
        # Linear warm-up, then cosine decay from lr to lr/10.
        progress = max(0.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        lr = cfg.lr * min(1.0, step / cfg.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(loader)
        drop = torch.rand(len(batch["image"]), generator=generator, device=device) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
        with torch.no_grad():
            context = encode_prompts(tokenizer, text_encoder, captions)           # (B, 16, 64)
        loss = teacher_loss(unet, batch["image"].to(device), context, schedule, cfg, generator, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        # EMA with a warm-up (decay (1 + n)/(10 + n) early on), so early saves are not dominated by the random init.
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1 - decay)
        loss_sum += loss.item()
        if step % cfg.log_every == 0:
            print(f"step {step}/{cfg.steps} | loss {loss_sum / cfg.log_every:.4f} | lr {lr:.2e} | "
                  f"{(step - start) / (time.time() - t0):.2f} it/s | {(time.time() - t0) / 60:.1f} min", flush=True)
            loss_sum = 0.0
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_teacher(out, state_file, cfg, step, unet, ema, opt, generator, text_encoder, tokenizer, device)


def teacher_loss(unet, x0, context, schedule: NoiseSchedule, cfg: TeacherConfig, generator, autocast):
    """‖ε − ε_θ(x_t, t, c)‖² for clean images x0 (B, 3, 32, 32) in [-1, 1], with offset noise (see train_teacher)."""
    t = torch.randint(0, schedule.num_timesteps, (len(x0),), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    noise = noise + cfg.offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=generator, device=x0.device)
    with autocast:
        eps = unet(schedule.add_noise(x0, noise, t), t, context)
    return F.mse_loss(eps.float(), noise)


def resume_teacher(state_file, cfg: TeacherConfig, unet, ema, opt, generator, device) -> int:
    """Load `state_file` into the training state if it exists (refusing one of other settings); the step to
    continue from (0 for a fresh start)."""
    if not (state_file and Path(state_file).is_file()):
        return 0
    state = torch.load(state_file, map_location=device, weights_only=True)
    if state["config"] != asdict(cfg):
        raise ValueError(f"{state_file}: was written by a teacher training with other settings "
                         f"({state['config']}); pass those, or another --state file to start afresh.")
    unet.load_state_dict(state["unet"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    generator.set_state(state["generator"].cpu())
    print(f"resumed from {state_file} at step {state['step']}", flush=True)
    return state["step"]


def save_teacher(out, state_file, cfg: TeacherConfig, step: int, unet, ema, opt, generator, text_encoder,
                 tokenizer, device):
    """The EMA teacher into the toy model folder `out` (float16 halves the repository's share; loaders cast back
    to float32; the text encoder is tiny), and with `state_file` the full training state, atomically."""
    teacher = copy.deepcopy(ema).to("cpu", torch.float16)
    write_toy_folder(out, teacher, text_encoder.cpu(), tokenizer)
    text_encoder.to(device)
    if state_file:
        state = {"config": asdict(cfg), "step": step, "unet": unet.state_dict(), "ema": ema.state_dict(),
                 "opt": opt.state_dict(), "generator": generator.get_state()}
        Path(state_file).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(state_file), lambda tmp: torch.save(state, tmp))
    print(f"saved the EMA teacher (float16) to {out} at step {step}", flush=True)


# ---- command line -------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train-teacher", help="train the toy teacher and write the toy model folder")
    for name, value in asdict(TeacherConfig()).items():
        train.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    train.add_argument("--out", default=str(TOY_FOLDER))
    train.add_argument("--state", default="runs/toy-teacher/state.pt",
                       help="training state, saved with every teacher save and resumed from if it exists")
    show = sub.add_parser("show", help="write a grid of training images with their captions")
    show.add_argument("--n", type=int, default=64)
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--out", default="toy_data.png")
    args = vars(p.parse_args(argv))
    command, out = args.pop("command"), args.pop("out")
    if command == "train-teacher":
        state = args.pop("state")
        train_teacher(TeacherConfig(**args), out, state)
    else:
        batch = make_toy_batch(args["n"], torch.Generator().manual_seed(args["seed"]))
        save_grid((batch["image"] + 1) / 2, out, columns=8, metadata={"captions": json.dumps(batch["caption"])})
        print("\n".join(f"{i}: {c}" for i, c in enumerate(batch["caption"])))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
