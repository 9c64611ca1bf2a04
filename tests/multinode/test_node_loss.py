"""Whole nodes die mid-run (their `ray start` process and every process below it), and the
driver too: a fixed-size run goes on elsewhere from the last checkpoint and ends with an
uninterrupted run's weights; an elastic one with --global-batch goes on with fewer workers,
grows back, and ends with them too. Every sample of every epoch is trained once in the
history the final weights descend from."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from ray_nodes import LiveRun, metatrainer
from sample_log import (
    assert_exactly_once,
    epochs_trained_once,
    steps_trained,
    trained_history,
    wait_for,
)

from training.model.checkpoint import load_state
from training.run.resume import SNAPSHOT_FILE

EPOCHS, BATCH = 2, 4
GLOBAL_BATCH = 2 * BATCH  # the reference's: 2 workers × BATCH
# Ray's AutoscalingCoordinator (a detached actor) reserves the cluster's resources for each
# run that asks, until the run cancels or 3 minutes after it last asked: a killed driver's
# run never cancels. An elastic run sizes itself from what is left, so one started within
# 3 minutes of a killed driver would start smaller. Ray has no public call that lists or
# drops another run's requests: this driver does it through the actor's __ray_call__ (its
# developer API for tests), then recomputes the reservations on the cluster as it is now.
DROP_RESERVATIONS = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
try:
    coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
except ValueError:
    sys.exit(0)  # no run has asked this cluster for resources yet
def drop_all(self):
    dropped = list(self._ongoing_reqs)
    for requester in dropped:
        self.cancel_request(requester)
    self.get_reserved_resources(None, recompute=True)
    return dropped
print("dropped", ray.get(coordinator.__ray_call__.remote(drop_all), timeout=60))
"""


def train_argv(
    nodes, shards: str, root: Path, name: str, *extra: str, batch=("--batch-size", str(BATCH))
) -> list[str]:
    return [
        "train", "--data", shards, "--storage", str(root / "runs"), "--name", name,
        "--weights", "none", "--image-size", "32", *batch,
        "--epochs", str(EPOCHS), "--no-augment", "--loader-workers", "1",
        "--max-failures", "4", "--metrics-port", "0", "--checkpoint-every-steps", "4",
        "--shuffle-block", "128", "--sample-log", str(root / "log" / name),
        "--start-timeout", "30", "--address", nodes.address, *extra,
    ]  # fmt: skip


def result(root: Path, name: str) -> dict:
    return json.loads((root / "runs" / name / "result.json").read_text())


def newest_segments(root: Path, name: str) -> list[dict] | None:
    """The segments of the checkpoint Ray Train would resume the run from: the latest one its
    controller registered (`checkpoint_manager_snapshot.json`), not the newest directory, which
    a group lost right after writing it never registered (None: none yet, or unreadable)."""
    run_dir = root / "runs" / name
    try:
        snapshot = json.loads((run_dir / SNAPSHOT_FILE).read_text())
        latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        return load_state(run_dir / latest).position.segments
    except Exception:  # none yet, or being written
        return None


def steps_on_two_workers(root: Path, name: str, after: int) -> int:
    """Steps the newest checkpoint's weights trained on two workers in a segment that began
    after step `after` (0: its last segment is on one worker or older, or it cannot be read
    yet). A group that grows and is lost before its first checkpoint leaves nothing here."""
    segments = newest_segments(root, name)
    last = segments[-1] if segments else None
    if last is None or last["workers"] != 2 or last["first_step"] <= after:
        return 0
    return last["last_step"] - last["first_step"] + 1


def wait_until(condition: Callable[[], object], what: str, timeout: float) -> None:
    """Until `condition()` is true; AssertionError saying `what` did not happen in time."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.5)


def started(pid: int) -> float:
    """When process `pid` started, as time.time() (to a clock tick), from /proc."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    since_boot = ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + since_boot


def all_up(nodes) -> bool:
    """Every node alive in the GCS as the `ray start` running now (a node killed and restarted
    moments ago is still listed alive as its old self until its health checks fail)."""
    from ray.util.state import list_nodes

    alive = list_nodes(
        address=nodes.address,
        filters=[("state", "=", "ALIVE")],
        detail=True,
        raise_on_missing_output=False,
    )
    current = [
        any(node.name in n.resources_total and (n.start_time_ms or 0) / 1000 > since for n in alive)
        for node, since in ((node, started(node.process.pid)) for node in nodes.nodes)
    ]
    return all(current) and len(alive) == len(nodes.nodes)


