"""The SD1.5 UNet: equal to diffusers' UNet2DConditionModel on the same random weights; loads a diffusers folder
(root or unet/, .safetensors or .bin), an original single file (.safetensors or .ckpt) and its own saves; writes
folders diffusers loads unchanged; a student starts as its teacher; and each bad input gets its own clear error.
Run with `pytest -s` to see the measured errors."""
import gc
import json
import time
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import \
    LatentConsistencyModelPipeline
from safetensors.torch import load_file, save_file

from checkpoint import LDM_UNET_PREFIX, CheckpointError, load_strict
from unet import (UNet, UNetConfig, guidance_embedding, ldm_unet_key_map, ldm_unet_state_dict, load_unet, make_student,
                  save_unet)

TINY = UNetConfig.tiny()
CONFIGS = {  # every structural choice the config allows, at a few hundred thousand parameters each
    "tiny": TINY,
    "three-levels": UNetConfig(in_channels=3, out_channels=5, block_channels=(16, 16, 32), layers_per_block=2,
                               attention_levels=(False, True, True), num_heads=4, cross_attention_dim=24,
                               norm_groups=8, sample_size=16),
    "attention-everywhere": UNetConfig(block_channels=(16, 32), layers_per_block=1, attention_levels=(True, True),
                                       num_heads=1, cross_attention_dim=8, norm_groups=4),
    "student": replace(TINY, guidance_embed_dim=16),
    "student-embeds-omega": replace(TINY, guidance_embed_dim=16, guidance_offset=0.0),  # ω itself, not LCM's ω − 1
}


