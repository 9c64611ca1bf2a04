"""Resuming after a broken checkpoint: one decision for all ranks, never a traceback; and what
a resume may change.

The reruns start from a copy of one finished reference run (2 epochs, a checkpoint every 4
steps, 3 kept) whose newest checkpoint is then damaged: the rerun must warn in one line,
resume from the checkpoint before it and end with the reference's weights. The agreement of
the ranks is tested on its own with 2 gloo processes on 127.0.0.1, where a checkpoint can be
made readable or unreadable at the exact moment between rank 0's read and rank 1's. A rerun
with other flags is refused in one line, before Ray, when a flag defines the run; otherwise
it trains on with them and records them.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from reference_run import REFERENCE_RUN

from cluster.cli import main
from cluster.errors import UserError
from cluster.world import World
from data_prep.contract import read_manifest
from data_prep.prep import prep
from training import resume
from training.checkpoint import STATE_FILE, Position, TrainState, load_state, save_state
from training.config import TrainConfig
from training.driver import preflight, resolve_locations, run_training
from training.resume import (
    APPLIED_FIELDS,
    CHECKPOINT_NAME,
    IDENTITY_FIELDS,
    SNAPSHOT_FILE,
    agree_on_state,
    check_resumable,
    repair_snapshot,
)
from training.transfer import check_same_transfer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def config(small_config):
    def make(shards: str, root: Path, name: str, **overrides):
        values = dict(name=name, **REFERENCE_RUN)
        return small_config(shards, root / "runs", **{**values, **overrides})

    return make


@pytest.fixture(scope="module")
def reference(reference_run) -> tuple[dict, Path]:
    """The session's uninterrupted run (conftest.py): its result, and its run directory."""
    result, run_dir, _ = reference_run
    return result, run_dir


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if CHECKPOINT_NAME.fullmatch(p.name))


def cut_off(d: Path) -> None:
    (d / STATE_FILE).write_bytes((d / STATE_FILE).read_bytes()[:999])


