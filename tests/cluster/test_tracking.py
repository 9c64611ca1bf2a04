"""MLflow tracking as any process does it (`cluster.tracking`), against a real tracking server:
a wrong URI or a missing client is one line before any work, a process that starts again
does not log a step twice, and a server that does not answer is one warning, then silence."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from free_ports import free_port

from cluster.errors import UserError
from cluster.tracking import INSTALL, NullTracker, Tracker, create_run, resolve_uri
from training.cli.main import main


def test_a_uri_is_checked_before_any_work(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_uri(None) == "http://tracking:5000"
    assert resolve_uri(str(tmp_path / "mlruns")) == (tmp_path / "mlruns").as_uri()
    with pytest.raises(UserError, match="not a tracking URI MLflow takes"):
        resolve_uri("ftp://user:secret@tracking/")
    # A password in the URI would be kept in the run's config and MLflow's parameters.
    with pytest.raises(UserError, match="MLFLOW_TRACKING_USERNAME") as e:
        resolve_uri("https://me:hunter2@tracking:5000")
    assert "hunter2" not in str(e.value)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(UserError) as e:
        resolve_uri("http://tracking:5000")
    assert str(e.value) == f"--mlflow http://tracking:5000 needs the MLflow client: {INSTALL}"

    # On the command line: one line and exit status 2, before Ray starts or a file is written.
    runs, dst = tmp_path / "runs", tmp_path / "shards"
    train = ["train", "--data", str(dst), "--storage", str(runs), "--name", "n"]
    assert main([*train, "--mlflow", "http://127.0.0.1:5000"]) == 2
    assert main(["prep", str(tmp_path), str(dst), "--mlflow", "ftp://user:secret@h/"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"metatrainer train: error: --mlflow http://127.0.0.1:5000 needs the MLflow client: "
        f"{INSTALL}",
        "metatrainer prep: error: --mlflow 'ftp://***@h/': not a tracking URI MLflow takes; "
        "give http(s)://HOST:PORT of a tracking server, a file: URI or a local directory",
    ]
    assert not runs.exists() and not dst.exists()


def test_a_process_started_again_logs_only_later_steps(mlflow_server) -> None:
    """A worker restarted from a checkpoint logs steps it logged before the fault again: the
    run keeps the first point of each step."""
    first = create_run(mlflow_server.uri, "restarts", "r", "training")
    assert isinstance(first, Tracker)
    for step in (10, 20, 30):
        first.metrics({"loss": step, "val_accuracy": None}, step)
    again = Tracker(mlflow_server.uri, first.run_id, "training")
    for step in (20, 30, 40):
        again.metrics({"loss": -step, "epoch": 1.0}, step)
    client = mlflow_server.client()
    loss = [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")]
    assert sorted(loss) == [(10, 10), (20, 20), (30, 30), (40, -40)]
    assert [m.step for m in client.get_metric_history(first.run_id, "epoch")] == [20, 30, 40]
    assert "val_accuracy" not in client.get_run(first.run_id).data.metrics


def test_a_server_that_does_not_answer_is_one_warning() -> None:
    """Nothing listens: the first call warns, in one line, and calls `on_fail`; no later call
    tries again (each would wait for the server's timeouts)."""
    lines, failures = [], []
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    tracker = Tracker(uri, "0123", "training", lines.append)
    tracker.on_fail(failures.append)
    for step in range(5):
        tracker.metrics({"loss": 1.0}, step)
    tracker.params({"lr": 0.1})
    tracker.artifacts({"result.json": b"{}"})
    tracker.end("FINISHED")
    assert time.monotonic() - started < 30
    assert len(lines) == 1 and len(failures) == 1, lines
    assert lines[0].startswith(f"warning: MLflow at {uri} did not answer or refused (")
    assert lines[0].endswith("; this training is not tracked from here on")
    assert "\n" not in lines[0]
    assert isinstance(create_run(uri, "e", "n", "prep", warn=lines.append), NullTracker)
    assert len(lines) == 2 and lines[1].endswith("this prep is not tracked from here on")


def test_a_local_directory_is_tracked_without_a_server(tmp_path: Path) -> None:
    """MLflow 3 refuses its file store unless asked: a directory given is the asking."""
    uri = resolve_uri(str(tmp_path / "mlruns"))
    tracker = create_run(uri, "local", "r", "training")
    assert isinstance(tracker, Tracker)
    tracker.metrics({"loss": 1.0}, 3)
    Tracker(uri, tracker.run_id, "training").metrics({"loss": 2.0}, 4)
    tracker.end("FINISHED")
    history = tracker.client().get_metric_history(tracker.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(3, 1.0), (4, 2.0)]
