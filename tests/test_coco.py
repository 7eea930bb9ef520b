"""evaluate.py --coco end to end on a tiny COCO written in COCO's own layout, with tiny random SD-shaped models, a
narrow FID Inception (width / 8, real 299 px input chain) and a tiny CLIP: PNGs, JSON and table; an interrupted
run resumes, makes only the missing images and reports the same numbers; bad inputs fail early and clearly."""
import json

import pytest
from PIL import Image

from metrics import coco
import evaluate
from tiny_eval_models import write_tiny_clip, write_tiny_coco, write_tiny_inception
from tiny_models import write_tiny_sd15
from unet import make_student, save_unet


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    unet, _, _ = write_tiny_sd15(root / "sd15")
    save_unet(make_student(unet), root / "student")
    return {"model": root / "sd15", "student": root / "student", "coco": write_tiny_coco(root / "coco", n_images=6),
            "inception": write_tiny_inception(root / "pt_inception.pth"),
            "clip": write_tiny_clip(root / "clip"), "root": root}


def _argv(world, out, *extra):
    return ["--coco", str(world["coco"]), "--model", str(world["model"]), "--student", str(world["student"]),
            "--steps", "1", "--inception", str(world["inception"]), "--inception-width-divisor", "8",
            "--clip", str(world["clip"]), "--out", str(out), "--batch", "2", "--coverage", *extra]


def test_captions_follow_the_protocol(world):
    entries = coco.read_captions(world["coco"], coco.PROTOCOLS["coco2017-5k"])
    assert len(entries) == 6 and [e["image_id"] for e in entries] == sorted(e["image_id"] for e in entries)
    assert all(e["caption"].endswith("(1)") for e in entries)  # caption 1 has the lower annotation id
    seeded = coco.Protocol("t", "val2017", 4, "seeded", 32, seed=3)
    a, b = coco.read_captions(world["coco"], seeded), coco.read_captions(world["coco"], seeded)
    assert a == b and len(a) == 4 and len({e["image_id"] for e in a}) == 4  # deterministic, distinct images
    assert coco.contiguous_runs([0, 1, 2, 5, 6, 9], 2) == [[0, 1], [2], [5, 6], [9]]


def test_end_to_end_then_resume(world, tmp_path, monkeypatch):
    calls = []
    real = coco.generate_batch

    def counting(bundle, unet, schedule, captions, *args):
        calls.append(len(captions))
        return real(bundle, unet, schedule, captions, *args)
    monkeypatch.setattr(coco, "generate_batch", counting)

    full = evaluate.main(_argv(world, tmp_path / "full"))  # through evaluate.py's entry point
    assert sum(calls) == 6
    folder = tmp_path / "full" / "images" / "student-1steps-w7.5"
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    assert Image.open(pngs[0]).size == (32, 32) and Image.open(pngs[0]).format == "PNG"
    result = json.loads((tmp_path / "full" / "results.json").read_text())[0]
    assert result["protocol"]["name"] == "coco2017-5k" and result["samples"] == 6 and result["steps"] == 1
    assert result["guidance"] == 7.5 and len(result["inception_sha256"]) == 64
    assert any(k.endswith("diffusion_pytorch_model.safetensors") for k in result["weights_sha256"])
    assert {"torch", "transformers"} <= set(result["versions"])
    for key in ("fid", "clip_cosine", "clip_score", "density", "coverage"):
        assert result[key] == full[0][key] and result[key] == result[key]  # finite, as returned
    assert result["fid"] > 0
    assert "| student-1steps-w7.5 |" in (tmp_path / "full" / "results.md").read_text()
    assert (tmp_path / "full" / "reference-coco2017-5k-6.safetensors").is_file()

    # Interrupted after 4 images (two batches), then resumed: only the 2 missing images are made.
    calls.clear()
    assert evaluate.main(_argv(world, tmp_path / "cut", "--stop-after", "4")) == []
    assert len(list((tmp_path / "cut" / "images" / "student-1steps-w7.5").glob("*.png"))) == 4
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut" / "images" / "student-1steps-w7.5").glob("*.png")}
    calls.clear()
    resumed = evaluate.main(_argv(world, tmp_path / "cut"))
    assert calls == [2]
    for name, mtime in kept.items():  # never re-generated nor rewritten
        assert (tmp_path / "cut" / "images" / "student-1steps-w7.5" / name).stat().st_mtime_ns == mtime
    for key in ("fid", "clip_cosine", "clip_score", "density", "coverage"):
        assert resumed[0][key] == pytest.approx(full[0][key], rel=1e-9, abs=1e-12)
    # The reference cache is reused, not recomputed: a run with the cache in place reads it.
    monkeypatch.setattr(coco, "inception_features", _only_generated(coco.inception_features))
    again = evaluate.main(_argv(world, tmp_path / "cut"))
    assert again[0]["fid"] == pytest.approx(full[0]["fid"], rel=1e-9)
    # Image i comes from seed + i whatever the batching: batches of 3 give the same PNGs as batches of 2.
    evaluate.main(_argv(world, tmp_path / "by3")[:-3] + ["--batch", "3", "--ref-cache",
                                                          str(tmp_path / "cut" / "reference-coco2017-5k-6.safetensors")])
    for p in pngs:
        assert (tmp_path / "by3" / "images" / "student-1steps-w7.5" / p.name).read_bytes() == p.read_bytes()


