"""`metatrainer tune`'s search space, from the command line: each searched flag takes a plain
value (the same in every trial), `loguniform:LOW:HIGH` or `uniform:LOW:HIGH` (numbers), or
`choice:A,B,…`; in `--adapters`, one choice's stages are joined with `+`.

    parse_space({"lr": "loguniform:1e-4:1e-2", "adapters": "choice:none,layer4,layer3+layer4"})
"""

from __future__ import annotations

import math
from typing import Any

from cluster.errors import UserError
from training.config import STAGES

SEARCHED = {
    "lr": "--lr",
    "meta_lambda": "--meta-lambda",
    "adapters": "--adapters",
    "batch_size": "--batch-size",
}
"""The TrainConfig fields a search may vary, and their flags."""
FORMS = "a plain value, loguniform:LOW:HIGH, uniform:LOW:HIGH or choice:A,B,…"


def parse_space(specs: dict[str, str]) -> dict[str, Any]:
    """{field: spec} → {field: a fixed value or a Tune domain}; None stays None (a flag that
    is not searched: --batch-size beside --global-batch)."""
    return {
        key: None if text is None else parse_spec(SEARCHED[key], text)
        for key, text in specs.items()
    }


def parse_spec(flag: str, text: str) -> Any:
    """A plain value (fixed for every trial), loguniform:/uniform: (numbers) or choice:."""
    from ray import tune

    kind, values = spec_values(flag, text)
    if kind == "value":
        return values[0]
    if kind == "choice":
        return tune.choice(values)
    return tune.loguniform(*values) if kind == "loguniform" else tune.uniform(*values)


def spec_values(flag: str, text: str) -> tuple[str, list[Any]]:
    """What a spec stands for, checked: ("value", [v]), ("choice", [a, b, …]) or
    ("uniform"/"loguniform", [low, high]). Two specs are the same search when these are
    equal: `loguniform:1e-3:1e-1` is `loguniform:0.001:0.1`."""
    kind, colon, rest = str(text).partition(":")
    if not colon:
        return "value", [_value(flag, text)]
    if kind == "choice":
        # The commas separate the choices (an --adapters choice joins its stages with '+').
        values = [_value(flag, v.strip()) for v in rest.split(",") if v.strip()]
        if not values:
            raise UserError(f"{flag} {text}: choice: needs at least one value, e.g. choice:A,B")
        return kind, values
    if kind in ("uniform", "loguniform"):
        if flag in ("--adapters", "--batch-size"):
            raise UserError(f"{flag} {text}: give {flag} a plain value or choice:A,B,…")
        bounds = rest.split(":")
        low, high = (_number(flag, text, b) for b in bounds) if len(bounds) == 2 else (0, 0)
        if len(bounds) != 2 or not low < high or (kind == "loguniform" and low <= 0):
            raise UserError(
                f"{flag} {text}: {kind} needs LOW:HIGH with LOW < HIGH"
                + (" and LOW > 0" if kind == "loguniform" else "")
                + f"; give {FORMS}"
            )
        _value(flag, str(low))
        return kind, [low, high]
    raise UserError(f"{flag} {text}: unknown form {kind!r}; give {FORMS}")


def _value(flag: str, text: str) -> Any:
    """One value of `flag`, checked as `metatrainer train` would."""
    if flag == "--adapters":
        return "+".join(adapter_stages(text.replace(",", "+"))) or "none"
    if flag == "--batch-size":
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"{flag} {text}: not a whole number; give {FORMS}") from None
        if value < 1:
            raise UserError(f"{flag} {text}: must be at least 1")
        return value
    value = _number(flag, text, text)
    if value < 0 or (flag == "--lr" and value == 0):
        raise UserError(f"{flag} {text}: must be {'more than' if flag == '--lr' else 'at least'} 0")
    return value


def _number(flag: str, text: str, part: str) -> float:
    try:
        value = float(part)
    except ValueError:
        raise UserError(f"{flag} {text}: {part!r} is not a number; give {FORMS}") from None
    if not math.isfinite(value):
        raise UserError(f"{flag} {text}: {part!r} is not a finite number")
    return value


def adapter_stages(text: str) -> list[str]:
    """'none' → [], 'layer3+layer4' → ['layer3', 'layer4'] (as a trial's config holds them)."""
    if text.strip() in ("", "none"):
        return []
    stages = [s.strip() for s in text.split("+") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise UserError(
            f"--adapters: unknown stage {bad[0]!r}; choose from {', '.join(STAGES)} or none, "
            "several joined with '+' (e.g. choice:none,layer4,layer3+layer4)"
        )
    return stages
