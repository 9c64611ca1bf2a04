"""Scaling on paper, computed: what each node reads, caches and decodes, per cluster shape.

    .venv/bin/python bench/data_scaling.py --synthetic-imagenet
    .venv/bin/python bench/data_scaling.py --manifest s3://bucket/imagenet --shapes 8x8x8,16x8x8
    .venv/bin/python bench/data_scaling.py --manifest /tmp/digits-shards --measure

A shape is nodes × GPUs per node × loader workers: R = nodes × GPUs ranks (contiguous on a
node), each the one reader of its partitions (Q = R; loader workers only decode). Every number
comes from `training.data.order` and the manifest's per-sample byte index, for epoch 0 with the
config's seed; nothing is read but the manifest. Reads count the chunks an epoch's steps
actually reach (the dropped tail's unread chunks excluded); the cache column counts whole
partitions (a `--cache-dir` entry is a partition's part of a shard). `--synthetic-imagenet`
stands in ImageNet's train split: 1,281,167 samples in 1,024 shards, JPEG sizes drawn (seeded)
log-normal around 110 KB.

`--measure` also runs the real loader (`build_loader`: the rank reads, its loader workers
decode) on a local dataset at small shapes, each rank after the other in this process, counts
the bytes read from storage through `METATRAINER_READ_LOG` and prints them next to the computed
value, with images/s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from cluster import storage
from cluster.errors import UserError
from cluster.world import World
from data_prep.contract import (
    MANIFEST_NAME,
    Manifest,
    Shard,
    archive_bytes,
    encode_index,
    member_bytes,
    read_manifest,
    shard_name,
)
from training.config import TrainConfig
from training.data import order

DEFAULT_SHAPES = "1x1x8,1x8x8,2x8x8,8x8x8,16x8x8,64x8x8"
IMAGENET_SAMPLES, IMAGENET_SHARDS, IMAGENET_JPEG_BYTES = 1_281_167, 1_024, 110_000
QUALITY_STEPS = 4
"""Steps at the start of epoch 0 whose global batches the shuffle columns describe."""


@dataclass(frozen=True)
class Shape:
    nodes: int
    gpus: int
    workers: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        try:
            nodes, gpus, workers = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not NODESxGPUSxWORKERS") from None
        if min(nodes, gpus) < 1 or workers < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: nodes and GPUs must be ≥ 1")
        return cls(nodes, gpus, workers)

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus

    @property
    def readers(self) -> int:
        """Readers are ranks: loader workers only decode."""
        return self.ranks

    def __str__(self) -> str:
        return f"{self.nodes}x{self.gpus}x{self.workers}"


def synthetic_imagenet(seed: int = 0) -> Manifest:
    """ImageNet's train split in shape: sample counts, and per-sample tar bytes (image, .cls
    and .json members) with JPEG sizes drawn log-normal, mean 110 KB."""
    rng = np.random.default_rng(seed)
    sigma = 0.6
    jpeg = rng.lognormal(math.log(IMAGENET_JPEG_BYTES) - sigma**2 / 2, sigma, IMAGENET_SAMPLES)
    sizes = member_bytes(jpeg.astype(np.int64)) + 2 * member_bytes(100)
    counts = [(IMAGENET_SAMPLES + i) // IMAGENET_SHARDS for i in range(IMAGENET_SHARDS)]
    shards = [
        Shard(
            shard_name("train", i), len(x), archive_bytes(int(x.sum())), "0" * 64, encode_index(x)
        )
        for i, x in enumerate(np.split(sizes, np.cumsum(counts)[:-1]))
    ]
    return Manifest(classes=[str(c) for c in range(1000)], splits={"train": shards})


class Split:
    """A split's layout with the bytes of every sample, from the manifest's index."""

    def __init__(self, shards: list[Shard]) -> None:
        self.layout = order.Layout([s.num_samples for s in shards])
        self.total = self.layout.total
        self.num_shards = len(shards)
        self.shard_bytes = sum(s.bytes for s in shards)
        sizes = np.concatenate([np.diff(s.offsets) for s in shards] or [np.zeros(0, np.int64)])
        self.byte_at = np.concatenate([[0], np.cumsum(sizes)])
        """Byte position of each layout position in the shards laid end to end."""
        self.shard_starts = np.asarray(self.layout.starts)

    def shard_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.shard_starts, positions, side="right") - 1


class Partitioning:
    """The split cut into `count` partitions, and each partition's epoch (chunk order)."""

    def __init__(self, split: Split, count: int, block: int, seed: int, epoch: int) -> None:
        self.count = count
        parts = [order.Partition.of(j, count, split.total) for j in range(count)]
        self.epochs = [order.PartitionEpoch(p, block, seed, epoch) for p in parts]
        starts = np.array([p.start for p in parts], dtype=np.int64)
        stops = starts + np.array([p.size for p in parts], dtype=np.int64)
        self.bytes = split.byte_at[stops] - split.byte_at[starts]
        self.first_shard = split.shard_of(starts)
        self.last_shard = np.where(stops > starts, split.shard_of(stops - 1), self.first_shard - 1)

    def read_in_epoch(self, split: Split, consumed: int) -> np.ndarray:
        """Bytes each partition reads once `consumed` samples of the epoch are trained: its
        chunks up to the one holding its last sample used."""
        read = self.bytes.copy()
        for j, epoch in enumerate(self.epochs):
            used = order.taken(j, self.count, consumed)
            last = epoch.chunk_at(used - 1) if used else -1
            for chunk in epoch.chunks[last + 1 :]:
                read[j] -= split.byte_at[chunk.stop] - split.byte_at[chunk.start]
        return read

    def sequence(self, j: int, stop: int) -> list[int]:
        """Layout positions of partition j's first `stop` samples this epoch."""
        epoch = self.epochs[j]
        if not stop:
            return []
        chunks = range(epoch.chunk_at(stop - 1) + 1)
        return [p for k in chunks for p in epoch.chunk_order(k)][:stop]


