"""The driver: check the inputs, build a TorchTrainer, run it, write `result.json` and the
report (`training.run.report`: curves and confusion matrices as PNGs in RUN/report) and the
resolved config as `RUN/config.toml` (`training.config_file`); with --mlflow, create (or
continue) the run's MLflow run before training and complete it after (`training.run.tracking`).

    metatrainer train --data ./shards --storage ./runs --name digits --workers 2

Run the same command again with the same --storage and --name and Ray Train finds the run's
checkpoints there: training resumes after the latest one instead of starting over.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import IO

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from cluster import s3, storage
from cluster.environ import environment
from cluster.errors import Stopped, UserError, one_line
from cluster.ray_cluster import connect
from cluster.tracking import NullTracker, Tracker, resolve_uri
from data_prep.contract import manifest_url, read_manifest
from training.config import TrainConfig
from training.config_file import CONFIG_FILE, config_toml
from training.data import order
from training.data.features import cache_applies
from training.data.mix import Mix, parse_mix
from training.model.network import WEIGHT_ENUMS, check_weights_flags, load_resnet50
from training.model.transfer import check_init
from training.model.weights import is_remote
from training.run import progress, stop, tracking
from training.run.failures import FailFastTrainer, caused_by, root_cause
from training.run.loop import dataset_labels, train_loop_per_worker
from training.run.quiet import QuietController
from training.run.resume import check_run_unchanged, repair_snapshot

RESULT_FILE = "result.json"
START_ATTEMPTS = 3
"""Attempts to start the worker group (each waiting --start-timeout) before the run ends."""
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # Ray Train passes it on
JOB_CONFIG_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by `ray job submit` for the entrypoint: its metadata holds the job's submission id."""


@dataclass
class TrainOutcome:
    run_dir: str
    result_file: str
    checkpoint: str | None
    metrics: dict
    report: str | None = None
    """Where the run's PNGs went (None: writing them failed, with a warning)."""
    mlflow: str | None = None
    """Where the run is tracked in MLflow (its page in the UI), with --mlflow."""


def preflight(cfg: TrainConfig) -> None:
    """Fail here, in one line, rather than in every worker after Ray has started them; and
    resolve the default --partitions and --shuffle-block, which the run then keeps."""
    if not cfg.data.datasets:
        raise UserError("give at least one --data location (a `metatrainer prep` output)")
    check_batch(cfg)
    if (cfg.data.shuffle_block or 1) < 1 or (cfg.data.partitions or 1) < 1:
        raise UserError("--shuffle-block and --partitions must be at least 1")
    if cfg.run.log_every < 1:
        raise UserError("--log-every must be at least 1")
    if cfg.cluster.start_timeout <= 0:
        raise UserError(
            f"--start-timeout must be more than 0 seconds, not {cfg.cluster.start_timeout}"
        )
    if cfg.data.decode == "gpu" and not cfg.cluster.gpus_per_worker:
        raise UserError("--decode gpu needs GPUs: give --gpus-per-worker, or --decode cpu")
    check_init(cfg)  # --init-from: a run with adapters, on this backbone (fills --adapters)
    cache_applies(cfg)  # --feature-cache on where it cannot apply: say so now
    cfg.model.weights_sha256 = check_weights_flags(cfg.model.weights, cfg.model.weights_sha256)
    trains = {d: read_manifest(d).shards("train") for d in cfg.data.datasets}
    sizes = {d: sum(s.num_samples for s in shards) for d, shards in trains.items()}
    splits = [(sizes[d], sum(s.bytes for s in shards)) for d, shards in trains.items()]
    cfg.data.partitions, cfg.data.shuffle_block = order.resolve(
        cfg.data.partitions, cfg.data.shuffle_block, splits
    )
    check_workers(cfg)
    cfg.data.mix = parse_mix(cfg.data.mix)
    flag, step = batch_flag(cfg)
    datasets = len(cfg.data.datasets)
    if step < datasets:
        raise UserError(f"{flag} {step} is shared by {datasets} datasets: give at least {datasets}")
    if (
        Mix.of(cfg.data.mix, list(sizes.values())).steps_left(cfg.step_samples(cfg.cluster.workers))
        == 0
    ):
        per_worker = flag == "--batch-size"
        what = f"{cfg.cluster.workers} workers × batch {step}" if per_worker else f"{flag} {step}"
        lower = "--batch-size or --workers" if per_worker else flag
        raise UserError(
            f"the train splits have {sum(sizes.values())} samples, fewer than {what}; lower {lower}"
        )
    check_run_unchanged(cfg)  # a resume: refuse other identity flags before Ray writes a thing
    if cfg.model.weights != "none":
        # Reads and checks a local file; downloads a URL (or torchvision's file) into this
        # node's cache, where this node's workers find it. A missing object, a refusal, a
        # server that does not answer or a wrong sha256 is one line here, before Ray starts
        # any worker, rather than a failure of every worker.
        load_resnet50(cfg.model.weights, cfg.optim.seed, cfg.model.weights_sha256)


