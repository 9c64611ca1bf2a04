"""`metatrainer prep --pushgateway`: the run's metrics, pushed to a real Prometheus Pushgateway
(the `prometheus-pushgateway` binary, started on 127.0.0.1 by the test)."""

from __future__ import annotations

import io
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from free_ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from tool_support import missing_tool

from data_prep.contract import read_manifest
from data_prep.progress import Progress
from data_prep.report import MetricsPusher, skip_reason_kind
from training.cli.main import main

BINARY_NAMES = ("prometheus-pushgateway", "pushgateway")


@pytest.fixture(scope="module")
def pushgateway(tmp_path_factory):
    binary = next((b for b in map(shutil.which, BINARY_NAMES) if b), None)
    if binary is None:
        missing_tool("no Pushgateway binary: apt-get install prometheus-pushgateway")
    port = free_port()
    data = tmp_path_factory.mktemp("pushgateway") / "metrics.data"
    process = subprocess.Popen(
        [binary, f"--web.listen-address=127.0.0.1:{port}", f"--persistence.file={data}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"{binary} exited with status {process.returncode}"
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=1).read()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{binary} did not start on port {port}"
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def pushed(gateway: str, dataset: str) -> dict[tuple[str, tuple], float]:
    """The samples the gateway holds for prep's group `dataset`: (name, labels) → value."""
    text = urllib.request.urlopen(f"{gateway}/metrics", timeout=5).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            labels.pop("instance", None)  # the gateway adds an empty one
            if labels.pop("job", None) == "metatrainer_prep" and labels.pop("dataset") == dataset:
                samples[s.name, tuple(sorted(labels.items()))] = s.value
    return samples


def test_prep_pushes_its_counts_then_its_failure(
    ray_cluster, corpus, pushgateway, tmp_path: Path, capsys
) -> None:
    dst = str(tmp_path / "out")
    started = time.time()
    assert main(["prep", str(corpus.root), dst, "--pushgateway", pushgateway]) == 0
    assert "warning: could not push" not in capsys.readouterr().err
    manifest = read_manifest(dst)

    metrics = pushed(pushgateway, dst)
    expected = {("metatrainer_prep_success", ()): 1.0}
    for split, shards in manifest.splits.items():
        label = (("split", split),)
        expected["metatrainer_prep_images_total", label] = manifest.num_samples(split)
        expected["metatrainer_prep_bytes_total", label] = sum(s.bytes for s in shards)
        expected["metatrainer_prep_shards_total", label] = len(shards)
    skipped = Counter(skip_reason_kind(s.reason) for s in manifest.skipped)
    assert len(skipped) >= 5  # the corpus has every kind of bad file
    for reason, n in skipped.items():
        expected["metatrainer_prep_skipped_total", (("reason", reason),)] = n
    assert {k: metrics[k] for k in expected if k in metrics} == expected
    duration = metrics["metatrainer_prep_duration_seconds", ()]
    finished = metrics["metatrainer_prep_last_success_timestamp_seconds", ()]
    assert 0 < duration < time.time() - started + 1
    assert started <= finished <= time.time()
    ours = {name for name, _ in metrics if name.startswith("metatrainer_prep_")}
    assert ours == {name for name, _ in expected} | {
        "metatrainer_prep_duration_seconds",
        "metatrainer_prep_last_success_timestamp_seconds",
    }

    # A failed run into the same DST: success drops to 0; the counts still describe the
    # dataset the last successful run wrote.
    (tmp_path / "bad/cat").mkdir(parents=True)
    (tmp_path / "bad/cat/a.jpg").write_text("not a jpeg")
    assert main(["prep", str(tmp_path / "bad"), dst, "--pushgateway", pushgateway]) == 2
    after = pushed(pushgateway, dst)
    assert after["metatrainer_prep_success", ()] == 0.0
    assert after["metatrainer_prep_last_success_timestamp_seconds", ()] == finished
    assert {k: after[k] for k in expected if k != ("metatrainer_prep_success", ())} == {
        k: v for k, v in expected.items() if k != ("metatrainer_prep_success", ())
    }
    err = capsys.readouterr().err
    assert err.rstrip("\n").split("\n")[-1].startswith("metatrainer prep: error: ")


def test_a_failed_push_is_one_warning_without_the_password() -> None:
    stream = io.StringIO()
    url = f"http://prep:hunter2@127.0.0.1:{free_port()}"
    MetricsPusher(url, "/data/out", Progress(stream=stream)).push_failure(1.0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: could not push metrics")
    assert "hunter2" not in lines[0] and "//***@127.0.0.1" in lines[0]
