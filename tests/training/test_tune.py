"""`metatrainer tune` on the session's real Ray cluster: 4 tiny trials of 1 CPU worker each."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from sample_log import trained_history

from training.cli.main import main
from training.model.checkpoint import find_checkpoint, load_state
from training.run.evaluate import load_trained

EPOCHS = 4
"""ASHA (reduction factor 4) has rungs at epochs 1 and 4: the last epoch is one."""

SPACE = {
    "--lr": "loguniform:1e-3:1e-1",
    "--meta-lambda": "uniform:0:0.01",
    "--adapters": "choice:none,layer4",
    "--batch-size": "choice:16,32",
}


def tune_args(shards: str, storage: Path, *extra: str) -> list[str]:
    flags = [x for item in SPACE.items() for x in item]
    return [
        "tune", "--data", shards, "--storage", str(storage), "--name", "sweep",
        "--trials", "4", "--max-concurrent", "4", "--epochs", str(EPOCHS), *flags,
        "--weights", "none", "--image-size", "32", "--no-augment", "--workers", "1",
        "--loader-workers", "0", "--metrics-port", "0", "--max-failures", "0", *extra,
    ]  # fmt: skip


def read_table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tune_table_best_run_and_rerun(shards, tmp_path, capsys):
    log = tmp_path / "log"
    args = tune_args(shards, tmp_path, "--sample-log", str(log))
    assert main(args) == 0
    out = capsys.readouterr().out
    table = tmp_path / "sweep" / "trials.csv"
    rows = read_table(table)

    # One row a trial, its values drawn from the space, its status and epochs consistent.
    assert len(rows) == 4 and len({r["trial"] for r in rows}) == 4
    for r in rows:
        assert 1e-3 <= float(r["lr"]) <= 1e-1
        assert 0 <= float(r["meta_lambda"]) <= 0.01
        assert r["adapters"] in ("none", "layer4") and r["batch_size"] in ("16", "32")
        assert r["trial"] in out
    assert any(r["status"] == "TERMINATED" for r in rows), "ASHA lets the leader finish"

    # A trial that reached its last epoch finished: ASHA never stops one there (its rung at
    # the last epoch did, while the trial wrote result.json and its report). One that ASHA
    # stopped early is STOPPED, without them.
    for r in rows:
        run = Path(r["run_dir"])
        finished = (run / "result.json").exists() and any((run / "report").glob("*.png"))
        if r["epochs"] == str(EPOCHS):
            assert r["status"] == "TERMINATED" and finished, r
        else:
            assert r["status"] == "STOPPED" and 1 <= int(r["epochs"]) < EPOCHS, r
            assert not (run / "result.json").exists(), r

    # Each row's accuracy is the best its run reached in the epochs the row counts (the
    # history in its newest checkpoint; a trial that ASHA stopped may have finished another
    # epoch before the stop reached it), and a trial that trained every epoch lowered its
    # training loss.
    for r in rows:
        history = load_state(find_checkpoint(r["run_dir"])).position.history
        assert len(history) >= int(r["epochs"]), r
        reached = max(h["val_accuracy"] for h in history[: int(r["epochs"])])
        assert float(r["best_val_accuracy"]) == pytest.approx(reached, abs=5e-5), r
        if r["status"] == "TERMINATED":
            assert history[-1]["loss"] < history[0]["loss"], (r, history)

    # --sample-log: each trial logs the batches it trained into its own directory.
    assert sorted(p.name for p in log.iterdir()) == sorted(r["trial"] for r in rows)
    for r in rows:
        trained = {epoch for epoch, *_ in trained_history(str(log / r["trial"]))}
        assert trained >= set(range(int(r["epochs"]))), r

    # The best trial's run directory is a run that evaluate and load_trained accept.
    best_line = [line for line in out.splitlines() if line.startswith("best run")]
    best_dir = best_line[0].split()[-1]
    best = max(rows, key=lambda r: float(r["best_val_accuracy"]))
    assert best_dir == best["run_dir"] and Path(best_dir).parent == tmp_path / "sweep"
    # Above chance (10 digits: 0.1). The trials --seed draws train the same every time; of
    # them, the one ASHA never stops reaches 11 of the 67 validation digits (0.164), the
    # others that may finish, depending on when each reports, up to 0.194.
    assert float(best["best_val_accuracy"]) > 0.14, best
    model, cfg, state = load_trained(best_dir)
    assert cfg.optim.lr == pytest.approx(float(best["lr"]))
    assert cfg.optim.batch_size == int(best["batch_size"])
    assert ("+".join(cfg.model.adapters) or "none") == best["adapters"]
    assert state.position.epoch == int(best["epochs"])
    assert main(["evaluate", "--checkpoint", best_dir, "--loader-workers", "0"]) == 0
    capsys.readouterr()

    # The same command again restores the search: nothing is trained again. Its search
    # specs are compared by value: loguniform:0.001:0.1 is the search's loguniform:1e-3:1e-1.
    checkpoints = sorted((tmp_path / "sweep").glob("*/checkpoint_*"))
    assert main([*args, "--lr", "loguniform:0.001:0.1"]) == 0
    out = capsys.readouterr().out
    assert "restoring the search" in out
    assert read_table(table) == rows
    assert sorted((tmp_path / "sweep").glob("*/checkpoint_*")) == checkpoints

    # Other flags under the same name: one line, no training.
    assert main([*args, "--trials", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--trials 4, now 5" in err and "--name" in err
    # Ray restores a search with the trial limit it started with: a new one is refused.
    assert main([*args, "--max-concurrent", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-concurrent 2" in err and "(4)" in err, err
    assert read_table(table) == rows


def test_every_batch_size_choice_is_checked_before_ray(shards, tmp_path, capsys):
    # Two datasets share a batch: the choice 1 cannot, though the largest, 16, can.
    args = tune_args(shards, tmp_path, "--data", shards, "--batch-size", "choice:16,1")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--batch-size 1 " in err, err
    assert not (tmp_path / "sweep" / "tune").exists()


def test_a_global_batch_is_fixed_for_every_trial_and_checked_before_ray(shards, tmp_path, capsys):
    """--global-batch replaces the searched --batch-size: both given is one line, and so is a
    global batch larger than the train split, before Ray starts."""
    args = tune_args(shards, tmp_path, "--global-batch", "16")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "or --global-batch" in err and "not both" in err, err
    i = args.index("--batch-size")
    del args[i : i + 2]
    assert main([*args, "--global-batch", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fewer than --global-batch 100000" in err, err
    assert not (tmp_path / "sweep" / "tune").exists()


@pytest.mark.parametrize(
    "flag, spec, hint",
    [
        ("--lr", "loguniform:0:1", "LOW > 0"),
        ("--lr", "uniform:1e-3", "LOW:HIGH"),
        ("--lr", "normal:0:1", "choice:A,B"),
        ("--meta-lambda", "choice:", "at least one value"),
        ("--batch-size", "uniform:8:32", "choice:A,B"),
        ("--batch-size", "choice:16,x", "whole number"),
        ("--adapters", "choice:none,layer5", "layer3+layer4"),
    ],
)
def test_bad_search_specs_are_one_line(tmp_path, capsys, flag, spec, hint):
    args = ["tune", "--data", str(tmp_path), "--storage", str(tmp_path), "--name", "x"]
    assert main([*args, flag, spec]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and hint in err
