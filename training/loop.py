"""The per-worker training loop that Ray Train runs on every rank.

Reads top to bottom: build the model, restore the newest readable checkpoint if the run is
being resumed (mid-epoch included; a new run with --init-from takes that run's adapters,
`training.transfer`), fill the feature cache where it applies
(`training.features`), then per step: each dataset's share of the global batch as `--mix`
splits it (images, or their cached features), `training.step.train_step`; every
--checkpoint-every-steps steps and at each epoch's end a checkpoint (a typed `TrainState`);
after each epoch validation. Every rank calls `ray.train.report` (it is a barrier); rank 0
attaches the checkpoint files.
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cluster import s3, storage
from cluster.environ import CACHE_DIR_VAR
from cluster.metrics import NullMetrics, StepClock, TrainMetrics, serve_metrics
from cluster.world import World
from data_prep.contract import Manifest, read_manifest
from training import progress
from training.checkpoint import Position, TrainState, rng_state, save_state, set_rng_state
from training.config import TrainConfig
from training.data import EvalBatches, StepLoader, TrainBatches
from training.decode import to_input
from training.evaluate import (
    REPORT_DIR,
    TEST_CONFUSIONS,
    confusion_matrix,
    confusion_matrix_cached,
    save_confusions,
)
from training.features import CachedBatches, FeatureCache, cache_applies
from training.loss import MetaLoss
from training.mix import Mix
from training.model import MetaModel, build_model, state_fingerprint
from training.quiet import quiet_worker_logs
from training.resume import check_resumable, restore_state
from training.step import LossSums, heads_step, prepare_compute, train_step
from training.transfer import adapters_frozen, check_same_transfer, init_adapters

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
    if not cfg.debug:
        quiet_worker_logs()
    # This process's environment was fixed when its node started: take the driver's endpoint.
    s3.set_endpoint(cfg.s3_endpoint)
    s3.set_timeout(cfg.s3_timeout)
    # A node may name its own local disk for the shard cache (e.g. in its pod spec).
    cfg.cache_dir = cfg.cache_dir or os.environ.get(CACHE_DIR_VAR) or None
    world = World.from_ray()
    port = cfg.metrics_port + world.local_rank if cfg.metrics_port else 0
    metrics = serve_metrics(port, cfg.name, world.rank)
    poster = progress.Poster(config.get(progress.CONFIG_KEY) if world.is_main else None, cfg.epochs)
    try:
        _train(cfg, world, metrics, poster)
    finally:
        metrics.close()


def _train(
    cfg: TrainConfig, world: World, metrics: TrainMetrics | NullMetrics, poster: progress.Poster
) -> None:
    device = ray.train.torch.get_device()
    manifests = [read_manifest(d) for d in cfg.data]
    classes = [len(m.classes) for m in manifests]
    model = build_model(cfg.weights, classes, cfg.adapters, cfg.seed, cfg.weights_sha256)
    backbone_sha = model.backbone_fingerprint()
    digests = [m.digest() for m in manifests]
    if adapters_frozen(cfg):
        model.freeze_adapters()  # before the optimizer, which takes what trains
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_step, cfg.lr_gamma)
    loss_fn = MetaLoss(cfg.meta_lambda)
    torch.manual_seed(cfg.seed + world.rank)

    pos = Position()
    state = restore_state(cfg, world, say)
    if state:
        check_resumable(state, cfg, backbone_sha, digests)
        check_same_transfer(state, cfg)
        model.load_trainable(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        set_rng_state(state.rng)
        pos = state.position
        if world.is_main:
            say(
                f"resuming {cfg.name} at epoch {pos.epoch + 1}, sample {pos.consumed} "
                f"(step {pos.step}) on {world.world_size} workers"
            )
    elif cfg.init_from:
        # Only a run without a checkpoint of its own starts from another run's adapters.
        init_adapters(model, cfg, backbone_sha)
        if world.is_main:
            how = "training" if cfg.train_adapters else "frozen"
            say(f"adapters from {cfg.init_from} ({how}), new heads")

    pos.start_segment(world.world_size)
    prepare_compute(model, device)
    # Only the heads train: every rank computes the whole step's head update alike from the
    # features all ranks gather (`step.heads_step`): no DDP, and weights that do not depend on
    # the number of workers. Adapters train: DDP all-reduces their and the heads' gradients.
    heads_only = model.heads_only()
    if heads_only:
        features = torch.compile(model.features) if cfg.compile else model.features
    else:
        ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=NO_BUFFER_SYNC)
        if cfg.compile:
            ddp_model = torch.compile(ddp_model)
    urls = _gather(metrics.url, world)
    names = dataset_labels(cfg.data)
    device_decode = cfg.decode == "gpu" or (cfg.decode == "auto" and device.type == "cuda")
    # One stream of samples an epoch, shared among the datasets by --mix (`training.mix`).
    mix = Mix.of(cfg.mix, [m.num_samples("train") for m in manifests])
    kw = {"with_keys": bool(cfg.sample_log), "device_decode": device_decode, "mix": mix}
    train_sets = [
        TrainBatches.from_config(d, m, "train", cfg, world, index=i, **kw)
        for i, (d, m) in enumerate(zip(cfg.data, manifests, strict=True))
    ]
    cache = None
    if cache_applies(cfg):
        cache = FeatureCache(
            storage.join(cfg.storage, cfg.name), model, backbone_sha, cfg, world, device,
            device_decode, say,
        )  # fmt: skip
        cached = [
            cache.load_train(cache.fill(d, m, "train"), b).to(device)
            for d, m, b in zip(cfg.data, manifests, train_sets, strict=True)
        ]
    # The rank reads; its loader workers decode whole steps and live as long as the run.
    loaders = None if cache else StepLoader(train_sets, cfg.loader_workers, device.type == "cuda")
    log = _sample_log(cfg, world, pos)
    stride = cfg.step_samples(world.world_size)
    sums = LossSums(device)
    clock = StepClock(metrics)

    latest = {"loss": None}  # the last loss read from the device, for the progress line

    def read_losses() -> None:
        """The one host sync of the loss terms: every --log-every steps and before reports."""
        totals, steps = sums.take()
        if steps:
            pos.add_losses(totals)
            metrics.losses(*(v / steps for v in totals))
            latest["loss"] = totals[0] / steps

    def checkpoint(record: dict) -> None:
        """Every rank reports (it is a barrier); only rank 0 writes and attaches the files.
        Each rank's time in here is metatrainer_checkpoint_seconds, never data wait."""
        with clock.checkpoint():
            if world.is_main:
                _report(record, train_state())
            else:
                ray.train.report(record)

    def train_state() -> TrainState:
        return TrainState(
            model=model.trainable_state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            position=pos,
            rng=rng_state(),
            config=cfg.to_dict(),
            classes=[m.classes for m in manifests],
            backbone={"weights": cfg.weights, "sha256": backbone_sha},
            datasets=digests,
        )

    while pos.epoch < cfg.epochs:
        metrics.epoch(pos.epoch)
        model.train()
        for batches in train_sets:
            batches.set_position(pos.epoch, pos.consumed)
        steps = min(len(b) for b in train_sets)
        if cache:
            cached_sets = [CachedBatches(b, f) for b, f in zip(train_sets, cached, strict=True)]
            loader = zip(*cached_sets, strict=False)
        else:
            loader = loaders.epoch()
        started = time.perf_counter()
        clock.restart()
        for i in range(steps):
            batch = next(loader)
            clock.batch_ready()
            # Cached features are already on the device; images are decoded/normalised there.
            inputs = torch.cat([b[0] if cache else to_input(b[0], device) for b in batch])
            targets = [b[1].to(device, non_blocking=True) for b in batch]
            # Each dataset's mean is over the whole step's samples of it (`training.loss`).
            if heads_only:
                places = [b[3] for b in batch]
                sums.add(heads_step(features, model.heads, inputs, targets, places, optimizer))
            else:
                shares = [n / world.world_size for n in mix.split(pos.consumed, stride)]
                step_loss = loss_fn.for_step(shares)
                sums.add(train_step(ddp_model, inputs, targets, optimizer, step_loss))
            if log:
                for d, x in enumerate(batch):
                    keys = " ".join(x[2])
                    log.write(f"{pos.epoch}\t{pos.consumed}\t{d}\t{keys}\t{time.time():.6f}\n")
                log.flush()
            pos.advance(stride)
            if pos.step % cfg.log_every == 0:
                # The host sync waits for the steps queued on the GPU: step time, not data wait.
                read_losses()
            clock.step_done({n: len(y) for n, y in zip(names, targets, strict=True)})
            poster.step(pos.epoch, i + 1, steps, (i + 1) * stride,
                        time.perf_counter() - started, latest["loss"])  # fmt: skip
            every = cfg.checkpoint_every_steps
            if every and pos.step % every == 0 and i < steps - 1:
                read_losses()
                checkpoint({"epoch": pos.epoch, "step": pos.step})
        del loader
        read_losses()
        scheduler.step()
        seconds = time.perf_counter() - started

        confusions = _confusions(model, cfg, world, manifests, "val", device, cache)
        val = _accuracies(confusions)
        for name, acc in zip(names, val, strict=True):
            if acc is not None:
                metrics.val_accuracy(name, acc)
        n = max(pos.epoch_steps, 1)
        record = {
            "epoch": pos.epoch + 1,
            "loss": pos.totals[0] / n,
            "cross_entropy": pos.totals[1] / n,
            "meta_penalty": pos.totals[2] / n,
            "val_accuracy": _mean(val),
            # Kept in the history (every checkpoint's position): `metatrainer report` plots it.
            "val_accuracy_per_dataset": dict(zip(names, val, strict=True)),
            "samples_per_second": steps * stride / seconds,
            "epoch_seconds": seconds,
        }
        pos = pos.next_epoch(dict(record))
        if pos.epoch == cfg.epochs:
            # The last report carries the final results: Ray keeps a run's metrics with its
            # latest checkpoint, so a resumed-but-finished run still finds them there.
            # Confusion matrices rather than counts, from the same one pass: the report
            # that the driver writes next plots them instead of scoring the split again.
            confusions = _confusions(model, cfg, world, manifests, "test", device, cache)
            test = _accuracies(confusions)
            if world.is_main:
                save_confusions(
                    storage.join(cfg.storage, cfg.name, REPORT_DIR, TEST_CONFUSIONS),
                    names, [m.classes for m in manifests], confusions,
                )  # fmt: skip
            record |= {
                "step": pos.step,
                "test_accuracy": _mean(test),
                "test_accuracy_per_dataset": dict(zip(names, test, strict=True)),
                "fingerprint": state_fingerprint(model.trainable_state_dict()),
                "history": pos.history,
                "segments": pos.segments,
                "metrics_urls": urls,
                "feature_cache": cache is not None,
            }
        if world.is_main:
            say(
                f"epoch {record['epoch']}/{cfg.epochs}  loss {record['loss']:.4f} (ce "
                f"{record['cross_entropy']:.4f}, penalty {record['meta_penalty']:.2e})  val_acc "
                f"{_fmt(record['val_accuracy'])}  {record['samples_per_second']:.0f} img/s"
            )
        checkpoint(record)


