"""The Stable Diffusion 1.5 UNet: an ε-predictor ε(x_t, t, text) in latent space, its configs, loaders and savers.

Architecture: the LDM UNet (Rombach et al. 2022, CompVis `v1-inference.yaml`). Each resolution level
of the encoder is `layers_per_block` × (ResBlock → spatial transformer), then a stride-2 conv; the decoder mirrors it
with one more ResBlock per level, each fed the matching encoder output (skip connection) concatenated on channels.
A spatial transformer is self-attention, cross-attention to the CLIP text tokens and a GEGLU feed-forward.
Timesteps enter as a sinusoidal embedding through an MLP, added inside every ResBlock.

Module names follow diffusers' `UNet2DConditionModel` (`down_blocks.0.resnets.0.norm1`, ...), so a diffusers folder
loads by name and `save_unet` writes a folder diffusers loads unchanged. The original single-file layout
(`model.diffusion_model.input_blocks...`, what A1111 and ComfyUI use) goes through `ldm_unet_key_map`.
"""
import copy
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
import torch.utils.checkpoint

from checkpoint import (LDM_UNET_PREFIX, atomic_write, SUPPORTED, CheckpointError, RenamedWeights, detect_foreign,
                        find_weights_file, is_positive, is_positive_int_list, load_strict, open_weights,
                        read_config, require, shape_of)


