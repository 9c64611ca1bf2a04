"""The training loader of one rank, decode included, on a prepared dataset's train split.

    .venv/bin/python bench/loader_bench.py ./shards --image-size 224 --loader-workers 2
    .venv/bin/python bench/loader_bench.py s3://bucket/ds --batches 50 --no-augment

A stable command for other scripts: its last line is `images/s: X`. It times `--batches`
batches after one warm-up batch (which pays for starting the loader processes and the first
reads), with the order's defaults that `metatrainer train` would resolve for this dataset.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster import s3, storage  # noqa: E402
from cluster.errors import UserError  # noqa: E402
from cluster.world import World  # noqa: E402
from data_prep.contract import read_manifest  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data import order
from training.data.batches import TrainBatches
from training.data.loader import build_loader


def train_batches(
    data: str, batch_size: int, image_size: int, augment: bool, partitions=None, **kw
) -> tuple[TrainBatches, TrainConfig]:
    """One rank's training batches of a prepared dataset, with the order's defaults that
    `metatrainer train` would resolve for it (or the given --partitions)."""
    dataset = storage.normalize(data)
    manifest = read_manifest(dataset)
    shards = manifest.shards("train")
    total = sum(s.num_samples for s in shards)
    partitions, block = order.resolve(partitions, None, [(total, sum(s.bytes for s in shards))])
    cfg = TrainConfig.of(batch_size=batch_size, image_size=image_size, augment=augment,
                      partitions=partitions, shuffle_block=block)  # fmt: skip
    return TrainBatches.from_config(dataset, manifest, "train", cfg, World(), **kw), cfg


def measure(args: argparse.Namespace) -> tuple[int, float]:
    """(images, seconds) for `args.batches` batches after a warm-up one."""
    batches, cfg = train_batches(args.data, args.batch_size, args.image_size, args.augment)
    if len(batches) < 2:
        raise UserError(
            f"{args.data}: the train split has fewer than 2 batches of {cfg.optim.batch_size}"
        )
    loader = iter(build_loader(batches, args.loader_workers))
    next(loader)
    images, start = 0, time.perf_counter()
    for _, (_, labels) in zip(range(args.batches), loader, strict=False):
        images += len(labels)
    return images, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="a prepared dataset (directory or s3://bucket/prefix)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches after warm-up")
    parser.add_argument("--no-augment", dest="augment", action="store_false")
    parser.add_argument("--s3-endpoint", help="S3-compatible endpoint for an s3:// dataset")
    args = parser.parse_args()
    s3.set_endpoint(args.s3_endpoint)
    try:
        images, seconds = measure(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"{images} images in {seconds:.2f} s ({args.image_size} px, {args.loader_workers} "
          f"loader workers, batch {args.batch_size}, augment {args.augment})")  # fmt: skip
    print(f"images/s: {images / seconds:.1f}")


if __name__ == "__main__":
    main()
