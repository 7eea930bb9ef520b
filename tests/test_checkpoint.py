"""checkpoint.py and vae.py's config reader against bad input: every failure is a CheckpointError that names the file.

Each test first makes the input that used to raise a raw error, repeat torch's message per parameter or hang, then
checks the clear error chosen instead: empty weight files, non-float weights, FIFOs named like weight or config
files, and config.json values of the wrong type or range.
"""
import json
import os
import re
import threading

import pytest
import torch
from safetensors.torch import save_file

from checkpoint import CheckpointError, is_positive, load_strict, open_weights, read_config, require
from vae import VAEConfig, load_vae


def named(path) -> str:
    return re.escape(str(path))


# ---- empty and non-regular files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors", ".bin"])
def test_an_empty_weight_file_is_named(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"{named(path)}: the file is empty \\(0 bytes\\)"):
        open_weights(path)


def test_a_pickle_error_without_a_message_is_still_reported(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not a checkpoint")

    def fail(*args, **kwargs):
        raise EOFError()  # torch's error for some truncated files: str(e) == ""
    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(CheckpointError, match=f"{named(path)}: cannot be read .*EOFError: no message"):
        open_weights(path)


def call_with_fifo_rescue(function, fifo):
    """function(fifo) in a thread; if it blocks on opening the FIFO, write to the FIFO to free it, and say so."""
    outcome = {}

    def run():
        try:
            outcome["result"] = function(fifo)
        except Exception as e:
            outcome["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=5)
    if thread.is_alive():  # blocked in open(): give it a writer so that the test ends, and fail
        with open(fifo, "wb") as writer:
            writer.write(b"{}")
        thread.join(timeout=5)
        pytest.fail(f"{function.__name__} blocked on the FIFO {fifo}")
    return outcome


@pytest.mark.parametrize("name, function", [("model.safetensors", open_weights), ("model.ckpt", open_weights),
                                            ("config.json", read_config)])
def test_a_fifo_named_like_a_weight_or_config_file_is_refused_before_opening(tmp_path, name, function):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    outcome = call_with_fifo_rescue(function, fifo)
    assert isinstance(outcome.get("error"), CheckpointError), outcome
    assert re.search(f"{named(fifo)}: not a regular file \\(a FIFO", str(outcome["error"]))


def test_a_config_nested_too_deeply_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=f"{named(path)}: not valid JSON \\(RecursionError"):
        read_config(path)


# ---- weights of the wrong dtype -------------------------------------------------------------------------------------

def test_non_float_weights_are_refused_by_name_before_anything_is_loaded(tmp_path):
    path = tmp_path / "quantised.safetensors"
    save_file({"weight": torch.ones(3, 2, dtype=torch.int8), "bias": torch.ones(3, dtype=torch.int8)}, str(path))
    with torch.device("meta"):
        layer = torch.nn.Linear(2, 3)
    with pytest.raises(CheckpointError, match=f"{named(path)}: weight 'weight' is stored as torch.int8, expected a "
                                              "floating-point tensor.*fp32, fp16 or bf16"):
        load_strict(layer, open_weights(path), path)
    assert layer.weight.is_meta  # nothing was assigned
    save_file({"weight": torch.ones(3, 2, dtype=torch.float16), "bias": torch.ones(3, dtype=torch.bfloat16)},
              str(path))
    load_strict(layer, open_weights(path), path, dtype=torch.float32)  # any float dtype is cast
    assert layer.weight.dtype == layer.bias.dtype == torch.float32 and torch.equal(layer.bias, torch.ones(3))


# ---- config.json values -------------------------------------------------------------------------------------------

GOOD_VAE = VAEConfig.tiny().to_diffusers_config()


@pytest.mark.parametrize("key, value, rule", [
    ("block_out_channels", 128, "a non-empty list of positive integers"),     # was TypeError (len of an int)
    ("block_out_channels", "128", "a non-empty list of positive integers"),   # was TypeError in the model
    ("block_out_channels", [16, "32", 32], "a non-empty list of positive integers"),
    ("block_out_channels", [], "a non-empty list of positive integers"),
    ("norm_num_groups", 0, "a positive integer that divides every block_out_channels entry"),  # ZeroDivisionError
    ("norm_num_groups", 12, "a positive integer that divides every block_out_channels entry"),
    ("norm_num_groups", 8.0, "a positive integer"),
    ("layers_per_block", "2", "a positive integer"),                          # was TypeError in range()
    ("layers_per_block", 0, "a positive integer"),
    ("in_channels", True, "a positive integer"),
    ("scaling_factor", "0.18215", "a positive number"),
    ("scaling_factor", 0, "a positive number"),
])
def test_wrong_vae_config_values_are_named_with_the_file(tmp_path, key, value, rule):
    (tmp_path / "config.json").write_text(json.dumps({**GOOD_VAE, key: value}))
    with pytest.raises(CheckpointError, match=f"{named(tmp_path / 'config.json')}: {key} = .* is invalid; it must "
                                              f"be {re.escape(rule)}"):
        load_vae(tmp_path)


def test_vae_config_defaults_are_checked_against_the_other_values():
    assert VAEConfig.from_diffusers_config({**GOOD_VAE, "scaling_factor": 1}, "x").scaling_factor == 1.0
    no_groups = {k: v for k, v in GOOD_VAE.items() if k != "norm_num_groups"}  # default 32 does not divide 16
    with pytest.raises(CheckpointError, match=r"x: norm_num_groups = 32 \(absent: the default\) is invalid"):
        VAEConfig.from_diffusers_config(no_groups, "x")


def test_require_checks_presence_type_and_rule():
    config = {"n": 3, "flag": True, "scale": 2, "name": "x" * 500, "channels": [1, "2"]}
    assert require(config, "n", int, "cfg.json", is_positive, "a positive integer") == 3
    assert require(config, "scale", float, "cfg.json", is_positive) == 2  # JSON may write 2.0 as 2
    assert require(config, "absent", int, "cfg.json", default=7) == 7
    assert require(config, "flag", bool, "cfg.json") is True
    with pytest.raises(CheckpointError, match="cfg.json: 'absent' is missing; it must be an int"):
        require(config, "absent", int, "cfg.json")
    with pytest.raises(CheckpointError, match="cfg.json: flag = True is invalid; it must be an int"):
        require(config, "flag", int, "cfg.json")  # JSON true is not the number 1
    with pytest.raises(CheckpointError, match=r"cfg.json: name = 'x{99}\.\.\. is invalid; it must be a long name"):
        require(config, "name", str, "cfg.json", lambda s: len(s) < 100, "a long name")
    with pytest.raises(CheckpointError, match="channels = \\[1, '2'\\] is invalid; it must be a list or a tuple"):
        require(config, "channels", (list, tuple), "cfg.json", lambda v: sum(v) > 0)  # a check that raises fails
