"""Settings: each one declared once, in its config dataclass, with `setting(default, help, bounds)`.

Everything else is derived from that one declaration: the command-line flag (`--micro-batch` for `micro_batch`) and
its `--help` line, the check of its value (integers and floats against their bounds, floats finite, strings among
their choices), and the keys a TOML preset may set (`configs/*.toml`, a model folder's `scott.toml`). Adding a field
to a config dataclass is the only edit a new flag needs.

    @dataclass
    class ConsistencyConfig:
        k: int = setting(24, "t_n − t_m in DDPM timesteps (paper: 24)", at_least=1)
        def __post_init__(self):
            check_settings(self)     # every field against its declaration; cross-field checks follow
"""
import argparse
import dataclasses
import math
import tomllib
from pathlib import Path


def setting(default, help: str, *, at_least=None, above=None, at_most=None, below=None, choices=None,
            lora_student=None):
    """A dataclass field with what its flag needs: `help` (one line, shown by --help), inclusive bounds
    `at_least`/`at_most` or exclusive ones `above`/`below`, the allowed `choices` of a string, and `lora_student`,
    the default that applies instead when the student is a LoRA (--student-lora-rank > 0) and the flag is not
    given. The type is the default's."""
    meta = dict(help=help, at_least=at_least, above=above, at_most=at_most, below=below,
                choices=tuple(choices) if choices else None, lora_student=lora_student)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_value(name: str, value, field: dataclasses.Field):
    """ValueError naming the flag if `value` breaks the field's declaration (type, bounds, choices)."""
    meta, default, flag = field.metadata, field.default, flag_of(name)
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{flag} {value!r}: must be {'true or false' if kind is bool else f'a {kind.__name__}'}.")
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{flag} {value}: must be a finite number.")
    for bound, broken, sign in (("at_least", value.__lt__, "≥"), ("above", value.__le__, ">"),
                                ("at_most", value.__gt__, "≤"), ("below", value.__ge__, "<")):
        if meta.get(bound) is not None and broken(meta[bound]):
            what = "an integer " if kind is int else ""
            raise ValueError(f"{flag} {value}: must be {what}{sign} {meta[bound]} ({meta['help']}).")
    if meta.get("choices") and value not in meta["choices"]:
        raise ValueError(f"{flag} {value!r}: must be one of {', '.join(meta['choices'])}.")
    return value


def check_settings(cfg):
    """Check every declared field of the dataclass instance `cfg` (call first in its __post_init__)."""
    for f in dataclasses.fields(cfg):
        if "help" in f.metadata:
            object.__setattr__(cfg, f.name, check_value(f.name, getattr(cfg, f.name), f))


def declared(classes) -> dict:
    """{name: field} of every declared setting of the config classes; a name declared twice is a bug."""
    fields = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                assert f.name not in fields, f"setting {f.name!r} is declared twice ({cls.__name__})"
                fields[f.name] = f
    return fields


def add_arguments(parser: argparse.ArgumentParser, title: str, cls):
    """One argparse group for the config class: a flag per declared field, default None (not given), so that
    presets and the LoRA-student defaults can fill in what the command line left out."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        meta = f.metadata
        shown = f"default {f.default!r}" if isinstance(f.default, str) else f"default {f.default}"
        if meta["lora_student"] is not None:
            shown += f"; LoRA student: {meta['lora_student']}"
        help_line = f"{meta['help']} ({shown})".replace("%", "%%")
        if isinstance(f.default, bool):
            group.add_argument(flag_of(f.name), action=argparse.BooleanOptionalAction, default=None, help=help_line)
        else:
            group.add_argument(flag_of(f.name), type=type(f.default), default=None, choices=meta["choices"],
                               help=help_line)


def flags_given(parser: argparse.ArgumentParser, argv=None) -> dict:
    """{setting: value} of the flags given on the command line (add_arguments' flags default to None)."""
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def parse_settings(parser: argparse.ArgumentParser, cls, argv=None):
    """An instance of the config class `cls` from the command line, a flag per declared setting; a value that breaks
    its declaration or a cross-field check of cls (a ValueError naming the flag) is a usage error."""
    add_arguments(parser, "settings", cls)
    try:
        return cls(**flags_given(parser, argv))
    except ValueError as e:
        parser.error(str(e))


MODEL_SETTINGS = "scott.toml"  # a model folder's own defaults: [train] for train.py, [sample] for sample.py


def read_toml(path: Path) -> tuple[dict, str]:
    """(the parsed document, its text); ValueError naming the file if it is not valid TOML."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML ({e}).") from None


def read_preset(path: Path, fields: dict, table: str | None = None) -> dict:
    """A TOML preset's settings {name: value}, keys written as the flags are (`micro-batch` or `micro_batch`),
    from the top level or from `[table]`. Raises ValueError naming the file, the key and its line for an
    unknown key or a value its declaration refuses."""
    doc, text = read_toml(path)
    if table is not None:
        doc = doc.get(table, {})
    values = {}
    for key, value in doc.items():
        if isinstance(value, dict) and table is None:  # a table for another command ([sample] in scott.toml)
            continue
        name = key.replace("-", "_")
        where = f"{path}, line {_line_of(text, key)}: {key}"
        if name not in fields:
            raise ValueError(f"{where}: no such setting (`python train.py --help` lists them, as flags).")
        try:
            values[name] = check_value(name, value, fields[name])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return values


def model_settings(model: Path, table: str, fields: dict | None = None) -> dict:
    """A model folder's own defaults for one command: the `[table]` of its scott.toml ({} for a single file or a
    folder without one). The shipped toy model carries one; an SD1.5 folder needs none. With `fields`, every key
    is checked as in a preset."""
    path = Path(model) / MODEL_SETTINGS
    if not path.is_file():
        return {}
    return read_preset(path, fields, table) if fields is not None else read_toml(path)[0].get(table, {})


def _line_of(text: str, key: str) -> int | str:
    """The line a key is set on, for error messages ('?' if it cannot be found)."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.split("=")[0].strip().strip('"') == key:
            return number
    return "?"
