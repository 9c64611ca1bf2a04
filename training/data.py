"""Streaming data: shard bytes → decoded, batched tensors, each byte read once per epoch.

Three layers, as in timm: `SplitReader` reads runs of samples (compressed bytes) with one
ranged read per shard they touch, found through the manifest's index; `TrainBatches` and
`EvalBatches` decide which runs a rank needs; `StepLoader` and `build_loader` decode them in
loader workers.

Training follows `training.order`: the rank is the reader. A thread of the training process
reads the chunks of the partitions the rank owns (j ≡ rank mod ranks) ahead of need and
assembles each step's samples, all datasets of a mix together, in partition-key order. Loader
worker w of W then decodes steps t ≡ w (mod W) entire and hands each back as one uint8 image
tensor and one label tensor per dataset; the workers persist across epochs. So what a rank
trains on, and which bytes it reads, do not depend on the number of loader workers, and no
two ranks read the same bytes. Augmentation is seeded per sample by (seed, epoch, the
sample's place in the split), so it does not depend on which rank or worker decodes it either.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import BinaryIO, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
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
            batch_size=cfg.rank_batch(world.world_size),
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

    @property
    def decoder(self) -> StepDecoder:
        return StepDecoder(
            self.image_size, self.augment, self.seed, self.device_decode, self.center
        )

    def _decode(self, samples: Iterable[tuple[int, Sample]]) -> tuple[Images, torch.Tensor, list]:
        return self.decoder.decode(self._checked(samples), self.epoch)

    def _checked(self, samples: Iterable[tuple[int, Sample]]) -> Iterator[tuple[int, Sample]]:
        for place, sample in samples:
            if not 0 <= sample.label < self.num_classes:
                raise UserError(f"{self.dataset}: a label is outside the manifest's class list")
            yield place, sample


class StepDecoder(Dataset):
    """What a loader worker runs: (layout position, sample) pairs → images, labels and keys.
    As a map-style dataset, its "index" is a whole step of every dataset (`StepLoader`)."""

    def __init__(
        self, size: int, augment: bool, seed: int, device_decode: bool, center: float
    ) -> None:
        self.size, self.augment, self.seed = size, augment, seed
        self.device_decode, self.center = device_decode, center

    def __getitem__(self, job: tuple[int, list[list[tuple[int, Sample]]]]) -> list[tuple]:
        epoch, parts = job
        return [self.decode(samples, epoch) for samples in parts]

    def decode(
        self, samples: Iterable[tuple[int, Sample]], epoch: int
    ) -> tuple[Images, torch.Tensor, list[str], torch.Tensor]:
        """(images, labels, keys, places). Decoded as they come (so decoding overlaps reads
        still under way); the place seeds the augmentation and orders the gathered step
        (`step.heads_step`). With `device_decode`, JPEGs stay encoded and only their crops are
        planned here. Crops are stacked into one contiguous uint8 batch."""
        size, labels, keys, places = self.size, [], [], []
        encoded, crops = Encoded(size), []
        for place, sample in samples:
            rng = sample_rng(self.seed, epoch, place) if self.augment else None
            plan = partial(plan_crop, rng=rng, center=self.center)
            if self.device_decode:
                encoded.add(sample.image, plan)
            else:
                crops.append(decode_cpu(sample.image, size, plan))
            labels.append(sample.label)
            keys.append(sample.key)
            places.append(place)
        if self.device_decode:
            images: Images = encoded
        elif crops:
            images = torch.stack(crops)
        else:
            images = torch.empty(0, 3, size, size, dtype=torch.uint8)
        as_tensor = partial(torch.tensor, dtype=torch.int64)
        return images, as_tensor(labels), keys, as_tensor(places)


class TrainBatches(_Batches):
    """One rank's training batches of an epoch in the partitioned order, resumable anywhere.

    The rank reads the partitions it owns (`owned`) and `steps` yields its part of each step
    (possibly empty); `StepLoader` has it decoded. Resuming after `consumed` samples is
    arithmetic: each partition starts at
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
        global_batch: int | None = None,
        **kw,
    ) -> None:
        super().__init__(*args, **kw)
        self.partitions, self.block = partitions, shuffle_block
        self.fixed_batch = global_batch
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
            global_batch=cfg.global_batch,
            **kw,
        )

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        self.epoch, self.consumed = epoch, consumed

    @property
    def global_batch(self) -> int:
        """A step's samples over all ranks: --global-batch, else --batch-size × ranks."""
        return self.fixed_batch or self.batch_size * self.world.world_size

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

    @property
    def owned(self) -> list[int]:
        """The partitions this rank owns and reads, in batch-key order (none: an empty part)."""
        return order.rank_partitions(self.world.rank, self.world.world_size, self.partitions)

    def steps(self) -> Iterator[list[tuple[int, Sample]]]:
        """This rank's (place, sample) pairs of each step left in the epoch, in batch order:
        partitions in `order.batch_keys` order, each in its sequence order. Chunks are read
        ahead by a thread pool in the order they are needed."""
        keys = order.batch_keys(self.partitions)
        mine = sorted(self.owned)
        with _Prefetcher(self._reader(), self.partition_epoch, self._schedule(mine)) as chunks:
            for t in range(len(self)):
                owners: list[int] = []
                samples = list(self._checked(self._step(t, mine, chunks, owners)))
                by_key = sorted(range(len(samples)), key=lambda i: keys[owners[i]])  # stable
                yield [samples[i] for i in by_key]

    def __iter__(self) -> Iterator[tuple]:
        """This rank's batches, decoded here (no loader workers)."""
        for samples in self.steps():
            yield self.decoder.decode(samples, self.epoch)

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
                images, labels, keys, _ = self._decode(zip(run, split.read(run), strict=True))
                yield (images, labels, keys) if self.with_keys else (images, labels)


