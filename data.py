"""Image–caption data for SCott training: image folders, webdataset-style tar shards, and a latent cache.

Three sources, one stream of fixed-size batches:
    folder  cat.jpg + cat.txt (or cat.json holding "caption" or "text"), searched recursively
    shards  a folder of *.tar, or one .tar, in the webdataset / img2dataset layout: key.jpg|jpeg|png|webp (or
            bmp, gif, tif, tiff) next to key.txt or key.json, plain or gzip/bzip2/xz-compressed, read with the
            standard library's tarfile, one shard after the other (streamed)
    cache   a folder written by build_latent_cache(): VAE latents + text embeddings, so long runs skip VAE and CLIP

    loader = make_loader(DataConfig(path="/data/laion"), batch_size=10, rank=rank, world_size=world)
    batch = next(loader)   # {"image": (10, 3, 512, 512) in [-1, 1], "caption": [10 str], "skipped": int}

Images are resized so the short side equals the resolution, then cropped square (random or centre). Unreadable,
corrupt, truncated, too small, oversized or caption-less samples, and any other error while reading one sample, are
skipped, logged (the first few) and counted; "skipped" in every batch is the total for this rank so far. Only the
formats in IMAGE_FORMATS are decoded (whatever the file is named): PIL's other plugins (PSD, EPS, ICO...) are
rarely needed and some run external programs. 16-bit images are scaled by 255/65535 and float ones from [0, 1].
Members and sidecar files are read up to a cap (MAX_IMAGE_BYTES, MAX_CAPTION_BYTES), so one huge member of a small
gzip shard cannot exhaust memory. Captions must be UTF-8 (a BOM is allowed); others are skipped as unreadable.

How the data is split, and why a resumed stream is exact:
* Every rank runs num_workers DataLoader workers; each worker is one *reader* with its own slice of the data.
  Reader r = rank * W + role, out of R = world_size * W readers, where W = max(1, num_workers).
* Each reader loops over epochs forever. Epoch e is fixed by (data_seed, e, r) alone: folders and caches take a
  permutation of all samples that is the same on every reader and keep every R-th entry; shards are permuted the same
  way and dealt out whole (or, with fewer shards than readers, every reader reads them all and keeps every R-th
  sample, from offset (r + e) mod R), then pass through a shuffle buffer. So the readers of one epoch see disjoint
  slices that cover the data.
* A reader may be dealt only bad files in some epoch; it then goes on to the next epoch, once it has checked (by
  reading the data in file order up to the first usable sample) that the data as a whole has one. Only when a whole
  pass over every file finds nothing usable does it raise.
* The DataLoader collects batches from its workers round robin, so batch g of a rank is batch g // W of role g % W.
  A loader started at batch N gives worker j the role (N + j) % W and lets it fast-forward to its batch (N + j) // W
  by re-reading (and decoding, to know which files are bad) the samples before it, without resizing or cropping.
  The result equals a fresh stream's batches N, N+1, ... bit for bit, skip counts included, as long as world size,
  workers, batch size, seed and data are unchanged. Fast-forward costs one decode per skipped-over image per reader
  (ms each); the latent cache fast-forwards by index arithmetic alone.
"""
import bisect
import bz2
import dataclasses
import gzip
import hashlib
import importlib
import io
import itertools
import json
import lzma
import os
import re
import signal
import sys
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from checkpoint import atomic_write
from config import check_settings, setting

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")  # image files/keys, in order of preference
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # PIL decoders tried (JPEG includes cameras' MPO)
CAPTION_EXTS = ("txt", "json")
MAX_IMAGE_BYTES = 64 << 20                    # an image file or tar member above this is skipped, unread
MAX_CAPTION_BYTES = 1 << 20                   # likewise for .txt / .json captions (LAION's are a few hundred bytes)
MANIFEST = "manifest.json"                    # marks a latent cache folder; written last, so only complete caches
CACHE_FORMAT = "scott-latent-cache-v1"
MAX_LOGGED_SKIPS = 10                         # per reader; the rest are counted silently


