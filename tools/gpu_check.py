"""Everything a GPU must prove about scott, in one command of a few minutes: one PASS/FAIL line per check.

    python -m tools.gpu_check                              # every check, on the first GPU
    python -m tools.gpu_check --only precision,resume      # some of them
    python -m tools.gpu_check --device cpu --tiny          # the same code on CPU and tiny shapes (a dry run)

Checks (SD1.5 shapes use random weights; the trainer checks run the shipped toy model through train.py):
  precision   our bf16 UNet vs our fp32 vs diffusers' bf16 on the same weights (fp32 without TF32 as reference)
  compile     train_step compiled vs eager, D's LoRA set on the compiled teacher: same losses and weights
  torchrun    `torchrun --nproc_per_node=N train.py` (NCCL on GPU) trains a few steps with the replica check on,
              N = 1 and, on a machine with ≥ 2 GPUs, 2
  resume      a run stopped and resumed (--deterministic) ends bit-identical to a straight run
  sigterm     SIGTERM to the trainer's process group: a checkpoint at the step boundary and exit 0
  memory      one SCott step at SD1.5 shapes and micro-batch 10 (bf16, D on) fits; its peak memory and time
  sampler     2-step 512 px generation at B = 1: the time of each stage (text, UNet, VAE decode), eager and
              compiled (fused q/k/v, bf16 decode; on a GPU the compiled loop runs under
              torch.cuda.set_sync_debug_mode("error"), so a host sync in it fails the check), and bf16's error
  lora_compile     the SCott-LoRA step compiled vs eager: same losses
  lora_checkpoint  the SCott-LoRA step with gradient checkpointing vs without: same gradients (the same update)
Exit status 1 if any check fails; a combination train.py refuses is reported UNSUPPORTED (not a failure).
"""
import argparse
import copy
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

import train
from config import check_settings, parse_settings, setting
from consistency import ConsistencyConfig, consistency_timesteps
from discriminator import DiscriminatorConfig
from sample import consistency_loop, consistency_plan, generate, image_noise, prepare_sampler
from sd15 import load_sd15
from sde_solver import NoiseSchedule
from unet import make_student
from tools.bench import diffusers, diffusers_unet, write_random_sd15
from vae import decode_dtype

ROOT = Path(__file__).resolve().parent.parent  # the repository root
CHECKS = ("precision", "torchrun", "resume", "sigterm", "memory", "sampler", "lora_checkpoint", "lora_compile",
          "compile")  # compile last: the slowest


class Unsupported(Exception):
    """train.py refuses the combination a check needs (reported, not counted as a failure)."""


@dataclass
class CheckConfig:
    device: str = setting("cuda" if torch.cuda.is_available() else "cpu", "where to run: cuda, cuda:N or cpu")
    tiny: bool = setting(False, "tiny shapes for the in-process checks (a dry run on CPU)")
    only: str = setting(",".join(CHECKS), "comma-separated subset of the checks to run")
    out: str = setting("", "keep the runs' folders here (default: a temporary folder)")

    def __post_init__(self):
        check_settings(self)
        unknown = set(self.only.split(",")) - set(CHECKS)
        if unknown:
            raise ValueError(f"--only: unknown checks {sorted(unknown)}; choose from {','.join(CHECKS)}")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ---- in-process checks -------------------------------------------------------------------------------------------

def random_model(work: Path, tiny: bool) -> Path:
    """A random SD1.5-shaped (or tiny) model folder in `work`, written once and shared by the checks."""
    folder = work / ("random-tiny" if tiny else "random-sd15")
    return folder if folder.exists() else write_random_sd15(folder, tiny)


def check_precision(cfg: CheckConfig, work: Path) -> str:
    """bf16 error of our UNet against our fp32 one, next to diffusers' bf16 error on the same weights."""
    device = torch.device(cfg.device)
    folder = random_model(work, cfg.tiny)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    unet = load_sd15(folder, device=device).unet
    size, width = unet.config.sample_size, unet.config.cross_attention_dim
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(2, 4, size, size, device=device, generator=g)
    t, c = torch.tensor([10, 700], device=device), torch.randn(2, 77, width, device=device, generator=g)
    with torch.no_grad():
        reference = unet(x, t, c)
        ref = diffusers_unet(unet) if diffusers else None  # fp32, our weights
        theirs_fp32 = ref(x, t, encoder_hidden_states=c).sample if ref else None
        ours_bf16 = unet.to(torch.bfloat16)(x.bfloat16(), t, c.bfloat16()).float()
        detail = f"ours bf16 vs fp32 {relative_error(ours_bf16, reference):.2e}"
        if ref:
            theirs_bf16 = ref.to(torch.bfloat16)(x.bfloat16(), t, encoder_hidden_states=c.bfloat16()).sample.float()
            detail += (f"; diffusers bf16 vs our fp32 {relative_error(theirs_bf16, reference):.2e}; "
                       f"diffusers fp32 vs ours fp32 {relative_error(theirs_fp32, reference):.2e}")
            assert relative_error(theirs_fp32, reference) < 1e-4, "fp32: ours and diffusers' differ: " + detail
            assert relative_error(ours_bf16, reference) <= 2 * relative_error(theirs_bf16, reference) + 1e-3, \
                "our bf16 error is more than twice diffusers': " + detail
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    assert relative_error(ours_bf16, reference) < 3e-2, detail
    return detail


