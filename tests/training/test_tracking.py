"""What the driver and rank 0 do with a training run's MLflow run (`training.run.tracking`),
without Ray: a resume continues the run and records a changed setting as a tag; only rank 0
tracks; a server found gone is one warning, after which the run's other processes keep quiet
(RUN/mlflow.json says so)."""

from __future__ import annotations

import json
from pathlib import Path

from free_ports import free_port

from cluster.tracking import NullTracker, Tracker, resolve_uri
from cluster.world import World
from training.config import TrainConfig
from training.run.tracking import MLFLOW_FILE, end_run, rank_tracker, start_run


def test_a_resume_continues_the_run_and_only_rank_0_tracks(tmp_path: Path) -> None:
    uri = resolve_uri(str(tmp_path / "mlruns"))  # MLflow's file store: no server needed
    cfg = TrainConfig.of(data=["/d/digits"], storage=str(tmp_path / "runs"), name="r", mlflow=uri)
    first = start_run(cfg, {"manifest_sha256/digits": "ab" * 32})
    assert isinstance(first, Tracker)
    assert isinstance(rank_tracker(cfg, World(rank=1, world_size=2), "f" * 64), NullTracker)
    rank0 = rank_tracker(cfg, World(rank=0, world_size=2), "f" * 64)
    assert isinstance(rank0, Tracker) and rank0.run_id == first.run_id
    rank0.metrics({"loss": 1.0}, 5)

    again = start_run(cfg.replace(epochs=30), {})
    assert again.run_id == first.run_id
    run = again.client().get_run(first.run_id)
    assert run.data.params["optim.epochs"] == "20" and run.data.params["run.name"] == "r"
    assert json.loads(run.data.params["data.datasets"]) == ["/d/digits"]
    assert run.data.tags["resumed.optim.epochs"] == "30"
    assert run.data.tags["backbone.sha256"] == "f" * 64
    assert run.data.tags["manifest_sha256/digits"] == "ab" * 32
    assert run.info.status == "RUNNING"
    # Another tracking URI: a new run there.
    elsewhere = start_run(cfg.replace(mlflow=resolve_uri(str(tmp_path / "other"))), {})
    assert isinstance(elsewhere, Tracker) and elsewhere.run_id != first.run_id


def test_a_server_found_gone_is_one_warning_for_the_whole_run(tmp_path: Path, capsys) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    cfg = TrainConfig.of(data=["/d"], storage=str(tmp_path / "runs"), name="r", mlflow=down)
    record = tmp_path / "runs/r" / MLFLOW_FILE
    # At the start: the driver warns; no rank tracks.
    assert isinstance(start_run(cfg, {}), NullTracker)
    assert json.loads(record.read_text())["failed"]
    assert isinstance(rank_tracker(cfg, World(), "f" * 64), NullTracker)
    assert capsys.readouterr().err.count("warning: MLflow") == 1

    # Mid-run: rank 0 warns and marks the run; the driver's end is silent.
    record.write_text(json.dumps({"uri": down, "run_id": "0123"}))
    rank0 = rank_tracker(cfg, World(), "f" * 64)
    assert isinstance(rank0, Tracker) and rank0.failed
    assert json.loads(record.read_text())["run_id"] == "0123"
    driver_lines: list[str] = []
    end_run(Tracker(down, "0123", "training", driver_lines.append), cfg, "FAILED")
    assert driver_lines == []
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: MLflow at {down} did not answer")