@dataclass
class DataConfig:
    path: str = ""              # train.py's --data: image folder, .tar shards, a latent cache, or MODULE:FUNCTION
    resolution: int = setting(512, "square training images, in pixels; a multiple of 8 (the VAE downsamples 8×)",
                              at_least=1)
    random_crop: bool = setting(True, "random crop after resizing the short side; --no-random-crop = centre crop")
    min_size: int = setting(0, "skip images whose short side is below this; 0 = resolution / 2 (upscale ≤ 2×)",
                            at_least=0)
    shuffle_buffer: int = setting(1000, "tar samples held for shuffling (folders and caches are fully shuffled)",
                                  at_least=1)
    num_workers: int = setting(4, "DataLoader worker processes per rank; 0 = decode in the training process",
                               at_least=0)
    data_seed: int = setting(0, "seed of the epoch order, the shuffle buffer and the random crops", at_least=0)

    def __post_init__(self):
        check_settings(self)

    @property
    def min_short_side(self) -> int:
        return self.min_size or self.resolution // 2


# ---- one sample: raw files -> RGB image + caption -> tensor ------------------------------------------------------

class SkipSample(Exception):
    """A sample that cannot be used (unreadable, corrupt, too small, no caption): counted and logged, never fatal."""


@dataclass
class Record:
    """One raw sample as webdataset sees it: its files by extension, e.g. {"jpg": b"...", "txt": b"a cat"}."""
    name: str           # file or shard:key, for the log
    files: dict
    error: str = ""     # set when the source itself failed (unreadable file, corrupt tar)


def read_caption(files: dict) -> str:
    """The caption from key.txt, else from key.json's "caption" or "text" (img2dataset writes both files).

    An empty caption is kept (it trains the unconditional case); a missing one makes the sample unusable.
    """
    if "txt" in files:
        try:
            return files["txt"].decode("utf-8-sig").strip()
        except UnicodeDecodeError as e:
            raise SkipSample(f"caption .txt is not UTF-8 text ({e})") from None
    if "json" in files:
        try:
            meta = json.loads(files["json"])  # UTF-8 (or -16/-32, which JSON allows), else UnicodeDecodeError
        except UnicodeDecodeError as e:
            raise SkipSample(f"caption .json is not UTF-8 text ({e})") from None
        except ValueError as e:
            raise SkipSample(f"unreadable .json caption ({e})") from None
        except RecursionError:
            raise SkipSample("unreadable .json caption (nested too deeply)") from None
        for key in ("caption", "text"):
            if isinstance(meta, dict) and isinstance(meta.get(key), str):
                return meta[key].strip()
        raise SkipSample('no caption: the .json has no string "caption" or "text"')
    raise SkipSample('no caption: no .txt, and no .json with "caption" or "text"')


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode (palette, grey, CMYK, alpha, 16-bit, float) to RGB. Transparent pixels become white, as a browser
    shows them, instead of whatever colour happens to be stored under alpha = 0."""
    if image.mode.startswith("I") or image.mode == "F":
        return to_8_bit(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (I;16*, and I, which PIL also uses for 16-bit files) or float (F, taken as [0, 1]) grey image as
    8-bit grey. PIL's own convert() clips these at 255, which turns nearly every 16-bit image pure white."""
    pixels = np.asarray(image, dtype=np.float64)
    scale = 255.0 if image.mode == "F" else 255.0 / 65535.0
    return Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8), mode="L")


