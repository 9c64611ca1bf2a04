"""`metatrainer tune`'s table of trials: a row per trial from Tune's results, as
RUNS/NAME/trials.csv and on the terminal."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from cluster import storage
from cluster.errors import one_line
from training.cli.search_space import SEARCHED

METRIC = "val_accuracy"
"""What a trial is ranked by, reported every epoch."""


@dataclass
class TrialRow:
    trial: str
    values: dict[str, Any]
    best_val_accuracy: float | None
    epochs: int
    status: str
    run_dir: str
    error: str = ""


@dataclass
class TuneOutcome:
    rows: list[TrialRow]
    table_file: str
    best: TrialRow | None
    mlflow: str | None = None
    """The search's MLflow run (its page in the UI), with --mlflow."""


def trial_row(result, statuses: dict[str, str], run_dir: str, epochs: int) -> TrialRow:
    """A trial's row. Its status: TERMINATED (trained every epoch), STOPPED (by ASHA),
    ERROR, or Tune's (PENDING, RUNNING, PAUSED) when the search was interrupted."""
    trial = result.path.rstrip("/").rsplit("/", 1)[-1]
    config = result.config or {}
    values = {key: config.get(key) for key in SEARCHED}
    frame = result.metrics_dataframe
    best, done_epochs = None, 0
    if frame is not None and METRIC in frame and len(frame):
        best = float(frame[METRIC].max())
        done_epochs = int(frame["epoch"].max())
    status = "ERROR" if result.error is not None else statuses.get(trial, "PENDING")
    if status == "TERMINATED" and done_epochs < epochs:
        status = "STOPPED"
    error = "" if result.error is None else _error_line(result.error)
    return TrialRow(trial, values, best, done_epochs, status, storage.join(run_dir, trial), error)


def _error_line(error: BaseException) -> str:
    """The line of a trial's failure: Tune hands back Ray's wrapper (a traceback as its
    message) of what run_training raised, which is its `cause`."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    return one_line(error) or (str(error).strip().splitlines() or [type(error).__name__])[-1]


COLUMNS = ["trial", *SEARCHED, "best_val_accuracy", "epochs", "status", "run_dir", "error"]


def table_csv(rows: list[TrialRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        acc = "" if r.best_val_accuracy is None else f"{r.best_val_accuracy:.4f}"
        values = [r.values[k] for k in SEARCHED]
        writer.writerow([r.trial, *values, acc, r.epochs, r.status, r.run_dir, r.error])
    return out.getvalue()


def print_table(outcome: TuneOutcome) -> None:
    header = f"{'trial':<13} {'lr':>10} {'meta_lambda':>11} {'adapters':<16} {'batch':>5} "
    print()
    print(header + f"{'best val_acc':>12} {'epochs':>6}  status")
    for r in outcome.rows:
        v = r.values
        acc = "n/a" if r.best_val_accuracy is None else f"{r.best_val_accuracy:.4f}"
        batch = "-" if v["batch_size"] is None else v["batch_size"]  # --global-batch
        print(
            f"{r.trial:<13} {v['lr']:>10.3g} {v['meta_lambda']:>11.3g} {v['adapters']!s:<16} "
            f"{batch!s:>5} {acc:>12} {r.epochs:>6}  {r.status}"
            + (f"  {r.error}" if r.error else "")
        )
    print()
    print(f"trials          {outcome.table_file}")
    if outcome.best:
        acc = outcome.best.best_val_accuracy or 0.0
        print(f"best trial      {outcome.best.trial} (val accuracy {acc:.4f})")
        print(f"best run        {outcome.best.run_dir}")
    else:
        print("best run        none yet (no trial has finished an epoch)")
    if outcome.mlflow:
        print(f"mlflow          {outcome.mlflow}")