# diffusers' config.json vocabulary (UNetConfig.to_diffusers / from_diffusers)
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers our tests' oracle is pinned to (requirements-dev.txt)
DOWN_TYPES = {True: "CrossAttnDownBlock2D", False: "DownBlock2D"}
UP_TYPES = {True: "CrossAttnUpBlock2D", False: "UpBlock2D"}
UP_OF = {DOWN_TYPES[a]: UP_TYPES[a] for a in (True, False)}
STUDENT_KEYS = ("timestep_scaling", "sigma_data", "guidance_offset")  # UNetConfig fields a student's config.json adds


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple = (320, 640, 1280, 1280)  # width of each resolution level, full resolution first
    layers_per_block: int = 2                       # ResBlocks per level going down (one more going up)
    attention_levels: tuple = (True, True, True, False)  # transformer after each ResBlock? (down path; up mirrors)
    num_heads: int = 8              # per attention layer, at every level (diffusers calls it `attention_head_dim`)
    cross_attention_dim: int = 768  # width of the text tokens (CLIP ViT-L/14)
    norm_groups: int = 32
    guidance_embed_dim: int = 0     # width of the ω embedding of a distilled student (LCM: 256); 0 = no ω input
    sample_size: int = 64           # latent side the model was trained at (recorded in the diffusers config)
    # What sampling a student needs besides its weights (a student only; a teacher ignores them). Saved in its
    # config.json, which diffusers loads all the same (it ignores keys it does not know):
    timestep_scaling: float = 10.0  # s of the boundary scalings c_skip, c_out (consistency.boundary_scalings; LCM: 10)
    sigma_data: float = 0.5         # σ_data of the boundary scalings (LCM: 0.5)
    guidance_offset: float = 1.0    # the ω input embeds ω − guidance_offset: 1 is LCM's w = ω − 1, as diffusers'
                                    # LCM pipeline feeds it, so a saved student drops into that pipeline

    def __post_init__(self):
        self.block_channels, self.attention_levels = tuple(self.block_channels), tuple(self.attention_levels)
        if len(self.attention_levels) != len(self.block_channels):
            raise ValueError(f"UNetConfig: attention_levels has {len(self.attention_levels)} entries but "
                             f"block_channels has {len(self.block_channels)}; give one per resolution level.")
        if not (self.timestep_scaling > 0 and self.sigma_data > 0):
            raise ValueError(f"UNetConfig: timestep_scaling and sigma_data must be positive (LCM: 10 and 0.5), got "
                             f"{self.timestep_scaling} and {self.sigma_data}.")
        for c in self.block_channels:
            if c % self.norm_groups or c % self.num_heads:
                raise ValueError(f"UNetConfig: block width {c} must be divisible by norm_groups={self.norm_groups} "
                                 f"and num_heads={self.num_heads}.")

    @classmethod
    def sd15(cls):
        """Stable Diffusion 1.5 (~860M parameters)."""
        return cls()

    @classmethod
    def tiny(cls):
        """A few hundred thousand parameters with every part of the SD1.5 UNet, for tests."""
        return cls(block_channels=(32, 64), layers_per_block=1, attention_levels=(True, False), num_heads=2,
                   cross_attention_dim=32, sample_size=8)

    @classmethod
    def toy(cls):
        """The pixel-space teacher of the 32×32 RGB toy world (toyworld/toy.py): four levels 32→16→8→4 px, thin at full
        resolution (a CPU step's cost is mostly the 32×32 convolutions), text attention only at 8×8 and 4×4.
        ~1.7M parameters, so teacher training and distillation fit in minutes on a 2-core CPU."""
        return cls(in_channels=3, out_channels=3, block_channels=(16, 32, 64, 64), layers_per_block=1,
                   attention_levels=(False, False, True, True), num_heads=4, cross_attention_dim=64,
                   norm_groups=8, sample_size=32)

    def to_diffusers_config(self) -> dict:
        """The config.json of diffusers' UNet2DConditionModel for this architecture; a student's also records its
        sampling parameterisation (STUDENT_KEYS), keys diffusers ignores."""
        student = {k: getattr(self, k) for k in STUDENT_KEYS} if self.guidance_embed_dim else {}
        return {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "block_out_channels": list(self.block_channels), "layers_per_block": self.layers_per_block,
                "down_block_types": [DOWN_TYPES[a] for a in self.attention_levels],
                "up_block_types": [UP_TYPES[a] for a in reversed(self.attention_levels)],
                "attention_head_dim": self.num_heads, "cross_attention_dim": self.cross_attention_dim,
                "norm_num_groups": self.norm_groups, "time_cond_proj_dim": self.guidance_embed_dim or None,
                "sample_size": self.sample_size, **SD1_FIXED, **student}

    @classmethod
    def from_diffusers_config(cls, config: dict, source) -> "UNetConfig":
        """Read a diffusers UNet config.json; anything that is not an SD 1.x-style UNet is a CheckpointError."""
        def unsupported(what):
            return CheckpointError(
                f"{source}: {what}. Only Stable Diffusion 1.x-style UNets are supported (1×1-conv transformer "
                f"projections, one transformer layer per block, one head count for all levels, no extra "
                f"embeddings); SD 2.x and SDXL UNets are not. Use an SD 1.x model, e.g. SD1.5.")
        cross = config.get("cross_attention_dim")
        if cross in (1024, 2048) or isinstance(cross, list):
            raise unsupported(f"cross_attention_dim={cross} (SD 2.x uses 1024, SDXL 2048; SD 1.x 768)")
        for key, expected in SD1_FIXED.items():
            if key in config and _uniform(config[key]) != expected:
                raise unsupported(f"{key}={config[key]!r}, expected {expected!r}")
        if isinstance(_uniform(config.get("attention_head_dim")), list):
            raise unsupported(f"per-block head counts attention_head_dim={config['attention_head_dim']}")
        missing = [k for k in ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                               "down_block_types", "up_block_types", "attention_head_dim", "cross_attention_dim")
                   if k not in config]
        if missing:
            raise CheckpointError(f"{source}: missing {missing}; not a diffusers UNet2DConditionModel config.")
        uniform_positive = lambda v: isinstance(_uniform(v), int) and is_positive(_uniform(v))  # noqa: E731
        for key in ("in_channels", "out_channels", "cross_attention_dim"):
            require(config, key, int, source, is_positive, "a positive integer")
        require(config, "block_out_channels", list, source, is_positive_int_list, "a list of positive integers")
        for key in ("layers_per_block", "attention_head_dim"):
            require(config, key, (int, list), source, uniform_positive, "a positive integer")
        for key in ("down_block_types", "up_block_types"):
            require(config, key, list, source, lambda v: all(isinstance(t, str) for t in v), "a list of block names")
        require(config, "norm_num_groups", int, source, is_positive, "a positive integer", default=32)
        for key in ("time_cond_proj_dim", "sample_size"):
            require(config, key, (int, type(None)), source, lambda v: v is None or v >= 0,
                    "a non-negative integer or null", default=None)
        for key in STUDENT_KEYS:
            require(config, key, float, source, math.isfinite, "a finite number", default=1.0)
        down, up = config["down_block_types"], config["up_block_types"]
        if any(t not in DOWN_TYPES.values() for t in down) or [UP_OF[t] for t in reversed(down)] != up:
            raise unsupported(f"block types {down} / {up}; expected each of {list(DOWN_TYPES.values())} going down "
                              f"and the mirror image going up")
        try:
            return cls(in_channels=config["in_channels"], out_channels=config["out_channels"],
                       block_channels=tuple(config["block_out_channels"]),
                       layers_per_block=_uniform(config["layers_per_block"]),
                       attention_levels=tuple(t == DOWN_TYPES[True] for t in down),
                       num_heads=_uniform(config["attention_head_dim"]), cross_attention_dim=cross,
                       norm_groups=config.get("norm_num_groups", 32),
                       guidance_embed_dim=config.get("time_cond_proj_dim") or 0,
                       sample_size=config.get("sample_size") or 64,
                       **{k: float(config[k]) for k in STUDENT_KEYS if k in config})
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: {e}") from None


