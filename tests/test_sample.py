"""sample.py end to end: the shipped toy model with no flags, an SD1.5-layout model with a student, the teacher
baseline, PNG metadata, and clear errors for a missing or mismatched student."""
from pathlib import Path

import pytest
from PIL import Image

import sample
from checkpoint import CheckpointError
from tiny_models import write_tiny_sd15
from unet import load_unet, make_student, save_unet

TOY = Path(sample.__file__).resolve().parent / "toy"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd15")
    unet, _, _ = write_tiny_sd15(root)
    save_unet(make_student(unet), root / "student")
    return root


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
                 "--n", "2", "--steps", "4", "--seed", "7", "--height", "32", "--width", "32", "--out", str(out)])
    image = png(out)
    assert image.size == (2 * 32, 2 * 32)  # 2 prompts × 2 images
    assert image.text["prompt"] == "a cat | a dog" and image.text["seed"] == "7" and image.text["steps"] == "4"
    again = tmp_path / "again.png"
    sample.main(["--model", str(tiny), "--student", str(tiny / "student"), "--prompt", "a cat", "--prompt", "a dog",
                 "--n", "2", "--steps", "4", "--seed", "7", "--height", "32", "--width", "32", "--out", str(again)])
    assert png(again).tobytes() == image.tobytes()  # same seed, same images


def test_teacher_baseline(tmp_path, tiny):
    out = tmp_path / "teacher.png"
    sample.main(["--model", str(tiny), "--teacher", "--steps", "5", "--eta", "1", "--prompt", "a cat",
                 "--height", "32", "--width", "32", "--out", str(out)])
    assert "DDPM" in png(out).text["sampler"]


def test_clear_errors(tmp_path, tiny):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        sample.main(["--model", str(tiny), "--student", str(tmp_path / "nope"), "--prompt", "x"])
    save_unet(load_unet(tiny / "unet"), tmp_path / "plain")
    with pytest.raises(SystemExit):  # a UNet without an ω input is not a distilled student
        sample.main(["--model", str(tiny), "--student", str(tmp_path / "plain"), "--prompt", "x"])
    with pytest.raises(SystemExit):
        sample.main(["--model", str(tiny), "--student", str(tiny / "student"), "--steps", "12", "--prompt", "x"])
