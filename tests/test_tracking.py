"""--log-to: TensorBoard (read back with tensorboard's own reader) and wandb (offline, no network) get every scalar of
the progress line, the sample grids and the config; a resumed run continues the same run; a missing package or an
unknown tracker is a clear error before anything is loaded."""
import builtins
import json

import pytest

import train
from datasets import write_folder_dataset
from tiny_models import TINY_RUN

SCALARS = ["loss_cd", "loss_g", "adv_weight", "loss_d", "lr", "grad_norm", "images_per_s", "skipped_images",
           "nonfinite_steps"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_folder_dataset(tmp_path_factory.mktemp("data") / "images", n=8, size=40)


def run(tiny_model, data, out, *extra):
    train.main(["--model", str(tiny_model), "--data", str(data), "--out", str(out), "--num-workers", "0",
                "--steps", "10", *TINY_RUN, *extra])


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()
    return events, {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_scalar_the_grids_and_continues_on_resume(tiny_model, data, tmp_path):
    out = tmp_path / "run"
    run(tiny_model, data, out, "--log-to", "tensorboard", "--stop-after", "2", "--sample-every", "2")
    events, steps = scalars(out / "tensorboard")
    assert set(SCALARS) <= set(steps) and all(steps[s] == [1, 2] for s in SCALARS)
    assert [e.step for e in events.Images("samples")] == [2]
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss_cd")] == pytest.approx([r["loss_cd"] for r in logged])
    assert "_hparams_/experiment" in events.Tags()["tensors"] or events.Tags().get("tensors") is not None

    run(tiny_model, data, out, "--log-to", "tensorboard", "--stop-after", "2", "--resume", "auto")
    _, steps = scalars(out / "tensorboard")  # the same folder, one run: steps 1-4
    assert all(steps[s] == [1, 2, 3, 4] for s in SCALARS)


def test_wandb_offline_writes_a_run_and_a_resume_continues_it(tiny_model, data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run(tiny_model, data, out, "--log-to", "wandb", "--stop-after", "2")
    run_id = (out / "wandb_id").read_text()
    first = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(first) == 1 and any(first[0].glob("*.wandb"))
    run(tiny_model, data, out, "--log-to", "wandb", "--stop-after", "2", "--resume", "auto")
    assert (out / "wandb_id").read_text() == run_id
    assert len(sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # the same run id, continued


def test_a_missing_package_or_an_unknown_tracker_is_named_before_loading(tiny_model, data, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_sd15", lambda *a, **k: pytest.fail("loaded a model first"))
    with pytest.raises(SystemExit, match="unknown tracker 'mlflow'"):
        run(tiny_model, data, tmp_path / "a", "--log-to", "mlflow")
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(SystemExit, match="pip install wandb"):
        run(tiny_model, data, tmp_path / "b", "--log-to", "tensorboard,wandb")


def test_sample_prompts_file_sets_the_grids_prompts(tiny_model, data, tmp_path, monkeypatch):
    from PIL import Image
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my fine-tune's probes\na red bicycle\n\n  a cat in a hat  \n")
    out = tmp_path / "run"
    run(tiny_model, data, out, "--sample-prompts", str(prompts), "--sample-every", "1", "--stop-after", "1")
    grid = Image.open(out / "samples-0000001.png")
    assert json.loads(grid.text["prompts"]) == ["a red bicycle", "a cat in a hat"]
    assert grid.size[0] == 2 * 32  # one column per prompt

    monkeypatch.setattr(train, "load_sd15", lambda *a, **k: pytest.fail("loaded a model first"))
    (tmp_path / "empty.txt").write_text("# nothing but a comment\n\n")
    for bad, message in ((tmp_path / "empty.txt", "holds no prompt"), (tmp_path / "missing.txt", "cannot read")):
        with pytest.raises(SystemExit, match=message):
            run(tiny_model, data, tmp_path / "c", "--sample-prompts", str(bad))
