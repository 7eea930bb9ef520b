"""The pretrained SD1.5 bundle: tokenizer + CLIP text encoder + UNet + VAE + noise schedule, from any layout.

`load_sd15(path)` accepts
  - a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/),
  - an original single file (v1-5-pruned-emaonly.safetensors or a .ckpt, read with weights_only=True); it holds
    no tokenizer, so pass `tokenizer=` (a folder with vocab.json + merges.txt, e.g. a diffusers copy's tokenizer/),
  - the toy world's folder (TOY_FOLDER, toy/ in this repo): the same diffusers layout, pixel space, so without vae/.
The text encoder is transformers' CLIPTextModel (CLIP ViT-L/14 text tower), loaded strictly by our own code, so a
missing weight is an error and never a silent random init.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from checkpoint import (LDM_TEXT_PREFIX, SUPPORTED, CheckpointError, RenamedWeights, detect_foreign,
                        find_weights_file, is_positive, load_strict, open_weights, read_config, require)
from sde_solver import NoiseSchedule
from unet import UNet, load_unet
from vae import VAE, IdentityVAE, load_vae

# The shipped toy model (written by toyworld/toy.py, the default model of sample.py, train.py and evaluate.py). It lives here,
# beside the loader that reads it, because toyworld/toy.py itself uses sample.py's grid writer.
TOY_FOLDER = Path(__file__).resolve().parent / "toy"


def model_path(model: str) -> Path:
    """A command's --model, or the shipped toy model when it is empty (the one place that default is chosen)."""
    return Path(model) if model else TOY_FOLDER

# CLIP ViT-L/14 text tower as SD1.5 uses it (its text_encoder/config.json): output (B, 77, 768).
SD15_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
TOKENIZER_HELP = ("pass tokenizer=PATH (--tokenizer PATH on the command line): a folder with the CLIP tokenizer "
                  "(vocab.json + merges.txt), e.g. the tokenizer/ folder of any diffusers copy of SD1.5 or of "
                  "openai/clip-vit-large-patch14")


@dataclass
class SD15:
    """Everything a sampler or trainer needs from the pretrained model."""
    tokenizer: object
    text_encoder: CLIPTextModel
    unet: UNet
    vae: VAE
    alphas_cumprod: torch.Tensor  # (1000,) float64, ᾱ_t of the training noise schedule

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> CLIP last hidden state (B, 77, 768) (B, L, D for the toy encoder)."""
        return encode_prompts(self.tokenizer, self.text_encoder, prompts)


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Tokenize to the encoder's full context (77 for CLIP, padded) and return the final hidden states."""
    length = text_encoder.config.max_position_embeddings
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state


def _schedule_from_config(path: Path) -> torch.Tensor:
    """ᾱ_t from a diffusers scheduler/scheduler_config.json (SD1.5's defaults if the folder has none)."""
    if not path.is_file():
        return NoiseSchedule.sd15().alphas_cumprod
    cfg = read_config(path)
    kind = require(cfg, "beta_schedule", str, path, lambda k: k in ("scaled_linear", "linear"),
                   "'scaled_linear' (SD1.5's) or 'linear'", default="scaled_linear")
    steps = require(cfg, "num_train_timesteps", int, path, is_positive, "a positive integer", default=1000)
    start = require(cfg, "beta_start", float, path, lambda b: 0 < b < 1, "a number in (0, 1)", default=0.00085)
    end = require(cfg, "beta_end", float, path, lambda b: start <= b < 1, f"a number in [beta_start={start}, 1)",
                  default=0.012)
    if kind == "scaled_linear":
        return NoiseSchedule.sd15(start, end, steps).alphas_cumprod
    return torch.cumprod(1 - torch.linspace(start, end, steps, dtype=torch.float64), dim=0)


def _text_config(path: Path) -> CLIPTextConfig:
    """A CLIP text_encoder/config.json, its sizes checked first (CLIPTextConfig itself takes any value, and a wrong
    one fails later with a TypeError or ZeroDivisionError that names no file)."""
    config, defaults = read_config(path), CLIPTextConfig()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings"):
        require(config, key, int, path, is_positive, "a positive integer", default=getattr(defaults, key))
    heads = config.get("num_attention_heads", defaults.num_attention_heads)
    require(config, "hidden_size", int, path, lambda h: h % heads == 0,
            f"a multiple of num_attention_heads ({heads})", default=defaults.hidden_size)
    require(config, "hidden_act", str, path, rule="an activation name such as 'quick_gelu'", default="quick_gelu")
    require(config, "layer_norm_eps", float, path, is_positive, "a positive number", default=defaults.layer_norm_eps)
    return CLIPTextConfig(**config)


def _load_clip_weights(weights, source, config: CLIPTextConfig, device, dtype) -> CLIPTextModel:
    """CLIPTextModel filled strictly from `weights` whose keys are Hugging Face CLIP names, with or without the
    `text_model.` level (transformers 4 writes it, transformers 5 does not): match them on the name below it."""
    with torch.device("meta"):
        model = CLIPTextModel(config)
    strip = lambda k: k.removeprefix("text_model.")  # noqa: E731
    ours = {strip(k): k for k in model.state_dict()}
    # position_ids is a constant buffer that older files carry as a weight: not a weight to match.
    names = {ours.get(strip(k), k): k for k in weights if not k.endswith("position_ids")}
    load_strict(model, RenamedWeights(weights, names), source, device=device, dtype=dtype)
    # position_ids is a non-persistent buffer (in no file): rebuild it off the meta device.
    for module in model.modules():
        if "position_ids" in module._buffers:
            module.position_ids = torch.arange(config.max_position_embeddings, device=device)[None]
    return model.eval().requires_grad_(False)