def _only_generated(real):
    def features(inception, paths, size, crop, batch=50):
        assert not crop, "reference features were recomputed although cached"
        return real(inception, paths, size, crop, batch)
    return features


def test_bad_inputs_fail_early_and_clearly(world, tmp_path):
    empty = tmp_path / "not-coco"
    empty.mkdir()
    argv = _argv(world, tmp_path / "o")
    argv[argv.index("--coco") + 1] = str(empty)
    with pytest.raises(FileNotFoundError, match="no annotations/captions_val2017.json"):
        coco.main(argv)
    broken = write_tiny_coco(tmp_path / "broken", n_images=3)
    next((broken / "val2017").glob("*.jpg")).unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 3 images .* missing from val2017/"):
        coco.read_captions(broken, coco.PROTOCOLS["coco2017-5k"])
    wrong = tmp_path / "wrong.pth"
    import torch
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    argv = _argv(world, tmp_path / "o")
    argv[argv.index("--inception") + 1] = str(wrong)
    with pytest.raises(Exception, match="not the FID Inception-v3"):
        coco.main(argv)
    with pytest.raises(SystemExit):
        coco.main(_argv(world, tmp_path / "o") + ["--teacher"])  # --student and --teacher together


def test_reference_cache_from_another_protocol_is_refused(world, tmp_path):
    from metrics.inception import InceptionConfig, load_inception
    net = load_inception(world["inception"], config=InceptionConfig(width_divisor=8))
    cache = tmp_path / "ref.safetensors"
    small = coco.Protocol("coco2017-5k", "val2017", 2, "first", 32)
    entries = coco.read_captions(world["coco"], small)
    first = coco.reference_features(world["coco"], small, entries, net, "abc", cache)
    assert first.shape == (2, 256)
    paths = [world["coco"] / "val2017" / e["file"] for e in entries]
    assert first.equal(coco.inception_features(net, paths, 32, crop=True))  # the crop-then-resize chain
    assert coco.reference_features(world["coco"], small, entries, net, "abc", cache).equal(first)  # cached
    other = coco.Protocol("coco2014-30k", "val2017", 2, "first", 32)
    with pytest.raises(ValueError, match="made under another setting .*protocol"):
        coco.reference_features(world["coco"], other, entries, net, "abc", cache)
    with pytest.raises(ValueError, match="inception_sha256"):
        coco.reference_features(world["coco"], small, entries, net, "another-inception", cache)


def test_reference_resize_chain_crops_the_centre(tmp_path):
    import numpy as np
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, 20:40] = 200  # the centre square is bright, the sides are black
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    cropped = coco.load_rgb(tmp_path / "wide.png", 10, crop=True)
    assert cropped.shape == (10, 10, 3) and cropped.min() == 200  # PIL bicubic of a constant stays constant
    squashed = coco.load_rgb(tmp_path / "wide.png", 10, crop=False)
    assert squashed.min() == 0  # without the crop the black sides come in
