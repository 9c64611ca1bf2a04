"""Streaming data: WebDataset shards → decoded, batched tensors, split by rank and loader worker.

Three layers, as in timm: `read_samples` reads raw samples (compressed bytes) from the shards
through webdataset's tar reader; `ShardBatches` orders, shuffles, batches and decodes them for
one rank; `build_loader` wraps it in a DataLoader.

The order of one epoch is a function of (seed, epoch, world size) alone:
- shard order is shuffled with (seed, epoch) and the shards are laid end to end;
- rank r reads a contiguous, equal-length slice of that sequence (drop-last arithmetic on the
  manifest's counts), so every rank runs the same number of steps whatever the shard sizes;
- a shuffle buffer of compressed bytes, seeded with (seed, epoch, rank), reorders the slice;
- batch j is decoded by loader worker j mod W, and the DataLoader's round robin over workers
  restores the order 0, 1, 2, … Each worker reads the rank's whole slice but decodes only its
  own batches: reading tar entries costs far less than decoding the JPEGs.
Random augmentation is seeded per (seed, epoch, rank, batch), so it does not depend on which
worker decodes a batch either.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms as T
from webdataset.gopen import gopen_schemes

from cluster import storage
from cluster.errors import UserError
from cluster.world import World
from data_prep.manifest import Manifest, Shard
from training.config import TrainConfig
from training.shard_cache import ShardCache

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
META_SUFFIXES = {"cls", "json"}


@dataclass(frozen=True)
class RawSample:
    key: str
    image: bytes
    label: int


def epoch_shard_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    order = list(shards)
    if shuffle:
        random.Random(f"{seed}:{epoch}:shards").shuffle(order)
    return order


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw) -> BinaryIO:
    return storage.open_read(url)


# Any webdataset pipeline in this process can read s3:// shards through our opener too.
gopen_schemes["s3"] = _open_s3


def open_shard(url: str, shard: Shard, cache: ShardCache | None) -> BinaryIO:
    if cache is not None and storage.is_s3(url):
        return cache.open(url, shard)
    return storage.open_read(url, shard.bytes)


def read_samples(
    dataset: str, shards: list[Shard], positions: range, cache: ShardCache | None = None
) -> Iterator[RawSample]:
    """The samples at `positions` of the shards laid end to end, as compressed bytes.

    Shards wholly outside the range are never opened; inside a shard, samples before the range
    are skipped without decoding. S3 shards are streamed (bounded read-ahead), not downloaded
    first.
    """
    offset = 0
    for shard in shards:
        start, stop = offset, offset + shard.num_samples
        offset = stop
        if stop <= positions.start or start >= positions.stop:
            continue
        url = storage.join(dataset, shard.name)
        seen = 0
        with open_shard(url, shard, cache) as stream:
            files = wds.tariterators.tar_file_expander([{"stream": stream, "url": url}])
            for sample in wds.tariterators.group_by_keys(files):
                index = start + seen
                seen += 1
                if index >= positions.stop:
                    break
                if index >= positions.start:
                    yield _raw(sample, url)
            else:
                if seen != shard.num_samples:
                    raise UserError(
                        f"{url} holds {seen} samples but the manifest says "
                        f"{shard.num_samples}: the shard changed after prep; run prep again"
                    )


def _raw(sample: dict, url: str) -> RawSample:
    images = [k for k in sample if not k.startswith("__") and k not in META_SUFFIXES]
    if len(images) != 1 or "cls" not in sample:
        raise UserError(f"{url}: sample {sample['__key__']} is not a metatrainer sample")
    return RawSample(sample["__key__"], sample[images[0]], int(sample["cls"]))


def decode_image(data: bytes) -> Image.Image:
    """Any image prep accepted → 8-bit RGB (16-bit greyscale is scaled, not clipped)."""
    img = Image.open(io.BytesIO(data))
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.int64)
        peak = 65535 if img.mode.startswith("I;16") else max(1, int(arr.max()))
        img = Image.fromarray((arr * 255 // peak).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def build_transform(image_size: int, augment: bool) -> T.Compose:
    if augment:
        crop = [T.RandomResizedCrop(image_size, scale=(0.35, 1.0)), T.RandomHorizontalFlip()]
    else:
        crop = [T.Resize(image_size), T.CenterCrop(image_size)]
    return T.Compose([*crop, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, consumed: int = 0) -> int:
    """Global steps left in an epoch after `consumed` samples; the remainder is dropped."""
    return max(0, num_samples - consumed) // (world_size * batch_size)


def block_permutation(seed: int, epoch: int, block: int, size: int) -> list[int]:
    perm = list(range(size))
    random.Random(f"{seed}:{epoch}:block:{block}").shuffle(perm)
    return perm


class _Batches(IterableDataset):
    """Decoding shared by the training and evaluation batch streams."""

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
    ) -> None:
        self.dataset, self.shards, self.world = dataset, shards, world
        self.batch_size, self.seed, self.num_classes = batch_size, seed, num_classes
        self.augment = augment
        self.transform = build_transform(image_size, augment)
        self.cache_dir, self.cache_size = cache_dir, cache_size
        self.with_keys = with_keys
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

    def _read(self, shards: list[Shard], positions: range) -> Iterator[RawSample]:
        cache = ShardCache(self.cache_dir, self.cache_size) if self.cache_dir else None
        return read_samples(self.dataset, shards, positions, cache)

    def _decode(self, batch: list[RawSample], key: int) -> tuple:
        """Decode and transform; `key` names the batch (augmentation is seeded with it)."""
        labels = torch.tensor([s.label for s in batch])
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise UserError(f"{self.dataset}: a label is outside the manifest's class list")
        # Fork the RNG so the augmentation of batch j is the same whichever process decodes it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, key)) & (2**63 - 1))
            images = torch.stack([self.transform(decode_image(s.image)) for s in batch])
        return (images, labels, [s.key for s in batch]) if self.with_keys else (images, labels)


class TrainBatches(_Batches):
    """One rank's training batches of an epoch, resumable at any step.

    The epoch's sample order is a function of (seed, epoch) alone: shards shuffled and laid
    end to end, then each block of `shuffle_block` consecutive samples permuted. Global step t
    takes the next batch_size × world_size samples of that order and rank r the r-th
    batch_size of them, so 2 ranks × batch b see exactly what 1 rank × batch 2b sees, and
    every rank runs the same number of steps. Resuming after `consumed` samples is arithmetic:
    whole shards before it are not opened, and tar entries before it are read, not decoded.
    Each reader keeps only its own samples of a block (compressed) until it can emit them.
    """

    def __init__(self, *args, shuffle_block: int = 4096, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.block = shuffle_block
        self.consumed = 0

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        self.epoch, self.consumed = epoch, consumed

    def __len__(self) -> int:
        return steps_per_epoch(self.total, self.world.world_size, self.batch_size, self.consumed)

    def __iter__(self) -> Iterator[tuple]:
        world = self._reader_world()
        b, stride = self.batch_size, self.batch_size * world.world_size
        steps = len(self)
        if steps == 0:
            return

        # Output positions of this reader's batches: step t of this run of the epoch holds
        # positions start(t) .. start(t)+b-1; reader w of W decodes steps w, w+W, ...
        def start(t: int) -> int:
            return self.consumed + t * stride + world.rank * b

        def step_of(p: int) -> int | None:
            """The step whose batch for this reader holds output position p, if any."""
            if p < self.consumed:
                return None
            t, offset = divmod(p - self.consumed, stride)
            mine = t < steps and world.rank * b <= offset < (world.rank + 1) * b
            return t if mine and world.owns_batch(t) else None

        owned = [t for t in range(steps) if world.owns_batch(t)]
        if not owned:
            return
        first = start(owned[0]) // self.block * self.block
        stop = min(self.total, -(-(start(owned[-1]) + b) // self.block) * self.block)
        pending = iter(owned)
        t = next(pending)
        wanted: dict[int, int] = {}  # stream index → output position, in the current block
        held: dict[int, RawSample] = {}  # output position → sample
        order = epoch_shard_order(self.shards, self.seed, self.epoch, shuffle=True)
        for index, sample in enumerate(self._read(order, range(first, stop)), start=first):
            if index % self.block == 0:
                base = index
                size = min(self.block, self.total - base)
                perm = block_permutation(self.seed, self.epoch, base // self.block, size)
                wanted = {
                    base + perm[p - base]: p
                    for p in range(base, base + size)
                    if step_of(p) is not None
                }
            if index in wanted:
                held[wanted.pop(index)] = sample
            if (index + 1) % self.block == 0 or index + 1 == stop:
                # The block is complete, so every position in it is known: emit what is done.
                while t is not None and start(t) + b <= index + 1:
                    batch = [held.pop(p) for p in range(start(t), start(t) + b)]
                    yield self._decode(batch, start(t))
                    t = next(pending, None)
        assert t is None and not held, "the shards ended before the epoch did"


class EvalBatches(_Batches):
    """Every sample of a split once across the ranks, in manifest order, no augmentation."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, augment=False, **kwargs)

    def __len__(self) -> int:
        return -(-len(self.world.rank_range(self.total, drop_last=False)) // self.batch_size)

    def __iter__(self) -> Iterator[tuple]:
        world = self._reader_world()
        samples = self._read(self.shards, world.rank_range(self.total, drop_last=False))
        batch: list[RawSample] = []
        index = 0
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.batch_size:
                if world.owns_batch(index):
                    yield self._decode(batch, index)
                batch, index = [], index + 1
        if batch and world.owns_batch(index):
            yield self._decode(batch, index)


def build_loader(batches: _Batches, loader_workers: int, pin_memory: bool = False) -> DataLoader:
    # Workers are rebuilt each epoch (not persistent) so they pick up set_position.
    return DataLoader(
        batches,
        batch_size=None,
        num_workers=loader_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if loader_workers else None,
    )
