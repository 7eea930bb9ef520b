"""LoRA adapters on a frozen UNet, as named sets in its layers, one switched on at a time; kohya-format files for
A1111, ComfyUI and diffusers.

A LoRA (Hu et al. 2021) adds a low-rank delta to a frozen layer: y = W x + b + (α / r) · up(down(x)), with `up`
starting at zero, so the adapted network starts as the frozen one. Here the delta is never written into the
backbone: `attach(unet, name, adapters)` turns each adapted nn.Linear / nn.Conv2d into an `Adapted` layer (same
object, same weights and state-dict keys) that holds named LoRA sets, and `use_adapters(unet, name)` switches one
set on (an attribute of each layer, read by its forward), so with none on the backbone computes exactly the plain
UNet. One UNet in memory then serves as the teacher, a LoRA student, its EMA target and the discriminator, each
with its own set. The selection is ordinary module state: torch.compile guards on it (one graph per set) and the
UNet's activation checkpointing recomputes a block with the set it ran with (`recompute_context`); no hooks.

Targets follow LCM-LoRA's SD1.5 recipe (Luo et al. 2023, diffusers' train_lcm_distill_lora_sd.py: rank 64,
alpha = rank, peft `target_modules` matched as module-path suffixes):
  attention   to_q, to_k, to_v, to_out.0           (self- and cross-attention)
  transformer proj_in, proj_out (1×1 convs in SD1.5), ff.net.0.proj (GEGLU), ff.net.2
  ResBlocks   conv1, conv2, conv_shortcut (3×3 / 1×1 convs), time_emb_proj
  resampling  downsamplers.0.conv (stride 2), upsamplers.0.conv
conv_in, conv_out, the norms and the time-embedding MLP are not adapted.

A conv LoRA is kohya's: down = Conv2d(in, r, k, stride, padding) with the adapted conv's geometry, up = Conv2d(r, out,
1), so the merged weight is W + (α / r) · up ⊗ down (`delta_weight`).

Files:
  adapters.safetensors  ours, written inside a run: the Adapters' state dict (module paths with `.` -> `__`, then
                        `.down.weight` / `.up.weight`) and the LoRAConfig + target paths as JSON in the header.
  kohya                 `lora_unet_<diffusers module path, . -> _>.lora_down.weight / .lora_up.weight / .alpha`, the
                        names kohya-ss sd-scripts writes for SD1.x (it trains on diffusers' UNet layout), which A1111,
                        ComfyUI and diffusers' `load_lora_weights` read. `load_kohya` also reads the LDM spelling
                        (`lora_unet_input_blocks_1_1_proj_in`) that some trainers write.
"""
import copy
import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint import CheckpointError, atomic_write, open_weights
from unet import ldm_unet_key_map

LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
KOHYA_PREFIX = "lora_unet_"
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
CONFIG_KEY = "scott.lora"  # the header entry of our adapters.safetensors
ADAPTERS_FILE = "adapters.safetensors"                # a LoRA run's student adapters, inside its step-N/ folder
TARGET_ADAPTERS_FILE = "target-adapters.safetensors"  # and the EMA target's


@dataclass
class LoRAConfig:
    rank: int = 64                               # LCM-LoRA SD1.5: 64
    alpha: float = 64.0                          # delta scale α / r (LCM-LoRA: α = r, scale 1)
    targets: tuple = field(default=LCM_LORA_TARGETS)  # module-path suffixes to adapt (peft's target_modules)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"LoRAConfig: rank must be a positive integer, got {self.rank!r}.")
        if not self.targets:
            raise ValueError("LoRAConfig: targets is empty; name the module-path suffixes to adapt.")


class LoRA(nn.Module):
    """Low-rank delta (α / r) · up(down(x)) for one frozen nn.Linear or nn.Conv2d; `up` starts at zero."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d) and base.groups == 1:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation,
                                  bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise ValueError(f"LoRA: can adapt nn.Linear or an ungrouped nn.Conv2d, not {base!r}.")
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)
        nn.init.zeros_(self.up.weight)
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank

    def forward(self, x):
        return self.up(self.down(x)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """(α / r) · up ⊗ down in float64, shaped like the adapted layer's weight: (out, in) or (out, in, k, k)."""
        up, down = self.up.weight.double(), self.down.weight.double()
        return (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:]) * self.scale


def key_of(path: str) -> str:
    """ModuleDict key of a module path (ModuleDict keys may not contain dots)."""
    return path.replace(".", "__")


