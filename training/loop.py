"""The per-worker training loop that Ray Train runs on every rank.

Reads top to bottom: build the model, restore the latest checkpoint if the run is being
resumed, then per epoch: train on interleaved batches of every dataset, validate, and report
metrics plus a checkpoint (every rank calls `ray.train.report`, rank 0 attaches the files).
"""

from __future__ import annotations

import inspect
import sys
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from cluster import s3
from cluster.errors import UserError
from cluster.metrics import NullMetrics, TrainMetrics, serve_metrics
from cluster.world import World
from data_prep.manifest import Manifest, read_manifest
from training.checkpoint import load_state, rng_state, save_state, set_rng_state
from training.config import TrainConfig
from training.data import ShardBatches, build_loader
from training.evaluate import count_correct, eval_batches
from training.loss import MetaLoss
from training.model import MetaModel, build_model, state_fingerprint

# DDP all-reduces only parameters that require grad: the heads and adapters. The frozen
# backbone has no BatchNorm statistics to keep in sync, so do not sync buffers every forward.
_DDP_ARGS = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in _DDP_ARGS
    else {"broadcast_buffers": False}
)

# A resumed run must train the same model on the same data; other settings may change.
IDENTITY_FIELDS = ("data", "weights", "adapters", "seed")


def dataset_label(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1] or location


