"""The metrics endpoint serves Prometheus text with the documented names and labels, and the
step clock puts a rank's time in the right histogram (a checkpoint is never data wait)."""

from __future__ import annotations

import inspect
import socket
import time
import types
import urllib.request

import pytest
from free_ports import free_port
from prometheus_client.parser import text_string_to_metric_families

from cluster import metrics as metrics_module
from cluster.errors import UserError
from cluster.metrics import NullMetrics, StepClock, TrainMetrics, serve_metrics


def scrape(port: int) -> dict[str, float]:
    """Sample name (with le="..." for histogram buckets) -> value, for run r1."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.labels.get("run") == "r1":
                le = sample.labels.get("le")
                out[sample.name if le is None else f"{sample.name}{{le={le}}}"] = sample.value
    return out


@pytest.fixture
def served():
    port = free_port()
    metrics = serve_metrics(port, run="r1", rank=3)
    yield metrics, port
    metrics.close()


def test_metrics_are_served_and_grow(served):
    metrics, port = served
    metrics.step({"digits": 32}, 0.5, 0.1)
    metrics.losses(2.0, 1.9, 0.04)
    first = scrape(port)
    metrics.step({"digits": 32}, 0.5, 0.1)
    metrics.losses(1.5, 1.4, 0.03)
    metrics.epoch(1)
    metrics.val_accuracy("digits", 0.75)
    second = scrape(port)
    assert first["metatrainer_samples_trained_total"] == 32
    assert second["metatrainer_samples_trained_total"] == 64
    assert second["metatrainer_step_seconds_count"] == 2
    assert second["metatrainer_data_wait_seconds_count"] == 2
    assert second["metatrainer_loss"] == 1.5
    assert second["metatrainer_meta_penalty"] == 0.03
    assert second["metatrainer_epoch"] == 1
    assert second["metatrainer_val_accuracy_ratio"] == 0.75


def test_worker_start_and_an_empty_checkpoint_histogram_are_served_from_the_start():
    port = free_port()
    before = time.time()
    metrics = serve_metrics(port, run="r1", rank=0)
    try:
        served = scrape(port)
    finally:
        metrics.close()
    # A restarted worker serves a new start time: the restart alert counts changes().
    assert before <= served["metatrainer_worker_start_time_seconds"] <= time.time()
    # "No checkpoint for an hour" needs a series that stays at 0, not one that is missing.
    assert served["metatrainer_checkpoint_seconds_count"] == 0
    assert served["metatrainer_evaluating"] == 0


def test_evaluating_is_1_while_a_split_is_scored_even_when_scoring_fails(served):
    """The stalled alert stays quiet while a rank scores a split, and not after."""
    metrics, port = served
    with metrics.evaluating():
        assert scrape(port)["metatrainer_evaluating"] == 1
    assert scrape(port)["metatrainer_evaluating"] == 0
    with pytest.raises(OSError), metrics.evaluating():
        raise OSError("a shard could not be read")
    assert scrape(port)["metatrainer_evaluating"] == 0
    with NullMetrics().evaluating():  # --metrics-port 0: the same calls, nothing served
        pass


class Clock:
    """`time.perf_counter` for `cluster.metrics` that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    fake_time = types.SimpleNamespace(perf_counter=clock.perf_counter, time=time.time)
    monkeypatch.setattr(metrics_module, "time", fake_time)
    return clock


def test_a_checkpoint_is_timed_and_never_counted_as_data_wait(served, clock):
    metrics, port = served
    step_clock = StepClock(metrics)
    step_clock.restart()
    for _ in range(2):
        clock.wait(0.02)  # waiting for the batch
        step_clock.batch_ready()
        clock.wait(0.01)  # the step
        step_clock.step_done({"digits": 8})
        with step_clock.checkpoint():
            clock.wait(0.3)  # a slow save and report barrier
    got = scrape(port)
    assert got["metatrainer_checkpoint_seconds_count"] == 2
    assert got["metatrainer_checkpoint_seconds_sum"] == pytest.approx(0.6)
    assert got["metatrainer_checkpoint_seconds_bucket{le=0.25}"] == 0
    assert got["metatrainer_step_seconds_sum"] == pytest.approx(0.02)
    # Each wait was its own 0.02 s: the second step's wait started when the checkpoint ended.
    assert got["metatrainer_data_wait_seconds_count"] == 2
    assert got["metatrainer_data_wait_seconds_sum"] == pytest.approx(0.04)
    assert got["metatrainer_data_wait_seconds_bucket{le=0.025}"] == 2
    assert got["metatrainer_samples_trained_total"] == 16


def test_a_failed_checkpoint_is_not_observed():
    metrics = TrainMetrics("r1", 0)  # not served: read from its registry
    with pytest.raises(OSError), StepClock(metrics).checkpoint():
        raise OSError("bucket gone")
    count = metrics.registry.get_sample_value(
        "metatrainer_checkpoint_seconds_count", {"run": "r1", "rank": "0"}
    )
    assert count == 0


def test_null_metrics_has_every_method_of_train_metrics():
    public = {n for n, f in vars(TrainMetrics).items() if callable(f) and not n.startswith("_")}
    for name in public - {"serve"}:  # serve_metrics serves; NullMetrics has nothing to serve
        real, null = getattr(TrainMetrics, name), getattr(NullMetrics, name)
        assert inspect.signature(real) == inspect.signature(null), name
    StepClock(NullMetrics()).step_done({"digits": 1})  # the clock works without metrics


def test_port_zero_disables_metrics():
    assert isinstance(serve_metrics(0, "r", 0), NullMetrics)


def test_busy_port_is_a_user_error():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        with pytest.raises(UserError, match="--metrics-port"):
            serve_metrics(s.getsockname()[1], "r", 0)
