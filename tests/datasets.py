"""Tiny image–caption datasets for tests: a folder and webdataset-style tar shards, optionally with bad samples.

Good sample i has a flat red and green that encode i (color_of / index_of_color), a horizontal blue ramp (so crops
differ), and the caption "a photo of sample i" (index_of_caption): a test can check that every image arrived with its
own caption. Formats, captions and shapes vary with i: PNG, JPEG, WebP and RGBA PNG; .txt, .json {"caption"} and
.json {"text"}; landscape and portrait, short side `size`.

with_bad adds samples that the loader must skip and count, each of them with a caption unless the defect is the
caption: random bytes, truncated JPEG and PNG, a 4×4 image, an image without caption, a text file named .png; tar
shards also get a key with a caption but no image and a .json without caption. The folder also gets a README.md,
which is not a sample at all (ignored, not counted).
"""
import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image

FOLDER_BAD_KINDS = ("corrupt", "truncated_jpg", "truncated_png", "tiny", "no_caption", "not_an_image")
TAR_BAD_KINDS = FOLDER_BAD_KINDS + ("no_image", "json_without_caption")
TINY = 4  # side of the too-small images


def color_of(i: int) -> tuple[int, int]:
    """Red and green of good sample i (i < 225): flat, in steps of 16 that survive JPEG/WebP and resizing."""
    return 8 + 16 * (i % 15), 8 + 16 * (i // 15 % 15)


def index_of_color(rgb) -> int:
    """Index from an image's mean red and green (blue is a ramp, so different crops differ)."""
    r, g = (float(c) for c in rgb[:2])
    return round((r - 8) / 16) + 15 * round((g - 8) / 16)


def caption_of(i: int) -> str:
    return f"a photo of sample {i}"


def index_of_caption(caption: str) -> int:
    return int(caption.rsplit(" ", 1)[1])


def folder_bad_count(n: int) -> int:
    """How many bad samples write_folder_dataset(with_bad=True) writes for n good ones."""
    return len(FOLDER_BAD_KINDS) * max(1, n // 8)


def good_sample(i: int, size: int) -> dict:
    """Files of good sample i by extension."""
    width, height = size + 4 * (i % 3), size
    if i % 5 == 4:
        width, height = height, width + 4  # portrait
    fmt = ("png", "jpg", "webp", "rgba.png")[i % 4]
    red, green = color_of(i)
    blue = Image.linear_gradient("L").rotate(90).resize((width, height))  # 0 at the left to 255 at the right
    image = Image.merge("RGB", (Image.new("L", (width, height), red), Image.new("L", (width, height), green), blue))
    if fmt == "rgba.png":  # opaque alpha channel: exercises the RGBA -> RGB path without changing the colour
        image, fmt = image.convert("RGBA"), "png"
    files = {fmt: encode(image, fmt)}
    caption = caption_of(i)
    if i % 3 == 0:
        files["txt"] = caption.encode()
    else:
        files["json"] = json.dumps({"caption" if i % 3 == 1 else "text": caption, "url": "http://x"}).encode()
    return files


def bad_sample(kind: str, size: int, rng: random.Random) -> dict:
    """Files of one sample with the given defect."""
    noise = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(3 * size * size)))
    caption = {"txt": f"bad {kind}".encode()}
    if kind == "corrupt":
        return {"jpg": bytes(rng.randrange(256) for _ in range(500)), **caption}
    if kind == "truncated_jpg":
        data = encode(noise, "jpg")
        return {"jpg": data[:len(data) // 2], **caption}
    if kind == "truncated_png":
        data = encode(noise, "png")
        return {"png": data[:len(data) // 2], **caption}
    if kind == "tiny":
        return {"png": encode(Image.new("RGB", (TINY, TINY), (255, 0, 0)), "png"), **caption}
    if kind == "no_caption":
        return {"png": encode(noise, "png")}
    if kind == "not_an_image":
        return {"png": b"this is a text file, not an image\n" * 4, **caption}
    if kind == "no_image":
        return caption
    if kind == "json_without_caption":
        return {"png": encode(noise, "png"), "json": json.dumps({"url": "http://x", "width": size}).encode()}
    raise ValueError(f"unknown bad-sample kind {kind!r}")


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt], quality=95)
    return buffer.getvalue()


def write_folder_dataset(root, n: int, size: int = 40, with_bad: bool = False) -> Path:
    """good_00000.png + good_00000.txt ... in `root` (bad ones in a sub-folder: the search is recursive)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    samples = [(root / f"good_{i:05d}", good_sample(i, size)) for i in range(n)]
    if with_bad:
        rng = random.Random(0)
        (root / "more").mkdir(exist_ok=True)
        samples += [(root / "more" / f"bad_{kind}_{j}", bad_sample(kind, size, rng))
                    for j in range(max(1, n // 8)) for kind in FOLDER_BAD_KINDS]
        (root / "README.md").write_text("not a sample\n")
    for stem, files in samples:
        for ext, data in files.items():
            stem.with_name(f"{stem.name}.{ext}").write_bytes(data)
    return root


def write_tar_dataset(root, n_shards: int, per_shard: int, size: int = 40, with_bad: bool = False) -> Path:
    """root/00000.tar ...: shard s holds good samples s * per_shard ... (+ one bad sample of each TAR_BAD_KIND)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for s in range(n_shards):
        samples = [(f"good_{i:05d}", good_sample(i, size)) for i in range(s * per_shard, (s + 1) * per_shard)]
        if with_bad:
            samples += [(f"bad_{kind}_{s}", bad_sample(kind, size, rng)) for kind in TAR_BAD_KINDS]
        rng.shuffle(samples)  # bad ones anywhere in the shard, not all at the end
        write_shard(root / f"{s:05d}.tar", samples)
    return root


def write_shard(path, samples, mode: str = "w") -> Path:
    """One tar shard of (key, {ext: bytes}) samples, in order; mode "w:gz" compresses it."""
    with tarfile.open(path, mode) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return Path(path)
