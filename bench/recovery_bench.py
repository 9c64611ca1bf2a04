"""Recovery after a fault: time from the fault to the next training step, and steps redone.

    .venv/bin/python bench/recovery_bench.py [--kills 3] [--checkpoint-every-steps 4]

Writes and shards the sample digits, then trains 2 CPU workers (batch 16 each) twice:
- **worker kill**: on a local one-node Ray cluster, SIGKILL one training worker at a few
  random steps;
- **node loss**: on a cluster of a CPU-less head and three one-CPU worker nodes on this
  machine (`tests/ray_nodes.py`, Ray's default health checks), SIGKILL a whole node hosting a
  worker (its `ray start` and every process below it) at a few random steps, restarting it
  after each recovery so there is always a spare node;
- **elastic shrink**: the same with two worker nodes and `--workers 1-2 --global-batch 32`:
  a lost node leaves room for one worker, so the run goes on with one; the node restarted,
  it grows back to two at the next `--resize-check`.
Prints one row per fault and the mean of each kind, then each run's fingerprint beside an
uninterrupted run's (all train global batches of 32: they must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ray_nodes import LiveRun, RayNodes  # noqa: E402

from data_prep.prep import prep  # noqa: E402
from data_prep.sample_data import write_digits_imagefolder  # noqa: E402

BATCH, WORKERS = 16, 2
STRIDE = BATCH * WORKERS


def steps(log: Path) -> list[str]:
    """Rank 0's sample-log lines of trained steps (not its resume marks)."""
    lines = log.read_text().splitlines() if log.exists() else []
    return [line for line in lines if not line.startswith("resume")]


def position(line: str) -> tuple[int, int]:
    epoch, consumed = line.split("\t")[:2]
    return int(epoch), int(consumed)


def train_argv(root: Path, name: str, args, address: str, elastic: bool = False) -> list[str]:
    shape = (
        ["--workers", f"1-{WORKERS}", "--global-batch", str(STRIDE), "--resize-check", "5"]
        if elastic
        else ["--workers", str(WORKERS), "--batch-size", str(BATCH)]
    )
    return [
        "train", "--data", str(root / "shards"), "--storage", str(root / "runs"),
        "--name", name, "--weights", "none", "--image-size", "32", *shape,
        "--epochs", str(args.epochs), "--no-augment",
        "--loader-workers", "1", "--max-failures", str(args.kills + 1), "--metrics-port", "0",
        "--checkpoint-every-steps", str(args.checkpoint_every_steps),
        "--sample-log", str(root / "log" / name), "--address", address,
    ]  # fmt: skip


def result(root: Path, name: str) -> dict:
    return json.loads((root / "runs" / name / "result.json").read_text())


def kill_at_random_steps(
    run: LiveRun, log: Path, args, kill: Callable[[], Callable[[], None] | None]
) -> list[tuple]:
    """`kill()` at random steps (it returns what to do once training goes on); per kill: the
    (epoch, sample) it hit, seconds to the next step, and steps redone."""
    steps_per_epoch = 1797 * 8 // 10 // STRIDE  # about: only used to spread the kills
    rng = random.Random(0)
    targets = sorted(rng.sample(range(3, args.epochs * steps_per_epoch - 3), args.kills))
    rows = []
    for target in targets:
        while run.process.poll() is None:
            lines = steps(log)
            if lines:
                epoch, consumed = position(lines[-1])
                if epoch * steps_per_epoch + consumed // STRIDE >= target:
                    break
            time.sleep(0.02)
        if run.process.poll() is not None:
            break
        killed_at = position(steps(log)[-1])
        starts = log.read_text().count("resume\t")
        after = kill()
        t0 = time.perf_counter()
        # The next step is the first one rank 0 logs after the restarted group's resume mark
        # (a step the old group had under way when the fault hit does not count).
        while run.process.poll() is None:
            lines = log.read_text().splitlines()
            marks = [i for i, line in enumerate(lines) if line.startswith("resume\t")]
            if len(marks) > starts and len(lines) > marks[-1] + 1:
                break
            time.sleep(0.02)
        else:
            break
        resumed = time.perf_counter() - t0
        first_new = position(lines[marks[-1] + 1])
        redone = (
            (killed_at[0] - first_new[0]) * steps_per_epoch
            + (killed_at[1] - first_new[1]) // STRIDE
            + 1
        )
        rows.append((killed_at, resumed, redone))
        if after:
            after()
    assert run.finish() == 0, run.output[-3000:]
    return rows


