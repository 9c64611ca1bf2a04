"""Recovery after a worker is killed: time until training resumes, and steps redone.

    .venv/bin/python bench/recovery_bench.py [--kills 3] [--checkpoint-every-steps 4]

Starts a local Ray cluster, writes and shards the sample digits, trains with 2 CPU workers and
kills one worker with SIGKILL at a few random steps. Prints a table per kill and the totals.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray.util.state import list_actors

from data_prep.prep import prep
from data_prep.sample_data import write_digits_imagefolder
from training.config import TrainConfig
from training.driver import run_training


def steps(log: Path) -> list[str]:
    """Rank 0's sample-log lines of trained steps (not its resume marks)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if not line.startswith("resume")]


def last_position(log: Path) -> tuple[int, int] | None:
    lines = steps(log)
    return tuple(map(int, lines[-1].split("\t")[:2])) if lines else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--checkpoint-every-steps", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    ray.init(num_cpus=4, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    root = Path(tempfile.mkdtemp(prefix="recovery-bench-"))
    write_digits_imagefolder(root / "images", size=32)
    prep(str(root / "images"), str(root / "shards"), num_shards=4)
    cfg = TrainConfig(
        data=[str(root / "shards")], storage=str(root / "runs"), name="bench", weights="none",
        image_size=32, batch_size=16, epochs=args.epochs, augment=False, workers=2,
        loader_workers=1, max_failures=args.kills + 1, metrics_port=0,
        checkpoint_every_steps=args.checkpoint_every_steps, sample_log=str(root / "log"),
    )  # fmt: skip
    stride = cfg.batch_size * cfg.workers
    log = root / "log" / "rank-0.tsv"
    run = threading.Thread(target=run_training, args=(cfg,))
    run.start()
    while last_position(log) is None:
        time.sleep(0.05)
    steps_per_epoch = 1797 * 8 // 10 // stride  # about: only used to spread the kills
    rng = random.Random(0)
    targets = sorted(rng.sample(range(3, args.epochs * steps_per_epoch - 3), args.kills))
    rows = []
    for target in targets:
        while run.is_alive():
            epoch, position = last_position(log)
            if epoch * steps_per_epoch + position // stride >= target:
                break
            time.sleep(0.02)
        pids = [a.pid for a in list_actors(address=address, filters=[
            ("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]  # fmt: skip
        if not run.is_alive() or not pids:
            break
        killed_at = last_position(log)
        lines = len(steps(log))
        os.kill(pids[0], signal.SIGKILL)
        t0 = time.perf_counter()
        while len(steps(log)) == lines:
            time.sleep(0.02)
        resumed = time.perf_counter() - t0
        first_new = tuple(map(int, steps(log)[lines].split("\t")[:2]))
        redone = (
            (killed_at[0] - first_new[0]) * steps_per_epoch
            + (killed_at[1] - first_new[1]) // stride
            + 1
        )
        rows.append((killed_at, resumed, redone))
    run.join()
    print(f"{'kill at (epoch, sample)':<26} {'kill → next step s':>19} {'steps redone':>13}")
    for at, seconds, redone in rows:
        print(f"{str(at):<26} {seconds:>19.1f} {redone:>13}")
    if rows:
        print(f"{'mean':<26} {sum(r[1] for r in rows) / len(rows):>19.1f} "
              f"{sum(r[2] for r in rows) / len(rows):>13.1f}")  # fmt: skip
    print(f"(checkpoint every {args.checkpoint_every_steps} steps)")


if __name__ == "__main__":
    main()
