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
from data_prep.manifest import Shard
from training.shard_cache import ShardCache

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHUFFLE_BUFFER = 2000
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


def shuffled(samples: Iterator[RawSample], rng: random.Random, size: int) -> Iterator[RawSample]:
    """A seeded shuffle buffer; it holds compressed bytes, never decoded images."""
    buffer: list[RawSample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


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


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    return (num_samples // world_size) // batch_size


class ShardBatches(IterableDataset):
    """Batches of (images, labels) of one split for one rank, in the epoch's fixed order.

    Training (`train=True`) drops the remainder so every rank yields exactly
    `steps_per_epoch` batches; evaluation reads every sample once across the ranks.
    """

    def __init__(
        self,
        dataset: str,
        shards: list[Shard],
        world: World,
        batch_size: int,
        image_size: int,
        train: bool,
        augment: bool,
        seed: int,
        num_classes: int,
        cache_dir: str | None = None,
        cache_size: int = 0,
    ) -> None:
        self.dataset = dataset
        self.cache_dir, self.cache_size = cache_dir, cache_size
        self.shards = shards
        self.world = world
        self.batch_size = batch_size
        self.train = train
        self.transform = build_transform(image_size, augment and train)
        self.augment = augment and train
        self.seed = seed
        self.num_classes = num_classes
        self.epoch = 0
        self.total = sum(s.num_samples for s in shards)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_positions(self) -> range:
        if self.train:
            n = steps_per_epoch(self.total, self.world.world_size, self.batch_size)
            per_rank = n * self.batch_size
            return range(self.world.rank * per_rank, (self.world.rank + 1) * per_rank)
        return self.world.rank_range(self.total, drop_last=False)

    def __len__(self) -> int:
        return -(-len(self.rank_positions()) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        world = self.world.with_loader_worker(info.id, info.num_workers) if info else self.world
        order = epoch_shard_order(self.shards, self.seed, self.epoch, shuffle=self.train)
        cache = ShardCache(self.cache_dir, self.cache_size) if self.cache_dir else None
        samples = read_samples(self.dataset, order, self.rank_positions(), cache)
        if self.train:
            rng = random.Random(f"{self.seed}:{self.epoch}:{world.rank}:buffer")
            samples = shuffled(samples, rng, SHUFFLE_BUFFER)
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

    def _decode(self, batch: list[RawSample], index: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.tensor([s.label for s in batch])
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise UserError(f"{self.dataset}: a label is outside the manifest's class list")
        # Fork the RNG so the augmentation of batch j is the same whichever process decodes it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, self.world.rank, index)) & (2**63 - 1))
            images = torch.stack([self.transform(decode_image(s.image)) for s in batch])
        return images, labels


def build_loader(
    batches: ShardBatches, loader_workers: int, pin_memory: bool = False
) -> DataLoader:
    # Workers are rebuilt each epoch (not persistent) so they pick up set_epoch.
    return DataLoader(
        batches,
        batch_size=None,
        num_workers=loader_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if loader_workers else None,
    )
