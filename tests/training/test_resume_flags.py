"""What a resume may change: a rerun with other flags is refused in one line, before Ray,
when a flag defines the run (`training.run.resume.IDENTITY_FIELDS`); otherwise it trains on
with them and records them. The reruns start from a copy of the session's reference run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from reference_run import REFERENCE_RUN, checkpoint_names, cut_off

from cluster.errors import UserError
from data_prep.contract import read_manifest
from data_prep.prep import prep
from training.cli.main import main
from training.config import TrainConfig
from training.model.checkpoint import TrainState, load_state
from training.model.transfer import check_same_transfer
from training.run.driver import preflight, resolve_locations, run_training
from training.run.resume import (
    APPLIED_FIELDS,
    IDENTITY_FIELDS,
    check_resumable,
)

ROOT = Path(__file__).resolve().parents[2]


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
    frozen = started.replace(adapters=["layer4"], init_from="/runs/meta")
    trained = frozen.replace(train_adapters=True)
    for before, now in ((frozen, trained), (trained, frozen)):
        run = dataclasses.replace(state, config=before.to_dict())
        check_resumable(run, before, *same)
        check_same_transfer(run, before)
        with pytest.raises(UserError) as e:
            check_resumable(run, now, *same)
        assert "\n" not in str(e.value) and "--train-adapters" in str(e.value), str(e.value)
        with pytest.raises(UserError, match="resume with the same --init-from/--train-adapters"):
            check_same_transfer(run, now)
    older = {k: v for k, v in frozen.flat().items() if k != "train_adapters"}  # a flat config
    older_run = dataclasses.replace(state, config=older)
    check_resumable(older_run, frozen, *same)
    with pytest.raises(UserError) as e:
        check_resumable(older_run, trained, *same)
    assert str(e.value) == (
        "run 'reference' was started with no --train-adapters (now --train-adapters); resume "
        "with its values or start a new run with another --name"
    )


def test_a_rerun_is_checked_as_the_driver_resolves_its_flags(
    shards, rerun_config, reference, tmp_path
):
    """The driver's check before Ray (`preflight`), on a copy of the reference run, with the
    flags as a rerun gives them. The order's defaults resolve as they did when it started
    (--partitions left out, or given as it resolved), and --mix says nothing about one
    dataset's order: these resume. Another --seed, --partitions or --adapters, or the
    --shuffle-block the reference gave left out (its default is another block), is refused
    in one line with the value the run started with."""
    shutil.copytree(reference[1], tmp_path / "runs" / "reference")
    started = TrainConfig.from_dict(newest_state(reference[1]).config).flat()
    p = started["partitions"]
    assert started["shuffle_block"] == REFERENCE_RUN["shuffle_block"]

    def rerun(**flags) -> None:
        cfg = rerun_config(shards, tmp_path, "reference", **flags)
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
    names = set(TrainConfig().flat())
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
        changed = started.replace(**{name: _other(started.flat()[name])})
        with pytest.raises(UserError) as e:
            check_resumable(state, changed, *same)
        assert "\n" not in str(e.value) and _flag(name) in str(e.value), (name, str(e.value))
    issue = started.replace(lr=1.0, lr_step=1, lr_gamma=0.5)
    with pytest.raises(UserError) as e:
        check_resumable(state, issue, *same)
    assert str(e.value) == (
        "run 'reference' was started with --lr 0.001, --lr-step 5, --lr-gamma 0.1 (now --lr "
        "1.0, --lr-step 1, --lr-gamma 0.5); resume with its values or start a new run with "
        "another --name"
    )
    applied = {name: _other(started.flat()[name]) for name in APPLIED_FIELDS}
    check_resumable(state, started.replace(**applied), *same)

    # --mix is the order of several datasets only; one dataset's order is the same under all.
    check_resumable(state, started.replace(mix="uniform"), *same)
    two = started.replace(data=started.data.datasets * 2)
    two_state = dataclasses.replace(state, config=two.to_dict(), datasets=state.datasets * 2)
    with pytest.raises(UserError, match="with --mix proportional \\(now --mix uniform\\)"):
        check_resumable(two_state, two.replace(mix="uniform"), *same)
    # A run from before --init-from and --train-adapters had neither.
    older = {
        k: v for k, v in started.flat().items() if k not in ("init_from", "train_adapters")
    }  # the flat config of a run from before the sections
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
        "metatrainer train: error: run 'run' was started with --no-augment, --lr 0.001, "
        "--lr-step 5, --lr-gamma 0.1 (now augmentation on, --lr 1.0, --lr-step 1, --lr-gamma "
        "0.5); resume with its values or start a new run with another --name"
    )
    assert _files(tmp_path) == before


def test_a_resume_applies_and_records_the_other_flags(shards, rerun_config, reference, tmp_path):
    """--epochs raised, 1 worker with --global-batch 16 for 2 × 8 (the same global batch),
    other loader workers, log and checkpoint cadence and retention: the third epoch trains
    with them, and its checkpoint and result.json record them, and which workers trained
    which steps; the optimizer's and scheduler's state is what the recorded config says."""
    result, reference_dir = reference
    run_dir = tmp_path / "runs" / "run"
    shutil.copytree(reference_dir, run_dir)
    changed = dict(epochs=3, workers=1, batch_size=None, global_batch=16, loader_workers=0,
                   log_every=3, checkpoint_every_steps=0, keep_checkpoints=2)  # fmt: skip

    rerun = run_training(rerun_config(shards, tmp_path, "run", **changed))

    final = json.loads(Path(rerun.result_file).read_text())
    state = load_state(rerun.checkpoint)
    for recorded in (final["config"], state.config):
        assert {k: TrainConfig.from_dict(recorded).flat()[k] for k in changed} == changed
    assert final["history"][:2] == result["history"]
    assert [h["epoch"] for h in final["history"]] == [1, 2, 3]
    # Global batches of 16 again: the third epoch took as many steps as each before.
    assert final["step"] == result["step"] * 3 // 2
    assert final["segments"] == [
        {"workers": 2, "first_step": 1, "last_step": result["step"]},
        {"workers": 1, "first_step": result["step"] + 1, "last_step": final["step"]},
    ]
    assert len(checkpoint_names(run_dir)) == 2  # of the 3 kept before, and the new one
    cfg = TrainConfig.from_dict(state.config).flat()
    group, scheduler = state.optimizer["param_groups"][0], state.scheduler
    assert (group["initial_lr"], scheduler["base_lrs"]) == (cfg["lr"], [cfg["lr"]])
    assert (scheduler["step_size"], scheduler["gamma"]) == (cfg["lr_step"], cfg["lr_gamma"])
    assert scheduler["last_epoch"] == 3
    assert group["lr"] == pytest.approx(cfg["lr"] * cfg["lr_gamma"] ** (3 // cfg["lr_step"]))
