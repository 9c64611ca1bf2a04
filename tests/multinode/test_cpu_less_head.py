"""prep and train when the driver's node (the head) has no CPUs, as in our RayJob."""

from __future__ import annotations

from ray_nodes import metatrainer, one_line_error

from data_prep.contract import read_manifest


def test_prep_runs_its_tasks_on_worker_nodes(nodes, shards, digits_dir, tmp_path):
    # `shards` was written with --shared-dst by tasks on the worker nodes (the head has no CPU).
    assert read_manifest(shards).num_samples("train") > 0
    # Without --shared-dst, a local DST would be written on the head only: refused, one line.
    refused = metatrainer("prep", str(digits_dir), str(tmp_path / "d"), "--address", nodes.address)
    last = one_line_error(refused, "prep")
    assert "--shared-dst" in last and "s3://" in last, last


def test_a_run_that_cannot_get_its_workers_ends_in_one_line(nodes, shards, tmp_path):
    """4 one-CPU workers on 3 one-CPU nodes: 3 bounded attempts, then one line and exit 2."""
    failed = metatrainer(
        "train", "--data", shards, "--storage", str(tmp_path), "--name", "too-big",
        "--weights", "none", "--image-size", "32", "--workers", "4", "--loader-workers", "0",
        "--metrics-port", "0", "--start-timeout", "2", "--address", nodes.address,
    )  # fmt: skip
    last = one_line_error(failed, "train")
    assert "could not start 4 training workers (1 CPU each)" in last, last
    assert "3 of 3 CPU" in last, last
    # Before it, one line per attempt from Ray Train's controller, not a traceback each.
    assert failed.stderr.count("were not placed within --start-timeout") == 3, failed.stderr