DAMAGE = {
    # The newest checkpoint (and the one before it): its directory gone; a copy cut off in the
    # middle of state.pt, after one that had made the directory but not written state.pt.
    "directory deleted": [shutil.rmtree],
    "state.pt cut off, the one before missing": [cut_off, lambda d: (d / STATE_FILE).unlink()],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_broken_newest_checkpoints_fall_back(damage, shards, config, reference, tmp_path, capfd):
    result, reference_dir = reference
    run_dir = tmp_path / "runs" / "run"
    shutil.copytree(reference_dir, run_dir)
    names = checkpoint_names(run_dir)
    broken = names[::-1][: len(DAMAGE[damage])]  # newest first
    for name, harm in zip(broken, DAMAGE[damage], strict=True):
        harm(run_dir / name)
    resumed_from = names[-1 - len(broken)]
    capfd.readouterr()

    rerun = run_training(config(shards, tmp_path, "run"))

    out = capfd.readouterr()
    text = out.out + out.err
    warnings = [line for line in text.splitlines() if "warning:" in line]
    assert 1 <= len(warnings) <= len(broken), text  # one line names each, or both at once
    for name in broken:
        assert any(f"skipping checkpoint {name}" in w for w in warnings), (name, warnings)
    assert "CheckpointManagerInitializationError" not in text
    assert f"(step {int(resumed_from.split('_')[1])})" in text  # "resuming run at epoch ..."
    final = json.loads(Path(rerun.result_file).read_text())
    assert final["fingerprint"] == result["fingerprint"]
    assert final["test_accuracy"] == result["test_accuracy"]


def test_no_checkpoint_left_starts_over(tmp_path):
    """Every listed directory gone: Ray gets an empty list (a fresh start), the user a line."""
    entry = {"version": 0, "checkpoint_dir_name": "checkpoint_000000004_1", "metrics": {}}
    snapshot = {
        "ray_version": "2.60.0",
        "checkpoint_results": [entry],
        "checkpoint_report_indices": [0],
        "latest_checkpoint_result": entry,
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": 1,
    }
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    (tmp_path / "checkpoint_000000004_1").mkdir()  # emptied
    warnings: list[str] = []
    repair_snapshot(str(tmp_path), warnings.append)
    repaired = json.loads((tmp_path / SNAPSHOT_FILE).read_text())
    assert repaired["checkpoint_results"] == []
    assert repaired["latest_checkpoint_result"] is None
    assert repaired["current_report_index"] == 1
    assert warnings == [
        "warning: skipping checkpoint checkpoint_000000004_1 (gone or empty); no checkpoint is "
        "left; starting the run over"
    ]
    (tmp_path / SNAPSHOT_FILE).write_text('{"checkpoint_results": [')  # cut off
    with pytest.raises(UserError, match="unreadable"):
        repair_snapshot(str(tmp_path), warnings.append)


OLDER, NEWEST = "checkpoint_000000004_1", "checkpoint_000000008_2"


def half_copied_run(run_dir: Path) -> bytes:
    """A run whose newest checkpoint is still being copied; returns its complete state.pt."""
    for name, step in ((OLDER, 4), (NEWEST, 8)):
        (run_dir / name).mkdir(parents=True)
        state = TrainState(
            {}, {}, {}, Position(step=step), {}, {}, [], {"weights": "none", "sha256": ""}
        )
        save_state(run_dir / name, state)
    state = run_dir / NEWEST / STATE_FILE
    complete = state.read_bytes()
    state.write_bytes(complete[: len(complete) // 2])
    return complete


def _two_ranks(rank: int, port: int, root: str) -> None:
    """One rank of the agreement test; writes what it resumed from to ROOT/rank-R.json."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world = World(rank=rank, world_size=2)
    read = resume.load_state
    outcome: dict = {}
    for case in ("copy finishes", "chosen breaks"):
        run_dir = Path(root) / case
        complete = (Path(root) / f"{case}.state.pt").read_bytes()

        def rank0_reads(url, run_dir=run_dir, complete=complete, case=case):
            """Rank 0's reads, each followed by what happens to the files right after it."""
            try:
                return read(url)
            finally:
                if NEWEST in str(url):
                    (run_dir / NEWEST / STATE_FILE).write_bytes(complete)
                elif case == "chosen breaks":
                    (run_dir / OLDER / STATE_FILE).write_bytes(b"")

        resume.load_state = rank0_reads if rank == 0 else read
        warnings: list[str] = []
        try:
            state = agree_on_state(str(run_dir), NEWEST, world, warnings.append)
            outcome[case] = {"step": state and state.step, "warnings": warnings}
        except UserError as e:
            outcome[case] = {"error": str(e), "warnings": warnings}
    dist.destroy_process_group()
    (Path(root) / f"rank-{rank}.json").write_text(json.dumps(outcome))


def test_ranks_resume_from_the_checkpoint_rank_0_chose(tmp_path, monkeypatch):
    for case in ("copy finishes", "chosen breaks"):
        complete = half_copied_run(tmp_path / case)
        (tmp_path / f"{case}.state.pt").write_bytes(complete)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.syspath_prepend(str(ROOT))  # the spawned ranks import this module by name
    mp.spawn(_two_ranks, args=(port, str(tmp_path)), nprocs=2)
    rank0, rank1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))

    # Rank 0 found the newest checkpoint half-copied and fell back; by the time rank 1 looked,
    # the copy had finished, yet rank 1 resumes from the same older checkpoint as rank 0.
    agreed = "copy finishes"
    assert rank0[agreed]["step"] == rank1[agreed]["step"] == 4
    assert len(rank0[agreed]["warnings"]) == 1
    assert f"skipping checkpoint {NEWEST}" in rank0[agreed]["warnings"][0]
    assert rank1[agreed]["warnings"] == []

    # The checkpoint rank 0 chose broke before rank 1 read it: rank 1 fails, naming it,
    # rather than quietly resuming from the (now complete) newest one.
    broke = "chosen breaks"
    assert rank0[broke]["step"] == 4
    assert "step" not in rank1[broke]
    assert f"cannot read checkpoint {OLDER}, which rank 0 resumes from" in rank1[broke]["error"]


@pytest.fixture(scope="module")
def re_prepared(ray_cluster, digits_dir: Path, tmp_path_factory) -> str:
    """The digits prepared again, with one image fewer: other data, another manifest digest."""
    images = tmp_path_factory.mktemp("fewer") / "images"
    shutil.copytree(digits_dir, images)
    min(images.rglob("*.jpg")).unlink()
    dst = str(tmp_path_factory.mktemp("re-prepared"))
    prep(str(images), dst, num_shards=3)
    return dst


def newest_state(run_dir: Path) -> TrainState:
    return load_state(run_dir / checkpoint_names(run_dir)[-1])


def test_resuming_onto_re_prepared_data_is_one_line(shards, re_prepared, reference):
    """Every rank compares the manifest digest its checkpoint recorded with the data's now
    (`check_resumable`, on the reference's own newest checkpoint): the digits prepared again
    with one image fewer, found where the run's data was, are refused in one line."""
    state = newest_state(reference[1])
    cfg = TrainConfig.from_dict(state.config)
    backbone = state.backbone["sha256"]
    trained_on, now = read_manifest(shards).digest(), read_manifest(re_prepared).digest()
    assert state.datasets == [trained_on] and now != trained_on
    check_resumable(state, cfg, backbone, [trained_on])  # the same data: fine
    expected = f"{shards} changed since run 'reference' started (prepared again?)"
    with pytest.raises(UserError, match=re.escape(expected)) as e:
        check_resumable(state, cfg, backbone, [now])
    assert "\n" not in str(e.value)


def test_frozen_and_trained_adapters_do_not_resume_as_each_other(reference):
    """A run from --init-from keeps its adapters frozen, or training (--train-adapters), as it
    started (the optimizer's state covers exactly what trained): the other way round is
    refused on every rank, either way; a checkpoint from before the flag had them frozen."""
    state = newest_state(reference[1])
    same = (state.backbone["sha256"], state.datasets)
    started = TrainConfig.from_dict(state.config)
    frozen = dataclasses.replace(started, adapters=["layer4"], init_from="/runs/meta")
    trained = dataclasses.replace(frozen, train_adapters=True)
    for before, now in ((frozen, trained), (trained, frozen)):
        run = dataclasses.replace(state, config=before.to_dict())
        check_resumable(run, before, *same)
        check_same_transfer(run, before)
        with pytest.raises(UserError) as e:
            check_resumable(run, now, *same)
        assert "\n" not in str(e.value) and "--train-adapters" in str(e.value), str(e.value)
        with pytest.raises(UserError, match="resume with the same --init-from/--train-adapters"):
            check_same_transfer(run, now)
    older = {k: v for k, v in frozen.to_dict().items() if k != "train_adapters"}
    older_run = dataclasses.replace(state, config=older)
    check_resumable(older_run, frozen, *same)
    with pytest.raises(UserError) as e:
        check_resumable(older_run, trained, *same)
    assert str(e.value) == (
        "run 'reference' was started with no --train-adapters (now --train-adapters); resume "
        "with its values or start a new run with another --name"
    )


def test_a_rerun_is_checked_as_the_driver_resolves_its_flags(shards, config, reference, tmp_path):
    """The driver's check before Ray (`preflight`), on a copy of the reference run, with the
    flags as a rerun gives them. The order's defaults resolve as they did when it started
    (--partitions left out, or given as it resolved), and --mix says nothing about one
    dataset's order: these resume. Another --seed, --partitions or --adapters, or the
    --shuffle-block the reference gave left out (its default is another block), is refused
    in one line with the value the run started with."""
    shutil.copytree(reference[1], tmp_path / "runs" / "reference")
    started = newest_state(reference[1]).config
    p = started["partitions"]
    assert started["shuffle_block"] == REFERENCE_RUN["shuffle_block"]

    def rerun(**flags) -> None:
        cfg = config(shards, tmp_path, "reference", **flags)
        resolve_locations(cfg)
        preflight(cfg)

    rerun()
    rerun(partitions=p)
    rerun(mix="uniform")
    for flags, expected in [
        (dict(seed=7), "--seed 1234 (now --seed 7)"),
        (dict(partitions=2 * p), f"--partitions {p} (now --partitions {2 * p})"),
        (dict(shuffle_block=None), "--shuffle-block 128 (now --shuffle-block "),
        (dict(adapters=["layer4"]), "no --adapters (now --adapters layer4)"),
    ]:
        with pytest.raises(UserError) as e:
            rerun(**flags)
        assert "\n" not in str(e.value), str(e.value)
        assert str(e.value).startswith(f"run 'reference' was started with {expected}"), flags


def test_every_config_field_is_identity_or_applied():
    """A new TrainConfig field must be classed: refused on resume, or applied from it."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not IDENTITY_FIELDS & APPLIED_FIELDS
    assert names - IDENTITY_FIELDS - APPLIED_FIELDS == set(), "unclassed fields"
    assert (IDENTITY_FIELDS | APPLIED_FIELDS) - names == set(), "no such fields"


def _other(value: Any) -> Any:
    """Another value of the same kind, as a rerun might give."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value * 2 + 1
    if isinstance(value, list):
        return [*value, "layer4"]
    return "other" if value is None else f"{value}-other"


def _flag(name: str) -> str:
    return "--no-augment" if name == "augment" else "--" + name.replace("_", "-")


def test_a_changed_identity_flag_is_refused_in_one_line(reference):
    """Each flag that defines the run, changed alone, is refused naming it, on every rank
    (`check_resumable`, here on the reference's own newest checkpoint); the settings that
    apply on resume, all changed at once, are not."""
    state = load_state(reference[1] / checkpoint_names(reference[1])[-1])
    started = TrainConfig.from_dict(state.config)
    same = (state.backbone["sha256"], state.datasets)
    check_resumable(state, started, *same)
    for name in sorted(IDENTITY_FIELDS - {"mix"}):
        changed = dataclasses.replace(started, **{name: _other(getattr(started, name))})
        with pytest.raises(UserError) as e:
            check_resumable(state, changed, *same)
        assert "\n" not in str(e.value) and _flag(name) in str(e.value), (name, str(e.value))
    issue = dataclasses.replace(started, lr=1.0, lr_step=1, lr_gamma=0.5)
    with pytest.raises(UserError) as e:
        check_resumable(state, issue, *same)
    assert str(e.value) == (
        "run 'reference' was started with --lr 0.001, --lr-step 5, --lr-gamma 0.1 (now --lr "
        "1.0, --lr-step 1, --lr-gamma 0.5); resume with its values or start a new run with "
        "another --name"
    )
    applied = {name: _other(getattr(started, name)) for name in APPLIED_FIELDS}
    check_resumable(state, dataclasses.replace(started, **applied), *same)

    # --mix is the order of several datasets only; one dataset's order is the same under all.
    check_resumable(state, dataclasses.replace(started, mix="uniform"), *same)
    two = dataclasses.replace(started, data=started.data * 2)
    two_state = dataclasses.replace(state, config=two.to_dict(), datasets=state.datasets * 2)
    with pytest.raises(UserError, match="with --mix proportional \\(now --mix uniform\\)"):
        check_resumable(two_state, dataclasses.replace(two, mix="uniform"), *same)
    # A run from before --init-from and --train-adapters had neither.
    older = {k: v for k, v in state.config.items() if k not in ("init_from", "train_adapters")}
    check_resumable(dataclasses.replace(state, config=older), started, *same)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}  # fmt: skip


