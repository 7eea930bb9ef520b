"""--fp16 with gradient scalers (for GPUs without fast bf16), its logic on CPU: an overflowing step is skipped with
the weights untouched and the scale lowered, not counted as a failure; a good step is applied and unscaled; a
resume restores the scales exactly."""
import pytest
import torch

import run_folder
import train
from consistency import ConsistencyConfig
from datasets import write_folder_dataset
from discriminator import DiscriminatorConfig
from sd15 import load_sd15
from tiny_models import TINY_RUN


def build(tiny_model):
    torch.manual_seed(0)
    cfg = train.TrainConfig(model=str(tiny_model), fp16=True, lr=1e-3, d_lr=1e-3)
    assert cfg.fp16 and not cfg.bf16
    consistency, disc_cfg = ConsistencyConfig(), DiscriminatorConfig(lora_rank=2, lora_alpha=2.0)
    models = train.build_models(load_sd15(tiny_model), cfg, consistency, disc_cfg, torch.device("cpu"), world=1)
    opt, d_opt = train.build_optimizers(models, cfg, torch.device("cpu"))
    return models, opt, d_opt, cfg, consistency


def micro_batches(models):
    g = torch.Generator().manual_seed(0)
    size = models.student.config.sample_size
    cond = models.bundle.encode_prompts(["a cat", "a dog"])
    return [train.MicroBatch(torch.randn(2, 4, size, size, generator=g), cond)]


def weights(module):
    return [p.detach().clone() for p in module.parameters()]


def test_an_overflow_skips_the_step_lowers_the_scale_and_is_not_a_failure(tiny_model):
    models, opt, d_opt, cfg, consistency = build(tiny_model)
    scaler = torch.amp.GradScaler("cpu", init_scale=float(torch.finfo(torch.float32).max))  # any gradient overflows
    models.scalers = (scaler, models.scalers[1])
    before = weights(models.student)
    stats = train.train_step(models, opt, d_opt, micro_batches(models), cfg, consistency, False,
                             torch.Generator().manual_seed(1), torch.autocast("cpu", dtype=torch.float16))
    assert not stats.applied and stats.overflow and torch.isfinite(stats.loss_cd)
    assert all(torch.equal(a, b) for a, b in zip(before, weights(models.student)))
    assert scaler.get_scale() < float(torch.finfo(torch.float32).max)  # lowered by the backoff factor

    scaler.update(new_scale=2.0 ** 10)
    stats = train.train_step(models, opt, d_opt, micro_batches(models), cfg, consistency, False,
                             torch.Generator().manual_seed(1), torch.autocast("cpu", dtype=torch.float16))
    assert stats.applied and not stats.overflow
    assert any(not torch.equal(a, b) for a, b in zip(before, weights(models.student)))
    assert float(stats.grad_norm) < 1e3  # the gradient norm is of the unscaled gradients


def test_a_resume_restores_the_scales(tiny_model, tmp_path, monkeypatch):
    data = write_folder_dataset(tmp_path / "data", n=8, size=40)
    argv = ["--model", str(tiny_model), "--data", str(data), "--out", str(tmp_path / "run"), "--num-workers", "0",
            "--steps", "10", "--fp16", "--stop-after", "2", *TINY_RUN]
    train.main(argv)
    state = torch.load(tmp_path / "run" / "step-0000002" / "state.pt", weights_only=True)
    saved = [s["scale"] for s in state["scalers"]]
    restored = []
    real_restore = run_folder.restore

    def spy(resume, models, *args, **kwargs):
        real_restore(resume, models, *args, **kwargs)
        restored.extend(s.get_scale() for s in models.scalers)
    monkeypatch.setattr(train, "restore", spy)
    train.main([*argv, "--resume", "auto"])
    assert restored == pytest.approx(saved) and len(saved) == 2
