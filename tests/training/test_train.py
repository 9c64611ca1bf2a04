"""End to end on a real local Ray cluster: 2 DDP workers on CPU, real digit scans."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from free_ports import free_port
from prometheus_client.parser import text_string_to_metric_families

from cluster.errors import UserError
from training.cli.main import main
from training.model.checkpoint import STATE_FILE
from training.run import progress
from training.run.driver import run_training
from training.run.evaluate import evaluate_checkpoint
from training.run.resume import CHECKPOINT_NAME


def samples_trained(port: int) -> float | None:
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read()
    except OSError:
        return None
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("metatrainer_step_seconds", "metatrainer_loss", "metatrainer_epoch"):
        assert name in families, name
    total = [
        s.value
        for s in families["metatrainer_samples_trained"].samples
        if s.name.endswith("_total")
    ]
    return sum(total) if total else None


def test_training_learns_serves_metrics_and_resumes(shards, small_config, tmp_path, capfd):
    port = free_port(2)  # base port + local rank

    def config(**overrides):
        return small_config(
            shards,
            tmp_path,
            # The image path (the other Ray runs mostly train from cached features); 3 epoch
            # checkpoints written, 2 kept.
            **{"name": "digits", "batch_size": 8, "epochs": 3, "feature_cache": "off",
               "keep_checkpoints": 2, **overrides},
        )  # fmt: skip

    cfg = config(metrics_port=port)
    outcome: dict = {}
    terminal = Terminal()
    worker = threading.Thread(
        target=lambda: outcome.update(first=run_training(cfg, progress_stream=terminal))
    )
    worker.start()
    seen: dict[int, list[float]] = {port: [], port + 1: []}
    while worker.is_alive():
        for p, values in seen.items():
            value = samples_trained(p)
            if value is not None:
                values.append(value)
        time.sleep(0.2)
    worker.join()
    first = outcome["first"]

    # On a terminal, a live line: epochs and steps counting up, a rate, an ETA, the loss.
    lines = [w.strip("\x1b[K\r") for w in terminal.writes]
    assert terminal.writes[-1] == "\x1b[K"  # cleared at the end
    drawn = [line for line in lines if line]
    assert len(set(drawn)) >= 3 and any(line.startswith("epoch 3/3 · step ") for line in drawn)
    assert all(" samples/s" in line for line in drawn), drawn
    assert any(" · ETA 0:" in line and " · loss " in line for line in drawn), drawn

    # Both local ranks served /metrics on base port + local rank, with growing counters.
    for p, values in seen.items():
        assert len(values) >= 2 and values[-1] > values[0], (p, values)

    result = json.loads(Path(first.result_file).read_text())
    losses = [e["loss"] for e in result["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result["test_accuracy"] > 0.25, "10 classes: chance is 0.1"
    assert result["config"]["cluster"]["workers"] == 2 and len(result["fingerprint"]) == 64
    # --keep-checkpoints 2: of the 3 epochs' checkpoints, the oldest is gone.
    steps = result["step"] // 3  # an epoch's
    assert checkpoint_steps(first.run_dir) == [2 * steps, 3 * steps]

    # The same name again with more epochs resumes after the latest checkpoint.
    capfd.readouterr()
    second = run_training(config(epochs=4))
    out = capfd.readouterr().out
    assert f"resuming digits at epoch 4, sample 0 (step {3 * steps})" in out
    assert "epoch 1/4" not in out
    resumed = json.loads(Path(second.result_file).read_text())
    assert resumed["history"][:3] == result["history"]
    assert len(resumed["history"]) == 4
    assert resumed["step"] == result["step"] * 4 // 3
    assert checkpoint_steps(second.run_dir) == [3 * steps, 4 * steps]

    # evaluate, without Ray, agrees with the test accuracy training reported.
    [(_, accuracy, n)] = evaluate_checkpoint(second.run_dir, loader_workers=0)
    assert accuracy == pytest.approx(resumed["test_accuracy"])
    assert n > 0


def checkpoint_steps(run_dir: str) -> list[int]:
    """The steps of the checkpoint directories in the run (checkpoint_<step>_<ms>), each
    checked to hold its state."""
    names = [p.name for p in Path(run_dir).iterdir() if CHECKPOINT_NAME.fullmatch(p.name)]
    assert all((Path(run_dir) / n / STATE_FILE).is_file() for n in names), names
    return sorted(int(n.split("_")[1]) for n in names)


class Terminal(io.StringIO):
    """A stream that says it is a terminal, keeping each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)


def test_the_progress_line_only_on_a_terminal():
    assert progress.start(io.StringIO()) == (None, {})  # a log file or pipe: nothing started
    state = dict(epoch=2, epochs=3, step=10, steps=40, samples=640, seconds=5.0, loss=0.71234)
    assert progress.render(state) == (
        "epoch 2/3 · step 10/40 · 128 samples/s · ETA 0:15 · loss 0.7123"
    )
    assert "loss" not in progress.render({**state, "loss": None})


