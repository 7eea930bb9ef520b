"""Export a distilled SCott student to where SD1.5 users run models: diffusers, A1111 and ComfyUI.

    python export.py --model PATH/sd15 --student runs/scott/step-N/student --to pipeline --out scott-pipeline
    python export.py --model PATH/sd15 --student runs/scott/step-N/student --to single-file --guidance 7.5 \\
        --out scott-w7.5.safetensors
    python export.py --model PATH/sd15 --student runs/scott/step-N/student --to diffusers-unet --guidance 7.5 \\
        --out scott-unet-w7.5
    python export.py --to single-file --guidance 3 --out toy.safetensors       # the shipped toy model, no download
    python export.py --model PATH/sd15 --lora runs/scott-lora/step-N --to lora --out scott-lora.safetensors

Targets:
  pipeline        a complete diffusers LatentConsistencyModelPipeline folder: the student keeps its ω input
                  (`guidance_scale` at sampling time), with the model's VAE, text encoder and tokenizer, and an
                  LCMScheduler whose timesteps are our sampler's (consistency.consistency_timesteps).
  single-file     one original-layout checkpoint (UNet + VAE + text encoder, the keys A1111 and ComfyUI read), with
                  ω baked into a plain SD1.5 UNet (unet.bake_guidance: exact) and the sampler to use in its metadata.
  diffusers-unet  the baked UNet alone as a plain diffusers UNet2DConditionModel folder.
  lora            a LoRA student (--lora: the adapters.safetensors of a run, or its folder) as one kohya-format
                  LoRA file for the --model it was distilled from, which A1111, ComfyUI and diffusers'
                  load_lora_weights apply to that model or to its fine-tunes (no ω input: sample with CFG 1).
Every output is written under a temporary name and renamed into place, so `--out` is either absent, the old
output (with --overwrite) or the whole new one, never half written; what a killed export left is cleaned up by the
next one (checkpoint.clean_leftovers). `--out` may never be, hold or lie inside an input (--model, --student,
--lora, --tokenizer), and --overwrite replaces only an earlier output of export.py of the same --to: it carries the
marker written here (EXPORT_MARKER in a single file's header, "_scott_export" in a folder's model_index.json or
config.json).
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint import (LDM_TEXT_PREFIX, LDM_UNET_PREFIX, LDM_VAE_PREFIX, SCOTT_CONFIG, CheckpointError, OutputRefused,
                        atomic_write, clean_leftovers, refuse_overlap, temporary_name)
from config import model_settings
from consistency import consistency_timesteps
from lora import ADAPTERS_FILE, load_adapters, save_kohya
from sd15 import SD15, ldm_text_state_dict, load_sd15, model_path
from sde_solver import NoiseSchedule
from unet import STUDENT_KEYS, UNet, bake_guidance, ldm_unet_state_dict, load_unet, save_unet
from vae import IdentityVAE, ldm_vae_state_dict, save_vae

TARGETS = ("pipeline", "single-file", "diffusers-unet", "lora")
LDM_PREFIXES = (LDM_UNET_PREFIX, LDM_VAE_PREFIX, LDM_TEXT_PREFIX)  # the parts of a single file: UNet, VAE, text
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LCM_SIGMA_DATA = 0.5  # diffusers' LCMScheduler (and ComfyUI's LCM sampling) fix σ_data of the boundary scalings
LCM_ORIGINAL_STEPS = 50  # LCM's distillation grid (consistency_timesteps' default): 999, 979, ..., 19
EXPORT_MARKER = "scott.export"  # a single file's header entry naming the --to that wrote it (--overwrite's proof)
FOLDER_MARKER = "_scott_export"  # the same in a folder's model_index.json / config.json (diffusers skips "_" keys)


class ExportError(ValueError):
    """A bad command line or input; the message names the flag or file and says what to do."""


# ---- inputs -------------------------------------------------------------------------------------------------------

def load_student(path) -> UNet:
    """The student UNet of `--student`, refused (ExportError) if it has no ω input."""
    path = Path(path)
    if (path / "student").is_dir() and not (path / "config.json").exists():
        raise ExportError(f"--student {path}: a checkpoint folder, not a UNet; did you mean {path / 'student'}?")
    student = load_unet(path)
    if not student.config.guidance_embed_dim:
        raise ExportError(f"--student {path}: this UNet has no guidance (ω) input (no time_cond_proj_dim), so it is "
                          f"not a distilled student. Pass the student/ folder train.py writes "
                          f"(runs/scott/step-N/student).")
    return student


def check_same_architecture(student: UNet, teacher: UNet, student_path, model_path) -> None:
    """The student must be the --model's UNet plus the ω projection: same weight names and shapes otherwise
    (its VAE and text encoder are the model's, so a student of another model would get the wrong ones)."""
    ours = {k: tuple(v.shape) for k, v in student.state_dict().items() if not k.startswith("time_embedding.cond_")}
    theirs = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    if ours != theirs:
        key = next((k for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k)))
        raise ExportError(f"--student {student_path} and --model {model_path} are different architectures (first "
                          f"difference: {key}: student {ours.get(key, 'absent')}, model {theirs.get(key, 'absent')}). "
                          f"Export a student together with the model it was distilled from (train.py --model).")