# Settings every SD 1.x UNet has, with the value it has: any other value is another architecture (mostly SD 2.x /
# SDXL: linear projections, several transformer layers, extra embeddings). `upcast_attention` is not here: it only
# changes the precision attention is computed in.
SD1_FIXED = {
    "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "norm_eps": 1e-5, "center_input_sample": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "use_linear_projection": False, "transformer_layers_per_block": 1, "only_cross_attention": False,
    "dual_cross_attention": False, "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
    "addition_embed_type": None, "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
    "num_attention_heads": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "time_embedding_dim": None,
    "timestep_post_act": None, "attention_type": "default", "reverse_transformer_layers_per_block": None,
}


def _uniform(value):
    """diffusers allows a per-block list for some settings; one repeated value means the same as that value."""
    return value[0] if isinstance(value, list) and value and all(v == value[0] for v in value) else value


# ---- embeddings ---------------------------------------------------------------------------------------------------

# Two sinusoids, because each must match its own checkpoints: SD's timestep features are cos-first with frequencies
# 10000^(−i/half) (what SD1.5's time MLP was trained on), LCM's ω embedding is sin-first with 10000^(−i/(half−1)).

def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features (B,) -> (B, dim): cos half then sin half, frequencies 10000^(−i/(dim/2)).
    (DDPM's embedding as SD uses it: diffusers `flip_sin_to_cos=True, freq_shift=0`.)"""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def sinusoidal_embedding(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) -> (B, dim): [sin(x f_i), cos(x f_i)], f_i = 10000^{−i/(half−1)}, sin half first (VDM's convention,
    which LCM's guidance embedding follows); an odd `dim` is zero-padded. The frequencies are computed exactly as
    diffusers' `get_guidance_scale_embedding` does, so the embedding matches it bit for bit."""
    half = dim // 2
    spacing = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=x.device) * -spacing.to(x.device))
    angles = x.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(emb, (0, dim % 2))


def guidance_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """LCM's guidance embedding (diffusers get_guidance_scale_embedding): sinusoidal embedding of 1000·w, (B, dim).
    `w` is what the network embeds: for LCM's UNets (and ours, UNetConfig.guidance_offset = 1) w = ω − 1."""
    if w.ndim != 1:
        raise ValueError(f"w must be a (B,) tensor of guidance scales, got shape {tuple(w.shape)}.")
    return sinusoidal_embedding(1000.0 * w, dim)


