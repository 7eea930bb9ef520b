"""Reading weight files safely, loading them strictly, and writing files atomically.

Every loader in the project (unet.py, vae.py, sd15.py) goes through this file, so the rules live in one place:
  - `.safetensors` is opened lazily through `safe_open` (memory-mapped): a tensor is read only when asked for.
  - `.ckpt` / `.pt` / `.bin` are pickles and are opened only with `torch.load(weights_only=True)`, which refuses to
    run code; `mmap=True` keeps them lazy too where the file format allows.
  - `load_strict` checks every key and every shape *before* touching the module, then assigns tensors one at a
    time, converted straight to the target dtype. Modules are built on the meta device, so a 4 GB checkpoint needs
    little more RAM than the model it fills. There is never a partial load.
  - Only regular files are opened (a FIFO or device named like a weight file would block or never end), and an empty
    file is refused by its size.
  - config.json values are checked with `require` (type, range, consistency) before a model is built from them.
Every failure is a `CheckpointError` that names the file, the first offending key, expected vs found, and what to do.
"""
import json
import math
import os
import re
import shutil
import socket
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# Prefixes of the original (CompVis/LDM) single-file layout, e.g. v1-5-pruned-emaonly.safetensors.
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model.transformer."
SUPPORTED = ("a Stable Diffusion 1.x checkpoint: a diffusers folder (model_index.json, unet/, vae/, text_encoder/), "
             "its unet/ or vae/ subfolder, an original single file (.safetensors or .ckpt), or a UNet folder saved by "
             "this project")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# The project's own keys of a component's config.json (a student's boundary scalings and ω convention) may live in
# this file beside it, where diffusers does not read them (export.py --to pipeline puts them there); read_config
# merges it back in.
SCOTT_CONFIG = "scott.json"


class CheckpointError(ValueError):
    """A weight file or folder that cannot be loaded; the message says which, why and what to do."""


class OutputRefused(ValueError):
    """An output path that is, holds or lies inside an input, or that --overwrite would replace though it is not an
    earlier output of the same command; the message says which and what to do."""


class LazyWeights(Mapping):
    """Read-only name -> tensor view of a safetensors file; each tensor is read from the mmap when indexed."""

    def __init__(self, path: Path):
        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())
        self._key_set = set(self._keys)

    def __contains__(self, key):  # without this, Mapping's `in` would read the tensor
        return key in self._key_set

    def __getitem__(self, key):
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def shape(self, key) -> tuple:
        """The tensor's shape from the header, without reading its data."""
        return tuple(self._file.get_slice(key).get_shape())


def shape_of(weights: Mapping, key) -> tuple:
    """A tensor's shape without reading its data where the mapping allows it."""
    return weights.shape(key) if hasattr(weights, "shape") else tuple(weights[key].shape)


def check_regular_file(path: Path, what: str) -> None:
    """Refuse a missing path, a folder, or anything but a regular file (FIFO, socket, device) before it is opened:
    opening a FIFO blocks until someone writes to it, and a device may never end."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder. Expected {what}.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected {what} (a file).")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a FIFO, socket or device?); expected {what}. Point to "
                              "the file itself, or copy it to disk.")


def open_weights(path) -> Mapping:
    """Open a weight file as a lazy mapping of names to tensors (see module docstring for the safety rules)."""
    path = Path(path)
    check_regular_file(path, f"a weight file (.safetensors or {'/'.join(PICKLE_SUFFIXES)}) of {SUPPORTED}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes), perhaps an interrupted download or copy: "
                              "download or copy it again.")
    if path.suffix == ".safetensors":
        try:
            return LazyWeights(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}). The file may be truncated or "
                                  f"corrupt (an interrupted download?): download or copy it again.") from None
        except (RuntimeError, MemoryError) as e:  # safe_open maps the whole file: a huge (or sparse) one may not fit
            raise CheckpointError(f"{path}: cannot be memory-mapped ({type(e).__name__}: {str(e)[:200]}); the "
                                  f"file is {path.stat().st_size / 1e9:.1f} GB. It is larger than "
                                  "this process may map (ulimit -v?) or not a real checkpoint: check the file, or "
                                  "raise the limit.") from None
    if path.suffix in PICKLE_SUFFIXES:
        return _load_pickle(path)
    raise CheckpointError(f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors or "
                          f"{'/'.join(PICKLE_SUFFIXES)}. Expected {SUPPORTED}.")


def _load_pickle(path: Path) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, a pickle can never run code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many types for bad pickles: report them all the same way
        first_line = (str(e).splitlines() or ["no message"])[0][:300]
        raise CheckpointError(f"{path}: cannot be read as a weights-only PyTorch checkpoint ({type(e).__name__}: "
                              f"{first_line}). It may be truncated, corrupt, or contain code "
                              f"objects, which are never unpickled here. Convert it to .safetensors.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning-style wrapper of the original SD checkpoints
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds no tensors by name (found {type(obj).__name__}); not a checkpoint.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}  # drop step counters and other scalars


def find_weights_file(folder, stems=("diffusion_pytorch_model", "model")) -> Path:
    """The weight file of a diffusers component folder, preferring safetensors over pickles."""
    folder = Path(folder)
    for suffix in (".safetensors", ".bin"):
        for stem in stems:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(s + '.safetensors' for s in stems)}; "
                          f"the folder holds {found[:10] or 'nothing'}). Expected {SUPPORTED}.")


def read_config(path) -> dict:
    """A JSON config file as a dict, with a clear error if it is missing, not a regular file, or malformed.
    Check its values with `require`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: missing. A diffusers component folder needs its config.json.")
    check_regular_file(path, "a JSON config file")
    try:
        config = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # JSON syntax, not UTF-8, nested too deeply
        raise CheckpointError(f"{path}: not valid JSON ({type(e).__name__}: {e}).") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}.")
    if path.name == "config.json" and path.with_name(SCOTT_CONFIG).is_file():
        config = {**config, **read_config(path.with_name(SCOTT_CONFIG))}  # our keys, kept out of diffusers' way
    return config