class _Steps(Sampler):
    """The "indices" of a `StepLoader`: each step's samples of every dataset, read and
    assembled by a thread of the training process `ahead` steps in advance."""

    def __init__(self, datasets: list[TrainBatches], ahead: int) -> None:
        self.datasets, self.ahead = datasets, ahead

    def __len__(self) -> int:
        return min(len(b) for b in self.datasets)

    def __iter__(self) -> Iterator[tuple[int, list]]:
        epoch, steps = self.datasets[0].epoch, len(self)

        def jobs() -> Iterator[tuple[int, list]]:
            streams = [b.steps() for b in self.datasets]
            try:
                for _ in range(steps):
                    yield epoch, [next(s) for s in streams]
            finally:
                for s in streams:
                    s.close()

        return _read_ahead(jobs(), self.ahead)


class _Failed(NamedTuple):
    error: BaseException


_END = None


def _read_ahead(items: Iterator, ahead: int) -> Iterator:
    """`items`, produced by a daemon thread up to `ahead` in advance; its error raised here.
    Abandoning the iterator stops the thread (and closes `items`, with its reads)."""
    buffer: queue.Queue = queue.Queue(ahead)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            put(_Failed(e))
        finally:
            items.close()

    threading.Thread(target=produce, name="rank-reader", daemon=True).start()
    try:
        while (item := buffer.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()


def _as_is(batch):
    return batch


class StepLoader:
    """One rank's training steps over every dataset of a mix, each a list of (images,
    labels, keys, places) per dataset. The rank reads (`_Steps`, a thread of this process); loader
    worker w decodes steps t ≡ w (mod W) entire, and persists across epochs when `persistent`;
    with W = 0 this process decodes. Set each dataset's position, then iterate `epoch()`."""

    def __init__(
        self,
        datasets: list[TrainBatches],
        loader_workers: int,
        pin_memory: bool = False,
        persistent: bool = True,
    ) -> None:
        self.loader = DataLoader(
            datasets[0].decoder,
            batch_size=None,
            sampler=_Steps(datasets, ahead=2 * max(1, loader_workers) + 2),
            num_workers=loader_workers,
            collate_fn=_as_is,
            pin_memory=pin_memory,
            persistent_workers=persistent and loader_workers > 0,
            prefetch_factor=2 if loader_workers else None,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self) -> Iterator[list[tuple]]:
        return iter(self.loader)


def build_loader(
    batches: _Batches, loader_workers: int, pin_memory: bool = False
) -> Iterable[tuple]:
    """One pass over `batches` with `loader_workers` workers: training batches in the rank's
    step order, or evaluation batches; (images, labels), with keys when `with_keys`."""
    if isinstance(batches, TrainBatches):
        steps = StepLoader([batches], loader_workers, pin_memory, persistent=False).epoch()
        return (
            (images, labels, keys) if batches.with_keys else (images, labels)
            for [(images, labels, keys, _)] in steps
        )
    return DataLoader(
        batches,
        batch_size=None,
        num_workers=loader_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if loader_workers else None,
    )