def test_a_rerun_with_another_schedule_is_refused_before_ray(shards, reference, tmp_path, capsys):
    """Issue 18: rerunning with --lr 1.0 --lr-step 1 --lr-gamma 0.5 (and without the
    --no-augment it started with) used to train on with the checkpoint's schedule while
    recording the new one. Now: one line naming the flags, exit 2, the run untouched, even
    with its newest checkpoint unreadable (the driver reads the one before it)."""
    run_dir = tmp_path / "runs" / "run"
    shutil.copytree(reference[1], run_dir)
    cut_off(run_dir / checkpoint_names(run_dir)[-1])
    before = _files(tmp_path)
    flags = [x for k, v in REFERENCE_RUN.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    argv = ["train", "--data", shards, "--storage", str(tmp_path / "runs"), "--name", "run",
            "--weights", "none", "--image-size", "32", "--loader-workers", "1", *flags,
            "--lr", "1.0", "--lr-step", "1", "--lr-gamma", "0.5"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "metatrainer train: error: run 'run' was started with --lr 0.001, --lr-step 5, "
        "--lr-gamma 0.1, --no-augment (now --lr 1.0, --lr-step 1, --lr-gamma 0.5, "
        "augmentation on); resume with its values or start a new run with another --name"
    )
    assert _files(tmp_path) == before


def test_a_resume_applies_and_records_the_other_flags(shards, config, reference, tmp_path):
    """--epochs raised, 1 worker with --global-batch 16 for 2 × 8 (the same global batch),
    other loader workers, log and checkpoint cadence and retention: the third epoch trains
    with them, and its checkpoint and result.json record them, and which workers trained
    which steps; the optimizer's and scheduler's state is what the recorded config says."""
    result, reference_dir = reference
    run_dir = tmp_path / "runs" / "run"
    shutil.copytree(reference_dir, run_dir)
    changed = dict(epochs=3, workers=1, batch_size=None, global_batch=16, loader_workers=0,
                   log_every=3, checkpoint_every_steps=0, keep_checkpoints=2)  # fmt: skip

    rerun = run_training(config(shards, tmp_path, "run", **changed))

    final = json.loads(Path(rerun.result_file).read_text())
    state = load_state(rerun.checkpoint)
    for recorded in (final["config"], state.config):
        assert {k: recorded[k] for k in changed} == changed
    assert final["history"][:2] == result["history"]
    assert [h["epoch"] for h in final["history"]] == [1, 2, 3]
    # Global batches of 16 again: the third epoch took as many steps as each before.
    assert final["step"] == result["step"] * 3 // 2
    assert final["segments"] == [
        {"workers": 2, "first_step": 1, "last_step": result["step"]},
        {"workers": 1, "first_step": result["step"] + 1, "last_step": final["step"]},
    ]
    assert len(checkpoint_names(run_dir)) == 2  # of the 3 kept before, and the new one
    cfg, group, scheduler = state.config, state.optimizer["param_groups"][0], state.scheduler
    assert (group["initial_lr"], scheduler["base_lrs"]) == (cfg["lr"], [cfg["lr"]])
    assert (scheduler["step_size"], scheduler["gamma"]) == (cfg["lr_step"], cfg["lr_gamma"])
    assert scheduler["last_epoch"] == 3
    assert group["lr"] == pytest.approx(cfg["lr"] * cfg["lr_gamma"] ** (3 // cfg["lr_step"]))


def test_segments_say_how_many_workers_trained_which_steps():
    """Starts of the worker group as an elastic run sees them: 2 workers for 3 steps; a
    restart on 2 (the same segment goes on); 1 worker that fails before its first step, then
    1 for 2 steps; 2 again: consecutive starts on as many workers merge, empty ones vanish."""
    pos = Position()
    for workers, steps in [(2, 3), (2, 1), (1, 0), (1, 2), (2, 1)]:
        pos.start_segment(workers)
        for _ in range(steps):
            pos.advance(16)
    pos = pos.next_epoch({})  # carried into the next epoch
    assert pos.segments == [
        {"workers": 2, "first_step": 1, "last_step": 4},
        {"workers": 1, "first_step": 5, "last_step": 6},
        {"workers": 2, "first_step": 7, "last_step": 7},
    ]
    pos.start_segment(3)
    pos.start_segment(2)  # 3 trained nothing: 2 goes on where it was
    assert pos.segments[-1] == {"workers": 2, "first_step": 7, "last_step": 7}