def step_models(folder: Path, device, compile: bool, micro_batch: int, bf16: bool, **settings):
    """The trainer's models and optimisers for a SCott step with D re-noising, as train.main builds them; `settings`
    are more TrainConfig fields (a combination TrainConfig refuses raises Unsupported)."""
    try:
        tcfg = train.TrainConfig(model=str(folder), micro_batch=micro_batch, global_batch=micro_batch, adv_weight=0.4,
                                 bf16=bf16, compile=compile, lr=1e-4, d_lr=1e-4, **settings)
    except ValueError as e:
        raise Unsupported(str(e)) from None
    torch._dynamo.reset()
    torch.manual_seed(0)
    models = train.build_models(load_sd15(folder, device=device), tcfg, ConsistencyConfig(),
                                DiscriminatorConfig(renoise=True), device, world=1)
    for lora in models.disc.lora.values():  # B = 0 at start; give D's adapters something to compute
        torch.nn.init.normal_(lora.up.weight, std=0.01)
    opt, d_opt = train.build_optimizers(models, tcfg, device)
    return models, opt, d_opt, tcfg


def run_steps(models, opt, d_opt, tcfg, device, n: int, seed: int = 0):
    """n train_steps on fixed random latents; returns the per-step losses."""
    g = torch.Generator(device).manual_seed(seed)
    size, width = models.teacher.config.sample_size, models.teacher.config.cross_attention_dim
    z0 = torch.randn(tcfg.micro_batch, 4, size, size, device=device, generator=g)
    c = torch.randn(tcfg.micro_batch, 77, width, device=device, generator=g)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if tcfg.bf16 else nullcontext()
    stats = [train.train_step(models, opt, d_opt, [(z0, c)], tcfg, ConsistencyConfig(), True, g, autocast)
             for _ in range(n)]
    assert all(s.applied for s in stats), "a step was skipped as non-finite"
    return [(s.loss_cd.item(), s.loss_g.item(), s.loss_d.item()) for s in stats]


def check_compile(cfg: CheckConfig, work: Path) -> str:
    """The same two steps eager and compiled (tiny UNet shapes, so compiling takes seconds)."""
    device = torch.device(cfg.device)
    folder = random_model(work, tiny=True)
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    losses, updates = {}, {}
    for compile in (False, True):
        models, opt, d_opt, tcfg = step_models(folder, device, compile, micro_batch=4, bf16=device.type == "cuda")
        start = flat(models.student)
        losses[compile] = run_steps(models, opt, d_opt, tcfg, device, n=2)
        updates[compile] = flat(models.student) - start
    loss_error = max(abs(a - b) / max(abs(b), 1e-6) for la, lb in zip(losses[True], losses[False])
                     for a, b in zip(la, lb))
    detail = (f"(L_cd, L_G, L_D) eager {losses[False]} vs compiled {losses[True]}: max rel. diff {loss_error:.1e}; "
              f"student update rel. diff {relative_error(updates[True], updates[False]):.1e}")
    assert loss_error < 5e-2, detail
    return detail


def check_lora_compile(cfg: CheckConfig, work: Path) -> str:
    """Two SCott-LoRA steps (rank 4, D on) eager and compiled: the same losses (tiny UNet shapes)."""
    device = torch.device(cfg.device)
    folder = random_model(work, tiny=True)
    losses = {}
    for compile in (False, True):
        models, opt, d_opt, tcfg = step_models(folder, device, compile, micro_batch=4, bf16=device.type == "cuda",
                                               student_lora_rank=4)
        losses[compile] = run_steps(models, opt, d_opt, tcfg, device, n=2)
    error = max(abs(a - b) / max(abs(b), 1e-6) for la, lb in zip(losses[True], losses[False]) for a, b in zip(la, lb))
    detail = f"(L_cd, L_G, L_D) eager {losses[False]} vs compiled {losses[True]}: max rel. diff {error:.1e}"
    assert error < 5e-2, detail
    return detail


