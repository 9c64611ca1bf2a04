"""One rank's CPU loader as loader workers grow: images/s at W = 1, 2, 4, 8, 16, side by side.

    .venv/bin/python bench/loader_scaling.py --photos-count 800 --copies 4      # this machine
    python3 bench/loader_scaling.py --photos .photos                            # 16 cores

For each W, measured once over `--batches` batches of 64 (224 px, augmentation on) after a
warm-up batch that pays for starting the processes:
- **ceiling**: our `decode_cpu` in W plain forked processes, no loader (what the cores can
  decode; `bench/decode_scaling.py`);
- **ours**: `StepLoader` (the rank reads, loader worker w decodes steps t ≡ w mod W whole and
  hands each over as one uint8 tensor), the order's defaults as `metatrainer train` resolves
  them for this dataset;
- **torchvision**: ImageFolder + DataLoader(num_workers=W), the textbook anchor.
Then the ratios the targets are stated in: ours ÷ ceiling, ours ÷ torchvision, and ours at W ÷
ours at 2 (no collapse as workers grow).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_scaling  # noqa: E402
from baselines import torchvision_loader_rate  # noqa: E402
from loader_bench import train_batches  # noqa: E402
from photos import write_photo_folder, write_shards  # noqa: E402
from throughput import replicate  # noqa: E402

from training.data.loader import StepLoader  # noqa: E402

BATCH = 64
# More loader workers than cores is what this table measures: not a mistake to warn about.
warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)


def ours(shards: str, workers: int, batches: int, size: int, **kw) -> float:
    data, _ = train_batches(shards, BATCH, size, True, **kw)
    loader = StepLoader([data], workers, persistent=False).epoch()
    next(loader)
    images, start = 0, time.perf_counter()
    for _, [(_, labels, _)] in zip(range(batches), loader, strict=False):
        images += len(labels)
    return images / (time.perf_counter() - start)


def ceiling(folder: Path, workers: int, images: int) -> float:
    if not decode_scaling._DATA:
        decode_scaling._DATA.extend(p.read_bytes() for p in sorted(folder.glob("*/*.jpg"))[:400])
    decode_scaling.SIZE = SIZE
    return decode_scaling.pool_rate("ours", workers, max(8, images // workers))


SIZE = 224


def main() -> None:
    global SIZE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8,16", help="loader worker counts W")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--photos", help="a folder of .jpg photos (default: scikit-learn's)")
    parser.add_argument("--photos-count", type=int, default=1500)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--workdir", help="reuse/keep the photos and shards here")
    args = parser.parse_args()
    SIZE = args.image_size
    work = Path(args.workdir or tempfile.mkdtemp(prefix="loader-scaling-"))
    folder, shards = work / "photos", str(work / "shards")
    if not folder.exists():
        write_photo_folder(folder, args.photos_count, photos=args.photos)
    replicate(folder, args.copies)
    if not (Path(shards) / "manifest.json").exists():
        write_shards(folder, shards, shard_samples=500)
    n, b, px = len(list(folder.glob("*/*.jpg"))), args.batches, args.image_size
    counts = [int(w) for w in args.workers.split(",")]

    def measure(name: str, how) -> float:
        try:
            rate = how()
        except Exception as e:  # noqa: BLE001 - a row failing must not lose the others
            print(f"  {name}: failed: {type(e).__name__}: {e}", flush=True)
            return float("nan")
        print(f"  {name}: {rate:,.0f} images/s", flush=True)
        return rate

    rows = []
    for w in counts:
        rows.append((
            w,
            measure(f"ceiling, {w} processes", lambda w=w: ceiling(folder, w, b * BATCH)),
            measure(f"ours, {w} workers", lambda w=w: ours(shards, w, b, px)),
            measure(f"torchvision, {w} workers",
                    lambda w=w: torchvision_loader_rate(folder, px, w, BATCH, b)),
        ))  # fmt: skip
    ours_at_2 = next((r[2] for r in rows if r[0] == 2), float("nan"))
    print(f"\nloader scaling: {n} photos, {px} px, batch {BATCH}, {b} batches a row, "
          f"{os.cpu_count()} CPUs\n")  # fmt: skip
    print("| W | ceiling (decode_cpu, W processes) | ours | torchvision | ours ÷ ceiling | "
          "ours ÷ torchvision | ours ÷ ours at W=2 |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for w, top, mine, tv in rows:
        print(f"| {w} | {top:,.0f} | {mine:,.0f} | {tv:,.0f} | {mine / top:.2f} | "
              f"{mine / tv:.2f}× | {mine / ours_at_2:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
