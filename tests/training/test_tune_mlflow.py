"""`metatrainer tune --mlflow URI` against a real tracking server: the search is a parent run,
each trial a child run of it with its status and ASHA's decision, the best one tagged."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from training.cli.main import main
from training.run.tracking import MLFLOW_FILE


def test_a_search_is_a_parent_run_with_a_child_per_trial(
    shards, mlflow_server, tmp_path: Path, capsys
) -> None:
    args = [
        "tune", "--data", shards, "--storage", str(tmp_path), "--name", "sweep",
        "--trials", "2", "--max-concurrent", "2", "--epochs", "2",
        "--lr", "loguniform:1e-3:1e-1", "--batch-size", "choice:16,32",
        "--weights", "none", "--image-size", "32", "--no-augment", "--workers", "1",
        "--loader-workers", "0", "--metrics-port", "0", "--max-failures", "0",
        "--mlflow", mlflow_server.uri, "--mlflow-experiment", "tune",
    ]  # fmt: skip
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "warning: MLflow" not in err
    with open(tmp_path / "sweep" / "trials.csv", newline="") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    runs = mlflow_server.runs("tune")
    [parent] = [r for r in runs if r.info.run_name == "sweep"]
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert len(runs) == 3 and set(children) == set(rows)
    parent_id = parent.info.run_id
    assert json.loads((tmp_path / "sweep" / MLFLOW_FILE).read_text())["run_id"] == parent_id
    assert f"mlflow          {mlflow_server.uri}/#/experiments/" in out

    # The search: its specs as parameters, the best trial tagged, its files as artifacts.
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.lr"] == "loguniform:1e-3:1e-1"
    assert parent.data.params["search.trials"] == "2"
    best = max(rows.values(), key=lambda r: float(r["best_val_accuracy"]))
    assert parent.data.tags["best_trial"] == best["trial"]
    assert parent.data.tags["best_run_id"] == children[best["trial"]].info.run_id
    best_acc = parent.data.metrics["best_val_accuracy"]
    assert best_acc == pytest.approx(float(best["best_val_accuracy"]), abs=5e-5)  # csv: .4f
    client = mlflow_server.client()
    assert {a.path for a in client.list_artifacts(parent_id)} == {"trials.csv", "tune.json"}

    # Each trial: a child of the search, with its values, status and ASHA's decision.
    for trial, row in rows.items():
        child = children[trial]
        tags, params = child.data.tags, child.data.params
        assert tags["mlflow.parentRunId"] == parent_id
        assert tags["tune.status"] == row["status"]
        assert tags["tune.best"] == ("true" if trial == best["trial"] else "false")
        assert float(params["optim.lr"]) == float(row["lr"])
        assert params["optim.batch_size"] == row["batch_size"]
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert len(history) >= int(row["epochs"])
        if row["status"] == "TERMINATED":
            assert tags["asha.decision"] == "kept to the last epoch (2)"
            assert child.info.status == "FINISHED"
            assert "test_accuracy" in child.data.metrics
        else:
            assert row["status"] == "STOPPED", row
            assert tags["asha.decision"] == f"stopped after epoch {row['epochs']} of 2"
            assert child.info.status == "KILLED"