def zero_guidance_projection(guidance_embed_dim: int, channels: int) -> nn.Linear:
    """The student's ω input: a bias-free Linear from the ω embedding to the sinusoidal time features (LCM).

    It starts at zero, so a student made from the teacher computes exactly what the teacher computes, for every ω,
    and learns its use of ω from there. (diffusers' LCM trainer initialises it randomly; we do not, on purpose.)"""
    proj = nn.Linear(guidance_embed_dim, channels, bias=False)
    nn.init.zeros_(proj.weight)
    return proj


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal time features (C0 -> 4·C0 -> 4·C0); a student first adds its projected ω embedding."""

    def __init__(self, channels: int, guidance_embed_dim: int):
        super().__init__()
        self.cond_proj = zero_guidance_projection(guidance_embed_dim, channels) if guidance_embed_dim else None
        self.linear_1 = nn.Linear(channels, 4 * channels)
        self.linear_2 = nn.Linear(4 * channels, 4 * channels)

    def forward(self, features, guidance=None):
        if guidance is not None:
            features = features + self.cond_proj(guidance)
        return self.linear_2(F.silu(self.linear_1(features)))


# ---- building blocks ----------------------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    """LDM ResBlock: GN-SiLU-conv, + projected time embedding, GN-SiLU-conv, + shortcut (1×1 conv if widths differ)."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, in_ch, eps=1e-5)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(4 * cfg.block_channels[0], out_ch)  # from the time embedding's width
        self.norm2 = nn.GroupNorm(cfg.norm_groups, out_ch, eps=1e-5)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # same shift for every pixel
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention from tokens x to `context` (x itself for self-attention), via PyTorch's SDPA kernel.
    Plain Linear projections, so LoRA adapters (lora.attach) can adapt them. A self-attention can fuse its
    three projections into one (`fuse_qkv`, an inference switch: one (3C, C) matrix product instead of three)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list only so the key is diffusers' `to_out.0`
        self.to_qkv = None  # set by fuse_qkv

    def forward(self, x, context):
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  (B, N, C) -> (B, h, N, C/h)
        if self.to_qkv is not None:
            if context is not x:
                raise ValueError("Attention: a fused (fuse_qkv) attention is self-attention; call it as attn(x, x).")
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out[0](out.transpose(1, 2).flatten(2))

    def fuse_qkv(self) -> None:
        """Replace to_q, to_k, to_v by one Linear whose weight is theirs stacked, [W_q; W_k; W_v] (3C, C): the same
        products in one matrix multiply. The state dict keeps the checkpoint's own keys (`to_q.weight`, ...: a
        state-dict hook splits the fused weight again), so a fused model saves exactly the file it was loaded from."""
        if self.to_qkv is not None:
            return
        projections = (self.to_q, self.to_k, self.to_v)
        if len({p.weight.shape for p in projections}) != 1:
            raise ValueError("Attention.fuse_qkv: q, k and v have different shapes; only a self-attention fuses.")
        weight = torch.cat([p.weight.detach() for p in projections])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=projections[0].weight.requires_grad)
        del self.to_q, self.to_k, self.to_v
        self.to_qkv = fused
        self.register_state_dict_post_hook(_split_fused_qkv)
        self.register_load_state_dict_pre_hook(_stack_qkv)


def _split_fused_qkv(module, state_dict, prefix, local_metadata):
    """state_dict hook of a fused Attention: `to_qkv.weight` back into the checkpoint's `to_q/to_k/to_v.weight`, in
    the unfused order (each a copy: safetensors refuses tensors that share memory)."""
    fused = state_dict.pop(prefix + "to_qkv.weight")
    parts = {f"{prefix}{name}.weight": part.clone() for name, part in zip(("to_q", "to_k", "to_v"), fused.chunk(3))}
    items = list(state_dict.items())
    state_dict.clear()
    for key, value in items:  # the unfused module's order: to_q, to_k, to_v just before to_out
        if key.startswith(prefix + "to_out."):
            state_dict.update(parts)
            parts = {}
        state_dict[key] = value


def _stack_qkv(module, state_dict, prefix, *args):
    """load_state_dict pre-hook of a fused Attention: a checkpoint's to_q/to_k/to_v weights stacked into to_qkv."""
    names = [f"{prefix}{p}.weight" for p in ("to_q", "to_k", "to_v")]
    if all(n in state_dict for n in names):
        state_dict[prefix + "to_qkv.weight"] = torch.cat([state_dict.pop(n) for n in names])


