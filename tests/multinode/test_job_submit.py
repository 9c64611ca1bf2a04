"""`ray job submit` against the session's cluster (`nodes`: a CPU-less head, three one-CPU
worker nodes), as a user submits from the repository root: `metatrainer prep`, then
`metatrainer train` on what it wrote (copied to a bucket), each a job that must succeed; a
job given a bad argument fails with metatrainer's one line. A real Prometheus server scrapes
the submitted training while it runs, and a PromQL query over what it scraped answers how
many samples the run trained."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from free_ports import free_port
from prometheus_support import MISSING, PrometheusServer, prometheus_binary
from ray_nodes import RAY
from s3_fault_proxy import FaultProxy
from sample_log import trained_history
from tool_support import missing_tool

from data_prep.contract import read_manifest

REPO = Path(__file__).resolve().parents[2]
PER_CLASS = 40  # 400 digits, split so that about 120 train, 20 validate, 260 test
# A big test split: the accuracy checked below is measured on about 260 images.
SPLITS = "train=0.3,val=0.05,test=0.65"
BATCH = 8
# Ray's upload of the working directory leaves out what .gitignore names, but not Git's own
# files, nor what only .git/info/exclude names (bench/'s wheels): as a user would, exclude them.
RUNTIME_ENV = json.dumps({"excludes": [".git", ".whl"]})
COUNTER = 'metatrainer_samples_trained_total{run="submitted"}'


def ray_job(nodes, command: str, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`ray job COMMAND ...` against the cluster's dashboard, with this process's token auth
    (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token: see ray_nodes.use_token_auth)."""
    return subprocess.run(
        [RAY, "job", command, "--address", nodes.dashboard, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit_argv(job: str, argv: tuple[str, ...]) -> list[str]:
    return [
        "--submission-id", job, "--working-dir", str(REPO), "--runtime-env-json", RUNTIME_ENV,
        "--", "metatrainer", *argv,
    ]  # fmt: skip


def submit(nodes, name: str, *argv: str) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit --working-dir REPO -- metatrainer ARGV`, waiting for the job's end."""
    job = f"{name}-{uuid.uuid4().hex[:8]}"
    return job, ray_job(nodes, "submit", *submit_argv(job, argv))


def start_submit(nodes, name: str, *argv: str) -> tuple[str, subprocess.Popen]:
    """`submit`, in the background: `communicate()` waits for the job's end."""
    job = f"{name}-{uuid.uuid4().hex[:8]}"
    command = [RAY, "job", "submit", "--address", nodes.dashboard, *submit_argv(job, argv)]
    return job, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class HeldReads(FaultProxy):
    """The S3 proxy, holding every GET of a key containing `key` from `hold()` to `release()`;
    `arrived` is the time.time() the first of them came, None before."""

    def __init__(self, upstream: str, key: str) -> None:
        self.key = key
        self.arrived: float | None = None
        self._released = threading.Event()
        self._released.set()
        super().__init__(upstream)

    def hold(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    def _draw(self, method: str, path: str):
        if method == "GET" and self.key in path and not self._released.is_set():
            self.arrived = self.arrived or time.time()
            self._released.wait(timeout=300)
        return super()._draw(method, path)


def wait_scraped_final_count(
    prometheus: PrometheusServer, proxy: HeldReads, job: subprocess.Popen
) -> None:
    """Until Prometheus scraped the worker after its last step: the worker is held reading its
    test split (the proxy saw its first GET), and the counter has a sample scraped since."""
    deadline = time.monotonic() + 300
    while proxy.arrived is None:
        assert job.poll() is None, "the training job ended before reading its test split"
        assert time.monotonic() < deadline, "the training read no test split within 300 s"
        time.sleep(0.1)
    deadline = time.monotonic() + 60
    while not any(t > proxy.arrived for _, t in prometheus.query(f"timestamp({COUNTER})")):
        assert time.monotonic() < deadline, (
            f"Prometheus scraped no {COUNTER} within 60 s of the worker's last step: "
            f"{[(t['scrapeUrl'], t['health'], t['lastError']) for t in prometheus.targets()]}"
        )
        time.sleep(0.2)


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
def submitted(nodes, tiny_digits, s3_server, tmp_path_factory):
    """prep, then a one-worker train, each submitted as a job; a Prometheus server (where
    installed) scraping the training worker's metrics port all along.

    The training reads a copy of the prepared digits from a bucket, through a proxy that holds
    its reads of the test split, which come after its last step, until Prometheus has scraped
    the worker since: the final count is in Prometheus however short the run."""
    root = tmp_path_factory.mktemp("submitted")
    port = free_port()
    prometheus = None
    if prometheus_binary():
        # Started first: Prometheus hands its targets to the scrapers ~5 s after it starts.
        prometheus = PrometheusServer(root / "prometheus", [f"127.0.0.1:{port}"])
    proxy = HeldReads(s3_server.endpoint, key="/digits/test-")
    try:
        data = str(root / "shards" / "digits")
        # The head has no CPU: the shard tasks run on the worker nodes, into a DST every node
        # sees at the same path (all on this machine).
        prep, done = submit(
            nodes, "prep", "prep", str(tiny_digits), data, "--splits", SPLITS,
            "--num-shards", "1", "--shared-dst",
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        bucket = s3_server.make_bucket()
        for file in Path(data).iterdir():
            s3_server.client.put_object(
                Bucket=bucket.removeprefix("s3://"),
                Key=f"digits/{file.name}",
                Body=file.read_bytes(),
            )
        if prometheus:
            prometheus.wait_scraping()  # scraping (nothing yet) before the training starts
            proxy.hold()
        # One worker: a worker serves on --metrics-port + its local rank, and on one-CPU
        # nodes every worker is local rank 0, so two would want one port on this machine.
        train, job = start_submit(
            nodes, "train", "train", "--data", f"{bucket}/digits", "--s3-endpoint", proxy.endpoint,
            "--storage", str(root / "runs"), "--name", "submitted", "--weights", "none",
            "--image-size", "32", "--batch-size", str(BATCH), "--epochs", "1", "--no-augment",
            "--workers", "1", "--loader-workers", "0", "--metrics-port", str(port),
            "--sample-log", str(root / "samples"),
        )  # fmt: skip
        try:
            if prometheus:
                wait_scraped_final_count(prometheus, proxy, job)
        finally:
            proxy.release()
            out, err = job.communicate(timeout=300)
        assert job.returncode == 0, out[-3000:] + err[-3000:]
        yield SubmittedRun(
            prep, train, data, root / "runs" / "submitted", root / "samples", prometheus
        )
    finally:
        proxy.stop()
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
    # It learned: with 10 classes a guess scores 0.1 (this one epoch on 120 images: 0.19 of
    # 279 test images, the same every run), and the job printed the result's accuracy.
    assert result["test_accuracy"] > 0.15 and len(result["fingerprint"]) == 64
    assert f"test accuracy   {result['test_accuracy']:.4f}" in logs, logs[-20:]
    [checkpoint] = [line.split()[-1] for line in logs if line.startswith("checkpoint ")]
    assert (Path(checkpoint) / "state.pt").is_file(), checkpoint


def test_prometheus_scraped_the_samples_the_submitted_run_trained(submitted):
    if submitted.prometheus is None:
        missing_tool(MISSING)
    result = json.loads((submitted.run_dir / "result.json").read_text())
    trained = sum(len(keys) for keys in trained_history(str(submitted.sample_log)).values())
    # What the run says it trained: its global steps × the one worker's batch, the train
    # split less a remainder that does not fill a batch.
    assert trained == result["step"] * BATCH * result["config"]["cluster"]["workers"]
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
