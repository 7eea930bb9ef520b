"""Toy-world metrics: prompt-following accuracy, a Fréchet distance and coverage / density, from a small classifier.

The toy world (toyworld/toy.py) knows the truth of every image it makes, so a small CNN trained on its generator can read a
generated image's shape, colour, pattern and position back, and its penultimate features give a feature space in
which to compare distributions (an FID with this classifier in place of Inception):
  - prompt accuracy: per attribute, the fraction of images whose predicted value matches the prompt, over the prompts
    that name it; "all": the fraction whose every named attribute is right (a prompt that names none always is);
  - Fréchet distance (FD): ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½) between Gaussians fitted to the features of the
    generated images and of fresh synthetic images of the same prompts (Heusel et al. 2017, eq. 6). It drops when
    samples match the data in quality *and diversity*;
  - coverage and density (Naeem et al. 2020, eqs. 3–4), from k-nearest-neighbour balls around the real features:
    coverage is the fraction of real images with a generated image inside their ball, so a sampler that drops modes
    (the diversity SCott claims over LCM) loses it; density counts how many balls each generated image falls into
    (≈ 1 for samples distributed like the data, less for samples off the data, more for samples crowding its modes).
    They are measured on OPEN_PROMPTS, the captions that leave three or all four attributes open, many samples
    each: there a sampler must choose among many modes per caption. (Over all 480 captions once each, the fully named
    ones alone span every mode, so a sampler that fills open attributes always the same way keeps full coverage.)

    python evaluate.py train-classifier                       # ~2 min on CPU -> toy/classifier.safetensors
    python evaluate.py --model toy/ --teacher-steps 50 --sampler ddim               # the teacher's row
    python evaluate.py --model toy/ --student toy/student --steps 1 2 4              # the student's rows
    python -m toyworld.study                       # the README's table: distils under each setting, scores with this file
"""
import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from metrics import coco
from metrics import fid
from checkpoint import OutputRefused, atomic_write, refuse_overlap
from sample import generate  # the project's sampler: teacher DDIM/DDPM + CFG, or a student's consistency steps
from sd15 import TOY_FOLDER, load_sd15
from sde_solver import NoiseSchedule
from toyworld.toy import (ATTRIBUTES, OPEN, VALUES, all_prompts, fill_open, labels_to_prompts, make_toy_batch, parse_prompt,
                 prompts_to_labels, render)
from unet import load_unet

CLASSIFIER_PATH = TOY_FOLDER / "classifier.safetensors"
REFERENCE_SEED = 1234567  # the fresh synthetic images are drawn from a seed no trainer uses (they use 0, 1, ...)
COVERAGE_K = 5  # the k of coverage and density's k-NN balls (Naeem et al. 2020 use 5)
OPEN_PROMPTS = [p for p in all_prompts() if sum(a is not None for a in parse_prompt(p)) <= 1]  # 16: "a shape", ...
OPEN_SAMPLES = 30  # samples per open prompt: 480 in all


@dataclass
class ClassifierConfig:
    width: int = 16          # channels of the first stage; doubled at each of the three downsamplings
    features: int = 128      # penultimate feature size: the Fréchet distance's space
    resolution: int = 32
    steps: int = 800         # training steps on fresh generator batches (100 % held-out accuracy)
    batch_size: int = 128
    lr: float = 2e-3
    max_noise: float = 0.1   # training images get Gaussian noise of a random std in [0, max_noise]
    seed: int = 0


