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
