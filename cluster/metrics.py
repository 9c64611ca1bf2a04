"""Prometheus metrics of one training worker, served on /metrics.

Each worker serves on `base_port + local_rank`, so every node exposes the same port range and
one PodMonitor (deploy/monitoring/podmonitor.yaml) covers them all. With the port set to 0 the
worker gets `NullMetrics`, a no-op with the same methods, so the training loop never checks a
flag. `StepClock` splits a rank's time between waiting for data, stepping and checkpointing, so
each lands in its own histogram. The alerts and the Grafana dashboard built on these series are
in deploy/monitoring/.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cluster.errors import UserError

TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# A checkpoint is a file write (seconds) or an upload to S3 (up to minutes) plus the barrier.
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class TrainMetrics:
    """One worker's series, in a registry of their own; `serve` puts them on /metrics."""

    url: str | None = None

    def __init__(self, run: str, rank: int) -> None:
        self._server = None
        self.registry = CollectorRegistry()
        labels = ["run", "rank"]
        r = self.registry
        # Throughput is rate() of this counter: an instantaneous samples/s gauge would show
        # whichever step a scrape happened to land on, and could not be averaged over time.
        self._samples = Counter(
            "metatrainer_samples_trained",
            "Training samples processed.",
            [*labels, "dataset"],
            registry=r,
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
            "Time a step waited for its batch (checkpoints not included).",
            labels,
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self._checkpoint = Histogram(
            "metatrainer_checkpoint_seconds",
            "Time a rank spent in a checkpoint that completed: rank 0 saving and attaching it, "
            "every rank waiting in the ray.train.report barrier.",
            labels,
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self._started = Gauge(
            "metatrainer_worker_start_time_seconds",
            "Unix time this worker process started training; a restarted worker sets a new "
            "value, so changes() counts restarts.",
            labels,
            registry=r,
        )
        self._epoch = Gauge("metatrainer_epoch", "Current epoch (0-based).", labels, registry=r)
        self._val = Gauge(
            "metatrainer_val_accuracy_ratio",
            "Validation accuracy after the latest epoch.",
            [*labels, "dataset"],
            registry=r,
        )
        self._evaluating = Gauge(
            "metatrainer_evaluating",
            "1 while this rank scores a split (validation after each epoch, the test split "
            "after the last), else 0.",
            labels,
            registry=r,
        )
        self._labels = {"run": run, "rank": str(rank)}
        self._started.labels(**self._labels).set(time.time())
        self._evaluating.labels(**self._labels).set(0)
        # Served from the start with a count of 0, so "no checkpoint for an hour" is a series
        # that stays flat, not one that does not exist yet.
        self._checkpoint.labels(**self._labels)

    def serve(self, port: int) -> None:
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

    def checkpoint(self, seconds: float) -> None:
        self._checkpoint.labels(**self._labels).observe(seconds)

    def losses(self, loss: float, cross_entropy: float, penalty: float) -> None:
        self._loss.labels(**self._labels).set(loss)
        self._ce.labels(**self._labels).set(cross_entropy)
        self._penalty.labels(**self._labels).set(penalty)

    def epoch(self, epoch: int) -> None:
        self._epoch.labels(**self._labels).set(epoch)

    def val_accuracy(self, dataset: str, accuracy: float) -> None:
        self._val.labels(**self._labels, dataset=dataset).set(accuracy)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """`metatrainer_evaluating` is 1 inside: the stalled-training alert does not page
        while a rank scores a split (deploy/monitoring/prometheusrule.yaml)."""
        gauge = self._evaluating.labels(**self._labels)
        gauge.set(1)
        try:
            yield
        finally:
            gauge.set(0)

    def close(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()


class NullMetrics:
    url: str | None = None

    def step(self, samples: dict[str, int], step_seconds: float, wait_seconds: float) -> None:
        pass

    def checkpoint(self, seconds: float) -> None:
        pass

    def losses(self, loss: float, cross_entropy: float, penalty: float) -> None:
        pass

    def epoch(self, epoch: int) -> None:
        pass

    def val_accuracy(self, dataset: str, accuracy: float) -> None:
        pass

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        pass


def serve_metrics(port: int, run: str, rank: int) -> TrainMetrics | NullMetrics:
    if not port:
        return NullMetrics()
    metrics = TrainMetrics(run, rank)
    metrics.serve(port)
    return metrics


class StepClock:
    """Which histogram a rank's time goes to: a step's wait for its batch runs from the end
    of whatever came before (the previous step, a checkpoint, the epoch's start) to the batch
    being ready, so a checkpoint's save and barrier never count as waiting for data.

        clock.restart()                  # an epoch's loaders are built: waiting starts
        batch = next(loader); clock.batch_ready()
        ...train_step...; clock.step_done({"digits": 32})
        with clock.checkpoint(): save_and_report()
    """

    def __init__(self, metrics: TrainMetrics | NullMetrics) -> None:
        self._metrics = metrics
        self._tick = self._ready = time.perf_counter()
        self.waited = 0.0
        """Seconds the steps since the last `restart` waited for their batches."""

    def restart(self) -> None:
        self._tick = time.perf_counter()
        self.waited = 0.0

    def batch_ready(self) -> None:
        self._ready = time.perf_counter()

    def step_done(self, samples: dict[str, int]) -> None:
        done = time.perf_counter()
        self._metrics.step(samples, done - self._ready, self._ready - self._tick)
        self.waited += self._ready - self._tick
        self._tick = done

    @contextmanager
    def checkpoint(self) -> Iterator[None]:
        """Times a checkpoint; only one that completes is observed (a failed one ends the
        worker, and the restart shows in metatrainer_worker_start_time_seconds)."""
        started = time.perf_counter()
        yield
        self._tick = time.perf_counter()
        self._metrics.checkpoint(self._tick - started)


def _node_address() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - only cosmetic: fall back to the host name
        pass
    return socket.gethostname()