def reference_unet(cfg: UNetConfig, seed=0) -> UNet2DConditionModel:
    """diffusers' UNet for our config, every weight random (norms and biases too, so no mapping hides behind 1/0)."""
    torch.manual_seed(seed)
    ref = UNet2DConditionModel.from_config(cfg.to_diffusers_config()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def ours_from(ref: UNet2DConditionModel, cfg: UNetConfig) -> UNet:
    """Our UNet holding the very tensors of `ref` (keys are diffusers' names: no table involved)."""
    with torch.device("meta"):
        unet = UNet(cfg)
    return load_strict(unet, ref.state_dict(), "reference").eval()


def inputs(cfg: UNetConfig, batch=2, size=(8, 8), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *size, generator=g)
    t = torch.tensor([999, 17, 500, 0][:batch])
    context = torch.randn(batch, 5, cfg.cross_attention_dim, generator=g)
    w = torch.tensor([8.0, 3.5, 1.0, 15.0][:batch]) if cfg.guidance_embed_dim else None
    return x, t, context, w


@torch.no_grad()
def run_reference(ref, cfg, x, t, context, w):
    cond = None if w is None else guidance_embedding(w - cfg.guidance_offset, cfg.guidance_embed_dim)  # LCM: ω − 1
    return ref(x, t, encoder_hidden_states=context, timestep_cond=cond).sample


def relative_error(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- equal to diffusers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size", [(n, (8, 8)) for n in CONFIGS] + [("tiny", (9, 6))])
def test_matches_diffusers(name, size):
    cfg = CONFIGS[name]
    ref = reference_unet(cfg)
    x, t, context, w = inputs(cfg, size=size)
    with torch.no_grad():
        eps = ours_from(ref, cfg)(x, t, context, w)
    expected = run_reference(ref, cfg, x, t, context, w)
    err = relative_error(eps, expected)
    print(f"{name} {size}: rel. max abs error vs diffusers {err:.1e}")
    assert eps.shape == x.shape[:1] + (cfg.out_channels,) + x.shape[2:] and err <= 1e-4


@pytest.mark.slow
def test_full_sd15_matches_diffusers():
    cfg = UNetConfig.sd15()
    torch.manual_seed(0)
    ref = UNet2DConditionModel.from_config(cfg.to_diffusers_config()).eval()  # diffusers' own random init
    unet = ours_from(ref, cfg)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # SD1.5's UNet
    x, t, context, w = inputs(cfg, batch=1, size=(16, 16))
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eps = unet(x, t, context)
    err = relative_error(eps, run_reference(ref, cfg, x, t, context, w))
    print(f"sd15: rel. max abs error vs diffusers {err:.1e}")
    del ref, unet
    gc.collect()
    assert err <= 1e-4


def test_guidance_embedding_is_lcm_pipelines():
    w = torch.tensor([0.0, 1.0, 3.5, 8.0, 15.0])
    for dim in (256, 15):
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        assert torch.equal(guidance_embedding(w, dim), ref)
    odd = guidance_embedding(w, 7)
    assert odd.shape == (5, 7) and torch.all(odd[:, -1] == 0)


# ---- the original (LDM) layout ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "three-levels", "sd15"])
def test_ldm_key_map_inverts_diffusers_converter(name):
    """Write an original-layout state dict with our table; diffusers' own LDM -> diffusers converter must give back
    exactly the diffusers state dict (tensor for tensor). This checks the table independently of our loader."""
    cfg = UNetConfig.sd15() if name == "sd15" else CONFIGS[name]
    with torch.device("meta"):  # names and shapes only: no memory even for the full SD1.5 UNet
        state = UNet(cfg).state_dict()
    table = ldm_unet_key_map(cfg)
    assert sorted(table.values()) == sorted(state)  # a bijection onto our weights
    ldm = {LDM_UNET_PREFIX + name: state[ours] for name, ours in table.items()}
    converted = convert_ldm_unet_checkpoint(ldm, cfg.to_diffusers_config())
    assert converted.keys() == state.keys()
    assert all(converted[k] is state[k] for k in state)


def write_original_file(path, unet: UNet):
    """The UNet in the original layout plus what real single files also carry. A student's ω projection goes under
    our `time_embed.cond_proj` (files written before save_unet refused students; load_unet still reads them)."""
    save_unet(unet, path.parent / "folder")
    sd = ldm_unet_state_dict(unet)
    sd["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(3)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)
    if path.suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 840000}, path)  # the CompVis/Lightning wrapper
    else:
        save_file(sd, str(path))
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("name", ["tiny", "student"])
def test_original_single_file_loads_like_its_folder(tmp_path, suffix, name):
    cfg = CONFIGS[name]
    unet = ours_from(reference_unet(cfg), cfg)
    path = write_original_file(tmp_path / f"model{suffix}", unet)
    from_file = load_unet(path, config=TINY)  # a student's ω input is found from its weights
    from_folder = load_unet(tmp_path / "folder")
    assert from_file.config == from_folder.config == cfg
    x, t, context, w = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(from_file(x, t, context, w), from_folder(x, t, context, w))
        assert torch.equal(from_file(x, t, context, w), unet(x, t, context, w))


def test_load_casts_to_the_requested_dtype(tmp_path):
    unet = UNet(TINY)
    save_unet(unet, tmp_path / "unet")
    loaded = load_unet(tmp_path / "unet", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.conv_in.weight, unet.conv_in.weight.bfloat16())


# ---- diffusers folders, both ways ---------------------------------------------------------------------------------

@pytest.mark.parametrize("safe", [True, False])
def test_loads_folders_diffusers_wrote(tmp_path, safe):
    """A diffusers root (…/unet/ inside) and the unet/ folder itself, as diffusers' save_pretrained writes them."""
    cfg = CONFIGS["three-levels"]
    ref = reference_unet(cfg)
    ref.save_pretrained(tmp_path / "unet", safe_serialization=safe)
    x, t, context, w = inputs(cfg)
    expected = run_reference(ref, cfg, x, t, context, w)
    for path in (tmp_path, tmp_path / "unet"):
        with torch.no_grad():
            assert relative_error(load_unet(path)(x, t, context), expected) <= 1e-5


def test_saved_student_runs_unchanged_in_diffusers(tmp_path):
    """Its config.json also records how to sample it (boundary scalings, ω convention): keys diffusers ignores."""
    teacher = ours_from(reference_unet(TINY), TINY)
    student = make_student(teacher, guidance_embed_dim=16, timestep_scaling=3.0, sigma_data=0.25)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_()  # as if trained: ω now matters
    save_unet(student, tmp_path / "student")
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["time_cond_proj_dim"] == 16
    assert (config["timestep_scaling"], config["sigma_data"], config["guidance_offset"]) == (3.0, 0.25, 1.0)
    loaded = load_unet(tmp_path / "student")
    assert loaded.config == student.config and loaded.config.timestep_scaling == 3.0
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "student").eval()
    x, t, context, w = inputs(student.config)
    with torch.no_grad():
        ours = student(x, t, context, w)
        assert not torch.allclose(ours, teacher(x, t, context), atol=1e-3)
    err = relative_error(ours, run_reference(ref, student.config, x, t, context, w))
    print(f"saved student in diffusers: rel. max abs error {err:.1e}")
    assert err <= 1e-5
    assert not list(tmp_path.glob("student/.*"))  # no temporary files left behind


