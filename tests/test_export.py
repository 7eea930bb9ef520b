"""export.py and unet.bake_guidance: a baked UNet equals its student at that ω; the pipeline folder samples in
diffusers' LatentConsistencyModelPipeline exactly as our sampler does; the single file reads in diffusers'
single-file loaders (the ones that mirror A1111's / ComfyUI's key maps) with every key consumed; bad inputs get
their own errors and no half-written output is ever left. Tiny SD1.5-shaped models, no downloads.
Run with `pytest -s` to see the measured errors."""
import json
import os
from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)
from safetensors import safe_open
from safetensors.torch import load_file

import export
from consistency import consistency_timesteps
from sample import generate
from sd15 import TOY_FOLDER, load_sd15
from sde_solver import NoiseSchedule
from tiny_models import tiny_text_config, v4_keys, write_tiny_sd15
from unet import UNet, UNetConfig, bake_guidance, load_unet, make_student, save_unet
from vae import VAEConfig

TINY = UNetConfig.tiny()


def trained_student(teacher: UNet, seed=0) -> UNet:
    """A student whose ω input matters (as after training): random ω projection, every other weight moved too."""
    student = make_student(teacher, guidance_embed_dim=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        student.time_embedding.cond_proj.weight.normal_(generator=g)
    return student.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD1.5-shaped diffusers folder with a trained-looking student/ in it."""
    root = tmp_path_factory.mktemp("sd15")
    teacher, vae, text = write_tiny_sd15(root)
    student = trained_student(teacher)
    save_unet(student, root / "student")
    return root, student, vae, text


def inputs(cfg, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, 8, 8, generator=g)
    return x, torch.tensor([999, 259, 17, 0][:batch]), torch.randn(batch, 5, cfg.cross_attention_dim, generator=g)


def relative_error(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run(*argv):
    """export.main with these arguments (paths as str)."""
    export.main([str(a) for a in argv])


# ---- bake_guidance --------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_bake_guidance_equals_the_student_at_that_omega():
    student = trained_student(UNet(TINY).eval())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x, t, context = inputs(TINY, batch=4)
    worst = 0.0
    for omega in (1.0, 3.5, 8.0, 15.0):
        baked = bake_guidance(student, omega)
        expected = student(x, t, context, torch.full((4,), omega))
        worst = max(worst, relative_error(baked(x, t, context), expected))
        other = student(x, t, context, torch.full((4,), omega + 2.0))
        assert relative_error(baked(x, t, context), other) > 1e-3  # another ω is another function
    print(f"bake_guidance: worst rel. max abs error vs the student, 4 ω × 4 timesteps: {worst:.1e}")
    assert worst <= 5e-6  # fp32 rounding
    assert baked.config == TINY  # a plain SD1.5 UNet: no ω input, no student-only keys
    assert baked.time_embedding.cond_proj is None and "time_embedding.cond_proj.weight" not in baked.state_dict()
    config = baked.config.to_diffusers_config()
    assert config["time_cond_proj_dim"] is None and not {"timestep_scaling", "sigma_data"} & config.keys()
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # the student is unchanged
    with pytest.raises(ValueError, match="bake_guidance: this UNet has no ω input"):
        bake_guidance(baked, 3.0)


def test_save_unet_refuses_an_unbaked_student_in_the_original_layout(tmp_path):
    student = trained_student(UNet(TINY))
    with pytest.raises(ValueError, match="original_file: this UNet is a student.*bake_guidance.*export.py --to "
                                         "single-file"):
        save_unet(student, tmp_path / "s", original_file=str(tmp_path / "s.safetensors"))
    assert not (tmp_path / "s.safetensors").exists()
    save_unet(bake_guidance(student, 7.5), tmp_path / "b", original_file=str(tmp_path / "b.safetensors"))
    assert load_unet(tmp_path / "b.safetensors", config=TINY).config == TINY


# ---- --to pipeline --------------------------------------------------------------------------------------------------

def test_pipeline_folder_samples_like_our_sampler(tiny, tmp_path):
    """Same seeds on both sides: the pipeline's generators (one per image) give the start latents and then each
    LCMScheduler re-noising draw, exactly the streams sample.image_noise gives our sampler."""
    root, student, _, _ = tiny
    out = tmp_path / "pipe"
    run("--model", root, "--student", root / "student", "--to", "pipeline", "--out", out)
    pipe = LatentConsistencyModelPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.tokenizer.model_max_length == 77
    assert "num_inference_steps=4, guidance_scale=7.5" in (out / "README.md").read_text()
    bundle = load_sd15(root)
    schedule = NoiseSchedule(bundle.alphas_cumprod)
    prompts, omega, seed = ["a red fox", "two cats"], 6.0, 5
    for steps in (1, 2, 4, 8):
        pipe.scheduler.set_timesteps(steps)
        assert pipe.scheduler.timesteps.tolist() == consistency_timesteps(steps).tolist()
    for steps in (1, 2, 4):
        with torch.no_grad():
            ours, _ = generate(bundle, student, schedule, prompts, steps, omega, 32, 32, seed=seed)
        generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        theirs = pipe(prompts, num_inference_steps=steps, guidance_scale=omega, height=32, width=32,
                      generator=generators, output_type="pt").images
        err = (ours - theirs).abs().max().item()
        print(f"pipeline vs our sampler, {steps} step(s): max abs pixel error {err:.1e}")
        assert ours.shape == theirs.shape == (2, 3, 32, 32) and err <= 1e-5
        assert ours.std() > 0.01  # not a blank image compared with a blank image


def test_pipeline_of_the_toy_model(tmp_path):
    """The shipped pixel-space toy: no vae/ (load with vae=None), its own tokenizer, 1 step = our sampler."""
    out = tmp_path / "toy"
    run("--to", "pipeline", "--out", out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == [None, None] and not (out / "vae").exists()
    pipe = LatentConsistencyModelPipeline.from_pretrained(out, vae=None)
    pipe.set_progress_bar_config(disable=True)
    bundle = load_sd15(TOY_FOLDER)
    student = load_unet(TOY_FOLDER / "student")
    with torch.no_grad():
        ours, _ = generate(bundle, student, NoiseSchedule(bundle.alphas_cumprod), ["a red circle"], 2, 3.0, 32, 32)
    latents = pipe(["a red circle"], num_inference_steps=2, guidance_scale=3.0, height=256, width=256,
                   generator=[torch.Generator().manual_seed(0)], output_type="latent").images
    assert (ours - ((latents + 1) / 2).clamp(0, 1)).abs().max() <= 1e-5


def test_pipeline_dtype(tiny, tmp_path):
    """--dtype reaches every component of the folder."""
    root, _, _, _ = tiny
    run("--model", root, "--student", root / "student", "--to", "pipeline", "--dtype", "fp16", "--out", tmp_path / "p")
    files = sorted((tmp_path / "p").glob("*/*.safetensors"))
    assert [f.parent.name for f in files] == ["text_encoder", "unet", "vae"]
    assert all({v.dtype for v in load_file(str(f)).values()} == {torch.float16} for f in files)


# ---- --to single-file -----------------------------------------------------------------------------------------------

def file_tensors_consumed(sd: dict, converted: dict) -> set:
    """Keys of `sd` whose tensor (by storage) is in some converted tensor (the VAE converter slices 1×1 convs)."""
    used = {v.untyped_storage().data_ptr() for v in converted.values()}
    return {k for k, v in sd.items() if v.untyped_storage().data_ptr() in used}


def test_single_file_reads_in_diffusers_with_every_key_consumed(tiny, tmp_path):
    root, student, vae, text = tiny
    path = tmp_path / "scott.safetensors"
    run("--model", root, "--student", root / "student", "--to", "single-file", "--guidance", 8, "--dtype", "fp32",
        "--steps", 2, "--out", path)
    sd = load_file(str(path))
    # Every key is one of diffusers' LDM converters' (which mirror A1111's and ComfyUI's key maps): none dropped.
    unet_sd = convert_ldm_unet_checkpoint(sd, TINY.to_diffusers_config())
    vae_sd = convert_ldm_vae_checkpoint(sd, vae.config.to_diffusers_config())
    clip_sd = convert_ldm_clip_checkpoint(sd)
    prefixes = {p: {k for k in sd if k.startswith(p)} for p in export.LDM_PREFIXES}
    assert set(sd) == set().union(*prefixes.values()) and all(prefixes.values())
    for name, converted, prefix in [("unet", unet_sd, "model.diffusion_model."), ("vae", vae_sd, "first_stage_model."),
                                    ("text", clip_sd, "cond_stage_model.transformer.")]:
        part = {k: sd[k] for k in prefixes[prefix]}
        assert file_tensors_consumed(part, converted) == set(part), f"{name}: keys no converter reads"
    assert unet_sd.keys() == UNet2DConditionModel.from_config(TINY.to_diffusers_config()).state_dict().keys()
    assert vae_sd.keys() == AutoencoderKL.from_config(vae.config.to_diffusers_config()).state_dict().keys()
    assert clip_sd.keys() == v4_keys(text).keys()
    attention = [k for k in prefixes["first_stage_model."] if ".attn_1." in k and k.endswith("weight")
                 and not k.endswith("norm.weight")]
    assert len(attention) == 8 and all(sd[k].shape[2:] == (1, 1) for k in attention)  # LDM's 1×1 convs
    assert all(torch.equal(clip_sd[k], v) for k, v in v4_keys(text).items())

    # diffusers' own single-file loaders, offline, with the folder's configs.
    ref_unet = UNet2DConditionModel.from_single_file(str(path), config=str(root), subfolder="unet",
                                                     local_files_only=True).eval()
    x, t, context = inputs(TINY, batch=4)
    with torch.no_grad():
        expected = student(x, t, context, torch.full((4,), 8.0))
        err = relative_error(ref_unet(x, t, encoder_hidden_states=context).sample, expected)
    ref_vae = AutoencoderKL.from_single_file(str(path), config=str(root), subfolder="vae",
                                             local_files_only=True).eval()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        vae_err = relative_error(ref_vae.decode(z).sample, vae.decode(z * vae.config.scaling_factor))
    print(f"single file in diffusers: UNet rel. error vs the student at ω=8 {err:.1e}, VAE decode {vae_err:.1e}")
    assert err <= 1e-5 and vae_err <= 1e-5

    # our own loader reads it back, and the metadata names the sampler.
    ours = load_sd15(path, tokenizer=root / "tokenizer", text_config=tiny_text_config(), unet_config=TINY,
                     vae_config=VAEConfig.tiny())
    with torch.no_grad():
        assert relative_error(ours.unet(x, t, context), expected) <= 1e-5
    meta = safe_open(str(path), "pt").metadata()
    assert meta["scott.sampler"] == "LCM" and meta["scott.guidance_baked"] == "8.0" and meta["scott.cfg_scale"] == "1"
    assert json.loads(meta["scott.timesteps"]) == [999, 499] and meta["scott.steps"] == "2"


def test_single_file_dtype_and_toy(tmp_path):
    """fp16 by default; the pixel-space toy has no VAE part; bf16 on request."""
    path = tmp_path / "toy.safetensors"
    run("--to", "single-file", "--guidance", 3, "--out", path)
    sd = load_file(str(path))
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert not any(k.startswith("first_stage_model.") for k in sd)
    baked = bake_guidance(load_unet(TOY_FOLDER / "student"), 3.0)
    assert load_unet(path, config=UNetConfig.toy()).config == baked.config
    run("--to", "single-file", "--guidance", 3, "--dtype", "bf16", "--out", path, "--overwrite")
    assert {v.dtype for v in load_file(str(path)).values()} == {torch.bfloat16}


# ---- --to diffusers-unet --------------------------------------------------------------------------------------------

def test_diffusers_unet_folder_is_the_baked_student(tiny, tmp_path):
    root, student, _, _ = tiny
    run("--model", root, "--student", root / "student", "--to", "diffusers-unet", "--guidance", 4.5, "--out",
        tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["time_cond_proj_dim"] is None and "timestep_scaling" not in config
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    x, t, context = inputs(TINY)
    with torch.no_grad():
        err = relative_error(ref(x, t, encoder_hidden_states=context).sample, student(x, t, context, 4.5))
    assert err <= 1e-5


# ---- bad inputs -----------------------------------------------------------------------------------------------------

def error_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        run(*argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_get_their_own_errors(tiny, tmp_path, capsys):
    root, _, _, _ = tiny
    base = ("--model", root, "--student", root / "student")
    assert "--student" in error_of(capsys, "--model", root, "--to", "pipeline", "--out", tmp_path / "a")
    msg = error_of(capsys, "--model", root, "--student", root / "unet", "--to", "pipeline", "--out", tmp_path / "a")
    assert "unet: this UNet has no guidance (ω) input" in msg and "not a distilled student" in msg
    other = UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(True, False), num_heads=2,
                       cross_attention_dim=32, norm_groups=8)
    save_unet(make_student(UNet(other), guidance_embed_dim=16), tmp_path / "other")
    msg = error_of(capsys, "--model", root, "--student", tmp_path / "other", "--to", "pipeline", "--out",
                   tmp_path / "a")
    assert "are different architectures (first difference: conv_in" in msg
    for to in ("single-file", "diffusers-unet"):
        assert f"--guidance W is required with --to {to}" in error_of(capsys, *base, "--to", to, "--out",
                                                                        tmp_path / "a.safetensors")
    assert "must end in .safetensors" in error_of(capsys, *base, "--to", "single-file", "--guidance", 3, "--out",
                                                  tmp_path / "a.ckpt")
    (tmp_path / "exists").mkdir()
    assert "exists: already exists" in error_of(capsys, *base, "--to", "pipeline", "--out", tmp_path / "exists")
    assert "--steps 9" in error_of(capsys, *base, "--to", "pipeline", "--steps", 9, "--out", tmp_path / "a")
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.safetensors").exists()


def test_pipeline_refuses_a_student_the_lcm_scheduler_cannot_sample(tiny, tmp_path, capsys):
    root, student, _, _ = tiny
    odd = replace(student.config, sigma_data=0.25)
    moved = UNet(odd)
    moved.load_state_dict(student.state_dict())
    save_unet(moved, tmp_path / "odd")
    msg = error_of(capsys, "--model", root, "--student", tmp_path / "odd", "--to", "pipeline", "--out", tmp_path / "p")
    assert "sigma_data=0.25" in msg and "--to single-file" in msg and not (tmp_path / "p").exists()


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


def half_written():
    """A writer that leaves part of a file behind and then fails as a full disk does."""
    def write(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        no_space()
    return write


@pytest.mark.parametrize("to", ["pipeline", "single-file", "diffusers-unet"])
def test_a_full_disk_leaves_no_half_written_output(tiny, tmp_path, capsys, monkeypatch, to):
    """The write fails midway: nothing appears under --out, no temporary is left, and an output being replaced
    (--overwrite) is still the old one."""
    root, _, _, _ = tiny
    out = tmp_path / ("out.safetensors" if to == "single-file" else "out")
    argv = ("--model", root, "--student", root / "student", "--to", to, "--guidance", 2, "--out", out)
    earlier = tmp_path.parent / f"{tmp_path.name}-earlier"  # an earlier export, for the --overwrite below
    earlier.mkdir()
    run(*argv[:-1], earlier / out.name)
    if to == "pipeline":
        monkeypatch.setattr(export, "write_tokenizer", no_space)  # after unet/, vae/ and text_encoder/ were written
    else:
        monkeypatch.setattr(export, "save_file", half_written())
        monkeypatch.setattr("unet.save_file", half_written())
    msg = error_of(capsys, *argv)
    assert "No space left on device" in msg and "nothing was left under that name" in msg
    assert os.listdir(tmp_path) == []
    os.replace(earlier / out.name, out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else out.read_bytes()
    msg = error_of(capsys, *argv, "--overwrite")
    assert "No space left on device" in msg
    assert sorted(os.listdir(tmp_path)) == [out.name]
    assert (sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else out.read_bytes()) == before


def test_sd15_shaped_vae_and_text_keys_are_all_consumed():
    """At SD1.5's real shapes (the UNet's table is checked at SD1.5 size in test_unet.py): every VAE and CLIP key
    of a single file is one diffusers' converters read, and they give back exactly our weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd15 import SD15_TEXT_CONFIG, ldm_text_state_dict
    from vae import VAE, ldm_vae_state_dict
    vae = VAE(VAEConfig.sd15())
    sd = ldm_vae_state_dict(vae)
    converted = convert_ldm_vae_checkpoint(sd, vae.config.to_diffusers_config())
    assert file_tensors_consumed(sd, converted) == set(sd) and len(sd) == len(vae.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in vae.state_dict().items())
    text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    sd = ldm_text_state_dict(text)
    assert convert_ldm_clip_checkpoint(sd).keys() == v4_keys(text).keys() - {"text_model.embeddings.position_ids"}
    params = sum(v.numel() for v in vae.state_dict().values()), sum(v.numel() for v in sd.values())
    print(f"SD1.5 VAE {params[0] / 1e6:.1f}M, CLIP text {params[1] / 1e6:.1f}M parameters")
    assert params == (83_653_863, 123_060_480)
