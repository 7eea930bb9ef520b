"""data.py against hostile and damaged input: a run on data that is mostly good never dies of the bad part.

Each test first builds the input that used to crash, stall or silently corrupt a run, then checks the behaviour
chosen: mostly-bad epochs go on, every per-sample error is a counted skip, 16-bit and float images keep their
brightness, oversized members are skipped unread, captions must be UTF-8, only known image formats are decoded, and
a damaged latent cache names the damaged file.
"""
import io
import json
import os
import re
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataConfig, ImageTextStream, SkipLog, SkipSample, build_latent_cache, make_loader, open_image
from datasets import caption_of, encode, good_sample, index_of_caption, write_folder_dataset, write_shard, \
    write_tar_dataset

RES = 16
SIZE = 20


def take(batches, n):
    return [next(batches) for _ in range(n)]


def indices(batches):
    return [index_of_caption(c) for b in batches for c in b["caption"]]


def stream_of(path, **cfg):
    return ImageTextStream(DataConfig(path=str(path), resolution=RES, num_workers=0, **cfg), batch_size=1)


def corrupt_shard(path):
    path.write_bytes(bytes(range(256)) * 8)  # no tar header anywhere: the whole shard is lost
    return path


# ---- a reader dealt only bad data in one epoch ---------------------------------------------------------------------

def test_a_worker_dealt_only_corrupt_shards_does_not_end_the_run(tmp_path):
    root = write_tar_dataset(tmp_path, n_shards=3, per_shard=2, size=SIZE)  # good samples 0..5
    for s in range(3, 6):
        corrupt_shard(root / f"{s:05d}.tar")
    # 2 workers get 3 of the 6 shards each, dealt anew every epoch: some epoch gives one worker only corrupt ones
    batches = take(make_loader(DataConfig(path=str(root), resolution=RES, num_workers=2), batch_size=2), 16)
    assert set(indices(batches)) == set(range(6)) and batches[-1]["skipped"] >= 3


def test_one_empty_file_among_six_good_images_with_the_default_workers(tmp_path):
    root = write_folder_dataset(tmp_path, n=6, size=SIZE)
    (root / "empty.png").write_bytes(b"")
    (root / "empty.txt").write_text("an empty file")
    cfg = DataConfig(path=str(root), resolution=RES)
    assert cfg.num_workers == 4  # the default: 7 files for 4 readers, one of them gets only the empty file
    batches = take(make_loader(cfg, batch_size=2), 8)
    assert set(indices(batches)) == set(range(6)) and batches[-1]["skipped"] >= 1


def test_with_few_shards_no_reader_keeps_the_same_bad_slice_forever(tmp_path):
    # one shard, 4 readers: each reads it all and keeps every 4th sample; reader 0 would keep positions 0 and 4
    samples = [(f"s{i}", {"png": b"", "txt": b"empty"} if i in (0, 4) else good_sample(i, SIZE)) for i in range(8)]
    write_shard(tmp_path / "one.tar", samples)
    got = [caption for _, caption, _ in stream_of(tmp_path / "one.tar").samples(0, 4, SkipLog("t"), epochs=range(4))]
    assert sorted(map(index_of_caption, got)) == [1, 2, 3, 5, 6, 7]  # 4 epochs: every position once


@pytest.mark.parametrize("layout", ["shards", "folder"])
def test_nothing_usable_in_a_whole_pass_fails_clearly(tmp_path, layout):
    for i in range(4):
        if layout == "shards":
            corrupt_shard(tmp_path / f"{i}.tar")
        else:
            (tmp_path / f"{i}.png").write_bytes(b"")
            (tmp_path / f"{i}.txt").write_text("caption")
    what = "4 shard" if layout == "shards" else "4 image file"
    with pytest.raises(RuntimeError, match=f"{re.escape(str(tmp_path))}: no usable sample in a whole pass over all "
                                           f"{what}.*Fix or replace the files"):
        next(make_loader(DataConfig(path=str(tmp_path), resolution=RES, num_workers=0), 1, rank=0, world_size=4))


# ---- every per-sample error is a counted skip ----------------------------------------------------------------------