REQUIRED = object()  # require()'s default `default`: the key must be present


def require(config: Mapping, key: str, kind, source, check=None, rule: str = "", default=REQUIRED):
    """config[key] (or `default` if absent) if it is a `kind` that passes `check`; else a CheckpointError naming
    `source`, the key, the value found and what it must be (`rule`, e.g. "a positive integer").

    kind: a type or tuple of types. A JSON true/false never passes as a number, and an int passes as a float (JSON
    writes 2.0 as 2). check: a predicate on the value; one that raises counts as failing. Defaults are checked too,
    since they may conflict with other values (a default norm_num_groups that does not divide the channels).
    Usage: groups = require(config, "norm_num_groups", int, path, is_positive, "a positive integer", default=32)
    """
    if key not in config and default is REQUIRED:
        raise CheckpointError(f"{source}: {key!r} is missing; it must be {rule or _kind_name(kind)}.")
    value = config.get(key, default)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    valid = isinstance(value, kinds + ((int,) if float in kinds else ())) and (bool in kinds or not isinstance(
        value, bool))
    if valid and check is not None:
        try:
            valid = bool(check(value))
        except Exception:  # e.g. a list holding strings where numbers belong
            valid = False
    if not valid:
        shown = repr(value) if len(repr(value)) <= 100 else repr(value)[:100] + "..."
        absent = " (absent: the default)" if key not in config else ""
        raise CheckpointError(f"{source}: {key} = {shown}{absent} is invalid; it must be {rule or _kind_name(kind)}. "
                              "Fix the value, or use the model's original config.json.")
    return value


def _kind_name(kind) -> str:
    """'an int', 'a list or a str': the type(s) `kind` in words, for require's messages."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(("an " if k.__name__[0] in "aeiou" else "a ") + k.__name__ for k in kinds)


def is_positive(value) -> bool:
    """A finite number above 0 (not a bool): channel counts, group counts, scales."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def is_positive_int_list(value) -> bool:
    """A non-empty list of positive integers: block_out_channels and the like."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) and is_positive(v) for v in value)


class RenamedWeights(Mapping):
    """A lazy view of `weights` under new names: `names` maps each new name to the name in the file."""

    def __init__(self, weights: Mapping, names: dict):
        self.weights, self.names = weights, names

    def __contains__(self, key):
        return key in self.names

    def __getitem__(self, key):
        return self.weights[self.names[key]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def shape(self, key) -> tuple:
        return shape_of(self.weights, self.names[key])


def detect_foreign(weights: Mapping, source) -> None:
    """Refuse single files of other model families with a message that says what they are (SD1.x only)."""
    keys = list(weights)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{source}: this is an SDXL checkpoint (conditioner.embedders.*); only {SUPPORTED}.")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise CheckpointError(f"{source}: this is an SD 2.x checkpoint (OpenCLIP text encoder "
                              f"cond_stage_model.model.*); only {SUPPORTED}.")
    k_proj = LDM_UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if k_proj in weights and shape_of(weights, k_proj)[1] == 1024:
        raise CheckpointError(f"{source}: cross-attention width 1024 at {k_proj}: an SD 2.x UNet (SD1.x uses "
                              f"768). Only {SUPPORTED}.")


def load_strict(module: torch.nn.Module, weights: Mapping, source, device="cpu", dtype=None) -> torch.nn.Module:
    """Fill `module` (possibly on the meta device) with `weights`, whose keys must equal its state_dict's exactly.

    All checks happen before any assignment, so a failure leaves nothing half-loaded. Floating tensors are cast to
    `dtype` (if given) one at a time as they are read; a weight the module holds as floating point must be stored
    as floating point (an int8 or bool tensor there is a quantised or foreign file, not something to cast).
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} weight(s) missing, first {missing[0]!r} (shape "
                              f"{tuple(expected[missing[0]].shape)}). The file is incomplete or belongs to another "
                              f"model; expected {SUPPORTED}.")
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected weight(s), first {unexpected[0]!r} (shape "
                              f"{shape_of(weights, unexpected[0])}). The file belongs to another model or config; "
                              f"expected {SUPPORTED}.")
    for k, ref in expected.items():
        if shape_of(weights, k) != tuple(ref.shape):
            raise CheckpointError(f"{source}: weight {k!r} has shape {shape_of(weights, k)}, expected "
                                  f"{tuple(ref.shape)}. The config does not match the weights.")
    state = {}
    for k, ref in expected.items():
        t = weights[k]
        if ref.is_floating_point() != t.is_floating_point():
            raise CheckpointError(f"{source}: weight {k!r} is stored as {t.dtype}, expected a "
                                  f"{'floating-point' if ref.is_floating_point() else ref.dtype} tensor. The file "
                                  "is quantised or from another model; use an fp32, fp16 or bf16 file.")
        state[k] = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)
    module.load_state_dict(state, strict=True, assign=True)
    return module