def check_out(out: Path, overwrite: bool, to: str, inputs: dict) -> None:
    """Before anything is loaded: refuse an --out that is, holds or lies inside an input (whatever --overwrite
    says); clean up what an interrupted export of it left; refuse an existing --out unless --overwrite, and with
    --overwrite anything but an earlier export of the same --to. Its parent folder must exist."""
    refuse_overlap(out, inputs)
    for note in clean_leftovers(out.parent, out.name):
        print(note)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(f"--out {out}: already exists. Choose another path, or pass --overwrite to replace it.")
    if (out.exists() or out.is_symlink()) and not is_earlier_export(out, to):
        raise OutputRefused(f"--out {out}: --overwrite replaces only an earlier output of export.py --to {to}, and "
                            f"this is not one (no {EXPORT_MARKER if to in ('single-file', 'lora') else FOLDER_MARKER}"
                            f" marker): it would have deleted {describe(out)}. Remove it yourself if it is no longer "
                            f"needed, or choose another --out.")
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: its folder {out.parent} does not exist; create it first.")


def is_earlier_export(out: Path, to: str) -> bool:
    """Whether `out` was written by export.py --to `to`: a single file whose header names it (or, written before
    the marker, has the scott.* sampler entries), a folder whose model_index.json / config.json does."""
    if to in ("single-file", "lora"):
        if not out.is_file() or out.is_symlink():
            return False
        try:
            with safe_open(str(out), framework="pt") as f:
                header = f.metadata() or {}
        except Exception:  # not a safetensors file at all
            return False
        return header.get(EXPORT_MARKER, to if "scott.sampler" in header else None) == to
    index = out / ("model_index.json" if to == "pipeline" else "config.json")
    try:
        return out.is_dir() and not out.is_symlink() and json.loads(index.read_text()).get(FOLDER_MARKER) == to
    except (OSError, ValueError, AttributeError):
        return False


def describe(path: Path) -> str:
    """What deleting `path` would lose, in words: a file and its size, or a folder and (some of) its files."""
    if not path.is_dir() or path.is_symlink():
        return f"the file {path} ({path.lstat().st_size / 1e6:.1f} MB)"
    files = sorted(str(f.relative_to(path)) for f in path.rglob("*") if not f.is_dir())
    shown = ", ".join(files[:5]) + (f", ... ({len(files)} files in all)" if len(files) > 5 else "")
    return f"the folder {path} and everything in it ({shown or 'empty'})"


# ---- the LCM sampler as other programs configure it ---------------------------------------------------------------

