"""FID and CLIP score of SD1.5 students and teachers on MS-COCO captions: resumable, offline, one or many GPUs.

    python evaluate.py --coco /data/coco --model /path/to/sd15 --student runs/scott/student --steps 1 2 4 \\
        --inception pt_inception-2015-12-05-6726825d.pth --clip /path/to/clip-vit-large-patch14
    python evaluate.py --coco /data/coco --model /path/to/sd15 --teacher --steps 25 50 --inception ... --clip ...
    torchrun --nproc_per_node=8 evaluate.py --coco ...          # each rank generates a contiguous slice

Protocols (--protocol):
  coco2017-5k  (the SCott paper's): all 5000 images of val2017, each with its first caption (the annotation of
               lowest id for that image id). Reference set: those 5000 JPEGs. Evaluation at 512 px.
  coco2014-30k (GigaGAN's and DMD2's): 30,000 distinct val2014 images drawn by a seeded permutation (seed 2014) of
               the image ids sorted ascending, each with one of its captions drawn by the same generator. Reference
               set: those 30,000 JPEGs. Evaluation at 256 px.
Resize chain, both protocols: a reference JPEG is centre-cropped to a square (PIL) and resized to the evaluation size
with PIL bicubic; a generated PNG (lossless, at the model's resolution) is resized to the evaluation size with PIL
bicubic if it differs. Both are then uint8 RGB -> FID Inception (metrics/inception.py: bilinear to 299, pytorch-fid's chain).
CLIP score is computed on the generated PNG at full resolution (metrics/clip_score.py).

Files under --out: images/<setting>/<index>.png (index = position in the protocol's caption list; seed of caption
i = --seed + i), images/<setting>/setting.json, reference-<protocol>-<n>.safetensors (reference features, cached once,
refused if made under another protocol, sample count or Inception), results.json and results.md.
"""
import argparse
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint import OutputRefused, atomic_write, clean_leftovers, refuse_overlap
from metrics.clip_score import DEFAULT_CLIP, ClipScorer, summarize
from metrics.fid import density_coverage, feature_stats, frechet_distance
from metrics.inception import InceptionConfig, load_inception, sha256_of
from sample import generate
from sd15 import load_sd15
from sde_solver import NoiseSchedule
from run_folder import lock_out, on_rank_zero
from unet import load_unet


@dataclass(frozen=True)
class Protocol:
    name: str
    split: str            # COCO split: its captions_<split>.json and <split>/ image folder
    samples: int          # captions (= distinct images) evaluated
    caption_choice: str   # "first": the lowest annotation id per image; "seeded": a seeded random caption
    eval_size: int        # square side, in pixels, that both sets are resized to before Inception
    seed: int = 2014      # for "seeded" choices only


PROTOCOLS = {"coco2017-5k": Protocol("coco2017-5k", "val2017", 5000, "first", 512),
             "coco2014-30k": Protocol("coco2014-30k", "val2014", 30000, "seeded", 256)}


# ---- captions and reference images -----------------------------------------------------------------------------

