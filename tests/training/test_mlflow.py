"""`metatrainer train --mlflow URI` against a real tracking server (`training.run.tracking`):
a training run is one MLflow run, continued by a resume (a worker killed in it) without a step
logged twice; a server that stops mid-run costs one warning line and no training; without
--mlflow, mlflow is never imported."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from mlflow_support import MlflowServer
from train_workers import worker_pids

from training.run.driver import run_training
from training.run.tracking import MLFLOW_FILE


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_run_is_one_mlflow_run_and_its_resume_continues_it(
    shards, small_config, mlflow_server, tmp_path: Path, capfd
) -> None:
    cfg = small_config(
        shards, tmp_path / "runs", name="tracked", epochs=2, log_every=2,
        mlflow=mlflow_server.uri, mlflow_experiment="train",
    )  # fmt: skip
    outcome = run_training(cfg)
    result = json.loads(Path(outcome.result_file).read_text())
    [run] = mlflow_server.runs("train")
    run_id, client = run.info.run_id, mlflow_server.client()
    assert (run.info.run_name, run.info.status) == ("tracked", "FINISHED")
    page = f"{mlflow_server.uri}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    assert outcome.mlflow == page
    assert json.loads((tmp_path / "runs/tracked" / MLFLOW_FILE).read_text())["run_id"] == run_id

    params = run.data.params
    assert params["optim.epochs"] == "2" and params["data.image_size"] == "32"
    assert json.loads(params["data.datasets"]) == [shards] and params["run.name"] == "tracked"
    tags = run.data.tags
    label = Path(shards).name
    manifest = hashlib.sha256((Path(shards) / "manifest.json").read_bytes()).hexdigest()
    assert tags[f"manifest_sha256/{label}"] == manifest
    assert tags["fingerprint"] == result["fingerprint"]
    assert tags["backbone.weights"] == "none" and len(tags["backbone.sha256"]) == 64
    assert tags["ray.job_id"]

    # An epoch's results at its last step; the loss terms every --log-every steps.
    val = _history(client, run_id, "val_accuracy")
    assert [v for _, v in val] == [r["val_accuracy"] for r in result["history"]]
    assert _history(client, run_id, f"val_accuracy/{label}") == val
    assert val[0][0] < val[1][0] == result["step"]
    test = _history(client, run_id, "test_accuracy")
    assert test == [(result["step"], result["test_accuracy"])]
    loss = {s for s, _ in _history(client, run_id, "loss")}
    assert set(range(2, result["step"] + 1, 2)) | {val[0][0], result["step"]} == loss
    for key in ("data_wait_share", "samples_per_second", "epoch_loss", "lr"):
        assert key in run.data.metrics
    assert 0 <= run.data.metrics["data_wait_share"] <= 1
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts == {"result.json", "config.toml", "report"}
    pngs = {a.path for a in client.list_artifacts(run_id, "report")}
    assert pngs and all(p.endswith(".png") for p in pngs)

    # The same --storage and --name, trained on (a resume), with a worker killed in its
    # epoch: Ray restarts the group from its last checkpoint, and rank 0 trains steps it
    # logged again. One MLflow run, each step once.
    done: dict = {}
    # The image path (no feature cache) makes an epoch last long enough to kill a worker in.
    again = cfg.replace(epochs=4, max_failures=2, checkpoint_every_steps=4, feature_cache="off")
    capfd.readouterr()
    run = threading.Thread(target=lambda: done.update(outcome=run_training(again)))
    run.start()
    killed, deadline = False, time.monotonic() + 300
    while run.is_alive() and time.monotonic() < deadline and not killed:
        logged = [s for s, _ in _history(client, run_id, "loss")]
        pids = worker_pids() if max(logged) > result["step"] else []  # in epoch 3
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    run.join()
    assert killed, "the resume finished before the kill"
    out, err = capfd.readouterr()
    # The resume, then the restart after the kill, each from a checkpoint.
    assert len(re.findall(r"resuming tracked at epoch \d+", out + err)) >= 2, out + err
    resumed = json.loads(Path(done["outcome"].result_file).read_text())
    [tracked] = mlflow_server.runs("train")
    assert tracked.info.run_id == run_id and tracked.info.status == "FINISHED"
    val = _history(client, run_id, "val_accuracy")
    assert [v for _, v in val] == [r["val_accuracy"] for r in resumed["history"]]
    assert len(val) == 4
    assert tracked.data.params["optim.epochs"] == "2"
    assert tracked.data.tags["resumed.optim.epochs"] == "4"
    for key in tracked.data.metrics:
        steps = [s for s, _ in _history(client, run_id, key)]
        assert len(steps) == len(set(steps)), key
    loss = {s for s, _ in _history(client, run_id, "loss")}
    assert set(range(2, resumed["step"] + 1, 2)) <= loss


def test_a_server_that_stops_mid_run_is_one_warning(
    shards, small_config, tmp_path: Path, capfd
) -> None:
    """The server is stopped as soon as the run exists in it: whoever calls it next (rank 0,
    or the driver) warns once, the others stay quiet, and the training finishes."""
    server = MlflowServer(tmp_path / "mlflow")
    stopped = threading.Event()

    def stop_once_the_run_exists() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not server.runs("down"):
            time.sleep(0.2)
        server.stop()
        stopped.set()

    watcher = threading.Thread(target=stop_once_the_run_exists, daemon=True)
    watcher.start()
    try:
        cfg = small_config(
            shards, tmp_path / "runs", name="down", epochs=1, log_every=1,
            mlflow=server.uri, mlflow_experiment="down",
        )  # fmt: skip
        outcome = run_training(cfg)
    finally:
        stopped.wait(130)
        server.stop()
    assert outcome.metrics["test_accuracy"] is not None
    assert "failed" in json.loads((tmp_path / "runs/down" / MLFLOW_FILE).read_text())
    seen, deadline = "", time.monotonic() + 10  # a worker's line comes through Ray's log monitor
    while time.monotonic() < deadline and "warning: MLflow" not in seen:
        out, err = capfd.readouterr()
        seen += out + err
        time.sleep(0.5)
    time.sleep(2)
    out, err = capfd.readouterr()
    warnings = [line for line in (seen + out + err).splitlines() if "warning: MLflow" in line]
    assert len(warnings) == 1, warnings
    assert f"MLflow at {server.uri} did not answer or refused" in warnings[0]


def test_without_mlflow_it_is_never_imported(
    shards, small_config, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)  # put back afterwards, for the other tests
    outcome = run_training(small_config(shards, tmp_path / "runs", name="plain", epochs=1))
    assert outcome.mlflow is None
    assert not (tmp_path / "runs/plain" / MLFLOW_FILE).exists()
    assert not [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]
