"""Parquet data in the Hugging Face layout (files written here with pyarrow, as `datasets.to_parquet` lays them out):
an image column of {bytes, path} structs or raw bytes, a caption column found by name; read a row group at a time;
split over ranks and workers with every row read once; bad rows skipped and counted; train.py and --cache-to."""
import builtins
from pathlib import Path

import pytest
import torch

import data as data_module
import train
from data import DataConfig, ImageTextStream, SkipLog, build_latent_cache, make_loader
from datasets import caption_of, good_sample
from tiny_models import TINY_RUN

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
RES = 32


def write_parquet(path, rows: range, *, struct=True, caption="text", bad_rows=(), row_group_size=3) -> Path:
    """Rows i of `rows`: good_sample(i)'s image and caption; rows in bad_rows get garbage bytes instead."""
    images, captions = [], []
    for i in rows:
        image = next(v for k, v in good_sample(i, 40).items() if k not in ("txt", "json"))
        images.append(b"not an image at all" if i in bad_rows else image)
        captions.append(caption_of(i))
    if struct:
        kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        column = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in zip(rows, images)], type=kind)
    else:
        column = pa.array(images, type=pa.binary())
    table = pa.table({"image": column, caption: captions})
    table = table.replace_schema_metadata({"huggingface": '{"info": {"features": {"image": {"_type": "Image"}}}}'})
    pq.write_table(table, path, row_group_size=row_group_size)
    return Path(path)


def names_read(cfg, n_readers):
    stream = ImageTextStream(cfg, batch_size=1, world_size=n_readers)
    return [[r.name for r in stream.records(0, reader, n_readers)] for reader in range(n_readers)]


@pytest.mark.parametrize("n_files", [1, 4])
def test_every_row_is_read_once_over_ranks_and_workers(tmp_path, n_files):
    folder = tmp_path / "hub"
    folder.mkdir()
    for f in range(n_files):
        write_parquet(folder / f"train-{f:05d}-of-{n_files:05d}.parquet", range(f * 8, f * 8 + 8))
    cfg = DataConfig(path=str(folder), resolution=RES, num_workers=0, shuffle_buffer=1)
    per_reader = names_read(cfg, n_readers=4)
    everything = [n for names in per_reader for n in names]
    assert len(everything) == len(set(everything)) == 8 * n_files and all(per_reader)


def test_batches_hold_the_rows_images_and_captions(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", range(6))
    batch = next(make_loader(DataConfig(path=str(path), resolution=RES, num_workers=0), batch_size=4))
    assert batch["image"].shape == (4, 3, RES, RES) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    captions = {caption_of(i) for i in range(6)}
    assert set(batch["caption"]) <= captions and batch["skipped"] == 0


def test_raw_bytes_and_a_named_caption_column(tmp_path):
    path = write_parquet(tmp_path / "raw.parquet", range(4), struct=False, caption="alt_text")
    with pytest.raises(ValueError, match="caption column.*'alt_text'"):
        next(make_loader(DataConfig(path=str(path), resolution=RES, num_workers=0), batch_size=2))
    cfg = DataConfig(path=str(path), resolution=RES, num_workers=0, caption_column="alt_text")
    assert len(next(make_loader(cfg, batch_size=2))["caption"]) == 2


def test_corrupt_rows_are_skipped_and_counted(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", range(8), bad_rows={1, 5})
    stream = ImageTextStream(DataConfig(path=str(path), resolution=RES, random_crop=False), batch_size=1)
    skips = SkipLog("test")
    good = list(stream.samples(0, 1, skips, epochs=[0]))
    assert len(good) == 6 and skips.count == 2


def test_one_row_group_at_a_time(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "train.parquet", range(9), row_group_size=3)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole file at once"))
    groups = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **k: groups.append(i) or real(self, i, **k))
    rows = list(data_module.read_parquet_records(path, DataConfig(path=str(path))))
    assert len(rows) == 9 and groups == [0, 1, 2]


def test_train_and_cache_from_parquet(tmp_path, tiny_model):
    path = write_parquet(tmp_path / "train.parquet", range(8))
    out = tmp_path / "run"
    train.main(["--model", str(tiny_model), "--data", str(path), "--out", str(out), "--num-workers", "0",
                "--steps", "2", *TINY_RUN])
    assert (out / "step-0000002").is_dir()
    manifest = build_latent_cache(DataConfig(path=str(path), resolution=RES), lambda x: x[:, :1, ::8, ::8] * 0,
                                  lambda c: torch.zeros(len(c), 2, 3), tmp_path / "cache", batch_size=3)
    assert manifest["count"] == 8 and manifest["skipped"] == 0


def test_without_pyarrow_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "train.parquet", range(2))
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name.startswith("pyarrow") else real_import(name, *a, **k))
    with pytest.raises(ValueError, match="pip install pyarrow"):
        make_loader(DataConfig(path=str(path), resolution=RES, num_workers=0), batch_size=1)