def say(message: str) -> None:
    """One line to the driver's console (Ray's patched `print` would emit it twice)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def train_loop_per_worker(config: dict) -> None:
    cfg = TrainConfig.from_dict(config)
    # This process's environment was fixed when its node started: take the driver's endpoint.
    s3.set_endpoint(cfg.s3_endpoint)
    world = World.from_ray()
    port = cfg.metrics_port + world.local_rank if cfg.metrics_port else 0
    metrics = serve_metrics(port, cfg.name, world.rank)
    try:
        _train(cfg, world, metrics)
    finally:
        metrics.close()


def _train(cfg: TrainConfig, world: World, metrics: TrainMetrics | NullMetrics) -> None:
    device = ray.train.torch.get_device()
    manifests = [read_manifest(d) for d in cfg.data]
    model = build_model(cfg.weights, [len(m.classes) for m in manifests], cfg.adapters, cfg.seed)
    backbone_sha = model.backbone_fingerprint()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.lr_step, cfg.lr_gamma)
    loss_fn = MetaLoss(cfg.meta_lambda)
    torch.manual_seed(cfg.seed + world.rank)

    start_epoch, step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_state(directory)
        _check_resumable(state, cfg, backbone_sha)
        model.load_trainable(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_epoch, step, history = state["epoch"], state["step"], list(state["history"])
        if world.is_main:
            say(f"resuming {cfg.name} at epoch {start_epoch + 1} (step {step})")

    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=NO_BUFFER_SYNC)
    urls = _gather(metrics.url, world)
    names = [dataset_label(d) for d in cfg.data]
    train_sets = [
        _train_batches(d, m, cfg, world) for d, m in zip(cfg.data, manifests, strict=True)
    ]
    steps = min(len(b) for b in train_sets)
    if steps == 0:
        raise UserError(
            f"a train split is too small for {world.world_size} workers × batch "
            f"{cfg.batch_size}; lower --batch-size or --workers"
        )

    for epoch in range(start_epoch, cfg.epochs):
        metrics.epoch(epoch)
        model.train()
        for batches in train_sets:
            batches.set_epoch(epoch)
        loaders = [
            iter(build_loader(b, cfg.loader_workers, device.type == "cuda")) for b in train_sets
        ]
        totals = torch.zeros(3)
        started = tick = time.perf_counter()
        for _ in range(steps):
            batch = [next(it) for it in loaders]
            ready = time.perf_counter()
            images = torch.cat([x for x, _ in batch]).to(device, non_blocking=True)
            targets = [y.to(device, non_blocking=True) for _, y in batch]
            logits, penalty = ddp_model(images, [len(y) for y in targets])
            parts = loss_fn(logits, targets, penalty)
            optimizer.zero_grad(set_to_none=True)
            parts.total.backward()
            optimizer.step()
            step += 1
            values = torch.stack([p.detach() for p in parts]).float().cpu()
            totals += values
            done = time.perf_counter()
            metrics.step(
                {n: len(y) for n, y in zip(names, targets, strict=True)},
                done - ready,
                ready - tick,
                *values.tolist(),
            )
            tick = done
        del loaders
        scheduler.step()
        seconds = time.perf_counter() - started

        val = _accuracy(model, cfg, world, manifests, "val", device)
        for name, acc in zip(names, val, strict=True):
            if acc is not None:
                metrics.val_accuracy(name, acc)
        record = {
            "epoch": epoch + 1,
            "loss": float(totals[0]) / steps,
            "cross_entropy": float(totals[1]) / steps,
            "meta_penalty": float(totals[2]) / steps,
            "val_accuracy": _mean(val),
            "samples_per_second": steps
            * cfg.batch_size
            * len(train_sets)
            * world.world_size
            / seconds,
            "epoch_seconds": seconds,
        }
        history.append(dict(record))
        if epoch + 1 == cfg.epochs:
            # The last report carries the final results: Ray keeps a run's metrics with its
            # latest checkpoint, so a resumed-but-finished run still finds them there.
            test = _accuracy(model, cfg, world, manifests, "test", device)
            record |= {
                "step": step,
                "test_accuracy": _mean(test),
                "test_accuracy_per_dataset": dict(zip(names, test, strict=True)),
                "fingerprint": state_fingerprint(model.trainable_state_dict()),
                "history": history,
                "metrics_urls": urls,
            }
        if world.is_main:
            say(
                f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f} (ce "
                f"{record['cross_entropy']:.4f}, penalty {record['meta_penalty']:.2e})  val_acc "
                f"{_fmt(record['val_accuracy'])}  {record['samples_per_second']:.0f} img/s"
            )
        state = {
            "model": model.trainable_state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1,
            "step": step,
            "rng": rng_state(),
            "config": cfg.to_dict(),
            "classes": [m.classes for m in manifests],
            "backbone": {"weights": cfg.weights, "sha256": backbone_sha},
            "history": history,
        }
        _report(record, state if world.is_main else None, f"checkpoint_{step:09d}")


def _train_batches(
    dataset: str, manifest: Manifest, cfg: TrainConfig, world: World
) -> ShardBatches:
    return ShardBatches(
        dataset,
        manifest.shards("train"),
        world,
        batch_size=cfg.batch_size,
        image_size=cfg.image_size,
        train=True,
        augment=cfg.augment,
        seed=cfg.seed,
        num_classes=len(manifest.classes),
        cache_dir=cfg.cache_dir,
        cache_size=cfg.cache_size,
    )


def _check_resumable(state: dict, cfg: TrainConfig, backbone_sha: str) -> None:
    before = state["config"]
    changed = [f for f in IDENTITY_FIELDS if before.get(f) != getattr(cfg, f)]
    if changed:
        flags = ", ".join(f"--{f.replace('_', '-')}" for f in changed)
        raise UserError(
            f"run {cfg.name!r} was started with other {flags}; resume with the same values or "
            "start a new run with another --name"
        )
    if state["backbone"]["sha256"] != backbone_sha:
        raise UserError(
            f"--weights {cfg.weights} now gives a different backbone than the one run "
            f"{cfg.name!r} was trained with; start a new run with another --name"
        )


def _accuracy(
    model: MetaModel,
    cfg: TrainConfig,
    world: World,
    manifests: list[Manifest],
    split: str,
    device: torch.device,
) -> list[float | None]:
    """Accuracy per dataset on `split`, each rank scoring its share (None: no such split)."""
    counts = torch.zeros(len(manifests), 2, dtype=torch.float64)
    for i, (d, m) in enumerate(zip(cfg.data, manifests, strict=True)):
        if split in m.splits and m.num_samples(split):
            batches = eval_batches(d, m, split, cfg, world)
            counts[i] = torch.tensor(count_correct(model, i, batches, device, cfg.loader_workers))
    if dist.is_available() and dist.is_initialized():
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
    return [c / t if t else None for c, t in counts.tolist()]


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


def _report(metrics: dict, state: dict | None, directory_name: str | None) -> None:
    """Every rank reports (it is a barrier); only rank 0 passes the checkpoint files."""
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_state(tmp, state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=directory_name,
        )