def test_train_errors_are_one_line(tmp_path, capsys, shards):
    code = main(
        ["train", "--data", str(tmp_path / "nothing"), "--storage", str(tmp_path), "--name", "x"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "metatrainer prep" in err

    code = main(
        [
            "train",
            "--data",
            shards,
            "--storage",
            str(tmp_path),
            "--name",
            "x",
            "--batch-size",
            "100000",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--batch-size" in err

    base = ["train", "--data", shards, "--storage", str(tmp_path), "--name", "x"]
    for flags, hint in [
        (["--batch-size", "8", "--global-batch", "16"], "--global-batch (over all workers), not"),
        (["--global-batch", "0"], "--global-batch must be at least 1"),
        (["--global-batch", "100000"], "fewer than --global-batch 100000; lower --global-batch"),
        (["--global-batch", "1", "--data", shards], "--global-batch 1 is shared by 2 datasets"),
        (["--decode", "gpu"], "--gpus-per-worker"),
        (["--feature-cache", "on", "--adapters", "layer4"], "--no-augment"),
    ]:
        code = main([*base, *flags])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and hint in err, err

    code = main(["evaluate", "--checkpoint", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no checkpoint" in err


def test_any_worker_count_or_range_serves_any_partitions(tmp_path, shards):
    from training.cli.main import build_parser
    from training.cli.train import config_from_args
    from training.run.driver import check_workers

    base = ["train", "--data", shards, "--storage", str(tmp_path), "--name", "x"]
    for flags in (["--workers", "3", "--loader-workers", "2", "--partitions", "16"],
                  ["--workers", "4-8", "--loader-workers", "3", "--partitions", "2"]):  # fmt: skip
        cfg = config_from_args(build_parser().parse_args([*base, *flags]))
        check_workers(cfg)
    cfg.cluster.min_workers = 9
    with pytest.raises(UserError, match="--workers needs 1 <= MIN <= MAX, not 9-8"):
        check_workers(cfg)


def test_relative_paths_adapters_two_datasets_and_augmentation_through_the_driver(
    shards, small_config, tmp_path, monkeypatch
):
    """As a user types it: relative --weights and --data (two datasets in folders of the same
    name), adapters, augmentation on; the workers run elsewhere, in another directory."""
    import shutil

    import torch
    from torchvision.models import resnet50

    for parent in ("a", "b"):
        shutil.copytree(shards, tmp_path / parent / "digits")
    torch.manual_seed(0)
    torch.save(resnet50(weights=None).state_dict(), tmp_path / "w.pth")
    monkeypatch.chdir(tmp_path)
    cfg = small_config("a/digits", "runs", weights="w.pth", adapters=["layer4"], augment=True,
                       epochs=1, batch_size=8, name="rel")  # fmt: skip
    cfg.data.datasets.append("b/digits")
    outcome = run_training(cfg)
    result = json.loads(Path(outcome.result_file).read_text())
    assert result["config"]["model"]["weights"] == str(tmp_path / "w.pth")
    assert result["config"]["data"]["datasets"] == [
        str(tmp_path / "a/digits"),
        str(tmp_path / "b/digits"),
    ]
    assert set(result["test_accuracy_per_dataset"]) == {"a/digits", "b/digits"}
    assert result["feature_cache"] is False  # adapters and augmentation: the image path


def test_dataset_labels_are_distinct():
    from training.run.loop import dataset_labels

    assert dataset_labels(["/x/a/flowers", "/y/b/flowers", "/z/c/digits"]) == [
        "a/flowers",
        "b/flowers",
        "c/digits",
    ]
    assert dataset_labels(["s3://bucket/ds/flowers", "/data/digits"]) == ["flowers", "digits"]
    assert len(set(dataset_labels(["/d/x", "/d/x"]))) == 2


RAY_ACTORS = ("(TrainController pid=", "(PlacementGroupCleaner pid=")


def train_workers_started() -> int:
    """Ray Train worker actors this Ray cluster has started so far, alive or dead: one per
    worker of each worker group (a restart starts a new group)."""
    from ray.util.state import list_actors

    actors = list_actors(
        filters=[("class_name", "=", "RayTrainWorker")],
        limit=10_000,
        raise_on_missing_output=False,
    )
    return len(actors)


def test_an_error_in_a_worker_is_one_line(shards, ray_cluster, tmp_path):
    """A UserError raised in a training worker's data path (here: a label the manifest's class
    list does not have, found by the rank's reader thread) reads as the driver's one line, exit
    status 2, at its first occurrence: the worker group is not restarted --max-failures times
    for a mistake a restart cannot fix. --debug adds the tracebacks."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in Path(shards).iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["classes"] = manifest["classes"][:3]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    command = [
        str(Path(sys.executable).parent / "metatrainer"), "train", "--data", str(bad),
        "--storage", str(tmp_path / "runs"), "--weights", "none", "--image-size", "32",
        "--workers", "2", "--loader-workers", "1", "--max-failures", "3", "--metrics-port", "0",
        "--address", ray_cluster.get_runtime_context().gcs_address,
    ]  # fmt: skip
    before = train_workers_started()
    quiet = subprocess.run([*command, "--name", "quiet"], capture_output=True, text=True)
    assert train_workers_started() - before == 2  # one worker group, never restarted
    expected = f"metatrainer train: error: training failed: {bad}: a label is outside"
    assert quiet.returncode == 2
    # Ray Train's own controller actors may log a traceback of their own when Ray's services
    # are slow to answer on a loaded machine ("safe to ignore", streamed to the driver like all
    # logs): what is checked here is what metatrainer and its workers print.
    ours = "\n".join(
        line for line in quiet.stderr.splitlines() if not any(a in line for a in RAY_ACTORS)
    )
    assert "Traceback" not in ours and "UserError" not in ours, quiet.stderr
    assert [line for line in ours.splitlines() if "error: " in line] == [
        ours.strip().splitlines()[-1]
    ]
    assert ours.strip().splitlines()[-1].startswith(expected), quiet.stderr

    debug_argv = [*command, "--name", "debug", "--debug"]
    debug = subprocess.run(debug_argv, capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
    # The workers' tracebacks stream in as they come: the other rank's may follow the line.
    assert any(line.startswith(expected) for line in debug.stderr.splitlines()), debug.stderr
