"""Nothing is destroyed by a flag (issue 26): an output never lands on an input, --overwrite replaces only an earlier
output of the same command, leftovers of killed writes are cleaned up, one run writes a --out at a time (also under
torchrun), and the obscure or silent inputs get clear errors. Tiny models in temporary folders, no downloads."""
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import export
import run_folder
import sample
import train
from checkpoint import HOST, CheckpointError, clean_leftovers, open_weights, read_config
from datasets import write_folder_dataset
from lora import Adapters, LoRAConfig, kohya_state_dict, load_kohya
from tiny_models import SAMPLE_SIZE, TINY_RUN, write_tiny_sd15
from unet import UNet, UNetConfig, load_unet, make_student, save_unet

ROOT = Path(__file__).resolve().parent.parent


def tree_hashes(root: Path) -> dict:
    """sha256 of every file under root, by relative path: equal before and after means byte-identical inputs."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tmp_path):
    """tmp/work/sd15 (a tiny model with its student/) and an unrelated file beside it, tmp/work/notes.txt."""
    model = tmp_path / "work" / "sd15"
    teacher, _, _ = write_tiny_sd15(model)
    save_unet(make_student(teacher, 16, timestep_scaling=5.0), model / "student")
    (tmp_path / "work" / "notes.txt").write_text("not scott's")
    return model


def export_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        export.main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


# ---- 1. inputs are sacred -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, to, relation", [
    ("model", "pipeline", "is the input --model"),
    ("student", "pipeline", "is the input --student"),
    ("weight file", "single-file", "is the input --model"),  # a file inside --model: "lies inside"
    ("parent", "pipeline", "holds the input --model"),
    (".", "pipeline", "holds the input --model"),
])
def test_export_never_writes_over_its_inputs(work, tmp_path, capsys, monkeypatch, case, to, relation):
    """--overwrite is given every time: the refusal does not depend on it. Every file under tmp (the model, its
    student, the unrelated file beside them) is byte-identical afterwards."""
    out = {"model": work, "student": work / "student", "weight file": work / "unet" /
           "diffusion_pytorch_model.safetensors", "parent": work.parent, ".": Path(".")}[case]
    if case == "weight file":
        relation = "lies inside the input --model"
    monkeypatch.chdir(work.parent)
    before = tree_hashes(tmp_path)
    try:
        export.main([str(a) for a in ("--model", work, "--student", work / "student", "--to", to, "--guidance", 3,
                                      "--out", out, "--overwrite")])
        code = 0
    except SystemExit as e:
        code = e.code
    msg = capsys.readouterr().err
    assert tree_hashes(tmp_path) == before  # first: every input intact, byte for byte
    assert code == 2 and relation in msg and "--overwrite included" in msg, msg
    assert "Traceback" not in msg and "empty name" not in msg


def test_export_overwrite_replaces_only_an_earlier_export(work, tmp_path, capsys):
    """An unrelated folder or file under --out is refused with what would have been deleted; an earlier export of
    the same --to is replaced, and nothing else is left beside it."""
    base = ("--model", work, "--student", work / "student")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"jpeg")
    before = tree_hashes(tmp_path)
    msg = export_error(capsys, *base, "--to", "pipeline", "--out", other, "--overwrite")
    assert "replaces only an earlier output of export.py --to pipeline" in msg and "holiday.jpg" in msg
    os.chdir(other)  # `--out .`: a folder with a name like any other (it once raised "has an empty name")
    try:
        msg = export_error(capsys, *base, "--to", "pipeline", "--out", ".", "--overwrite")
    finally:
        os.chdir(tmp_path)
    assert f"would have deleted the folder {other} and everything in it (holiday.jpg)" in msg
    assert tree_hashes(tmp_path) == before
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    before = tree_hashes(tmp_path)
    msg = export_error(capsys, *base, "--to", "single-file", "--guidance", 3, "--out", foreign, "--overwrite")
    assert f"would have deleted the file {foreign}" in msg and tree_hashes(tmp_path) == before
    pipe = tmp_path / "pipe"
    export.main([str(a) for a in (*base, "--to", "pipeline", "--out", pipe)])
    msg = export_error(capsys, *base, "--to", "diffusers-unet", "--guidance", 3, "--out", pipe, "--overwrite")
    assert "replaces only an earlier output of export.py --to diffusers-unet" in msg  # another --to: refused
    export.main([str(a) for a in (*base, "--to", "pipeline", "--out", pipe, "--overwrite", "--steps", "2")])
    assert "num_inference_steps=2" in (pipe / "README.md").read_text()
    single = tmp_path / "s.safetensors"
    for steps in ("4", "2"):
        export.main([str(a) for a in (*base, "--to", "single-file", "--guidance", 3, "--out", single,
                                      "--steps", steps, "--overwrite")])
    assert open_weights(single) and sorted(os.listdir(tmp_path)) == ["foreign.safetensors", "photos", "pipe",
                                                                     "s.safetensors", "work"]


def test_other_commands_never_write_over_their_inputs(work, tmp_path, capsys):
    """train.py --out / --cache-to, sample.py --out, evaluate.py --json: the same refusal, before any loading."""
    data = write_folder_dataset(tmp_path / "data", n=4, size=40)
    before = tree_hashes(tmp_path)
    for argv, message in ((["--out", str(work)], "--out .* is the input --model"),
                          (["--out", str(data / "run")], "--out .* lies inside the input --data"),
                          (["--out", str(tmp_path)], "--out .* holds the input --model"),
                          (["--cache-to", str(data)], "--cache-to .* is the input --data")):
        with pytest.raises(SystemExit, match=message):
            train.main(["--model", str(work), "--data", str(data), *TINY_RUN, "--overwrite", *argv])
    with pytest.raises(SystemExit):
        sample.main(["--model", str(work), "--student", str(work / "student"), "--out", str(work / "x.png")])
    assert "x.png lies inside the input --model" in capsys.readouterr().err
    import evaluate
    with pytest.raises(SystemExit):
        evaluate.main(["--student", str(work / "student"), "--json", str(work / "student" / "config.json")])
    assert "config.json lies inside the input --student" in capsys.readouterr().err
    assert tree_hashes(tmp_path) == before


# ---- 3. no orphans --------------------------------------------------------------------------------------------------

def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_writers_are_removed_others_reported(tmp_path, capsys):
    dead, alive = dead_pid(), os.getpid()
    (tmp_path / f".out.safetensors.{dead}@{HOST}.tmp").write_bytes(b"partial")
    (tmp_path / f".out.safetensors.{alive}@{HOST}.tmp").write_bytes(b"being written")
    (tmp_path / f".out.safetensors.{dead}@another-host.tmp").write_bytes(b"elsewhere")
    (tmp_path / ".out.safetensors.123.tmp").write_bytes(b"an older name")
    (tmp_path / f".pipe.{dead}@{HOST}.old").mkdir()  # an --overwrite killed between its renames: pipe is missing
    (tmp_path / f".pipe.{dead}@{HOST}.old" / "model_index.json").write_text("{}")
    (tmp_path / f".pipe.{dead}@{HOST}.tmp").mkdir()
    (tmp_path / "keep.txt").write_text("mine")
    notes = clean_leftovers(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([
        f".out.safetensors.{alive}@{HOST}.tmp", f".out.safetensors.{dead}@another-host.tmp",
        ".out.safetensors.123.tmp", "keep.txt", "pipe"])
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    left = [n for n in notes if n.startswith("left alone")]
    assert len(left) == 3 and all("rm -r '" in n for n in left)
    assert any(f"restored {tmp_path / 'pipe'}" in n for n in notes)
    assert clean_leftovers(tmp_path, "other") == []  # only the named output's


def test_export_cleans_what_a_killed_export_left(work, tmp_path, capsys):
    dead = dead_pid()
    out = tmp_path / "s.safetensors"
    (tmp_path / f".s.safetensors.{dead}@{HOST}.tmp").write_bytes(b"\0" * 1000)
    export.main([str(a) for a in ("--model", work, "--student", work / "student", "--to", "single-file",
                                  "--guidance", 3, "--out", out)])
    assert f"removed {tmp_path / f'.s.safetensors.{dead}@{HOST}.tmp'}" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors", "work"]


def test_a_failed_rename_keeps_the_old_output(work, tmp_path, capsys, monkeypatch):
    """--overwrite moves the old folder aside, then renames the new one in; if that rename fails, the old one is
    put back (and the new one removed): the old output stays until a new one is complete."""
    base = ("--model", work, "--student", work / "student", "--to", "pipeline", "--out", tmp_path / "pipe")
    export.main([str(a) for a in (*base, "--steps", "2")])
    real = os.replace

    def replace(src, dst):
        if Path(dst) == tmp_path / "pipe" and Path(src).name.endswith(".tmp"):
            raise OSError(18, "Invalid cross-device link")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    assert "Invalid cross-device link" in export_error(capsys, *base, "--steps", "4", "--overwrite")
    assert "num_inference_steps=2" in (tmp_path / "pipe" / "README.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["pipe", "work"]


# ---- 4. clear errors and true remarks -------------------------------------------------------------------------------

def test_exports_have_umask_modes_and_load_in_diffusers_without_warnings(work, tmp_path):
    from diffusers import LatentConsistencyModelPipeline
    from diffusers.utils import logging as diffusers_logging
    old_mask = os.umask(0o022)
    try:
        pipe = tmp_path / "pipe"
        export.main([str(a) for a in ("--model", work, "--student", work / "student", "--to", "pipeline",
                                      "--out", pipe)])
        single = tmp_path / "s.safetensors"
        export.main([str(a) for a in ("--model", work, "--student", work / "student", "--to", "single-file",
                                      "--guidance", 3, "--out", single)])
    finally:
        os.umask(old_mask)
    files = [single, *pipe.rglob("*.safetensors")]
    assert len(files) == 4 and {oct(f.stat().st_mode & 0o777) for f in files} == {"0o644"}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        LatentConsistencyModelPipeline.from_pretrained(pipe)
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if re.search("timestep_scaling|sigma_data|guidance_offset|_scott", w)], warnings
    config = read_config(pipe / "unet" / "config.json")  # our keys are still read, from unet/scott.json
    assert config["timestep_scaling"] == 5.0 and load_unet(pipe / "unet").config.timestep_scaling == 5.0
    assert "timestep_scaling" not in (pipe / "unet" / "config.json").read_text()
    assert load_unet(work / "student").config.timestep_scaling == 5.0  # the older layout reads as before


def kohya_file(path, tiny_unet, change):
    adapters = Adapters.for_config(tiny_unet, LoRAConfig(rank=2, alpha=2.0))
    state = kohya_state_dict(adapters, torch.float32)
    name = sorted(k for k in state if k.endswith(".alpha"))[0][:-len(".alpha")]
    change(state, name)
    save_file(state, str(path))
    return name


@pytest.mark.parametrize("change, message", [
    (lambda s, n: s.__setitem__(n + ".alpha", torch.tensor([2.0, 2.0])), r"\.alpha has shape \(2,\)"),
    (lambda s, n: s.__setitem__(n + ".alpha", torch.tensor(-2.0)), r"\.alpha = -2.0.*above 0"),
    (lambda s, n: s.__setitem__(n + ".lora_up.weight", s[n + ".lora_up.weight"].to(torch.int64)),
     r"lora_up\.weight is stored as torch\.int64"),
])
def test_a_bad_kohya_file_names_the_file_and_the_module(tmp_path, change, message):
    unet = UNet(UNetConfig.tiny())
    path = tmp_path / "bad.safetensors"
    name = kohya_file(path, unet, change)
    with pytest.raises(CheckpointError, match=message) as e:
        load_kohya(path, unet)
    assert str(path) in str(e.value) and name in str(e.value)


def test_a_file_too_large_to_map_is_named(tmp_path):
    """A 100 GB sparse .safetensors (a valid header, no data on disk) under a 8 GB address-space limit: mmap fails,
    and the error names the file (a subprocess, so the limit stays there)."""
    path = tmp_path / "huge.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[25000000000],"data_offsets":[0,100000000000]}}'
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 100_000_000_000)
    code = ("import resource, sys\nfrom checkpoint import open_weights, CheckpointError\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_AS)\n"
            "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, hard))\n"
            f"try:\n    open_weights({str(path)!r})\nexcept CheckpointError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert f"{path}: cannot be memory-mapped" in result.stdout and "100.0 GB" in result.stdout, result.stdout + \
        result.stderr


def test_sample_errors_are_one_line_and_its_summary_tells_the_truth(work, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--model", "/nonexistent", "--prompt", "x", "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--model /nonexistent: no such file or folder" in err and "Traceback" not in err
    step = tmp_path / "runs" / "step-0000004"
    save_unet(load_unet(work / "student"), step / "student")
    with pytest.raises(SystemExit):
        sample.main(["--model", str(work), "--student", str(step), "--prompt", "x", "--out", str(tmp_path / "b.png")])
    assert f"did you mean {step / 'student'}?" in capsys.readouterr().err
    lora = tmp_path / "lora.safetensors"
    kohya_file(lora, load_unet(work), lambda s, n: None)
    sample.main(["--model", str(work), "--lora", str(lora), "--prompt", "x", "--guidance", "7.5", *SAMPLE_SIZE,
                 "--out", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert "--guidance 7.5 is ignored" in out and "no CFG" in out and "ω=" not in out


def test_train_refuses_data_without_model_and_data_without_a_usable_sample(tmp_path, monkeypatch, capsys):
    data = tmp_path / "images"
    write_folder_dataset(data, n=5, size=40)
    for caption in [*data.glob("*.txt"), *data.glob("*.json")]:
        caption.unlink()
    with pytest.raises(SystemExit) as e:  # at parse time, naming both flags
        train.main(["--data", str(data), "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and re.search("without --model.*Pass --model PATH", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
    loaded = []
    monkeypatch.setattr(train, "load_sd15", lambda *a, **k: loaded.append(a) or pytest.fail("loaded a model"))
    model = tmp_path / "sd15"
    write_tiny_sd15(model)
    with pytest.raises(SystemExit) as e:
        train.main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "run"), *TINY_RUN,
                    "--num-workers", "0"])
    msg = str(e.value)
    named = re.findall(r"good_\d+\.\w+ \(no caption", msg)
    assert "no usable sample" in msg and f"({len(named)} skipped:" in msg and len(named) == 5, msg
    assert not loaded


# ---- 2. one writer per --out ----------------------------------------------------------------------------------------

def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def trainer(model, data, out, *extra, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return subprocess.Popen([*launcher, str(ROOT / "train.py"), "--model", str(model), "--data", str(data), "--out",
                             str(out), *TINY_RUN, "--num-workers", "0", "--steps", "100000", *extra], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_log(out: Path, proc, timeout=300):
    t0 = time.time()
    while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.5)


def test_the_lock_of_an_out_names_its_holder_and_dies_with_it(tmp_path):
    """evaluate.py --coco and the toy study take the lock train.py takes: held by another process, they refuse at
    once naming it; once that process is killed (-9: no clean-up of its own), the next one takes it."""
    from metrics import coco
    from toyworld import study
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, run_folder\nfrom pathlib import Path\n"
                               f"run_folder.lock_out(Path({str(out)!r}), 'holder')\nprint('held', flush=True)\n"
                               "time.sleep(600)"], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for claim in (coco.claim_out, study.claim_out):
            with pytest.raises(SystemExit, match=rf"{re.escape(str(out))} is in use by another run \(holder, pid "
                                                 rf"{holder.pid} on host "):
                claim(out)
    finally:
        holder.kill()
        holder.wait()
    coco.claim_out(out)
    assert f"pid {os.getpid()} on host" in (out / ".lock").read_text()


LATE_HOLDER = """import fcntl, os, socket, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(float(sys.argv[2]))  # the window between taking the lock and writing one's name, widened
handle.seek(0); handle.truncate()
handle.write(f"late holder, pid {os.getpid()} on host {socket.gethostname()}, since now\\n"); handle.flush()
time.sleep(600)
"""


@pytest.mark.parametrize("before", ["empty", "a killed run's name"])
@pytest.mark.parametrize("delay", [0.5, None])
def test_a_refusal_names_the_holder_even_before_it_wrote_its_name(tmp_path, monkeypatch, before, delay):
    """The holder writes its name just after it takes the lock; a run refused in between waits for it rather than
    report an empty name or the name of the killed run the file still holds (a pid of this host that is gone).
    A holder that never writes its name gets the fallback after run_folder.NAME_WAIT_S."""
    out = tmp_path / "out"
    out.mkdir()
    stale = f"train.py, pid {dead_pid()} on host {socket.gethostname()}, since then\n"
    (out / ".lock").write_text("" if before == "empty" else stale)
    monkeypatch.setattr(run_folder, "NAME_WAIT_S", 0.25 if delay is None else 30.0)
    holder = subprocess.Popen([sys.executable, "-c", LATE_HOLDER, str(out / ".lock"), str(delay or 600)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        expected = (f"late holder, pid {holder.pid} on host {socket.gethostname()}" if delay else
                    "a process that has not written its name yet")
        with pytest.raises(SystemExit, match=rf"is in use by another run \({re.escape(expected)}"):
            run_folder.lock_out(out, "test")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_trainers_started_at_once_into_one_out(tmp_path):
    """Exactly one runs; the other refuses at once with one line naming the holder's pid; the log and checkpoints
    are the runner's alone (every step once, in order)."""
    model = tmp_path / "sd15"
    write_tiny_sd15(model)
    data = write_folder_dataset(tmp_path / "data", n=16, size=40)
    out = tmp_path / "run"
    procs = [trainer(model, data, out), trainer(model, data, out)]
    try:
        t0 = time.time()
        while all(p.poll() is None for p in procs):
            assert time.time() - t0 < 120, "neither trainer refused"  # the refusal comes before any model loads
            time.sleep(0.2)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        _, err = loser.communicate()
        assert loser.returncode == 1 and len(err.strip().splitlines()) == 1, err
        assert f"is in use by another run (train.py, pid {winner.pid} on host" in err
        wait_for_log(out, winner)
        winner.send_signal(signal.SIGTERM)
        _, werr = winner.communicate(timeout=300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert winner.returncode == 0, werr[-2000:]
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    latest = torch.load(out / (out / "latest").read_text() / "state.pt", weights_only=True)
    assert latest["step"] == steps[-1]


@pytest.mark.slow
def test_a_torchrun_job_against_a_running_trainer(tmp_path):
    """Both ranks exit with the same one-line refusal; no rank prints a traceback (gloo's "Connection closed by
    peer" at a barrier). torchrun itself then prints its failure summary (exit 1), which names the refusal."""
    model = tmp_path / "sd15"
    write_tiny_sd15(model)
    data = write_folder_dataset(tmp_path / "data", n=16, size=40)
    out = tmp_path / "run"
    running = trainer(model, data, out)
    try:
        wait_for_log(out, running)
        job = trainer(model, data, out, torchrun=True)
        stdout, stderr = job.communicate(timeout=300)
    finally:
        running.send_signal(signal.SIGTERM)
        try:
            running.communicate(timeout=300)
        finally:
            if running.poll() is None:
                running.kill()
    print(f"torchrun exit {job.returncode}; stderr:\n{stderr}")
    refusal = f"is in use by another run (train.py, pid {running.pid} on host"
    ranks = [line for line in stderr.splitlines() if refusal in line and not line.strip().startswith("traceback")]
    assert job.returncode == 1 and len(ranks) == 2 and len(set(ranks)) == 1, stderr  # each rank: the same line
    assert "Connection closed by peer" not in stderr and not re.search(r'File ".*train\.py"', stderr)
    assert "Root Cause" in stderr and refusal in stderr.split("Root Cause")[1]  # torchrun's summary names it too
