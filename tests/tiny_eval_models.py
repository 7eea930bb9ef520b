"""Tiny stand-ins for the evaluation's pretrained parts and data, written in their real layouts (no downloads):
a CLIP folder as save_pretrained writes it, a narrow FID Inception weight file, and a COCO root."""
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

from metrics.clip_score import _ImageProcessor
from metrics.inception import FIDInception, InceptionConfig
from tiny_models import write_tokenizer


def write_tiny_clip(folder: Path, seed=0) -> Path:
    """A random CLIP (32-wide towers, 32 px images) with tokenizer and image processor, as save_pretrained writes
    it. Name the folder with "openai" in it if torchmetrics must load it (torchmetrics accepts only such names)."""
    write_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    n = len(tokenizer)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1,
                         pad_token_id=n - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(str(folder))
    processor = _ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


def write_tiny_inception(path: Path, seed=0) -> Path:
    """A narrow (width_divisor 8) FID Inception with random weights, saved as the real file's keys."""
    torch.manual_seed(seed)
    net = FIDInception(InceptionConfig(width_divisor=8))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in net.state_dict().items():  # random BatchNorm statistics so the features are not trivial
        if k.endswith("running_var"):
            v = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean"):
            v = torch.randn(v.shape, generator=g) * 0.1
        state[k] = v
    torch.save(state, path)
    return path


CAPTIONS = ["a red bus on a street", "two cats on a sofa", "a plate of food", "a man riding a horse",
            "a kitchen with a stove", "a dog catching a frisbee", "a train at a station", "a bowl of fruit"]


def write_tiny_coco(root: Path, n_images=8, split="val2017", captions_per_image=2, size=(40, 52), seed=0) -> Path:
    """A COCO root: annotations/captions_{split}.json (COCO's own schema) and {split}/ of JPEGs named like COCO's
    (val2017: 000000xxxxxx.jpg; val2014: COCO_val2014_000000xxxxxx.jpg)."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        image_id = 1000 + 37 * i
        name = f"{image_id:012d}.jpg" if split.endswith("2017") else f"COCO_{split}_{image_id:012d}.jpg"
        h, w = size if i % 2 == 0 else size[::-1]  # landscape and portrait: the centre crop matters
        pixels = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / split / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for c in range(captions_per_image):
            # annotation ids out of order, so "the first caption" must sort by id, not take file order
            annotations.append({"id": 50000 + 10 * i + (captions_per_image - c), "image_id": image_id,
                                "caption": f"{CAPTIONS[i % len(CAPTIONS)]} ({c})"})
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(
        {"info": {}, "licenses": [], "images": images, "annotations": annotations}))
    return root
