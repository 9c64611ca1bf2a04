"""Exact, fault-tolerant training: kill workers, still get the same model (a killed driver,
whole nodes lost: tests/multinode; broken checkpoints: test_resume.py).

All on a real local Ray cluster with 2 CPU workers and real digit scans. The reference is an
uninterrupted run; the debug sample log (--sample-log) records the keys of every trained
batch, so the tests can check that the history the final weights descend from trained every
sample of every epoch exactly once.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import sample_log
from reference_run import AUGMENTED_RUN, REFERENCE_RUN
from sample_log import trained_history, wait_for
from train_workers import worker_pids

from data_prep.contract import read_manifest
from training.config import TrainConfig
from training.data import order
from training.run.driver import run_training

EPOCHS, BATCH, WORKERS = REFERENCE_RUN["epochs"], REFERENCE_RUN["batch_size"], 2


@pytest.fixture(scope="module")
def config(small_config):
    def make(shards: str, root: Path, name: str, **overrides) -> TrainConfig:
        values = dict(
            name=name,
            **REFERENCE_RUN,
            workers=WORKERS,
            max_failures=6,
            sample_log=str(root / "log" / name),
        )
        return small_config(shards, root / "runs", **{**values, **overrides})

    return make


def assert_exactly_once(history: dict[tuple, list[str]], reference: dict[tuple, list[str]]):
    sample_log.assert_exactly_once(history, reference, EPOCHS)


@pytest.fixture(scope="module")
def reference(reference_run):
    """The session's uninterrupted run (conftest.py): its result and what each rank trained."""
    result, run_dir, log = reference_run
    return result, trained_history(str(log)), run_dir


def test_killed_workers_change_nothing(shards, config, reference, tmp_path, capfd):
    result, ref_history, _ = reference
    cfg = config(shards, tmp_path, "chaos")
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(out=run_training(cfg)))
    run.start()
    steps_per_epoch = len(ref_history) // (EPOCHS * WORKERS)
    stride = BATCH * WORKERS
    rng = random.Random(2026)
    targets = sorted(rng.sample(range(2, EPOCHS * steps_per_epoch - 2), 3))
    log = Path(cfg.run.sample_log) / "rank-0.tsv"
    kills = 0
    offset = 0
    deadline = time.monotonic() + 600
    for target in targets:
        epoch, step = divmod(target, steps_per_epoch)
        wait_for(log, offset, (epoch, step * stride), deadline, run.is_alive)
        pids = worker_pids()
        if not run.is_alive() or not pids:
            break
        offset = log.stat().st_size
        os.kill(pids[kills % len(pids)], signal.SIGKILL)
        kills += 1
    run.join()
    assert kills == 3, "the run finished before all three kills"
    # A restart from scratch would also end with the same weights: it must have resumed.
    out = capfd.readouterr()
    resumed = re.findall(
        r"resuming chaos at epoch \d+, sample \d+ \(step (\d+)\)", out.out + out.err
    )
    assert any(int(step) > 0 for step in resumed), "no restart resumed from a checkpoint"
    chaos = json.loads(Path(outcome["out"].result_file).read_text())
    assert chaos["feature_cache"]  # so this also resumes inside runs from cached features
    assert chaos["fingerprint"] == result["fingerprint"]
    assert chaos["test_accuracy"] == result["test_accuracy"]
    assert_exactly_once(trained_history(cfg.run.sample_log), ref_history)


def inside_chunks(cfg: dict, total: int, epoch: int, consumed: int) -> bool:
    """Whether a resume after `consumed` samples of `epoch` starts inside a chunk of every
    partition (its samples before that point are read, but not trained)."""
    p = cfg["data"]["partitions"]
    parts = [order.Partition.of(j, p, total) for j in range(p)]
    epochs = [
        order.PartitionEpoch(pt, cfg["data"]["shuffle_block"], cfg["optim"]["seed"], epoch)
        for pt in parts
    ]
    return all(order.taken(j, p, consumed) not in e.starts for j, e in enumerate(epochs))


def test_a_worker_killed_mid_chunk_on_the_image_path_changes_nothing(
    shards, config, augmented_reference_run, tmp_path, capfd
):
    """The default path: augmentation on, no feature cache, every step decodes and crops its
    images. A worker killed in the middle of the second epoch; the run resumes inside a chunk
    of every partition and ends with the uninterrupted run's weights, having trained the same
    batches, each sample once an epoch (each crop is seeded by its sample and epoch, never by
    the process or the step a restart began at)."""
    result, _, ref_log = augmented_reference_run
    ref_history = trained_history(str(ref_log))
    cfg = config(shards, tmp_path, "images", **AUGMENTED_RUN)
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(out=run_training(cfg)))
    run.start()
    stride = BATCH * WORKERS
    log = Path(cfg.run.sample_log) / "rank-0.tsv"
    # After step 17 of 28 in the second epoch, 5 steps after its checkpoint at step 12.
    wait_for(log, 0, (1, 16 * stride), time.monotonic() + 600, run.is_alive)
    pids = worker_pids()
    killed = run.is_alive() and bool(pids)
    if killed:
        os.kill(pids[0], signal.SIGKILL)
    run.join()
    assert killed, "the run finished before the kill"
    out = capfd.readouterr()
    resumed = re.findall(
        r"resuming images at epoch (\d+), sample (\d+) \(step \d+\)", out.out + out.err
    )
    assert len(resumed) == 1, resumed
    epoch, consumed = int(resumed[0][0]) - 1, int(resumed[0][1])
    assert epoch == 1 and consumed > 0, resumed  # in the middle of the second epoch
    total = read_manifest(shards).num_samples("train")
    images = json.loads(Path(outcome["out"].result_file).read_text())
    assert inside_chunks(images["config"], total, epoch, consumed), resumed
    assert images["feature_cache"] is False and result["feature_cache"] is False
    assert images["fingerprint"] == result["fingerprint"]
    assert images["test_accuracy"] == result["test_accuracy"]
    assert_exactly_once(trained_history(cfg.run.sample_log), ref_history)
