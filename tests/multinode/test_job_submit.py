"""`ray job submit` against the session's cluster (`nodes`: a CPU-less head, three one-CPU
worker nodes), as a user submits from the repository root: `metatrainer prep`, then
`metatrainer train` on what it wrote, each a job that must succeed; a job given a bad
argument fails with metatrainer's one line. A real Prometheus server scrapes the submitted
training while it runs, and a PromQL query over what it scraped answers how many samples the
run trained."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_support import MISSING, PrometheusServer, prometheus_binary
from ray_nodes import RAY
from s3_support import free_port
from sample_log import trained_history

from data_prep.contract import read_manifest

REPO = Path(__file__).resolve().parents[2]
PER_CLASS = 40  # 400 digits, split so that about 120 train, 20 validate, 260 test
# The big test split keeps the worker serving its final count for a while: the test features
# are computed after the last step, before the worker ends (0.9 s here, 0.3 s with 12 images).
SPLITS = "train=0.3,val=0.05,test=0.65"
BATCH = 8
# Ray's upload of the working directory leaves out what .gitignore names, but not Git's own
# files, nor what only .git/info/exclude names (bench/'s wheels): as a user would, exclude them.
RUNTIME_ENV = json.dumps({"excludes": [".git", ".whl"]})


def ray_job(nodes, command: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job COMMAND ...` against the cluster's dashboard, with this process's token auth
    (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token: see ray_nodes.use_token_auth)."""
    return subprocess.run(
        [RAY, "job", command, "--address", nodes.dashboard, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(nodes, name: str, *argv: str) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit --working-dir REPO -- metatrainer ARGV`, waiting for the job's end."""
    job = f"{name}-{uuid.uuid4().hex[:8]}"
    done = ray_job(
        nodes, "submit", "--submission-id", job, "--working-dir", str(REPO),
        "--runtime-env-json", RUNTIME_ENV, "--", "metatrainer", *argv,
    )  # fmt: skip
    return job, done


def job_status(nodes, job: str) -> str:
    done = ray_job(nodes, "status", job, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def job_logs(nodes, job: str) -> list[str]:
    done = ray_job(nodes, "logs", job, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if line.strip()]


@dataclass
class SubmittedRun:
    prep_job: str
    train_job: str
    data: str
    run_dir: Path
    sample_log: Path
    prometheus: PrometheusServer | None


@pytest.fixture(scope="module")
def tiny_digits(digits_dir, tmp_path_factory) -> Path:
    """PER_CLASS digits of each class: an ImageFolder small enough for a job in seconds."""
    root = tmp_path_factory.mktemp("tiny-digits") / "images"
    for cls in sorted(p for p in digits_dir.iterdir() if p.is_dir()):
        (root / cls.name).mkdir(parents=True)
        for image in sorted(cls.iterdir())[:PER_CLASS]:
            shutil.copy(image, root / cls.name / image.name)
    return root


@pytest.fixture(scope="module")
def submitted(nodes, tiny_digits, tmp_path_factory):
    """prep, then a one-worker train, each submitted as a job; a Prometheus server (where
    installed) scraping the training worker's metrics port all along."""
    root = tmp_path_factory.mktemp("submitted")
    port = free_port()
    prometheus = None
    if prometheus_binary():
        # Started first: Prometheus hands its targets to the scrapers ~5 s after it starts.
        # Every 100 ms: this run's worker serves for about 1.5 s, its final count for the
        # second or less between the last step and the end (SPLITS); scraped every 1 s,
        # the final count was mostly missed.
        target = f"127.0.0.1:{port}"
        prometheus = PrometheusServer(root / "prometheus", [target], interval="100ms")
    try:
        data = str(root / "shards" / "digits")
        # The head has no CPU: the shard tasks run on the worker nodes, into a DST every node
        # sees at the same path (all on this machine).
        prep, done = submit(
            nodes, "prep", "prep", str(tiny_digits), data, "--splits", SPLITS,
            "--num-shards", "1", "--shared-dst",
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if prometheus:
            prometheus.wait_scraping()  # scraping (nothing yet) before the training starts
        # One worker: a worker serves on --metrics-port + its local rank, and on one-CPU
        # nodes every worker is local rank 0, so two would want one port on this machine.
        train, done = submit(
            nodes, "train", "train", "--data", data, "--storage", str(root / "runs"),
            "--name", "submitted", "--weights", "none", "--image-size", "32",
            "--batch-size", str(BATCH), "--epochs", "1", "--no-augment", "--workers", "1",
            "--loader-workers", "0", "--metrics-port", str(port),
            "--sample-log", str(root / "samples"),
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield SubmittedRun(
            prep, train, data, root / "runs" / "submitted", root / "samples", prometheus
        )
    finally:
        if prometheus:
            prometheus.stop()


def test_submitted_prep_and_train_succeed_with_a_result(nodes, submitted, tiny_digits):
    for job in (submitted.prep_job, submitted.train_job):
        assert "succeeded" in job_status(nodes, job), job
    manifest = read_manifest(submitted.data)
    images = sum(1 for _ in tiny_digits.rglob("*.jpg"))
    assert sum(manifest.num_samples(s) for s in ("train", "val", "test")) == images
    assert manifest.num_samples("test") > 0

    # What the user reads at the end of the job's log, and the files it names.
    logs = job_logs(nodes, submitted.train_job)
    assert any("epoch 1/1  loss" in line for line in logs), logs[-20:]  # a worker's line
    result_file = submitted.run_dir / "result.json"
    assert f"result          {result_file}" in logs, logs[-20:]
    result = json.loads(result_file.read_text())
    assert result["epoch"] == 1 and len(result["history"]) == 1
    assert 0 <= result["test_accuracy"] <= 1 and len(result["fingerprint"]) == 64
    assert f"test accuracy   {result['test_accuracy']:.4f}" in logs, logs[-20:]
    [checkpoint] = [line.split()[-1] for line in logs if line.startswith("checkpoint ")]
    assert (Path(checkpoint) / "state.pt").is_file(), checkpoint


def test_prometheus_scraped_the_samples_the_submitted_run_trained(submitted):
    if submitted.prometheus is None:
        pytest.skip(MISSING)
    result = json.loads((submitted.run_dir / "result.json").read_text())
    trained = sum(len(keys) for keys in trained_history(str(submitted.sample_log)).values())
    # What the run says it trained: its global steps × the one worker's batch, the train
    # split less a remainder that does not fill a batch.
    assert trained == result["step"] * BATCH * result["config"]["workers"]
    train = read_manifest(submitted.data).num_samples("train")
    assert train - BATCH < trained <= train

    # The worker is gone and its series stale (an instant query finds nothing), but a range
    # function still sees every sample scraped while it ran.
    prometheus = submitted.prometheus
    counter = 'metatrainer_samples_trained_total{run="submitted"}'
    prometheus.wait_scraping(health="down")
    assert prometheus.query(counter) == []
    series = prometheus.query(f"max_over_time({counter}[10m])")
    scraped = prometheus.api("/api/v1/query", query=f"{counter}[10m]")["result"]
    assert len(series) == 1, scraped
    labels, value = series[0]
    assert labels["rank"] == "0" and labels["dataset"] == "digits", labels
    assert value == trained, scraped


def test_a_job_given_a_bad_argument_fails_with_one_line(nodes, tmp_path):
    missing = tmp_path / "no-such-folder"
    job, done = submit(nodes, "bad", "prep", str(missing), str(tmp_path / "shards"), "--shared-dst")
    assert done.returncode != 0, done.stdout[-3000:]
    assert "failed" in job_status(nodes, job)
    logs = job_logs(nodes, job)
    assert "Traceback" not in "\n".join(logs), logs
    assert logs[-1].startswith("metatrainer prep: error: "), logs[-5:]
    assert f"{missing} does not exist" in logs[-1], logs[-1]
