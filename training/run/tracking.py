"""A training run in MLflow (`--mlflow URI` or MLFLOW_TRACKING_URI; `cluster.tracking`): one
MLflow run per training run, named after --name, in the experiment --mlflow-experiment.

    driver   `start_run`: creates the MLflow run (a resume continues it: its id is kept in
             RUN/mlflow.json), logs the resolved config as parameters and tags the run
    rank 0   `rank_tracker`: the loss terms every --log-every steps (`step_metrics`) and each
             epoch's results (`epoch_metrics`), at the global step; tags the backbone
    driver   `finish_run`: the test accuracy, the fingerprint, result.json, config.toml and
             the report's PNGs; the run FINISHED (`end_run`: FAILED or KILLED when training
             did not finish)

A step the run already holds for a key is not logged again, so a worker group restarted from
a checkpoint does not duplicate points. When the server does not answer, the process that
finds it out prints one warning and marks RUN/mlflow.json, so that the run's other processes
(a restarted rank 0, the driver at the end) stay quiet and the training goes on untracked; the
next `metatrainer train` of the run tries again.
"""

from __future__ import annotations

import json
from typing import Any

from cluster import storage
from cluster.tracking import NullTracker, Tracker, continue_run, create_run, param_value
from cluster.world import World
from training.config import TrainConfig

MLFLOW_FILE = "mlflow.json"
"""RUN/mlflow.json: {"uri", "run_id"} of the run's MLflow run, and "failed" (why) when this
start of it stopped tracking."""
WHAT = "training"


def config_params(cfg: TrainConfig) -> dict[str, str]:
    """The resolved config as parameters: `section.field`, lists as JSON."""
    return {
        f"{section}.{name}": param_value(
            json.dumps(value) if isinstance(value, list | dict) else value
        )
        for section, values in cfg.to_dict().items()
        for name, value in values.items()
    }


def start_run(cfg: TrainConfig, tags: dict[str, Any]) -> Tracker | NullTracker:
    """The driver, before training: the run's MLflow run, created or continued, with its
    parameters and `tags`; a NullTracker without --mlflow or when the server does not answer.
    Parameters cannot change in MLflow: a resume that changes a setting (--epochs) records its
    new value as the tag `resumed.<parameter>`."""
    uri = cfg.run.mlflow
    if uri is None:
        return NullTracker()
    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    saved = read_record(run_dir)
    tracker: Tracker | NullTracker | None = None
    if saved.get("uri") == uri and saved.get("run_id"):
        tracker = continue_run(uri, saved["run_id"], WHAT)
    continued = tracker is not None
    if tracker is None:
        tracker = create_run(uri, cfg.run.mlflow_experiment, cfg.run.name, WHAT, tags)
    if not isinstance(tracker, Tracker):  # one warning said why; a later start tries again
        kept = {"run_id": saved["run_id"]} if saved.get("uri") == uri and "run_id" in saved else {}
        _write_record(run_dir, {"uri": uri, **kept, "failed": "at the start"})
        return tracker
    record = {"uri": uri, "run_id": tracker.run_id}
    _write_record(run_dir, record)
    tracker.on_fail(lambda reason: _write_record(run_dir, {**record, "failed": reason}))
    logged = tracker.logged_params()
    params = config_params(cfg)
    tracker.params({k: v for k, v in params.items() if k not in logged})
    changed = {f"resumed.{k}": v for k, v in params.items() if k in logged and logged[k] != v}
    tracker.tags({**(tags if continued else {}), **changed})  # a new run has its tags
    return tracker