def check_fusable(unet: nn.Module) -> None:
    """Refuse to fuse q/k/v where adapters could be on the projections (LoRA wrappers, hooks, parametrizations):
    the fused product would silently bypass them. Fusion is an inference switch for a plain (or merged) UNet."""
    from torch.nn.utils import parametrize
    for name, m in unet.named_modules():
        kind = type(m).__name__.lower()
        if "lora" in kind or "adapter" in kind or type(m).__module__ in ("lora", "discriminator"):
            raise ValueError(f"fuse_qkv: the UNet holds an adapter module ({name}: {type(m).__name__}); fused q/k/v "
                             "is an inference switch for a plain UNet. Merge the adapters first (lora.merge).")
        if m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m):
            raise ValueError(f"fuse_qkv: {name or 'the UNet'} has forward hooks or parametrizations (adapters?); "
                             "fused q/k/v would bypass them. Fuse a plain UNet, or merge the adapters first.")
    for name, m in unet.named_modules():
        if isinstance(m, TransformerBlock) and m.attn1.to_qkv is None:
            bad = [p for p in ("to_q", "to_k", "to_v") if type(getattr(m.attn1, p)) is not nn.Linear]
            if bad:
                raise ValueError(f"fuse_qkv: {name}.attn1.{bad[0]} is a {type(getattr(m.attn1, bad[0])).__name__}, "
                                 "not a plain Linear (an adapter?); merge the adapters first (lora.merge).")


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection gives the values and the gates."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        values, gates = self.proj(x).chunk(2, dim=-1)
        return values * F.gelu(gates)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # The Identity sits where diffusers has its dropout, so the keys are `net.0.proj` and `net.2`.
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the text, GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, context_dim, heads)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context):
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's SpatialTransformer (diffusers: Transformer2DModel): GN, 1×1 conv in, pixels as tokens through one
    TransformerBlock, 1×1 conv out, residual."""

    def __init__(self, channels: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, cfg.cross_attention_dim, cfg.num_heads)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        height, width = x.shape[-2:]
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H·W, C)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).unflatten(2, (height, width)))


class Downsample(nn.Module):
    """A stride-2 3×3 conv (a module of its own only so the key is diffusers' `downsamplers.0.conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to `size` (twice the input, or the skip's size for odd inputs), then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    """One encoder level: ResBlock [→ transformer] per layer, then (except at the last level) a stride-2 conv.
    Returns the features and every intermediate output, which the decoder takes as skip connections."""

    def __init__(self, in_ch, out_ch, cfg: UNetConfig, attention: bool, downsample: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(n)])
        self.attentions = nn.ModuleList([SpatialTransformer(out_ch, cfg) for _ in range(n)]) if attention else None
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """One decoder level: per layer, concatenate the next skip, ResBlock [→ transformer]; then (except at full
    resolution) upsample. `skip_channels` lists the widths of the skips it receives, in the order it uses them."""

    def __init__(self, in_ch, out_ch, skip_channels, cfg: UNetConfig, attention: bool, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock((in_ch if i == 0 else out_ch) + s, out_ch, cfg)
                                      for i, s in enumerate(skip_channels)])
        self.attentions = (nn.ModuleList([SpatialTransformer(out_ch, cfg) for _ in skip_channels]) if attention
                           else None)
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x, skips, temb, context, out_size):
        for i, (resnet, skip) in enumerate(zip(self.resnets, skips)):
            x = resnet(torch.cat([x, skip], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, out_size)
        return x


class MidBlock(nn.Module):
    """At the lowest resolution: ResBlock → transformer → ResBlock."""

    def __init__(self, channels, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, cfg) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, cfg)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


# ---- the UNet -----------------------------------------------------------------------------------------------------

