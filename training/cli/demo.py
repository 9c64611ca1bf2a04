"""`metatrainer demo`: the whole path on sample data, sized to finish in minutes on 2 CPU cores.

    metatrainer demo --workdir ./metatrainer-demo
    metatrainer demo --config demo.toml        # the training flags, or a --config file

ImageNet weights cannot be assumed reachable, so the demo trains heads on a randomly
initialised (seeded) frozen backbone; on real data use --weights imagenet or a local file.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from training.cli.flags import add_training_flags
from training.cli.train import config_from_args, print_outcome
from training.config import DEMO_DEFAULTS, TrainConfig

DEMO_SETS = ("data", "storage", "name")
"""What the demo sets itself: its shards, its runs directory and a run name with the time."""


def run_demo(workdir: str, cfg: TrainConfig, address: str | None = None) -> None:
    from cluster.ray_cluster import connect
    from data_prep.prep import prep
    from data_prep.sample_data import write_digits_imagefolder
    from training.run.driver import run_training

    root = Path(workdir).resolve()
    images, shards, runs = root / "images", root / "shards", root / "runs"
    if not images.is_dir():
        n = write_digits_imagefolder(images, size=32)
        print(f"wrote {n} digit images to {images}")
    connect(address)
    prep(str(images), str(shards))
    cfg.data.datasets = [str(shards)]
    cfg.run.storage = str(runs)
    cfg.run.name = time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"\ntraining run {cfg.run.name} with {cfg.cluster.workers} workers")
    outcome = run_training(cfg, address, progress_stream=sys.stderr)
    print_outcome(outcome)
    print(f"shards          {shards}")


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="end to end on sample data: digits → shards → 2-worker training → test accuracy",
        description="Writes scikit-learn's 1,797 handwritten digits as an ImageFolder of JPEGs, "
        "shards it, trains on a local Ray cluster and prints the test accuracy.",
    )
    p.add_argument(
        "--workdir",
        default="./metatrainer-demo",
        help="where images, shards and runs go (default: %(default)s)",
    )
    add_training_flags(p, DEMO_DEFAULTS, omit=DEMO_SETS)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    run_demo(args.workdir, config_from_args(args, DEMO_DEFAULTS), args.address)
    return 0