def rank_tracker(cfg: TrainConfig, world: World, backbone_sha: str) -> Tracker | NullTracker:
    """Rank 0's handle on the run's MLflow run (other ranks, and a run not tracked or no
    longer tracked: a NullTracker); tags the backbone's identity."""
    if not world.is_main or cfg.run.mlflow is None:
        return NullTracker()
    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    record = read_record(run_dir)
    if record.get("uri") != cfg.run.mlflow or not record.get("run_id") or "failed" in record:
        return NullTracker()
    # A worker's stderr reaches the driver's console through Ray.
    tracker = Tracker(cfg.run.mlflow, record["run_id"], WHAT)
    tracker.on_fail(lambda reason: _write_record(run_dir, {**record, "failed": reason}))
    tracker.tags({"backbone.weights": cfg.model.weights, "backbone.sha256": backbone_sha})
    return tracker


def step_metrics(losses: list[float], lr: float) -> dict[str, float]:
    """The mean loss terms of the steps since the last read, and the learning rate."""
    loss, cross_entropy, penalty = losses
    return {"loss": loss, "cross_entropy": cross_entropy, "meta_penalty": penalty, "lr": lr}


def epoch_metrics(record: dict, data_wait_share: float) -> dict[str, float | None]:
    """An epoch's record (`RankTrainer.validate`) as metrics."""
    per_dataset = record.get("val_accuracy_per_dataset") or {}
    return {
        "epoch": record["epoch"],
        "epoch_loss": record["loss"],
        "epoch_cross_entropy": record["cross_entropy"],
        "epoch_meta_penalty": record["meta_penalty"],
        "val_accuracy": record["val_accuracy"],
        **{f"val_accuracy/{name}": acc for name, acc in per_dataset.items()},
        "samples_per_second": record["samples_per_second"],
        "epoch_seconds": record["epoch_seconds"],
        "data_wait_share": data_wait_share,
    }


def finish_run(
    tracker: Tracker | NullTracker,
    cfg: TrainConfig,
    metrics: dict,
    files: dict[str, bytes],
) -> None:
    """The driver, after training: the test accuracy at the last step, the fingerprint, the
    run's files (`files`, and RUN/report's PNGs under `report/`); the run FINISHED. Silent
    when rank 0 found the server gone (RUN/mlflow.json says so)."""
    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    if not isinstance(tracker, Tracker) or "failed" in read_record(run_dir):
        return
    per_dataset = metrics.get("test_accuracy_per_dataset") or {}
    tracker.metrics(
        {
            "test_accuracy": metrics.get("test_accuracy"),
            **{f"test_accuracy/{name}": acc for name, acc in per_dataset.items()},
        },
        step=int(metrics.get("step") or 0),
    )
    tracker.tags({"fingerprint": metrics.get("fingerprint")})
    tracker.artifacts(files)
    tracker.artifacts(_report_pngs(run_dir), "report")
    tracker.end("FINISHED")


def status_of(error: BaseException) -> str:
    """The MLflow status of a run that `error` ended: KILLED by Ctrl-C, else FAILED."""
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def end_run(tracker: Tracker | NullTracker, cfg: TrainConfig, status: str) -> None:
    """The driver, when training did not finish: the run FAILED or KILLED (silent when rank
    0 found the server gone)."""
    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    if isinstance(tracker, Tracker) and "failed" not in read_record(run_dir):
        tracker.end(status)


def _report_pngs(run_dir: str) -> dict[str, bytes]:
    from training.run.evaluate import REPORT_DIR

    report = storage.join(run_dir, REPORT_DIR)
    try:
        names = [n for n in storage.list_dir(report) if n.endswith(".png")]
        return {n: storage.read_bytes(storage.join(report, n)) for n in names}
    except Exception:  # noqa: BLE001  (no report: its own warning said so)
        return {}


def read_record(run_dir: str) -> dict:
    try:
        record = json.loads(storage.read_bytes(storage.join(run_dir, MLFLOW_FILE)))
    except Exception:  # noqa: BLE001  (none, or unreadable: a new MLflow run)
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(run_dir: str, record: dict) -> None:
    storage.write_bytes(
        storage.join(run_dir, MLFLOW_FILE), (json.dumps(record, indent=2) + "\n").encode()
    )