def path_of(key: str) -> str:
    """The module path of a ModuleDict key."""
    return key.replace("__", ".")


def find_targets(backbone: nn.Module, suffixes) -> list:
    """Module paths of the backbone whose path equals or ends in `.suffix` for one of `suffixes` (peft's rule)."""
    backbone = getattr(backbone, "_orig_mod", backbone)
    return [name for name, _ in backbone.named_modules()
            if name and any(name == s or name.endswith("." + s) for s in suffixes)]


class Adapters(nn.ModuleDict):
    """The LoRA weights for a set of backbone modules, keyed by module path (`.` -> `__`). Holds no backbone: its
    LoRAs are attached to the backbone's layers under a name (`attach`), so optimisers, checkpoints, all-reduces and
    `consistency.ema_update` see only the adapters."""

    def __init__(self, loras: dict):
        super().__init__({key_of(path): lora for path, lora in loras.items()})

    @classmethod
    def build(cls, backbone: nn.Module, targets, rank: int, alpha: float) -> "Adapters":
        """New adapters (up = 0) of one rank and alpha on the backbone modules at paths `targets`."""
        layers = dict(getattr(backbone, "_orig_mod", backbone).named_modules())
        missing = [t for t in targets if t not in layers]
        if missing:
            raise ValueError(f"Adapters: the backbone has no module {missing[0]!r} ({len(missing)} missing): "
                             f"these adapters are for another architecture.")
        adapters = cls({t: LoRA(layers[t], rank, alpha) for t in targets})
        return adapters.to(next(backbone.parameters()).device)

    @classmethod
    def for_config(cls, backbone: nn.Module, cfg: LoRAConfig = LoRAConfig()) -> "Adapters":
        """Adapters on every module of the backbone that cfg.targets names."""
        targets = find_targets(backbone, cfg.targets)
        if not targets:
            raise ValueError(f"Adapters: no module of the backbone matches targets {cfg.targets}.")
        return cls.build(backbone, targets, cfg.rank, cfg.alpha)

    @property
    def targets(self) -> list:
        """The adapted module paths."""
        return [path_of(k) for k in self.keys()]

    def check_fits(self, layers: dict) -> None:
        """Raise ValueError unless every adapter has a module of matching shape in `layers` (path -> module)."""
        for key, lora in self.items():
            layer = layers.get(path_of(key))
            if layer is None or tuple(_delta_shape(lora)) != tuple(layer.weight.shape):
                found = "absent" if layer is None else tuple(layer.weight.shape)
                raise ValueError(f"LoRA for {path_of(key)}: delta shape {tuple(_delta_shape(lora))}, the UNet's "
                                 f"weight {found}. This LoRA is for another architecture (SD1.x LoRAs only).")


class LoRAStudent(nn.Module):
    """A LoRA student (or its EMA target): the frozen `backbone` UNet run with its adapter set `name` switched on,
    called like a full student, `net(x, t, cond, w) -> ε̂`. The adapters are attached to the backbone's layers
    (`attach`) and registered here only, so .parameters(), an optimiser, DDP and `consistency.ema_update` (between
    two LoRAStudents) see the adapters alone; the backbone is shared. `backbone_fwd` is what is called (the backbone,
    or a torch.compile of it: the selection is set outside the compiled call, where Dynamo guards on it).
    `config` is the backbone's with the boundary scalings the student is trained with, as make_student records."""

    def __init__(self, backbone: nn.Module, adapters: Adapters, name: str = "student",
                 timestep_scaling: float = 10.0, sigma_data: float = 0.5):
        super().__init__()
        self.adapters, self.name = adapters, name
        object.__setattr__(self, "backbone", backbone)  # held, not registered: the backbone is not the student's
        object.__setattr__(self, "backbone_fwd", backbone)
        attach(backbone, name, adapters)
        plain = getattr(backbone, "_orig_mod", backbone)
        self.config = replace(plain.config, timestep_scaling=timestep_scaling, sigma_data=sigma_data)

    def call_through(self, backbone_fwd: nn.Module) -> None:
        """Run the backbone as `backbone_fwd` (e.g. torch.compile(backbone)); held, not registered."""
        object.__setattr__(self, "backbone_fwd", backbone_fwd)

    def forward(self, x, t, cond, w=None):
        # w is ignored: a LoRA changes existing layers only and cannot add an ω input (the student is a plain SD1.5
        # LoRA); it learns one guidance-distilled model across the teacher's ω range.
        with use_adapters(self.backbone, self.name):
            return self.backbone_fwd(x, t, cond)


