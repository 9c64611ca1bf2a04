"""Whole nodes die mid-run (their `ray start` process and every process below it), and the
driver too: a fixed-size run goes on elsewhere from the last checkpoint and ends with an
uninterrupted run's weights; an elastic one goes on with fewer workers and grows back. Every
sample of every epoch is trained once in the history the final weights descend from."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from ray_nodes import LiveRun, metatrainer
from sample_log import assert_exactly_once, epochs_trained_once, trained_history, wait_for

from data_prep.contract import read_manifest

EPOCHS, BATCH = 2, 8


def train_argv(nodes, shards: str, root: Path, name: str, *extra: str) -> list[str]:
    return [
        "train", "--data", shards, "--storage", str(root / "runs"), "--name", name,
        "--weights", "none", "--image-size", "32", "--batch-size", str(BATCH),
        "--epochs", str(EPOCHS), "--no-augment", "--loader-workers", "1",
        "--max-failures", "4", "--metrics-port", "0", "--checkpoint-every-steps", "4",
        "--shuffle-block", "128", "--sample-log", str(root / "log" / name),
        "--start-timeout", "30", "--address", nodes.address, *extra,
    ]  # fmt: skip


def result(root: Path, name: str) -> dict:
    return json.loads((root / "runs" / name / "result.json").read_text())


def after_first_checkpoint(run: LiveRun, log: Path, workers: int) -> None:
    """Until rank 0 trained a random step after the first checkpoint (every 4 steps)."""
    step = random.Random(0).randrange(6, 20)
    alive = lambda: run.process.poll() is None  # noqa: E731
    wait_for(log, 0, (0, step * BATCH * workers), time.monotonic() + 300, alive)
    assert alive(), "the run ended before a node could be killed:\n" + run.output[-3000:]


def worker_nodes(nodes) -> tuple[list, list]:
    """(worker nodes hosting a training worker, the others)."""
    hosts = {a.node_id for a in nodes.actors("RayTrainWorker")}
    workers = [n for n in nodes.nodes if n.name != "head"]
    busy = [n for n in workers if nodes.node_id(n) in hosts]
    return busy, [n for n in workers if n not in busy]


def test_elastic_shrinks_grows_back_and_finishes_on_fewer_workers(nodes, shards, tmp_path):
    """2 workers; two nodes lost (room for one worker): it goes on with one; the nodes back:
    it grows back to two; two nodes lost again, for good: it finishes on one worker.

    First in this file: a driver killed mid-run leaves Ray's reservation of its resources
    for an elastic run in place for 3 minutes (AutoscalingCoordinator), which would start
    this run smaller."""
    argv = train_argv(nodes, shards, tmp_path, "elastic", "--workers", "1-2", "--resize-check", "3")
    run = LiveRun([*argv, "--loader-workers", "0"])  # the last --loader-workers wins
    after_first_checkpoint(run, tmp_path / "log" / "elastic" / "rank-0.tsv", 1)

    def lose_all_but_one_worker_node() -> list:
        deadline = time.monotonic() + 120
        while len(worker_nodes(nodes)[0]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)  # Ray Train may start it smaller and grow it as nodes report in
        busy, spare = worker_nodes(nodes)
        lost = [busy[1], *spare]  # one worker's node and the spare: room for one worker
        for node in lost:
            nodes.kill(node)
        return lost

    lost = lose_all_but_one_worker_node()
    try:
        shrunk = run.wait_for_line("on 1 workers")
    finally:
        for node in lost:
            nodes.restart(node)
    grown = run.wait_for_line("on 2 workers", after=shrunk)
    lost = lose_all_but_one_worker_node()
    try:
        run.wait_for_line("on 1 workers", after=grown)
        assert run.finish() == 0, run.output[-3000:]
    finally:
        for node in lost:
            nodes.restart(node)
    assert "on 2 workers" not in "\n".join(run.lines[grown + 1 :])  # it finished on one

    history = trained_history(str(tmp_path / "log" / "elastic"))
    train = read_manifest(shards).num_samples("train")
    for epoch in epochs_trained_once(history, EPOCHS):
        # The remainder an epoch drops is less than one global batch (of up to 2 workers).
        assert train - 2 * BATCH < len(epoch) <= train
    nodes.wait_alive(len(nodes.nodes))


def test_a_lost_node_and_a_lost_driver_change_nothing(nodes, shards, tmp_path):
    done = metatrainer(*train_argv(nodes, shards, tmp_path, "reference", "--workers", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    argv = train_argv(nodes, shards, tmp_path, "chaos", "--workers", "2")
    run = LiveRun(argv)
    after_first_checkpoint(run, tmp_path / "log" / "chaos" / "rank-0.tsv", 2)
    busy, _ = worker_nodes(nodes)
    nodes.kill(busy[0])
    try:
        # Two workers again, on the node that was spare: then the driver dies too.
        run.wait_for_line("on 2 workers")
        run.kill()
    finally:
        nodes.restart(busy[0])
    # Ray ends a dead driver's job: its workers go away before the rerun starts new ones.
    deadline = time.monotonic() + 60
    while nodes.actors("RayTrainWorker") and time.monotonic() < deadline:
        time.sleep(0.5)
    rerun = metatrainer(*argv)  # the same command continues the run
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming chaos at epoch" in rerun.stdout + rerun.stderr

    reference, chaos = result(tmp_path, "reference"), result(tmp_path, "chaos")
    assert chaos["fingerprint"] == reference["fingerprint"]
    assert chaos["test_accuracy"] == reference["test_accuracy"]
    assert_exactly_once(
        trained_history(str(tmp_path / "log" / "chaos")),
        trained_history(str(tmp_path / "log" / "reference")),
        EPOCHS,
    )
    nodes.wait_alive(len(nodes.nodes))
