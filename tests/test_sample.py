"""sample.py end to end: the shipped toy model with no flags, an SD1.5-layout model with a student, the teacher
baseline, PNG metadata, and clear errors for a missing or mismatched student; and its wiring: every noise draw of a
run is independent of every other, --teacher --eta runs that η, and a student samples with its own boundary
scalings."""
import pytest
import torch
from PIL import Image

import sample
from consistency import consistency_timesteps, sample_consistency
from sd15 import load_sd15
from sde_solver import NoiseSchedule, sample_teacher, teacher_timesteps
from tiny_models import SAMPLE_SIZE, write_tiny_sd15_with_student
from unet import load_unet, make_student, save_unet

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_sd15_with_student(tmp_path_factory.mktemp("sd15"))


def png(path):
    image = Image.open(path)
    image.load()
    return image


def test_shipped_toy_model_with_no_flags(tmp_path, capsys):
    out = tmp_path / "toy.png"
    sample.main(["--out", str(out)])
    image = png(out)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert image.text["prompt"] == "a red circle on the left" and image.text["steps"] == "2"
    assert image.text["model"].endswith("toy") and "student" in image.text["sampler"]
    printed = capsys.readouterr().out
    assert "toy model" in printed and "--model" in printed  # says what it is and how to point it at SD1.5
    assert "text" in printed and "unet" in printed and "decode" in printed  # per-stage times


def test_sd15_layout_student_grid_and_metadata(tmp_path, tiny):
    out = tmp_path / "grid.png"
    sample.main(["--model", str(tiny), "--student", str(tiny / "student"), "--prompt", "a cat", "--prompt", "a dog",
                 "--n", "2", "--steps", "4", "--seed", "7", *SAMPLE_SIZE, "--out", str(out)])
    image = png(out)
    assert image.size == (2 * 32, 2 * 32)  # 2 prompts × 2 images
    assert image.text["prompt"] == "a cat | a dog" and image.text["seed"] == "7" and image.text["steps"] == "4"
    again = tmp_path / "again.png"
    sample.main(["--model", str(tiny), "--student", str(tiny / "student"), "--prompt", "a cat", "--prompt", "a dog",
                 "--n", "2", "--steps", "4", "--seed", "7", *SAMPLE_SIZE, "--out", str(again)])
    assert png(again).tobytes() == image.tobytes()  # same seed, same images
    # Image i is keyed by seed + i alone: "a dog"'s first image (index 2 at seed 7) is the first image at seed 9.
    dog = tmp_path / "dog.png"
    sample.main(["--model", str(tiny), "--student", str(tiny / "student"), "--prompt", "a dog", "--steps", "4",
                 "--seed", "9", *SAMPLE_SIZE, "--out", str(dog)])
    assert png(dog).tobytes() == image.crop((0, 32, 32, 64)).tobytes()