@pytest.fixture(scope="module")
def reference(nodes, shards, tmp_path_factory) -> tuple[dict, dict]:
    """The uninterrupted run every run here must end as: 2 workers × BATCH (a global batch
    of GLOBAL_BATCH). Its result.json and its trained history."""
    root = tmp_path_factory.mktemp("reference")
    done = metatrainer(*train_argv(nodes, shards, root, "reference", "--workers", "2"))
    assert done.returncode == 0, done.stderr[-3000:]
    return result(root, "reference"), trained_history(str(root / "log" / "reference"))


@pytest.fixture
def cluster(nodes):
    """`nodes` as each test here starts, whatever ran before: every node up (restarted if a
    test left it down) and no training workers left from another run."""
    for node in nodes.nodes:
        if node.process.poll() is not None:
            nodes.restart(node)
    nodes.wait_alive(len(nodes.nodes))
    wait_until(lambda: all_up(nodes), "every node alive as the process running now", 120)
    no_workers = lambda: not nodes.actors("RayTrainWorker")  # noqa: E731
    wait_until(no_workers, "another run's training workers gone", 120)
    return nodes


def drop_reservations(nodes) -> None:
    """Drop every run's resource reservation (see DROP_RESERVATIONS): no run may be going."""
    done = subprocess.run(
        [sys.executable, "-c", DROP_RESERVATIONS, nodes.address],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def after_first_checkpoint(run: LiveRun, log: Path) -> None:
    """Until rank 0 trained a random step after the first checkpoint (every 4 steps)."""
    step = random.Random(0).randrange(6, 20)
    alive = lambda: run.process.poll() is None  # noqa: E731
    wait_for(log, 0, (0, step * GLOBAL_BATCH), time.monotonic() + 300, alive)
    assert alive(), "the run ended before a node could be killed:\n" + run.output[-3000:]


def worker_nodes(nodes) -> tuple[list, list]:
    """(worker nodes hosting a training worker, the others)."""
    hosts = {a.node_id for a in nodes.actors("RayTrainWorker")}
    workers = [n for n in nodes.nodes if n.name != "head"]
    busy = [n for n in workers if nodes.node_id(n) in hosts]
    return busy, [n for n in workers if n not in busy]


def test_elastic_shrinks_grows_back_and_ends_with_the_fixed_runs_weights(
    reference, cluster, shards, tmp_path
):
    """--workers 1-2 --global-batch: two nodes lost (room for one worker): it goes on with
    one; the nodes back: it grows back to two; two nodes lost again, for good: it finishes on
    one worker, with the uninterrupted 2-worker run's weights bit for bit (that run from
    cached features, this one from images), having trained the same samples every step;
    result.json says how many workers trained which steps.

    It starts from the whole cluster with nothing reserved: a driver killed earlier (the test
    below) leaves its run's reservation behind for 3 minutes, which would start it smaller."""
    nodes = cluster
    drop_reservations(nodes)
    argv = train_argv(nodes, shards, tmp_path, "elastic", "--workers", "1-2", "--resize-check",
                      "3", batch=("--global-batch", str(GLOBAL_BATCH)))  # fmt: skip
    # The image path (the reference trains from cached features: the same weights), whose
    # slower steps leave the nodes time to come back while it trains on one worker.
    run = LiveRun([*argv, "--loader-workers", "0", "--feature-cache", "off"])  # the last wins
    try:
        after_first_checkpoint(run, tmp_path / "log" / "elastic" / "rank-0.tsv")

        def lose_all_but_one_worker_node() -> list:
            # Ray Train may start it smaller and grow it as nodes report in.
            two = lambda: len(worker_nodes(nodes)[0]) >= 2  # noqa: E731
            wait_until(two, "training workers on two nodes", 120)
            busy, spare = worker_nodes(nodes)
            lost = [busy[1], *spare]  # one worker's node and the spare: room for one worker
            for node in lost:
                nodes.kill(node)
            return lost

        lost = lose_all_but_one_worker_node()
        try:
            shrunk = run.wait_for_line("on 1 workers")
            # Where the group on one worker started: the newest checkpoint's last step.
            segments = lambda: newest_segments(tmp_path, "elastic")  # noqa: E731
            wait_until(segments, "a readable checkpoint", 60)
            shrunk_at = segments()[-1]["last_step"]
        finally:
            for node in lost:
                nodes.restart(node)
        run.wait_for_line("on 2 workers", after=shrunk)
        # Two checkpoints on two workers after the growth, so the weights descend from steps
        # trained on two since. Read from the checkpoint itself: a grown group can be lost again
        # before its first checkpoint (the restarted nodes still settling), and the group on
        # one worker that follows writes checkpoints too; the steps on two workers before the
        # shrink do not count.
        two_checkpoints = lambda: steps_on_two_workers(tmp_path, "elastic", shrunk_at) >= 8  # noqa: E731
        wait_until(two_checkpoints, "two checkpoints after growing to two workers", 300)
        grown = max(i for i, line in enumerate(run.lines) if "on 2 workers" in line)
        lost = lose_all_but_one_worker_node()
        try:
            run.wait_for_line("on 1 workers", after=grown)
            assert run.finish() == 0, run.output[-3000:]
        finally:
            for node in lost:
                nodes.restart(node)
    finally:
        if run.process.poll() is None:
            run.kill()  # a failed test leaves no run going
    assert "on 2 workers" not in "\n".join(run.lines[grown + 1 :])  # it finished on one
    assert f"--global-batch {GLOBAL_BATCH} on 1 to 2 workers" in run.output

    done, (fixed, fixed_history) = result(tmp_path, "elastic"), reference
    assert done["fingerprint"] == fixed["fingerprint"]
    assert done["test_accuracy"] == fixed["test_accuracy"]
    history = trained_history(str(tmp_path / "log" / "elastic"))
    assert steps_trained(history) == steps_trained(fixed_history)
    epochs_trained_once(history, EPOCHS)
    # Every step once, in segments of 1 and 2 workers, the last on 1.
    print(f"fingerprints: elastic {done['fingerprint'][:16]}, fixed {fixed['fingerprint'][:16]}; "
          f"segments {done['segments']}")  # fmt: skip
    segments = done["segments"]
    assert [s["first_step"] for s in segments] == [1] + [s["last_step"] + 1 for s in segments[:-1]]
    assert segments[-1]["last_step"] == done["step"] == fixed["step"]
    assert [s["workers"] for s in segments][-3:] == [1, 2, 1], segments  # shrunk, grown, shrunk
    assert fixed["segments"] == [{"workers": 2, "first_step": 1, "last_step": fixed["step"]}]
    nodes.wait_alive(len(nodes.nodes))


def test_a_lost_node_and_a_lost_driver_change_nothing(reference, cluster, shards, tmp_path):
    nodes = cluster
    argv = train_argv(nodes, shards, tmp_path, "chaos", "--workers", "2")
    run = LiveRun(argv)
    try:
        after_first_checkpoint(run, tmp_path / "log" / "chaos" / "rank-0.tsv")
        busy, _ = worker_nodes(nodes)
        nodes.kill(busy[0])
        try:
            # Two workers again, on the node that was spare: then the driver dies too.
            run.wait_for_line("on 2 workers")
            run.kill()
        finally:
            nodes.restart(busy[0])
    finally:
        if run.process.poll() is None:
            run.kill()
    # Ray ends a dead driver's job: its workers go away before the rerun starts new ones.
    no_workers = lambda: not nodes.actors("RayTrainWorker")  # noqa: E731
    wait_until(no_workers, "the killed driver's training workers gone", 60)
    rerun = metatrainer(*argv)  # the same command continues the run
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming chaos at epoch" in rerun.stdout + rerun.stderr

    (fixed, fixed_history), chaos = reference, result(tmp_path, "chaos")
    assert chaos["fingerprint"] == fixed["fingerprint"]
    assert chaos["test_accuracy"] == fixed["test_accuracy"]
    assert_exactly_once(trained_history(str(tmp_path / "log" / "chaos")), fixed_history, EPOCHS)
    nodes.wait_alive(len(nodes.nodes))


def test_an_elastic_run_that_never_resizes_is_its_fixed_twin(cluster, shards, tmp_path):
    """--workers 1-3 on three one-CPU worker nodes, nothing lost: three workers throughout
    (which the default order's 4 partitions, 2 + 1 + 1, no longer refuse), and the weights of
    the same command with --workers 3, bit for bit."""
    nodes = cluster
    drop_reservations(nodes)
    one_epoch = ("--epochs", "1")
    elastic = metatrainer(*train_argv(nodes, shards, tmp_path, "elastic", *one_epoch,
                                      "--workers", "1-3"))  # fmt: skip
    assert elastic.returncode == 0, elastic.stderr[-3000:]
    assert "resuming" not in elastic.stdout + elastic.stderr  # the shape never changed
    fixed = metatrainer(*train_argv(nodes, shards, tmp_path, "fixed", *one_epoch,
                                    "--workers", "3"))  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    a, b = result(tmp_path, "elastic"), result(tmp_path, "fixed")
    assert a["config"]["data"]["partitions"] == 4 and a["config"]["cluster"]["workers"] == 3
    assert a["fingerprint"] == b["fingerprint"]
    assert_exactly_once(
        trained_history(str(tmp_path / "log" / "elastic")),
        trained_history(str(tmp_path / "log" / "fixed")),
        1,
    )
