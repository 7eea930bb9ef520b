"""The pretrained bundle: CLIP text encoder loading in every layout, load_sd15 from a diffusers folder and from an
original single file (same outputs), and one clear error for each kind of bad input."""
import pytest
import torch
from safetensors.torch import save_file

from checkpoint import LDM_TEXT_PREFIX, LDM_UNET_PREFIX, LDM_VAE_PREFIX, CheckpointError
from sd15 import encode_prompts, load_sd15, load_text_encoder, load_tokenizer
from sde_solver import NoiseSchedule
from tiny_models import (reference_text_encoder, tiny_text_config, v4_keys, write_text_encoder_folder,
                         write_tiny_sd15, write_tokenizer)
from unet import UNetConfig, ldm_unet_key_map
from vae import VAEConfig, ldm_vae_key_map

PROMPTS = ["a red circle", "an astronaut riding a horse on the moon", ""]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_tokenizer_gives_clip_ids(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ids = tok(["ab"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0] == 512 and ids[0, 3] == 513  # <|startoftext|> a b</w> <|endoftext|>


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_text_encoder_folder_matches_transformers(tmp_path, tokenizer_dir, layout):
    ref = reference_text_encoder()
    keys = v4_keys(ref)
    if layout == "transformers5":
        keys = {k.removeprefix("text_model."): v for k, v in keys.items()}
    keys["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # old files carry this buffer
    write_text_encoder_folder(tmp_path / "text_encoder", ref, keys)
    ours = load_text_encoder(tmp_path)
    tok = load_tokenizer(tokenizer_dir)
    a, b = encode_prompts(tok, ours, PROMPTS), encode_prompts(tok, ref, PROMPTS)
    err = (a - b).abs().max().item() / b.abs().max().item()
    print(f"text encoder ({layout}) rel. max abs error {err:.2e}")
    assert a.shape == (3, 77, 32) and err <= 1e-6
    assert not any(p.requires_grad for p in ours.parameters())


def original_single_file(path, unet, vae, text):
    """The same weights in the original CompVis layout, with the extras real files carry."""
    unet_names = {ours: ldm for ldm, ours in ldm_unet_key_map(unet.config).items()}
    vae_names = {ours: ldm for ldm, ours in ldm_vae_key_map(vae.config).items()}
    sd = {LDM_UNET_PREFIX + unet_names[k]: v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        ldm = vae_names[k]
        is_attention_matrix = ".attn_1." in ldm and ldm.endswith(".weight") and v.ndim == 2
        sd[LDM_VAE_PREFIX + ldm] = v[..., None, None] if is_attention_matrix else v  # stored as 1×1 convs
    sd.update({LDM_TEXT_PREFIX + k: v for k, v in v4_keys(text).items()})
    sd[LDM_TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["alphas_cumprod"] = NoiseSchedule.sd15().alphas_cumprod.float()
    sd["betas"] = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    sd["model_ema.decay"] = torch.tensor(0.9999)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def bundle_outputs(bundle, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    ctx = bundle.encode_prompts(PROMPTS[:2])
    image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = bundle.vae.encode(image)
    eps = bundle.unet(torch.randn(z.shape, generator=g), torch.tensor([999, 10]), ctx)
    return ctx, z, eps, bundle.vae.decode(z)


def test_single_file_equals_diffusers_folder(tmp_path, tokenizer_dir):
    folder = tmp_path / "sd"
    unet, vae, text = write_tiny_sd15(folder)
    original_single_file(tmp_path / "model.safetensors", unet, vae, text)
    with torch.no_grad():
        a = bundle_outputs(load_sd15(folder))
        b = bundle_outputs(load_sd15(tmp_path / "model.safetensors", tokenizer=tokenizer_dir,
                                     text_config=tiny_text_config(), unet_config=UNetConfig.tiny(),
                                     vae_config=VAEConfig.tiny()))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    bundle = load_sd15(folder, dtype=torch.bfloat16)
    assert bundle.unet.conv_in.weight.dtype == torch.bfloat16 and bundle.alphas_cumprod.shape == (1000,)


# ---- bad input: one clear error each -------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_sd15(tmp_path / "nope")


def test_folder_without_weights(tmp_path, tokenizer_dir):
    write_tiny_sd15(tmp_path)
    (tmp_path / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"text_encoder: no weights found"):
        load_sd15(tmp_path)


def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        load_sd15(tmp_path)


def test_truncated_safetensors(tmp_path, tokenizer_dir):
    unet, vae, text = write_tiny_sd15(tmp_path / "sd")
    path = tmp_path / "model.safetensors"
    original_single_file(path, unet, vae, text)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_sd15(path, tokenizer=tokenizer_dir)


def test_file_that_is_not_a_checkpoint(tmp_path, tokenizer_dir):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not a checkpoint")
    with pytest.raises(CheckpointError, match="weights-only PyTorch checkpoint"):
        load_sd15(path, tokenizer=tokenizer_dir)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="unknown weight file type"):
        load_sd15(path, tokenizer=tokenizer_dir)


def test_pickle_with_code_is_never_run(tmp_path, tokenizer_dir):
    class Exploit:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('ran')" % str(tmp_path / "pwned"),))

    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Exploit()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="never unpickled"):
        load_sd15(tmp_path / "evil.ckpt", tokenizer=tokenizer_dir)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("family,key,shape,message", [
    ("SD2", "cond_stage_model.model.token_embedding.weight", (10, 8), "SD 2.x"),
    ("SDXL", "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", (10, 8), "SDXL"),
    ("SD2-unet", LDM_UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", (320, 1024), "1024"),
])
def test_foreign_families_are_refused(tmp_path, tokenizer_dir, family, key, shape, message):
    save_file({key: torch.zeros(shape)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_sd15(tmp_path / "m.safetensors", tokenizer=tokenizer_dir)


def test_single_file_needs_a_tokenizer(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="holds no tokenizer.*tokenizer=PATH"):
        load_sd15(tmp_path / "m.safetensors")


def test_missing_unexpected_and_misshapen_weights(tmp_path, tokenizer_dir):
    ref = reference_text_encoder()
    keys = v4_keys(ref)
    first = next(iter(keys))
    cases = {
        "missing": ({k: v for k, v in keys.items() if k != first}, r"1 weight\(s\) missing, first"),
        "unexpected": ({**keys, "text_model.extra.weight": torch.zeros(2)}, r"unexpected weight\(s\).*extra"),
        "shape": ({**keys, first: torch.zeros(3, 3)}, r"has shape \(3, 3\), expected"),
    }
    for name, (sd, message) in cases.items():
        write_text_encoder_folder(tmp_path / name / "text_encoder", ref, sd)
        with pytest.raises(CheckpointError, match=message) as info:
            load_text_encoder(tmp_path / name)
        assert "model.safetensors" in str(info.value)  # the message names the file