def check_lora_checkpoint(cfg: CheckConfig, work: Path) -> str:
    """One SCott-LoRA step with and without gradient checkpointing (fp32, tiny): the same losses and update."""
    device = torch.device(cfg.device)
    folder = random_model(work, tiny=True)
    losses, updates = {}, {}
    for checkpointing in (False, True):
        models, opt, d_opt, tcfg = step_models(folder, device, False, micro_batch=2, bf16=False,
                                               student_lora_rank=4, grad_checkpointing=checkpointing)
        trained = [p for p in models.student.parameters() if p.requires_grad]
        start = torch.cat([p.detach().flatten() for p in trained])
        losses[checkpointing] = run_steps(models, opt, d_opt, tcfg, device, n=1)
        updates[checkpointing] = torch.cat([p.detach().flatten() for p in trained]) - start
    error = relative_error(updates[True], updates[False])
    detail = f"losses {losses[False]} vs checkpointed {losses[True]}; update rel. diff {error:.1e}"
    assert losses[True] == losses[False] and error < 1e-4, detail
    return detail


def check_memory(cfg: CheckConfig, work: Path) -> str:
    """A real-size step: SD1.5 shapes, micro-batch 10, bf16 autocast, D on, fused AdamW."""
    device = torch.device(cfg.device)
    folder = random_model(work, cfg.tiny)
    models, opt, d_opt, tcfg = step_models(folder, device, compile=False, micro_batch=10 if not cfg.tiny else 2,
                                           bf16=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = run_steps(models, opt, d_opt, tcfg, device, n=3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / 3
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return f"micro-batch {tcfg.micro_batch}: peak {peak:.1f} GiB, {seconds * 1000:.0f} ms/step (eager), losses {losses[-1]}"


def check_sampler(cfg: CheckConfig, work: Path) -> str:
    """2-step generation eager (fp32 decode) and fast (compiled, fused q/k/v, bf16 decode where supported): stage
    times, no host sync inside the compiled loop (CUDA's sync debug mode), and the fast images' error."""
    device = torch.device(cfg.device)
    folder = random_model(work, cfg.tiny)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    bundle = load_sd15(folder, device=device, dtype=dtype)
    student = make_student(bundle.unet).eval()
    schedule = NoiseSchedule(bundle.alphas_cumprod.to(device))
    size = student.config.sample_size * bundle.vae.spatial_factor
    fast_unet = copy.deepcopy(student).fuse_qkv()
    unet, decode = prepare_sampler(fast_unet, copy.deepcopy(bundle.vae), compile=True,
                                   cuda_graphs=device.type == "cuda", dtype=decode_dtype("auto", device),
                                   backend="inductor" if device.type == "cuda" else "eager")
    run = lambda net, dec: generate(bundle, net, schedule, ["a photo of a cat"], steps=2, guidance=7.5,  # noqa: E731
                                    height=size, width=size, decode=dec)
    with torch.no_grad():
        for _ in range(3):  # warm-up (and compilation), then the last run's timings
            images, timings = run(student, None)
            fast, fast_timings = run(unet, decode)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the loop raises
            try:
                latent = size // bundle.vae.spatial_factor
                x = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
                noise = image_noise([0])
                plan = consistency_plan(consistency_timesteps(2), schedule, x, noise, 10.0, 0.5)
                cond = bundle.encode_prompts(["a photo of a cat"])
                consistency_loop(unet, x, cond, torch.full((1,), 7.5, device=device), plan)
            finally:
                torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(images).all() and torch.isfinite(fast).all()
    error = relative_error(fast, images)
    stages = lambda t: ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in t.items())  # noqa: E731
    assert error < 5e-2, f"the fast sampler's images differ from eager's by {error:.2e}"
    return (f"2 steps {size}px B=1: eager {stages(timings)}; compiled+fused q/k/v+{decode_dtype('auto', device)} "
            f"decode{' + CUDA graphs, loop sync-free' if device.type == 'cuda' else ''} {stages(fast_timings)}; "
            f"image rel. error {error:.1e}")


# ---- the trainer in subprocesses (the shipped toy model) ---------------------------------------------------------

TOY_RUN = ["--steps", "4", "--adv-weight", "0.1", "--renoise", "--log-every", "1", "--sample-every", "0",
           "--ckpt-every", "1000"]


def first_traceback(output: str, chars: int = 3000) -> str:
    """The first Python traceback in a run's output (the trainer's own, before torchrun's), or the output's end."""
    start = output.find("Traceback")
    return output[start:start + chars] if start >= 0 else output[-chars:]


def trainer_env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_trainer(args, cmd=None, timeout=300) -> subprocess.CompletedProcess:
    cmd = cmd or [sys.executable, str(ROOT / "train.py")]
    result = subprocess.run([*cmd, *args], env=trainer_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd[-1:] + args)} exited {result.returncode}:\n" \
                                   f"{first_traceback(result.stdout + result.stderr)}"
    return result


