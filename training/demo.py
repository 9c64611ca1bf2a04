"""`metatrainer demo`: the whole path on sample data, sized to finish in minutes on 2 CPU cores.

    metatrainer demo --workdir ./metatrainer-demo

ImageNet weights cannot be assumed reachable, so the demo trains heads on a randomly
initialised (seeded) frozen backbone; on real data use --weights imagenet or a local file.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cluster.ray_cluster import connect
from data_prep.prep import prep
from data_prep.sample_data import write_digits_imagefolder
from training.cli import print_outcome
from training.config import TrainConfig
from training.driver import run_training


def run_demo(workdir: str, cfg: TrainConfig, address: str | None = None) -> None:
    root = Path(workdir).resolve()
    images, shards, runs = root / "images", root / "shards", root / "runs"
    if not images.is_dir():
        n = write_digits_imagefolder(images, size=32)
        print(f"wrote {n} digit images to {images}")
    connect(address)
    prep(str(images), str(shards))
    cfg.data = [str(shards)]
    cfg.storage = str(runs)
    cfg.name = time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"\ntraining run {cfg.name} with {cfg.workers} workers")
    outcome = run_training(cfg, address, progress_stream=sys.stderr)
    print_outcome(outcome)
    print(f"shards          {shards}")