def check_batch(cfg: TrainConfig) -> None:
    """Exactly one of --batch-size (per worker) and --global-batch (over all workers), at least
    1; a config that sets global_batch leaves batch_size unused (None, in what is recorded)."""
    if cfg.optim.global_batch is not None:
        cfg.optim.batch_size = None
    flag, size = batch_flag(cfg)
    if size is None or size < 1:
        raise UserError(f"{flag} must be at least 1, not {size}")


def batch_flag(cfg: TrainConfig) -> tuple[str, int | None]:
    """The flag that sets the run's batch, and its value."""
    if cfg.optim.global_batch is not None:
        return "--global-batch", cfg.optim.global_batch
    return "--batch-size", cfg.optim.batch_size


def check_workers(cfg: TrainConfig) -> None:
    """A worker count, or an elastic range MIN-MAX: any shape serves any --partitions."""
    low = cfg.cluster.workers if cfg.cluster.min_workers is None else cfg.cluster.min_workers
    if low < 1 or low > cfg.cluster.workers:
        raise UserError(f"--workers needs 1 <= MIN <= MAX, not {low}-{cfg.cluster.workers}")


def elastic_batch_line(cfg: TrainConfig) -> str:
    """What an elastic run's step is, and the most a worker trains at once (on MIN workers)."""
    low, high, o = cfg.cluster.min_workers, cfg.cluster.workers, cfg.optim
    if not o.global_batch:
        return (
            f"elastic: a step is --batch-size {o.batch_size} × the workers ({low} to {high}), "
            "so the weights depend on when workers are lost or added; --global-batch G keeps "
            "every step, and the weights, those of a fixed-size run"
        )
    most = order.most_per_rank(o.global_batch, cfg.data.partitions, low)
    return (
        f"elastic: a step is --global-batch {o.global_batch} on {low} to {high} workers, the "
        f"weights those of a fixed-size run; on {low} a worker trains up to {most} samples a "
        "step (its memory must hold them)"
    )


def resolve_locations(cfg: TrainConfig) -> None:
    """The S3 endpoint and every path as the workers must get them (idempotent)."""
    s3.set_endpoint(cfg.s3.endpoint)
    s3.set_timeout(cfg.s3.timeout)
    cfg.s3.endpoint = s3.endpoint()  # the workers get it explicitly (their env is fixed)
    # Workers run elsewhere, in another directory: every path leaves the driver absolute.
    cfg.data.datasets = [storage.normalize(d) for d in cfg.data.datasets]
    cfg.run.storage = storage.normalize(cfg.run.storage)
    if cfg.model.weights not in (*WEIGHT_ENUMS, "none") and not is_remote(cfg.model.weights):
        cfg.model.weights = storage.normalize(cfg.model.weights)
    cfg.run.sample_log = cfg.run.sample_log and storage.normalize(cfg.run.sample_log)
    cfg.data.cache_dir = cfg.data.cache_dir and storage.normalize(cfg.data.cache_dir)
    cfg.run.mlflow = resolve_uri(cfg.run.mlflow)  # or MLFLOW_TRACKING_URI; a path as a file: URI


def run_training(
    cfg: TrainConfig,
    address: str | None = None,
    callbacks: list[ray.train.UserCallback] | None = None,
    progress_stream: IO[str] | None = None,
    mlflow_tags: dict[str, str] | None = None,
) -> TrainOutcome:
    """Train; `callbacks` join the run's (`metatrainer tune` passes Tune's reporter); a live
    progress line goes to `progress_stream` when it is a terminal (`training.run.progress`);
    `mlflow_tags` join the MLflow run's (a trial's: its parent run, the search's)."""
    resolve_locations(cfg)
    preflight(cfg)
    if cfg.cluster.min_workers is not None and cfg.cluster.min_workers < cfg.cluster.workers:
        print(elastic_batch_line(cfg), file=sys.stderr)
    storage_path, storage_filesystem = storage.ray_storage(cfg.run.storage)
    connect(address)
    # Ray refuses to restore a run whose list of checkpoints names a directory that is gone.
    repair_snapshot(
        storage.join(cfg.run.storage, cfg.run.name), lambda m: print(m, file=sys.stderr)
    )
    stop.listen(cfg)  # SIGUSR1: a checkpoint, then a clean stop
    tracker = tracking.start_run(
        cfg, {**run_tags(cfg), **(mlflow_tags or {})} if cfg.run.mlflow else {}
    )
    line, board = progress.start(progress_stream)
    trainer = FailFastTrainer(
        train_loop_per_worker,
        train_loop_config={**cfg.to_dict(), **board},
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.workers
            if cfg.cluster.min_workers is None
            else (cfg.cluster.min_workers, cfg.cluster.workers),
            use_gpu=cfg.cluster.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": cfg.cluster.cpus_per_worker,
                "GPU": cfg.cluster.gpus_per_worker,
            },
            elastic_resize_monitor_interval_s=cfg.cluster.resize_check,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(
                max_failures=cfg.cluster.max_failures, controller_failure_limit=START_ATTEMPTS - 1
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints or None),
            # Our workers print one line per epoch; Ray's per-report INFO lines drown it.
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[
                *([] if cfg.run.debug else [QuietController(START_ATTEMPTS)]),
                *(callbacks or []),
            ],
        ),
    )
    try:
        result = _fit(trainer, cfg, line)
    except BaseException as e:
        tracking.end_run(tracker, cfg, tracking.status_of(e))
        raise
    return _finish(cfg, result, tracker)


