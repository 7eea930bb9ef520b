"""data.py: folders and tar shards give fixed-size batches of [-1, 1] images with their own captions; bad samples are
skipped and counted; ranks and workers read disjoint slices that cover the data; a resumed stream equals a fresh one;
the latent cache round-trips; crops and resizes are where they should be; bad paths fail early and clearly."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import (DataConfig, ImageTextStream, Record, SkipLog, SkipSample, build_latent_cache, decode_sample,
                  make_loader, open_image, read_caption, resize_and_crop, shuffle_buffer)
from datasets import (FOLDER_BAD_KINDS, TAR_BAD_KINDS, encode, folder_bad_count, index_of_caption, index_of_color,
                      write_folder_dataset, write_tar_dataset)

RES = 16    # training resolution in these tests: default min_size is 8, the helpers' tiny images are 4×4
SIZE = 20   # short side of the helpers' good images: every one is resized down to RES


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """8 good samples in each layout, bad ones mixed in (clean_*: none); *tar_few has fewer shards than 4 readers."""
    root = tmp_path_factory.mktemp("data")
    sets = {}
    for bad, prefix in ((True, ""), (False, "clean_")):
        sets[prefix + "folder"] = write_folder_dataset(root / f"{prefix}folder", n=8, size=SIZE, with_bad=bad)
        sets[prefix + "tar"] = write_tar_dataset(root / f"{prefix}tar", n_shards=4, per_shard=2, size=SIZE,
                                                 with_bad=bad)
        sets[prefix + "tar_few"] = write_tar_dataset(root / f"{prefix}tar_few", n_shards=2, per_shard=4, size=SIZE,
                                                     with_bad=bad)
    return sets


BAD_COUNT = {"folder": folder_bad_count(8), "tar": 4 * len(TAR_BAD_KINDS), "tar_few": 2 * len(TAR_BAD_KINDS)}


def loader(path, batch_size=4, rank=0, world_size=1, start_batch=0, **cfg):
    cfg = DataConfig(path=str(path), resolution=RES, **{"num_workers": 0, **cfg})
    return make_loader(cfg, batch_size, rank, world_size, start_batch)


def take(batches, n):
    return [next(batches) for _ in range(n)]


def indices(batches):
    return [index_of_caption(c) for b in batches for c in b["caption"]]


def by_index(batch):
    return {index_of_caption(c): image for c, image in zip(batch["caption"], batch["image"])}


# ---- batches ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_batches_hold_images_in_range_with_their_own_captions(datasets, layout):
    batches = take(loader(datasets[layout]), 3)
    for batch in batches:
        assert batch["image"].shape == (4, 3, RES, RES) and batch["image"].dtype == torch.float32
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        for image, caption in zip(batch["image"], batch["caption"]):
            assert index_of_color((image.mean((1, 2)) + 1) * 127.5) == index_of_caption(caption)
    # one reader: the first epoch (2 batches) is all 8 good samples once, in shuffled order
    assert sorted(indices(batches[:2])) == list(range(8)) and indices(batches[:2]) != list(range(8))
    # batch 3 is in epoch 1, so every bad sample of epoch 0 was met and counted by then, and none twice yet
    assert BAD_COUNT[layout] <= batches[2]["skipped"] <= 2 * BAD_COUNT[layout]
    assert batches[0]["skipped"] <= batches[1]["skipped"] <= batches[2]["skipped"]


@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_bad_samples_are_skipped_counted_and_logged(datasets, layout, capsys, monkeypatch):
    monkeypatch.setattr(data, "MAX_LOGGED_SKIPS", 100)
    stream = ImageTextStream(DataConfig(path=str(datasets[layout]), resolution=RES, num_workers=0), batch_size=1)
    skips = SkipLog("test")
    good = list(stream.samples(reader=0, n_readers=1, skips=skips, epochs=[0]))
    assert len(good) == 8 and skips.count == BAD_COUNT[layout]
    log = capsys.readouterr().err
    assert log.count("skipped") == skips.count and "good_" not in log and "README" not in log
    for kind in (FOLDER_BAD_KINDS if layout == "folder" else TAR_BAD_KINDS):
        assert f"bad_{kind}_" in log
    for reason in ("too small: 4x4", "not an image in an accepted format", "truncated", "no caption"):
        assert reason in log
    if layout == "tar":
        assert "no image file" in log and 'no string "caption" or "text"' in log


def test_only_the_first_skips_are_printed(datasets, capsys):
    take(loader(datasets["tar"]), 6)  # 32 bad samples per epoch
    log = capsys.readouterr().err.splitlines()
    assert len(log) == data.MAX_LOGGED_SKIPS and log[-1].endswith("further skips are counted, not printed")


def test_a_truncated_shard_keeps_its_first_samples_and_the_stream_goes_on(tmp_path, capsys):
    root = write_tar_dataset(tmp_path, n_shards=2, per_shard=4, size=SIZE)
    shard = root / "00001.tar"
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) * 6 // 10])
    stream = ImageTextStream(DataConfig(path=str(root), resolution=RES, num_workers=0), batch_size=1)
    skips = SkipLog("test")
    good = list(stream.samples(reader=0, n_readers=1, skips=skips, epochs=[0]))
    assert 4 < len(good) < 8 and skips.count == 1
    assert "00001.tar" in capsys.readouterr().err
    batches = take(loader(root, batch_size=3), 8)  # several epochs, each with the damaged shard
    assert batches[-1]["skipped"] >= 3 and all(b["image"].shape[0] == 3 for b in batches)


def test_a_reader_with_nothing_usable_fails_clearly_instead_of_stalling(tmp_path):
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, payload in (("a.jpg", b"junk"), ("a.txt", b"cap"), ("b.txt", b"caption without image")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(RuntimeError, match="no usable sample.*2 skipped"):
        next(loader(tmp_path / "bad.tar"))


# ---- ranks, workers and resume ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, workers", [("folder", 0), ("folder", 2), ("tar", 0), ("tar", 2), ("tar_few", 2)])
def test_ranks_and_workers_read_disjoint_slices_that_cover_an_epoch(datasets, layout, workers):
    # no bad samples here, so each rank's first 2 batches of 2 are exactly its readers' first epoch: 4 of 8 samples
    seen = [indices(take(loader(datasets["clean_" + layout], batch_size=2, rank=rank, world_size=2,
                                num_workers=workers), 2)) for rank in (0, 1)]
    assert len(set(seen[0])) == len(set(seen[1])) == 4
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(8))


@pytest.mark.parametrize("layout", ["folder", "tar", "tar_few"])
def test_with_bad_samples_readers_still_split_each_epoch(datasets, layout):
    # bad files make the readers' shares uneven, so look at one epoch per reader directly (4 readers, 3 epochs)
    stream = ImageTextStream(DataConfig(path=str(datasets[layout]), resolution=RES, num_workers=0), batch_size=1)
    for epoch in range(3):
        shares = [[index_of_caption(caption) for _, caption, _ in
                   stream.samples(reader, 4, SkipLog("test"), epochs=[epoch])] for reader in range(4)]
        assert sorted(sum(shares, [])) == list(range(8))


@pytest.mark.parametrize("layout, workers", [("folder", 0), ("folder", 2), ("tar", 2)])
def test_a_stream_resumed_at_batch_n_equals_a_fresh_one_from_n(datasets, layout, workers):
    n, more = 3, 5  # an odd start: with 2 workers the resumed loader's worker 0 plays the fresh worker 1
    fresh = take(loader(datasets[layout], batch_size=2, num_workers=workers), n + more)[n:]
    resumed = take(loader(datasets[layout], batch_size=2, num_workers=workers, start_batch=n), more)
    for a, b in zip(fresh, resumed):
        assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"] and a["skipped"] == b["skipped"]
    # not vacuous: skips happened before batch n, and an image gets a new random crop every epoch
    assert fresh[0]["skipped"] > 0
    epoch0, epoch1 = map(by_index, take(loader(datasets[layout], batch_size=8), 2))
    assert any(not torch.equal(epoch0[i], epoch1[i]) for i in range(8))  # square images have only one crop


# ---- latent cache -------------------------------------------------------------------------------------------------

def fake_encode_images(images):
    return F.avg_pool2d(images, 8)  # (B, 3, 2, 2): keeps the colour that names the sample


def fake_encode_texts(captions):
    return torch.tensor([[index_of_caption(c)] * 5 for c in captions], dtype=torch.float32)[:, None]  # (B, 1, 5)


def test_latent_cache_round_trip(datasets, tmp_path):
    source = DataConfig(path=str(datasets["folder"]), resolution=RES)
    manifest = build_latent_cache(source, fake_encode_images, fake_encode_texts, tmp_path / "cache", batch_size=3,
                                  shard_size=3)
    assert manifest["count"] == 8 and manifest["skipped"] == BAD_COUNT["folder"] and manifest["resolution"] == RES
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 2]
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text()) == manifest
    assert not list((tmp_path / "cache").glob("*.tmp"))

    batches = take(loader(tmp_path / "cache"), 3)
    assert sorted(indices(batches[:2])) == list(range(8)) and all(b["skipped"] == 0 for b in batches)
    for batch in batches:
        assert set(batch) == {"latent", "text_embedding", "caption", "skipped"}
        assert batch["latent"].shape == (4, 3, 2, 2) and batch["text_embedding"].shape == (4, 1, 5)
        for latent, embedding, caption in zip(batch["latent"], batch["text_embedding"], batch["caption"]):
            i = index_of_caption(caption)
            assert torch.all(embedding == i)
            png = next(datasets["folder"].glob(f"good_{i:05d}.*[gp]"))  # the image file, not its caption
            centre = resize_and_crop(open_image(png.read_bytes(), 8, RES), RES)  # a cache holds the centre crop
            assert torch.equal(latent, fake_encode_images(centre[None])[0])


def test_latent_cache_splits_ranks_resumes_and_checks_resolution(datasets, tmp_path):
    cache = tmp_path / "cache"
    build_latent_cache(DataConfig(path=str(datasets["tar"]), resolution=RES), fake_encode_images, fake_encode_texts,
                       cache)
    seen = [indices(take(loader(cache, batch_size=2, rank=rank, world_size=2), 2)) for rank in (0, 1)]
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == set(range(8))
    fresh = take(loader(cache, batch_size=3, num_workers=2), 7)[3:]
    resumed = take(loader(cache, batch_size=3, num_workers=2, start_batch=3), 4)
    assert all(torch.equal(a["latent"], b["latent"]) and a["caption"] == b["caption"] for a, b in zip(fresh, resumed))
    with pytest.raises(ValueError, match="built at resolution 16.*--resolution 16"):
        make_loader(DataConfig(path=str(cache), resolution=32), 2)


# ---- resize, crop and decoding ------------------------------------------------------------------------------------

def halves(width, height, vertical_split=True):
    """Red left (or top) half, blue right (or bottom) half."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height) if vertical_split else (0, 0, width, height // 2))
    return image


