"""vae.py: SD's AutoencoderKL equals diffusers' on the same random weights (several tiny configs, and SD1.5's once),
loads from every layout a user has (diffusers folder with new or deprecated attention names, .bin, original single
file .safetensors/.ckpt) with the same outputs, decodes in fp32 on request, and refuses bad input clearly.
diffusers is the test-time oracle only; vae.py never imports it."""
import gc
import json

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from checkpoint import LDM_UNET_PREFIX, LDM_VAE_PREFIX, CheckpointError
from vae import VAE, IdentityVAE, VAEConfig, ldm_vae_key_map, load_vae, save_vae, decode_dtype

CONFIGS = {  # tiny configs that differ in depth, width, groups, resnets per level and image channels
    "tiny": VAEConfig.tiny(),
    "two-levels": VAEConfig(block_channels=(8, 16), layers_per_block=2, norm_groups=4),
    "four-levels-gray": VAEConfig(in_channels=1, block_channels=(8, 8, 16, 16), layers_per_block=1, norm_groups=4,
                                  scaling_factor=0.13025),
}
WEIGHTS = "diffusion_pytorch_model.safetensors"


def reference_vae(config: VAEConfig, seed=0) -> AutoencoderKL:
    """diffusers' AutoencoderKL with random weights; norms and biases randomised too, so their roles are tested."""
    torch.manual_seed(seed)
    ref = AutoencoderKL(**{k: v for k, v in config.to_diffusers_config().items() if k != "_class_name"}).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return ref


def images(config: VAEConfig, batch=2, height=32, width=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, config.in_channels, height, width, generator=g) * 2 - 1  # non-square: catches h/w swaps


def relative_error(ours, ref) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.abs().max()).item()


@torch.no_grad()
def compare_with_diffusers(ours: VAE, ref: AutoencoderKL, x, label):
    """encode (mean and sample) and decode against diffusers; prints and checks the relative max abs error."""
    scale = ours.config.scaling_factor
    posterior = ref.encode(x).latent_dist
    z_ref, z = posterior.mean * scale, ours.encode(x)
    sample_ref = posterior.sample(torch.Generator().manual_seed(7)) * scale
    sample = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    decoded_ref, decoded = ref.decode(z_ref / scale).sample, ours.decode(z_ref)
    errors = {"encode": relative_error(z, z_ref), "sample": relative_error(sample, sample_ref),
              "decode": relative_error(decoded, decoded_ref)}
    print(f"{label}: rel. max abs error " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    factor = ours.spatial_factor
    assert z.shape == (x.shape[0], 4, x.shape[2] // factor, x.shape[3] // factor) and decoded.shape == x.shape
    assert not torch.equal(sample, z)  # the sample really is noisier than the mean
    assert all(e <= 1e-4 for e in errors.values()), errors


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers_on_random_weights(tmp_path, name):
    config = CONFIGS[name]
    ref = reference_vae(config)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    assert ours.config == config and not ours.training and not any(p.requires_grad for p in ours.parameters())
    compare_with_diffusers(ours, ref, images(config), name)


@pytest.mark.slow
def test_full_sd15_matches_diffusers(tmp_path):
    config = VAEConfig.sd15()
    ref = reference_vae(config)
    ref.save_pretrained(tmp_path / "vae")
    ours = load_vae(tmp_path)  # the diffusers root: vae/ is found inside
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863 and ours.spatial_factor == 8
    compare_with_diffusers(ours, ref, images(config, batch=1, height=24, width=16), "SD1.5 config")
    del ours, ref
    gc.collect()


def test_real_sd15_files_use_deprecated_attention_names(tmp_path):
    """The Hub's SD1.5 vae/ weights say query/key/value/proj_attn; they load the same as to_q/to_k/to_v/to_out.0."""
    ref = reference_vae(VAEConfig.tiny())
    ref.save_pretrained(tmp_path / "new")
    ref.save_pretrained(tmp_path / "old")
    weights = load_file(tmp_path / "old" / WEIGHTS)
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in weights.items():
        for new_name, old_name in renames.items():
            k = k.replace(f"attentions.0.{new_name}.", f"attentions.0.{old_name}.")
        old[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old and len(old) == len(weights)
    save_file(old, str(tmp_path / "old" / WEIGHTS))
    # diffusers itself reads these names as the same weights: the spelling we accept is the one it accepts.
    assert all(torch.equal(a, b) for a, b in zip(AutoencoderKL.from_pretrained(tmp_path / "old").state_dict().values(),
                                                  ref.state_dict().values()))
    a, b = load_vae(tmp_path / "new"), load_vae(tmp_path / "old")
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    save_file({**old, "encoder.mid_block.attentions.0.to_q.weight": weights[
        "encoder.mid_block.attentions.0.to_q.weight"].clone()}, str(tmp_path / "old" / WEIGHTS))
    with pytest.raises(CheckpointError, match="both the old"):
        load_vae(tmp_path / "old")


def test_save_vae_writes_what_diffusers_loads(tmp_path):
    config = CONFIGS["four-levels-gray"]
    torch.manual_seed(0)
    ours = VAE(config).eval()
    save_vae(ours, tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json", WEIGHTS]  # no temporary left
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    ref = AutoencoderKL.from_pretrained(tmp_path / "vae")  # strict by default: every key used
    assert ref.config.scaling_factor == 0.13025
    compare_with_diffusers(ours, ref, images(config), "saved by save_vae")
    assert load_vae(tmp_path / "vae").config == config


def test_pickled_bin_weights_load_like_safetensors(tmp_path):
    ref = reference_vae(VAEConfig.tiny())
    ref.save_pretrained(tmp_path / "vae", safe_serialization=False)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.bin").is_file()
    ours = load_vae(tmp_path)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.state_dict().items())


def original_layout(vae_weights: dict, config: VAEConfig) -> dict:
    """The weights as a CompVis single file stores them (first_stage_model.*, attention matrices as 1×1 convs),
    with the neighbours real files carry: other models' weights and schedule buffers."""
    ours_to_ldm = {ours: ldm for ldm, ours in ldm_vae_key_map(config).items()}
    sd = {}
    for k, v in vae_weights.items():
        conv_matrix = ".attentions.0.to_" in k and k.endswith(".weight")
        sd[LDM_VAE_PREFIX + ours_to_ldm[k]] = v[:, :, None, None] if conv_matrix else v
    sd[LDM_UNET_PREFIX + "out.2.bias"] = torch.zeros(4)
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    return sd


def test_ldm_table_agrees_with_diffusers_converter_for_sd15():
    """Our LDM names, converted back by diffusers' own LDM->diffusers code, give exactly our keys and shapes."""
    config = VAEConfig.sd15()
    with torch.device("meta"):
        state = VAE(config).state_dict()
    converted = convert_ldm_vae_checkpoint(original_layout(state, config), config.to_diffusers_config())
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in state.items()}
    table = ldm_vae_key_map(config)
    assert table["decoder.up.3.block.2.norm1.weight"] == "decoder.up_blocks.0.resnets.2.norm1.weight"  # reversed
    assert table["encoder.down.1.block.0.nin_shortcut.weight"] == "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
    assert table["encoder.norm_out.bias"] == "encoder.conv_norm_out.bias"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_original_single_file_equals_diffusers_folder(tmp_path, suffix):
    config = CONFIGS["tiny"]
    ref = reference_vae(config)
    ref.save_pretrained(tmp_path / "vae")
    single = original_layout(ref.state_dict(), config)
    converted = convert_ldm_vae_checkpoint(single, config.to_diffusers_config())  # independent check of the table
    assert converted.keys() == ref.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in ref.state_dict().items())
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in single.items()}, str(path))
    else:
        torch.save({"state_dict": single, "global_step": 1000}, path)  # the original .ckpt wrapper
    from_file, from_folder = load_vae(path, config=config), load_vae(tmp_path / "vae")
    x = images(config)
    with torch.no_grad():
        assert torch.equal(from_file.encode(x), from_folder.encode(x))
        z = from_folder.encode(x)
        assert torch.equal(from_file.decode(z), from_folder.decode(z))
    half = load_vae(path, dtype=torch.bfloat16, config=config)
    assert half.encoder.conv_in.weight.dtype == torch.bfloat16


