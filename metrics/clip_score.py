"""CLIP score: how well each image matches its caption, as the cosine of their CLIP embeddings.

Any Hugging Face-format CLIP (transformers' CLIPModel) from a local folder or a hub id already in the local cache;
ViT-L/14 (`openai/clip-vit-large-patch14`) by default. Two numbers are reported, because papers use both:
  - clip_cosine: the mean raw cosine similarity (≈ 0.26–0.32 for SD1.5-class models with ViT-L/14);
  - clip_score:  torchmetrics' `CLIPScore`: 100 · max(mean cosine, 0) (torchmetrics clamps the *mean* at 0).
Image preprocessing is the model's own preprocessor_config.json through transformers' PIL image processor (bicubic
resize of the short side, centre crop, CLIP normalisation); captions are tokenized with the model's tokenizer,
padded, and truncated to its context length (77 tokens for OpenAI CLIP). An optional prefix ("A photo of ") is
prepended to every caption.
"""
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, CLIPModel

try:  # transformers >= 5 names the PIL processor this; its plain CLIPImageProcessor needs torchvision
    from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
    from transformers import CLIPImageProcessor as _ImageProcessor

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class ClipScorer:
    """A CLIP model with its tokenizer and image processor; `cosines(images, captions)` -> (B,) float64."""

    def __init__(self, name_or_path: str = DEFAULT_CLIP, device="cpu", prefix: str = ""):
        local = Path(name_or_path).is_dir()
        try:
            self.model = CLIPModel.from_pretrained(name_or_path, local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            self.processor = _ImageProcessor.from_pretrained(name_or_path, local_files_only=True)
        except (OSError, ValueError) as e:
            where = "this folder" if local else "the local Hugging Face cache (no downloads are made)"
            raise FileNotFoundError(
                f"--clip {name_or_path}: no Hugging Face CLIP model (config.json, weights, tokenizer, "
                f"preprocessor_config.json) found in {where} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                f"Pass a folder saved with CLIPModel/CLIPProcessor.save_pretrained, e.g. a copy of "
                f"{DEFAULT_CLIP}.") from None
        self.device = torch.device(device)
        self.prefix = prefix
        self.context = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def cosines(self, images: list[np.ndarray], captions: list[str]) -> torch.Tensor:
        """uint8 RGB images (H, W, 3) and their captions -> cosine similarity per pair (B,), float64."""
        if len(images) != len(captions):
            raise ValueError(f"CLIP score: {len(images)} images but {len(captions)} captions.")
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]   # (B, 3, 224, 224)
        text = self.tokenizer([self.prefix + c for c in captions], padding=True, truncation=True,
                              max_length=self.context, return_tensors="pt")
        m = self.model
        image_emb = m.visual_projection(m.vision_model(pixel_values=pixels.to(self.device)).pooler_output)
        text_emb = m.text_projection(m.text_model(input_ids=text.input_ids.to(self.device),
                                                  attention_mask=text.attention_mask.to(self.device)).pooler_output)
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)                           # (B, D)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return (image_emb * text_emb).sum(-1).double().cpu()


def summarize(cosines: torch.Tensor) -> dict:
    """Per-pair cosines (N,) -> {clip_cosine: mean cosine, clip_score: torchmetrics' 100·max(mean cos, 0)}."""
    mean = cosines.double().mean().item()
    return {"clip_cosine": mean, "clip_score": 100 * max(mean, 0.0)}