def test_config_roundtrip_and_presets():
    scaled = replace(CONFIGS["student"], timestep_scaling=3.0, sigma_data=0.25)
    for cfg in [UNetConfig.sd15(), UNetConfig.toy(), *CONFIGS.values(), scaled]:
        assert UNetConfig.from_diffusers_config(cfg.to_diffusers_config(), "test") == cfg
    assert "timestep_scaling" not in TINY.to_diffusers_config()  # a teacher's config.json stays diffusers' own
    with pytest.raises(ValueError, match="timestep_scaling and sigma_data must be positive"):
        replace(TINY, sigma_data=0.0)
    toy = sum(p.numel() for p in UNet(UNetConfig.toy()).parameters())
    print(f"toy UNet: {toy / 1e6:.1f}M parameters")
    assert 1e6 <= toy <= 3e6  # small enough to train and distil on a 2-core CPU


# ---- the student and the forward contract ---------------------------------------------------------------------------

def test_student_starts_as_teacher_and_learns_omega():
    teacher = ours_from(reference_unet(TINY), TINY)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = make_student(teacher, guidance_embed_dim=16)
    assert teacher.config.guidance_embed_dim == 0 and teacher.time_embedding.cond_proj is None
    x, t, context, _ = inputs(TINY)
    with torch.no_grad():
        expected = teacher(x, t, context)
        for w in (torch.tensor([1.0, 1.0]), torch.tensor([4.5, 15.0])):
            assert torch.equal(student(x, t, context, w), expected)
    student(x, t, context, torch.tensor([4.5, 15.0])).square().mean().backward()
    assert student.time_embedding.cond_proj.weight.grad.abs().sum() > 0  # ω can move the output
    with torch.no_grad():
        student.conv_in.weight.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # no shared storage


def test_w_is_required_exactly_for_a_student():
    x, t, context, _ = inputs(TINY)
    with pytest.raises(ValueError, match="guidance_embed_dim=0 and w was given"):
        UNet(TINY)(x, t, context, torch.ones(2))
    with pytest.raises(ValueError, match="guidance_embed_dim=16 and w was missing.*make_student"):
        UNet(CONFIGS["student"])(x, t, context)
    with pytest.raises(ValueError, match="make_student: the teacher already has an ω input"):
        make_student(UNet(CONFIGS["student"]))


def test_timesteps_per_sample_or_scalar():
    unet = UNet(TINY).eval()
    x, _, context, _ = inputs(TINY)
    with torch.no_grad():
        per_sample = unet(x, torch.tensor([250, 250]), context)
        assert torch.equal(unet(x, 250, context), per_sample)
        assert torch.equal(unet(x, torch.tensor(250.0), context), per_sample)  # float timesteps work too
        assert not torch.allclose(unet(x, torch.tensor([250, 900]), context), per_sample)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\) = \(2,\).*got \(3,\)"):
        unet(x, torch.tensor([1, 2, 3]), context)


