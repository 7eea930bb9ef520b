"""Toy metrics: the Fréchet distance is the textbook formula, coverage and density are Naeem et al.'s definitions, and
the shipped classifier (toy/classifier.safetensors, regenerate with `python evaluate.py train-classifier`) tells real
synthetic images from noise, from images made for another prompt and from mode-collapsed sets."""
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import evaluate
from sd15 import TOY_FOLDER
from metrics import fid
from toyworld import toy
from toyworld import study
@pytest.fixture(scope="module")
def classifier():
    assert evaluate.CLASSIFIER_PATH.is_file(), "toy/classifier.safetensors is missing: run `python evaluate.py " \
                                               "train-classifier`"
    return evaluate.load_classifier()


@pytest.fixture(scope="module")
def prompts():
    return toy.all_prompts()  # 480: every prompt once, evaluate.py's default


# ---- the feature metrics (metrics/fid.py's, tested against their definitions and oracles in tests/test_fid.py) ----------

def test_features_frechet_is_fids_and_needs_two_samples():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 6, generator=g), torch.randn(40, 6, generator=g) + 0.5
    assert evaluate.features_frechet(a, b) == fid.frechet_distance(fid.feature_stats(a), fid.feature_stats(b))
    assert evaluate.features_frechet(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="N >= 2"):
        evaluate.features_frechet(torch.zeros(1, 3), torch.zeros(5, 3))


def test_coverage_falls_when_modes_are_dropped_and_density_rises_when_samples_crowd():
    g = torch.Generator().manual_seed(1)
    modes = torch.randn(8, 16, generator=g) * 10                                   # 8 well-separated modes
    draw = lambda idx: modes[idx] + torch.randn(len(idx), 16, generator=g)         # noqa: E731
    real = draw(torch.arange(800) % 8)
    same = fid.density_coverage(real, draw(torch.arange(800) % 8))
    collapsed = fid.density_coverage(real, draw(torch.arange(800) % 2))           # only 2 of the 8 modes
    assert same["coverage"] > 0.9 and 0.8 < same["density"] < 1.2
    assert collapsed["coverage"] < 0.3 and collapsed["density"] > same["density"]  # crowding 2 modes: denser


# ---- the metrics on real, noise, wrong-prompt and collapsed images ----------------------------------------------------------

def test_real_images_score_high_and_noise_scores_low(classifier, prompts):
    real = evaluate.reference_images(prompts, len(prompts), seed=7)  # other draws than evaluate's reference seed
    real_scores = evaluate.evaluate_samples(real, prompts, classifier=classifier)
    assert min(real_scores[f"acc_{a}"] for a in (*toy.ATTRIBUTES, "all")) >= 0.97

    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noise_scores = evaluate.evaluate_samples(noise, prompts, classifier=classifier)
    assert noise_scores["acc_all"] < 0.15  # most prompts name 2 or more attributes: chance is low
    for attribute, values in zip(toy.ATTRIBUTES, toy.VALUES):
        assert noise_scores[f"acc_{attribute}"] < 1.5 / len(values)  # about chance, far from real images
    assert noise_scores["fd"] > 20 * real_scores["fd"]


def test_images_of_another_prompt_score_low_accuracy(classifier, prompts):
    """Images made for prompt A, scored against a prompt B that differs in every attribute A names."""
    generator = torch.Generator().manual_seed(8)
    labels = toy.prompts_to_labels(prompts)
    images = toy.render(toy.fill_open(labels, generator), generator)
    shifted = (labels + 1) % torch.tensor([len(v) for v in toy.VALUES])
    other = toy.labels_to_prompts(torch.where(labels == toy.OPEN, labels, shifted))
    right = evaluate.prompt_accuracy(images, prompts, classifier)
    wrong = evaluate.prompt_accuracy(images, other, classifier)
    assert right["acc_all"] >= 0.97
    assert max(wrong.values()) < 0.05  # "a shape", which names nothing, is 1 of the 480


