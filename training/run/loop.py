"""The per-worker training loop that Ray Train runs on every rank.

Reads top to bottom (`_train`): build the model, restore the newest readable checkpoint if
the run is being resumed (mid-epoch included; a new run with --init-from takes that run's
adapters, `training.run.rank_state`), build the loaders and fill the feature cache where it
applies (`training.data.features`), then per epoch the steps (`RankTrainer.train_epoch`):
each dataset's share of the global batch as `--mix` splits it (images, or their cached
features), `training.model.step.train_step`, and every --checkpoint-every-steps steps a
checkpoint (a typed `TrainState`); after the steps validation, after the last epoch the test
split, and the epoch's checkpoint. Every rank calls `ray.train.report` (it is a barrier);
rank 0 attaches the checkpoint files, and with --mlflow logs the losses and each epoch's
results to the run's MLflow run (`training.run.tracking`).
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cluster import s3, storage
from cluster.environ import CACHE_DIR_VAR
from cluster.metrics import NullMetrics, StepClock, TrainMetrics, serve_metrics
from cluster.tracking import NullTracker, Tracker
from cluster.world import World
from data_prep.contract import read_manifest
from training.config import TrainConfig
from training.data.decode import to_input
from training.model.checkpoint import Position, TrainState, save_state
from training.model.loss import MetaLoss
from training.model.network import MetaModel, state_fingerprint
from training.model.step import LossSums, heads_step, prepare_compute, train_step
from training.run import progress, scoring, stop, tracking
from training.run.evaluate import REPORT_DIR, TEST_CONFUSIONS, save_confusions
from training.run.quiet import quiet_worker_logs
from training.run.rank_data import TrainData, build_loaders
from training.run.rank_state import RankState, build_model_and_optim, restore

# DDP all-reduces only parameters that require grad: the heads and adapters. The frozen
# backbone has no BatchNorm statistics to keep in sync, so do not sync buffers every forward.
_DDP_ARGS = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in _DDP_ARGS
    else {"broadcast_buffers": False}
)


def dataset_labels(locations: list[str]) -> list[str]:
    """A short, distinct name per dataset for metrics and results: its folder name, with as
    many parent folders as it takes to tell datasets apart (`a/flowers`, `b/flowers`)."""
    parts = [[p for p in loc.rstrip("/").split("/") if p] or [loc] for loc in locations]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}:{loc}" for i, loc in enumerate(locations)]  # the same location twice


def say(message: str) -> None:
    """One line to the driver's console (Ray's patched `print` would emit it twice)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig.from_dict(config)
    if not cfg.run.debug:
        quiet_worker_logs()
    # This process's environment was fixed when its node started: take the driver's endpoint.
    s3.set_endpoint(cfg.s3.endpoint)
    s3.set_timeout(cfg.s3.timeout)
    # A node may name its own local disk for the shard cache (e.g. in its pod spec).
    cfg.data.cache_dir = cfg.data.cache_dir or os.environ.get(CACHE_DIR_VAR) or None
    world = World.from_ray()
    port = cfg.cluster.metrics_port + world.local_rank if cfg.cluster.metrics_port else 0
    metrics = serve_metrics(port, cfg.run.name, world.rank)
    poster = progress.Poster(
        config.get(progress.CONFIG_KEY) if world.is_main else None, cfg.optim.epochs
    )
    try:
        _train(cfg, world, metrics, poster)
    finally:
        metrics.close()


def _train(
    cfg: TrainConfig, world: World, metrics: TrainMetrics | NullMetrics, poster: progress.Poster
) -> None:
    """Build the model, restore it (or start it from --init-from), build the loaders; then
    each epoch: its steps, validation (after the last epoch the test split too), the report
    with its checkpoint."""
    device = ray.train.torch.get_device()
    state = build_model_and_optim(cfg, [read_manifest(d) for d in cfg.data.datasets])
    torch.manual_seed(cfg.optim.seed + world.rank)
    restore(state, world, say)
    state.pos.start_segment(world.world_size)
    # Rank 0 logs to the run's MLflow run (--mlflow); steps it holds already are not logged.
    tracker = tracking.rank_tracker(cfg, world, state.backbone_sha)
    forward = _prepare_model(state.model, cfg, device)
    urls = _gather(metrics.url, world)
    data = build_loaders(cfg, world, state, device, say)
    trainer = RankTrainer(state, world, forward, data, metrics, poster, device, tracker)
    while state.pos.epoch < cfg.optim.epochs:
        steps, seconds = trainer.train_epoch()
        if trainer.stopped:
            return
        record = trainer.validate(steps, seconds)
        wait_share = trainer.clock.waited / seconds if seconds > 0 else 0.0
        tracker.metrics(tracking.epoch_metrics(record, wait_share), state.pos.step)
        state.pos = state.pos.next_epoch(dict(record))
        if state.pos.epoch == cfg.optim.epochs:
            # The last report carries the final results: Ray keeps a run's metrics with its
            # latest checkpoint, so a resumed-but-finished run still finds them there.
            record |= trainer.final_results(urls)
        if world.is_main:
            say(_epoch_line(record, cfg.optim.epochs))
        trainer.checkpoint(record)