def open_image(data: bytes, min_size: int, resolution: int) -> Image.Image:
    """Decode an image fully, to RGB, or raise SkipSample.

    Only IMAGE_FORMATS are tried, by content. PIL's LOAD_TRUNCATED_IMAGES stays off, so a truncated file fails at
    once instead of yielding a grey half-image.
    A decompression bomb (more pixels than Image.MAX_IMAGE_PIXELS) is refused from its header, before decoding.
    JPEGs are decoded at a reduced scale when that still leaves both sides >= resolution (PIL's draft mode): nearly
    the same result after the resize below, at a fraction of the cost for large photos. A camera's EXIF orientation is
    applied, so phone photos are upright.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns from 1× to 2× the limit
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
        if min(width, height) < min_size:
            raise SkipSample(f"too small: {width}x{height}, short side below min_size {min_size}")
        image.draft("RGB", (resolution, resolution))
        return to_rgb(ImageOps.exif_transpose(image))  # loads every pixel: corrupt data fails here
    except SkipSample:
        raise
    except Image.UnidentifiedImageError:
        raise SkipSample(f"not an image in an accepted format ({', '.join(IMAGE_FORMATS)}), or a corrupt "
                         "header") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for broken files
        raise SkipSample(f"cannot decode image ({type(e).__name__}: {e})") from None


def decode_sample(record: Record, min_size: int, resolution: int) -> tuple[Image.Image, str]:
    """(RGB image, caption) of one record, or SkipSample saying why not. The caption is checked first: it is cheap."""
    if record.error:
        raise SkipSample(record.error)
    image_ext = next((ext for ext in IMAGE_EXTS if ext in record.files), None)
    if image_ext is None:
        raise SkipSample(f"no image file (.{', .'.join(IMAGE_EXTS)})")
    caption = read_caption(record.files)
    return open_image(record.files[image_ext], min_size, resolution), caption


def resize_and_crop(image: Image.Image, resolution: int, crop: tuple[float, float] | None = None) -> torch.Tensor:
    """Resize so the short side equals `resolution`, cut a square, and return (3, res, res) float32 in [-1, 1].

    crop: None for the centre; (u, v) in [0, 1)² for a random crop, the fractions of the free range along x and y
    (the diffusers LCM script does the same: resize shortest side, then RandomCrop, then normalise to [-1, 1]).
    """
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    free_x, free_y = size[0] - resolution, size[1] - resolution
    if crop is None:
        left, top = free_x // 2, free_y // 2
    else:
        left, top = int(crop[0] * (free_x + 1)), int(crop[1] * (free_y + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.array(image))  # (res, res, 3) uint8
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0


# ---- sources -------------------------------------------------------------------------------------------------------

def read_capped(file, ext: str, size: int) -> bytes:
    """The bytes of an open file (or tar member) with extension `ext` and stated `size`, or SkipSample if it exceeds
    the cap for its kind. At most size + 1 <= cap + 1 bytes are read (the + 1 catches a file that grew since its size
    was taken), so an oversized file never reaches memory, and no buffer is sized by the cap."""
    cap = MAX_CAPTION_BYTES if ext in CAPTION_EXTS else MAX_IMAGE_BYTES
    data = b"" if size > cap else file.read(size + 1)
    if size > cap or len(data) > cap:
        raise SkipSample(f"the .{ext} file is larger than {cap} bytes, the cap for .{ext} files; not read")
    return data


def read_file_record(path: Path) -> Record:
    """An image file of a folder, with its same-stem caption files (cat.jpg -> cat.txt, cat.json)."""
    files = {}
    try:
        for ext, file in ((path.suffix[1:].lower(), path), *((e, path.with_suffix("." + e)) for e in CAPTION_EXTS)):
            if file == path or file.is_file():
                with open(file, "rb") as f:
                    files[ext] = read_capped(f, ext, os.fstat(f.fileno()).st_size)
    except OSError as e:
        return Record(str(path), {}, error=f"unreadable file ({e})")
    except SkipSample as why:
        return Record(str(path), {}, error=str(why))
    return Record(str(path), files)


def read_tar_records(path: Path):
    """Stream one shard: consecutive members with the same key (dir/name up to the first dot) form one sample.

    Members other than images and captions are passed over unread. A corrupt or truncated shard yields the samples
    before the damage, then one Record carrying the error.
    """
    key, files, problem = None, {}, ""
    try:
        with open_shard(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:  # "r|": no seeking
            for member in tar:
                folder, base = os.path.split(member.name)
                if not member.isfile() or base.startswith("."):  # directories, macOS "._x" files
                    continue
                stem, _, ext = base.partition(".")
                member_key, ext = os.path.join(folder, stem), ext.lower()
                if member_key != key:
                    if key is not None:
                        yield Record(f"{path}:{key}", files, error=problem)
                    key, files, problem = member_key, {}, ""
                if ext in IMAGE_EXTS + CAPTION_EXTS and not problem:
                    try:
                        files[ext] = read_capped(tar.extractfile(member), ext, member.size)
                    except SkipSample as why:
                        problem = str(why)
    except Exception as e:  # tarfile, gzip, zlib, lzma and OSError all signal damage; none may end the run
        yield Record(f"{path}:{key or ''}", {}, error=f"corrupt or truncated tar, rest of shard lost "
                                                      f"({type(e).__name__}: {e})")
        return
    if key is not None:
        yield Record(f"{path}:{key}", files, error=problem)


def open_shard(path: Path):
    """A shard as a stream of tar bytes, decompressed if it is gzip, bzip2 or xz (told by its first bytes).

    The compression modules decompress in bounded steps, so passing over a huge member costs time linear in its
    size and little memory; tarfile's own "r|gz" decompresses unbounded chunks and copies them again per block.
    """
    with open(path, "rb") as f:
        magic = f.read(6)
    for prefix, opener in ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open)):
        if magic.startswith(prefix):
            return opener(path, "rb")
    return open(path, "rb")


def shuffle_buffer(items, size: int, generator: torch.Generator):
    """webdataset's shuffle(size): hold `size` items, emit a random one as each new item arrives, drain at the end."""
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = int(torch.randint(len(buffer), (), generator=generator))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    for i in torch.randperm(len(buffer), generator=generator).tolist():
        yield buffer[i]