@torch.no_grad()
def test_decode_fp32_runs_in_float32_even_with_bf16_weights_and_autocast():
    torch.manual_seed(0)
    vae = VAE(VAEConfig.tiny()).eval()
    for p in vae.parameters():
        p.copy_(p.bfloat16())  # weights exactly representable in bf16, so fp32 and bf16 copies hold the same values
    z = vae.encode(images(vae.config)).bfloat16()
    expected = vae.decode(z.float())  # the fp32 model on the same values
    vae.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoded = vae.decode(z, fp32=True)
    assert decoded.dtype == torch.float32 and vae.decoder.conv_in.weight.dtype == torch.bfloat16  # weights untouched
    error = relative_error(decoded, expected)
    print(f"decode(fp32=True) with bf16 weights vs the fp32 model: rel. max abs error {error:.1e}")
    assert error <= 1e-6
    in_bf16 = vae.decode(z)
    assert in_bf16.dtype == torch.bfloat16 and relative_error(in_bf16, expected) > 1e-4  # what fp32=True avoids


def test_encode_sample_needs_an_explicit_generator():
    vae = VAE(VAEConfig.tiny())
    with pytest.raises(ValueError, match="generator"):
        vae.encode(images(vae.config), sample=True)


def test_identity_vae_for_pixel_space_models():
    x = images(VAEConfig.tiny()).bfloat16()
    vae = IdentityVAE()
    assert vae.spatial_factor == 1 and torch.equal(vae.encode(x), x)
    assert vae.decode(x, fp32=True).dtype == torch.float32 and torch.equal(vae.decode(x), x)


# ---- configs and bad input ----------------------------------------------------------------------------------------

# stable-diffusion-v1-5's vae/config.json as published (it predates the scaling_factor key: the default applies).
SD15_VAE_CONFIG = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
                   "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
                   "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
                   "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}


