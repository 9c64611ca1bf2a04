"""The epoch's sample order: exact for every cluster shape, and each byte read once.

Plain integer arithmetic on the manifest's sample counts (no I/O, no torch), shared by the
loader, the driver's checks and `bench/data_scaling.py`. With N samples in a split, P
partitions (`--partitions`), B samples a chunk (`--shuffle-block`) and G samples a global step
(batch size × ranks):

- **Stable layout.** The split's shards in manifest order, laid end to end, cut into P runs.
  Partition j owns a run of n_j = (N + j) // P samples, run number (j × c) mod P with c the
  unit nearest P / φ (`layout_stride`), for the whole run: every epoch, every world size. A
  partition is a few shards, or a range of one.
- **A partition's epoch.** Its run is cut into chunks of B consecutive samples (one ranged
  read each); every epoch the chunk order is shuffled with (seed, epoch, j) and the samples of
  each chunk are permuted with (seed, epoch, j, chunk).
- **Global steps.** After C samples of the epoch, partition j has given (C + j) // P of its
  sequence; the next step takes up to ((C + G + j) // P). Summed over j that is exactly G
  (Hermite's identity), so a step is G samples drawn from min(G, P) consecutive partitions,
  whose runs the stride c spreads evenly over the whole split; and the set of samples trained
  after C samples does not depend on G.
- **Readers are ranks.** With R ranks, rank r owns the partitions j ≡ r (mod R) and is the
  only reader of their bytes (its loader workers only decode). Any R works: where R does not
  divide P the ranks own ⌊P/R⌋ or ⌈P/R⌉ partitions, so their parts of a step differ by about
  G/P samples a partition, and a rank may own none (a tiny split: it still steps, with an
  empty part). The loss is a mean over the global step (`training.model.loss`), so the step's
  gradient is the same however its samples are dealt; the global batch, not its split, fixes
  what is trained, and a resize continues the same order. The epoch ends when fewer than G
  samples are left.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass
from functools import cached_property, lru_cache

GOLDEN = (1 + 5**0.5) / 2
DEFAULT_PARTITIONS = 1024
"""Enough that ranks own nearly equal shares (within 1 in 1024 / R) on any cluster."""
MIN_PARTITION = 64
"""Samples a partition holds at least under the default P (so reads are not one sample each)."""


READ_BUFFER_BYTES = 2 * 10**9
"""What the default --shuffle-block lets all readers of a dataset hold at once (compressed)."""


def auto_block(partitions: int, sample_bytes: float) -> int:
    """The default B: chunks as large as READ_BUFFER_BYTES allows over P partitions (each
    reader holds one chunk of each of its partitions), 8 to 4096 samples: few large reads."""
    return int(min(4096, max(8, READ_BUFFER_BYTES // (partitions * max(sample_bytes, 1.0)))))


def resolve(
    partitions: int | None, block: int | None, splits: list[tuple[int, int]]
) -> tuple[int, int]:
    """(P, B) with the defaults filled in for train splits given as (samples, shard bytes): P
    from the smallest split, B from the largest mean sample (the readers' memory bound)."""
    p = partitions or auto_partitions(min(n for n, _ in splits))
    return p, block or auto_block(p, max(b / max(n, 1) for n, b in splits))


def auto_partitions(samples: int) -> int:
    """The default P: 1024, or for a small split the largest power of two that leaves every
    partition at least MIN_PARTITION samples (at least 1)."""
    p = DEFAULT_PARTITIONS
    while p > 1 and samples // p < MIN_PARTITION:
        p //= 2
    return p


def steps_left(total: int, global_batch: int, consumed: int = 0) -> int:
    """Global steps left in an epoch after `consumed` samples; the remainder is dropped."""
    return max(0, total - consumed) // global_batch


def taken(partition: int, partitions: int, consumed: int) -> int:
    """Samples of `partition`'s sequence used after `consumed` samples of the epoch."""
    return (consumed + partition) // partitions


def step_taking(position: int, partition: int, partitions: int, consumed: int, batch: int) -> int:
    """The step after `consumed` samples, with global batch `batch`, that takes sample
    `position` of `partition`'s sequence: the first whose end has taken > position."""
    return max(0, -(-((position + 1) * partitions - partition - consumed) // batch) - 1)


def rank_partitions(rank: int, ranks: int, partitions: int) -> list[int]:
    """The partitions rank `rank` of `ranks` owns and reads, in `batch_keys` order: the order of
    its samples in a batch (none where there are more ranks than partitions)."""
    keys = batch_keys(partitions)
    return sorted(range(rank, partitions, ranks), key=lambda j: keys[j])


def most_per_rank(global_batch: int, partitions: int, ranks: int) -> int:
    """The most samples any rank gets in any step of a stream cut into steps of `global_batch`
    over `partitions`, dealt to `ranks` ranks: about global_batch / ranks, more where ranks
    own unequal numbers of partitions. Exact: a step's takes depend only on where it starts
    modulo P (a P × P table, P ≤ a few thousand)."""
    if ranks >= partitions:
        return -(-global_batch // partitions)  # one partition a rank at most
    owned = -(-partitions // ranks)
    if partitions > 2048:  # a bound: ⌊G/P⌋ from each, the rest from a window of G mod P
        window = -(-(global_batch % partitions) // ranks) + 1
        return global_batch // partitions * owned + min(owned, window)
    import numpy as np

    j = np.arange(partitions)
    start = np.arange(partitions)[:, None]
    takes = (start + global_batch + j) // partitions - (start + j) // partitions
    per_rank = np.zeros((partitions, ranks), dtype=np.int64)
    np.add.at(per_rank, (slice(None), j % ranks), takes)
    return int(per_rank.max())


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of shard number `shard` (indices into the split's shard list)."""

    shard: int
    start: int
    stop: int


class Layout:
    """The split's shards laid end to end: sample positions ↔ (shard, sample in shard)."""

    def __init__(self, counts: list[int]) -> None:
        self.starts = [0]
        for n in counts:
            self.starts.append(self.starts[-1] + n)

    @property
    def total(self) -> int:
        return self.starts[-1]

    def pieces(self, start: int, stop: int) -> list[Piece]:
        """The run [start, stop) of the layout, cut at shard boundaries."""
        out = []
        i = bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            end = min(stop, self.starts[i + 1])
            if end > start:
                out.append(Piece(i, start - self.starts[i], end - self.starts[i]))
            start, i = end, i + 1
        return out


@dataclass(frozen=True)
class Partition:
    """Partition `index` of `count`: a fixed run of the layout, reshuffled every epoch."""

    index: int
    count: int
    start: int
    size: int

    @classmethod
    def of(cls, index: int, count: int, total: int) -> Partition:
        return cls(index, count, _starts(count, total)[index], (total + index) // count)

    @property
    def run(self) -> range:
        """Its layout positions."""
        return range(self.start, self.start + self.size)

    def chunks(self, block: int) -> list[range]:
        """Its chunks as layout runs, in stable order."""
        return [
            range(self.start + a, self.start + min(a + block, self.size))
            for a in range(0, self.size, block)
        ]


def layout_stride(count: int) -> int:
    """The unit c nearest count / φ: partition j owns run number (j × c) mod count of the layout.

    A step draws from consecutive partitions (a window of j); this spreads them evenly over
    the whole split (golden-ratio stride), where owning run j would put them side by side.
    """
    target = round(count / GOLDEN)
    for d in range(count):
        for c in (target - d, target + d):
            if 0 < c < count and math.gcd(c, count) == 1:
                return c
    return 1


@lru_cache(maxsize=16)
def _starts(count: int, total: int) -> tuple[int, ...]:
    """Each partition's first layout position: runs laid in the order of `layout_stride`."""
    c = layout_stride(count)
    starts, position = [0] * count, 0
    for run in range(count):
        j = run * pow(c, -1, count) % count if count > 1 else 0
        starts[j] = position
        position += (total + j) // count
    return tuple(starts)


@lru_cache(maxsize=16)
def batch_keys(count: int) -> tuple[int, ...]:
    """A sort key per partition: in this order each rank's partitions form one block, for every
    rank count along P's prime factors (every power of two when P is one). So a one-rank batch
    is the ranks' batches end to end and gradients sum in nearly the same order whatever the
    world size (digit reversal)."""
    factors, n, f = [], count, 2
    while n > 1:
        while n % f:
            f += 1
        factors.append(f)
        n //= f
    keys = []
    for j in range(count):
        key, x = 0, j
        for f in factors:
            key, x = key * f + x % f, x // f
        keys.append(key)
    return tuple(keys)


class PartitionEpoch:
    """Partition j's sequence in one epoch: sequence position → layout position. A dataset
    mixed with larger ones may read its split several times an epoch (`training.data.mix`): pass
    k > 0 is another order of the same partition, seeded with k too."""

    def __init__(
        self, partition: Partition, block: int, seed: int, epoch: int, epoch_pass: int = 0
    ) -> None:
        self.partition, self.block, self.seed, self.epoch = partition, block, seed, epoch
        self.key = f"{seed}:{epoch}" + (f".{epoch_pass}" if epoch_pass else "")
        chunks = partition.chunks(block)
        random.Random(f"{self.key}:{partition.index}:chunks").shuffle(chunks)
        self.chunks = chunks
        self.starts = [0]
        for c in chunks:
            self.starts.append(self.starts[-1] + len(c))

    def chunk_at(self, position: int) -> int:
        """The index (in this epoch's chunk order) of the chunk holding sequence `position`."""
        return bisect.bisect_right(self.starts, position) - 1

    def chunk_order(self, k: int) -> list[int]:
        """Layout positions of chunk k's samples in this epoch's order."""
        chunk = self.chunks[k]
        perm = list(chunk)
        random.Random(f"{self.key}:{self.partition.index}:{chunk.start}").shuffle(perm)
        return perm

    @cached_property
    def positions(self) -> list[int]:
        """The whole sequence (for tests and benchmarks; readers go chunk by chunk)."""
        return [p for k in range(len(self.chunks)) for p in self.chunk_order(k)]


def global_order(
    total: int, partitions: int, block: int, seed: int, epoch: int, global_batch: int
) -> list[list[int]]:
    """Every step's samples (layout positions, by partition), the reference the readers match."""
    parts = [
        PartitionEpoch(Partition.of(j, partitions, total), block, seed, epoch)
        for j in range(partitions)
    ]
    steps = []
    for t in range(steps_left(total, global_batch)):
        c = t * global_batch
        steps.append(
            [
                p
                for j, part in enumerate(parts)
                for p in part.positions[
                    taken(j, partitions, c) : taken(j, partitions, c + global_batch)
                ]
            ]
        )
    return steps