class UNet(nn.Module):
    """ε(x_t, t, text[, ω]). Set `gradient_checkpointing = True` to recompute each block's activations in backward
    (whenever gradients are recorded; saves most activation memory for ~30 % more compute)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config, self.gradient_checkpointing = config, False
        ch, n = config.block_channels, config.layers_per_block
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], config.guidance_embed_dim)
        skip_channels = [ch[0]]  # widths of the encoder outputs the decoder will consume, last one on top
        self.down_blocks = nn.ModuleList()
        for level, out_ch in enumerate(ch):
            last = level == len(ch) - 1
            self.down_blocks.append(DownBlock(ch[max(level - 1, 0)], out_ch, config, config.attention_levels[level],
                                              downsample=not last))
            skip_channels += [out_ch] * (n if last else n + 1)
        self.mid_block = MidBlock(ch[-1], config)
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(ch))):
            skips = [skip_channels.pop() for _ in range(n + 1)]
            in_ch = ch[min(level + 1, len(ch) - 1)]  # what the level below hands up
            self.up_blocks.append(UpBlock(in_ch, ch[level], skips, config, config.attention_levels[level],
                                          upsample=level > 0))
        self.conv_norm_out = nn.GroupNorm(config.norm_groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    def forward(self, x, t, context, w=None, decoder_features=False):
        """ε for latents x (B, C, H, W) at timesteps t (B,) (ints or floats; a scalar is broadcast), text tokens
        context (B, L, cross_attention_dim), and for a student the guidance scale ω per sample w (B,).
        `decoder_features`: return the last decoder feature map (B, C0, H, W) instead (what D's head reads)."""
        if (w is None) != (self.config.guidance_embed_dim == 0):
            raise ValueError("UNet: pass w (the guidance scale ω, shape (B,)) exactly when the UNet has an ω input; "
                             f"this one has guidance_embed_dim={self.config.guidance_embed_dim} and w was "
                             f"{'missing' if w is None else 'given'}. Make a student with make_student(teacher).")
        t = _per_sample(t, x, "t")
        features = timestep_embedding(t, self.config.block_channels[0]).to(x.dtype)  # (B, C0)
        # A student embeds ω − guidance_offset (LCM's w = ω − 1 by default, see UNetConfig).
        guidance = None if w is None else guidance_embedding(_per_sample(w, x, "w") - self.config.guidance_offset,
                                                             self.config.guidance_embed_dim).to(x.dtype)
        temb = self.time_embedding(features, guidance)  # (B, 4·C0)

        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = self._run(block, x, temb, context)
            skips += block_skips
        x = self._run(self.mid_block, x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips = [skips.pop() for _ in range(n)]  # the top n skips of the stack, most recent first
            out_size = skips[-1].shape[-2:] if skips else None  # the next level up's resolution
            x = self._run(block, x, block_skips, temb, context, out_size)
        if decoder_features:
            return x
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def fuse_qkv(self) -> "UNet":
        """Fuse every self-attention's q/k/v projections (Attention.fuse_qkv), in place; returns self. Inference only:
        refused where adapters are attached (check_fusable). Saving still writes the separate to_q/to_k/to_v keys."""
        check_fusable(self)
        for m in self.modules():
            if isinstance(m, TransformerBlock):
                m.attn1.fuse_qkv()
        return self

    def _run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            if torch.compiler.is_compiling():  # the recomputation replays the traced graph
                return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            # Eager: backward re-runs the block's Python, so it must see the LoRA set (lora.py) this forward ran with.
            from lora import recompute_context  # lora.py imports this file
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False,
                                                     context_fn=lambda: recompute_context(self))
        return block(*args)


def _per_sample(value, x, name):
    """A (B,) tensor on x's device from a (B,) tensor or a scalar."""
    value = torch.as_tensor(value, device=x.device)
    if value.ndim == 0:
        value = value.expand(x.shape[0])
    if value.shape != (x.shape[0],):
        raise ValueError(f"UNet: {name} must have shape (B,) = ({x.shape[0]},) or be a scalar; "
                         f"got {tuple(value.shape)}.")
    return value


def make_student(teacher: UNet, guidance_embed_dim: int = 256, timestep_scaling: float = 10.0,
                 sigma_data: float = 0.5) -> UNet:
    """A copy of the teacher with an ω input that starts at zero (see `zero_guidance_projection`), so it computes
    exactly what the teacher computes until training moves it. The teacher is left unchanged. The boundary scalings
    it is trained with (`timestep_scaling`, `sigma_data`) go into its config, so that sampling uses the same ones."""
    if teacher.config.guidance_embed_dim:
        raise ValueError(f"make_student: the teacher already has an ω input (guidance_embed_dim="
                         f"{teacher.config.guidance_embed_dim}); pass an SD1.5 UNet without one.")
    if guidance_embed_dim <= 0:
        raise ValueError(f"make_student: guidance_embed_dim must be positive (LCM uses 256), got {guidance_embed_dim}.")
    student = copy.deepcopy(teacher)
    student.config = replace(teacher.config, guidance_embed_dim=guidance_embed_dim,
                             timestep_scaling=timestep_scaling, sigma_data=sigma_data)
    weight = teacher.conv_in.weight
    student.time_embedding.cond_proj = zero_guidance_projection(guidance_embed_dim, teacher.config.block_channels[0]
                                                                ).to(weight.device, weight.dtype)
    return student


def bake_guidance(student: UNet, omega: float) -> UNet:
    """A plain SD1.5 UNet (no ω input) that computes exactly what `student` computes at guidance scale `omega`.

    In the time embedding the ω projection is added to the sinusoidal timestep features e(t) before `linear_1`:
        temb = linear_2(silu(W (e(t) + c) + b)),   c = P g(ω − guidance_offset)   (P: cond_proj, g: sinusoid)
    For a fixed ω, c is a constant vector, and W (e + c) + b = W e + (W c + b): folding W c into linear_1's bias
    (computed in float64, stored in the bias's dtype) removes the ω input and leaves every other weight as it was.
    The result has guidance_embed_dim 0 and its config drops the student-only sampling keys (it is an ordinary
    ε-predictor, which A1111, ComfyUI and diffusers' single-file loaders read as SD1.5). The student is unchanged."""
    cfg = student.config
    if not cfg.guidance_embed_dim:
        raise ValueError("bake_guidance: this UNet has no ω input (guidance_embed_dim=0), so there is nothing to "
                         "bake; pass a distilled student (make_student / train.py's student/ folder).")
    if not math.isfinite(float(omega)):
        raise ValueError(f"bake_guidance: omega must be a finite guidance scale, got {omega}.")
    linear_1, proj = student.time_embedding.linear_1, student.time_embedding.cond_proj
    w = torch.tensor([float(omega) - cfg.guidance_offset], device=proj.weight.device)
    c = proj.weight.double() @ guidance_embedding(w, cfg.guidance_embed_dim)[0].double()  # (C0,)
    bias = linear_1.bias.double() + linear_1.weight.double() @ c  # W c + b
    baked = copy.deepcopy(student)
    defaults = UNetConfig()
    baked.config = replace(cfg, guidance_embed_dim=0, **{k: getattr(defaults, k) for k in STUDENT_KEYS})
    baked.time_embedding.cond_proj = None
    with torch.no_grad():
        baked.time_embedding.linear_1.bias.copy_(bias.to(linear_1.bias.dtype))
    return baked


# ---- the original (LDM) layout ------------------------------------------------------------------------------------

LDM_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def ldm_unet_key_map(cfg: UNetConfig) -> dict:
    """LDM name (without `model.diffusion_model.`) -> our name, for every weight of UNet(cfg).

    The LDM UNet numbers its encoder `input_blocks.0..`: conv_in, then per level `layers_per_block` blocks
    (`.0` ResBlock, `.1` transformer) and a downsampler `.0.op`; `middle_block.0/1/2`; the decoder `output_blocks`:
    per level layers+1 blocks (`.0` ResBlock, `.1` transformer), the upsampler after the last of them.
    The ω projection has no LDM name; we store it as `time_embed.cond_proj`."""
    n, levels = cfg.layers_per_block, len(cfg.block_channels)
    modules = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
               "time_embedding.linear_2": "time_embed.2", "time_embedding.cond_proj": "time_embed.cond_proj",
               "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
               "mid_block.resnets.1": "middle_block.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for b in range(levels):
        for i in range(n):
            modules[f"down_blocks.{b}.resnets.{i}"] = f"input_blocks.{b * (n + 1) + i + 1}.0"
            modules[f"down_blocks.{b}.attentions.{i}"] = f"input_blocks.{b * (n + 1) + i + 1}.1"
        modules[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{(b + 1) * (n + 1)}.0.op"
        for i in range(n + 1):
            modules[f"up_blocks.{b}.resnets.{i}"] = f"output_blocks.{b * (n + 1) + i}.0"
            modules[f"up_blocks.{b}.attentions.{i}"] = f"output_blocks.{b * (n + 1) + i}.1"
        after = 2 if cfg.attention_levels[levels - 1 - b] else 1  # after the ResBlock [and the transformer]
        modules[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{b * (n + 1) + n}.{after}.conv"
    for ours, ldm in list(modules.items()):
        if ".resnets." in ours:
            modules.update({f"{ours}.{a}": f"{ldm}.{b}" for a, b in LDM_RESNET_NAMES.items()})
    with torch.device("meta"):
        names = UNet(cfg).state_dict().keys()
    table = {}
    for name in names:  # rename the longest module path that has an entry; the rest (e.g. `.weight`) stays
        parts = name.split(".")
        prefix = next(".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in modules)
        table[modules[prefix] + name[len(prefix):]] = name
    return table


# ---- loading and saving -------------------------------------------------------------------------------------------

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def load_unet(path, device="cpu", dtype=torch.float32, config: UNetConfig | None = None,
              fuse_qkv: bool = False) -> UNet:
    """A UNet from a diffusers folder (its root or its unet/ subfolder; also what `save_unet` writes) or an original
    single file (.safetensors, or .ckpt read with weights_only=True) holding SD1.5 under `model.diffusion_model.`.

    `config` is the architecture of a single file (default SD1.5; a student's ω input is detected from its weights);
    folders carry their own config.json. Loading is strict (checkpoint.load_strict): the model is built on the meta
    device and filled tensor by tensor in `dtype`, so RAM stays near the model's size. Other keys of a single file
    (VAE, text encoder, schedule buffers, model_ema.*) are not the UNet's and are ignored. `fuse_qkv`: fuse the
    self-attention projections after loading (UNet.fuse_qkv; inference only)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "unet" if (path / "unet").is_dir() else path
        config = UNetConfig.from_diffusers_config(read_config(folder / "config.json"), folder / "config.json")
        source = find_weights_file(folder)
        weights = open_weights(source)
    else:
        source, weights = path, open_weights(path)
        detect_foreign(weights, path)
        keys = [k for k in weights if k.startswith(LDM_UNET_PREFIX)]
        if not keys:
            raise CheckpointError(f"{path}: no UNet weights (no keys starting with {LDM_UNET_PREFIX!r}). Expected "
                                  f"{SUPPORTED}. A lone diffusers weight file: pass the folder with its config.json.")
        config = config or UNetConfig.sd15()
        guidance_key = LDM_UNET_PREFIX + "time_embed.cond_proj.weight"
        if guidance_key in keys:
            config = replace(config, guidance_embed_dim=shape_of(weights, guidance_key)[1])
        ours = ldm_unet_key_map(config)
        # Keys with no name of ours keep their file name, so load_strict reports them as unexpected.
        weights = RenamedWeights(weights, {ours.get(k[len(LDM_UNET_PREFIX):], k): k for k in keys})
    with torch.device("meta"):
        unet = UNet(config)
    unet = load_strict(unet, weights, source, device=device, dtype=dtype).eval()
    return unet.fuse_qkv() if fuse_qkv else unet


def ldm_unet_state_dict(unet: UNet) -> dict:
    """The UNet's weights under their original (LDM) names, `model.diffusion_model.` included, on the CPU.
    A student's ω projection has no LDM name and comes out as `time_embed.cond_proj` (which load_unet reads back,
    but no other program does: bake it first, see save_unet)."""
    ldm = {ours: name for name, ours in ldm_unet_key_map(unet.config).items()}
    return {LDM_UNET_PREFIX + ldm[k]: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}


def save_unet(unet: UNet, folder, original_file: str | None = None) -> None:
    """Write `folder/config.json` + `folder/diffusion_pytorch_model.safetensors` in diffusers' layout, which
    `UNet2DConditionModel.from_pretrained(folder)` loads unchanged (a student's ω input is `time_cond_proj_dim`;
    its boundary scalings and ω convention are extra keys diffusers ignores, read back by `load_unet`).
    `original_file`, a .safetensors path, also gets the UNet in the original layout (`model.diffusion_model.` keys,
    as A1111/ComfyUI read them); that layout has no place for an ω input, so a student must be baked first
    (bake_guidance). Each file is written to a temporary name and renamed, so none is ever half written;
    the weights go first, so a config.json never describes weights that are not there yet."""
    if original_file is not None and Path(original_file).suffix != ".safetensors":
        raise ValueError(f"save_unet: original_file must end in .safetensors, got {original_file!r}.")
    if original_file is not None and unet.config.guidance_embed_dim:
        raise ValueError("save_unet: original_file: this UNet is a student with an ω input (guidance_embed_dim="
                         f"{unet.config.guidance_embed_dim}), which the original layout cannot hold (diffusers' "
                         "from_single_file and ComfyUI drop it silently). Bake a guidance scale in first: "
                         "save_unet(bake_guidance(student, omega), ..., original_file=...), or run "
                         "`python export.py --to single-file --guidance OMEGA` for a whole A1111/ComfyUI checkpoint.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in unet.state_dict().items()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    config = json.dumps(unet.config.to_diffusers_config(), indent=2)
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(config))
    if original_file is not None:
        original = ldm_unet_state_dict(unet)
        atomic_write(Path(original_file), lambda tmp: save_file(original, str(tmp), metadata={"format": "pt"}))