def worker_kills(root: Path, args) -> list[tuple]:
    """On this process's one-node cluster."""
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address

    def kill() -> None:
        filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
        os.kill(list_actors(address=address, filters=filters)[0].pid, signal.SIGKILL)

    run = LiveRun(train_argv(root, "worker-kill", args, address))
    return kill_at_random_steps(run, root / "log" / "worker-kill" / "rank-0.tsv", args, kill)


def node_kills(root: Path, args, elastic: bool = False) -> list[tuple]:
    """Fixed size: three worker nodes (one spare); elastic: two (a loss leaves room for one)."""
    workers = 2 if elastic else 3
    name = "elastic-shrink" if elastic else "node-loss"
    nodes = RayNodes(Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp")), fast_health_checks=False)
    try:
        for _ in range(workers):
            nodes.add(cpus=1)
        nodes.wait_alive(workers + 1)

        def kill() -> Callable[[], None]:
            hosts = {a.node_id for a in nodes.actors("RayTrainWorker")}
            victim = next(n for n in nodes.nodes[1:] if nodes.node_id(n) in hosts)
            nodes.kill(victim)
            return lambda: (nodes.restart(victim), nodes.wait_alive(workers + 1))

        run = LiveRun(train_argv(root, name, args, nodes.address, elastic))
        return kill_at_random_steps(run, root / "log" / name / "rank-0.tsv", args, kill)
    finally:
        nodes.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--checkpoint-every-steps", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="recovery-bench-"))
    write_digits_imagefolder(root / "images", size=32)
    ray.init(num_cpus=4, logging_level="WARNING", _node_ip_address="127.0.0.1")
    prep(str(root / "images"), str(root / "shards"), num_shards=4)
    address = ray.get_runtime_context().gcs_address
    done = LiveRun(train_argv(root, "uninterrupted", args, address))
    assert done.finish() == 0, done.output[-3000:]
    table = {"worker kill": worker_kills(root, args)}
    ray.shutdown()  # one cluster at a time on this machine
    table["node loss"] = node_kills(root, args)
    table["elastic shrink"] = node_kills(root, args, elastic=True)
    print(f"{'fault':<15} {'at (epoch, sample)':<20} {'fault → next step s':>20} {'redone':>7}")
    for fault, rows in table.items():
        for at, seconds, redone in rows:
            print(f"{fault:<15} {str(at):<20} {seconds:>20.1f} {redone:>7}")
        if rows:
            mean = sum(r[1] for r in rows) / len(rows), sum(r[2] for r in rows) / len(rows)
            print(f"{fault:<15} {'mean':<20} {mean[0]:>20.1f} {mean[1]:>7.1f}")
    print(
        f"(2 workers or 1-2 elastic, a global batch of {STRIDE}, checkpoint every "
        f"{args.checkpoint_every_steps} steps; node loss with Ray's default health checks: a "
        "silent node is declared dead after 5 × 3 s)"
    )
    print()
    reference = result(root, "uninterrupted")["fingerprint"]
    print(f"{'run':<15} {'fingerprint':<18} same as uninterrupted")
    for name in ("uninterrupted", "worker-kill", "node-loss", "elastic-shrink"):
        mine = result(root, name)["fingerprint"]
        print(f"{name:<15} {mine[:16]:<18} {'yes' if mine == reference else 'NO'}")
    spans = ", ".join(
        f"steps {s['first_step']}–{s['last_step']} on {s['workers']}"
        for s in result(root, "elastic-shrink")["segments"]
    )
    print(f"elastic-shrink segments: {spans}")


if __name__ == "__main__":
    main()