# ---- writing: atomic files, their leftovers, and outputs that must not touch the inputs -----------------------------

HOST = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"
# .NAME.<pid>@<host>.tmp (being written) and .NAME.<pid>@<host>.old (the output it replaces, moved aside between the
# two renames of a folder's --overwrite); older versions wrote .NAME.<pid>.tmp, without the host.
LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)(?:@(?P<host>[A-Za-z0-9_-]+))?\.(?P<kind>tmp|old)")


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """Where this process writes (kind "tmp") or moves aside (kind "old") `path` before renaming: .NAME.<pid>@<host>.KIND
    beside it, so that a later run can tell whose it is (clean_leftovers)."""
    return path.with_name(f".{path.name}.{os.getpid()}@{HOST}.{kind}")


def file_mode() -> int:
    """The mode open() gives a new file under the current umask (0o644 for the usual 022)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, write) -> None:
    """write(tmp_path) then rename it over `path`: a reader (or a crash) sees the old file or the whole new one,
    never half of one. Used for every weight file, config and checkpoint the project writes. The file gets the
    umask's mode (safetensors' save_file creates 0600 files, unreadable to a shared models folder's service).
    A kill leaves .NAME.<pid>@<host>.tmp, which clean_leftovers removes on the next run."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        if tmp.is_file() and not tmp.is_symlink():
            os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_path(path: Path) -> None:
    """Delete a file, link or folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(folder, name: str | None = None) -> list[str]:
    """Undo what interrupted atomic writes left in `folder` (of the output `name` only, or of any): a .tmp (partial)
    is deleted; an .old (a complete earlier output, moved aside by an --overwrite killed between its two renames) is
    renamed back to NAME if NAME is missing, else deleted. Only leftovers of processes of this host that are gone
    are touched; the others (a live process, another host, an older name without the host) are reported with the
    command that removes them. Returns what was done or found, in words, for the caller to print."""
    folder, notes = Path(folder), []
    if not folder.is_dir():
        return notes
    found = [(m, folder / m.string) for entry in sorted(os.listdir(folder)) if (m := LEFTOVER.fullmatch(entry))
             and (name is None or m.group("name") == name)]
    for m, path in sorted(found, key=lambda f: f[0].group("kind") == "tmp"):  # .old first: it may be restored
        owner = f"pid {m.group('pid')} on {m.group('host') or 'an unknown host'}"
        if m.group("host") != HOST or process_alive(int(m.group("pid"))):
            notes.append(f"left alone {path} ({owner}, which may still be writing it); once it is not, remove it: "
                         f"rm -r '{path}'")
            continue
        final = folder / m.group("name")
        if m.group("kind") == "old" and not (final.exists() or final.is_symlink()):
            os.replace(path, final)
            notes.append(f"restored {final} from {path.name} (an --overwrite interrupted before the new output "
                         f"was complete)")
        else:
            remove_path(path)
            notes.append(f"removed {path} (left by an interrupted write, {owner})")
    return notes


def refuse_overlap(out, inputs: dict, flag: str = "--out") -> None:
    """OutputRefused if the output `out` is, holds or lies inside one of `inputs` ({flag: path}; empty paths are
    skipped), symbolic links resolved: writing (or --overwrite's deleting) there could destroy an input. Call it
    before any other check of `out`: no flag makes such an output acceptable."""
    target = Path(os.path.abspath(out)).resolve()
    hits = []
    for name, path in inputs.items():
        if not path:
            continue
        source = Path(os.path.abspath(path)).resolve()
        relation = ("is" if target == source else "lies inside" if source in target.parents else
                    "holds" if target in source.parents else None)
        if relation:
            hits.append((("is", "lies inside", "holds").index(relation), relation, name, path, source))
    if hits:
        _, relation, name, path, source = min(hits, key=lambda hit: hit[0])  # the closest: "is" before the others
        raise OutputRefused(f"{flag} {out} {relation} the input {name} {path}"
                            f"{'' if str(source) == str(path) else f' ({source})'}: writing there could replace "
                            f"or delete it. Choose {flag} outside every input (no flag, --overwrite included, "
                            f"allows this).")