def test_a_caption_nested_100k_levels_deep_is_a_counted_skip(tmp_path, capsys):
    root = write_folder_dataset(tmp_path, n=4, size=SIZE)
    (root / "deep.png").write_bytes(encode(Image.new("RGB", (SIZE, SIZE)), "png"))
    (root / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    batches = take(make_loader(DataConfig(path=str(root), resolution=RES, num_workers=0), batch_size=2), 4)
    assert set(indices(batches)) == set(range(4)) and batches[-1]["skipped"] >= 1
    assert "deep.png: unreadable .json caption (nested too deeply)" in capsys.readouterr().err


def test_any_unexpected_error_of_one_sample_is_a_counted_skip(tmp_path, monkeypatch, capsys):
    root = write_folder_dataset(tmp_path, n=4, size=SIZE)
    decode = data.decode_sample

    def flaky(record, *args):
        if record.name.endswith("good_00002.webp"):
            raise ZeroDivisionError("a decoder bug")
        return decode(record, *args)
    monkeypatch.setattr(data, "decode_sample", flaky)
    batches = take(make_loader(DataConfig(path=str(root), resolution=RES, num_workers=0), batch_size=3), 2)
    assert 2 not in indices(batches) and batches[-1]["skipped"] >= 1
    assert "unexpected error while reading the sample (ZeroDivisionError: a decoder bug)" in capsys.readouterr().err


# ---- 16-bit and float images ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, value, fmt, expected", [
    ("I;16", 30000, "PNG", 117),    # 16-bit greyscale PNG: 30000 / 65535 * 255 = 116.7
    ("I;16", 65535, "PNG", 255),
    ("I;16", 3000, "TIFF", 12),
    ("I", 30000, "TIFF", 117),      # PIL's 32-bit mode, which it also uses for some 16-bit files
    ("F", 0.25, "TIFF", 64),        # float images are taken as [0, 1]
    ("F", 1.5, "TIFF", 255),        # and clipped
])
def test_16_bit_and_float_images_keep_their_brightness(mode, value, fmt, expected):
    buffer = io.BytesIO()
    Image.new(mode, (SIZE, SIZE), value).save(buffer, format=fmt)
    image = open_image(buffer.getvalue(), 8, RES)
    assert image.mode == "RGB" and np.all(np.array(image) == expected)


def test_a_16_bit_ramp_stays_a_ramp():
    ramp = Image.fromarray(np.linspace(0, 65535, SIZE * SIZE).astype(np.uint16).reshape(SIZE, SIZE))
    grey = np.array(open_image(encode(ramp, "png"), 8, RES))[..., 0].ravel()
    assert grey[0] == 0 and grey[-1] == 255 and np.all(np.diff(grey.astype(int)) >= 0) and len(set(grey)) > 200


# ---- size caps -----------------------------------------------------------------------------------------------------

def test_a_huge_caption_in_a_small_gzip_shard_is_skipped_unread(tmp_path):
    samples = [("a", good_sample(0, SIZE)), ("huge", {**good_sample(1, SIZE), "txt": bytes(40 << 20)}),
               ("b", good_sample(2, SIZE)), ("c", {**good_sample(3, SIZE), "npy": bytes(40 << 20)})]
    shard = write_shard(tmp_path / "small.tar.gz", samples, mode="w:gz")
    assert shard.stat().st_size < 1 << 20  # an 80 MB shard that gzips to under 1 MB
    tracemalloc.start()
    try:
        records = list(data.read_tar_records(shard))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # far below the 40 MB member: neither it nor a cap-sized buffer was ever allocated
    errors = {r.name.rsplit(":", 1)[1]: r.error for r in records}
    assert errors == {"a": "", "huge": f"the .txt file is larger than {data.MAX_CAPTION_BYTES} bytes, the cap for "
                                      ".txt files; not read", "b": "", "c": ""}
    assert "npy" not in records[-1].files  # members that are neither image nor caption are passed over unread


def test_oversized_images_and_sidecars_are_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "MAX_IMAGE_BYTES", 2000)
    monkeypatch.setattr(data, "MAX_CAPTION_BYTES", 100)
    root = write_folder_dataset(tmp_path, n=4, size=SIZE)
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (root / "big.png").write_bytes(encode(big, "png"))  # noise: well over 2000 bytes
    (root / "big.txt").write_text("a noisy image")
    (root / "long.png").write_bytes(encode(Image.new("RGB", (SIZE, SIZE)), "png"))
    (root / "long.txt").write_text("word " * 100)
    stream, skips = stream_of(root), SkipLog("t")
    good = list(stream.samples(0, 1, skips, epochs=[0]))
    assert len(good) == 4 and skips.count == 2
    log = capsys.readouterr().err
    assert "big.png: the .png file is larger than 2000 bytes" in log
    assert "long.png: the .txt file is larger than 100 bytes" in log


# ---- captions that are not UTF-8 -----------------------------------------------------------------------------------

def test_captions_must_be_utf8_and_others_are_counted_skips(tmp_path):
    assert data.read_caption({"txt": "\ufeffa caf\u00e9".encode("utf-8")}) == "a caf\u00e9"  # BOM dropped
    assert data.read_caption({"json": json.dumps({"caption": "a caf\u00e9"}).encode("utf-16")}) == "a caf\u00e9"
    for files in ({"txt": "a caf\u00e9".encode("latin-1")}, {"json": '{"caption": "caf\u00e9"}'.encode("latin-1")}):
        with pytest.raises(SkipSample, match=r"caption \.(txt|json) is not UTF-8 text"):
            data.read_caption(files)
    root = write_folder_dataset(tmp_path, n=4, size=SIZE)
    (root / "latin.png").write_bytes(encode(Image.new("RGB", (SIZE, SIZE)), "png"))
    (root / "latin.txt").write_bytes("caf\u00e9".encode("latin-1"))
    skips = SkipLog("t")
    assert len(list(stream_of(root).samples(0, 1, skips, epochs=[0]))) == 4 and skips.count == 1


