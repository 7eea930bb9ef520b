"""The toy world: captioned 32×32 images of coloured shapes, made on the fly, and a tiny pixel-space teacher.

Nobody needs to download SD1.5 to watch SCott work: the toy world has the same pieces at laptop size.
  - data: a shape (circle, square, triangle) of a colour (red, green, blue, yellow) at a position (left, right, top,
    bottom, centre) on a mid-grey, faintly textured background, with random size, exact place, rotation and shade,
    so the distribution has real diversity; captions like "a red circle on the left" (60 prompts in all);
  - text: a word-level tokenizer and a tiny CLIP text encoder (transformers), randomly initialised with a fixed seed
    and frozen. It does not need to understand language: its only job is to turn each caption into a distinct
    sequence of token features for the UNet to cross-attend to, exactly where SD1.5 puts CLIP;
  - teacher: a small UNet (unet.py) trained with the standard ε-prediction loss (plus offset noise, see
    train_teacher) on SD1.5's own noise schedule, in pixel space (sd15.py's IdentityVAE stands in for the VAE),
    shipped in toy/ in the diffusers layout so `sd15.load_sd15("toy")` loads it like SD1.5.

    python toy.py train-teacher --steps 6000 --batch-size 32 --out toy/      # regenerates the teacher in toy/
    python toy.py show --out toy_data.png                                     # a grid of training images
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
POSITIONS = ("left", "right", "top", "bottom", "centre")
# Caption words for each position: "a red circle on the left", "a blue square at the top", ...
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "centre": "in the centre"}

# Rendering constants, in units of the image side (so any resolution draws the same picture).
COLOUR_RGB = torch.tensor([[0.90, 0.16, 0.14], [0.18, 0.78, 0.22], [0.20, 0.36, 0.96], [0.95, 0.84, 0.16]])
POSITION_XY = torch.tensor([[0.28, 0.50], [0.72, 0.50], [0.50, 0.28], [0.50, 0.72], [0.50, 0.50]])  # (x, y), y down
POSITION_JITTER = 0.06          # the shape's centre moves up to this far in x and y
RADIUS_RANGE = (0.11, 0.16)     # circle radius; square and triangle are sized to a similar area
MAX_ROTATION = math.pi / 12     # squares and triangles turn up to ±15°
SHADE_RANGE = (0.7, 1.0)        # brightness factor of the shape's colour
# Mid-grey background, before a faint tint and texture. Not dark, on purpose: SD1.5's schedule keeps √ᾱ_999 ≈ 0.07 of
# the image at t = 999, so a model learns to read the image's mean colour there, and a sampler's pure-noise start
# (mean 0) then asks for a mean-zero image. SD's latents are near zero-mean; toy images centred on 0 ([-1, 1]) are too.
# (A dark data set trains fine but samples come out with washed-out, tinted backgrounds.)
BACKGROUND_RANGE = (0.40, 0.56)


# ---- prompts ------------------------------------------------------------------------------------------------------

def make_prompt(shape: str, colour: str, position: str) -> str:
    """("circle", "red", "left") -> "a red circle on the left"."""
    return f"a {colour} {shape} {POSITION_PHRASES[position]}"


def parse_prompt(prompt: str) -> tuple[str, str, str]:
    """The inverse of make_prompt: "a red circle on the left" -> ("circle", "red", "left")."""
    words = prompt.lower().split()
    phrases = {v: k for k, v in POSITION_PHRASES.items()}
    if len(words) == 6 and words[0] == "a" and words[1] in COLOURS and words[2] in SHAPES:
        position = phrases.get(" ".join(words[3:]))
        if position:
            return words[2], words[1], position
    raise ValueError(f"prompt {prompt!r} is not a toy-world caption. Expected 'a COLOUR SHAPE POSITION' with COLOUR in "
                     f"{COLOURS}, SHAPE in {SHAPES} and POSITION one of {tuple(POSITION_PHRASES.values())}, "
                     f"e.g. {make_prompt('circle', 'red', 'left')!r}.")


def all_prompts() -> list[str]:
    """Every caption of the toy world (60), in a fixed order."""
    return [make_prompt(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]


def labels_to_prompts(labels: torch.Tensor) -> list[str]:
    """Labels (B, 3) of (shape, colour, position) indices -> captions."""
    return [make_prompt(SHAPES[s], COLOURS[c], POSITIONS[p]) for s, c, p in labels.tolist()]


def prompts_to_labels(prompts: list[str]) -> torch.Tensor:
    """Captions -> labels (B, 3) of (shape, colour, position) indices."""
    parsed = [parse_prompt(p) for p in prompts]
    return torch.tensor([[SHAPES.index(s), COLOURS.index(c), POSITIONS.index(p)] for s, c, p in parsed],
                        dtype=torch.long).reshape(len(prompts), 3)


# ---- images -------------------------------------------------------------------------------------------------------

def sample_labels(n: int, generator: torch.Generator) -> torch.Tensor:
    """n uniformly random (shape, colour, position) index triples, (n, 3)."""
    sizes = torch.tensor([len(SHAPES), len(COLOURS), len(POSITIONS)])
    return (torch.rand(n, 3, generator=generator) * sizes).long().clamp(max=sizes - 1)


def render(labels: torch.Tensor, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """Images (B, 3, size, size) in [-1, 1] of the shapes named by labels (B, 3), with random jitter from `generator`.

    Every random number is drawn for every image in the same order whatever its labels, so an image depends only on
    its labels and the generator state. Shapes are drawn from signed distances with a one-pixel soft edge
    (anti-aliasing), all in torch, vectorised over the batch.
    """
    n = labels.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    shape, colour, position = labels[:, 0], labels[:, 1], labels[:, 2]
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

    # Pixel centres relative to the shape's centre, rotated into the shape's frame: (B, H, W) each.
    coords = (torch.arange(size) + 0.5) / size
    dx = coords[None, None, :] - centre[:, 0, None, None]
    dy = coords[None, :, None] - centre[:, 1, None, None]
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    x, y = cos * dx + sin * dy, -sin * dx + cos * dy
    r = radius[:, None, None]
    circle = torch.sqrt(x ** 2 + y ** 2) - r
    square = torch.maximum(x.abs(), y.abs()) - 0.886 * r  # half-side 0.886 r: the circle's area
    # Upward equilateral triangle: the largest signed distance to its three edges (normals down, up-left, up-right).
    triangle = torch.maximum(torch.maximum(y, -0.5 * y + 0.866 * x), -0.5 * y - 0.866 * x) - 0.7 * r
    distance = torch.where(shape[:, None, None] == 0, circle, torch.where(shape[:, None, None] == 1, square, triangle))
    coverage = (0.5 - distance * size).clamp(0, 1)[:, None]                        # (B, 1, H, W), soft edge
    image = background * (1 - coverage) + rgb[:, :, None, None] * coverage
    return image.clamp(0, 1) * 2 - 1


def make_images(shapes, colours, positions, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """Images (B, 3, size, size) in [-1, 1] for given attribute names (three equal-length lists)."""
    if not len(shapes) == len(colours) == len(positions):
        raise ValueError(f"make_images: shapes, colours and positions must have the same length, got "
                         f"{len(shapes)}, {len(colours)} and {len(positions)}.")
    prompts = [make_prompt(s, c, p) for s, c, p in zip(shapes, colours, positions)]
    return render(prompts_to_labels(prompts), generator, size)


def batch_seed(seed: int, rank: int, index: int) -> int:
    """A 63-bit seed for batch `index` of `rank`: numpy's SeedSequence mixes the three so no two batches share one."""
    return int(np.random.SeedSequence([seed, rank, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def make_toy_batch(batch_size: int, generator: torch.Generator, size: int = 32) -> dict:
    """One batch: image (B, 3, size, size) in [-1, 1], caption list[str], labels (B, 3) of the caption, skipped 0."""
    labels = sample_labels(batch_size, generator)
    return {"image": render(labels, generator, size), "caption": labels_to_prompts(labels), "labels": labels,
            "skipped": 0}


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


# ---- the toy world as train.py's target -----------------------------------------------------------------------

# What train.py changes when the model is the toy, unless the flag is given on the command line (printed at start-up
# and shown in `train.py --help`). A 1.7M-parameter UNet learns faster than SD1.5's at the paper's learning rates,
# and a rank-128 LoRA would be most of it. No adversarial term: on the toy it cost quality at 2 and 4 steps at every
# weight tried (README, "The toy world"). Micro-batch 0 = the global batch split over the ranks, so a `torchrun` of
# any size works.
TRAINING_OVERRIDES = dict(steps=400, global_batch=16, micro_batch=0, lr=1e-4, d_lr=1e-4, warmup=20, adv_weight=0.0,
                          ckpt_every=200, sample_every=200, log_every=20, resolution=32, lora_rank=4, lora_alpha=4.0,
                          w_min=2.0, w_max=6.0)
SAMPLE_PROMPTS = ["a red circle on the left", "a blue square at the top", "a green triangle on the right"]


def is_toy_model(model_path) -> bool:
    """True for a pixel-space model folder (its model_index.json says `"pixel_space": true`), as the toy's is; an
    SD1.5 folder or single file never is."""
    index = Path(model_path) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("pixel_space", False) is True


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
             "_comment": "the scott toy world (toy.py): 32x32 RGB pixel space, no VAE; load with sd15.load_sd15"}
    scheduler = {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon"}  # SD1.5's schedule
    _swap_in(out / "scheduler", lambda d: (d / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2)))
    _swap_in(out / "tokenizer", lambda d: tokenizer.save_pretrained(str(d)))
    _swap_in(out / "text_encoder", lambda d: text_encoder.save_pretrained(str(d)))
    _swap_in(out / "unet", lambda d: save_unet(unet, d))
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


def train_teacher(cfg: TeacherConfig, out) -> None:
    """The standard DDPM objective (Ho et al. 2020, eq. 14): E‖ε − ε_θ(√ᾱ_t x0 + √(1 − ᾱ_t) ε, t, c)‖², t uniform in
    [0, 999] of SD1.5's schedule, c the caption's token features (the empty prompt 10 % of the time). AdamW, EMA of
    the weights, bf16 autocast on CUDA (fp32 on CPU); the EMA teacher is saved to `out` every `save_every` steps.

    One deviation, offset noise (N. Guttenberg, "Diffusion with offset noise", 2023): ε gets an extra constant per
    image and channel. At t = 999 SD1.5's schedule leaves √ᾱ ≈ 0.07 of the image, so x̂0's mean colour is the small
    difference mean(x_t) − mean(ε̂), amplified 15×. With plain Gaussian ε that mean is 1/1024 of the loss and this
    GroupNorm-heavy UNet learned to ignore it (mean(ε̂) ≈ 0.1 · mean(x_t) at t = 999 after 3000 steps), so every
    sample got a random, strongly tinted background. The offset makes the mean a real part of ε to predict (with it:
    mean(ε̂) ≈ 0.99 · mean(x_t) after 6000 steps, and grey backgrounds)."""
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
    loader = make_toy_loader(cfg.batch_size, seed=cfg.seed)
    generator = torch.Generator(device).manual_seed(cfg.seed + 1)  # timesteps, noise, caption dropout
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"toy teacher: {n_params / 1e6:.2f}M parameters, device {device}, batch {cfg.batch_size}, "
          f"{cfg.steps} steps -> {out}", flush=True)

    t0, loss_sum = time.time(), 0.0
    for step in range(1, cfg.steps + 1):
        # Linear warm-up, then cosine decay from lr to lr/10.
        progress = max(0.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        lr = cfg.lr * min(1.0, step / cfg.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = next(loader)
        x0 = batch["image"].to(device)                                            # (B, 3, 32, 32) in [-1, 1]
        drop = torch.rand(len(x0), generator=generator, device=device) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
        with torch.no_grad():
            context = encode_prompts(tokenizer, text_encoder, captions)           # (B, 16, 64)
        t = torch.randint(0, schedule.num_timesteps, (len(x0),), generator=generator, device=device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        noise = noise + cfg.offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=generator, device=device)
        with autocast:
            eps = unet(schedule.add_noise(x0, noise, t), t, context)
        loss = F.mse_loss(eps.float(), noise)
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
                  f"{step / (time.time() - t0):.2f} it/s | {(time.time() - t0) / 60:.1f} min", flush=True)
            loss_sum = 0.0
        if step % cfg.save_every == 0 or step == cfg.steps:
            # float16 halves the repository's share (loaders cast back to float32); the text encoder is tiny.
            teacher = copy.deepcopy(ema).to("cpu", torch.float16)
            write_toy_folder(out, teacher, text_encoder.cpu(), tokenizer)
            text_encoder.to(device)
            print(f"saved the EMA teacher (float16) to {out} at step {step}", flush=True)


# ---- command line -------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train-teacher", help="train the toy teacher and write the toy model folder")
    for name, value in asdict(TeacherConfig()).items():
        train.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    train.add_argument("--out", default=str(TOY_FOLDER))
    show = sub.add_parser("show", help="write a grid of training images with their captions")
    show.add_argument("--n", type=int, default=64)
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--out", default="toy_data.png")
    args = vars(p.parse_args(argv))
    command, out = args.pop("command"), args.pop("out")
    if command == "train-teacher":
        train_teacher(TeacherConfig(**args), out)
    else:
        batch = make_toy_batch(args["n"], torch.Generator().manual_seed(args["seed"]))
        save_grid((batch["image"] + 1) / 2, out, columns=8, metadata={"captions": json.dumps(batch["caption"])})
        print("\n".join(f"{i}: {c}" for i, c in enumerate(batch["caption"])))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