def _fit(
    trainer: FailFastTrainer, cfg: TrainConfig, line: progress.Line | None
) -> ray.train.Result:
    """trainer.fit(), its failures as one line; the progress line closed either way."""
    try:
        # Read by Ray Train's controller, to which fit() passes this from the driver's environment.
        with environment({START_TIMEOUT_VAR: str(cfg.cluster.start_timeout)}):
            return trainer.fit()
    except ray.train.TrainingFailedError as e:
        if caused_by(e, "WorkerGroupStartupTimeoutError"):
            raise UserError(_no_workers(cfg)) from None
        raise UserError(f"training failed: {root_cause(e)}") from None
    finally:
        if line:
            line.close()


def _finish(
    cfg: TrainConfig, result: ray.train.Result, tracker: Tracker | NullTracker
) -> TrainOutcome:
    """After training: result.json, RUN/config.toml, the report, and the MLflow run's end."""
    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    metrics = dict(result.metrics or {})
    checkpoint = (
        storage.join(run_dir, result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
        if result.checkpoint
        else None
    )
    if metrics.get(stop.STOPPED):
        tracking.end_run(tracker, cfg, "KILLED")
        raise Stopped(stop.stopped_line(cfg, metrics, checkpoint))
    document = (json.dumps({"config": cfg.to_dict(), **metrics}, indent=2) + "\n").encode()
    result_file = storage.join(run_dir, RESULT_FILE)
    storage.write_bytes(result_file, document)
    # `metatrainer train --config RUN/config.toml --name NEW` reruns it.
    toml = config_toml(cfg).encode()
    storage.write_bytes(storage.join(run_dir, CONFIG_FILE), toml)
    report = _write_report(run_dir)
    tracking.finish_run(tracker, cfg, metrics, {RESULT_FILE: document, CONFIG_FILE: toml})
    return TrainOutcome(run_dir, result_file, checkpoint, metrics, report, tracker.link())


def run_tags(cfg: TrainConfig) -> dict[str, str | None]:
    """What the MLflow run is tagged with from the start: where the run lives, each
    dataset's manifest.json (its sha256, as `sha256sum` prints it) and the Ray job."""
    labels = dataset_labels(cfg.data.datasets)
    manifests = {
        f"manifest_sha256/{label}": hashlib.sha256(storage.read_bytes(manifest_url(d))).hexdigest()
        for label, d in zip(labels, cfg.data.datasets, strict=True)
    }
    try:
        submission = json.loads(os.environ.get(JOB_CONFIG_VAR) or "{}")["metadata"]
    except (ValueError, KeyError, TypeError):
        submission = {}
    return {
        "run_dir": storage.join(cfg.run.storage, cfg.run.name),
        **manifests,
        "ray.job_id": ray.get_runtime_context().get_job_id(),
        "ray.job_submission_id": submission.get("job_submission_id"),
    }


def _write_report(run_dir: str) -> str | None:
    """The run's report into RUN/report, from the history in the last checkpoint and the test
    split's confusion matrices the workers saved (plots only: no second pass over the split).
    The run has finished by now, so a failure here is a warning, not a failed training."""
    from training.run.evaluate import REPORT_DIR
    from training.run.report import write_report

    try:
        write_report(run_dir, scored=True)
    except Exception as e:  # noqa: BLE001  (the report must not fail a finished training)
        reason = one_line(e) or f"{type(e).__name__}: {e}".splitlines()[0]
        print(
            f"warning: the report was not written ({reason}); "
            f"`metatrainer report {run_dir}` writes it",
            file=sys.stderr,
        )
        return None
    return storage.join(run_dir, REPORT_DIR)


def _no_workers(cfg: TrainConfig) -> str:
    """What the workers needed and what the cluster has free, in one line."""
    free, total = ray.available_resources(), ray.cluster_resources()
    kinds = {"CPU": cfg.cluster.cpus_per_worker, "GPU": cfg.cluster.gpus_per_worker}
    kinds = {k: n for k, n in kinds.items() if n}
    need = ", ".join(f"{n:g} {k}" for k, n in kinds.items())
    have = ", ".join(f"{free.get(k, 0):g} of {total.get(k, 0):g} {k}" for k in kinds)
    count = cfg.cluster.workers if cfg.cluster.min_workers is None else cfg.cluster.min_workers
    return (
        f"could not start {count} training workers ({need} each) in {START_ATTEMPTS} attempts "
        f"of --start-timeout {cfg.cluster.start_timeout:g} s: the cluster has {have} free now (see "
        "`ray status`); lower --workers or --cpus-per-worker/--gpus-per-worker, add nodes, or "
        "wait longer with --start-timeout"
    )
