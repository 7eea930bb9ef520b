"""Toy metrics: the Fréchet distance is the textbook formula, and the shipped classifier (toy/classifier.safetensors,
regenerate with `python evaluate.py train-classifier`) tells real synthetic images from noise and from images made
for another prompt."""
import json

import numpy as np
import pytest
import torch

import evaluate
import toy
import toy_table


@pytest.fixture(scope="module")
def classifier():
    assert evaluate.CLASSIFIER_PATH.is_file(), "toy/classifier.safetensors is missing: run `python evaluate.py " \
                                               "train-classifier`"
    return evaluate.load_classifier()


@pytest.fixture(scope="module")
def prompts():
    return [p for p in toy.all_prompts() for _ in range(4)]  # 240: every prompt 4 times


# ---- Fréchet distance -------------------------------------------------------------------------------------------

def _fd_reference(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook form, computed another way: Tr((Σ₁Σ₂)^½) as the sum of √ of the (real, non-negative)
    eigenvalues of the non-symmetric product Σ₁Σ₂."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eig).sum())


def test_frechet_distance_matches_the_textbook_formula():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g)
    b = torch.randn(400, 6, generator=g) @ torch.randn(6, 6, generator=g) + 0.5
    fd = evaluate.frechet_distance_from_features(a, b)
    assert fd == pytest.approx(_fd_reference(a.double().numpy(), b.double().numpy()), rel=1e-8)
    assert fd == pytest.approx(evaluate.frechet_distance_from_features(b, a), rel=1e-8)  # symmetric
    assert evaluate.frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
    # A pure shift of one set by d adds exactly |d|² (the covariances are unchanged).
    d = torch.tensor([1.0, -2.0, 0.0, 0.5, 0.0, 3.0])
    assert evaluate.frechet_distance_from_features(a, a + d) == pytest.approx(float(d.square().sum()), rel=1e-8)


def test_symmetric_square_root_squares_back():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(5, 5, generator=g, dtype=torch.float64)
    psd = m @ m.T
    root = evaluate._sqrtm_psd(psd)
    assert torch.allclose(root @ root, psd, atol=1e-10) and torch.allclose(root, root.T)


def test_frechet_distance_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        evaluate.frechet_distance_from_features(torch.zeros(1, 3), torch.zeros(5, 3))


# ---- the metrics on real, noise and wrong-prompt images ----------------------------------------------------------

def test_real_images_score_high_and_noise_scores_low(classifier, prompts):
    real = evaluate.reference_images(prompts, len(prompts), seed=7)  # other draws than evaluate's reference seed
    real_scores = evaluate.evaluate_samples(real, prompts, classifier=classifier)
    assert min(real_scores[k] for k in ("acc_shape", "acc_colour", "acc_position", "acc_all")) >= 0.97

    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noise_scores = evaluate.evaluate_samples(noise, prompts, classifier=classifier)
    assert noise_scores["acc_all"] < 0.1  # chance is 1/60
    for attribute, classes in (("shape", 3), ("colour", 4), ("position", 5)):
        assert noise_scores[f"acc_{attribute}"] < 1.5 / classes  # about chance, far from real images
    assert noise_scores["fd"] > 20 * real_scores["fd"]


def test_images_of_another_prompt_score_low_accuracy(classifier, prompts):
    """Images made for prompt A, scored against a prompt B that differs in every attribute."""
    labels = toy.prompts_to_labels(prompts)
    images = toy.render(labels, torch.Generator().manual_seed(8))
    other = toy.labels_to_prompts((labels + 1) % torch.tensor([3, 4, 5]))
    right = evaluate.prompt_accuracy(images, prompts, classifier)
    wrong = evaluate.prompt_accuracy(images, other, classifier)
    assert right["acc_all"] >= 0.97
    assert max(wrong.values()) < 0.05


def test_fd_sees_lost_diversity_and_blur(classifier, prompts):
    """FD, unlike accuracy, notices a model that always draws the same picture per prompt, or blurry ones."""
    real = evaluate.reference_images(prompts, len(prompts), seed=7)
    fd_real = evaluate.frechet_distance(real, evaluate.reference_images(prompts, len(prompts)), classifier)
    collapsed = real.view(60, 4, 3, 32, 32)[:, :1].expand(60, 4, 3, 32, 32).reshape(real.shape)
    blurred = torch.nn.functional.avg_pool2d(real, 3, stride=1, padding=1)
    for worse in (collapsed, blurred):
        assert evaluate.prompt_accuracy(worse, prompts, classifier)["acc_all"] >= 0.95
        assert evaluate.frechet_distance(worse, evaluate.reference_images(prompts, len(prompts)), classifier) > \
            2 * fd_real


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
    """The commands the README table comes from, at their smallest: the data row, a 2-step teacher row and a 1-step
    student row, printed and written as JSON; toy_table.py reads that JSON back into its table."""
    for who, flags in {"teacher": ["--teacher-steps", "2"], "student": ["--student", "toy/student", "--steps", "1"]}.items():
        (tmp_path / who).mkdir()
        evaluate.main([*flags, "--n-per-prompt", "1", "--json", str(tmp_path / who / "scores.json")])
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "student" / "scores.json").read_text())
    assert [row["steps"] for row in rows] == [None, 1]  # toy_table reads the step count, not the row's label
    assert "| data (fresh synthetic)" in out and "| teacher ddim 2 steps" in out and "| student 1 step(s)" in out
    teacher, data = toy_table.score_teacher(tmp_path / "teacher", threads=1)  # reads the JSON, runs nothing
    student = toy_table.train_and_score(tmp_path / "student", "", steps=1, seed=0, threads=1)
    assert data["acc_all"] == 1.0 and set(teacher) == {2} and set(student) == {1}
    for scores in (teacher[2], student[1]):
        assert set(scores) == {"acc_shape", "acc_colour", "acc_position", "acc_all", "fd"}
        assert 0 <= scores["acc_all"] <= 1 and scores["fd"] > data["fd"]
    row = toy_table.table_row("x", [{n: student[1] for n in toy_table.STUDENT_STEPS}] * 2)
    assert row.startswith("| x | 2 | ") and row.count(" ± 0.0") == 6