def _sample_log(cfg: TrainConfig, world: World, pos: Position):
    """SAMPLE_LOG/rank-R.tsv: a line per trained batch (epoch, position, dataset, keys, time);
    rank 0 also marks where each start of the worker group resumed (resume, epoch, position,
    time): steps logged before it at or past that point were lost."""
    if not cfg.sample_log:
        return None
    Path(cfg.sample_log).mkdir(parents=True, exist_ok=True)
    log = open(Path(cfg.sample_log) / f"rank-{world.rank}.tsv", "a")  # noqa: SIM115
    if world.is_main:
        log.write(f"resume\t{pos.epoch}\t{pos.consumed}\t{time.time():.6f}\n")
        log.flush()
    return log


def _confusions(
    model: MetaModel,
    cfg: TrainConfig,
    world: World,
    manifests: list[Manifest],
    split: str,
    device: torch.device,
    cache: FeatureCache | None,
) -> list[torch.Tensor]:
    """Each dataset's counts [true class, predicted class] on `split` (all zero: no such split),
    each rank scoring its share, summed over the ranks."""
    matrices = []
    for i, (d, m) in enumerate(zip(cfg.data, manifests, strict=True)):
        k = len(m.classes)
        counts = torch.zeros(k, k, dtype=torch.int64)
        if split in m.splits and m.num_samples(split):
            if cache:
                feats = cache.load_eval(cache.fill(d, m, split), m.num_samples(split))
                counts = confusion_matrix_cached(model, i, feats.to(device), k)
            else:
                batches = EvalBatches.from_config(d, m, split, cfg, world)
                counts = confusion_matrix(model, i, batches, device, cfg.loader_workers, k)
        matrices.append(counts)
    if dist.is_available() and dist.is_initialized():
        flat = torch.cat([c.flatten() for c in matrices]).to(device)
        dist.all_reduce(flat)
        sizes = [c.numel() for c in matrices]
        matrices = [
            part.view(c.shape) for part, c in zip(flat.cpu().split(sizes), matrices, strict=True)
        ]
    return matrices


def _accuracies(confusions: list[torch.Tensor]) -> list[float | None]:
    """Accuracy per dataset from its confusion counts (None: no samples in the split)."""
    return [int(c.trace()) / int(c.sum()) if c.sum() else None for c in confusions]


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


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
