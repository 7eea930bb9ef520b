"""tools/bench.py and tools/gpu_check.py stay runnable on CPU: every bench row on tiny shapes through the trainer's own step,
gpu_check's argument parsing, and its in-process checks as a dry run."""
import json

import pytest
import torch

from tools import bench
from tools import gpu_check
import train


@pytest.mark.slow
def test_every_bench_row_runs_on_tiny_shapes(tmp_path, monkeypatch):
    steps = []
    real_step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    rows = bench.main(["--device", "cpu", "--tiny", "--warmup", "0", "--repeats", "1", "--micro-batch", "2",
                       "--out", str(tmp_path)])
    sections = {(r["section"], r["impl"]) for r in rows}
    assert {("unet forward", "ours"), ("unet forward", "diffusers"), ("training step", "ours"),
            ("training step", "diffusers"), ("2-step generation", "ours"), ("2-step generation", "diffusers")} <= sections
    assert all(r["ms"] > 0 and r["gflop"] > 0 for r in rows)
    assert len(steps) >= 3  # the step rows ran train.train_step (flop count + timed run, for each setting)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == rows and saved["options"]["compile"] is False
    assert "| training step | ours |" in (tmp_path / "bench.md").read_text()


def test_bench_counts_unet_flops_not_assumes_them():
    """FLOPs of one tiny UNet forward from the counter grow linearly with the batch."""
    unet = bench.UNet(bench.UNetConfig.tiny()).eval()
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    one = bench.count_flops(lambda: unet(x[:1], torch.tensor([5]), c[:1]))
    two = bench.count_flops(lambda: unet(x, torch.tensor([5, 9]), c))
    assert one > 0 and two == 2 * one


def test_bench_and_gpu_check_refuse_bad_flags(capsys):
    for argv in (["--sdpa", "fastest"], ["--rows", "unet,speed"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "precision,magic"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.parse_args(["--device", "cuda"])
    assert "no GPU is visible" in capsys.readouterr().err or torch.cuda.is_available()
    cfg = gpu_check.parse_args(["--device", "cpu", "--tiny", "--only", "memory,sampler"])
    assert cfg.only == "memory,sampler" and cfg.tiny


def test_gpu_check_dry_run_reports_pass_and_fail(tmp_path, capsys, monkeypatch):
    """The real step at tiny shapes passes; a check that raises prints FAIL and makes the exit status 1."""
    assert gpu_check.main(["--device", "cpu", "--tiny", "--only", "memory,sampler", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count("PASS") == 2

    def broken(cfg, work):
        raise AssertionError("planted failure")
    monkeypatch.setitem(gpu_check.CHECK_FUNCTIONS, "sampler", broken)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--only", "memory,sampler", "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL sampler" in out and "planted failure" in out and "1 passed, 1 failed" in out
