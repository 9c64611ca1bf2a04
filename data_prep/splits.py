"""Which split an image goes to, and in which order and shard it is written.

Both are pure functions of an image's relative path and the seed, never of the other images:
adding images to SRC leaves every existing image in its split, and the same input always gives
the same shards (a later prep run can resume by comparing them).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence

from cluster.errors import UserError

DEFAULT_SPLITS = "train=0.8,val=0.1,test=0.1"

# Split names become file names (`<split>-000000.tar`, `contract.SHARD_NAME`).
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_splits(spec: str) -> dict[str, float]:
    """`train=0.8,val=0.1,test=0.1` → {"train": 0.8, ...}, in the order given."""
    splits: dict[str, float] = {}
    example = f"e.g. --splits {DEFAULT_SPLITS}"
    for part in spec.split(","):
        name, eq, value = part.strip().partition("=")
        name = name.strip()
        if not eq or not _SPLIT_NAME.fullmatch(name):
            raise UserError(
                f"bad --splits {spec!r}: write NAME=FRACTION pairs separated by commas, with "
                f"names made of letters, digits and _ ({example})"
            )
        if name in splits:
            raise UserError(f"bad --splits {spec!r}: split {name!r} is named twice")
        try:
            fraction = float(value)
        except ValueError:
            raise UserError(f"bad --splits {spec!r}: {value.strip()!r} is not a number") from None
        if not 0.0 < fraction <= 1.0:
            raise UserError(
                f"bad --splits {spec!r}: the fraction of {name!r} must be in (0, 1] ({example})"
            )
        splits[name] = fraction
    check_splits(splits)
    return splits


def check_splits(splits: dict[str, float]) -> None:
    """The checks `parse_splits` makes, for callers that pass a dict directly."""
    if not splits:
        raise UserError(f"no splits given (e.g. --splits {DEFAULT_SPLITS})")
    for name, fraction in splits.items():
        if not _SPLIT_NAME.fullmatch(name) or not 0.0 < fraction <= 1.0:
            raise UserError(
                f"bad split {name}={fraction}: names use letters, digits and _, "
                "fractions are in (0, 1]"
            )
    total = sum(splits.values())
    if abs(total - 1.0) > 1e-6:
        given = ",".join(f"{k}={v:g}" for k, v in splits.items())
        raise UserError(f"the split fractions {given} sum to {total:g}; make them sum to 1")


def parse_size(text: str) -> int:
    """`256MB`, `1GiB`, `500kB`, `1.5GB` or a plain number of bytes → bytes."""
    m = _SIZE.fullmatch(text)
    unit = m and _UNITS.get(m.group(2).lower())
    if not m or unit is None:
        raise UserError(
            f"bad size {text!r}: write a number of bytes with an optional unit "
            "(kB, MB, GB, KiB, MiB, GiB), e.g. 256MB"
        )
    size = int(float(m.group(1)) * unit)
    if size <= 0:
        raise UserError(f"bad size {text!r}: it must be more than 0 bytes")
    return size


def _unit_interval(seed: int, purpose: str, relpath: str) -> float:
    """A uniform number in [0, 1) that depends only on its arguments (not on PYTHONHASHSEED)."""
    digest = hashlib.sha256(f"{seed}:{purpose}:{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(relpath: str, seed: int, splits: dict[str, float]) -> str:
    """The split of one image: a stable function of its path and the seed alone."""
    u = _unit_interval(seed, "split", relpath)
    cumulative = 0.0
    for name, fraction in splits.items():
        cumulative += fraction
        if u < cumulative:
            return name
    # Only reachable through rounding when the fractions sum to 1 within 1e-6.
    return next(reversed(splits))


def shuffle_order(relpaths: Sequence[str], seed: int) -> list[int]:
    """Indices of `relpaths` in a seeded pseudo-random order that mixes the classes.

    Sorting by a hash of (seed, path) is a uniform shuffle that does not depend on the order the
    files were found in, so the same set of files always gives the same shards.
    """
    keys = [(_unit_interval(seed, "order", p), p) for p in relpaths]
    return sorted(range(len(relpaths)), key=keys.__getitem__)


def plan_by_size(
    costs: Sequence[int], shard_size: int, archive_size: Callable[[int], int]
) -> list[range]:
    """Cut a sequence of per-sample byte costs into consecutive shards of at most `shard_size`.

    `archive_size` turns the summed sample costs into the file's size (tar adds end blocks and
    pads to a record). A sample too large for a shard on its own still gets a shard, alone.
    """
    shards: list[range] = []
    start, used = 0, 0
    for i, cost in enumerate(costs):
        if i > start and archive_size(used + cost) > shard_size:
            shards.append(range(start, i))
            start, used = i, 0
        used += cost
    if start < len(costs):
        shards.append(range(start, len(costs)))
    return shards


def plan_by_count(num_samples: int, num_shards: int) -> list[range]:
    """`num_shards` consecutive shards whose sizes differ by at most one (fewer if too few)."""
    n = min(num_shards, num_samples)
    if n == 0:
        return []
    base, extra = divmod(num_samples, n)
    shards, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        shards.append(range(start, stop))
        start = stop
    return shards