def test_gradient_checkpointing_gives_the_same_gradients():
    unet = UNet(CONFIGS["student"]).train()
    x, t, context, w = inputs(unet.config)
    grads = []
    for flag in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = flag
        unet(x, t, context, w).square().mean().backward()
        grads.append([p.grad.clone() for p in unet.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_bf16_autocast_is_close_to_fp32():
    """fp32 weights under autocast (the student), and bf16-stored weights under autocast (a frozen teacher)."""
    cfg = CONFIGS["student"]
    unet = ours_from(reference_unet(cfg), cfg)
    x, t, context, w = inputs(cfg)
    with torch.no_grad():
        full = unet(x, t, context, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = unet(x, t, context, w)
            stored_half = unet.to(torch.bfloat16)(x, t, context, w)
    for name, out in [("fp32 weights", half), ("bf16 weights", stored_half)]:
        err = relative_error(out.float(), full)
        print(f"bf16 autocast, {name}: rel. max abs error vs fp32 {err:.1e}")
        assert out.dtype == torch.bfloat16 and err < 5e-2


def test_compiles_as_one_graph():
    """fullgraph=True fails on any graph break. aot_eager traces exactly what inductor would get, without the
    C++ compile (which takes minutes on a small CPU), so it proves the no-graph-break property cheaply."""
    unet = UNet(CONFIGS["student"]).eval()
    x, t, context, w = inputs(unet.config)
    start = time.time()
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(x, t, context, w)
        assert torch.allclose(out, unet(x, t, context, w), atol=1e-5)
    print(f"torch.compile(aot_eager, fullgraph=True): {time.time() - start:.1f} s")
    torch._dynamo.reset()


# ---- bad input ----------------------------------------------------------------------------------------------------

def write_folder(folder, config: dict, weights: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


@pytest.mark.parametrize("key,value,message", [
    ("cross_attention_dim", 1024, "cross_attention_dim=1024 .SD 2.x"),
    ("cross_attention_dim", 2048, "cross_attention_dim=2048 .*SDXL 2048"),
    ("use_linear_projection", True, "use_linear_projection=True, expected False"),
    ("addition_embed_type", "text_time", "addition_embed_type='text_time'"),
    ("transformer_layers_per_block", [1, 2, 10], "transformer_layers_per_block=.1, 2, 10."),
    ("attention_head_dim", [5, 10], "per-block head counts"),
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D"], "block types"),
])
def test_unsupported_unet_configs_are_refused(tmp_path, key, value, message):
    unet = UNet(TINY)
    folder = write_folder(tmp_path / "unet", {**TINY.to_diffusers_config(), key: value}, unet.state_dict())
    with pytest.raises(CheckpointError, match=f"config.json: {message}.*Only Stable Diffusion 1.x"):
        load_unet(folder)


def test_bad_weights_are_refused(tmp_path):
    state = UNet(TINY).state_dict()
    config = TINY.to_diffusers_config()
    bad = {
        "missing": ({k: v for k, v in state.items() if k != "conv_out.bias"},
                    "1 weight.s. missing, first 'conv_out.bias'"),
        "unexpected": ({**state, "extra.weight": torch.zeros(2)}, "1 unexpected weight.s., first 'extra.weight'"),
        "misshapen": ({**state, "conv_in.weight": torch.zeros(32, 9, 3, 3)},
                      r"'conv_in.weight' has shape \(32, 9, 3, 3\), expected \(32, 4, 3, 3\)"),
    }
    for case, (weights, message) in bad.items():
        folder = write_folder(tmp_path / case, config, weights)
        with pytest.raises(CheckpointError, match=f"{case}.*{message}"):
            load_unet(folder)


def test_bad_files_and_folders_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.safetensors: no such file"):
        load_unet(tmp_path / "nowhere.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty/config.json: missing"):
        load_unet(tmp_path / "empty")
    save_file({"first_stage_model.x": torch.zeros(1)}, str(tmp_path / "vae_only.safetensors"))
    with pytest.raises(CheckpointError, match="vae_only.safetensors: no UNet weights"):
        load_unet(tmp_path / "vae_only.safetensors")
    path = write_original_file(tmp_path / "model.safetensors", UNet(TINY))
    with pytest.raises(CheckpointError, match=r"model.safetensors: \d+ weight.s. missing"):
        load_unet(path)  # a tiny file read without its config: as SD1.5
    sd = load_file(str(path))
    for key, value, message in [
            ("input_blocks.99.0.weight", torch.zeros(1),
             "1 unexpected weight.s., first 'model.diffusion_model.input_blocks.99.0.weight'"),
            ("out.2.bias", None, "1 weight.s. missing, first 'conv_out.bias'")]:
        changed = {k: v for k, v in sd.items() if k != LDM_UNET_PREFIX + key}
        if value is not None:
            changed[LDM_UNET_PREFIX + key] = value
        save_file(changed, str(path))
        with pytest.raises(CheckpointError, match=f"model.safetensors: {message}"):
            load_unet(path, config=TINY)
    with pytest.raises(ValueError, match="original_file must end in .safetensors"):
        save_unet(UNet(TINY), tmp_path / "out", original_file=str(tmp_path / "model.ckpt"))


# ---- fused q/k/v (an inference switch) ------------------------------------------------------------------------------

def test_fused_qkv_is_exact_in_fp32_and_has_no_graph_breaks():
    """UNet.fuse_qkv computes what the unfused UNet computes (fp32, ≤ 1e-6 relative; the products only differ in
    blocking), is one Linear per self-attention, and the fused UNet traces as one graph (torch._dynamo.explain)."""
    torch.manual_seed(0)
    cfg = UNetConfig.tiny()
    plain = make_student(UNet(cfg).eval(), 16)
    fused = copy_of(plain).fuse_qkv()
    attn = fused.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.to_qkv.weight.shape == (3 * attn.to_out[0].in_features, attn.to_out[0].in_features)
    assert not hasattr(attn, "to_q") and fused.mid_block.attentions[0].transformer_blocks[0].attn2.to_qkv is None
    x, t, context, _ = inputs(cfg)
    w = torch.tensor([3.0, 8.0])
    with torch.no_grad():
        expected, got = plain(x, t, context, w), fused(x, t, context, w)
    error = relative_error(got, expected)
    print(f"fused vs unfused q/k/v, fp32: rel. error {error:.1e}")
    assert error <= 1e-6
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fused)(x, t, context, w)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def copy_of(unet: UNet) -> UNet:
    import copy
    return copy.deepcopy(unet)


def test_fused_qkv_saves_the_checkpoints_own_keys_byte_identical(tmp_path):
    """save → load_unet(fuse_qkv=True) → save again writes the same bytes: the fused model's state dict is the
    checkpoint's, with separate to_q/to_k/to_v keys; load_state_dict of an unfused state dict fills a fused UNet."""
    torch.manual_seed(0)
    student = make_student(UNet(UNetConfig.tiny()), 16)
    save_unet(student, tmp_path / "a")
    fused = load_unet(tmp_path / "a", fuse_qkv=True)
    assert any(name.endswith("attn1.to_qkv.weight") for name, _ in fused.named_parameters())
    assert list(fused.state_dict()) == list(load_unet(tmp_path / "a").state_dict())  # same keys, same order
    save_unet(fused, tmp_path / "b")
    for name in ("diffusion_pytorch_model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = make_student(UNet(UNetConfig.tiny()), 16)
    fused.load_state_dict(other.state_dict())
    loaded, wanted = fused.state_dict(), other.state_dict()
    assert loaded.keys() == wanted.keys() and all(torch.equal(loaded[k], wanted[k]) for k in wanted)


def test_fused_qkv_refuses_adapters():
    """Fusing would bypass adapters on the projections: refused for hooks, parametrizations and adapter wrappers."""
    from torch.nn.utils import parametrize

    class LoRAWrapper(torch.nn.Module):  # stands in for any adapter wrapper around a Linear
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    def attn1(unet):
        return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1

    hooked = UNet(UNetConfig.tiny())
    attn1(hooked).to_q.register_forward_hook(lambda m, i, o: o)
    parametrized = UNet(UNetConfig.tiny())
    parametrize.register_parametrization(attn1(parametrized).to_v, "weight", torch.nn.Identity())
    wrapped = UNet(UNetConfig.tiny())
    attn1(wrapped).to_k = LoRAWrapper(attn1(wrapped).to_k)
    for unet, match in ((hooked, "hooks"), (parametrized, "parametrizations"), (wrapped, "adapter")):
        with pytest.raises(ValueError, match=match):
            unet.fuse_qkv()
        assert attn1(unet).to_qkv is None  # nothing was fused