def _delta_shape(lora: LoRA) -> tuple:
    """The adapted layer's weight shape, read from the LoRA's own weights."""
    return (lora.up.weight.shape[0], *lora.down.weight.shape[1:])


# ---- adapters in the UNet's layers: named sets, one switched on at a time -------------------------------------------

class Adapted:
    """What an adapted nn.Linear / nn.Conv2d of the UNet becomes (`attach` swaps its class in place, so its own
    weight and bias, their state-dict keys and every reference to the layer stay as they were). It holds named
    LoRA sets in `lora_sets` (a plain dict: the LoRAs are registered in their owner, a LoRAStudent or the
    Discriminator, so the UNet's parameters, state dict and dtype casts are the plain UNet's) and `active`, the name
    of the set that is on ("" = none). `active` is an ordinary attribute read by the forward: torch.compile guards
    on it (one graph per set), and UNet._run hands it to activation checkpointing's recomputation."""

    lora_sets: dict
    active: str

    def forward(self, x):
        out = super().forward(x)
        if not self.active:
            return out
        lora = self.lora_sets[self.active]
        return out + lora(x.to(lora.down.weight.dtype)).to(out.dtype)


class AdaptedLinear(Adapted, nn.Linear):
    pass


class AdaptedConv2d(Adapted, nn.Conv2d):
    pass


ADAPTED = {nn.Linear: AdaptedLinear, nn.Conv2d: AdaptedConv2d}


def attach(unet: nn.Module, name: str, adapters: Adapters) -> None:
    """Give each layer of `unet` that `adapters` names the LoRA set `name` (off until `use_adapters` selects it);
    a set attached again under the same name replaces it. ValueError if an adapter does not fit its layer."""
    unet = getattr(unet, "_orig_mod", unet)
    layers = dict(unet.named_modules())
    adapters.check_fits(layers)
    if not name:
        raise ValueError("attach: an adapter set needs a non-empty name.")
    for key, lora in adapters.items():
        layer = layers[path_of(key)]
        if not isinstance(layer, Adapted):
            layer.__class__ = ADAPTED[type(layer)]
            layer.lora_sets, layer.active = {}, ""
        layer.lora_sets[name] = lora


def detach(unet: nn.Module) -> None:
    """Remove every adapter set from `unet`: its adapted layers are plain nn.Linear / nn.Conv2d again."""
    for layer in adapted_layers(unet):
        layer.__class__ = next(plain for plain, adapted in ADAPTED.items() if isinstance(layer, adapted))
        del layer.lora_sets, layer.active


def adapted_layers(unet: nn.Module) -> list:
    """The layers of `unet` that hold adapter sets, in module order."""
    return [m for m in getattr(unet, "_orig_mod", unet).modules() if isinstance(m, Adapted)]


def select(layers: list, names) -> None:
    """Switch on names[i] in layers[i] (a str switches that set on everywhere; "" switches every set off)."""
    names = [names] * len(layers) if isinstance(names, str) else names
    for layer, name in zip(layers, names):
        if name and name not in layer.lora_sets:
            continue  # a set covers only its own layers (D's: the decoder's Linears); the others stay plain
        layer.active = name


@contextmanager
def use_adapters(unet: nn.Module, name: str):
    """Within this block the adapter set `name` is on in every layer that has it (every other layer computes the
    plain UNet); on exit the previous selection is back. name "" = the plain UNet."""
    layers = adapted_layers(unet)
    previous = [layer.active for layer in layers]
    select(layers, "")
    select(layers, name)
    try:
        yield
    finally:
        select(layers, previous)


def recompute_context(unet: nn.Module):
    """For torch.utils.checkpoint's context_fn: (a no-op for the forward, a context for the recomputation in
    backward that switches on the adapters this forward ran with), so a recomputed block is the block that ran."""
    layers = adapted_layers(unet)
    names = [layer.active for layer in layers]

    @contextmanager
    def as_in_forward():
        previous = [layer.active for layer in layers]
        select(layers, names)
        try:
            yield
        finally:
            select(layers, previous)
    return nullcontext(), as_in_forward()


def base_parameters(unet: nn.Module) -> list:
    """The UNet's own parameters: its .parameters() (attached adapters are registered in their owners only)."""
    return list(getattr(unet, "_orig_mod", unet).parameters())


