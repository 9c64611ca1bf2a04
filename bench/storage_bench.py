"""Storage throughput: prep and the training loader on a local directory vs a local S3 server.

    .venv/bin/python bench/storage_bench.py                  # all 1,797 digits at 64 px
    .venv/bin/python bench/storage_bench.py --size 128 --repeat 3 --loader-workers 2

The same ImageFolder (scikit-learn's digits, JPEG) is prepared into a local directory and into
a bucket on moto's S3 server (in this process, over HTTP on 127.0.0.1; from
tests/s3_moto.py), then read back by the training loader from each. Prints a table of
images/s and MB/s (MB of shard bytes); the best of --repeat runs, on this machine. moto keeps
objects in memory and is no real S3: the numbers show our overhead per request and byte, not
a network's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# Dummy credentials for the local moto server only; set before Ray starts so its workers
# inherit them.
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from s3_moto import S3Server  # noqa: E402

from cluster import s3, storage  # noqa: E402
from cluster.world import World  # noqa: E402
from data_prep.contract import read_manifest  # noqa: E402
from data_prep.prep import prep  # noqa: E402
from data_prep.progress import Progress  # noqa: E402
from data_prep.sample_data import write_digits_imagefolder  # noqa: E402
from training.data import order  # noqa: E402
from training.data.batches import TrainBatches  # noqa: E402
from training.data.loader import build_loader  # noqa: E402
from training.data.reader import SplitReader  # noqa: E402

SPLIT = "train"


def best_of(repeat: int, run: Callable[[int], int]) -> tuple[float, int]:
    """(fastest seconds, images) of `repeat` runs of `run(i)`, which returns its image count."""
    results = []
    for i in range(repeat):
        start = time.perf_counter()
        images = run(i)
        results.append((time.perf_counter() - start, images))
    return min(results)


def prep_to(src: Path, dst: str, args: argparse.Namespace, endpoint: str | None) -> int:
    manifest = prep(
        str(src),
        dst,
        splits={SPLIT: 1.0},
        num_shards=args.num_shards,
        progress=Progress(enabled=False),
        s3_endpoint=endpoint,
    )
    return manifest.num_samples(SPLIT)


def read_raw(dataset: str) -> int:
    """Storage and tar parsing only: every sample's compressed bytes, in one process."""
    shards = read_manifest(dataset).shards(SPLIT)
    total = sum(s.num_samples for s in shards)
    return len(SplitReader(dataset, shards, None).read(range(total)))


def load_batches(dataset: str, args: argparse.Namespace) -> int:
    """What training sees: shuffled, decoded, resized batches from the DataLoader."""
    manifest = read_manifest(dataset)
    shards, total = manifest.shards(SPLIT), manifest.num_samples(SPLIT)
    partitions, block = order.resolve(None, None, [(total, sum(s.bytes for s in shards))])
    batches = TrainBatches(
        dataset,
        shards,
        World(),
        batch_size=args.batch_size,
        image_size=args.size,
        augment=False,
        seed=0,
        num_classes=len(manifest.classes),
        partitions=partitions,
        shuffle_block=block,
    )
    return sum(len(labels) for _, labels in build_loader(batches, args.loader_workers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--limit", type=int, help="use only the first N of the 1,797 digits")
    parser.add_argument("--num-shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    server = S3Server()
    s3.set_endpoint(server.endpoint)
    bucket = server.make_bucket("storage-bench")
    rows: list[tuple[str, str, float, int, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "digits"
        write_digits_imagefolder(src, size=args.size, limit=args.limit)
        local, remote = str(Path(tmp) / "shards"), f"{bucket}/digits"
        # Untimed: starts Ray and its worker processes, so neither timed run pays for that.
        prep_to(src, str(Path(tmp) / "warm-up"), args, None)

        # Each prep run writes a fresh DST: a re-run into the same one skips unchanged shards.
        roots = {"local": local, "S3 (moto)": remote}
        for where, root in roots.items():
            endpoint = server.endpoint if storage.is_s3(root) else None
            seconds, images = best_of(
                args.repeat,
                lambda i, r=root, e=endpoint: prep_to(src, storage.join(r, f"run-{i}"), args, e),
            )
            rows.append(("prep", where, seconds, images, _shard_bytes(storage.join(root, "run-0"))))
        datasets = {where: storage.join(root, "run-0") for where, root in roots.items()}
        for where, dataset in datasets.items():
            seconds, images = best_of(args.repeat, lambda _, d=dataset: read_raw(d))
            rows.append(("read samples (no decode)", where, seconds, images, _shard_bytes(dataset)))
        for where, dataset in datasets.items():
            seconds, images = best_of(args.repeat, lambda _, d=dataset: load_batches(d, args))
            step = f"loader ({args.loader_workers} workers, decode)"
            rows.append((step, where, seconds, images, _shard_bytes(dataset)))
    server.stop()

    print(
        f"{args.limit or 'all'} digits at {args.size} px, {args.num_shards} shards, "
        f"best of {args.repeat}\n"
    )
    print(
        f"{'step':<28} {'storage':<10} {'images':>7} {'MB':>7} {'s':>7} {'images/s':>9} {'MB/s':>7}"
    )
    for step, where, seconds, images, nbytes in rows:
        mb = nbytes / 1e6
        print(
            f"{step:<28} {where:<10} {images:>7} {mb:>7.2f} {seconds:>7.2f} "
            f"{images / seconds:>9,.0f} {mb / seconds:>7.1f}"
        )


def _shard_bytes(dataset: str) -> int:
    return sum(s.bytes for s in read_manifest(dataset).shards(SPLIT))


if __name__ == "__main__":
    main()
