"""Does CPU decoding scale with processes on this machine, and what does moving crops between
processes cost? The layers under `bench/loader_scaling.py`, one at a time.

    .venv/bin/python bench/decode_scaling.py --photos .photos --procs 1,2
    python3 bench/decode_scaling.py --photos .photos --procs 1,8,16      # a 16-core machine

Rows (images/s, all processes together):
- our `decode_cpu` (a planned random crop at 224) in P forked processes, no DataLoader;
- torchvision's path (PIL open, RandomResizedCrop, ToTensor) in P processes, no DataLoader;
- a DataLoader of P workers that only hands over ready uint8 crops (4 or 64 a part), i.e.
  the cost of moving decoded crops to the main process;
- our decode_cpu inside a DataLoader of P workers (single images batched by the DataLoader).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from photos import write_photo_folder  # noqa: E402

from training.data.decode import decode_cpu, plan_crop, sample_rng  # noqa: E402

SIZE = 224
_DATA: list[bytes] = []


def _ours(i: int) -> torch.Tensor:
    rng = sample_rng(1234, 0, i)
    return decode_cpu(_DATA[i % len(_DATA)], SIZE, lambda w, h: plan_crop(w, h, rng))


def _torchvision(i: int) -> torch.Tensor:
    import torchvision.transforms as T

    t = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor()])
    return t(Image.open(io.BytesIO(_DATA[i % len(_DATA)])).convert("RGB"))


def _work(args: tuple[str, int, int]) -> int:
    name, start, count = args
    torch.set_num_threads(1)
    f = _ours if name == "ours" else _torchvision
    for i in range(start, start + count):
        f(i)
    return count


def pool_rate(name: str, procs: int, per_proc: int) -> float:
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_work, [(name, 0, 4)] * procs)  # warm up
        start = time.perf_counter()
        done = sum(pool.map(_work, [(name, k * per_proc, per_proc) for k in range(procs)]))
        return done / (time.perf_counter() - start)


class Crops(IterableDataset):
    def __init__(self, per_part: int, parts: int) -> None:
        self.per_part, self.parts = per_part, parts

    def __iter__(self):
        crop = torch.zeros(self.per_part, 3, SIZE, SIZE, dtype=torch.uint8)
        for _ in range(self.parts):
            yield crop.clone()


class Decoded(Dataset):
    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> torch.Tensor:
        return _ours(i)


def loader_rate(dataset, workers: int, batch_size, items: int) -> float:
    it = iter(DataLoader(dataset, batch_size=batch_size, num_workers=workers, prefetch_factor=4))
    next(it)
    images, start = 0, time.perf_counter()
    while images < items:
        images += len(next(it))
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", help="a folder of .jpg photos (default: scikit-learn's)")
    parser.add_argument("--procs", default="1,8,16")
    parser.add_argument("--images", type=int, default=200, help="per process and row")
    args = parser.parse_args()
    folder = Path("/tmp/decode-scaling")
    if not folder.exists():
        write_photo_folder(folder, 200, photos=args.photos)
    _DATA.extend(p.read_bytes() for p in sorted(folder.glob("*/*.jpg")))
    rows = []
    for p in [int(x) for x in args.procs.split(",")]:
        n = args.images
        rows += [
            (f"decode_cpu, {p} processes", pool_rate("ours", p, n)),
            (f"torchvision PIL path, {p} processes", pool_rate("torchvision", p, n)),
            (f"DataLoader handing over crops, 4 a part, {p} workers",
             loader_rate(Crops(4, 10**6), p, None, min(20000, 4000 * p))),
            (f"DataLoader handing over crops, 64 a part, {p} workers",
             loader_rate(Crops(64, 10**6), p, None, min(20000, 4000 * p))),
            (f"decode_cpu in a DataLoader, batch 64, {p} workers",
             loader_rate(Decoded(), p, 64, n * p)),
        ]  # fmt: skip
        for name, rate in rows[-5:]:
            print(f"  {name}: {rate:,.0f} images/s", flush=True)
    print(f"\ndecode scaling, {SIZE} px from 500×375 JPEGs, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}\n")  # fmt: skip
    print("| what | images/s |\n|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