@torch.no_grad()
def merge(adapters: Adapters, unet: nn.Module) -> nn.Module:
    """A copy of `unet` with every delta folded into its weight (W + (α / r) · up ⊗ down, summed in float64 and
    stored in W's dtype): it computes what `unet` computes with `adapters` switched on, as a plain UNet (the copy
    has no adapter sets attached)."""
    merged = copy.deepcopy(getattr(unet, "_orig_mod", unet))
    detach(merged)
    layers = dict(merged.named_modules())
    adapters.check_fits(layers)
    for key, lora in adapters.items():
        weight = layers[path_of(key)].weight
        weight.copy_((weight.double() + lora.delta_weight().to(weight.device)).to(weight.dtype))
    return merged


# ---- our file: adapters.safetensors -------------------------------------------------------------------------------

def save_adapters(adapters: Adapters, path) -> None:
    """Write the adapters' weights (fp32 or as stored) and their rank, alpha and targets in the header; atomic."""
    ranks, alphas = {lora.rank for lora in adapters.values()}, {lora.alpha for lora in adapters.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"save_adapters: adapters of mixed rank {sorted(ranks)} / alpha {sorted(alphas)}; save "
                         f"them with save_kohya, which records each module's own.")
    config = {"rank": ranks.pop(), "alpha": alphas.pop(), "targets": adapters.targets}
    state = {k: v.detach().to("cpu").contiguous() for k, v in adapters.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata={CONFIG_KEY: json.dumps(config)}))


def read_adapters(path) -> tuple[dict, dict]:
    """(config {rank, alpha, targets}, state dict on the CPU) of a file `save_adapters` wrote (CheckpointError if
    the file is unreadable or not ours)."""
    weights = open_weights(path)
    with safe_open(str(path), framework="pt") as f:
        header = (f.metadata() or {}).get(CONFIG_KEY)
    if header is None:
        raise CheckpointError(f"{path}: no {CONFIG_KEY!r} entry in its header, so it is not an adapters file of a "
                              f"scott run. A kohya LoRA (lora_unet_* keys) is read by load_kohya / sample.py --lora.")
    return json.loads(header), {k: weights[k] for k in weights}


def load_adapters(path, backbone: nn.Module) -> Adapters:
    """The Adapters `save_adapters` wrote, built for `backbone` (CheckpointError if the file is not ours or does
    not fit the backbone)."""
    config, weights = read_adapters(path)
    try:
        adapters = Adapters.build(backbone, config["targets"], config["rank"], config["alpha"])
        adapters.load_state_dict(weights)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: does not fit this UNet ({str(e).splitlines()[0]}).") from None
    return adapters


# ---- kohya files ---------------------------------------------------------------------------------------------------

def kohya_state_dict(adapters: Adapters, dtype: torch.dtype = torch.float16) -> dict:
    """kohya's keys for every adapter: `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight` (in `dtype`)
    and `.alpha` (a 0-d fp32 tensor, always written, so readers never fall back to α = r silently)."""
    state = {}
    for key, lora in adapters.items():
        name = KOHYA_PREFIX + path_of(key).replace(".", "_")
        state[name + ".lora_down.weight"] = lora.down.weight.detach().to("cpu", dtype).contiguous()
        state[name + ".lora_up.weight"] = lora.up.weight.detach().to("cpu", dtype).contiguous()
        state[name + ".alpha"] = torch.tensor(lora.alpha, dtype=torch.float32)
    return state


def save_kohya(adapters: Adapters, path, dtype: torch.dtype = torch.float16, metadata: dict | None = None) -> None:
    """Write a kohya-format LoRA file (see kohya_state_dict) with sd-scripts' `ss_*` header entries; atomic."""
    ranks = sorted({lora.rank for lora in adapters.values()})
    header = {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks[-1]),
              "ss_network_alpha": str(next(iter(adapters.values())).alpha), "ss_base_model_version": "sd_v1",
              **(metadata or {})}
    state = kohya_state_dict(adapters, dtype)
    atomic_write(Path(path), lambda tmp: save_file(state, str(tmp), metadata=header))


def kohya_names(unet: nn.Module) -> dict:
    """kohya module name (without `lora_unet_`) -> our module path, for every Linear and Conv2d of an SD1.x UNet:
    the diffusers spelling (our paths, `.` -> `_`) and the LDM one (`input_blocks_1_1_proj_in`)."""
    unet = getattr(unet, "_orig_mod", unet)
    paths = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    names = {p.replace(".", "_"): p for p in paths}
    for ldm, ours in ldm_unet_key_map(unet.config).items():
        if ours.endswith(".weight") and ours[:-len(".weight")] in paths:
            names.setdefault(ldm[:-len(".weight")].replace(".", "_"), ours[:-len(".weight")])
    return names