def test_short_side_is_resized_to_the_resolution_then_cropped():
    image = halves(80, 40)  # -> 64 × 32, then a 32-wide window
    resized = np.array(image.resize((64, 32), Image.Resampling.BICUBIC)).astype(np.float32) / 127.5 - 1
    centre = resize_and_crop(image, 32).permute(1, 2, 0).numpy()
    assert centre.shape == (32, 32, 3) and np.array_equal(centre, resized[:, 16:48])
    assert np.allclose(centre[:, :12], [1, -1, -1], atol=0.02) and np.allclose(centre[:, 20:], [-1, -1, 1], atol=0.02)
    # random crops: (u, v) picks the offset over all 33 windows, ends included
    for u, left in ((0.0, 0), (0.5, 16), (0.999, 32)):
        window = resize_and_crop(image, 32, crop=(u, 0.7)).permute(1, 2, 0).numpy()
        assert np.array_equal(window, resized[:, left:left + 32])
    tall = resize_and_crop(halves(40, 80, vertical_split=False), 32, crop=(0.3, 0.0))  # -> 32 × 64, top window
    assert tall.shape == (3, 32, 32) and torch.allclose(tall[:, :12].mean((1, 2)), torch.tensor([1.0, -1, -1]),
                                                        atol=0.02)
    small = resize_and_crop(Image.new("RGB", (20, 24), (255, 255, 255)), 32)  # upscaled: 20 is above min_size 16
    assert small.shape == (3, 32, 32) and torch.equal(small, torch.ones_like(small))