def lcm_scheduler_config(alphas_cumprod: torch.Tensor, timestep_scaling: float) -> dict:
    """scheduler_config.json of diffusers' LCMScheduler that samples like consistency.sample_consistency on LCM's
    grid: set_timesteps(N) gives consistency_timesteps(N) (original_inference_steps 50, "leading" spacing) and
    step() re-noises x̂0 to the next timestep with the same ᾱ. SD1.5's scaled-linear betas are written as such;
    any other noise schedule as its betas β_t = 1 − ᾱ_t / ᾱ_{t−1} (trained_betas)."""
    config = {"_class_name": "LCMScheduler", "_diffusers_version": "0.30.0", "num_train_timesteps": len(
        alphas_cumprod), "original_inference_steps": LCM_ORIGINAL_STEPS, "timestep_spacing": "leading",
        "steps_offset": 1, "prediction_type": "epsilon", "timestep_scaling": float(timestep_scaling),
        "clip_sample": False, "set_alpha_to_one": True, "thresholding": False, "rescale_betas_zero_snr": False}
    sd15 = NoiseSchedule.sd15().alphas_cumprod
    if alphas_cumprod.shape == sd15.shape and torch.allclose(alphas_cumprod.double(), sd15, rtol=1e-6, atol=0):
        return {**config, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "trained_betas": None}
    a = alphas_cumprod.double()
    betas = 1 - a / torch.cat([a.new_ones(1), a[:-1]])
    return {**config, "beta_schedule": "linear", "trained_betas": betas.tolist()}


def sampler_settings(steps: int, student: UNet, baked_guidance: float | None) -> dict:
    """What to pick in each program to sample an export as our sampler does (stored in a single file's metadata).
    With ω baked in (baked_guidance), CFG must be 1: a CFG pass would apply guidance a second time."""
    timesteps = consistency_timesteps(steps, LCM_ORIGINAL_STEPS).tolist()
    settings = {"scott.sampler": "LCM", "scott.steps": str(steps), "scott.timesteps": json.dumps(timesteps),
                "scott.timestep_scaling": str(student.config.timestep_scaling),
                "scott.sigma_data": str(student.config.sigma_data)}
    if baked_guidance is None:
        return settings | {"scott.diffusers": f"LatentConsistencyModelPipeline: num_inference_steps={steps}, "
                                              f"guidance_scale=ω of your choice (ω is the UNet's input)"}
    return settings | {
        "scott.guidance_baked": str(baked_guidance), "scott.cfg_scale": "1",
        "scott.a1111": f"Sampling method LCM, Schedule type SGM Uniform, Sampling steps {steps}, CFG Scale 1",
        "scott.comfyui": f"Load Checkpoint -> (optional) ModelSamplingDiscrete sampling=lcm -> KSampler sampler_name "
                         f"lcm, scheduler sgm_uniform, steps {steps}, cfg 1.0, denoise 1.0",
        "scott.diffusers": f"LCMScheduler, num_inference_steps={steps}, no CFG (guidance_scale 1 / a plain UNet)"}


# ---- writers ------------------------------------------------------------------------------------------------------

def write_folder_atomically(out: Path, write) -> None:
    """write(tmp_folder), then rename it to `out` (an existing `out`, allowed by --overwrite, is moved aside first
    and deleted only once the new one is in place). On any failure the temporary folder is removed."""
    tmp, old = temporary_name(out, "tmp"), temporary_name(out, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        if out.exists() or out.is_symlink():
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old.exists() or old.is_symlink():
                os.replace(old, out)  # the old output stays until a new one is complete
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def move_student_keys(folder: Path) -> None:
    """Move a student's own config keys (unet.STUDENT_KEYS: its boundary scalings and ω convention) from
    folder/config.json to folder/scott.json, which diffusers does not read (it warns about unknown keys) and
    checkpoint.read_config merges back in."""
    config = json.loads((folder / "config.json").read_text())
    ours = {k: config.pop(k) for k in STUDENT_KEYS if k in config}
    atomic_write(folder / SCOTT_CONFIG, lambda tmp: tmp.write_text(json.dumps(ours, indent=2)))
    atomic_write(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))