def _prepare_model(model: MetaModel, cfg: TrainConfig, device: torch.device) -> Callable:
    """The model laid out on the device; what a step runs it through.

    Only the heads train: every rank computes the whole step's head update alike from the
    features all ranks gather (`step.heads_step`): no DDP, and weights that do not depend on
    the number of workers. Adapters train: DDP all-reduces their and the heads' gradients."""
    prepare_compute(model, device)
    if model.heads_only():
        return torch.compile(model.features) if cfg.model.compile else model.features
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=NO_BUFFER_SYNC)
    return torch.compile(ddp_model) if cfg.model.compile else ddp_model


class RankTrainer:
    """One rank's epochs: the steps, the checkpoints and what each epoch's report says."""

    def __init__(
        self,
        state: RankState,
        world: World,
        forward: Callable,
        data: TrainData,
        metrics: TrainMetrics | NullMetrics,
        poster: progress.Poster,
        device: torch.device,
        tracker: Tracker | NullTracker,
    ) -> None:
        cfg = state.cfg
        self.cfg, self.state, self.world, self.data, self.device = cfg, state, world, data, device
        self.forward, self.heads_only = forward, state.model.heads_only()
        self.metrics, self.poster, self.tracker = metrics, poster, tracker
        self.loss_fn = MetaLoss(cfg.model.meta_lambda)
        self.names = dataset_labels(cfg.data.datasets)
        self.log = _sample_log(cfg, world, state.pos)
        self.stride = cfg.step_samples(world.world_size)
        self.sums = LossSums(device)
        self.clock = StepClock(metrics)
        self.loss: float | None = None  # the last loss read from the device, for the progress line
        self.stopped = False  # at a checkpoint asked for (`training.run.stop`)

    def train_epoch(self) -> tuple[int, float]:
        """The epoch's steps left from the position, with a checkpoint every
        --checkpoint-every-steps; (steps, seconds)."""
        cfg, pos = self.cfg, self.state.pos
        self.metrics.epoch(pos.epoch)
        self.state.model.train()
        for batches in self.data.sets:
            batches.set_position(pos.epoch, pos.consumed)
        steps = min(len(b) for b in self.data.sets)
        loader = self.data.epoch()
        started = time.perf_counter()
        self.clock.restart()
        for i in range(steps):
            batch = next(loader)
            self.clock.batch_ready()
            targets = self._step(batch)
            self._log_samples(batch)
            pos.advance(self.stride)
            if pos.step % cfg.run.log_every == 0:
                # The host sync waits for the steps queued on the GPU: step time, not data wait.
                self.read_losses()
                if i < steps - 1 and stop.asked(cfg, self.world, self.device):
                    # SIGUSR1 to the driver: every rank checkpoints here, and the run ends.
                    self.checkpoint({"epoch": pos.epoch, "step": pos.step, stop.STOPPED: True})
                    self.stopped = True
                    return i + 1, time.perf_counter() - started
            self.clock.step_done({n: len(y) for n, y in zip(self.names, targets, strict=True)})
            self.poster.step(pos.epoch, i + 1, steps, (i + 1) * self.stride,
                             time.perf_counter() - started, self.loss)  # fmt: skip
            every = cfg.run.checkpoint_every_steps
            if every and pos.step % every == 0 and i < steps - 1:
                self.read_losses()
                self.checkpoint({"epoch": pos.epoch, "step": pos.step})
        del loader
        self.read_losses()
        self.state.scheduler.step()
        return steps, time.perf_counter() - started

    def _step(self, batch: list[tuple]) -> list[torch.Tensor]:
        """One optimizer step on a batch of each dataset, its loss terms added to the sums
        (still on the device); the step's targets."""
        model, optimizer, device = self.state.model, self.state.optimizer, self.device
        # Cached features are already on the device; images are decoded/normalised there.
        inputs = torch.cat([b[0] if self.data.cache else to_input(b[0], device) for b in batch])
        targets = [b[1].to(device, non_blocking=True) for b in batch]
        # Each dataset's mean is over the whole step's samples of it (`training.model.loss`).
        if self.heads_only:
            places = [b[3] for b in batch]
            self.sums.add(heads_step(self.forward, model.heads, inputs, targets, places, optimizer))
        else:
            split = self.data.mix.split(self.state.pos.consumed, self.stride)
            step_loss = self.loss_fn.for_step([n / self.world.world_size for n in split])
            self.sums.add(train_step(self.forward, inputs, targets, optimizer, step_loss))
        return targets

    def _log_samples(self, batch: list[tuple]) -> None:
        if self.log:
            pos = self.state.pos
            for d, x in enumerate(batch):
                keys = " ".join(x[2])
                self.log.write(f"{pos.epoch}\t{pos.consumed}\t{d}\t{keys}\t{time.time():.6f}\n")
            self.log.flush()

    def read_losses(self) -> None:
        """The one host sync of the loss terms: every --log-every steps and before reports."""
        totals, steps = self.sums.take()
        if steps:
            self.state.pos.add_losses(totals)
            self.metrics.losses(*(v / steps for v in totals))
            self.loss = totals[0] / steps
            lr = self.state.optimizer.param_groups[0]["lr"]
            means = tracking.step_metrics([v / steps for v in totals], lr)
            self.tracker.metrics(means, self.state.pos.step)

    def checkpoint(self, record: dict) -> None:
        """Every rank reports (it is a barrier); only rank 0 writes and attaches the files.
        Each rank's time in here is metatrainer_checkpoint_seconds, never data wait."""
        with self.clock.checkpoint():
            if self.world.is_main:
                _report(record, self.state.train_state())
            else:
                ray.train.report(record)

    def validate(self, steps: int, seconds: float) -> dict:
        """The validation split's accuracies after an epoch of `steps` steps in `seconds`;
        the epoch's record, which every later checkpoint keeps in its history."""
        pos, names = self.state.pos, self.names
        with self.metrics.evaluating():
            val = scoring.accuracies(self._confusions("val"))
        for name, acc in zip(names, val, strict=True):
            if acc is not None:
                self.metrics.val_accuracy(name, acc)
        n = max(pos.epoch_steps, 1)
        return {
            "epoch": pos.epoch + 1,
            "loss": pos.totals[0] / n,
            "cross_entropy": pos.totals[1] / n,
            "meta_penalty": pos.totals[2] / n,
            "val_accuracy": scoring.mean(val),
            # Kept in the history (every checkpoint's position): `metatrainer report` plots it.
            "val_accuracy_per_dataset": dict(zip(names, val, strict=True)),
            "samples_per_second": steps * self.stride / seconds,
            "epoch_seconds": seconds,
        }

    def final_results(self, urls: list[str | None]) -> dict:
        """After the last epoch: the test split's accuracies and the run's summary. Confusion
        matrices rather than counts, from the same one pass: the report that the driver writes
        next plots them (rank 0 saves them) instead of scoring the split again."""
        cfg, pos, names = self.cfg, self.state.pos, self.names
        with self.metrics.evaluating():
            confusions = self._confusions("test")
        test = scoring.accuracies(confusions)
        if self.world.is_main:
            save_confusions(
                storage.join(cfg.run.storage, cfg.run.name, REPORT_DIR, TEST_CONFUSIONS),
                names, [m.classes for m in self.state.manifests], confusions,
            )  # fmt: skip
        return {
            "step": pos.step,
            "test_accuracy": scoring.mean(test),
            "test_accuracy_per_dataset": dict(zip(names, test, strict=True)),
            "fingerprint": state_fingerprint(self.state.model.trainable_state_dict()),
            "history": pos.history,
            "segments": pos.segments,
            "metrics_urls": urls,
            "feature_cache": self.data.cache is not None,
        }

    def _confusions(self, split: str) -> list[torch.Tensor]:
        state, cfg = self.state, self.cfg
        return scoring.confusions(
            state.model, cfg, self.world, state.manifests, split, self.device, self.data.cache
        )


