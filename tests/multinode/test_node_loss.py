"""A whole worker node dies mid-run (its `ray start` process and every process below it):
the run goes on elsewhere from the last checkpoint and ends with an uninterrupted run's
weights, every sample of every epoch trained once in the history they descend from."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

from ray_nodes import METATRAINER
from sample_log import assert_exactly_once, progress, trained_history, wait_for

EPOCHS, BATCH, WORKERS = 2, 8, 2


def train_command(nodes, shards: str, root: Path, name: str, *extra: str) -> list[str]:
    return [
        METATRAINER, "train", "--data", shards, "--storage", str(root / "runs"), "--name", name,
        "--weights", "none", "--image-size", "32", "--batch-size", str(BATCH),
        "--epochs", str(EPOCHS), "--no-augment", "--workers", str(WORKERS),
        "--loader-workers", "1", "--max-failures", "3", "--metrics-port", "0",
        "--checkpoint-every-steps", "4", "--shuffle-block", "128",
        "--sample-log", str(root / "log" / name), "--address", nodes.address, *extra,
    ]  # fmt: skip


def result(root: Path, name: str) -> dict:
    return json.loads((root / "runs" / name / "result.json").read_text())


def test_losing_a_node_changes_nothing(nodes, shards, tmp_path):
    done = subprocess.run(train_command(nodes, shards, tmp_path, "reference"), capture_output=True)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = result(tmp_path, "reference")

    run = subprocess.Popen(
        train_command(nodes, shards, tmp_path, "chaos"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # A random step after the first checkpoint (every 4 steps of 2 × 8 samples).
    step = random.Random(0).randrange(6, 24)
    log = tmp_path / "log" / "chaos" / "rank-0.tsv"
    wait_for(
        log, 0, (0, step * BATCH * WORKERS), time.monotonic() + 300, lambda: run.poll() is None
    )
    assert run.poll() is None, "the run ended before the node could be killed"
    hosts = {a.node_id for a in nodes.actors("RayTrainWorker")}
    victim = next(n for n in nodes.nodes if n.name != "head" and nodes.node_id(n) in hosts)
    nodes.kill(victim)
    try:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
    finally:
        nodes.restart(victim)  # the next tests get the whole cluster back
    chaos = result(tmp_path, "chaos")
    assert chaos["fingerprint"] == reference["fingerprint"]
    assert chaos["test_accuracy"] == reference["test_accuracy"]
    assert progress(log) == progress(tmp_path / "log" / "reference" / "rank-0.tsv")
    assert_exactly_once(
        trained_history(str(tmp_path / "log" / "chaos")),
        trained_history(str(tmp_path / "log" / "reference")),
        EPOCHS,
    )
    nodes.wait_alive(len(nodes.nodes))
