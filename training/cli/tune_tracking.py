"""`metatrainer tune --mlflow URI`: the search is one MLflow run, each trial a child run of it.

    parent   named after --name: the base config and the searched specs (`search.lr`, ...)
             as parameters; at the end the best validation accuracy, the best trial's name
             and run id as tags, trials.csv and tune.json as artifacts; RUNS/NAME/mlflow.json
             keeps its id, so a restored search continues it
    child    a trial's training run (`training.run.tracking`), named after the trial, with
             the tag `mlflow.parentRunId` (MLflow's UI nests it under the search); at the end
             `tune.status` (TERMINATED, STOPPED, ERROR), `asha.decision`, and `tune.best`
             (true on the best trial only); a trial ASHA stopped is KILLED

Best effort like all tracking: a server that does not answer is one warning, and the search
goes on.
"""

from __future__ import annotations

from typing import Any

from cluster.tracking import NullTracker, Tracker, param_value
from training.cli.tune_table import TrialRow, TuneOutcome
from training.config import TrainConfig
from training.run import tracking

PARENT_TAG = "mlflow.parentRunId"
"""MLflow's own tag for a nested run: its UI shows the trials under the search."""
ENDED = ("TERMINATED", "STOPPED", "ERROR")
"""A trial's statuses once it will train no more (`tune_table.trial_row`)."""


def start_search(cfg: TrainConfig, spec: dict, tags: dict[str, Any]) -> Tracker | NullTracker:
    """The search's MLflow run, created or (a restored search) continued: the base config
    and the searched specs as parameters."""
    tracker = tracking.start_run(cfg, {**tags, "metatrainer.kind": "tune"})
    params = {f"search.{k}": v for k, v in spec["space"].items() if v is not None}
    params |= {
        "search.trials": spec["trials"],
        "search.max_concurrent": spec["max_concurrent"] or "as many as fit",
    }
    logged = tracker.logged_params()
    tracker.params({k: param_value(v) for k, v in params.items() if k not in logged})
    return tracker


def trial_tags(search_dir: str, uri: str | None) -> dict[str, str]:
    """A trial's run is a child of the search's (its id is in RUNS/NAME/mlflow.json); none
    when the search is not tracked."""
    record = tracking.read_record(search_dir)
    if uri is None or record.get("uri") != uri or not record.get("run_id"):
        return {}
    return {PARENT_TAG: record["run_id"], "metatrainer.kind": "trial"}


def asha_decision(row: TrialRow, epochs: int) -> str | None:
    if row.status == "STOPPED":
        return f"stopped after epoch {row.epochs} of {epochs}"
    if row.status == "TERMINATED":
        return f"kept to the last epoch ({epochs})"
    return None


def finish_search(
    tracker: Tracker | NullTracker,
    search_dir: str,
    outcome: TuneOutcome,
    epochs: int,
    files: dict[str, bytes],
) -> None:
    """After the search: each trial's run tagged with its status, ASHA's decision and whether
    it is the best; the search's run with the best trial, its files, FINISHED."""
    if not isinstance(tracker, Tracker) or "failed" in tracking.read_record(search_dir):
        return
    from mlflow.entities import RunTag

    best_run_id = None
    for row in outcome.rows:
        record = tracking.read_record(row.run_dir)
        if record.get("uri") != tracker.uri or not record.get("run_id"):
            continue  # not tracked (its start could not reach the server)
        run_id, is_best = record["run_id"], row is outcome.best
        best_run_id = run_id if is_best else best_run_id
        values = {
            "tune.status": row.status,
            "asha.decision": asha_decision(row, epochs),
            "tune.best": str(is_best).lower(),
        }
        tags = [RunTag(k, v) for k, v in values.items() if v is not None]
        tracker.call(lambda run_id=run_id, tags=tags: tracker.client().log_batch(run_id, tags=tags))
        ended = {"STOPPED": "KILLED", "ERROR": "FAILED"}.get(row.status)
        if ended:  # ASHA's stop ends the trial's process: its run was left RUNNING
            tracker.call(lambda run_id=run_id, e=ended: tracker.client().set_terminated(run_id, e))
    if outcome.best:
        # At the number of trials ended, so that a restored search that ends more logs anew.
        ended = sum(r.status in ENDED for r in outcome.rows)
        tracker.metrics({"best_val_accuracy": outcome.best.best_val_accuracy}, step=ended)
        tracker.tags({"best_trial": outcome.best.trial, "best_run_id": best_run_id})
    tracker.artifacts(files)
    tracker.end("FINISHED" if all(r.status in ENDED for r in outcome.rows) else "KILLED")
