"""Tiny SD1.5-shaped models written in the real layouts, shared by the tests (no downloads anywhere)."""
import json

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from datasets import write_folder_dataset

from unet import UNet, UNetConfig, make_student, save_unet
from vae import VAE, VAEConfig, save_vae


def byte_characters() -> list[str]:
    """The 256 characters byte-level BPE (GPT-2, CLIP) uses for the bytes: printable ones stand for themselves,
    the others are shifted past 255 so that every byte is a visible character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def write_tokenizer(folder):
    """A byte-level CLIP BPE tokenizer with no merges: every character is a token, as in CLIP's base vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = byte_characters()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def tiny_text_config(vocab_size=514):
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def reference_text_encoder(seed=0):
    torch.manual_seed(seed)
    return CLIPTextModel(tiny_text_config()).eval()


def v4_keys(model: CLIPTextModel) -> dict:
    """The state dict as transformers 4 wrote it (with the `text_model.` level), whatever version is installed."""
    return {("text_model." + k if not k.startswith("text_model.") else k): v.clone()
            for k, v in model.state_dict().items()}


def write_text_encoder_folder(folder, model, keys: dict):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(model.config.to_json_string())
    save_file(keys, str(folder / "model.safetensors"))


def write_tiny_sd15(root, seed=0):
    """A diffusers-layout folder of a tiny SD1.5-shaped model, written by our savers (diffusers' layout)."""
    torch.manual_seed(seed)
    unet_cfg = UNetConfig.tiny()
    unet = UNet(unet_cfg).eval()
    vae = VAE(VAEConfig.tiny()).eval()
    text = reference_text_encoder()
    save_unet(unet, root / "unet")
    save_vae(vae, root / "vae")
    write_text_encoder_folder(root / "text_encoder", text, v4_keys(text))
    write_tokenizer(root / "tokenizer")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return unet, vae, text


# train.py flags for a quick run of a tiny model from write_tiny_sd15: 32 px, global batch 4 in micro-batches of 2
# (accumulation 2 at world size 1), a step a log line, no sample grids, D's LoRA rank 2.
TINY_RUN = ["--resolution", "32", "--global-batch", "4", "--micro-batch", "2", "--log-every", "1",
            "--sample-every", "0", "--warmup", "1", "--lr", "1e-3", "--d-lr", "1e-3", "--lora-rank", "2",
            "--k", "24", "--substeps", "3", "--min-size", "8"]

SAMPLE_SIZE = ["--height", "32", "--width", "32"]  # sample.py flags: the tiny model's native 32 px


def write_tiny_sd15_with_student(root):
    """write_tiny_sd15(root), plus root/student: a student made from its UNet (ω embedding of 16)."""
    unet, _, _ = write_tiny_sd15(root)
    save_unet(make_student(unet, 16), root / "student")
    return root


def write_tiny_run(root, *extra_flags) -> tuple:
    """root/sd15 (write_tiny_sd15) and root/data (16 images of 40 px): (model, data, the train.py flags of a quick
    run on them, TINY_RUN with no DataLoader workers, plus extra_flags)."""
    write_tiny_sd15(root / "sd15")
    data = write_folder_dataset(root / "data", n=16, size=40)
    return root / "sd15", data, ["--model", str(root / "sd15"), "--data", str(data), *TINY_RUN, "--num-workers", "0",
                                 *extra_flags]
