"""The training flags of `train`, `tune` and `demo`, generated from `TrainConfig`: a group a
section, a flag a field (`training.config.FLAGS`), its help the field's docstring, its type
the field's annotation, its metavar, choices and parser the field's metadata, its default the
command's config. Add a field to `training.config` and it has a flag.

A flag given on the command line is noted in the namespace (`given`), so that
`training.cli.train.config_from_args` can layer the defaults ← `--config FILE` ← the flags
given, and tell a flag left at its default from one given with the default's value.
"""

from __future__ import annotations

import argparse
import copy
import re
from dataclasses import Field, fields
from typing import Any

from cluster.errors import UserError
from training.config import (
    FLAGS,
    FLAT_NAMES,
    SECTIONS,
    STAGES,
    TrainConfig,
    field_docs,
    field_types,
)

DEFAULTS = TrainConfig()
REQUIRED = ("data", "storage", "name")
"""What `train` and `tune` need from the command line or a --config file."""
GIVEN = "given_flags"
"""The namespace attribute that holds the flags given on the command line (their dests)."""


def add_training_flags(
    p: argparse.ArgumentParser,
    defaults: TrainConfig = DEFAULTS,
    required: tuple[str, ...] = (),
    omit: tuple[str, ...] = (),
) -> None:
    """`--config FILE` and a group of flags a TrainConfig section, defaulting to `defaults`;
    the `required` fields (flat names) must come from the command line or the file, the
    `omit`ted ones are the command's to set."""
    p.add_argument(
        "--config",
        metavar="FILE",
        help='TOML in the sections below ([data] datasets = ["DST"], [optim] lr = 0.01, …): '
        "the flags given here win over it, it over the defaults; a run's RUN/config.toml "
        "reruns it (give another --name)",
    )
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(section, " ".join((cls.__doc__ or "").split()))
        _add_fields(group, cls, defaults, required, omit)
        if section == "cluster":
            group.add_argument(
                "--address",
                default=None,
                help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)",
            )


def add_s3_endpoint_flag(p: argparse.ArgumentParser) -> None:
    """--s3-endpoint and --s3-timeout, for the commands that read s3:// without training."""
    _add_fields(p, SECTIONS["s3"], DEFAULTS)


def given(args: argparse.Namespace) -> frozenset[str]:
    """The dests of the flags given on the command line."""
    return getattr(args, GIVEN, frozenset())


def _add_fields(p, cls: type, defaults: TrainConfig, required=(), omit=()) -> None:
    for f in fields(cls):
        name = FLAT_NAMES.get(f.name, f.name)
        if FLAGS[name] is not None and name not in omit:
            p.add_argument(FLAGS[name], **_argument(cls, f, defaults, name in required))


def _argument(cls: type, f: Field, defaults: TrainConfig, required: bool) -> dict[str, Any]:
    """add_argument's keywords for field `f` of section `cls`."""
    meta, kind = f.metadata, field_types(cls)[f.name]
    name = FLAT_NAMES.get(f.name, f.name)
    default = copy.deepcopy(defaults.flat()[name])  # argparse hands it out as it is
    if meta.get("parse") == "workers":
        default = (defaults.cluster.min_workers, default)
    shown = _shown(default, meta)
    suffix = "required, here or in --config" if required else shown and f"default: {shown}"
    keywords = {
        "dest": name,
        "default": default,
        "help": _help(field_docs(cls).get(f.name, ""), suffix),
        "metavar": meta.get("metavar"),
        "choices": meta.get("choices"),
    }
    if kind is bool and f.default is True:
        return {**keywords, "action": _Switch}
    if kind is bool:
        return {**keywords, "action": _Given, "nargs": 0, "const": True}
    if "parse" in meta:
        return {**keywords, "action": _Given, "type": PARSERS[meta["parse"]]}
    if kind is list:
        return {**keywords, "action": _Given, "append": True}
    return {**keywords, "action": _Given, "type": None if kind is str else kind}


def _help(doc: str, suffix: str | None) -> str:
    """A field's docstring as help: its fields named by their flags, % escaped for argparse,
    `(suffix)` appended (the default)."""
    text = re.sub(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b", lambda m: FLAGS.get(m[0]) or m[0], doc)
    text = text.rstrip(".").replace("%", "%%")
    return f"{text} ({suffix})" if suffix else text


def _shown(value: Any, meta: dict) -> str | None:
    """A default as --help shows it (None: the docstring says what None means)."""
    parse = meta.get("parse")
    if value is None:
        return None
    if isinstance(value, bool):
        return "on" if value else "off"
    if parse == "workers":
        low, high = value
        return str(high) if low is None else f"{low}-{high}"
    if parse == "size":
        return _size_text(value)
    if isinstance(value, list):
        return ",".join(value) or "none"
    return str(value)


class _Given(argparse.Action):
    """Stores a flag's value (appends it, with `append`; its const, with nargs=0) and notes the
    flag as given on the command line: a --config file's value yields to it, not to a
    default."""

    def __init__(self, option_strings, dest, append: bool = False, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.append = append

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if self.nargs == 0:
            values = self.const
        elif self.append:
            before = getattr(namespace, self.dest) if self.dest in given(namespace) else []
            values = [*before, values]
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN, given(namespace) | {self.dest})


class _Switch(argparse.BooleanOptionalAction):
    """--name and --no-name for a field that defaults to true, noted as `_Given` notes."""

    def __init__(self, option_strings, dest, help: str | None = None, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.help = help  # ours says "on"/"off"; argparse's own would append "(default: True)"

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, values, option_string)
        setattr(namespace, GIVEN, given(namespace) | {self.dest})


def _stages(text: str) -> list[str]:
    if text in ("", "none"):
        return []
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown stage {bad[0]!r}; choose from {','.join(STAGES)}"
        )
    return stages


def _mix(text: str) -> str:
    from training.data.mix import parse_mix

    try:
        return parse_mix(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--mix {text!r}: ")) from None


def _workers(text: str) -> tuple[int | None, int]:
    low, _, high = text.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number or MIN-MAX, e.g. 2-8") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return (lo if high else None), hi


def _size(text: str) -> int:
    from data_prep.splits import parse_size

    try:
        return parse_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size_text(size: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


PARSERS = {"mix": _mix, "size": _size, "stages": _stages, "workers": _workers}
"""How a flag's text is read, by the `parse` its field's metadata names."""
