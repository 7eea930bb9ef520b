"""LoRA adapters on one shared UNet: a switchable delta (a named set in the UNet's layers) that is exactly zero at
start and only on inside its block, also through torch.compile, merging equal to the adapted forward, EMA on adapters, our adapters file, and kohya files that diffusers' own kohya
conversion reads key for key and that diffusers' load_lora_weights (peft) applies to the teacher or to a fine-tune of
it with the output our student gives;
export.py --to lora and sample.py --lora end to end; clear errors for files that are not (SD1.x) LoRAs."""
import copy

import pytest
import torch
import torch.nn as nn
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

import export
import sample
from checkpoint import CheckpointError
from consistency import ema_update
from lora import (LCM_LORA_TARGETS, Adapters, LoRAConfig, adapted_layers, attach, kohya_state_dict, load_adapters,
                  load_kohya, merge, save_adapters, save_kohya, use_adapters)
from sd15 import load_sd15
from sde_solver import NoiseSchedule
from tiny_models import write_tiny_sd15
from unet import UNet, UNetConfig, ldm_unet_key_map, ldm_unet_state_dict, load_unet, save_unet

TINY = UNetConfig.tiny()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 7, TINY.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700]), ctx


def trained(adapters: Adapters, seed=1, std=0.05) -> Adapters:
    """Adapters as if trained: up moved off zero (in place)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in adapters.values():
            lora.up.weight.copy_(torch.randn(lora.up.weight.shape, generator=g) * std)
    return adapters


def setup(rank=4, alpha=8.0):
    torch.manual_seed(0)
    teacher = UNet(TINY).eval().requires_grad_(False)
    return teacher, trained(Adapters.for_config(teacher, LoRAConfig(rank=rank, alpha=alpha)))


def no_hooks(unet) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def active(adapters: Adapters, unet, name="lora"):
    """Attach `adapters` to `unet` as the set `name` and switch it on for a `with` block."""
    attach(unet, name, adapters)
    return use_adapters(unet, name)


def all_off(unet) -> bool:
    return all(layer.active == "" for layer in adapted_layers(unet))


# ---- the switchable delta -----------------------------------------------------------------------------------------

def test_targets_are_lcm_loras_linear_and_conv_layers():
    teacher, adapters = setup()
    layers = dict(teacher.named_modules())
    kinds = {type(layers[t]) for t in adapters.targets}
    assert kinds == {nn.Linear, nn.Conv2d}
    for suffix in LCM_LORA_TARGETS:  # every LCM-LoRA target kind is present in the tiny SD-shaped UNet
        assert any(t == suffix or t.endswith("." + suffix) for t in adapters.targets), suffix
    assert "down_blocks.0.downsamplers.0.conv" in adapters.targets  # a stride-2 conv
    assert not {"conv_in", "conv_out", "time_embedding.linear_1"} & set(adapters.targets)
    lora = adapters["down_blocks__0__downsamplers__0__conv"]
    assert lora.down.stride == (2, 2) and lora.up.kernel_size == (1, 1)


def test_zero_up_is_exactly_the_teacher():
    torch.manual_seed(0)
    teacher = UNet(TINY).eval()
    adapters = Adapters.for_config(teacher, LoRAConfig(rank=4))
    x, t, ctx = inputs()
    plain = teacher(x, t, ctx)
    with active(adapters, teacher):
        assert torch.equal(teacher(x, t, ctx), plain)


def test_delta_is_on_only_inside_the_block():
    teacher, adapters = setup()
    x, t, ctx = inputs()
    before = teacher(x, t, ctx)
    with active(adapters, teacher):
        during = teacher(x, t, ctx)
    assert (during - before).abs().max() > 1e-3
    assert torch.equal(teacher(x, t, ctx), before) and no_hooks(teacher) and all_off(teacher)
    assert len(adapted_layers(teacher)) == len(adapters)
    assert teacher.state_dict().keys() == UNet(TINY).state_dict().keys()  # the UNet's own keys, no adapter keys
    with pytest.raises(RuntimeError, match="boom"), use_adapters(teacher, "lora"):
        raise RuntimeError("boom")
    assert all_off(teacher)  # switched off on an exception too


def test_a_compiled_backbone_gets_the_same_delta_and_the_plain_unet_without_it():
    teacher, adapters = setup()
    x, t, ctx = inputs()
    plain = teacher(x, t, ctx)
    with active(adapters, teacher):
        eager = teacher(x, t, ctx)
    compiled = torch.compile(teacher, backend="eager")
    with use_adapters(compiled, "lora"):
        out = compiled(x, t, ctx)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(compiled(x, t, ctx), plain)  # Dynamo guards on the selection: the set is off again
    assert no_hooks(teacher)


def test_merge_equals_hooks_and_leaves_the_unet_alone():
    teacher, adapters = setup()
    x, t, ctx = inputs()
    original = copy.deepcopy(teacher.state_dict())
    with active(adapters, teacher):
        adapted = teacher(x, t, ctx)
    merged = merge(adapters, teacher)
    torch.testing.assert_close(merged(x, t, ctx), adapted, rtol=1e-5, atol=1e-5)
    assert not adapted_layers(merged) and adapted_layers(teacher)  # the copy is a plain UNet
    assert all(torch.equal(v, original[k]) for k, v in teacher.state_dict().items())


def test_gradients_reach_only_the_adapters_and_ema_update_works_on_them():
    teacher, adapters = setup()
    x, t, ctx = inputs()
    with active(adapters, teacher):
        teacher(x, t, ctx).square().mean().backward()
    assert all(p.grad is not None for p in adapters.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    target = copy.deepcopy(adapters)
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(1.0)
    ema_update(target, adapters, 0.75)
    for (name, p_target), p_online in zip(target.named_parameters(), adapters.parameters()):
        torch.testing.assert_close(p_target, p_online - 0.75, msg=name)  # 0.75 (θ − 1) + 0.25 θ


def test_adapters_file_round_trip_and_wrong_architecture(tmp_path):
    teacher, adapters = setup()
    save_adapters(adapters, tmp_path / "adapters.safetensors")
    loaded = load_adapters(tmp_path / "adapters.safetensors", teacher)
    assert loaded.targets == adapters.targets
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), adapters.state_dict().values()))
    other = UNet(UNetConfig(block_channels=(64, 128), layers_per_block=1, attention_levels=(True, False), num_heads=2,
                            cross_attention_dim=32))  # the same module paths, other shapes
    with pytest.raises(CheckpointError, match="does not fit"):
        load_adapters(tmp_path / "adapters.safetensors", other)
    with pytest.raises(ValueError, match="another architecture"):
        attach(other, "lora", adapters)  # refused before any layer is adapted ...
    assert not adapted_layers(other)
    with pytest.raises(ValueError, match="another architecture"):
        merge(adapters, other)  # ... and before any weight is changed
    save_kohya(adapters, tmp_path / "kohya.safetensors")
    with pytest.raises(CheckpointError, match="not an adapters file"):
        load_adapters(tmp_path / "kohya.safetensors", teacher)


# ---- kohya files, with diffusers' kohya conversion as the oracle ---------------------------------------------------

def diffusers_lora(path, unet_config) -> dict:
    """diffusers' reading of a kohya file (StableDiffusionPipeline.lora_state_dict, then its peft renaming):
    module path -> (lora_A, lora_B, alpha). With one alpha in the file, diffusers' peft config uses it for every
    module (utils.peft_utils.get_peft_kwargs); its per-module alpha names are not module paths, so a file with
    several alphas is refused here."""
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path), unet_config=unet_config)
    state = convert_unet_state_dict_to_peft(state)
    modules = {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in state}
    assert len(alphas) == len(modules) and len(set(alphas.values())) == 1  # an alpha per module, all the same
    alpha = set(alphas.values()).pop()
    return {m: (state[f"unet.{m}.lora_A.weight"], state[f"unet.{m}.lora_B.weight"], alpha) for m in modules}


def diffusers_pipeline(root, unet: UNet) -> StableDiffusionPipeline:
    """A diffusers pipeline built from the tiny folder at root, with `unet` as its UNet (written by our saver and read
    by diffusers), ready for diffusers' own load_lora_weights (peft backend)."""
    save_unet(unet, root / "candidate_unet")
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(root / "vae"), text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"), scheduler=DDIMScheduler(),
        unet=UNet2DConditionModel.from_pretrained(root / "candidate_unet").eval(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_every_kohya_key_is_mapped_by_diffusers_to_a_unet_module(tmp_path):
    teacher, adapters = setup()
    path = tmp_path / "lora.safetensors"
    save_kohya(adapters, path)
    file = load_file(path)
    assert len(file) == 3 * len(adapters) and all(k.startswith("lora_unet_") for k in file)
    assert {v.dtype for k, v in file.items() if k.endswith(".weight")} == {torch.float16}
    assert all(float(file[k]) == 8.0 for k in file if k.endswith(".alpha"))
    ref = UNet2DConditionModel.from_config(TINY.to_diffusers_config())
    lora = diffusers_lora(path, ref.config)  # diffusers raises on any key it cannot rename
    assert set(lora) == set(adapters.targets)  # same modules, by diffusers' names
    layers = dict(ref.named_modules())
    for name, (a, b, alpha) in lora.items():
        assert alpha == 8.0 and (b.shape[0], *a.shape[1:]) == tuple(layers[name].weight.shape), name


def load_lora_weights_output(unet: UNet, lora_file, tmp_path) -> torch.Tensor:
    """diffusers' load_lora_weights (peft backend) applies the kohya file to a pipeline whose UNet is `unet`; the
    pipeline UNet's output on inputs()."""
    write_tiny_sd15(tmp_path / "pipe")
    pipe = diffusers_pipeline(tmp_path / "pipe", unet)
    pipe.load_lora_weights(str(lora_file))
    x, t, ctx = inputs()
    with torch.no_grad():
        return pipe.unet(x, t, encoder_hidden_states=ctx).sample


def test_kohya_file_in_diffusers_load_lora_weights_gives_our_student(tmp_path):
    teacher, adapters = setup()
    save_kohya(adapters, tmp_path / "lora.safetensors", dtype=torch.float32)
    theirs = load_lora_weights_output(teacher, tmp_path / "lora.safetensors", tmp_path)
    x, t, ctx = inputs()
    with torch.no_grad(), active(adapters, teacher):
        ours = teacher(x, t, ctx)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (ours - teacher(x, t, ctx)).abs().max() > 1e-3  # the LoRA does change the output


def test_kohya_file_on_a_fine_tune_adds_the_same_delta(tmp_path):
    teacher, adapters = setup()
    finetune = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in finetune.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_kohya(adapters, tmp_path / "lora.safetensors", dtype=torch.float32)
    loaded = load_kohya(tmp_path / "lora.safetensors", finetune)
    merged_teacher, merged_finetune = merge(adapters, teacher), merge(loaded, finetune)
    base, delta, layers = teacher.state_dict(), merged_teacher.state_dict(), finetune.state_dict()
    for name, w in merged_finetune.state_dict().items():  # fine-tune + the same ΔW, and nothing else moved
        torch.testing.assert_close(w - layers[name], delta[name] - base[name], rtol=0, atol=1e-6, msg=name)
    theirs = load_lora_weights_output(finetune, tmp_path / "lora.safetensors", tmp_path)
    x, t, ctx = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs, merged_finetune(x, t, ctx), rtol=1e-4, atol=1e-4)


