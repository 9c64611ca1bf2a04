"""Shard bytes → samples: `SplitReader` reads runs of a split's samples (compressed bytes)
with one ranged read per shard they touch, found through the manifest's index, through the
node's shard cache where there is one; `Prefetcher` keeps a rank's chunks of a training epoch
loading ahead of need on a thread pool, in the order the rank will need them.

Importing this module also lets any webdataset pipeline in the process read s3:// shards.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

from webdataset.gopen import gopen_schemes

from cluster import storage
from data_prep.contract import Sample, Shard, parse_samples
from training.data import order
from training.data.shard_cache import ShardCache


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> BinaryIO:
    return storage.open_read(url)


# Any webdataset pipeline in this process can read s3:// shards through our opener too.
gopen_schemes["s3"] = _open_s3


class SplitReader:
    """Runs of a split's samples (positions in its layout: shards end to end, manifest order).

    A run is fetched with one ranged read per shard it touches. S3 reads go through the node's
    shard cache when there is one: a cache entry is the part of a shard inside `entry` (for
    training, the reader's partition), so a node keeps only what its readers own.
    """

    def __init__(self, dataset: str, shards: list[Shard], cache: ShardCache | None) -> None:
        self.dataset, self.shards, self.cache = dataset, shards, cache
        self.layout = order.Layout([s.num_samples for s in shards])

    def read(self, run: range, entry: range | None = None) -> list[Sample]:
        samples: list[Sample] = []
        for piece in self.layout.pieces(run.start, run.stop):
            shard = self.shards[piece.shard]
            url = storage.join(self.dataset, shard.name)
            offsets = shard.offsets
            start, stop = int(offsets[piece.start]), int(offsets[piece.stop])
            if self.cache is not None and storage.is_s3(url):
                base = self.layout.starts[piece.shard]
                within = entry or run
                first = max(within.start - base, 0)
                last = min(within.stop - base, shard.num_samples)
                span = range(int(offsets[first]), int(offsets[last]))
                data = self.cache.read(url, shard, span, range(start, stop))
            else:
                data = storage.read_range(url, start, stop)
            samples += parse_samples(data, piece.stop - piece.start, url)
        return samples


class Prefetcher:
    """A rank's chunks of one dataset, loaded in the order it will need them, `AHEAD` in
    flight on `THREADS` threads: one rank now reads for all its loader workers, so enough
    ranged GETs overlap to hide S3's latency (32 chunks of ~2 MB for ImageNet's defaults)."""

    AHEAD = 32
    THREADS = 16

    def __init__(
        self,
        split: SplitReader,
        partition_epoch: Callable[[int, int], order.PartitionEpoch],
        schedule: list[tuple[int, int, int, int]],
    ) -> None:
        self.split, self.schedule = split, iter(schedule)
        self.partition_epoch = partition_epoch
        self.parts: dict[tuple[int, int], order.PartitionEpoch] = {}  # (pass, partition) →
        self.newest_pass = 0
        self.pool = ThreadPoolExecutor(max_workers=self.THREADS, thread_name_prefix="chunks")
        self.pending: deque = deque()
        # partition → ((pass, chunk), its samples): a partition is read forward, pass by pass.
        self.loaded: dict[int, tuple[tuple[int, int], list]] = {}
        for _ in range(self.AHEAD):
            self._submit()

    def _part(self, k: int, j: int) -> order.PartitionEpoch:
        if (k, j) not in self.parts:
            if k > self.newest_pass:  # the passes before the previous one are done with
                self.parts = {key: v for key, v in self.parts.items() if key[0] >= k - 1}
                self.newest_pass = k
            self.parts[k, j] = self.partition_epoch(j, k)
        return self.parts[k, j]

    def _submit(self) -> None:
        step = next(self.schedule, None)
        if step is not None:
            _, k, j, c = step
            part = self._part(k, j)
            self.pending.append((step, self.pool.submit(self._load, part, c)))

    def _load(self, part: order.PartitionEpoch, c: int) -> list[tuple[int, Sample]]:
        chunk = part.chunks[c]
        by_place = dict(zip(chunk, self.split.read(chunk, part.partition.run), strict=True))
        return [(p, by_place[p]) for p in part.chunk_order(c)]

    def sample(self, t: int, k: int, j: int, i: int) -> tuple[int, Sample]:
        """(layout position, sample) at position i of partition j's pass k, needed by step t."""
        part = self._part(k, j)
        c = part.chunk_at(i)
        if self.loaded.get(j, (None,))[0] != (k, c):
            (when, *which), future = self.pending.popleft()
            assert which == [k, j, c] and when == t, ((when, which), (t, k, j, c))
            self._submit()
            self.loaded[j] = ((k, c), future.result())
        return self.loaded[j][1][i - part.starts[c]]

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
