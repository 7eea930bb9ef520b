"""Bad input gets a clear error that names the flag or file, says what is wrong and what to do, before any heavy
work: train.py's numeric flags and model_index.json, sample.py's flags, --out, student and output, and the values of
a diffusers UNet config.json, a CLIP config.json and a scheduler config."""
import dataclasses
import json
import shutil

import pytest
import torch

import config
import sample
import train
from checkpoint import CheckpointError
from sd15 import TOY_FOLDER, load_sd15
from tiny_models import SAMPLE_SIZE, write_tiny_sd15_with_student
from unet import load_unet, save_unet

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_sd15_with_student(tmp_path_factory.mktemp("sd15"))


def parse_error(capsys, parse, argv) -> str:
    """argparse's message for argv (which must exit 2)."""
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


# ---- train.py ----------------------------------------------------------------------------------------------------

def declared_fields():
    return config.declared(train.CONFIGS.values())


def test_every_setting_is_declared_with_a_meaning():
    """Every field of the four configs (but DataConfig.path, which is --data) is a declared setting with a help
    line, and every integer setting has a lower bound."""
    fields = declared_fields()
    every = {f.name for cls in train.CONFIGS.values() for f in dataclasses.fields(cls)}
    assert every - set(fields) == {"path"}
    for name, f in fields.items():
        assert f.metadata["help"].strip(), name
        if type(f.default) is int:
            assert f.metadata["at_least"] is not None, f"{name}: an integer setting needs a lower bound"


@pytest.mark.parametrize("name", sorted(n for n, f in config.declared(train.CONFIGS.values()).items()
                                        if type(f.default) is int))
def test_train_refuses_an_integer_flag_below_its_minimum(capsys, name):
    f = declared_fields()[name]
    minimum, flag = f.metadata["at_least"], config.flag_of(name)
    err = parse_error(capsys, train.parse_args, [flag, str(minimum - 1)])
    assert f"{flag} {minimum - 1}: must be an integer ≥ {minimum} ({f.metadata['help']})" in err