def test_config_round_trip_and_sdxl_scale():
    assert VAEConfig.from_diffusers_config(SD15_VAE_CONFIG, "x") == VAEConfig.sd15()
    for config in [VAEConfig.sd15(), *CONFIGS.values()]:
        assert VAEConfig.from_diffusers_config(config.to_diffusers_config(), "x") == config
    sdxl = {**SD15_VAE_CONFIG, "scaling_factor": 0.13025, "force_upcast": True}
    assert VAEConfig.from_diffusers_config(sdxl, "x").scaling_factor == 0.13025


@pytest.mark.parametrize("change,message", [
    ({"latent_channels": 16, "shift_factor": 0.0609}, "latent_channels = 16"),  # SD3 / Flux VAEs
    ({"_class_name": "AutoencoderTiny"}, "_class_name = 'AutoencoderTiny'"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 3 + ["AttnUpDecoderBlock2D"]}, "up_block_types"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention = False"),
    ({"out_channels": 1}, "out_channels = 1"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
])
def test_unsupported_configs_are_refused(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**SD15_VAE_CONFIG, **change}))
    with pytest.raises(CheckpointError, match=message) as info:
        load_vae(tmp_path)
    assert "config.json" in str(info.value)


def test_bad_weights_in_a_folder(tmp_path):
    ref = reference_vae(VAEConfig.tiny())
    ref.save_pretrained(tmp_path / "vae")
    weights = load_file(tmp_path / "vae" / WEIGHTS)
    key = "decoder.up_blocks.0.resnets.1.conv1.weight"
    cases = {
        "missing": ({k: v for k, v in weights.items() if k != key}, rf"1 weight\(s\) missing, first '{key}'"),
        "unexpected": ({**weights, "decoder.extra.weight": torch.zeros(2)}, r"unexpected weight\(s\).*decoder.extra"),
        "shape": ({**weights, key: torch.zeros(3, 3)}, rf"'{key}' has shape \(3, 3\), expected \(32, 32, 3, 3\)"),
    }
    for name, (sd, message) in cases.items():
        save_file(sd, str(tmp_path / "vae" / WEIGHTS))
        with pytest.raises(CheckpointError, match=message) as info:
            load_vae(tmp_path)
        assert WEIGHTS in str(info.value), name  # the message names the file
    (tmp_path / "vae" / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_vae(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_vae(tmp_path / "missing.safetensors")


def test_bad_single_files(tmp_path):
    config = VAEConfig.tiny()
    single = original_layout(reference_vae(config).state_dict(), config)
    path = tmp_path / "model.safetensors"
    save_file({LDM_UNET_PREFIX + "out.2.bias": torch.zeros(4)}, str(path))
    with pytest.raises(CheckpointError, match="no VAE weights"):
        load_vae(path)
    save_file({k: v.contiguous() for k, v in single.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"model.safetensors: .*(missing|shape)"):
        load_vae(path)  # a tiny VAE read with SD1.5's architecture (the default)
    save_file({**{k: v.contiguous() for k, v in single.items()},
               LDM_VAE_PREFIX + "encoder.down.0.attn.0.q.weight": torch.zeros(16, 16, 1, 1)}, str(path))
    with pytest.raises(CheckpointError, match=r"1 unexpected weight\(s\), first 'encoder.down.0.attn.0.q.weight'"):
        load_vae(path, config=config)
    key = LDM_VAE_PREFIX + "decoder.mid.attn_1.q.weight"
    save_file({**{k: v.contiguous() for k, v in single.items()}, key: torch.zeros(32, 32, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match=r"to_q.weight' has shape \(32, 32, 3, 3\), expected \(32, 32\)"):
        load_vae(path, config=config)


@torch.no_grad()
def test_bf16_decode_error_against_fp32_is_measured_and_bounded():
    """decode(dtype=bf16) of a tiny random VAE against its fp32 decode: the error is recorded and bounded (bf16 has
    8 mantissa bits, so ~1e-2 relative is its normal cost; a broken path, e.g. fp16 overflow or a lost scaling, is
    O(1)). The fp32 weights stay fp32 and decode_dtype's auto picks fp32 on a CPU."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig.tiny()).eval()
    z = vae.encode(images(vae.config))
    reference = vae.decode(z, fp32=True)
    decoded = vae.decode(z, dtype=torch.bfloat16)
    assert decoded.dtype == torch.bfloat16 and vae.decoder.conv_in.weight.dtype == torch.float32
    error = relative_error(decoded.float(), reference)
    print(f"bf16 decode vs fp32 decode (tiny random VAE): rel. max abs error {error:.2e}")
    assert 1e-5 < error < 5e-2  # not fp32 in disguise, and within bf16's rounding (measured 2.3e-2)
    vae.to(torch.bfloat16)  # weights already bf16: the same decode, without copies
    assert torch.equal(vae.decode(z, dtype=torch.bfloat16), decoded)
    assert decode_dtype("auto", "cpu") == torch.float32 and decode_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ValueError, match="fp32 or bf16"):
        decode_dtype("fp16", "cpu")
