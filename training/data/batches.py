"""Streaming data, the middle of three layers as in timm: `training.data.reader` reads shard
bytes, `TrainBatches` and `EvalBatches` here decide which runs of a split a rank needs, each
byte read once per epoch, and `StepDecoder` decodes them in the loader workers of
`training.data.loader`.

Training follows `training.data.order`: the rank is the reader. A thread of the training process
reads the chunks of the partitions the rank owns (j ≡ rank mod ranks) ahead of need and
assembles each step's samples, all datasets of a mix together, in partition-key order, which
loader workers decode whole. So what a rank trains on, and which bytes it reads, do not depend
on the number of loader workers, and no two ranks read the same bytes. Augmentation is seeded
per sample by (seed, epoch, the sample's place in the split), so it does not depend on which
rank or worker decodes it either.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from cluster.errors import UserError
from cluster.world import World
from data_prep.contract import Manifest, Sample, Shard
from training.config import TrainConfig
from training.data import order
from training.data.decode import Encoded, Images, decode_cpu, plan_crop, sample_rng
from training.data.mix import Mix
from training.data.reader import Prefetcher, SplitReader
from training.data.shard_cache import ShardCache
from training.model.network import eval_center


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
            image_size=cfg.data.image_size,
            seed=cfg.optim.seed,
            num_classes=len(manifest.classes),
            cache_dir=cfg.data.cache_dir,
            cache_size=cfg.data.cache_size,
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
    on into further passes over the split (`training.data.mix`). Alone, the stream is its sequence.
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
        assert cfg.data.partitions and cfg.data.shuffle_block, "resolve the order's defaults first"
        return super().from_config(
            dataset,
            manifest,
            split,
            cfg,
            world,
            augment=cfg.data.augment,
            partitions=cfg.data.partitions,
            shuffle_block=cfg.data.shuffle_block,
            global_batch=cfg.optim.global_batch,
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
        with Prefetcher(self._reader(), self.partition_epoch, self._schedule(mine)) as chunks:
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
        self, t: int, mine: list[int], chunks: Prefetcher, owners: list[int]
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
        """With the weights' own eval transform (`training.model.network.eval_center`)."""
        kw.setdefault("center", eval_center(cfg.model.weights))
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
