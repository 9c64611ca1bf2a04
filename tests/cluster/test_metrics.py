"""The metrics endpoint serves Prometheus text with the documented names and labels."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.errors import UserError
from cluster.metrics import NullMetrics, serve_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.labels.get("run") == "r1"
    }


def test_metrics_are_served_and_grow():
    port = free_port()
    metrics = serve_metrics(port, run="r1", rank=3)
    try:
        metrics.step({"digits": 32}, 0.5, 0.1)
        metrics.losses(2.0, 1.9, 0.04)
        first = scrape(port)
        metrics.step({"digits": 32}, 0.5, 0.1)
        metrics.losses(1.5, 1.4, 0.03)
        metrics.epoch(1)
        metrics.val_accuracy("digits", 0.75)
        second = scrape(port)
    finally:
        metrics.close()
    assert first["metatrainer_samples_trained_total"] == 32
    assert second["metatrainer_samples_trained_total"] == 64
    assert second["metatrainer_step_seconds_count"] == 2
    assert second["metatrainer_data_wait_seconds_count"] == 2
    assert second["metatrainer_loss"] == 1.5
    assert second["metatrainer_meta_penalty"] == 0.03
    assert second["metatrainer_epoch"] == 1
    assert second["metatrainer_val_accuracy_ratio"] == 0.75
    assert second["metatrainer_samples_per_second"] == pytest.approx(32 / 0.6)


def test_port_zero_disables_metrics():
    assert isinstance(serve_metrics(0, "r", 0), NullMetrics)


def test_busy_port_is_a_user_error():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        with pytest.raises(UserError, match="--metrics-port"):
            serve_metrics(s.getsockname()[1], "r", 0)
