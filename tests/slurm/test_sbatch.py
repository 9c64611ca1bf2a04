"""deploy/slurm/metatrainer.sbatch on a real one-node SLURM (`slurm_support.SlurmCluster`):
prep and train jobs that complete; a training cancelled after its first checkpoint, then
stopped at a checkpoint by a SIGUSR1 (what `--signal B:USR1@SECONDS` sends before the time
limit) that came while its Ray was starting, then resubmitted, ends with the uninterrupted
run's weights; a job whose command fails is FAILED with metatrainer's one line. No job leaves
a process behind."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from free_ports import free_port
from slurm_support import NODE, SlurmCluster

from training.run.resume import SNAPSHOT_FILE

TRAIN = [
    "--weights", "none", "--image-size", "32", "--no-augment", "--workers", "2",
    "--loader-workers", "0", "--epochs", "4", "--checkpoint-every-steps", "2",
    "--log-every", "2", "--feature-cache", "off", "--metrics-port", "0", "--max-failures", "0",
]  # fmt: skip
"""Small, and slow enough per step (the image path) to cancel a job between checkpoints."""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def job_env():
    """What a user exports before sbatch: the ports of the job's Ray (its own block), the head's
    address (this machine's loopback), a node-local temp dir (short: Ray's socket paths)."""
    tmp = tempfile.mkdtemp(prefix="mt-", dir="/tmp")
    yield {
        "METATRAINER_PORT_BASE": str(free_port(1000)),
        "METATRAINER_HEAD_IP": "127.0.0.1",
        "TMPDIR": tmp,
    }
    shutil.rmtree(tmp, ignore_errors=True)


def assert_ended(slurm: SlurmCluster, job: str, state: str, exit_code: str | None) -> dict:
    fields = slurm.wait(job)
    assert fields["JobState"] == state, slurm.output(job)
    assert exit_code is None or fields["ExitCode"] == exit_code, slurm.output(job)
    assert slurm.job_processes(job) == [], "processes left behind by the job"
    return fields


def checkpoints(run: Path) -> list[str]:
    """The checkpoints Ray Train registered for the run (what a resume starts from); a
    directory it had not registered yet when the job was cancelled does not count."""
    try:
        snapshot = json.loads((run / SNAPSHOT_FILE).read_text())
        return sorted(r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # none yet, or being written
        return []


def wait_for_checkpoint(slurm: SlurmCluster, job: str, run: Path, after: list[str]) -> str:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        new = [c for c in checkpoints(run) if c not in after]
        if new:
            return new[0]
        if slurm.job(job)["JobState"] not in ("PENDING", "RUNNING", "CONFIGURING"):
            break
        time.sleep(0.5)
    raise AssertionError(f"no new checkpoint in {run}: {slurm.output(job)[-3000:]}")


def wait_for_output(slurm: SlurmCluster, job: str, text: str) -> None:
    deadline = time.monotonic() + 120
    while text not in slurm.output(job):
        assert time.monotonic() < deadline, f"{text!r} not in the job's output"
        time.sleep(0.2)


def test_prep_train_cancel_stop_and_resume(slurm, job_env, digits_dir, tmp_path):
    shards, runs = tmp_path / "shards", tmp_path / "runs"
    prep = slurm.sbatch(["prep", str(digits_dir), str(shards), "--num-shards", "4"], job_env)
    assert_ended(slurm, prep, "COMPLETED", "0:0")
    assert (shards / "manifest.json").exists()
    log = slurm.output(prep)
    assert "1 Ray node(s) up" in log and "metatrainer prep exited with status 0" in log

    train = ["train", "--data", str(shards), "--storage", str(runs), *TRAIN]
    reference = slurm.sbatch([*train, "--name", "whole"], job_env)
    assert_ended(slurm, reference, "COMPLETED", "0:0")
    whole = json.loads((runs / "whole" / "result.json").read_text())
    # The token never reaches the job's output; each node's Ray output has a file of its own.
    logs = list((slurm.root / "metatrainer-logs" / reference).glob("ray-*.out"))
    assert [p.name for p in logs] == [f"ray-{NODE}.out"]
    assert "RAY_AUTH_TOKEN" not in slurm.output(reference)

    # Cancelled (scancel) after its first checkpoint: CANCELLED, Ray torn down.
    cut = [*train, "--name", "cut"]
    first = slurm.sbatch(cut, job_env)
    wait_for_checkpoint(slurm, first, runs / "cut", [])
    slurm.cancel(first)
    assert_ended(slurm, first, "CANCELLED", None)
    assert not (runs / "cut" / "result.json").exists()

    # Resubmitted: SIGUSR1 to the batch shell (what --signal B:USR1@SECONDS sends before the
    # time limit) while its Ray is still starting, i.e. before the training could take it: it
    # resumes, checkpoints at its first chance and stops, exit status 75.
    before = checkpoints(runs / "cut")
    second = slurm.sbatch(cut, job_env)
    wait_for_output(slurm, second, ": Ray head on ")
    slurm.cancel(second, "--batch", "--signal=USR1")
    assert_ended(slurm, second, "FAILED", "75:0")
    out = slurm.output(second)
    assert out.index("got SIGUSR1") < out.index("running: metatrainer train"), out
    assert re.search(r"resuming cut at epoch \d+, sample \d+ \(step [1-9]\d*\)", out), out
    stopped = re.search(r"metatrainer train: stopped at step (\d+) .* checkpoint (\S+);", out)
    assert stopped, out
    assert Path(stopped.group(2)).name in set(checkpoints(runs / "cut")) - set(before)

    # Resubmitted again: it resumes at the stop and ends with the uninterrupted run's weights.
    third = slurm.sbatch(cut, job_env)
    assert_ended(slurm, third, "COMPLETED", "0:0")
    out = slurm.output(third)
    assert f"(step {stopped.group(1)})" in out, out
    resumed = json.loads((runs / "cut" / "result.json").read_text())
    assert resumed["fingerprint"] == whole["fingerprint"]
    assert resumed["test_accuracy"] == whole["test_accuracy"]


def test_a_failing_command_fails_the_job_with_its_line(slurm, job_env, tmp_path):
    job = slurm.sbatch(
        ["train", "--data", str(tmp_path / "missing"), "--storage", str(tmp_path / "runs"),
         "--name", "bad", *TRAIN],
        job_env,
    )  # fmt: skip
    assert_ended(slurm, job, "FAILED", "2:0")
    errors = [line for line in slurm.output(job).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("metatrainer train: error: "), errors
    assert "Traceback" not in slurm.output(job)


def test_a_command_is_required(slurm, job_env):
    job = slurm.sbatch([], job_env)
    assert_ended(slurm, job, "FAILED", "2:0")
    assert "metatrainer.sbatch: error: give the command" in slurm.output(job)
