"""Where one rank's CPU loader spends its time as loader workers grow: a table of images/s.

    .venv/bin/python bench/loader_scaling.py --workers 2 --photos-count 800 --copies 4
    python3 bench/loader_scaling.py --workers 16 --photos .photos      # a 16-core GPU machine

Rows, each measured once over `--batches` batches of 64 after a warm-up batch (and a short
row, as `bench/throughput.py` times it, to show the start-up share):
- torchvision's ImageFolder + DataLoader, the anchor;
- ours as `metatrainer train` would resolve --partitions/--shuffle-block for this dataset;
- ours with one partition per loader worker (each worker reads only what it decodes);
- ours reading and planning crops only (`--decode gpu`'s loader side: no JPEG decode);
- ours with half the workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import torchvision_loader_rate  # noqa: E402
from loader_bench import train_batches  # noqa: E402
from photos import write_photo_folder, write_shards  # noqa: E402
from throughput import replicate  # noqa: E402

from training.data import build_loader  # noqa: E402


def ours(shards: str, workers: int, batches: int, size: int, **kw) -> float:
    data, _ = train_batches(shards, 64, size, True, **kw)
    loader = iter(build_loader(data, workers))
    next(loader)
    images, start = 0, time.perf_counter()
    for _, (_, labels) in zip(range(batches), loader, strict=False):
        images += len(labels)
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--photos", help="a folder of .jpg photos (default: scikit-learn's)")
    parser.add_argument("--photos-count", type=int, default=1500)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--workdir", help="reuse/keep the photos and shards here")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loader-scaling-"))
    folder, shards = work / "photos", str(work / "shards")
    if not folder.exists():
        write_photo_folder(folder, args.photos_count, photos=args.photos)
    replicate(folder, args.copies)
    if not (Path(shards) / "manifest.json").exists():
        write_shards(folder, shards, shard_samples=500)
    n, w, b, px = len(list(folder.glob("*/*.jpg"))), args.workers, args.batches, args.image_size
    rows: list[tuple[str, float]] = []

    def row(name: str, measure) -> None:
        try:
            rate = measure()
        except Exception as e:  # noqa: BLE001 - a row failing must not lose the others
            print(f"  {name}: failed: {type(e).__name__}: {e}", flush=True)
            rate = float("nan")
        rows.append((name, rate))
        print(f"  {name}: {rate:,.0f} images/s", flush=True)

    row(f"torchvision, {w} workers", lambda: torchvision_loader_rate(folder, px, w, 64, b))
    row(f"ours, {w} workers, 40 batches", lambda: ours(shards, w, 40, px))
    row(f"ours, {w} workers", lambda: ours(shards, w, b, px))
    row(f"ours, {w} workers, --partitions {w}", lambda: ours(shards, w, b, px, partitions=w))
    row(f"ours, {w} workers, read + plan only (--decode gpu)",
        lambda: ours(shards, w, b, px, device_decode=True))  # fmt: skip
    row(f"ours, {w // 2} workers", lambda: ours(shards, w // 2, b, px))
    anchor = rows[0][1]
    print(f"\nloader scaling: {n} photos, {px} px, batch 64, {b} batches, {os.cpu_count()} CPUs\n")
    print("| loader | images/s | vs torchvision |\n|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / anchor:.2f}× |")


if __name__ == "__main__":
    main()