@dataclass
class Row:
    partitions: int
    steps: int
    read: np.ndarray
    """Bytes read per node this epoch."""
    cache: np.ndarray
    """Bytes of the partitions each node's readers own."""
    shards_per_reader: np.ndarray
    amplification: float
    per_reader_step: tuple[int, int]
    imbalance: int
    dropped: int
    batch: tuple[float, float, float]
    """Mean over the first steps: partitions and shards one global batch draws from, and the
    share of the layout (as a circular arc) its samples lie in."""


def compute(split: Split, parting: Partitioning, shape: Shape, batch_size: int) -> Row:
    p, q, r = parting.count, shape.readers, shape.ranks
    g = batch_size * r
    steps = order.steps_left(split.total, g)
    owner = np.empty(p, dtype=np.int64)
    shards = []
    for reader in range(q):
        mine = order.rank_partitions(reader, q, p)
        owner[mine] = reader
        touched: set[int] = set()
        for j in mine:
            touched.update(range(parting.first_shard[j], parting.last_shard[j] + 1))
        shards.append(len(touched))
    node = owner // shape.gpus  # ranks contiguous on a node
    read = parting.read_in_epoch(split, steps * g)
    lo, hi, spread = _decoded_per_step(p, q, g, steps)
    return Row(
        partitions=p,
        steps=steps,
        read=np.bincount(node, weights=read, minlength=shape.nodes),
        cache=np.bincount(node, weights=parting.bytes, minlength=shape.nodes),
        shards_per_reader=np.array(shards),
        amplification=read.sum() / split.shard_bytes,
        per_reader_step=(lo, hi),
        imbalance=spread,
        dropped=split.total - steps * g,
        batch=_batches(split, parting, g, min(QUALITY_STEPS, steps)),
    )