@pytest.mark.parametrize("argv, message", [
    (["--ckpt-every", "0"], "--ckpt-every 0: must be an integer ≥ 1"),  # was a ZeroDivisionError after loading
    (["--global-batch", "0"], "--global-batch 0: must be an integer ≥ 1"),  # was "training" on zero samples
    (["--keep-checkpoints", "0"], "--keep-checkpoints 0: must be an integer ≥ 1"),  # silently kept all
    (["--keep-checkpoints", "-1"], "--keep-checkpoints -1: must be an integer ≥ 1"),  # deleted every checkpoint
    (["--k", "1000"], "--k 1000: must be an integer ≤ 999"),
    (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--adv-weight", "-0.5"], "--adv-weight -0.5: must be ≥ 0"),
    (["--eta", "inf"], "--eta inf: must be a finite number"),
    (["--eta", "1.5"], "--eta 1.5: must be ≤ 1.0"),
    (["--ema-decay", "1"], "--ema-decay 1.0: must be < 1.0"),
    (["--w-min", "9", "--w-max", "3"], "need --w-min ≤ --w-max"),
    (["--k", "25"], "--k 25 does not split into --substeps 3"),
])
def test_train_refuses_bad_numbers_at_parse_time(capsys, argv, message):
    assert message in parse_error(capsys, train.parse_args, argv)


def test_train_checks_the_model_before_the_data(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(SystemExit, match="not a diffusers model folder"):
        train.main(["--model", str(model), "--data", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# ---- sample.py ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "--n 0: must be an integer ≥ 1"),  # was an IndexError
    (["--steps", "0"], "--steps 0: must be an integer ≥ 1"),  # was silently the default
    (["--height", "0"], "--height 0: must be an integer ≥ 1"),  # likewise
    (["--width", "-8"], "--width -8: must be an integer ≥ 1"),
    (["--guidance", "nan"], "--guidance nan: must be a finite number ≥ 0"),  # was an all-black PNG, exit 0
    (["--eta", "-1"], "--eta -1.0: must be a finite number ≥ 0"),
    (["--out", "grid.jpg"], "--out grid.jpg: must name a .png file"),
])
def test_sample_refuses_bad_flags_before_loading(capsys, monkeypatch, argv, message):
    monkeypatch.setattr(sample, "load_sd15", lambda *a, **k: pytest.fail("loaded a model before checking flags"))
    assert message in parse_error(capsys, sample.main, argv)


def test_sample_checks_out_before_sampling(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "load_sd15", lambda *a, **k: pytest.fail("loaded a model before checking --out"))
    (tmp_path / "folder.png").mkdir()
    assert "is a folder" in parse_error(capsys, sample.main, ["--out", str(tmp_path / "folder.png")])
    (tmp_path / "file").write_text("x")
    assert "cannot write under" in parse_error(capsys, sample.main, ["--out", str(tmp_path / "file" / "a.png")])


def test_sample_refuses_a_student_of_another_model(tiny, tmp_path, capsys):
    err = parse_error(capsys, sample.main, ["--model", str(tiny), "--student", str(TOY_FOLDER / "student"),
                                            "--prompt", "a cat", *SAMPLE_SIZE, "--out", str(tmp_path / "x.png")])
    assert "distilled from another model" in err and "3 latent channels and text width 64" in err
    assert not (tmp_path / "x.png").exists()


def test_sample_refuses_to_write_non_finite_images(tiny, tmp_path):
    student = load_unet(tiny / "student")
    with torch.no_grad():
        next(student.parameters()).fill_(float("nan"))
    save_unet(student, tmp_path / "nan-student")
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit, match="non-finite pixels.*was not written"):
        sample.main(["--model", str(tiny), "--student", str(tmp_path / "nan-student"), "--prompt", "a cat", *SAMPLE_SIZE,
                     "--out", str(out)])
    assert not out.exists()


def test_sample_says_once_that_long_prompts_are_truncated(tiny, tmp_path, capsys):
    sample.main(["--model", str(tiny), "--student", str(tiny / "student"), "--prompt", "a cat " * 30,
                 "--prompt", "a dog " * 30, "--prompt", "a fox", *SAMPLE_SIZE, "--out", str(tmp_path / "x.png")])
    printed = capsys.readouterr().out
    assert printed.count("longer than the 77 tokens") == 1 and "2 prompt(s) (first: #1)" in printed


# ---- config.json values ------------------------------------------------------------------------------------------

def edit_config(model, part: str, **changes):
    """Copy the tiny model and change its part/config.json (a value of None deletes the key)."""
    path = model / part
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("part, changes, message", [
    ("unet/config.json", {"in_channels": "4"}, "in_channels = '4' is invalid; it must be a positive integer"),
    ("unet/config.json", {"block_out_channels": [32, "64"]}, "block_out_channels = \\[32, '64'\\] is invalid"),
    ("unet/config.json", {"layers_per_block": 0}, "layers_per_block = 0 is invalid"),
    ("unet/config.json", {"norm_num_groups": 0}, "norm_num_groups = 0 is invalid"),
    ("unet/config.json", {"attention_head_dim": 2.5}, "attention_head_dim = 2.5 is invalid"),
    ("unet/config.json", {"sample_size": "8"}, "sample_size = '8' is invalid"),
    ("text_encoder/config.json", {"num_attention_heads": 0}, "num_attention_heads = 0 is invalid"),
    ("text_encoder/config.json", {"hidden_size": "32"}, "hidden_size = '32' is invalid"),
    ("text_encoder/config.json", {"num_attention_heads": 5}, "hidden_size = 32 is invalid; it must be a multiple"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 0}, "num_train_timesteps = 0 is invalid"),
    ("scheduler/scheduler_config.json", {"beta_start": "0.00085"}, "beta_start = '0.00085' is invalid"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "cosine"}, "beta_schedule = 'cosine' is invalid"),
])
def test_wrong_values_in_a_config_json_name_the_file(tiny, tmp_path, part, changes, message):
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    (model / "scheduler").mkdir(exist_ok=True)
    if not (model / "scheduler" / "scheduler_config.json").exists():
        (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "scaled_linear"}))
    edit_config(model, part, **changes)
    with pytest.raises(CheckpointError, match=f"{part}: {message}"):
        load_sd15(model)