def load_kohya(path, unet: nn.Module) -> Adapters:
    """A kohya-format SD1.x UNet LoRA as Adapters for `unet` (each module with its own rank and alpha; α = r where
    the file has no alpha, kohya's default). CheckpointError for anything else: no LoRA keys, text-encoder LoRAs
    (not applied here), LyCORIS/DoRA variants, unknown modules or shapes of another architecture."""
    weights = open_weights(path)
    keys = list(weights)
    if not keys:
        raise CheckpointError(f"{path}: holds no tensors, so it is not a LoRA.")
    foreign = [k for k in keys if not (k.startswith(KOHYA_PREFIX) and k.endswith(KOHYA_SUFFIXES))]
    if any(k.startswith(("lora_te_", "lora_te1_", "lora_te2_")) for k in foreign):
        raise CheckpointError(f"{path}: has text-encoder LoRA weights (lora_te*), which this project does not apply; "
                              f"use a UNet-only LoRA (export.py --to lora writes one).")
    if foreign:
        raise CheckpointError(f"{path}: not a kohya-format UNet LoRA (e.g. key {foreign[0]!r}; expected only "
                              f"lora_unet_<module>{{{', '.join(KOHYA_SUFFIXES)}}}). LyCORIS/LoHa/DoRA files are not "
                              f"supported.")
    names = kohya_names(unet)
    modules = sorted({k[len(KOHYA_PREFIX):].split(".")[0] for k in keys})
    unknown = [m for m in modules if m not in names]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} LoRA module(s) this SD1.x UNet does not have (e.g. "
                              f"{unknown[0]!r}): a LoRA for another architecture (SDXL, SD 2.x?).")
    layers = dict(getattr(unet, "_orig_mod", unet).named_modules())
    order = {p: i for i, p in enumerate(layers)}
    modules.sort(key=lambda m: order[names[m]])  # the UNet's module order, as Adapters.for_config builds them
    adapters = Adapters({names[m]: _kohya_lora(weights, KOHYA_PREFIX + m, layers[names[m]], path) for m in modules})
    return adapters.to(next(unet.parameters()).device)


def _kohya_lora(weights, name: str, layer: nn.Module, path) -> LoRA:
    """One LoRA from a kohya file's `name.lora_down.weight`, `.lora_up.weight` and optional `.alpha`."""
    if name + ".lora_down.weight" not in weights or name + ".lora_up.weight" not in weights:
        raise CheckpointError(f"{path}: {name} lacks its lora_down or lora_up weight; the file is incomplete.")
    down, up = weights[name + ".lora_down.weight"], weights[name + ".lora_up.weight"]
    for part, tensor in (("lora_down", down), ("lora_up", up)):
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: {name}.{part}.weight is stored as {tensor.dtype}; LoRA weights must be "
                                  f"floating point (fp32, fp16 or bf16): casting would round them (to 0 at LoRA's "
                                  f"usual scale). Re-export the LoRA in a float dtype.")
    rank = down.shape[0]
    alpha = _kohya_alpha(weights, name, path) if name + ".alpha" in weights else float(rank)
    lora = LoRA(layer, rank, alpha)
    if down.shape != lora.down.weight.shape or up.shape != lora.up.weight.shape:
        raise CheckpointError(f"{path}: {name}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} do not fit "
                              f"this UNet's {tuple(layer.weight.shape)} (expected {tuple(lora.down.weight.shape)} / "
                              f"{tuple(lora.up.weight.shape)}): a LoRA for another architecture.")
    with torch.no_grad():
        lora.down.weight.copy_(down)
        lora.up.weight.copy_(up)
    return lora


def _kohya_alpha(weights, name: str, path) -> float:
    """A kohya file's `name.alpha`: one finite number above 0 (kohya writes a 0-d tensor), else a CheckpointError
    naming the file and the module."""
    alpha = weights[name + ".alpha"]
    if alpha.numel() != 1:
        raise CheckpointError(f"{path}: {name}.alpha has shape {tuple(alpha.shape)}; a LoRA's alpha is one number "
                              f"(a 0-d tensor). The file is damaged or not a kohya LoRA.")
    value = float(alpha.reshape(()))
    if not (math.isfinite(value) and value > 0):
        raise CheckpointError(f"{path}: {name}.alpha = {value}; a LoRA's alpha must be a finite number above 0 "
                              f"(the delta is scaled by alpha / rank; a negative one would subtract it).")
    return value