def _sample_log(cfg: TrainConfig, world: World, pos: Position) -> TextIO | None:
    """SAMPLE_LOG/rank-R.tsv: a line per trained batch (epoch, position, dataset, keys, time);
    rank 0 also marks where each start of the worker group resumed (resume, epoch, position,
    time): steps logged before it at or past that point were lost."""
    if not cfg.run.sample_log:
        return None
    Path(cfg.run.sample_log).mkdir(parents=True, exist_ok=True)
    log = open(Path(cfg.run.sample_log) / f"rank-{world.rank}.tsv", "a")  # noqa: SIM115
    if world.is_main:
        log.write(f"resume\t{pos.epoch}\t{pos.consumed}\t{time.time():.6f}\n")
        log.flush()
    return log


def _epoch_line(record: dict, epochs: int) -> str:
    return (
        f"epoch {record['epoch']}/{epochs}  loss {record['loss']:.4f} (ce "
        f"{record['cross_entropy']:.4f}, penalty {record['meta_penalty']:.2e})  val_acc "
        f"{_fmt(record['val_accuracy'])}  {record['samples_per_second']:.0f} img/s"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _gather(url: str | None, world: World) -> list[str | None]:
    if world.world_size == 1 or not dist.is_initialized():
        return [url]
    urls: list[str | None] = [None] * world.world_size
    dist.all_gather_object(urls, url)
    return urls


def _report(metrics: dict, state: TrainState) -> None:
    """Rank 0: write the state to a temporary directory and report it as the checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        save_state(tmp, state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            # Step first, so names sort by progress; the time keeps a step redone after a
            # restore from reusing (and Ray's retention from deleting) an earlier directory.
            checkpoint_dir_name=f"checkpoint_{state.step:09d}_{time.time_ns() // 10**6}",
        )
