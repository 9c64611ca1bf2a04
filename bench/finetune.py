"""Does a meta-trained run carry to a new dataset? `--init-from` against training from scratch.

    flock /tmp/metatrainer-ray.lock .venv/bin/python bench/finetune.py --workdir /tmp/finetune

On scikit-learn's handwritten digits (real scans, as `metatrainer demo` writes them): digits 0–2
and 3–5 are the two meta-training datasets, 6–9 the new one, with a small train split (about
ten images a class, `--train-fraction`) so that what the adapters carry can show. One run
meta-trains layer4 adapters and a head per dataset on 0–2 and 3–5; then the new dataset is
trained with the same small budget four ways: a head on the plain backbone, a head on the
carried adapters (frozen: `--init-from`), the carried adapters trained on (`--train-adapters`),
and new adapters from zero (`--adapters layer4` without `--init-from`). No ImageNet weights
are reachable offline: the backbone is torchvision's ResNet-50 with `--weights none` (random,
seeded, frozen), the same in every run. Prints a markdown table: setting, test accuracy on
6–9, seconds (the whole `metatrainer train` run: Ray Train start, feature cache, training,
evaluation). All runs in one invocation, on a local Ray cluster.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from PIL import Image

from cluster.ray_cluster import connect
from data_prep.contract import read_manifest
from data_prep.prep import prep
from data_prep.sample_data import load_digits
from training.config import TrainConfig
from training.run.driver import run_training

GROUPS = {"meta-0to2": (0, 1, 2), "meta-3to5": (3, 4, 5), "new-6to9": (6, 7, 8, 9)}


def write_group(dst: Path, digits: tuple[int, ...], size: int) -> None:
    """dst/<digit>/<index>.jpg for every scan of `digits`, upsampled like the demo's."""
    images, labels = load_digits()
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        if label in digits:
            (dst / str(label)).mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
            img.save(dst / str(label) / f"{i:04d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/metatrainer-finetune")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--meta-epochs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=15, help="the new dataset's budget")
    p.add_argument("--train-fraction", type=float, default=0.06, help="of the new dataset")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()

    root = Path(args.workdir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    connect(None)
    shards = {}
    for name, digits in GROUPS.items():
        write_group(root / "images" / name, digits, args.image_size)
        few = args.train_fraction
        splits = (
            {"train": few, "val": 0.04, "test": 1 - few - 0.04}
            if name.startswith("new")
            else {"train": 0.8, "val": 0.1, "test": 0.1}
        )
        shards[name] = str(root / "shards" / name)
        prep(str(root / "images" / name), shards[name], splits=splits, num_shards=1)
    new = shards["new-6to9"]
    counts = {s: read_manifest(new).num_samples(s) for s in ("train", "val", "test")}

    base = TrainConfig(
        storage=str(root / "runs"),
        weights="none",
        image_size=args.image_size,
        augment=False,
        workers=args.workers,
        loader_workers=0,
        metrics_port=0,
        lr_step=1000,
    )

    def train(name: str, **overrides) -> tuple[float | None, float]:
        started = time.perf_counter()
        outcome = run_training(base.replace(name=name, **overrides))
        return outcome.metrics.get("test_accuracy"), time.perf_counter() - started

    meta_acc, meta_s = train(
        "meta", data=[shards["meta-0to2"], shards["meta-3to5"]], adapters=["layer4"],
        epochs=args.meta_epochs, batch_size=16,
    )  # fmt: skip
    meta = str(root / "runs" / "meta")
    small = dict(data=[new], epochs=args.epochs, batch_size=8)
    rows = [
        ("head only, plain backbone", train("plain", **small)),
        ("head only, --init-from meta (adapters frozen)", train("frozen", init_from=meta, **small)),
        (
            "--init-from meta --train-adapters",
            train("tuned", init_from=meta, train_adapters=True, **small),
        ),
        (
            "new adapters from zero (--adapters layer4)",
            train("scratch", adapters=["layer4"], **small),
        ),
    ]
    print()
    print(
        f"Meta-training (layer4 adapters, digits 0–2 and 3–5, {args.meta_epochs} epochs): "
        f"test accuracy {meta_acc:.3f}, {meta_s:.0f} s. New dataset: digits 6–9, "
        f"{counts['train']} train / {counts['val']} val / {counts['test']} test images, "
        f"{args.epochs} epochs of batch 8, {args.image_size} px, --weights none (random frozen "
        f"ResNet-50), {args.workers} worker(s) on CPU."
    )
    print()
    print("| setting | test accuracy | seconds |")
    print("|---|---|---|")
    for setting, (acc, seconds) in rows:
        print(f"| {setting} | {acc:.3f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
