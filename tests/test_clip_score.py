"""CLIP score equals torchmetrics' CLIPScore on a tiny random CLIP saved locally, raw cosine and 100·cos scale."""
import numpy as np
import pytest
import torch

from metrics.clip_score import ClipScorer, summarize
from tiny_eval_models import write_tiny_clip


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "openai-tiny-clip")


def _images(n, seed=0):
    g = np.random.default_rng(seed)
    return [(g.random((40 + 8 * i, 48, 3)) * 255).astype(np.uint8) for i in range(n)]  # different sizes


def _torchmetrics_score(folder, images, captions):
    """torchmetrics' CLIPScore loaded from the local folder (it accepts paths containing "openai"). torchmetrics
    1.9 expects transformers 4's get_*_features (tensors); transformers 5 returns output objects, so the two
    methods are adapted to return their pooled projection, as transformers 4 did. Everything else is
    torchmetrics': preprocessing, tokenization, normalisation, 100×, mean, clamp."""
    clip_module = pytest.importorskip("torchmetrics.multimodal.clip_score")
    metric = clip_module.CLIPScore(model_name_or_path=str(folder))
    model = metric.model
    for name in ("get_image_features", "get_text_features"):
        method = getattr(model, name)

        def tensor_features(*args, _method=method, **kwargs):
            out = _method(*args, **kwargs)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        setattr(model, name, tensor_features)
    tensors = [torch.from_numpy(im).permute(2, 0, 1) for im in images]  # uint8 (3, H, W), as torchmetrics takes
    per_pair, _ = clip_module._clip_score_update(tensors, captions, metric.model, metric.processor)  # 100·cos
    metric.update(tensors, captions)
    return per_pair, metric.compute().item()


def test_equals_torchmetrics(clip_folder):
    images = _images(4)
    captions = ["a cat on a mat", "a red bus", "two dogs playing in the snow", "a bowl"]
    scorer = ClipScorer(str(clip_folder))
    cos = scorer.cosines(images, captions)
    assert cos.shape == (4,) and cos.abs().max() <= 1
    per_pair, expected = _torchmetrics_score(clip_folder, images, captions)
    assert torch.allclose(100 * cos, per_pair.double().cpu(), atol=1e-4)  # every pair, before mean and clamp
    assert (cos > 0).any() and (cos < 0).any()  # both signs: the clamp below is of the mean, not per pair
    assert summarize(cos)["clip_score"] == pytest.approx(expected, abs=1e-4)


def test_prefix_and_pairing_change_the_score(clip_folder):
    images = _images(3)
    captions = ["a cat", "a bus", "a tree"]
    plain = ClipScorer(str(clip_folder)).cosines(images, captions)
    prefixed = ClipScorer(str(clip_folder), prefix="A photo of ").cosines(images, captions)
    assert not torch.allclose(plain, prefixed)
    assert torch.allclose(ClipScorer(str(clip_folder)).cosines(images[::-1], captions[::-1]), plain.flip(0))


def test_summary_clamps_the_mean_like_torchmetrics():
    assert summarize(torch.tensor([0.3, 0.1])) == pytest.approx({"clip_cosine": 0.2, "clip_score": 20.0})
    assert summarize(torch.tensor([-0.3, 0.1]))["clip_score"] == 0.0


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--clip .*no Hugging Face CLIP model"):
        ClipScorer(str(tmp_path))