def test_fd_and_coverage_see_lost_diversity_and_blur(classifier):
    """On the open captions where evaluate.py measures coverage ("a shape", "a red shape", ...: OPEN_SAMPLES each),
    FD and coverage, unlike accuracy, notice a model that fills the attributes a caption leaves open always the same
    way (fully: a red plain circle on the left for "a shape"; or with 2 values each) or that draws blurry pictures
    (which here also wipes out the patterns); density stays ≈ 1 for real images."""
    prompts = [p for p in evaluate.OPEN_PROMPTS for _ in range(evaluate.OPEN_SAMPLES)]
    generator = torch.Generator().manual_seed(7)
    labels = toy.prompts_to_labels(prompts)
    real = toy.render(toy.fill_open(labels, generator), generator)
    halved = torch.where(labels == toy.OPEN, toy.fill_open(labels, generator) % 2, labels)
    sets = {"real": real, "collapsed": toy.render(labels.clamp(min=0), generator),  # OPEN -> the first value
            "halved": toy.render(halved, generator), "blurred": F.avg_pool2d(real, 3, stride=1, padding=1),
            "noise": torch.randn(real.shape, generator=generator).clamp(-1, 1)}
    scores = {name: evaluate.evaluate_samples(images, prompts, classifier=classifier) for name, images in sets.items()}
    print({name: (round(s["fd"], 1), round(s["coverage"], 3), round(s["density"], 3)) for name, s in scores.items()})
    assert scores["real"]["coverage"] > 0.9 and 0.8 < scores["real"]["density"] < 1.2
    for name in ("collapsed", "halved"):  # every named attribute is right: only diversity is lost
        assert scores[name]["acc_all"] >= 0.97
    assert scores["collapsed"]["coverage"] < scores["halved"]["coverage"] < scores["real"]["coverage"] - 0.2
    for worse in ("collapsed", "halved", "blurred", "noise"):
        assert scores[worse]["fd"] > 5 * scores["real"]["fd"], scores
        assert scores[worse]["coverage"] < scores["real"]["coverage"] - 0.2, scores


def test_bad_inputs_are_rejected_clearly(classifier, tmp_path):
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        evaluate.prompt_accuracy(torch.zeros(3, 3, 32, 32), ["a red circle on the left"] * 2, classifier)
    with pytest.raises(ValueError, match=r"takes images \(B, 3, 32, 32\)"):
        classifier.features(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="not a toy-world caption"):
        evaluate.prompt_accuracy(torch.zeros(1, 3, 32, 32), ["a photo of a cat"], classifier)
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        evaluate.load_classifier(tmp_path / "missing.safetensors")


def test_train_save_load_round_trip(tmp_path):
    """A few steps of the real training loop on a tiny classifier; the saved file carries its config."""
    cfg = evaluate.ClassifierConfig(width=8, features=16, steps=3, batch_size=8)
    model = evaluate.train_classifier(cfg, log_every=10)
    evaluate.save_classifier(model, tmp_path / "c.safetensors")
    loaded = evaluate.load_classifier(tmp_path / "c.safetensors")
    assert loaded.config == cfg
    images = toy.make_toy_batch(4, torch.Generator().manual_seed(0))["image"]
    # Stored in float16: the same classifier up to rounding of its weights.
    assert torch.allclose(loaded.features(images), model.features(images), rtol=1e-2, atol=1e-2)
    assert not torch.equal(loaded.features(images), evaluate.ToyClassifier(cfg).features(images))


def test_command_line_scores_the_shipped_models(tmp_path, capsys):
    """The commands the README tables come from, at their smallest: the data row, a 1-step teacher row and a 1-step
    student row, printed and written as JSON; study.py reads that JSON back into its table."""
    student = ["--student", str(TOY_FOLDER / "student"), "--steps", "1"]  # absolute: tests run in tmp folders
    for who, flags in {"teacher": ["--teacher-steps", "1"], "student": student}.items():
        evaluate.main([*flags, "--json", str(tmp_path / f"{who}.json")])
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "student.json").read_text())
    assert [row["steps"] for row in rows] == [None, 1]  # study reads the step count, not the row's label
    assert "| data (fresh synthetic)" in out and "| teacher ddim 1 steps" in out and "| student 1 step(s)" in out
    teacher, data = study.score(tmp_path / "teacher.json", ["--never-run"], threads=1)  # reads the JSON
    student, _ = study.score(tmp_path / "student.json", ["--never-run"], threads=1)
    assert data["acc_all"] >= 0.99 and set(teacher) == {1} and set(student) == {1}
    for scores in (teacher[1], student[1]):
        assert set(scores) == {*(f"acc_{a}" for a in (*toy.ATTRIBUTES, "all")), "fd", "coverage", "density"}
        assert 0 <= scores["acc_all"] <= 1 and scores["fd"] > data["fd"]
    row = study.table_row("x", [{n: student[1] for n in study.STUDENT_STEPS}] * 2)
    assert row.startswith("| x | 2 | ") and row.count(" ± 0.0") == 9