def _decoded_per_step(p: int, q: int, g: int, steps: int) -> tuple[int, int, int]:
    """(fewest, most) samples a reader decodes in a step, and the largest spread in one step."""
    lo, hi, spread = g, 0, 0
    js = np.arange(p)
    block = max(1, 2**22 // p)
    for t0 in range(0, steps, block):
        consumed = (np.arange(t0, min(steps, t0 + block)) * g)[:, None]
        per_partition = order.taken(js, p, consumed + g) - order.taken(js, p, consumed)
        # Partition j belongs to reader j mod Q (unevenly where Q does not divide P).
        per_reader = np.stack([per_partition[:, r::q].sum(axis=1) for r in range(q)], axis=1)
        lo, hi = min(lo, int(per_reader.min())), max(hi, int(per_reader.max()))
        spread = max(spread, int((per_reader.max(axis=1) - per_reader.min(axis=1)).max()))
    return lo, hi, spread


def _batches(split: Split, parting: Partitioning, g: int, steps: int) -> tuple[float, ...]:
    """Over the first `steps` global steps: mean partitions, shards and span of a batch."""
    p = parting.count
    positions: list[list[int]] = [[] for _ in range(steps)]
    parts = [0] * steps
    for j in range(p):
        bounds = [order.taken(j, p, t * g) for t in range(steps + 1)]
        sequence = parting.sequence(j, bounds[-1])
        for t in range(steps):
            if bounds[t + 1] > bounds[t]:
                parts[t] += 1
                positions[t] += sequence[bounds[t] : bounds[t + 1]]
    shards, spans = [], []
    for step in positions:
        where = np.sort(np.asarray(step))
        shards.append(len(np.unique(split.shard_of(where))))
        gaps = np.diff(where, append=where[0] + split.total)  # the last gap wraps around
        spans.append(1 - (int(gaps.max()) - 1) / split.total)
    return tuple(float(np.mean(x)) if steps else 0.0 for x in (parts, shards, spans))


def print_computed(split: Split, shapes: list[Shape], args: argparse.Namespace) -> None:
    unit, scale = ("GB", 1e9) if split.shard_bytes >= 1e10 else ("MB", 1e6)
    cfg = TrainConfig()
    print(
        f"{split.total:,} samples in {split.num_shards:,} shards, "
        f"{split.shard_bytes / scale:,.2f} {unit}; --partitions {args.partitions}, "
        f"--shuffle-block {args.shuffle_block}, batch {args.batch_size} per GPU, "
        f"epoch 0, seed {cfg.optim.seed}\n"
    )
    head = (
        f"{'shape':<8} {'R':>4} {'Q':>5} {'P':>6} │ {f'read {unit}/node':>15} "
        f"{f'cache {unit}/node':>15} {'shards/reader':>13} {'read÷shards':>11} │ "
        f"{'decoded/step':>12} {'imbal':>5} {'dropped':>7} │ {'batch: parts':>12} "
        f"{'shards':>6} {'span':>5}"
    )
    print(head)
    print(f"{'':27}│ {'mean / max':>15} {'mean / max':>15} {'mean / max':>13}")
    print("─" * len(head))
    partitionings: dict[int, Partitioning] = {}
    footnotes = []
    for shape in shapes:
        p = args.partitions
        if p not in partitionings:
            partitionings[p] = Partitioning(split, p, args.shuffle_block, cfg.optim.seed, epoch=0)
        row = compute(split, partitionings[p], shape, args.batch_size)
        if not row.steps:
            footnotes.append(f"- {shape}: a global batch is more than the split; no step")
        print(
            f"{str(shape):<8} {shape.ranks:>4} {shape.readers:>5} {p:>6} │ "
            f"{_mean_max(row.read / scale, 2):>15} {_mean_max(row.cache / scale, 2):>15} "
            f"{_mean_max(row.shards_per_reader, 0):>13} {row.amplification:>11.4f} │ "
            + (
                f"{'{} – {}'.format(*row.per_reader_step):>12} {row.imbalance:>5} "
                f"{row.dropped:>7} │ {row.batch[0]:>12,.0f} {row.batch[1]:>6,.0f} "
                f"{row.batch[2]:>5.0%}"
                if row.steps
                else f"{'-':>12} {'-':>5} {row.dropped:>7} │ {'-':>12} {'-':>6} {'-':>5}"
            )
        )
    for note in footnotes:
        print(note)


def _mean_max(values: np.ndarray, digits: int) -> str:
    return f"{values.mean():,.{digits}f} / {values.max():,.{digits}f}"


def measure(dataset: str, manifest: Manifest, split: Split, args: argparse.Namespace) -> None:
    """The real loader at small shapes: bytes read (from the storage read log) and images/s."""
    # torch: only the measurement needs it
    from training.data.batches import TrainBatches
    from training.data.loader import build_loader

    cfg = TrainConfig(
        batch_size=args.batch_size,
        image_size=args.image_size,
        partitions=args.partitions,
        shuffle_block=args.shuffle_block,
    )
    names = {storage.join(dataset, s.name) for s in manifest.shards(args.split)}
    print(
        f"\nmeasured: the real loader on this machine ({os.cpu_count()} cores), ranks one after "
        f"another, {args.image_size} px, augment {cfg.data.augment}, epoch 0; load average "
        f"{os.getloadavg()[0]:.1f} at the start (images/s is only as quiet as the machine)\n"
    )
    head = (
        f"{'shape':<8} {'R':>4} {'Q':>5} │ {'images':>7} {'s':>6} {'images/s':>8} │ "
        f"{'read÷shards measured':>20} {'computed':>8}"
    )
    print(head)
    print("─" * len(head))
    for shape in args.measure_shapes:
        parting = Partitioning(split, args.partitions, args.shuffle_block, cfg.optim.seed, epoch=0)
        computed = compute(split, parting, shape, args.batch_size).amplification
        with tempfile.TemporaryDirectory() as log:
            os.environ[storage.READ_LOG_VAR] = log
            try:
                start, images = time.perf_counter(), 0
                for rank in range(shape.ranks):
                    world = World(rank, shape.ranks, rank % shape.gpus)
                    batches = TrainBatches.from_config(dataset, manifest, args.split, cfg, world)
                    batches.set_position(epoch=0)
                    images += sum(len(y) for _, y in build_loader(batches, shape.workers))
                seconds = time.perf_counter() - start
            finally:
                del os.environ[storage.READ_LOG_VAR]
            totals = storage.read_log_totals(log)
        read = sum(n for url, n in totals.items() if url in names)
        print(
            f"{str(shape):<8} {shape.ranks:>4} {shape.readers:>5} │ {images:>7,} {seconds:>6.1f} "
            f"{images / seconds:>8,.0f} │ {read / split.shard_bytes:>20.4f} {computed:>8.4f}"
        )


def load(args: argparse.Namespace) -> tuple[str | None, Manifest]:
    """(dataset location or None, manifest); --manifest may name the file or its dataset."""
    if args.synthetic_imagenet:
        return None, synthetic_imagenet()
    location = args.manifest.rstrip("/")
    if location.endswith("/" + MANIFEST_NAME) or location == MANIFEST_NAME:
        location = location[: -len(MANIFEST_NAME)].rstrip("/") or "."
    return location, read_manifest(location)


def _shapes(text: str) -> list[Shape]:
    return [Shape.parse(x) for x in text.split(",")]


def main() -> None:
    cfg = TrainConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="a prepared dataset (directory, s3:// or manifest.json)")
    source.add_argument("--synthetic-imagenet", action="store_true", help="ImageNet in shape")
    parser.add_argument("--split", default="train", help="the split to compute")
    parser.add_argument(
        "--partitions", type=int, help="P (default: training's, order.auto_partitions)"
    )
    parser.add_argument(
        "--shuffle-block", type=int, help="B (default: training's, order.auto_block)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="per GPU")
    shapes = "nodes x GPUs per node x loader workers, comma-separated"
    parser.add_argument("--shapes", type=_shapes, default=DEFAULT_SHAPES, help=shapes)
    parser.add_argument("--measure", action="store_true", help="also run the real loader")
    parser.add_argument(
        "--measure-shapes", type=_shapes, default="1x2x1,1x2x2", help="the shapes --measure runs"
    )
    parser.add_argument("--image-size", type=int, default=cfg.data.image_size, help="for --measure")
    args = parser.parse_args()
    if (args.partitions or 1) < 1 or (args.shuffle_block or 1) < 1 or args.batch_size < 1:
        parser.error("--partitions, --shuffle-block and --batch-size must be ≥ 1")
    if args.measure and (args.manifest is None or storage.is_s3(args.manifest)):
        parser.error("--measure reads a local dataset: give it with --manifest DIR")
    try:
        dataset, manifest = load(args)
        split = Split(manifest.shards(args.split))
        if split.total < 1:
            raise UserError(f"split {args.split!r} holds no samples")
        args.partitions, args.shuffle_block = order.resolve(
            args.partitions, args.shuffle_block, [(split.total, split.shard_bytes)]
        )
        started = time.perf_counter()
        print_computed(split, args.shapes, args)
        print(f"(computed in {time.perf_counter() - started:.1f} s)")
        if args.measure:
            assert dataset is not None
            measure(dataset, manifest, split, args)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