def final_weights(out: Path) -> dict:
    checkpoint = out / (out / "latest").read_text()
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    return {**{f"student.{k}": v for k, v in load_file(checkpoint / "student" / "diffusion_pytorch_model.safetensors").items()},
            **{f"target.{k}": v for k, v in load_file(checkpoint / "target" / "diffusion_pytorch_model.safetensors").items()},
            **{f"disc.{k}": v for k, v in state["discriminator"].items()}}


def check_torchrun(cfg: CheckConfig, work: Path) -> str:
    sizes = [1, 2] if torch.cuda.device_count() >= 2 else [1]
    for n in sizes:
        out = work / f"torchrun-{n}"
        result = run_trainer([*TOY_RUN, "--out", str(out), "--check-sync-every", "1", "--sample-every", "4"],
                             cmd=[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc_per_node={n}", str(ROOT / "train.py")])
        assert f"world {n}" in result.stdout and (out / "samples-0000004.png").is_file(), result.stdout[-2000:]
    return f"world sizes {sizes}: 4 steps each, replicas identical after every step, sample grid written"


def check_resume(cfg: CheckConfig, work: Path) -> str:
    common = [*TOY_RUN, "--deterministic"]
    run_trainer([*common, "--out", str(work / "straight")])
    run_trainer([*common, "--out", str(work / "split"), "--stop-after", "2"])
    run_trainer([*common, "--out", str(work / "split"), "--resume", "auto"])
    a, b = final_weights(work / "straight"), final_weights(work / "split")
    different = [k for k in a if not torch.equal(a[k], b[k])]
    if different:  # tell a resume bug from kernels that are not deterministic: run the straight run again
        run_trainer([*common, "--out", str(work / "straight-again")])
        again = final_weights(work / "straight-again")
        rerun = [k for k in a if not torch.equal(a[k], again[k])]
        raise AssertionError(f"{len(different)} of {len(a)} tensors differ after resume (e.g. {different[:3]}); a "
                             f"second straight run differs in {len(rerun)}")
    return f"4 steps straight == 2 + resume + 2, all {len(a)} tensors bit-identical (student, target, D)"


def check_sigterm(cfg: CheckConfig, work: Path) -> str:
    out = work / "sigterm"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *TOY_RUN, "--steps", "100000", "--out", str(out)],
                            env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while not (out / "log.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole process group, as SLURM and systemd do
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and "stopped at step" in output, f"exit {proc.returncode}:\n{output[-2000:]}"
    step = torch.load(out / (out / "latest").read_text() / "state.pt", weights_only=True)["step"]
    return f"exit 0, checkpoint at step {step}"


CHECK_FUNCTIONS = {"precision": check_precision, "compile": check_compile, "torchrun": check_torchrun,
                   "resume": check_resume, "sigterm": check_sigterm, "memory": check_memory, "sampler": check_sampler,
                   "lora_compile": check_lora_compile, "lora_checkpoint": check_lora_checkpoint}


def parse_args(argv=None) -> CheckConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cfg = parse_settings(parser, CheckConfig, argv)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible (torch.cuda.is_available() is False); use --device cpu --tiny "
                     "for a dry run")
    return cfg


def main(argv=None) -> int:
    cfg = parse_args(argv)
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if cfg.device.startswith('cuda') else 'cpu'}"
          f", diffusers {diffusers.__version__ if diffusers else 'not installed'}", flush=True)
    failures = unsupported = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(cfg.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in cfg.only.split(","):
            t0 = time.time()
            try:
                detail = CHECK_FUNCTIONS[name](cfg, work)
                print(f"PASS {name} ({time.time() - t0:.0f} s): {detail}", flush=True)
            except Unsupported as e:
                unsupported += 1
                print(f"UNSUPPORTED {name}: train.py refuses it: {e}", flush=True)
            except Exception as e:  # one check's failure must not hide the others' answers
                failures += 1
                print(f"FAIL {name} ({time.time() - t0:.0f} s): {type(e).__name__}: {e}", flush=True)
    print(f"{len(cfg.only.split(',')) - failures - unsupported} passed, {failures} failed"
          + (f", {unsupported} unsupported" if unsupported else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
