"""How several datasets share a step (`--mix`): integer arithmetic on their train split sizes.

An epoch of D datasets is one *stream* of samples, and a global step takes the next G of it
(batch size × ranks), whatever the world size. Dataset d has an integer weight W_d (W their
sum): `proportional` W_d = N_d (its train samples), `uniform` 1, `temperature:T` N_d^(1/T)
(T = 1 is proportional, a large T nearly uniform; weights rounded to 20 bits).

- **Who gets a stream position.** After C samples of the stream dataset 0 has had
  round(C·W_0 / W), dataset 1 its rounded share of the rest, and so on; the last takes what
  is left. Each count grows by 0 or 1 per position (so a step's part of a dataset is a run of
  its own sequence), stays within about a sample of C·W_d / W, and is exact at every multiple
  of W. With two datasets each step gives dataset d ⌊G·W_d/W⌋ or ⌈G·W_d/W⌉ samples; a dataset
  whose share of a step is under a sample or two skips some steps.
- **The epoch.** It ends when every dataset has been read once: the stream is as long as the
  dataset slowest to read under the weights needs (for `proportional`, ΣN_d: every dataset is
  read exactly once); less than one global batch at its end is dropped, as with one dataset.
  A dataset that needs more than N_d samples goes on into another *pass* over its split: the
  same partitions in a fresh order (`order.PartitionEpoch` with the pass number), so every
  sample of every dataset is trained on every epoch, none cut off at the smallest's length.
- **Exact and resumable.** Everything is a function of (sizes, weights, C): a step's samples
  do not depend on G's split into ranks, and a run resumed (or resized) after C samples goes
  on with the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from cluster.errors import UserError

MIXES = ("proportional", "uniform", "temperature:T")
TEMPERATURE_SCALE = 1 << 20
"""The largest temperature weight: shares are exact to about one part in a million."""


def parse_mix(text: str) -> str:
    """`text` checked and normalised (`temperature:2.0` → `temperature:2`); a UserError that
    says what to give otherwise."""
    kind, sep, value = text.strip().lower().partition(":")
    if kind in ("proportional", "uniform") and not sep:
        return kind
    if kind == "temperature":
        try:
            t = float(value)
        except ValueError:
            t = float("nan")
        if t > 0 and t != float("inf"):
            return f"temperature:{t:g}"
        raise UserError(
            f"--mix {text!r}: the temperature must be a number above 0, e.g. temperature:2"
        )
    raise UserError(f"--mix {text!r}: choose proportional, uniform or temperature:T (T > 0)")


def mix_weights(mix: str, sizes: list[int]) -> list[int]:
    """Each dataset's integer weight W_d under `mix` (see the module docstring)."""
    kind, _, value = parse_mix(mix).partition(":")
    if kind == "proportional" or (kind == "temperature" and float(value) == 1):
        return list(sizes)
    if kind == "uniform":
        return [1] * len(sizes)
    # Relative to the largest, so any split size gives the same 20-bit precision.
    power, top = 1 / float(value), max(sizes)
    return [max(1, round(TEMPERATURE_SCALE * (n / top) ** power)) for n in sizes]


@dataclass(frozen=True)
class Mix:
    """The datasets' shares of an epoch's stream; dataset d's own sequence runs over passes."""

    sizes: tuple[int, ...]
    """Train samples of each dataset (N_d)."""
    weights: tuple[int, ...]
    """Integer weights W_d."""

    @classmethod
    def of(cls, mix: str, sizes: list[int]) -> Mix:
        if min(sizes, default=0) < 1:
            raise UserError("every --data dataset needs train samples: prepare it again")
        return cls(tuple(sizes), tuple(mix_weights(mix, sizes)))

    @classmethod
    def single(cls, total: int) -> Mix:
        """One dataset: the stream is its sequence, read once (the order without a mix)."""
        return cls((total,), (1,))

    def taken(self, d: int, consumed: int) -> int:
        """Samples of dataset d's sequence in the first `consumed` of the stream."""
        rest, rest_weight = consumed, sum(self.weights)
        for i, w in enumerate(self.weights[:-1]):
            # Rounded half up: exact at multiples of W, +0 or +1 per stream position.
            share = (2 * rest * w + rest_weight) // (2 * rest_weight)
            if i == d:
                return share
            rest, rest_weight = rest - share, rest_weight - w
        return rest

    def needs(self, d: int, count: int) -> int:
        """The shortest stream that holds `count` samples of dataset d."""
        if count <= 0:
            return 0
        low, high = 0, 1
        while self.taken(d, high) < count:
            low, high = high, 2 * high
        while high - low > 1:  # taken(d, low) < count <= taken(d, high)
            mid = (low + high) // 2
            low, high = (low, mid) if self.taken(d, mid) >= count else (mid, high)
        return high

    @cached_property
    def epoch_samples(self) -> int:
        """The stream of an epoch: until every dataset has been read once."""
        return max(self.needs(d, n) for d, n in enumerate(self.sizes))

    def steps_left(self, global_batch: int, consumed: int = 0) -> int:
        """Global steps left in an epoch after `consumed` stream samples (remainder dropped)."""
        return max(0, self.epoch_samples - consumed) // global_batch

    def split(self, consumed: int, global_batch: int) -> list[int]:
        """Each dataset's samples in the step after `consumed` stream samples."""
        after = consumed + global_batch
        return [self.taken(d, after) - self.taken(d, consumed) for d in range(len(self.sizes))]

    def passes(self, d: int, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Dataset d's sequence [start, stop) as (pass, first, end) runs within passes."""
        n, out = self.sizes[d], []
        while start < stop:
            k, first = divmod(start, n)
            end = min(n, first + stop - start)
            out.append((k, first, end))
            start += end - first
        return out
