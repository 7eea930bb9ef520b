"""The toy world: captioned 32×32 images of coloured shapes, made on the fly, and a tiny pixel-space teacher.

Nobody needs to download SD1.5 to watch SCott work: the toy world has the same pieces at laptop size.
  - data: a shape (circle, square, triangle) of a colour (red, green, blue, yellow) at a position (left, right, top,
    bottom, centre) on a dark, faintly textured background, with random size, exact place, rotation and shade, so the
    distribution has real diversity; captions like "a red circle on the left" (60 prompts in all);
  - text: a word-level tokenizer and a tiny CLIP text encoder (transformers), randomly initialised with a fixed seed
    and frozen. It does not need to understand language: its only job is to turn each caption into a distinct
    sequence of token features for the UNet to cross-attend to, exactly where SD1.5 puts CLIP;
  - teacher: the tiny UNet trained with the standard ε-prediction loss on SD1.5's own noise schedule, in pixel space
    (sd15.py's IdentityVAE stands in for the VAE), shipped in toy/ in the diffusers layout so `sd15.load_sd15("toy")`
    loads it like SD1.5.

    python toy.py train-teacher --steps 12000 --batch-size 64 --out toy/     # regenerates toy/ (see README)
    python toy.py show --out toy_data.png                                     # a grid of training images
"""
import argparse
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
BACKGROUND_RANGE = (0.03, 0.12) # dark background grey level, before a faint tint and texture


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
