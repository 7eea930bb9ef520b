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
    measured = [r for r in rows if not r["note"].startswith("unsupported")]
    assert all(r["ms"] > 0 and r["gflop"] > 0 for r in measured)
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


def test_rows_lora_is_only_the_lora_steps():
    labels = lambda rows: [row[0] for row in bench.step_settings(bench.parse_args(["--rows", rows]))]  # noqa: E731
    assert [label.split(" (")[0] for label in labels("lora")] == [f"SCott-LoRA step {m}" for m in bench.LORA_MODES]
    assert labels("step")[:2] == ["SCott step (h=3, η=0.3, CFG, EMA, D)", "LCM-style step (η=0, h=1, CFG, EMA)"]
    assert labels("step")[2:] == labels("lora")


def test_bench_and_gpu_check_refuse_bad_flags(capsys):
    for argv in (["--sdpa", "fastest"], ["--rows", "unet,speed"], ["--repeats", "0"], ["--variants", "turbo"],
                 ["--lora-modes", "eager,fast"], ["--suite"]):
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


@pytest.mark.slow  # ~9.5 min on this project's shared 2-core CPU (every row of every suite item, tiny shapes)
def test_gpu_run_suite_dry_run_writes_every_table_between_the_markers(tmp_path, monkeypatch):
    """tools/gpu_run.sh's suite end to end on CPU with tiny shapes (CI's dry run of the GPU script): every section's
    table and gpu_check's lines land in the docs file between the markers, the text around them is kept, a second
    run replaces the section instead of appending, and a spent budget lists what was not run. (compile backend
    "eager": Dynamo traces every compiled variant whole, fullgraph=True, without Inductor's minutes of codegen.)"""
    from tools import gpu_check
    checks = []
    monkeypatch.setattr(gpu_check, "CHECKS", ("sampler", "lora_compile"))  # the in-process ones; CI runs the rest
    real_main = gpu_check.main
    monkeypatch.setattr(gpu_check, "main", lambda argv: checks.append(argv) or real_main(argv + ["--only",
                                                                                               "sampler,lora_compile"]))
    docs = tmp_path / "performance.md"
    docs.write_text("# Performance\n\nhand-written text above\n")
    argv = ["--suite", "--device", "cpu", "--tiny", "--warmup", "0", "--repeats", "1", "--micro-batch", "2",
            "--compile-backend", "eager", "--docs", str(docs), "--out", str(tmp_path / "runs")]
    rows = bench.main(argv)
    text = docs.read_text()
    assert text.startswith("# Performance\n\nhand-written text above\n") and text.count(bench.BEGIN) == 1
    impls = {(r["section"], r["impl"]) for r in rows}
    for variant in ("ours", "ours bf16_decode", "ours fuse_qkv", "ours channels_last", "ours compile",
                    "ours compile+fuse_qkv+bf16_decode"):
        assert ("2-step generation", variant) in impls and f"| 2-step generation | {variant} |" in text
    assert ("unet forward", "ours compile+fuse_qkv+channels_last") in impls
    lora = [r for r in rows if r["shape"].startswith("SCott-LoRA step")]
    assert {r["shape"].split()[2] for r in lora} == {"eager", "checkpointed", "compiled"}
    assert all(r["ms"] > 0 or r["note"].startswith("unsupported") for r in lora)
    assert "PASS sampler" in text and ("PASS lora_compile" in text or "UNSUPPORTED lora_compile" in text)
    assert checks and "TINY shapes" in text
    bench.main([*argv, "--budget-s", "0"])
    again = docs.read_text()
    assert again.count(bench.BEGIN) == 1 and again.count("not run: the 0 s budget was spent") == 5  # 4 items + gpu_check
    assert "hand-written text above" in again
