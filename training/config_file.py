"""A run's config as TOML, in `TrainConfig`'s sections: `--config FILE` reads one, and every
run writes its resolved config as `RUN/config.toml`.

    [data]
    datasets = ["./shards/flowers", "./shards/birds"]
    image_size = 224

    [optim]
    lr = 0.01

Keys are the field names (`datasets`, `endpoint`), values TOML's: a string, a number, true or
false, a list of strings. TOML has no null, so a field that is None is left out of a written
file, and a key a file leaves out keeps its default.

    read_config_file("run.toml")   # {flat name: value}, each checked, or a one-line UserError
    config_toml(cfg)               # the text of RUN/config.toml
"""

from __future__ import annotations

import difflib
from typing import Any

from cluster import storage
from cluster.errors import UserError
from data_prep.splits import parse_size
from training.config import FLAT_NAMES, SECTIONS, STAGES, WHERE, TrainConfig, field_types

CONFIG_FILE = "config.toml"
"""The resolved config of a run, in its run directory, beside result.json."""
_HEADER = (
    "# The resolved config of this run (TOML; None values left out). Rerun it with\n"
    "#   metatrainer train --config RUN/config.toml --name NEW_NAME\n"
    "# (the same --storage and name would resume it); flags override what is here.\n"
)


def read_config_file(path: str) -> dict[str, Any]:
    """FILE's settings by flat name (`lr`, `data`, `s3_endpoint`), each checked: a missing or
    malformed file, an unknown section or key, or a value of the wrong type is one UserError
    line naming it."""
    try:
        import tomllib  # Python 3.11 on: the project still installs on 3.10
    except ImportError:
        raise UserError(f"--config {path}: reading TOML needs Python 3.11 or later") from None
    if not storage.exists(path):
        raise UserError(f"--config {path}: no such file")
    try:
        text = storage.read_bytes(path).decode()
    except UserError as e:
        raise UserError(f"--config {path}: {e}") from None
    except UnicodeDecodeError:
        raise UserError(f"--config {path}: not a TOML file (not UTF-8 text)") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"--config {path}: not valid TOML: {e}") from None
    try:
        return config_values(document)
    except ValueError as e:
        raise UserError(f"--config {path}: {e}") from None


def config_values(document: dict[str, Any]) -> dict[str, Any]:
    """A parsed TOML document's settings by flat name; a ValueError names the first bad one."""
    values = {}
    for section, table in document.items():
        if section not in SECTIONS:
            raise ValueError(_unknown_section(section))
        if not isinstance(table, dict):
            raise ValueError(f"{section} must be a section, [{section}], not a value")
        types = field_types(SECTIONS[section])
        for key, value in table.items():
            if key not in types:
                raise ValueError(_unknown_key(section, key))
            values[FLAT_NAMES.get(key, key)] = check_value(section, key, value)
    if values.get("batch_size") is not None and values.get("global_batch") is not None:
        raise ValueError("[optim] give batch_size (per worker) or global_batch, not both")
    return values


def check_value(section: str, key: str, value: Any) -> Any:
    """`value` as field `key` of `section` takes it (an int for a float field: a float), or a
    ValueError that says what it must be."""
    cls = SECTIONS[section]
    kind = field_types(cls)[key]
    meta = cls.__dataclass_fields__[key].metadata
    where = f"[{section}] {key}"
    if meta.get("parse") == "size" and isinstance(value, str):
        try:
            return parse_size(value)
        except UserError as e:
            raise ValueError(f"{where}: {e}") from None
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false, not {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where} must be a whole number, not {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where} must be a number, not {value!r}")
        value = float(value)
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, not {value!r}")
    if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ValueError(f'{where} must be a list of strings, e.g. ["a", "b"], not {value!r}')
    if "choices" in meta and value not in meta["choices"]:
        raise ValueError(f"{where} must be one of {', '.join(meta['choices'])}, not {value!r}")
    if meta.get("parse") == "stages" and any(v not in STAGES for v in value):
        bad = next(v for v in value if v not in STAGES)
        raise ValueError(f"{where}: unknown stage {bad!r}; choose from {', '.join(STAGES)}")
    return value


def _unknown_section(name: str) -> str:
    if name in {k for _, k in WHERE.values()}:
        section = next(s for s, k in WHERE.values() if k == name)
        return f"{name} belongs in a section: put it under [{section}]"
    return f"unknown section [{name}]; the sections are {', '.join(f'[{s}]' for s in SECTIONS)}"


def _unknown_key(section: str, key: str) -> str:
    elsewhere = [s for s, k in WHERE.values() if k == key]
    if elsewhere:
        return f"[{section}] has no key {key!r}: it belongs in [{elsewhere[0]}]"
    known = list(field_types(SECTIONS[section]))
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]}?" if close else f"its keys: {', '.join(known)}"
    return f"[{section}] has no key {key!r}; {hint}"


def config_toml(cfg: TrainConfig) -> str:
    """`cfg` as TOML, a table a section, None values left out."""
    lines = [_HEADER]
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # 1e-05, 60.0, inf, nan: each a TOML number
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__} {value!r}")


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped."""
    out = (_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c) for c in text)
    return '"' + "".join(out) + '"'