def test_random_crop_follows_the_seed_and_centre_crop_does_not(datasets):
    def first_epoch(**cfg):
        return by_index(next(loader(datasets["folder"], batch_size=8, **cfg)))
    a, b, c = first_epoch(), first_epoch(), first_epoch(data_seed=1)
    assert all(torch.equal(a[i], b[i]) for i in range(8)) and not all(torch.equal(a[i], c[i]) for i in range(8))
    a, c = first_epoch(random_crop=False), first_epoch(random_crop=False, data_seed=1)
    assert all(torch.equal(a[i], c[i]) for i in range(8))


def test_decoding_handles_modes_and_refuses_broken_or_huge_images(monkeypatch):
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.info["transparency"] = 1  # index 1 (red) is transparent -> white
    png = io.BytesIO()
    palette.save(png, format="PNG", transparency=1)
    assert np.array(open_image(png.getvalue(), 8, RES)).min() == 255
    clear = Image.new("RGBA", (20, 20), (10, 200, 10, 0))
    assert np.array(open_image(encode(clear, "png"), 8, RES)).min() == 255
    grey = open_image(encode(Image.new("L", (20, 20), 77), "png"), 8, RES)
    assert grey.mode == "RGB" and np.all(np.array(grey) == 77)
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(cmyk, format="JPEG")
    red = np.array(open_image(cmyk.getvalue(), 8, RES)).mean((0, 1))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; show the stored 40 × 20 pixels as 20 × 40
    rotated = io.BytesIO()
    Image.new("RGB", (40, 20)).save(rotated, format="JPEG", exif=exif.tobytes())
    assert open_image(rotated.getvalue(), 8, RES).size == (20, 40)

    whole = encode(Image.new("RGB", (30, 30), (1, 2, 3)), "jpg")
    with pytest.raises(SkipSample, match="(?i)truncated"):
        open_image(whole[:len(whole) // 2], 8, RES)
    with pytest.raises(SkipSample, match="too small: 30x30"):
        open_image(whole, 31, RES)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 900 px is 1.8× the limit (PIL would only warn)
    with pytest.raises(SkipSample, match="(?i)decompression bomb"):
        open_image(whole, 8, RES)


def test_captions_from_txt_or_json():
    assert read_caption({"txt": b"  a cat \n", "json": b'{"caption": "not this"}'}) == "a cat"
    assert read_caption({"json": b'{"caption": "a dog"}'}) == "a dog"
    assert read_caption({"json": b'{"text": "a cow", "url": "x"}'}) == "a cow"
    assert read_caption({"txt": b""}) == ""  # present but empty: kept, it trains the unconditional case
    for files, reason in (({}, "no caption"), ({"json": b'{"url": "x"}'}, "no string"),
                          ({"json": b"{not json"}, "unreadable .json")):
        with pytest.raises(SkipSample, match=reason):
            read_caption(files)
    with pytest.raises(SkipSample, match="no image file"):
        decode_sample(Record("k", {"txt": b"a cat"}), 8, RES)


def test_shuffle_buffer_permutes_deterministically():
    items = list(range(50))
    out = list(shuffle_buffer(items, 10, torch.Generator().manual_seed(0)))
    assert sorted(out) == items and out != items
    assert out == list(shuffle_buffer(items, 10, torch.Generator().manual_seed(0)))
    assert list(shuffle_buffer(items, 1, torch.Generator().manual_seed(0))) == items  # a buffer of 1 keeps order


# ---- clear errors up front ----------------------------------------------------------------------------------------

def test_bad_paths_and_settings_fail_at_construction(tmp_path, datasets):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("a,b\n")
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.png").write_bytes(b"")
    (tmp_path / "mixed" / "b.tar").write_bytes(b"")
    for path, error, message in ((tmp_path / "empty", ValueError, "no images found"),
                                 (tmp_path / "missing", FileNotFoundError, "no such file or folder"),
                                 ("", ValueError, "no path given"),
                                 (tmp_path / "empty" / "notes.csv", ValueError, "must be a .tar"),
                                 (tmp_path / "mixed", ValueError, "both 1 images and 1 .tar")):
        with pytest.raises(error, match=message):
            make_loader(DataConfig(path=str(path), resolution=RES), 2)
    with pytest.raises(ValueError, match="8 images for 16 readers"):
        make_loader(DataConfig(path=str(datasets["clean_folder"]), resolution=RES, num_workers=4), 2, rank=1,
                    world_size=4)
    with pytest.raises(ValueError, match="multiple of 8"):
        make_loader(DataConfig(path=str(datasets["folder"]), resolution=20), 2)
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size 2\)"):
        make_loader(DataConfig(path=str(datasets["folder"]), resolution=RES), 2, rank=2, world_size=2)


def test_the_latent_cache_shows_progress_on_a_terminal_and_stays_quiet_in_a_log(tmp_path, monkeypatch, capsys):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    data = write_folder_dataset(tmp_path / "images", n=6)
    source = DataConfig(path=str(data), resolution=RES)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    build_latent_cache(source, fake_encode_images, fake_encode_texts, tmp_path / "a", batch_size=2)
    shown = terminal.getvalue()
    assert "latent cache" in shown and "6/6" in shown  # the count of its total, so an ETA
    monkeypatch.undo()
    capsys.readouterr()
    build_latent_cache(source, fake_encode_images, fake_encode_texts, tmp_path / "b", batch_size=2)
    assert "latent cache" not in capsys.readouterr().err  # a log file gets no bar