def test_load_kohya_reads_back_ours_and_the_ldm_spelling(tmp_path):
    teacher, adapters = setup()
    save_kohya(adapters, tmp_path / "lora.safetensors", dtype=torch.float32)
    loaded = load_kohya(tmp_path / "lora.safetensors", teacher)
    assert loaded.targets == adapters.targets  # in the UNet's module order, each with the same tensors:
    for key, lora in adapters.items():
        assert torch.equal(loaded[key].down.weight, lora.down.weight) and loaded[key].scale == lora.scale
    ldm = {ours.removesuffix(".weight").replace(".", "_"): name.removesuffix(".weight").replace(".", "_")
           for name, ours in ldm_unet_key_map(TINY).items()}
    renamed = {}
    for k, v in kohya_state_dict(adapters, torch.float32).items():
        module, rest = k.removeprefix("lora_unet_").split(".", 1)
        renamed[f"lora_unet_{ldm[module]}.{rest}"] = v
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in renamed
    save_file(renamed, str(tmp_path / "ldm.safetensors"))
    x, t, ctx = inputs()
    torch.testing.assert_close(merge(load_kohya(tmp_path / "ldm.safetensors", teacher), teacher)(x, t, ctx),
                               merge(adapters, teacher)(x, t, ctx))


def test_bad_lora_files_give_clear_errors(tmp_path):
    teacher, adapters = setup()
    state = kohya_state_dict(adapters)
    save_file(ldm_unet_state_dict(teacher), str(tmp_path / "model.safetensors"))  # a checkpoint, not a LoRA
    with pytest.raises(CheckpointError, match="not a kohya-format UNet LoRA"):
        load_kohya(tmp_path / "model.safetensors", teacher)
    save_file({**state, "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(CheckpointError, match="text-encoder"):
        load_kohya(tmp_path / "te.safetensors", teacher)
    sdxl = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_1_attn1_to_q"  # SDXL has several blocks
    save_file({**state, f"{sdxl}.lora_down.weight": torch.zeros(4, 32), f"{sdxl}.lora_up.weight": torch.zeros(32, 4)},
              str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match="another architecture"):
        load_kohya(tmp_path / "sdxl.safetensors", teacher)
    wider = UNet(UNetConfig(block_channels=(64, 64), layers_per_block=1, attention_levels=(True, False), num_heads=2,
                            cross_attention_dim=32))
    save_kohya(Adapters.for_config(wider, LoRAConfig(rank=4)), tmp_path / "wider.safetensors")
    with pytest.raises(CheckpointError, match="another architecture"):
        load_kohya(tmp_path / "wider.safetensors", teacher)
    del state[next(k for k in state if k.endswith(".lora_up.weight"))]
    save_file(state, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="incomplete"):
        load_kohya(tmp_path / "half.safetensors", teacher)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError):
        load_kohya(tmp_path / "junk.safetensors", teacher)


# ---- export.py --to lora and sample.py --lora ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD1.5-layout model and a LoRA run's step folder holding adapters.safetensors for it."""
    root = tmp_path_factory.mktemp("sd15")
    unet, _, _ = write_tiny_sd15(root)
    step = root / "run" / "step-0000010"
    step.mkdir(parents=True)
    save_adapters(trained(Adapters.for_config(unet, LoRAConfig(rank=4, alpha=4.0)), std=0.2),
                  step / "adapters.safetensors")
    return root, step


def test_export_to_lora_then_sample_with_it(tmp_path, tiny):
    root, step = tiny
    out = tmp_path / "scott-lora.safetensors"
    export.main(["--model", str(root), "--lora", str(step), "--to", "lora", "--out", str(out)])
    teacher = load_unet(root)
    ours = load_adapters(step / "adapters.safetensors", teacher)
    loaded = load_kohya(out, teacher)
    for key, lora in ours.items():  # the fp16 file holds the run's adapters, rounded to fp16
        torch.testing.assert_close(loaded[key].up.weight, lora.up.weight.half().float(), rtol=0, atol=0)
    png = tmp_path / "lora.png"
    sample.main(["--model", str(root), "--lora", str(out), "--prompt", "a cat", "--steps", "2", "--height", "32",
                 "--width", "32", "--out", str(png)])
    image = Image.open(png)
    assert "LoRA student" in image.text["sampler"]
    bundle = load_sd15(root)
    images, _ = sample.generate(bundle, merge(loaded, bundle.unet), NoiseSchedule(bundle.alphas_cumprod), ["a cat"],
                                2, 7.5, 32, 32)
    expected = (images[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    assert image.tobytes() == expected.tobytes()  # sample.py --lora = our merged student, no ω, no CFG
    plain, _ = sample.generate(bundle, bundle.unet, NoiseSchedule(bundle.alphas_cumprod), ["a cat"], 2, 7.5, 32, 32)
    assert (plain - images).abs().max() > 1e-3  # and the LoRA did something


def test_export_and_sample_refuse_bad_lora_inputs(tmp_path, tiny, capsys):
    root, step = tiny
    with pytest.raises(SystemExit):
        export.main(["--model", str(root), "--to", "lora", "--out", str(tmp_path / "a.safetensors")])
    assert "--lora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main(["--model", str(root), "--lora", str(step), "--to", "pipeline", "--out", str(tmp_path / "p")])
    assert "--to lora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main(["--model", str(root), "--lora", str(root / "unet"), "--to", "lora",
                     "--out", str(tmp_path / "b.safetensors")])
    assert "adapters.safetensors" in capsys.readouterr().err  # a folder without adapters
    with pytest.raises(SystemExit):
        sample.main(["--model", str(root), "--lora", str(step / "adapters.safetensors"), "--prompt", "a", "--out",
                     str(tmp_path / "x.png")])
    assert "not a kohya-format" in capsys.readouterr().err
