"""Every training mode compiles: with D on, three train_steps of the full student and of the LoRA student compile a
fixed number of graphs in the first step and none after it (torch._dynamo's counters; the adapters' selection is
module state Dynamo guards on, so each set gets its graph), and train.py --student-lora-rank 4 --compile
--grad-checkpointing logs the eager, un-checkpointed run's L_cd. Compilation on a small CPU takes minutes: slow."""
import functools
import json
from contextlib import nullcontext

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import train
from consistency import ConsistencyConfig
from discriminator import DiscriminatorConfig
from sd15 import load_sd15
from tiny_models import write_tiny_run, write_tiny_sd15

# Graphs Dynamo captures in one SCott step with D on (tiny UNet, B = 2, one micro-batch), counted on torch 2.13:
#   LoRA student: one UNet, five graphs: the teacher (no grad), the target's set (no grad), the student's set
#   (grad), D's set in the generator pass (input requires grad, D frozen) and in D's own step (D trains).
#   Full student: the student, the target, and on the teacher the plain pass and D's two passes.
GRAPHS = {"full": 5, "lora": 5}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile") / "sd15"
    write_tiny_sd15(root)
    return root


def graph_counts() -> tuple:
    return counters["stats"]["unique_graphs"], counters["frames"]["total"], sum(counters["graph_break"].values())


@pytest.mark.slow
@pytest.mark.parametrize("student", ["full", "lora"])
def test_three_compiled_steps_compile_once(tiny_model, monkeypatch, student):
    """Dynamo's graphs are counted with backend="eager" (the graphs are Dynamo's whatever the backend; inductor would
    only add minutes). Step 1 compiles GRAPHS[student] graphs with no graph break; steps 2 and 3 compile nothing."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch.manual_seed(0)
    cfg = train.TrainConfig(model=str(tiny_model), adv_weight=0.4, lr=1e-3, d_lr=1e-2, bf16=False, compile=True,
                            student_lora_rank=4 if student == "lora" else 0, micro_batch=2, global_batch=2)
    consistency = ConsistencyConfig()
    models = train.build_models(load_sd15(tiny_model), cfg, consistency, DiscriminatorConfig(lora_rank=2),
                                torch.device("cpu"), world=1)
    opt, d_opt = train.build_optimizers(models, cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    batch = [train.MicroBatch(torch.randn(2, 4, 8, 8, generator=g), models.bundle.encode_prompts(["a", "b"]))]
    torch._dynamo.reset()
    counters.clear()
    seen = []
    for step in range(3):
        stats = train.train_step(models, opt, d_opt, batch, cfg, consistency, False,
                                 torch.Generator().manual_seed(step), nullcontext(), step)
        assert stats.applied
        seen.append(graph_counts())
    print(f"{student} student: (unique graphs, compiled frames, graph breaks) after each step: {seen}")
    assert seen[0] == (GRAPHS[student], GRAPHS[student], 0)
    assert seen[1] == seen[2] == seen[0]  # no recompilation after the first step


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_compile_and_checkpointing_train_like_eager(tmp_path):
    """train.py --student-lora-rank 4 --compile --grad-checkpointing (inductor) against the eager, un-checkpointed
    run: the same L_cd over three steps (1e-3 relative: compiled kernels round differently)."""
    _, _, common = write_tiny_run(tmp_path, "--student-lora-rank", "4", "--steps", "3", "--global-batch", "2",
                                  "--micro-batch", "2", "--ckpt-every", "3")
    train.main([*common, "--out", str(tmp_path / "eager")])
    torch._dynamo.reset()
    train.main([*common, "--out", str(tmp_path / "compiled"), "--compile", "--grad-checkpointing"])
    eager, compiled = ([r["loss_cd"] for r in read_log(tmp_path / run)] for run in ("eager", "compiled"))
    print(f"loss_cd eager {eager}, compiled + checkpointed {compiled}")
    assert len(eager) == len(compiled) == 3
    for a, b in zip(compiled, eager):
        assert abs(a - b) <= 1e-3 * abs(b), (compiled, eager)