def load_text_encoder(path, device="cpu", dtype=torch.float32, config: CLIPTextConfig | None = None):
    """The CLIP text encoder from a diffusers `text_encoder/` folder, a diffusers root, or an original single file."""
    path = Path(path)
    if path.is_dir():
        folder = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        config = _text_config(folder / "config.json")
        file = find_weights_file(folder, stems=("model", "pytorch_model"))
        return _load_clip_weights(open_weights(file), file, config, device, dtype)
    weights = open_weights(path)
    detect_foreign(weights, path)
    names = {k[len(LDM_TEXT_PREFIX):]: k for k in weights if k.startswith(LDM_TEXT_PREFIX)}
    if not names:
        raise CheckpointError(f"{path}: no text-encoder weights (keys starting with {LDM_TEXT_PREFIX!r}). "
                              f"Expected {SUPPORTED}.")
    return _load_clip_weights(RenamedWeights(weights, names), path, config or CLIPTextConfig(**SD15_TEXT_CONFIG),
                              device, dtype)


def ldm_text_state_dict(text_encoder: CLIPTextModel) -> dict:
    """The text encoder's weights as original single files hold them: `cond_stage_model.transformer.` + the
    transformers-4 CLIP names (`text_model.embeddings...`, which A1111, ComfyUI and diffusers' converters read),
    whichever transformers version is installed. No position_ids: a constant buffer, rebuilt by every loader."""
    return {LDM_TEXT_PREFIX + "text_model." + k.removeprefix("text_model."): v.detach().to("cpu").contiguous()
            for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}


def load_tokenizer(path):
    """A tokenizer folder: CLIP's vocab.json + merges.txt, or any transformers tokenizer saved with save_pretrained."""
    path = Path(path)
    if (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    raise CheckpointError(f"{path}: not a tokenizer folder (no vocab.json + merges.txt, no tokenizer.json); "
                          f"{TOKENIZER_HELP}.")


def check_model(path, tokenizer=None) -> Path:
    """The cheap checks of a model path, before anything is loaded (commands call it first): it exists, a folder is
    in the diffusers layout with a tokenizer (or `tokenizer` is given), a single file comes with `tokenizer`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder. Expected {SUPPORTED}.")
    if path.is_dir():
        if not (path / "unet").is_dir():
            raise CheckpointError(f"{path}: not a diffusers model folder (no unet/ subfolder; found "
                                  f"{sorted(p.name for p in path.iterdir())[:10]}). Expected {SUPPORTED}.")
        if tokenizer is None and not (path / "tokenizer").is_dir():
            raise CheckpointError(f"{path}: has no tokenizer/ folder; {TOKENIZER_HELP}.")
    elif tokenizer is None:
        raise CheckpointError(f"{path}: a single-file checkpoint holds no tokenizer; {TOKENIZER_HELP}.")
    return path


def load_sd15(path, tokenizer=None, device="cpu", dtype=torch.float32, text_config=None, unet_config=None,
              vae_config=None) -> SD15:
    """Load the whole bundle from a diffusers folder or an original single file (see module docstring).

    `tokenizer` overrides the folder's tokenizer and is required for single files. The *_config arguments give the
    architecture of a single file that is not SD1.5-sized (tests use tiny ones); folders carry their own configs.
    """
    path = check_model(path, tokenizer)
    if path.is_dir():
        vae = (load_vae(path / "vae", device, dtype) if (path / "vae").is_dir() else
               _pixel_space_vae(path, device))
        return SD15(tokenizer=load_tokenizer(tokenizer or path / "tokenizer"),
                    text_encoder=load_text_encoder(path / "text_encoder", device, dtype),
                    unet=load_unet(path / "unet", device, dtype), vae=vae,
                    alphas_cumprod=_schedule_from_config(path / "scheduler" / "scheduler_config.json"))
    weights = open_weights(path)
    detect_foreign(weights, path)
    alphas = weights["alphas_cumprod"].double() if "alphas_cumprod" in weights else NoiseSchedule.sd15().alphas_cumprod
    return SD15(tokenizer=load_tokenizer(tokenizer),
                text_encoder=load_text_encoder(path, device, dtype, config=text_config),
                unet=load_unet(path, device, dtype, config=unet_config),
                vae=load_vae(path, device, dtype, config=vae_config), alphas_cumprod=alphas)


def _pixel_space_vae(path: Path, device) -> IdentityVAE:
    """A folder without vae/ is only valid if model_index.json declares a pixel-space model (the toy world)."""
    index = read_config(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    if not index.get("pixel_space", False):
        raise CheckpointError(f"{path}: has no vae/ subfolder. Expected {SUPPORTED}.")
    return IdentityVAE().to(device)