def seeded_generator(*keys) -> torch.Generator:
    """A torch.Generator seeded from a tuple of keys, identical in every process (Python's hash() is salted)."""
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


class SkipLog:
    """Counts one reader's skipped samples and prints the first few, naming the file and the reason."""

    def __init__(self, reader: str):
        self.reader, self.count = reader, 0

    def skip(self, name: str, reason: str):
        self.count += 1
        if self.count <= MAX_LOGGED_SKIPS:
            more = "; further skips are counted, not printed" if self.count == MAX_LOGGED_SKIPS else ""
            print(f"data ({self.reader}): skipped {name}: {reason}{more}", file=sys.stderr, flush=True)


# ---- streams: readers, epochs, batches -----------------------------------------------------------------------------

class ReaderStream(IterableDataset):
    """Turns a per-reader sample stream into this rank's batches (see the module docstring for the scheme).

    Subclasses provide samples(reader, n_readers, skips), an endless iterator of light-weight samples, and
    materialize(sample) -> dict of one item's tensors and caption. Fast-forwarding pulls samples without
    materializing them.
    """

    def __init__(self, batch_size: int, rank: int, world_size: int, num_workers: int, start_batch: int):
        if batch_size < 1 or num_workers < 0 or start_batch < 0:
            raise ValueError(f"data: batch_size {batch_size}, num_workers {num_workers} and start_batch {start_batch}"
                             " must be >= 1, >= 0 and >= 0.")
        if not 0 <= rank < world_size:
            raise ValueError(f"data: rank {rank} is not in [0, world_size {world_size}).")
        self.batch_size, self.rank, self.world_size, self.start_batch = batch_size, rank, world_size, start_batch
        self.roles = max(1, num_workers)  # num_workers = 0 still has one reader: the training process
        self.n_readers = world_size * self.roles

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        if info and info.num_workers != self.roles:
            raise RuntimeError(f"data: built for {self.roles} workers but run with {info.num_workers}.")
        role = (self.start_batch + worker) % self.roles
        reader = self.rank * self.roles + role
        skips = SkipLog(f"rank {self.rank}, worker {role}")
        samples = self.samples(reader, self.n_readers, skips)
        for _ in range((self.start_batch + worker) // self.roles * self.batch_size):  # fast-forward
            next(samples)
        while True:
            skipped_before = skips.count
            items = [self.materialize(next(samples)) for _ in range(self.batch_size)]
            batch = {key: torch.stack([it[key] for it in items]) if torch.is_tensor(items[0][key])
                     else [it[key] for it in items] for key in items[0]}
            yield {**batch, "skipped": skips.count, "skipped_before": skipped_before, "role": role}


class ImageTextStream(ReaderStream):
    """Batches {"image": (B, 3, res, res) in [-1, 1], "caption": [B str]} from an image folder or tar shards."""

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
        super().__init__(batch_size, rank, world_size, cfg.num_workers, start_batch)
        if cfg.resolution < 8 or cfg.resolution % 8:
            raise ValueError(f"data: resolution {cfg.resolution} must be a positive multiple of 8 (VAE latents are "
                             "resolution / 8).")
        if not cfg.path:
            raise ValueError("data: no path given; pass --data with an image folder, tar shards or a latent cache.")
        self.cfg, self.path = cfg, Path(cfg.path)
        self.images, self.shards = find_images_and_shards(self.path)
        self.found_a_sample = False  # set by has_a_sample, per process
        if self.images and len(self.images) < self.n_readers:
            raise ValueError(f"data {self.path}: {len(self.images)} images for {self.n_readers} readers "
                             f"({world_size} ranks × {self.roles} workers); every reader needs one. Add images or "
                             "lower --num-workers.")

    def records(self, epoch: int, reader: int, n_readers: int):
        """Reader `reader`'s raw records of one epoch, in its shuffled order."""
        order = torch.randperm(len(self.images or self.shards), generator=seeded_generator(
            self.cfg.data_seed, "order", epoch)).tolist()  # the same on every reader: slices are disjoint
        if self.images:
            for i in order[reader::n_readers]:
                yield read_file_record(self.images[i])
            return
        shards = [self.shards[i] for i in order]
        if len(shards) >= n_readers:
            records = itertools.chain.from_iterable(map(read_tar_records, shards[reader::n_readers]))
        else:  # too few shards to deal out: everyone reads all of them and keeps every n-th sample, from an offset
            records = itertools.chain.from_iterable(map(read_tar_records, shards))  # that moves on every epoch, so
            records = itertools.islice(records, (reader + epoch) % n_readers, None, n_readers)  # no slice stays bad
        yield from shuffle_buffer(records, self.cfg.shuffle_buffer,
                                  seeded_generator(self.cfg.data_seed, "buffer", epoch, reader))

    def samples(self, reader: int, n_readers: int, skips: SkipLog, epochs=None):
        """Endless (or over `epochs`) decoded samples (image, caption, crop); bad ones are skipped and counted.

        An epoch without a usable sample is not an error as long as the data as a whole has one (see has_a_sample).
        """
        for epoch in itertools.count() if epochs is None else epochs:
            crops = seeded_generator(self.cfg.data_seed, "crop", epoch, reader)
            usable = 0
            for record in self.records(epoch, reader, n_readers):
                # drawn before decoding: a sample's crop depends only on its place in the epoch
                crop = tuple(torch.rand(2, generator=crops).tolist()) if self.cfg.random_crop else None
                try:
                    image, caption = self.decode(record)
                except SkipSample as why:
                    skips.skip(record.name, str(why))
                    continue
                usable += 1
                yield image, caption, crop
            if usable == 0 and not self.has_a_sample():
                raise RuntimeError(f"data {self.path}: no usable sample in a whole pass over all {self.size()} "
                                   f"(this reader, {reader}, skipped {skips.count} in all; the log above names the "
                                   "first few of each reader and why). Fix or replace the files, or point --data "
                                   "elsewhere.")

    def decode(self, record: Record) -> tuple[Image.Image, str]:
        """decode_sample, with every error of one sample (whatever its type) turned into SkipSample."""
        try:
            return decode_sample(record, self.cfg.min_short_side, self.cfg.resolution)
        except SkipSample:
            raise
        except Exception as e:
            raise SkipSample(f"unexpected error while reading the sample ({type(e).__name__}: {e})") from None

    def has_a_sample(self) -> bool:
        """Whether a pass over all files, in file order, finds a usable sample; stops at the first. Asked only by a
        reader whose epoch had none, and remembered once true: the cost is small while most of the data is good."""
        if not self.found_a_sample:
            files = self.images or self.shards
            records = map(read_file_record, files) if self.images else itertools.chain.from_iterable(
                map(read_tar_records, files))
            self.found_a_sample = any(self.usable(record) for record in records)
        return self.found_a_sample

    def require_a_sample(self) -> None:
        """RuntimeError unless the data holds a usable sample: read in file order up to the first one (one decode for
        good data). The message names the skipped samples it counts (the first MAX_LOGGED_SKIPS, then how many
        more). make_loader calls it, so data without a single usable sample fails before any model is loaded."""
        files = self.images or self.shards
        records = map(read_file_record, files) if self.images else itertools.chain.from_iterable(
            map(read_tar_records, files))
        skipped = []
        for record in records:
            try:
                self.decode(record)
            except SkipSample as why:
                skipped.append(f"{record.name} ({why})")
                continue
            self.found_a_sample = True
            return
        more = len(skipped) - MAX_LOGGED_SKIPS
        shown = "; ".join(skipped[:MAX_LOGGED_SKIPS]) + (f"; and {more} more" if more > 0 else "")
        raise RuntimeError(f"data {self.path}: no usable sample in a whole pass over all {self.size()} "
                           f"({len(skipped)} skipped: {shown}). An image needs a caption beside it (cat.jpg + cat.txt, "
                           f'or cat.json with a "caption") and a short side of at least --min-size pixels. Fix or '
                           f"replace the files, or point --data elsewhere.")

    def usable(self, record: Record) -> bool:
        """Whether the record decodes to a training sample."""
        try:
            self.decode(record)
            return True
        except SkipSample:
            return False

    def size(self) -> str:
        """The data's size in words, for messages."""
        return f"{len(self.images)} image file(s)" if self.images else f"{len(self.shards)} shard(s)"

    def materialize(self, sample) -> dict:
        image, caption, crop = sample
        return {"image": resize_and_crop(image, self.cfg.resolution, crop), "caption": caption}


def find_images_and_shards(path: Path) -> tuple[list[Path], list[Path]]:
    """(images, shards) under `path`, sorted; exactly one of the two lists is non-empty, or a clear error."""
    if not path.exists():
        raise FileNotFoundError(f"data {path}: no such file or folder.")
    if not path.is_file() and not path.is_dir():
        raise ValueError(f"data {path}: not a regular file or folder (a FIFO, socket or device?); pass a folder "
                         "of images or shards, or one .tar.")
    if path.is_file():
        if path.suffix.lower() != ".tar":
            raise ValueError(f"data {path}: a file must be a .tar shard; or pass a folder of images or shards.")
        return [], [path]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix[1:].lower() in IMAGE_EXTS]
    shards = [p for p in files if p.suffix.lower() == ".tar"]
    if images and shards:
        raise ValueError(f"data {path}: holds both {len(images)} images and {len(shards)} .tar shards; point --data "
                         "at a folder of one kind.")
    if not images and not shards:
        raise ValueError(f"data {path}: no images found (looked for *.{', *.'.join(IMAGE_EXTS)} and *.tar, "
                         "recursively); the folder is empty or holds other files.")
    return images, shards