def write_text_encoder(text_encoder, folder: Path) -> None:
    """config.json + model.safetensors with transformers-4 key names (`text_model....`), which transformers 4 and 5
    both load (sd15.load_text_encoder reads either)."""
    folder.mkdir()
    weights = {k.removeprefix(LDM_TEXT_PREFIX): v for k, v in ldm_text_state_dict(text_encoder).items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    (folder / "config.json").write_text(text_encoder.config.to_json_string())


def write_tokenizer(tokenizer, max_length: int, folder: Path) -> None:
    """The tokenizer as transformers saves it, padding to the text encoder's context (77 for CLIP): diffusers'
    pipeline pads prompts to `model_max_length`, which a bare vocab.json + merges.txt folder leaves unset."""
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(str(folder))


def model_card(model, student_path, steps: int, guidance: float, pixel_space: bool) -> str:
    """README.md of a pipeline folder: how it was made and how to sample it."""
    timesteps = consistency_timesteps(steps, LCM_ORIGINAL_STEPS).tolist()
    toy = ("\nThis is the scott toy world (pixel space, 32×32): it has no VAE, so ask the pipeline for "
           "`output_type=\"latent\"` with `height=width=256` (the pipeline divides by 8); the latents *are* the "
           "images, in [-1, 1]. Load it with `from_pretrained(FOLDER, vae=None)`.\n") if pixel_space else ""
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [scott, consistency-distillation, latent-consistency-model, stable-diffusion]
---
# SCott student (Stochastic Consistency Distillation)

Made with `python export.py --to pipeline` from the model `{model}` and the student `{student_path}`
(SCott, arXiv 2403.01505, trained with this project's train.py). The UNet keeps its guidance-scale input
(`time_cond_proj_dim`): pick ω at sampling time with `guidance_scale`; there is no classifier-free guidance pass.
{toy}
## Sampling

With diffusers installed, load this folder with its `LatentConsistencyModelPipeline`:

```python
pipe = LatentConsistencyModelPipeline.from_pretrained("PATH/TO/THIS/FOLDER")
image = pipe("a photo of a fox", num_inference_steps={steps}, guidance_scale={guidance}).images[0]
```

1–8 steps; {steps} steps use timesteps {timesteps} (LCMScheduler with original_inference_steps 50, the same
grid as the project's sample.py). No safety checker is included.
"""


def write_pipeline(bundle: SD15, student: UNet, out: Path, model, student_path, steps: int, guidance: float):
    """A diffusers LatentConsistencyModelPipeline folder (see the module docstring)."""
    cfg = student.config
    if cfg.sigma_data != LCM_SIGMA_DATA or cfg.guidance_offset != 1.0:
        raise ExportError(f"--student {student_path}: sigma_data={cfg.sigma_data}, guidance_offset="
                          f"{cfg.guidance_offset}; diffusers' LCM pipeline fixes σ_data = 0.5 and feeds the UNet "
                          f"guidance_scale − 1 (guidance_offset 1), so it would sample this student wrongly. Use "
                          f"--to single-file or --to diffusers-unet with --guidance, which bake ω in.")
    pixel_space = isinstance(bundle.vae, IdentityVAE)
    clip_tokenizer = type(bundle.tokenizer).__name__.removesuffix("Fast") == "CLIPTokenizer"  # else the toy's
    index = {"_class_name": "LatentConsistencyModelPipeline", "_diffusers_version": "0.30.0",
             "scheduler": ["diffusers", "LCMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer" if clip_tokenizer else "PreTrainedTokenizerFast"],
             "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": [None, None] if pixel_space else ["diffusers", "AutoencoderKL"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, FOLDER_MARKER: "pipeline"}
    if pixel_space:
        index["pixel_space"] = True

    def write(tmp: Path):
        save_unet(student, tmp / "unet")
        move_student_keys(tmp / "unet")
        if not pixel_space:
            save_vae(bundle.vae, tmp / "vae")
        write_text_encoder(bundle.text_encoder, tmp / "text_encoder")
        write_tokenizer(bundle.tokenizer, bundle.text_encoder.config.max_position_embeddings, tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        scheduler = lcm_scheduler_config(bundle.alphas_cumprod, cfg.timestep_scaling)
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / "README.md").write_text(model_card(model, student_path, steps, guidance, pixel_space))
    write_folder_atomically(out, write)


def single_file_state(bundle: SD15, baked: UNet, dtype: torch.dtype) -> dict:
    """UNet, VAE (none for a pixel-space model) and text encoder under the original prefixes, floats in `dtype`."""
    state = ldm_unet_state_dict(baked)
    if not isinstance(bundle.vae, IdentityVAE):
        state.update(ldm_vae_state_dict(bundle.vae))
    state.update(ldm_text_state_dict(bundle.text_encoder))
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def write_single_file(bundle: SD15, baked: UNet, out: Path, dtype: torch.dtype, metadata: dict) -> None:
    """The original-layout checkpoint, `metadata` (the sampler settings) in its safetensors header; atomic."""
    state = single_file_state(bundle, baked, dtype)
    metadata = {"format": "pt", **metadata, EXPORT_MARKER: "single-file"}
    atomic_write(out, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def write_diffusers_unet(baked: UNet, out: Path, dtype: torch.dtype) -> None:
    """The baked UNet as a plain diffusers UNet2DConditionModel folder (no time_cond_proj_dim); atomic."""
    def write(tmp: Path):
        save_unet(baked.to(dtype), tmp)
        config = json.loads((tmp / "config.json").read_text()) | {FOLDER_MARKER: "diffusers-unet"}
        atomic_write(tmp / "config.json", lambda path: path.write_text(json.dumps(config, indent=2)))
    write_folder_atomically(out, write)


# ---- command line -------------------------------------------------------------------------------------------------

def lora_settings(steps: int, unet: UNet) -> dict:
    """How to sample a LoRA student in each program: LCM sampling, no CFG (the student has no ω input)."""
    return sampler_settings(steps, unet, None) | {
        "scott.cfg_scale": "1",
        "scott.a1111": f"<lora:NAME:1> in the prompt, Sampling method LCM, Schedule type SGM Uniform, Sampling steps "
                       f"{steps}, CFG Scale 1",
        "scott.comfyui": f"Load Checkpoint (the base model) -> LoraLoaderModelOnly strength 1 -> KSampler sampler_name "
                         f"lcm, scheduler sgm_uniform, steps {steps}, cfg 1.0",
        "scott.diffusers": f"StableDiffusionPipeline + load_lora_weights(FILE), LCMScheduler, num_inference_steps="
                           f"{steps}, guidance_scale=1 (no CFG)"}


def export_lora(args, model: Path, out: Path) -> dict:
    """--to lora: the run's adapters (checked against the --model's UNet) as a kohya file."""
    if not args.lora:
        raise ExportError("--to lora needs --lora FILE_OR_FOLDER: the adapters.safetensors of a LoRA run (or the "
                          "step-N/ folder holding it).")
    source = Path(args.lora) / ADAPTERS_FILE if Path(args.lora).is_dir() else Path(args.lora)
    if out.suffix != ".safetensors":
        raise ExportError(f"--out {out}: a LoRA file must end in .safetensors.")
    check_out(out, args.overwrite, "lora", {"--model": model, "--lora": args.lora, "--lora file": source})
    unet = load_unet(model)
    adapters = load_adapters(source, unet)
    settings = lora_settings(args.steps, unet) | {"scott.model": str(model), "scott.lora": str(source),
                                                  EXPORT_MARKER: "lora"}
    save_kohya(adapters, out, DTYPES[args.dtype or "fp16"], metadata=settings)
    return settings


def export(args) -> dict:
    """Run one export from parsed arguments; returns the sampler settings it recorded (also printed)."""
    out, model = Path(os.path.abspath(args.out)), model_path(args.model)  # absolute: `--out .` has a name too
    if args.lora and args.to != "lora":
        raise ExportError(f"--lora is for --to lora; --to {args.to} exports a --student UNet.")
    if args.to == "lora":
        return export_lora(args, model, out)
    own = model_settings(model, "sample")  # the model folder's scott.toml [sample]: the toy model's student/
    if not args.student and "student" not in own:
        raise ExportError("--student FOLDER is required with --model (the student/ folder of a train.py run, "
                          "e.g. runs/scott/step-N/student).")
    student_path = Path(args.student) if args.student else model / own["student"]
    if args.to != "pipeline" and args.guidance is None:
        raise ExportError(f"--guidance W is required with --to {args.to}: the exported UNet has no ω input, so ω is "
                          f"baked in (e.g. 7.5 for SD1.5, 3 for the toy model).")
    if out.suffix != ".safetensors" and args.to == "single-file":
        raise ExportError(f"--out {out}: a single file must end in .safetensors.")
    check_out(out, args.overwrite, args.to, {"--model": model, "--student": student_path, "--tokenizer": args.tokenizer})
    bundle = load_sd15(model, tokenizer=args.tokenizer or None)
    student = load_student(student_path)
    check_same_architecture(student, bundle.unet, student_path, model)
    bundle.unet = None  # the teacher is not exported: free it
    guidance = args.guidance if args.guidance is not None else own.get("guidance", 7.5)
    settings = sampler_settings(args.steps, student, None if args.to == "pipeline" else args.guidance)
    settings |= {"scott.model": str(model), "scott.student": str(student_path)}
    dtype = DTYPES[args.dtype or ("fp16" if args.to == "single-file" else "fp32")]
    if args.to == "pipeline":  # loaded in fp32; cast on the way out
        bundle.vae, bundle.text_encoder = bundle.vae.to(dtype), bundle.text_encoder.to(dtype)
        write_pipeline(bundle, student.to(dtype), out, model, student_path, args.steps, guidance)
    else:
        baked = bake_guidance(student, args.guidance)
        del student
        if args.to == "single-file":
            write_single_file(bundle, baked, out, dtype, settings)
        else:
            write_diffusers_unet(baked, out, dtype)
    return settings


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", choices=TARGETS, required=True, help="what to write (see below)")
    p.add_argument("--out", required=True, help="output folder (pipeline, diffusers-unet) or .safetensors file")
    p.add_argument("--model", default="", help="the SD1.5 model the student was distilled from: a diffusers folder "
                   "or a single file (default: the shipped toy model)")
    p.add_argument("--student", default="", help="the student UNet folder train.py wrote, e.g. "
                   "runs/scott/step-N/student (default: the toy model's student/)")
    p.add_argument("--lora", default="", help="with --to lora: a LoRA run's adapters.safetensors, or the "
                   "step-N/ folder holding it")
    p.add_argument("--tokenizer", default="", help="tokenizer folder, needed with a single-file --model")
    p.add_argument("--guidance", type=float, default=None, help="ω to bake in (required for single-file and "
                   "diffusers-unet; for pipeline only the model card's suggested guidance_scale)")
    p.add_argument("--steps", type=int, default=4, help="the step count to recommend, 1–8 (default 4): recorded "
                   "with its timesteps in the single file's metadata and the model card")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights' dtype (default fp16 for single-file and "
                   "lora, fp32 for folders)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if not 1 <= args.steps <= 8:
        p.error(f"--steps {args.steps}: a consistency student samples in 1–8 steps")
    try:
        settings = export(args)
    except (ExportError, CheckpointError, OutputRefused) as e:
        p.error(str(e))
    except OSError as e:
        p.error(f"writing --out {args.out} failed ({e}); nothing was left under that name. Free disk space (or "
                f"fix the path) and run again.")
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file()) if Path(args.out).is_dir() \
        else Path(args.out).stat().st_size
    print(f"wrote {args.out} ({args.to}, {size / 1e6:.1f} MB)")
    for key, value in settings.items():
        print(f"  {key.removeprefix('scott.')}: {value}")


if __name__ == "__main__":
    sys.exit(main())