# ---- image formats -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PPM", "TGA", "ICO", "PCX", "IM"])
def test_formats_outside_the_allowlist_are_not_decoded(fmt):
    buffer = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (9, 9, 9)).save(buffer, format=fmt)
    with pytest.raises(SkipSample, match=r"not an image in an accepted format \(JPEG, PNG, WEBP, BMP, GIF, TIFF\)"):
        open_image(buffer.getvalue(), 8, RES)


def test_allowed_formats_are_found_and_decoded_whatever_their_name(tmp_path):
    formats = {"bmp": "BMP", "gif": "GIF", "tiff": "TIFF", "tif": "TIFF", "jpeg": "JPEG"}
    for i, (ext, fmt) in enumerate(formats.items()):
        Image.new("RGB", (SIZE, SIZE), (8 + 16 * i, 8, 8)).save(tmp_path / f"{i}.{ext}", format=fmt)
        (tmp_path / f"{i}.txt").write_text(caption_of(i))
    skips = SkipLog("t")
    got = {caption: np.array(image) for image, caption, _ in stream_of(tmp_path).samples(0, 1, skips, epochs=[0])}
    assert skips.count == 0 and len(got) == len(formats)
    assert all(np.all(got[caption_of(i)][..., 0] == 8 + 16 * i) for i in range(len(formats)))
    mpo = io.BytesIO()  # a phone's or camera's multi-picture JPEG
    Image.new("RGB", (SIZE, SIZE), (200, 8, 8)).save(mpo, format="MPO", save_all=True,
                                                      append_images=[Image.new("RGB", (SIZE, SIZE))])
    assert np.array(open_image(mpo.getvalue(), 8, RES))[..., 0].mean() > 190
    png_named_jpg = encode(Image.new("RGB", (SIZE, SIZE), (1, 2, 3)), "png")  # img2dataset sometimes misnames
    assert np.all(np.array(open_image(png_named_jpg, 8, RES)) == (1, 2, 3))


def test_a_fifo_as_data_path_is_refused(tmp_path):
    fifo = tmp_path / "shards.tar"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=f"{re.escape(str(fifo))}: not a regular file or folder"):
        make_loader(DataConfig(path=str(fifo), resolution=RES), 1)


# ---- latent cache damage names the file ----------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path):
    source = write_folder_dataset(tmp_path / "images", n=8, size=SIZE)
    out = tmp_path / "cache"
    build_latent_cache(DataConfig(path=str(source), resolution=RES), lambda images: images[:, :, ::8, ::8],
                       lambda captions: torch.zeros(len(captions), 1, 2), out, shard_size=3)
    return out


def first_batch(path, **cfg):
    return next(make_loader(DataConfig(path=str(path), resolution=RES, num_workers=0, **cfg), 2))


def edit_manifest(cache, change):
    manifest = json.loads((cache / "manifest.json").read_text())
    change(manifest)
    (cache / "manifest.json").write_text(json.dumps(manifest))


def test_a_damaged_manifest_is_named(cache):
    manifest = re.escape(str(cache / "manifest.json"))
    (cache / "manifest.json").write_text('{"format": "scott-latent-cache-v1", "shards": [')
    with pytest.raises(ValueError, match=f"{manifest}: unreadable manifest"):
        first_batch(cache)
    (cache / "manifest.json").write_text(json.dumps({"format": "scott-latent-cache-v1", "resolution": RES}))
    with pytest.raises(ValueError, match=f'{manifest}: damaged manifest: needs .*"shards"'):
        first_batch(cache)


def test_a_truncated_cache_shard_is_named_before_training_starts(cache):
    shard = cache / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{re.escape(str(shard))}: not a readable cache shard"):
        make_loader(DataConfig(path=str(cache), resolution=RES, num_workers=0), 2)


def test_counts_that_disagree_with_the_shards_are_named(cache):
    edit_manifest(cache, lambda m: m["shards"][1].update(count=2))
    with pytest.raises(ValueError, match=f"{re.escape(str(cache / 'shard-00001.safetensors'))}: holds .*3.* rows, "
                                         f"but .*manifest.json lists 2"):
        first_batch(cache)


def test_a_shard_damaged_during_the_run_is_named(cache):
    batches = make_loader(DataConfig(path=str(cache), resolution=RES, num_workers=0), 2)
    for shard in cache.glob("shard-*.safetensors"):
        shard.write_bytes(b"gone")
    with pytest.raises(RuntimeError, match=r"shard-0000\d\.safetensors: cannot read row .*Rebuild the cache"):
        take(batches, 4)
