"""Streaming data: shard bytes → decoded, batched tensors, each byte read once per epoch.

Three layers, as in timm: `SplitReader` reads runs of samples (compressed bytes) with one
ranged read per shard they touch, found through the manifest's index; `TrainBatches` and
`EvalBatches` decide which runs this reader needs and decode them; `build_loader` wraps them in
a DataLoader.

Training follows `training.order`: reader q (rank r, loader worker w) serves the partitions
j ≡ q (mod readers) and yields, every step, its part of the rank's batch; the loader
concatenates the parts of a step from its workers in partition order. So what a rank trains
on does not depend on the number of loader workers, and no two readers read the same bytes.
Augmentation is seeded per sample by (seed, epoch, the sample's place in the split), so it
does not depend on which rank, worker or batch decodes a sample either.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import BinaryIO

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen_schemes

from cluster import storage
from cluster.errors import UserError
from cluster.world import World
from data_prep.contract import Manifest, Sample, Shard, parse_samples
from training import order
from training.config import TrainConfig
from training.decode import (
    Encoded,
    Images,
    decode_cpu,
    join_images,
    plan_crop,
    sample_rng,
)
from training.mix import Mix
from training.model import eval_center
from training.shard_cache import ShardCache


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


class _Batches(IterableDataset):
    """Reading and decoding shared by the training and evaluation batch streams."""

    def __init__(
        self,
        dataset: str,
        shards: list[Shard],
        world: World,
        batch_size: int,
        image_size: int,
        augment: bool,
        seed: int,
        num_classes: int,
        cache_dir: str | None = None,
        cache_size: int = 0,
        with_keys: bool = False,
        device_decode: bool = False,
        center: float = 1.0,
    ) -> None:
        self.dataset, self.shards, self.world = dataset, shards, world
        self.batch_size, self.seed, self.num_classes = batch_size, seed, num_classes
        self.augment, self.image_size = augment, image_size
        self.cache_dir, self.cache_size = cache_dir, cache_size
        self.with_keys, self.device_decode, self.center = with_keys, device_decode, center
        self.total = sum(s.num_samples for s in shards)
        self.epoch = 0

    @classmethod
    def from_config(
        cls, dataset: str, manifest: Manifest, split: str, cfg: TrainConfig, world: World, **kw
    ):
        """The batches of `split` for this rank, with the settings of a training config."""
        return cls(
            dataset,
            manifest.shards(split),
            world,
            batch_size=cfg.batch_size,
            image_size=cfg.image_size,
            seed=cfg.seed,
            num_classes=len(manifest.classes),
            cache_dir=cfg.cache_dir,
            cache_size=cfg.cache_size,
            **kw,
        )

    def _reader_world(self) -> World:
        info = get_worker_info()
        return self.world.with_loader_worker(info.id, info.num_workers) if info else self.world

    def _reader(self) -> SplitReader:
        cache = ShardCache(self.cache_dir, self.cache_size) if self.cache_dir else None
        return SplitReader(self.dataset, self.shards, cache)

    def _decode(self, samples: Iterable[tuple[int, Sample]]) -> tuple[Images, torch.Tensor, list]:
        """Images, labels and keys of (layout position, sample) pairs, decoded as they come (so
        decoding overlaps the reads still under way); the position seeds the augmentation.
        With `device_decode`, JPEGs stay encoded and only their crops are planned here."""
        size, labels, keys = self.image_size, [], []
        encoded, crops = Encoded(size), []
        for place, sample in samples:
            if not 0 <= sample.label < self.num_classes:
                raise UserError(f"{self.dataset}: a label is outside the manifest's class list")
            rng = sample_rng(self.seed, self.epoch, place) if self.augment else None
            plan = partial(plan_crop, rng=rng, center=self.center)
            if self.device_decode:
                encoded.add(sample.image, plan)
            else:
                crops.append(decode_cpu(sample.image, size, plan))
            labels.append(sample.label)
            keys.append(sample.key)
        if self.device_decode:
            images: Images = encoded
        elif crops:
            images = torch.stack(crops)
        else:
            images = torch.empty(0, 3, size, size, dtype=torch.uint8)
        return images, torch.tensor(labels, dtype=torch.int64), keys


class TrainBatches(_Batches):
    """One rank's training batches of an epoch in the partitioned order, resumable anywhere.

    Every loader worker yields one part per step (possibly empty); `build_loader` joins the
    parts of a step. Resuming after `consumed` samples is arithmetic: each partition starts at
    (consumed + j) // P of its sequence, chunks before it are never read, and samples before it
    in its chunk are read but not decoded.

    With several datasets, this is dataset `index` of a `Mix`: `consumed` counts the epoch's
    stream (all datasets), a step takes this dataset's share of it, and its sequence may run
    on into further passes over the split (`training.mix`). Alone, the stream is its sequence.
    """

    def __init__(
        self,
        *args,
        partitions: int,
        shuffle_block: int,
        mix: Mix | None = None,
        index: int = 0,
        **kw,
    ) -> None:
        super().__init__(*args, **kw)
        self.partitions, self.block = partitions, shuffle_block
        self.mix, self.index = mix or Mix.single(self.total), index
        assert self.mix.sizes[index] == self.total, "the mix was made for other data"
        self.consumed = 0

    @classmethod
    def from_config(cls, dataset, manifest, split, cfg, world, **kw):
        """With the config's order; its defaults must be resolved (`driver.preflight`)."""
        assert cfg.partitions and cfg.shuffle_block, "resolve the order's defaults first"
        return super().from_config(
            dataset,
            manifest,
            split,
            cfg,
            world,
            augment=cfg.augment,
            partitions=cfg.partitions,
            shuffle_block=cfg.shuffle_block,
            **kw,
        )

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        self.epoch, self.consumed = epoch, consumed

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world.world_size

    def __len__(self) -> int:
        return self.mix.steps_left(self.global_batch, self.consumed)

    def runs(self, before: int, after: int) -> list[tuple[int, int, int]]:
        """This dataset's part of the stream [before, after) as (pass, first, end) runs of
        its sequence within a pass (one run, unless a pass ends inside)."""
        mix, d = self.mix, self.index
        return mix.passes(d, mix.taken(d, before), mix.taken(d, after))

    def step_runs(self, t: int) -> list[tuple[int, int, int]]:
        """This dataset's runs in step t after `consumed`."""
        before = self.consumed + t * self.global_batch
        return self.runs(before, before + self.global_batch)

    def partition_epoch(self, j: int, epoch_pass: int = 0) -> order.PartitionEpoch:
        part = order.Partition.of(j, self.partitions, self.total)
        return order.PartitionEpoch(part, self.block, self.seed, self.epoch, epoch_pass)

    def __iter__(self) -> Iterator[tuple]:
        world = self._reader_world()
        order.check_shape(self.partitions, world.world_size, world.loader_workers)
        mine = list(order.reader_partitions(world.reader, world.readers, self.partitions))
        with _Prefetcher(self._reader(), self.partition_epoch, self._schedule(mine)) as chunks:
            for t in range(len(self)):
                owners: list[int] = []
                images, labels, keys = self._decode(self._step(t, mine, chunks, owners))
                # Small values as lists: each tensor crosses from a loader process in a shared
                # memory segment of its own, which costs more than pickling a few ints.
                yield images, labels.tolist(), owners, keys

    def _step(
        self, t: int, mine: list[int], chunks: _Prefetcher, owners: list[int]
    ) -> Iterator[tuple[int, Sample]]:
        """This reader's samples of step t, pass by pass and partition by partition; their
        owners to `owners`. A sample's place in later passes is offset by the split's size, so
        its augmentation differs from pass to pass."""
        p = self.partitions
        for k, first, end in self.step_runs(t):
            for j in mine:
                for i in range(order.taken(j, p, first), order.taken(j, p, end)):
                    owners.append(j)
                    place, sample = chunks.sample(t, k, j, i)
                    yield place + k * self.total, sample

    def _schedule(self, mine: list[int]) -> list[tuple[int, int, int, int]]:
        """(step, pass, partition, chunk) of every chunk this reader loads, in the order it
        needs them: so a background thread can fetch them ahead, hiding storage latency behind
        decoding."""
        g, p, start, n = self.global_batch, self.partitions, self.consumed, self.total
        schedule = []
        for k, a, b in self.runs(start, start + len(self) * g):
            for j in mine:
                first, last = order.taken(j, p, a), order.taken(j, p, b)
                if first == last:
                    continue
                part = self.partition_epoch(j, k)
                for c in range(part.chunk_at(first), part.chunk_at(last - 1) + 1):
                    # The step whose end is the first to take sample i of partition j: its
                    # pass-local position (i + 1)·P − j, in the stream.
                    i = max(part.starts[c], first)
                    needed = self.mix.needs(self.index, k * n + (i + 1) * p - j)
                    schedule.append((max(0, -(-(needed - start) // g) - 1), k, j, c))
        schedule.sort()
        return schedule


class _Prefetcher:
    """A reader's chunks, loaded in the order it will need them, `AHEAD` in flight."""

    AHEAD = 8

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
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="chunks")
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

    def __enter__(self) -> _Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class EvalBatches(_Batches):
    """Every sample of a split once across the ranks, in manifest order, no augmentation.

    Each rank takes a contiguous range (or the layout `runs` it is given); loader worker w of W
    reads and decodes only batches w, w+W, … of it, and the DataLoader's round robin restores
    their order. A run is cut into nearly equal batches of at most `batch_size`.
    """

    def __init__(self, *args, runs: list[range] | None = None, **kwargs) -> None:
        super().__init__(*args, augment=False, **kwargs)
        self.runs = runs

    @classmethod
    def from_config(cls, dataset, manifest, split, cfg, world, **kw):
        """With the weights' own eval transform (`training.model.eval_center`)."""
        kw.setdefault("center", eval_center(cfg.weights))
        return super().from_config(dataset, manifest, split, cfg, world, **kw)

    def batches(self) -> list[range]:
        runs = [self.world.rank_range(self.total)] if self.runs is None else self.runs
        out = []
        for run in runs:
            k = -(-len(run) // self.batch_size)
            out += [range(run.start + len(run) * i // k, run.start + len(run) * (i + 1) // k)
                    for i in range(k)]  # fmt: skip
        return out

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[tuple]:
        world = self._reader_world()
        split = self._reader()
        for k, run in enumerate(self.batches()):
            if world.owns_batch(k):
                images, labels, keys = self._decode(zip(run, split.read(run), strict=True))
                yield (images, labels, keys) if self.with_keys else (images, labels)


def build_loader(
    batches: _Batches, loader_workers: int, pin_memory: bool = False
) -> Iterable[tuple]:
    # Workers are rebuilt each epoch (not persistent) so they pick up set_position.
    loader = DataLoader(
        batches,
        batch_size=None,
        num_workers=loader_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if loader_workers else None,
    )
    if isinstance(batches, TrainBatches):
        keys = torch.tensor(order.batch_keys(batches.partitions))
        return _join_parts(loader, max(1, loader_workers), keys, batches.with_keys)
    return loader


def _join_parts(
    loader: DataLoader, parts: int, partition_keys: torch.Tensor, with_keys: bool
) -> Iterator[tuple]:
    """A step's parts come from the workers in turn (round robin): one batch, its samples in
    the order of `order.batch_keys`, the same for every number of loader workers."""
    it = iter(loader)
    while True:
        step = [part for _, part in zip(range(parts), it, strict=False)]
        if not step:
            return
        assert len(step) == parts, "a loader worker ended before the others"

        labels, owners, keys = ([x for p in step for x in p[i]] for i in (1, 2, 3))
        # int64 even when empty: a rank or loader worker may hold no sample of a small
        # dataset in a step, and an empty `torch.tensor([])` is float (no index).
        labels = torch.tensor(labels, dtype=torch.int64)
        owners = torch.tensor(owners, dtype=torch.int64)
        # Stable: each partition's samples stay in its sequence order.
        by_owner = torch.sort(partition_keys[owners], stable=True).indices
        images, labels = join_images([p[0] for p in step], by_owner), labels[by_owner]
        if with_keys:
            yield images, labels, [keys[i] for i in by_owner.tolist()]
        else:
            yield images, labels
