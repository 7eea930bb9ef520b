"""Settings are declared once (config.setting) and everything else follows: a new field is a working, checked,
documented flag with no other edit; presets in configs/ parse; a preset's bad key or value names the file, the key
and its line; precedence is declared default < the model's scott.toml < --config < the command line."""
import dataclasses
from pathlib import Path

import pytest

import config
import train
from sd15 import TOY_FOLDER

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted((ROOT / "configs").glob("*.toml"))


def parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exited:
        train.parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def probe_field(monkeypatch):
    """TrainConfig with one more field, declared the only way a contributor would: a field with setting()."""
    probed = dataclasses.make_dataclass(
        "TrainConfig", [("zzz_probe", int, config.setting(3, "a probe of the flag machinery", at_least=2))],
        bases=(train.TrainConfig,))
    monkeypatch.setitem(train.CONFIGS, "train", probed)


def test_a_new_field_is_a_working_checked_documented_flag(probe_field, capsys, tmp_path):
    assert train.parse_args([])[0].zzz_probe == 3                       # its default
    assert train.parse_args(["--zzz-probe", "7"])[0].zzz_probe == 7    # the flag
    assert "--zzz-probe 1: must be an integer ≥ 2 (a probe of the flag machinery)" in parse_error(
        capsys, ["--zzz-probe", "1"])                                   # its bound
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "a probe of the flag machinery (default 3)" in " ".join(capsys.readouterr().out.split())
    preset = tmp_path / "p.toml"
    preset.write_text("zzz-probe = 9\n")
    assert train.parse_args(["--config", str(preset)])[0].zzz_probe == 9  # and a preset key


def test_every_flag_has_a_meaning_in_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width: one line per flag
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    lines = []  # one entry per flag: its invocation and help, joined
    for line in capsys.readouterr().out.split("options:")[1].splitlines():
        if line.strip().startswith("--"):
            lines.append(line.strip())
        elif line.startswith("   ") and lines:
            lines[-1] += " " + line.strip()
    for name, field in config.declared(train.CONFIGS.values()).items():
        line = next(line for line in lines if line.split()[0] in (config.flag_of(name),
                                                                  config.flag_of(name) + ","))
        assert field.metadata["help"].replace("%%", "%") in line, name
    for flag in ("--model", "--data", "--resume", "--k", "--substeps", "--eta", "--timestep-sampling"):
        line = next(line for line in lines if line.startswith(flag + " "))
        assert len(line.split("(default")[0].split()) > 3, f"{flag} shows no meaning: {line!r}"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_shipped_preset_parses(preset):
    values = config.read_preset(preset, config.declared(train.CONFIGS.values()))
    cfg, consistency, disc, data = train.parse_args(["--config", str(preset)])
    for name, value in values.items():
        owner = next(c for c in (cfg, consistency, disc, data) if hasattr(c, name))
        assert getattr(owner, name) == value, name


def test_the_presets_the_readme_promises_exist():
    names = {p.name for p in PRESETS}
    assert {"toy.toml", "sd15-paper.toml", "sd15-1gpu.toml", "sd15-lora.toml", "sd15-2nodes.toml"} <= names
    paper = train.parse_args(["--config", str(ROOT / "configs/sd15-paper.toml")])
    assert (paper[0].global_batch, paper[0].micro_batch, paper[1].substeps, paper[0].adv_weight) == (40, 10, 3, 0.4)


def test_the_toy_models_own_settings_parse_and_apply():
    cfg, consistency, _, data = train.parse_args([])  # no --model: the shipped toy model, its scott.toml
    own = config.model_settings(TOY_FOLDER, "train", config.declared(train.CONFIGS.values()))
    assert own and cfg.steps == own["steps"] and data.resolution == own["resolution"]
    assert data.path == own["data"] and consistency.w_min == own["w_min"]


def test_precedence(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text("steps = 50\nlr = 3e-4\n")
    cfg = train.parse_args(["--config", str(preset), "--lr", "2e-4"])[0]
    assert (cfg.steps, cfg.lr, cfg.global_batch) == (50, 2e-4, 16)  # preset > toy's scott.toml; flag > preset


def test_lora_student_defaults_fill_only_what_nothing_set(tmp_path, tiny_model_folder):
    sd15_like = ["--model", str(tiny_model_folder)]
    assert train.parse_args(sd15_like)[1].w_min == 6.0
    assert train.parse_args(sd15_like + ["--student-lora-rank", "4"])[1].w_min == 3.0
    assert train.parse_args(sd15_like + ["--student-lora-rank", "4", "--w-min", "5"])[1].w_min == 5.0
    assert train.parse_args(["--student-lora-rank", "4"])[1].w_min == 2.0  # the toy model's own setting wins


@pytest.mark.parametrize("text, message", [
    ("steps = 10\nmicro-bach = 4\n", "line 2: micro-bach: no such setting"),
    ("steps = 0\n", "line 1: steps: --steps 0: must be an integer ≥ 1"),
    ("lr = \"fast\"\n", "line 1: lr: --lr 'fast': must be a float"),
    ("adv_weighting = \"sometimes\"\n", "must be one of fixed, adaptive"),
    ("steps = [1\n", "not valid TOML"),
])
def test_a_bad_preset_names_the_file_the_key_and_the_line(capsys, tmp_path, text, message):
    preset = tmp_path / "bad.toml"
    preset.write_text(text)
    err = parse_error(capsys, ["--config", str(preset)])
    assert str(preset) in err and message in err


@pytest.fixture
def tiny_model_folder(tmp_path):
    """An SD1.5-layout folder without a scott.toml (only its presence matters to parse_args)."""
    folder = tmp_path / "sd15"
    (folder / "unet").mkdir(parents=True)
    return folder