def test_study_points_curves_for_every_seed_rows_and_the_two_comparisons_for_the_rest():
    """A row run with every seed is scored along its budget (its trade-off curve) and at both comparison points;
    a single-seed row only at BUDGET_STEPS (equal optimiser steps) and at its end (equal teacher budget)."""
    b = study.BUDGET_STEPS
    for h in (1, 3):
        curve = study.Row("x", "", substeps=h, every_seed=True).points
        single = study.Row("x", "", substeps=h, every_seed=False).points
        assert curve == sorted({3 * b // h * (i + 1) // study.POINTS for i in range(study.POINTS)} | {b})
        assert single == sorted({b, 3 * b // h}) and set(single) <= set(curve)


def test_study_rows_option_runs_only_the_named_rows_first_seed_first(tmp_path, monkeypatch):
    """`study.py --rows A B --seeds 0 1` trains exactly A's and B's runs, seed 0 of both before seed 1 (a
    single-seed row only with the first seed), and nothing else."""
    scores = {"acc_all": 1.0, "fd": 1.0, "coverage": 1.0}
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "scores.json").write_text(json.dumps([{"scores": scores}, {"steps": 1, "scores": scores}]))
    started = []
    monkeypatch.setattr(study, "train_and_score", lambda row, folder, seed, threads: started.append(
        (row.name, seed, folder.relative_to(tmp_path).as_posix())) or {})
    main_row, single_row = study.ROWS[3], study.ROWS[-1]
    assert main_row.every_seed and not single_row.every_seed
    study.main(["--out", str(tmp_path), "--seeds", "0", "1", "--jobs", "1",
                    "--rows", single_row.name, main_row.name])
    assert started == [(main_row.name, 0, f"{study.slug(main_row.flags)}/seed-0"),
                       (single_row.name, 0, f"{study.slug(single_row.flags)}/seed-0"),
                       (main_row.name, 1, f"{study.slug(main_row.flags)}/seed-1")]


@pytest.mark.slow
def test_the_study_trains_in_stages_and_scores_each_point(tmp_path, monkeypatch):
    """study.py's run of one row, shrunk (a budget of 2 steps at h = 3, so 6 at h = 1, scored at 2 steps, the
    equal-optimiser-steps point, and at 6): train.py stops at each point with a checkpoint, evaluate.py scores it,
    the next stage resumes; a second call finds everything done and runs nothing; with only the scores kept (as in
    git) the unscored point is retrained from the start to the same scores; the report has the row in both tables,
    with the teacher-evaluation count of the budget."""
    monkeypatch.setattr(study, "BUDGET_STEPS", 2)
    monkeypatch.setattr(study, "POINTS", 1)
    monkeypatch.setattr(study, "STUDENT_STEPS", (1,))  # one sampling step keeps the scoring quick
    row = study.Row("CD", "--eta 0 --substeps 1 --adv-weight 0 --log-every 1", substeps=1, every_seed=True)
    assert (row.steps, row.points) == (6, [2, 6])
    curve = study.train_and_score(row, tmp_path / "run", seed=0, threads=1)
    assert set(curve) == {2, 6} and all(set(c) == {1} for c in curve.values())
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "step" in r and "loss_cd" in r] == [1, 2, 3, 4, 5, 6]
    run = study.run
    monkeypatch.setattr(study, "run", lambda *a: pytest.fail("a finished run was started again"))
    assert study.train_and_score(row, tmp_path / "run", seed=0, threads=1) == curve
    # What git keeps of a run (scores, not checkpoints or logs): the missing point is retrained from step 0, exactly.
    for path in [*(tmp_path / "run").glob("step-*"), tmp_path / "run" / "latest", tmp_path / "run" / "log.jsonl",
                 tmp_path / "run" / "scores-0000006.json"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    monkeypatch.setattr(study, "run", run)
    assert study.train_and_score(row, tmp_path / "run", seed=0, threads=1) == curve
    teacher = ({1: curve[2][1]}, curve[2][1])
    text = study.report([row], [0], teacher, {(row.flags, 0): curve})
    assert text.count("| CD | 1 |") == 2 and "Equal teacher budget (0.2K teacher UNet evaluations" in text


def test_the_tradeoff_plot_is_written(tmp_path):
    """study.plot_tradeoff draws one line per row from {row: {teacher evaluations: [per-seed scores]}} into a
    PNG, and closes its figure (the study redraws the plot after every run)."""
    import matplotlib.pyplot as plt
    scores = lambda fd: {n: {"fd": fd * n} for n in study.STUDENT_STEPS}  # noqa: E731
    curves = {"CD": {9600: [scores(600), scores(620)], 19200: [scores(400), scores(410)]},
              "SCott": {9600: [scores(650)]}}
    study.plot_tradeoff(curves, tmp_path / "tradeoff.png")
    from PIL import Image
    assert Image.open(tmp_path / "tradeoff.png").size == (1200, 900)
    assert plt.get_fignums() == []