def read_captions(root: Path, protocol: Protocol, limit: int = 0) -> list[dict]:
    """[{image_id, file, caption}] in the protocol's order, checked against the files before any heavy work.
    `limit` > 0 keeps the first `limit` (a quick run; recorded in the results)."""
    ann_file = root / "annotations" / f"captions_{protocol.split}.json"
    if not ann_file.is_file():
        raise FileNotFoundError(f"--coco {root}: no {ann_file.relative_to(root)} there. Pass the COCO root that "
                                f"holds annotations/captions_{protocol.split}.json and {protocol.split}/ (from "
                                f"annotations_trainval{protocol.split[-4:]}.zip and {protocol.split}.zip).")
    data = json.loads(ann_file.read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    by_image: dict[int, list] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    ids = sorted(by_image)
    if protocol.caption_choice == "first":
        chosen = [min(by_image[i], key=lambda a: a["id"]) for i in ids]
    else:
        rng = np.random.default_rng(protocol.seed)
        ids = [ids[j] for j in rng.permutation(len(ids))]
        chosen = [sorted(by_image[i], key=lambda a: a["id"])[rng.integers(len(by_image[i]))] for i in ids]
    n = min(protocol.samples, len(chosen)) if not limit else min(limit, protocol.samples, len(chosen))
    entries = [{"image_id": a["image_id"], "file": files[a["image_id"]], "caption": a["caption"].strip()}
               for a in chosen[:n]]
    missing = [e["file"] for e in entries if not (root / protocol.split / e["file"]).is_file()]
    if missing:
        raise FileNotFoundError(f"--coco {root}: {len(missing)} of the {n} images the captions refer to are missing "
                                f"from {protocol.split}/, e.g. {missing[0]}. Unzip {protocol.split}.zip there.")
    return entries


def load_rgb(path: Path, size: int, crop: bool) -> np.ndarray:
    """uint8 (size, size, 3): optional square centre crop, then a PIL bicubic resize (skipped if already size)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if crop:
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)


@torch.no_grad()
def inception_features(inception, paths, size: int, crop: bool, batch: int = 50) -> torch.Tensor:
    """Features (N, F) float32 of image files through the resize chain (module docstring) and the Inception."""
    device = next(inception.parameters()).device
    out = []
    for i in range(0, len(paths), batch):
        pixels = np.stack([load_rgb(p, size, crop) for p in paths[i:i + batch]])      # (B, S, S, 3) uint8
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)            # (B, 3, S, S) in [0, 1]
        out.append(inception(x.to(device)).float().cpu())
    return torch.cat(out)


def reference_features(root, protocol, entries, inception, inception_sha, cache: Path) -> torch.Tensor:
    """The reference set's features, from `cache` if it was made under the same protocol, sample count and
    Inception weights (else refused), computed and cached otherwise."""
    meta = {"protocol": json.dumps(asdict(protocol)), "samples": str(len(entries)), "inception_sha256": inception_sha,
            "image_ids_sha256": hashlib.sha256(json.dumps([e["image_id"] for e in entries]).encode()).hexdigest()}
    if cache.is_file():
        with safe_open(str(cache), framework="pt") as f:
            found = f.metadata() or {}
            if any(found.get(k) != v for k, v in meta.items()):
                diff = [k for k, v in meta.items() if found.get(k) != v]
                raise ValueError(f"{cache}: reference statistics made under another setting ({', '.join(diff)} "
                                 f"differ: cache has protocol {found.get('protocol')}, {found.get('samples')} "
                                 f"samples). Delete it or pass another --ref-cache.")
            return f.get_tensor("features")
    paths = [root / protocol.split / e["file"] for e in entries]
    feats = inception_features(inception, paths, protocol.eval_size, crop=True)
    for note in clean_leftovers(cache.parent, cache.name):
        print(note, flush=True)
    atomic_write(cache, lambda tmp: save_file({"features": feats.contiguous()}, str(tmp), metadata=meta))
    return feats


# ---- generation -----------------------------------------------------------------------------------------------

def generate_batch(bundle, unet, schedule, captions, steps, guidance, size, seed, teacher_eta):
    """The one call into sample.generate: images (B, 3, H, W) in [0, 1], image i drawn from seed + i."""
    images, _ = generate(bundle, unet, schedule, captions, steps, guidance, size, size, seed=seed, n=1,
                         teacher_eta=teacher_eta)
    return images


def write_png(images: torch.Tensor, paths) -> None:
    """[0, 1] images -> lossless 8-bit PNGs, each written atomically (a killed run leaves no half file)."""
    pixels = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    for p, im in zip(paths, pixels):
        atomic_write(p, lambda tmp, im=im: Image.fromarray(im).save(tmp, format="PNG"))


def contiguous_runs(indices: list[int], batch: int) -> list[list[int]]:
    """Sorted indices -> runs of consecutive indices of at most `batch`: each run is one generate call whose
    seed is its first index, so image i is always drawn from seed + i, however a resumed run is batched."""
    runs = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < batch:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def generate_missing(folder: Path, entries, my_slice: range, make_images, batch: int, stop_after: int = 0) -> int:
    """Generate the PNGs of `my_slice` that are not in `folder` yet; returns how many were written. Prints a
    progress line with an ETA. `stop_after` > 0 stops after that many images (a deterministic interruption)."""
    todo = [i for i in my_slice if not (folder / f"{i:06d}.png").is_file()]
    print(f"{folder.name}: {len(my_slice) - len(todo)}/{len(my_slice)} images already there, {len(todo)} to make",
          flush=True)
    written, t0 = 0, time.time()
    for run in contiguous_runs(todo, batch):
        if stop_after and written >= stop_after:
            print(f"stopping after {written} images (--stop-after)", flush=True)
            break
        images = make_images([entries[i]["caption"] for i in run], run[0])
        write_png(images, [folder / f"{i:06d}.png" for i in run])
        written += len(run)
        rate = written / (time.time() - t0)
        print(f"  {written}/{len(todo)} | {rate:.2f} img/s | ETA {(len(todo) - written) / rate / 60:.1f} min",
              flush=True)
    return written


# ---- one setting: generate, then score ------------------------------------------------------------------------

def weight_checksums(paths) -> dict:
    """{file: sha256} of every weight file under the given files/folders (safetensors, bin, pth, ckpt)."""
    out = {}
    for p in map(Path, paths):
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in
                                               (".safetensors", ".bin", ".pth", ".ckpt", ".pt"))
        out.update({str(f): sha256_of(f) for f in files})
    return out


def score_setting(folder: Path, entries, reference, inception, clip: ClipScorer, protocol, coverage: bool) -> dict:
    """FID, CLIP score (and density/coverage) of a complete image folder."""
    paths = [folder / f"{i:06d}.png" for i in range(len(entries))]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} images missing (e.g. {missing[0]}); run again to finish.")
    fake = inception_features(inception, paths, protocol.eval_size, crop=False)
    scores = {"fid": frechet_distance(feature_stats(fake), feature_stats(reference))}
    cos = []
    for i in range(0, len(paths), 32):
        images = [np.asarray(Image.open(p).convert("RGB")) for p in paths[i:i + 32]]
        cos.append(clip.cosines(images, [e["caption"] for e in entries[i:i + 32]]))
    scores.update(summarize(torch.cat(cos)))
    if coverage:
        scores.update(density_coverage(reference, fake))
    return scores


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def table(rows: list[dict]) -> str:
    """Markdown table of the result rows."""
    lines = ["| setting | protocol | n | ω | FID | CLIP cos | CLIP score |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['protocol']['name']} | {r['samples']} | {r['guidance']} | "
                     f"{r['fid']:.3f} | {r['clip_cosine']:.4f} | {r['clip_score']:.2f} |")
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--coco", required=True, help="COCO root: annotations/captions_<split>.json and <split>/ images")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="coco2017-5k", help="see below")
    p.add_argument("--model", required=True, help="SD1.5 diffusers folder or single file (load_sd15)")
    p.add_argument("--tokenizer", default="", help="tokenizer folder, needed with a single-file --model")
    p.add_argument("--student", default="", help="distilled student UNet folder")
    p.add_argument("--teacher", action="store_true", help="evaluate the teacher (DDIM / DDPM with --eta)")
    p.add_argument("--eta", type=float, default=0.0, help="teacher sampler noise: 0 = DDIM, 1 = DDPM")
    p.add_argument("--steps", type=int, nargs="+", required=True, help="step counts, one setting each")
    p.add_argument("--guidance", type=float, default=7.5, help="ω, classifier-free guidance scale")
    p.add_argument("--inception", required=True, help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid's)")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="HF CLIP folder or cached hub id (default %(default)s)")
    p.add_argument("--clip-prefix", default="", help='text put before every caption for CLIP, e.g. "A photo of "')
    p.add_argument("--out", default="runs/eval", help="images, caches and results go here")
    p.add_argument("--ref-cache", default="", help="reference features file (default OUT/reference-PROTOCOL...)")
    p.add_argument("--batch", type=int, default=16, help="images per generate call (per rank)")
    p.add_argument("--seed", type=int, default=0, help="caption i is drawn from seed + i")
    p.add_argument("--limit", type=int, default=0, help="first N captions only (a quick look; not the protocol)")
    p.add_argument("--coverage", action="store_true", help="also density and coverage (Naeem et al. 2020)")
    p.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: interrupt after N images
    p.add_argument("--inception-width-divisor", type=int, default=1, help=argparse.SUPPRESS)  # tests: a narrow net
    args = p.parse_args(argv)
    if args.student and args.teacher or not (args.student or args.teacher):
        p.error("pass exactly one of --student FOLDER or --teacher")
    if not args.teacher and any(not 1 <= s <= 8 for s in args.steps):
        p.error(f"--steps {args.steps}: a consistency student samples in 1–8 steps")
    for flag, path in (("--coco", args.coco), ("--model", args.model), ("--inception", args.inception),
                       ("--student", args.student)):
        if path and not Path(path).exists():
            p.error(f"{flag} {path}: no such file or folder")
    try:
        refuse_overlap(args.out, {"--coco": args.coco, "--model": args.model, "--student": args.student,
                                  "--inception": args.inception, "--tokenizer": args.tokenizer,
                                  "--clip": args.clip if Path(args.clip).exists() else ""})
    except OutputRefused as e:
        p.error(str(e))
    return args


def claim_out(out: Path) -> None:
    """Rank 0, before any work: create --out, lock it for this run (run_folder.lock_out: a second evaluation into
    it refuses at once), and clean what a killed run left in it and its setting folders."""
    out.mkdir(parents=True, exist_ok=True)
    lock_out(out, "evaluate.py --coco")
    for folder in [out, *sorted(p for p in (out / "images").glob("*") if p.is_dir())]:
        for note in clean_leftovers(folder):
            print(note, flush=True)


def _distributed():
    """(rank, world size, device): torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return int(os.environ.get("RANK", "0")), world, device


def setting_folder(out: Path, args, steps: int, record: dict) -> Path:
    """images/<setting>/, created with its setting.json; an existing folder made with other settings is refused."""
    name = (f"teacher-eta{args.eta:g}" if args.teacher else "student") + f"-{steps}steps-w{args.guidance:g}"
    folder = out / "images" / name
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "setting.json"
    if meta.is_file() and json.loads(meta.read_text()) != record:
        raise ValueError(f"{meta}: these images were made with other settings ({meta.read_text()[:300]}); "
                         f"pass another --out or delete {folder}.")
    if not meta.is_file():
        atomic_write(meta, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
    return folder


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    protocol, root, out = PROTOCOLS[args.protocol], Path(args.coco), Path(args.out)
    entries = read_captions(root, protocol, args.limit)               # every input check before heavy work
    rank, world, device = _distributed()
    on_rank_zero(claim_out, out)  # a refusal ends every rank with the same message
    inception = load_inception(args.inception, device, InceptionConfig(width_divisor=args.inception_width_divisor))
    clip = ClipScorer(args.clip, device, args.clip_prefix) if rank == 0 else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bundle = load_sd15(args.model, tokenizer=args.tokenizer or None, device=device, dtype=dtype)
    unet = bundle.unet if args.teacher else load_unet(args.student, device, dtype).eval()
    schedule = NoiseSchedule(bundle.alphas_cumprod.to(device))
    size = bundle.unet.config.sample_size * bundle.vae.spatial_factor
    checksums = weight_checksums([args.model] + ([args.student] if args.student else []))
    out.mkdir(parents=True, exist_ok=True)
    per_rank = -(-len(entries) // world)
    my_slice = range(rank * per_rank, min(len(entries), (rank + 1) * per_rank))
    rows = []
    for steps in args.steps:
        record = {"protocol": asdict(protocol), "samples": len(entries), "limit": args.limit, "steps": steps,
                  "guidance": args.guidance, "teacher": args.teacher, "eta": args.eta if args.teacher else None,
                  "seed": args.seed, "resolution": size, "model": str(args.model), "student": str(args.student),
                  "weights_sha256": checksums}
        folder = setting_folder(out, args, steps, record)
        eta = args.eta if args.teacher else None

        def make(captions, first):
            with torch.no_grad():
                return generate_batch(bundle, unet, schedule, captions, steps, args.guidance, size, args.seed + first,
                                      eta)
        t0 = time.time()
        generate_missing(folder, entries, my_slice, make, args.batch, args.stop_after)
        if world > 1:
            torch.distributed.barrier()
        if args.stop_after or rank != 0:
            continue
        ref_cache = Path(args.ref_cache) if args.ref_cache else out / f"reference-{protocol.name}-{len(entries)}.safetensors"
        reference = reference_features(root, protocol, entries, inception, sha256_of(args.inception), ref_cache)
        scores = score_setting(folder, entries, reference, inception, clip, protocol, args.coverage)
        rows.append({"setting": folder.name, **record, **scores, "clip_model": args.clip,
                     "clip_prefix": args.clip_prefix, "inception_sha256": sha256_of(args.inception),
                     "versions": versions(), "seconds": time.time() - t0})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    if rank == 0 and rows:
        atomic_write(out / "results.json", lambda tmp: tmp.write_text(json.dumps(rows, indent=1)))
        atomic_write(out / "results.md", lambda tmp: tmp.write_text(table(rows) + "\n"))
        print(table(rows))
    if world > 1:
        torch.distributed.destroy_process_group()
    return rows
