"""Stable Diffusion's autoencoder (AutoencoderKL): images in [-1, 1] <-> latents scaled by 0.18215.

The architecture is LDM's KL-regularised autoencoder (Rombach et al. 2022, Sec. 3.1; CompVis
`ldm/modules/diffusionmodules/model.py`): a conv encoder predicts the mean and log-variance of a diagonal Gaussian
q(z|x) over a 4-channel latent at 1/8 of the image size (SD1.5), a mirrored conv decoder maps z back to pixels, and
the only attention is one single-head self-attention in each mid block. Diffusion runs on z · scaling_factor, which
brings SD's latents to roughly unit variance (0.18215: `scale_factor` of CompVis' v1-inference.yaml).

Modules carry diffusers' AutoencoderKL names (`encoder.down_blocks.0.resnets.0.norm1`, `decoder.up_blocks...`), so a
diffusers `vae/` folder loads by name; an original single file goes through `ldm_vae_key_map`, a table generated from
the config (the renaming diffusers' convert_ldm_vae_checkpoint does). Loading builds the model on the meta device
and fills it with checkpoint.load_strict.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from checkpoint import (LDM_VAE_PREFIX, SUPPORTED, CheckpointError, RenamedWeights, atomic_write, detect_foreign,
                        find_weights_file, is_positive, is_positive_int_list, load_strict, open_weights, read_config,
                        require)


@dataclass
class VAEConfig:
    in_channels: int = 3                                  # RGB images in [-1, 1]
    latent_channels: int = 4                              # z has 4 channels; the encoder predicts 2 × 4 (mean, logvar)
    block_channels: tuple[int, ...] = (128, 256, 512, 512)  # one level per entry; each but the last halves H and W
    layers_per_block: int = 2                             # resnets per encoder level (the decoder has one more)
    norm_groups: int = 32                                 # GroupNorm groups everywhere (eps 1e-6)
    scaling_factor: float = 0.18215                       # latents = z · scaling_factor (SDXL's VAE uses 0.13025)

    @classmethod
    def sd15(cls) -> "VAEConfig":
        """SD1.5's VAE (stable-diffusion-v1-5 vae/config.json): 83.7M parameters, 8× downsampling."""
        return cls()

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """A 0.24M-parameter VAE of the same structure (4× downsampling, 3 levels) for tests."""
        return cls(block_channels=(16, 32, 32), layers_per_block=1, norm_groups=8)

    @classmethod
    def from_diffusers_config(cls, config: dict, source) -> "VAEConfig":
        """Read a diffusers AutoencoderKL config.json (absent keys take diffusers' defaults); refuse values of the
        wrong type or range, and any structure this file does not implement, naming `source`."""
        channels = require(config, "block_out_channels", list, source, is_positive_int_list,
                           "a non-empty list of positive integers", default=[64])
        groups = require(config, "norm_num_groups", int, source, lambda g: g > 0 and all(c % g == 0 for c in channels),
                         f"a positive integer that divides every block_out_channels entry {channels}", default=32)
        in_channels = require(config, "in_channels", int, source, is_positive, "a positive integer", default=3)
        layers = require(config, "layers_per_block", int, source, is_positive, "a positive integer", default=1)
        scale = require(config, "scaling_factor", float, source, is_positive, "a positive number", default=0.18215)
        n = len(channels)
        # Keys whose value must be SD's, with the value (diffusers' default where a key is absent).
        fixed = {"_class_name": "AutoencoderKL", "act_fn": "silu", "latent_channels": 4,
                 "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                 "out_channels": in_channels, "use_quant_conv": True, "use_post_quant_conv": True,
                 "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None, "latents_std": None}
        for key, expected in fixed.items():
            found = config.get(key, expected)
            if (list(found) if isinstance(found, (list, tuple)) else found) != expected:
                raise CheckpointError(f"{source}: {key} = {found!r} is not supported; this VAE implements SD1.x's "
                                      f"AutoencoderKL ({key} = {expected!r}). Use an SD1.x VAE (or SDXL's, which "
                                      f"has the same structure).")
        return cls(in_channels=in_channels, latent_channels=4, block_channels=tuple(channels), layers_per_block=layers,
                   norm_groups=groups, scaling_factor=float(scale))

    def to_diffusers_config(self) -> dict:
        """The config.json diffusers' AutoencoderKL would write for this VAE."""
        n = len(self.block_channels)
        return {"_class_name": "AutoencoderKL", "in_channels": self.in_channels, "out_channels": self.in_channels,
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "block_out_channels": list(self.block_channels), "layers_per_block": self.layers_per_block,
                "act_fn": "silu", "latent_channels": self.latent_channels, "norm_num_groups": self.norm_groups,
                "scaling_factor": self.scaling_factor, "force_upcast": True}


# ---- building blocks (diffusers' names; LDM's in comments) --------------------------------------------------------

def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)  # the VAE uses eps 1e-6 everywhere (the UNet uses 1e-5)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice plus a skip, a 1×1 conv where the width changes (LDM ResnetBlock, no time input)."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None  # LDM: nin_shortcut

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all H·W positions, GroupNorm in front, residual around it (LDM AttnBlock)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)  # LDM: norm
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))  # LDM: 1×1 convs q, k, v
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only for diffusers' name `to_out.0`

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1 head, H·W, C)
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # softmax(q kᵀ / √C) v, (B, H·W, C)
        return x + self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution (LDM: mid.block_1, mid.attn_1, mid.block_2)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding only right and bottom by one (LDM's asymmetric padding, diffusers padding=0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level: resnets, then a downsample unless it is the last level (LDM: encoder.down.i)."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(c_out)] if downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """One decoder level: resnets, then an upsample unless it is the last level (LDM: decoder.up.(n-1-i))."""

    def __init__(self, c_in: int, c_out: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2·latent, H/f, W/f): mean and log-variance of q(z|x), f = 2^(levels-1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_channels, cfg.norm_groups, len(cfg.block_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < n - 1)
                                          for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = group_norm(ch[-1], g)  # LDM: norm_out
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """Latent z (B, latent, h, w) -> image (B, 3, h·f, w·f); the encoder mirrored, one more resnet per level."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_channels[::-1], cfg.norm_groups, len(cfg.block_channels)  # widest level first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, i < n - 1)
                                        for i in range(n)])
        self.conv_norm_out = group_norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """SD's AutoencoderKL. `encode` gives diffusion latents (already × scaling_factor), `decode` takes them back."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)

    @property
    def spatial_factor(self) -> int:
        """Image side / latent side: 8 for SD1.5."""
        return 2 ** (len(self.config.block_channels) - 1)

    def encode(self, images, sample=False, generator: torch.Generator | None = None):
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8) · scaling_factor.

        The mean of q(z|x) by default; `sample=True` draws z = mean + std · ε with ε from `generator` (on the
        images' device), as diffusers' `latent_dist.sample(generator)` does (log-variance clamped to [-30, 20]).
        """
        weight_dtype = self.quant_conv.weight.dtype
        mean, logvar = self.quant_conv(self.encoder(images.to(weight_dtype))).chunk(2, dim=1)  # (B, 4, h, w) each
        if sample:
            if generator is None:
                raise ValueError("VAE.encode(sample=True) needs generator=torch.Generator(...): all randomness in "
                                 "this project goes through an explicit generator; or pass sample=False for the mean.")
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
        return mean * self.config.scaling_factor

    def decode(self, latents, fp32=False, dtype: torch.dtype | None = None):
        """Latents (B, 4, h, w) · scaling_factor -> images (B, 3, 8h, 8w), roughly in [-1, 1] but NOT clamped
        (callers clamp: sample.py does). `fp32=True` runs the decoder in float32 whatever the weights' dtype and
        any autocast around it, on float32 copies of the weights, and returns float32: SD's VAE is fragile in
        16-bit (it overflows in fp16; diffusers marks it `force_upcast`). `dtype` (float32 or bfloat16, see
        decode_dtype) does the same in that dtype; bf16 keeps fp32's exponent range, so it cannot overflow where
        fp32 does not (tests/test_vae.py measures its error against fp32). Weights already in `dtype` are used as
        they are (no copies): convert the VAE once (`vae.to(dtype)`) for the fast path."""
        dtype = torch.float32 if fp32 else dtype
        if dtype is None:
            z = (latents / self.config.scaling_factor).to(self.post_quant_conv.weight.dtype)
            return self.decoder(self.post_quant_conv(z))
        if dtype not in DECODE_DTYPES.values():
            raise ValueError(f"VAE.decode: dtype must be one of {list(DECODE_DTYPES.values())}, got {dtype}.")
        with torch.autocast(latents.device.type, enabled=False):
            z = latents.to(dtype) / self.config.scaling_factor
            return _in_dtype(self.decoder, _in_dtype(self.post_quant_conv, z, dtype), dtype)


DECODE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def decode_dtype(name: str, device) -> torch.dtype:
    """The VAE decode's dtype for `name`: fp32, bf16, or auto = bf16 on a CUDA device that supports it (the decode
    is memory-bound there: half the bytes), fp32 elsewhere (on a CPU bf16 runs, but is rarely faster)."""
    device = torch.device(device)
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DECODE_DTYPES:
        raise ValueError(f"decode dtype {name!r}: choose auto, fp32 or bf16.")
    return DECODE_DTYPES[name]


def _in_dtype(module: nn.Module, x, dtype: torch.dtype):
    """module(x) computed with `dtype` copies of its parameters (none where they already are); the module itself
    keeps its dtype."""
    params = dict(module.named_parameters())
    if all(p.dtype == dtype for p in params.values()):
        return module(x)
    return torch.func.functional_call(module, {n: p.to(dtype) for n, p in params.items()}, (x,))


class IdentityVAE(nn.Module):
    """The toy world's pixel-space stand-in: the 'latents' are the images themselves (scale 1, no downsampling)."""
    spatial_factor = 1

    def encode(self, images, sample=False, generator=None):
        return images

    def decode(self, latents, fp32=False, dtype=None):
        dtype = torch.float32 if fp32 else dtype
        return latents if dtype is None else latents.to(dtype)


# ---- checkpoints ---------------------------------------------------------------------------------------------------

# diffusers' folders saved before its attention refactor (stable-diffusion-v1-5's vae/ among them) use these names;
# diffusers renames them on load (ModelMixin._fix_state_dict_keys_on_load) and so do we.
DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _current_attention_name(key: str) -> str:
    return re.sub(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.",
                  lambda m: m[1] + DEPRECATED_ATTENTION_NAMES[m[2]] + ".", key)


def ldm_vae_key_map(config: VAEConfig) -> dict[str, str]:
    """Original (CompVis LDM) VAE weight names, without `first_stage_model.`, -> ours, for every weight.

    Generated from the config: LDM numbers decoder levels by resolution (up.0 is the full-size level, run last),
    diffusers in execution order, so up_blocks.i <-> up.(n-1-i), as diffusers' convert_ldm_vae_checkpoint maps them.
    """
    n = len(config.block_channels)
    modules = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}  # our module -> LDM module
    for part in ("encoder", "decoder"):
        modules |= {f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                    f"{part}.conv_norm_out": f"{part}.norm_out",
                    f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
                    f"{part}.mid_block.resnets.1": f"{part}.mid.block_2"}
        attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        for ours, ldm in attention.items():
            modules[f"{part}.mid_block.attentions.0.{ours}"] = f"{part}.mid.attn_1.{ldm}"
    for i in range(n):
        for j in range(config.layers_per_block):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        for j in range(config.layers_per_block + 1):
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        modules[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        modules[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{n - 1 - i}.upsample"
    with torch.device("meta"):
        names = VAE(config).state_dict()
    table = {}
    for name in names:  # e.g. encoder.down_blocks.0.resnets.1.conv_shortcut.weight
        module, param = name.rsplit(".", 1)
        if module in modules:
            table[f"{modules[module]}.{param}"] = name
        else:  # a resnet's or resampler's own layer: norm1, conv1, norm2, conv2, conv_shortcut, conv
            block, layer = module.rsplit(".", 1)
            table[f"{modules[block]}.{layer.replace('conv_shortcut', 'nin_shortcut')}.{param}"] = name
    return table


class _LinearFromConv(RenamedWeights):
    """LDM stores the mid-block attention's q, k, v and proj_out as 1×1 convs (C, C, 1, 1); ours are Linear (C, C)."""

    def __getitem__(self, key):
        t = super().__getitem__(key)
        return t[:, :, 0, 0] if self._squeezes(key, t.shape) else t

    def shape(self, key) -> tuple:
        s = super().shape(key)
        return tuple(s[:2]) if self._squeezes(key, s) else s

    @staticmethod
    def _squeezes(key, shape) -> bool:
        return ".attentions." in key and len(shape) == 4 and tuple(shape[2:]) == (1, 1)


def ldm_vae_state_dict(vae: VAE) -> dict:
    """The VAE's weights under their original (LDM) names, `first_stage_model.` included, on the CPU: the inverse of
    ldm_vae_key_map, with the mid-block attention's q, k, v and proj_out written back as the 1×1 convs (C, C, 1, 1)
    LDM stores (A1111 and ComfyUI build them as convs; see _LinearFromConv for the way in)."""
    ours_to_ldm = {ours: ldm for ldm, ours in ldm_vae_key_map(vae.config).items()}
    state = {}
    for name, t in vae.state_dict().items():
        t = t.detach().to("cpu")
        if ".attentions." in name and t.ndim == 2:  # Linear (C, C) -> 1×1 conv (C, C, 1, 1)
            t = t[:, :, None, None]
        state[LDM_VAE_PREFIX + ours_to_ldm[name]] = t.contiguous()
    return state


def load_vae(path, device="cpu", dtype=torch.float32, config: VAEConfig | None = None) -> VAE:
    """The VAE from a diffusers `vae/` folder, a diffusers root folder, or an original single file
    (.safetensors, or .ckpt read with weights_only=True; SD1.5's architecture unless `config` says otherwise).
    Strict: every weight matched, every shape checked, or a CheckpointError that says which. Frozen, eval mode."""
    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path
        config = VAEConfig.from_diffusers_config(read_config(folder / "config.json"), folder / "config.json")
        source = find_weights_file(folder)
        weights = open_weights(source)
        names = {_current_attention_name(k): k for k in weights}
        if len(names) != len(weights):
            raise CheckpointError(f"{source}: holds some attention weights under both the old (query/key/value/"
                                  f"proj_attn) and the new (to_q/to_k/to_v/to_out.0) names; keep one copy.")
        weights = RenamedWeights(weights, names)
    else:
        source, weights = path, open_weights(path)
        detect_foreign(weights, path)
        config = config or VAEConfig.sd15()
        ldm_to_ours = ldm_vae_key_map(config)
        stored = [k[len(LDM_VAE_PREFIX):] for k in weights if k.startswith(LDM_VAE_PREFIX)]
        if not stored:
            raise CheckpointError(f"{path}: no VAE weights (no key starts with {LDM_VAE_PREFIX!r}). "
                                  f"Expected {SUPPORTED}.")
        # Names the table does not know stay as they are, so load_strict reports them as unexpected.
        weights = _LinearFromConv(weights, {ldm_to_ours.get(k, k): LDM_VAE_PREFIX + k for k in stored})
    with torch.device("meta"):
        vae = VAE(config)
    return load_strict(vae, weights, source, device=device, dtype=dtype).eval().requires_grad_(False)


def save_vae(vae: VAE, folder) -> Path:
    """Write `vae` as a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors).
    Each file is written under a temporary name and renamed into place, so a crash never leaves half a file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    atomic_write(folder / "diffusion_pytorch_model.safetensors",
                 lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    config = json.dumps(vae.config.to_diffusers_config(), indent=2)
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(config))
    return folder