def by_hand(tmp_path, tiny, eta, seed=3, steps=5, guidance=7.5):
    """What `sample.py --teacher --eta η` must write: sample_teacher(η) from image_noise's draws, decoded, saved."""
    bundle = load_sd15(tiny)
    cond, uncond = bundle.encode_prompts(["a cat"]), bundle.encode_prompts([""])
    noise = sample.image_noise([seed])
    x = noise(torch.empty(1, bundle.unet.config.in_channels, 32 // bundle.vae.spatial_factor,
                          32 // bundle.vae.spatial_factor))
    with torch.no_grad():
        latents = sample_teacher(bundle.unet, x, cond, uncond, guidance, teacher_timesteps(steps),
                                 NoiseSchedule(bundle.alphas_cumprod), noise, eta=eta)
        images = ((bundle.vae.decode(latents, fp32=True).float() + 1) / 2).clamp(0, 1)
    sample.save_grid(images, tmp_path / f"by-hand-{eta}.png", columns=1, metadata={})
    return png(tmp_path / f"by-hand-{eta}.png")


def test_teacher_baseline_runs_the_eta_it_is_given(tmp_path, tiny):
    out = tmp_path / "teacher.png"
    sample.main(["--model", str(tiny), "--teacher", "--steps", "5", "--eta", "1", "--prompt", "a cat", "--seed", "3",
                 "--guidance", "7.5", *SAMPLE_SIZE, "--out", str(out)])
    assert "DDPM" in png(out).text["sampler"]
    assert png(out).tobytes() == by_hand(tmp_path, tiny, eta=1.0).tobytes()
    assert png(out).tobytes() != by_hand(tmp_path, tiny, eta=0.0).tobytes()  # a DDIM run would be caught


@pytest.mark.parametrize("flags,n_steps", [(["--steps", "4"], 4), (["--teacher", "--eta", "1", "--steps", "5"], 5)])
def test_every_noise_draw_is_independent(tmp_path, tiny, monkeypatch, flags, n_steps):
    """Record every Gaussian draw of a run (3 images): each image's start noise and every later draw (the student's
    re-noising, DDPM's fresh noise) must be uncorrelated with every other draw of any image, its own included.
    (Seeding the sampler's stream with the seed of image 0's start noise makes them equal: correlation 1.)"""
    draws = []
    randn = torch.randn

    def recording(*args, **kwargs):
        out = randn(*args, **kwargs)
        draws.extend(out.unbind(0) if out.ndim == 4 else [out])  # per image: (C, h, w)
        return out
    monkeypatch.setattr(torch, "randn", recording)
    sample.main(["--model", str(tiny), "--student", str(tiny / "student"), "--prompt", "a cat", "--n", "3", *flags,
                 *SAMPLE_SIZE, "--out", str(tmp_path / "x.png")])
    draws_per_image = n_steps if "--teacher" not in flags else 1 + n_steps  # x_999, then each re-noise / step
    assert len(draws) == 3 * draws_per_image
    corr = torch.corrcoef(torch.stack([d.flatten().double() for d in draws]))
    off_diagonal = corr[~torch.eye(len(draws), dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.25, f"correlated noise draws: max |corr| {off_diagonal.abs().max():.3f}"


def test_student_samples_with_the_boundary_scalings_it_records(tmp_path, tiny):
    """Two copies of one student that differ only in their recorded timestep_scaling sample differently, and each
    sample is sample_consistency with that student's value. (1e-3 rather than, say, 3: at LCM's sampling timesteps
    ≥ 259 any s ≥ 1 makes c_skip < 1e-5, invisible in a PNG; s = 1e-3 puts s·t near 1, where the scalings matter.)"""
    student = load_unet(tiny / "student")
    save_unet(make_student(load_unet(tiny / "unet"), 16, timestep_scaling=1e-3), tmp_path / "scaled")
    scaled = load_unet(tmp_path / "scaled")
    assert scaled.config.timestep_scaling == 1e-3 and student.config.timestep_scaling == 10.0
    bundle = load_sd15(tiny)
    schedule = NoiseSchedule(bundle.alphas_cumprod)
    outputs = {}
    for name, unet in (("default", student), ("scaled", scaled)):
        with torch.no_grad():
            images, _ = sample.generate(bundle, unet, schedule, ["a cat"], 2, 7.5, 32, 32, seed=5)
            noise = sample.image_noise([5])
            x = noise(torch.empty(1, 4, 32 // bundle.vae.spatial_factor, 32 // bundle.vae.spatial_factor))
            latents = sample_consistency(unet, x, bundle.encode_prompts(["a cat"]), 7.5, consistency_timesteps(2),
                                         schedule, noise, timestep_scaling=unet.config.timestep_scaling,
                                         sigma_data=unet.config.sigma_data)
        torch.testing.assert_close(images, ((bundle.vae.decode(latents, fp32=True) + 1) / 2).clamp(0, 1))
        sample.main(["--model", str(tiny), "--student", str(tmp_path / name if name == "scaled" else tiny / "student"),
                     "--prompt", "a cat", "--steps", "2", "--seed", "5", "--guidance", "7.5", *SAMPLE_SIZE,
                     "--out", str(tmp_path / f"{name}.png")])
        outputs[name] = png(tmp_path / f"{name}.png").tobytes()
    assert outputs["default"] != outputs["scaled"]


def test_clear_errors(tmp_path, tiny, capsys):
    with pytest.raises(SystemExit):  # one line on stderr, before anything is loaded (was a CheckpointError traceback)
        sample.main(["--model", str(tiny), "--student", str(tmp_path / "nope"), "--prompt", "x"])
    assert "nope: no such file or folder" in capsys.readouterr().err
    save_unet(load_unet(tiny / "unet"), tmp_path / "plain")
    with pytest.raises(SystemExit):  # a UNet without an ω input is not a distilled student
        sample.main(["--model", str(tiny), "--student", str(tmp_path / "plain"), "--prompt", "x"])
    with pytest.raises(SystemExit):
        sample.main(["--model", str(tiny), "--student", str(tiny / "student"), "--steps", "12", "--prompt", "x"])


# ---- the fast path: a sync-free loop, compiled UNet and decode, fused q/k/v, bf16 decode ---------------------------

def start_and_plan(bundle, unet, steps, seed=5):
    """Start latents, conditions and ω as generate makes them, and the loop's plan."""
    noise = sample.image_noise([seed, seed + 1])
    x = noise(torch.empty(2, 4, 32 // bundle.vae.spatial_factor, 32 // bundle.vae.spatial_factor))
    cond, w = bundle.encode_prompts(["a cat", "a dog"]), torch.full((2,), 7.5)
    plan = sample.consistency_plan(consistency_timesteps(steps), NoiseSchedule(bundle.alphas_cumprod), x, noise,
                                   unet.config.timestep_scaling, unet.config.sigma_data)
    return x, cond, w, plan, noise


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sync_free_loop_equals_sample_consistency(tiny, steps):
    """consistency_loop with its precomputed plan gives bit for bit what sample_consistency gives (same draws)."""
    bundle, unet = load_sd15(tiny), load_unet(tiny / "student")
    x, cond, w, plan, _ = start_and_plan(bundle, unet, steps)
    noise = sample.image_noise([5, 6])  # the same seeds again, drawn as the old loop draws them
    noise(torch.empty_like(x))  # x_999
    with torch.no_grad():
        fast = sample.consistency_loop(unet, x, cond, w, plan)
        reference = sample_consistency(unet, x, cond, w, consistency_timesteps(steps),
                                       NoiseSchedule(bundle.alphas_cumprod), noise,
                                       timestep_scaling=unet.config.timestep_scaling, sigma_data=unet.config.sigma_data)
    assert torch.equal(fast, reference)


def test_sampling_loop_has_no_host_syncs(tiny):
    """The whole 2-step loop, UNet included, traces as ONE graph under torch.compile(fullgraph=True): an .item(), a
    .tolist(), a print or a Python branch on a tensor's value anywhere in it is a graph break, which fullgraph turns
    into an error. (backend "eager": Dynamo's tracing only, no code generation, so this takes seconds.)"""
    bundle, unet = load_sd15(tiny), load_unet(tiny / "student", fuse_qkv=True)
    x, cond, w, plan, _ = start_and_plan(bundle, unet, 2)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    with torch.no_grad():
        traced = torch.compile(sample.consistency_loop, backend=counting, fullgraph=True)(unet, x, cond, w, plan)
        eager = sample.consistency_loop(unet, x, cond, w, plan)
    assert len(graphs) == 1 and torch.equal(traced, eager)
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_method" and n.target in ("item", "tolist", "cpu")]
    assert not calls, calls


def test_the_eager_loop_reads_no_tensor_value_on_the_host(tiny, monkeypatch):
    """Eagerly too (a dead `float(t)` that Dynamo drops from its graph still waits for the GPU when uncompiled): every
    way a tensor's value reaches Python raises while the loop runs."""
    bundle, unet = load_sd15(tiny), load_unet(tiny / "student")
    x, cond, w, plan, _ = start_and_plan(bundle, unet, 2)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor's value was read on the host")
    for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    with torch.no_grad():
        sample.consistency_loop(unet, x, cond, w, plan)


def test_compile_fuse_qkv_and_bf16_decode_from_the_command_line(tmp_path, tiny, monkeypatch, capsys):
    """sample.py --compile --fuse-qkv --decode-dtype bf16 compiles the UNet and the decode with fullgraph=True (here
    with Dynamo's eager backend, so that a graph break fails fast) and writes nearly the default run's image."""
    compiled = []
    real_compile = torch.compile

    def compile_eagerly(fn, **kwargs):
        assert kwargs["fullgraph"] is True
        compiled.append(fn)
        return real_compile(fn, **{**kwargs, "backend": "eager", "mode": None})
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    common = ["--model", str(tiny), "--student", str(tiny / "student"), "--prompt", "a cat", *SAMPLE_SIZE]
    torch._dynamo.reset()
    sample.main([*common, "--compile", "--fuse-qkv", "--decode-dtype", "bf16", "--out", str(tmp_path / "fast.png")])
    assert len(compiled) == 2  # the UNet and the decode
    sample.main([*common, "--out", str(tmp_path / "plain.png")])
    fast, plain = (torch.tensor(list(png(tmp_path / f"{n}.png").getdata())).float() for n in ("fast", "plain"))
    assert 0 < (fast - plain).abs().max() <= 16  # bf16 decode: a few grey levels, not another image
    assert "--compile" in (h := help_text(capsys)) and "--fuse-qkv" in h and "--decode-dtype" in h


def help_text(capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    return capsys.readouterr().out