# ---- latent cache: precomputed VAE latents and text embeddings -----------------------------------------------------

def build_latent_cache(source: DataConfig, encode_images, encode_texts, out_dir, batch_size: int = 32,
                       shard_size: int = 1024) -> dict:
    """Encode every usable sample of `source` once and write a cache that make_loader streams instead.

    encode_images: (B, 3, res, res) in [-1, 1] on the CPU -> latents (B, ...), already scaled (× 0.18215)
    encode_texts:  list of B captions -> text embeddings (B, ...)
    Both are the caller's models (data.py knows none); results are stored as returned, on the CPU, in the dtype
    returned (return bf16 to halve the disk). Crops are centre crops: a cache fixes one crop per image for all
    epochs, and the centre is the one that keeps the subject. Shards (safetensors, captions in their metadata) and
    then manifest.json are written to a temporary name and renamed, so a crashed build never looks complete.
    Returns the manifest.
    """
    cfg = dataclasses.replace(source, random_crop=False, num_workers=0)
    stream = ImageTextStream(cfg, batch_size=1)
    skips = SkipLog("cache build")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    shards, pending = [], {"latent": [], "text_embedding": [], "caption": []}

    def write_shard(n):
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {key: torch.stack(pending[key][:n]).contiguous() for key in ("latent", "text_embedding")}
        atomic_write(out / name, lambda tmp: save_file(tensors, str(tmp), metadata={
            "captions": json.dumps(pending["caption"][:n])}))
        shards.append({"file": name, "count": n})
        for key in pending:
            del pending[key][:n]

    samples = stream.samples(reader=0, n_readers=1, skips=skips, epochs=[0])
    while chunk := list(itertools.islice(samples, batch_size)):
        images = torch.stack([stream.materialize(s)["image"] for s in chunk])
        captions = [caption for _, caption, _ in chunk]
        with torch.no_grad():
            latents, embeddings = encode_images(images), encode_texts(captions)
        for name, value in (("encode_images", latents), ("encode_texts", embeddings)):
            if not torch.is_tensor(value) or value.shape[0] != len(chunk):
                found = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"build_latent_cache: {name} must return a tensor with {len(chunk)} rows (one per "
                                 f"sample), found {found}.")
        pending["latent"] += list(latents.detach().cpu())
        pending["text_embedding"] += list(embeddings.detach().cpu())
        pending["caption"] += captions
        while len(pending["caption"]) >= shard_size:
            write_shard(shard_size)
    if pending["caption"]:
        write_shard(len(pending["caption"]))
    manifest = {"format": CACHE_FORMAT, "resolution": cfg.resolution, "count": sum(s["count"] for s in shards),
                "skipped": skips.count, "source": str(cfg.path), "shards": shards}
    atomic_write(out / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    return manifest


class LatentCacheDataset(ReaderStream):
    """Batches {"latent", "text_embedding", "caption"} from a cache folder written by build_latent_cache.

    Same readers, epochs, drop-last batches and resume as the image stream; every epoch is a full permutation
    (rows are read at random from memory-mapped shards), and nothing is ever skipped. The manifest and every shard's
    header are checked at construction (a damaged cache fails before training starts, naming the file).
    """

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
        super().__init__(batch_size, rank, world_size, cfg.num_workers, start_batch)
        self.cfg, self.path = cfg, Path(cfg.path)
        manifest = read_manifest(self.path / MANIFEST)
        if manifest["resolution"] != cfg.resolution:
            raise ValueError(f"data {self.path}: the cache was built at resolution {manifest['resolution']}, the run "
                             f"asks for {cfg.resolution}; pass --resolution {manifest['resolution']} or rebuild it.")
        self.files = [self.path / s["file"] for s in manifest["shards"]]
        for f, s in zip(self.files, manifest["shards"]):
            check_cache_shard(f, s["count"], self.path / MANIFEST)
        self.starts = list(itertools.accumulate([s["count"] for s in manifest["shards"]], initial=0))
        self.count = self.starts[-1]
        if self.count < self.n_readers:
            raise ValueError(f"data {self.path}: {self.count} cached samples for {self.n_readers} readers "
                             f"({world_size} ranks × {self.roles} workers); lower --num-workers or cache more data.")
        self.open_shards = {}  # shard index -> (safe_open handle, captions); opened lazily inside each worker

    def samples(self, reader: int, n_readers: int, skips: SkipLog):
        """Endless row indices: reader's share of each epoch's permutation of all rows."""
        for epoch in itertools.count():
            order = torch.randperm(self.count, generator=seeded_generator(self.cfg.data_seed, "order", epoch))
            yield from order[reader::n_readers].tolist()

    def materialize(self, index: int) -> dict:
        """Row `index` of the cache, read from its memory-mapped shard."""
        shard = bisect.bisect_right(self.starts, index) - 1
        row = index - self.starts[shard]
        try:
            if shard not in self.open_shards:
                handle = safe_open(str(self.files[shard]), framework="pt")
                self.open_shards[shard] = handle, json.loads(handle.metadata()["captions"])
            handle, captions = self.open_shards[shard]
            return {"latent": handle.get_slice("latent")[row:row + 1][0],
                    "text_embedding": handle.get_slice("text_embedding")[row:row + 1][0], "caption": captions[row]}
        except Exception as e:
            raise RuntimeError(f"data {self.files[shard]}: cannot read row {row} ({type(e).__name__}: {e}); the "
                               "shard changed or was damaged after the run started. Rebuild the cache.") from None


def read_manifest(path: Path) -> dict:
    """A latent cache's manifest.json, checked: the format, the resolution, and a list of {"file", "count"}."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"data {path}: unreadable manifest ({type(e).__name__}: {e}); the cache is damaged: "
                         "rebuild it with build_latent_cache.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"data {path}: format {found!r}, expected {CACHE_FORMAT!r}; rebuild the cache with "
                         "build_latent_cache.")
    shards = manifest.get("shards")
    valid = (isinstance(manifest.get("resolution"), int) and isinstance(shards, list) and shards and all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("count"), int)
        and s["count"] > 0 for s in shards))
    if not valid:
        raise ValueError(f"data {path}: damaged manifest: needs an integer \"resolution\" and a non-empty \"shards\" "
                         "list of {\"file\": name, \"count\": rows > 0}; rebuild the cache with build_latent_cache.")
    return manifest


def check_cache_shard(file: Path, count: int, manifest: Path) -> None:
    """Refuse a cache shard that is missing, unreadable (truncated), or whose rows are not the `count` listed."""
    if not file.is_file():
        raise FileNotFoundError(f"data {file}: listed in {manifest} but missing; rebuild the cache.")
    try:
        with safe_open(str(file), framework="pt") as handle:
            rows = {key: handle.get_slice(key).get_shape()[0] for key in ("latent", "text_embedding")}
            rows["captions"] = len(json.loads((handle.metadata() or {})["captions"]))
    except Exception as e:  # safetensors, KeyError, JSON: all mean a damaged file
        raise ValueError(f"data {file}: not a readable cache shard ({type(e).__name__}: {e}); it may be "
                         "truncated or damaged: rebuild the cache.") from None
    if any(n != count for n in rows.values()):
        raise ValueError(f"data {file}: holds {rows} rows, but {manifest} lists {count}; rebuild the cache.")


# ---- the trainer's entry point -------------------------------------------------------------------------------------

def open_dataset(cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0) -> ReaderStream:
    """The stream for cfg.path: a latent cache if it holds manifest.json, else images or tar shards."""
    path = Path(cfg.path)
    if cfg.path and (path / MANIFEST).is_file():
        return LatentCacheDataset(cfg, batch_size, rank, world_size, start_batch)
    return ImageTextStream(cfg, batch_size, rank, world_size, start_batch)


def python_source(path: str):
    """The function a `--data MODULE:FUNCTION` names (synthetic or custom batches; the toy model's scott.toml names
    toyworld.toy:make_toy_loader), or None when `path` is not of that form. The module is imported from the current
    folder or the Python path; the function is called as make_loader would be called, plus `seed`."""
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", path) or Path(path).exists():
        return None
    module, name = path.split(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"--data {path}: cannot import {name} from {module} ({e}).") from None


def make_loader(cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1, start_batch: int = 0,
                seed: int = 0):
    """An endless iterator of this rank's batches, starting at batch `start_batch` exactly as a fresh one would.

    Batches hold `batch_size` items (drop-last: always full): "image" (B, 3, res, res) in [-1, 1] or, from a latent
    cache, "latent" and "text_embedding"; "caption" (list of B str); "skipped" (int), the samples skipped so far on
    this rank over all its workers. The source is checked here, before any model is loaded: a wrong path or a
    folder without images raises at once. A MODULE:FUNCTION source (python_source) gets `seed` (train.py's --seed).
    """
    source = python_source(cfg.path)
    if source is not None:
        return source(batch_size, rank=rank, world_size=world_size, start_batch=start_batch, seed=seed)
    dataset = open_dataset(cfg, batch_size, rank, world_size, start_batch)
    if isinstance(dataset, ImageTextStream):
        dataset.require_a_sample()
    if cfg.num_workers == 0:
        batches = iter(dataset)
    else:
        batches = iter(DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                                  pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_stop_signals))
    return rank_totals(batches, dataset.roles)


def ignore_stop_signals(worker_id: int):
    """DataLoader workers ignore SIGTERM and SIGINT. Schedulers (SLURM, systemd) and Ctrl-C signal the whole process
    group; a worker that died of it would take the trainer down before its checkpoint. The trainer decides when to
    stop, then shuts its workers down itself (they also exit when it dies: DataLoader watches the parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def rank_totals(batches, roles: int):
    """Replace each batch's per-worker skip count with the total over this rank's workers.

    The first batch of every worker is read before anything is yielded: each says how many its worker had skipped
    before it, so the totals of a resumed stream match a fresh one from the first batch on.
    """
    first = [next(batches) for _ in range(roles)]
    latest = {batch["role"]: batch["skipped_before"] for batch in first}
    for batch in itertools.chain(first, batches):
        role, _ = batch.pop("role"), batch.pop("skipped_before")
        latest[role] = batch["skipped"]
        batch["skipped"] = sum(latest.values())
        yield batch
