"""Prometheus metrics of one training worker, served on /metrics.

Each worker serves on `base_port + local_rank`, so every node exposes the same port range and
one PodMonitor (deploy/podmonitor.yaml) covers them all. With the port set to 0 the worker gets
`NullMetrics`, a no-op with the same methods, so the training loop never checks a flag.
"""

from __future__ import annotations

import socket

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cluster.errors import UserError

TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class TrainMetrics:
    def __init__(self, port: int, run: str, rank: int) -> None:
        self.registry = CollectorRegistry()
        labels = ["run", "rank"]
        r = self.registry
        self._samples = Counter(
            "metatrainer_samples_trained",
            "Training samples processed.",
            [*labels, "dataset"],
            registry=r,
        )
        self._throughput = Gauge(
            "metatrainer_samples_per_second", "Training samples per second.", labels, registry=r
        )
        self._loss = Gauge(
            "metatrainer_loss",
            "Meta-loss, mean of the latest steps (read every --log-every steps).",
            labels,
            registry=r,
        )
        self._ce = Gauge(
            "metatrainer_cross_entropy",
            "Cross-entropy term, mean of the latest steps.",
            labels,
            registry=r,
        )
        self._penalty = Gauge(
            "metatrainer_meta_penalty",
            "Adapter penalty Σ mean(r²), mean of the latest steps (before λ).",
            labels,
            registry=r,
        )
        self._step = Histogram(
            "metatrainer_step_seconds",
            "Time of one training step (forward, backward, optimizer).",
            labels,
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self._wait = Histogram(
            "metatrainer_data_wait_seconds",
            "Time a step waited for its batch.",
            labels,
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self._epoch = Gauge("metatrainer_epoch", "Current epoch (0-based).", labels, registry=r)
        self._val = Gauge(
            "metatrainer_val_accuracy_ratio",
            "Validation accuracy after the latest epoch.",
            [*labels, "dataset"],
            registry=r,
        )
        self._labels = {"run": run, "rank": str(rank)}
        try:
            self._server, _ = start_http_server(port, registry=self.registry)
        except OSError as e:
            raise UserError(
                f"cannot serve metrics on port {port} ({e.strerror}); pick a free range with "
                "--metrics-port or disable metrics with --metrics-port 0"
            ) from None
        self.url = f"http://{_node_address()}:{port}/metrics"

    def step(self, samples: dict[str, int], step_seconds: float, wait_seconds: float) -> None:
        for dataset, n in samples.items():
            self._samples.labels(**self._labels, dataset=dataset).inc(n)
        self._step.labels(**self._labels).observe(step_seconds)
        self._wait.labels(**self._labels).observe(wait_seconds)
        total = sum(samples.values())
        self._throughput.labels(**self._labels).set(total / max(step_seconds + wait_seconds, 1e-9))

    def losses(self, loss: float, cross_entropy: float, penalty: float) -> None:
        self._loss.labels(**self._labels).set(loss)
        self._ce.labels(**self._labels).set(cross_entropy)
        self._penalty.labels(**self._labels).set(penalty)

    def epoch(self, epoch: int) -> None:
        self._epoch.labels(**self._labels).set(epoch)

    def val_accuracy(self, dataset: str, accuracy: float) -> None:
        self._val.labels(**self._labels, dataset=dataset).set(accuracy)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class NullMetrics:
    url: str | None = None

    def step(self, *args, **kwargs) -> None:
        pass

    def losses(self, *args, **kwargs) -> None:
        pass

    def epoch(self, epoch: int) -> None:
        pass

    def val_accuracy(self, dataset: str, accuracy: float) -> None:
        pass

    def close(self) -> None:
        pass


def serve_metrics(port: int, run: str, rank: int) -> TrainMetrics | NullMetrics:
    return TrainMetrics(port, run, rank) if port else NullMetrics()


def _node_address() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only cosmetic: fall back to the host name
        pass
    return socket.gethostname()