class ToyClassifier(nn.Module):
    """A small CNN: three stride-2 stages to 4×4, flattened (not pooled, so position survives), a 128-d feature
    layer, and one linear head per attribute."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        w = cfg.width

        def stage(c_in, c_out):  # one resolution level: a stride-2 conv then a conv, each GroupNorm + GELU
            return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.GELU(),
                    nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.GELU()]
        self.body = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.GELU(),
                                  *stage(w, 2 * w), *stage(2 * w, 4 * w), *stage(4 * w, 8 * w))
        side = cfg.resolution // 8
        self.to_features = nn.Linear(8 * w * side * side, cfg.features)
        self.heads = nn.ModuleDict({a: nn.Linear(cfg.features, len(v)) for a, v in zip(ATTRIBUTES, VALUES)})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> penultimate features (B, features)."""
        if images.ndim != 4 or images.shape[1:] != (3, self.config.resolution, self.config.resolution):
            raise ValueError(f"the toy classifier takes images (B, 3, {self.config.resolution}, "
                             f"{self.config.resolution}) in [-1, 1], got shape {tuple(images.shape)}.")
        return F.gelu(self.to_features(self.body(images).flatten(1)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images -> logits per attribute: {"shape": (B, 3), "colour": (B, 4), "pattern": (B, 3), "position": (B, 5)}."""
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}


# ---- training and storage --------------------------------------------------------------------------------------

def train_classifier(cfg: ClassifierConfig, log_every: int = 100) -> ToyClassifier:
    """Cross-entropy on every attribute head, fresh generator batches every step (no epochs, no overfitting), AdamW with
    cosine decay. Mild noise augmentation makes the classifier read shapes, not pixel-perfect renderings, so it
    scores a slightly grainy sample by what it shows."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model = ToyClassifier(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        batch = make_toy_batch(cfg.batch_size, generator, cfg.resolution)
        noise_std = torch.rand(cfg.batch_size, 1, 1, 1, generator=generator) * cfg.max_noise
        images = batch["image"] + noise_std * torch.randn(batch["image"].shape, generator=generator)
        logits = model(images)
        loss = sum(F.cross_entropy(logits[a], batch["labels"][:, i]) for i, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == cfg.steps:
            print(f"step {step}/{cfg.steps} | loss {loss.item():.4f} | {step / (time.time() - t0):.1f} it/s",
                  flush=True)
    return model.eval().requires_grad_(False)


def save_classifier(model: ToyClassifier, path) -> None:
    """Weights as safetensors in float16 (half the bytes in the repository; loaded back as float32), the config in
    the file's metadata (one small file, nothing else to keep in sync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata={"config": json.dumps(asdict(model.config))}))


def load_classifier(path=CLASSIFIER_PATH) -> ToyClassifier:
    """The classifier saved by save_classifier (default: the shipped toy/classifier.safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no toy classifier there. Train one with `python evaluate.py "
                                f"train-classifier --out {path}` (about two minutes on a CPU).")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: has no 'config' metadata, so it was not written by evaluate.save_classifier; "
                         f"retrain with `python evaluate.py train-classifier --out {path}`.")
    model = ToyClassifier(ClassifierConfig(**json.loads(meta["config"])))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return model.eval().requires_grad_(False)


# ---- metrics --------------------------------------------------------------------------------------------------

@torch.no_grad()
def _run(classifier: ToyClassifier, images: torch.Tensor, batch_size: int = 256):
    """(features (N, F) float64, predicted labels (N, 4)), on the CPU, over images in chunks. Images are clamped to
    [-1, 1] first: they are scored as they would be saved."""
    device = next(classifier.parameters()).device
    feats, preds = [], []
    for chunk in images.float().clamp(-1, 1).split(batch_size):
        h = classifier.features(chunk.to(device))
        feats.append(h.double().cpu())
        preds.append(torch.stack([classifier.heads[a](h).argmax(-1) for a in ATTRIBUTES], dim=1).cpu())
    return torch.cat(feats), torch.cat(preds)


def prompt_accuracy(images: torch.Tensor, prompts: list[str], classifier: ToyClassifier | None = None) -> dict:
    """How often the image shows what its prompt asks for: {acc_shape, acc_colour, acc_pattern, acc_position,
    acc_all} in [0, 1], each attribute over the prompts that name it (nan if none does), "all" over every image.
    images (N, 3, 32, 32) in [-1, 1]; prompts: N toy captions ("a striped red circle on the left", "a shape")."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"prompt_accuracy: {images.shape[0]} images but {len(prompts)} prompts; pass one each.")
    classifier = classifier or load_classifier()
    _, predicted = _run(classifier, images)
    asked = prompts_to_labels(prompts)                                 # (N, 4), OPEN where the prompt names nothing
    named = asked != OPEN
    correct = (predicted == asked) | ~named                            # an open attribute is never wrong
    scores = {f"acc_{a}": correct[named[:, i], i].float().mean().item() for i, a in enumerate(ATTRIBUTES)}
    scores["acc_all"] = correct.all(dim=1).float().mean().item()
    return scores


def frechet_distance(images: torch.Tensor, reference_images: torch.Tensor,
                     classifier: ToyClassifier | None = None) -> float:
    """Fréchet distance between two image sets (N, 3, 32, 32) in [-1, 1], in the classifier's penultimate features."""
    classifier = classifier or load_classifier()
    return features_frechet(_run(classifier, images)[0], _run(classifier, reference_images)[0])


def features_frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F) (metrics/fid.py's, as for FID)."""
    return fid.frechet_distance(fid.feature_stats(a), fid.feature_stats(b))


def reference_images(prompts: list[str], n_reference: int, seed: int = REFERENCE_SEED,
                     resolution: int = 32) -> torch.Tensor:
    """Fresh synthetic images (n_reference, 3, H, W) of the given prompts, cycled, each attribute a prompt leaves open
    drawn at random: the data distribution that a model sampled on `prompts` should match."""
    labels = prompts_to_labels(prompts)[torch.arange(n_reference) % len(prompts)]
    generator = torch.Generator().manual_seed(seed)
    return render(fill_open(labels, generator), generator, resolution)


def evaluate_samples(images: torch.Tensor, prompts: list[str], n_reference: int | None = None,
                     classifier: ToyClassifier | None = None) -> dict:
    """All toy metrics of generated images (N, 3, 32, 32) in [-1, 1] made for `prompts`: {acc_shape, acc_colour,
    acc_pattern, acc_position, acc_all, fd, coverage, density}, FD, coverage and density against `n_reference`
    (default N) fresh synthetic images of the same prompts."""
    classifier = classifier or load_classifier()
    reference = reference_images(prompts, n_reference or len(prompts), resolution=classifier.config.resolution)
    fake, real = _run(classifier, images)[0], _run(classifier, reference)[0]
    return {**prompt_accuracy(images, prompts, classifier), "fd": features_frechet(fake, real),
            **fid.density_coverage(real, fake, COVERAGE_K)}


# ---- command line -----------------------------------------------------------------------------------------------

TABLE_HEADER = ("| model | shape | colour | pattern | position | all | FD | coverage | density | seconds |\n"
                "|---|---|---|---|---|---|---|---|---|---|")


def _print_row(name: str, scores: dict, seconds: float) -> None:
    accuracies = " | ".join(f"{scores[f'acc_{a}']:.3f}" for a in (*ATTRIBUTES, "all"))
    print(f"| {name:<28} | {accuracies} | {scores['fd']:8.3f} | {scores['coverage']:.3f} | {scores['density']:.3f} | "
          f"{seconds:7.1f} |", flush=True)


def evaluate_models(model, student=None, steps=(1, 2, 4), teacher_steps=None, sampler="ddim", guidance=3.0,
                    n_per_prompt=1, seed=0, device="cpu") -> list[dict]:
    """Sample every toy prompt `n_per_prompt` times, and each of OPEN_PROMPTS OPEN_SAMPLES times, with the teacher
    and/or a student and score them: accuracy and FD on the first set, coverage and density on the second. Prints a
    markdown table and returns its rows [{"name", "steps", "scores"}] (steps None for the data's own row, fresh
    synthetic images, which comes first: the best any model can do at these sample sizes). A student samples with the
    boundary scalings its config records (sample.generate reads them)."""
    classifier = load_classifier()
    bundle = load_sd15(model, device=device)
    schedule = NoiseSchedule(bundle.alphas_cumprod.to(device))
    size = classifier.config.resolution
    sets = ([p for p in all_prompts() for _ in range(n_per_prompt)],
            [p for p in OPEN_PROMPTS for _ in range(OPEN_SAMPLES)])

    def scores_of(make_images) -> dict:
        """Accuracy and FD of the images made for the first set, coverage and density of those for the second."""
        every_caption = make_images(sets[0], 0)
        open_captions = make_images(sets[1], len(sets[0]))  # image i from seed + i: no overlap between the sets
        diversity = evaluate_samples(open_captions, sets[1], classifier=classifier)
        scores = evaluate_samples(every_caption, sets[0], classifier=classifier)
        return {**scores, "coverage": diversity["coverage"], "density": diversity["density"]}

    print(TABLE_HEADER)
    data = scores_of(lambda prompts, first: reference_images(prompts, len(prompts), seed + 1 + first, size))
    rows = [{"name": "data (fresh synthetic)", "steps": None, "scores": data}]
    _print_row(rows[0]["name"], data, 0.0)
    jobs = []
    if teacher_steps:
        eta = {"ddim": 0.0, "ddpm": 1.0}[sampler]
        jobs += [(f"teacher {sampler} {n} steps ω={guidance}", bundle.unet, n, eta) for n in teacher_steps]
    if student:
        unet = load_unet(student, device).eval()
        jobs += [(f"student {n} step(s) ω={guidance}", unet, n, None) for n in steps]
    for name, unet, n, eta in jobs:
        t0 = time.time()
        sample = lambda prompts, first: sample_images(bundle, unet, schedule, prompts, n, guidance, size,  # noqa: E731
                                                      seed + first, eta)
        rows.append({"name": name, "steps": n, "scores": scores_of(sample)})
        _print_row(name, rows[-1]["scores"], time.time() - t0)
    return rows


@torch.no_grad()
def sample_images(bundle, unet, schedule, prompts, steps, guidance, size, seed, teacher_eta, chunk=64) -> torch.Tensor:
    """sample.generate's images for `prompts` in [-1, 1], image i from seed + i, in chunks of `chunk` prompts
    (faster on a CPU than one large batch; the same images, since each image's noise is its own)."""
    images = [generate(bundle, unet, schedule, prompts[i:i + chunk], steps, guidance, size, size, seed=seed + i,
                       teacher_eta=teacher_eta)[0] for i in range(0, len(prompts), chunk)]
    return torch.cat(images) * 2 - 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--coco" in argv:  # SD1.5 on MS-COCO: FID and CLIP score (metrics/coco.py)
        return coco.main(argv)
    if argv[:1] == ["train-classifier"]:
        p = argparse.ArgumentParser(prog="evaluate.py train-classifier", description="train the toy classifier")
        for name, value in asdict(ClassifierConfig()).items():
            p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
        p.add_argument("--out", default=str(CLASSIFIER_PATH))
        args = vars(p.parse_args(argv[1:]))
        out = args.pop("out")
        model = train_classifier(ClassifierConfig(**args))
        save_classifier(model, out)
        batch = make_toy_batch(2000, torch.Generator().manual_seed(REFERENCE_SEED))
        every_attribute = labels_to_prompts(batch["labels"])  # the full truth, not the partial captions
        print(f"held-out accuracy: {prompt_accuracy(batch['image'], every_attribute, model)}")
        print(f"wrote {out}")
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="SD1.5 on MS-COCO (FID, CLIP score): python evaluate.py --coco ROOT --help")
    p.add_argument("--model", default=str(TOY_FOLDER), help="the toy model folder (teacher, text encoder)")
    p.add_argument("--student", default="", help="a distilled student UNet folder to score")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="student step counts")
    p.add_argument("--teacher-steps", type=int, nargs="*", default=[], help="teacher step counts, e.g. 50")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="teacher sampler")
    p.add_argument("--guidance", type=float, default=3.0, help="ω, classifier-free guidance scale")
    p.add_argument("--n-per-prompt", type=int, default=8, help="samples per toy prompt (480 prompts)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first sample; sample i uses seed + i (default 0)")
    p.add_argument("--json", default="", help='also write the rows here as JSON ([{"name", "steps", "scores"}, ...])')
    args = p.parse_args(argv)
    if not args.student and not args.teacher_steps:
        p.error("nothing to evaluate: pass --teacher-steps N and/or --student FOLDER")
    try:
        if args.json:
            refuse_overlap(args.json, {"--model": args.model, "--student": args.student}, "--json")
    except OutputRefused as e:
        p.error(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = evaluate_models(args.model, args.student or None, args.steps, args.teacher_steps, args.sampler,
                           args.guidance, args.n_per_prompt, args.seed, device)
    if args.json:
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(rows, indent=1)))


if __name__ == "__main__":
    main()
