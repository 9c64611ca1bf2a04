"""Training fixtures: the sample digits as shards, and a small, fast training config."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from reference_run import AUGMENTED_RUN, REFERENCE_RUN

from data_prep.prep import prep
from training.config import TrainConfig


@pytest.fixture(scope="session")
def shards(ray_cluster, digits_dir: Path, tmp_path_factory) -> str:
    """600 digits in 3 shards per split: uneven for 2 ranks (a shard-per-rank split hangs)."""
    dst = str(tmp_path_factory.mktemp("digit-shards"))
    prep(str(digits_dir), dst, num_shards=3)
    return dst


@pytest.fixture(scope="session")
def small_config() -> Callable[..., TrainConfig]:
    """TrainConfig.of(data=[data], storage=...) at 32 px on 2 CPU workers; overrides win."""

    def make(data: str, storage: str | Path, **overrides) -> TrainConfig:
        values = dict(
            data=[data],
            storage=str(storage),
            weights="none",
            image_size=32,
            augment=False,
            workers=2,
            loader_workers=1,
            max_failures=0,
            metrics_port=0,
        )
        return TrainConfig.of(**{**values, **overrides})

    return make


def _train_once(name: str, settings: dict, shards, small_config, tmp_path_factory):
    """`settings` trained once with a sample log: (result.json, run directory, log directory)."""
    from training.run.driver import run_training

    root = tmp_path_factory.mktemp(name)
    log = root / "log" / name
    cfg = small_config(shards, root / "runs", name=name, sample_log=str(log), **settings)
    outcome = run_training(cfg)
    return json.loads(Path(outcome.result_file).read_text()), Path(outcome.run_dir), log


@pytest.fixture(scope="session")
def reference_run(shards, small_config, tmp_path_factory) -> tuple[dict, Path, Path]:
    """REFERENCE_RUN trained once, with a sample log, for every module that compares with it:
    (its result.json, its run directory (never changed; copy it), its sample-log directory)."""
    return _train_once("reference", REFERENCE_RUN, shards, small_config, tmp_path_factory)


@pytest.fixture(scope="session")
def augmented_reference_run(shards, small_config, tmp_path_factory) -> tuple[dict, Path, Path]:
    """AUGMENTED_RUN (augmentation on, no feature cache) trained once, with a sample log, as
    `reference_run`: (its result.json, its run directory, its sample-log directory)."""
    return _train_once("augmented", AUGMENTED_RUN, shards, small_config, tmp_path_factory)


@pytest.fixture(scope="module")
def rerun_config(small_config):
    """A config with the reference run's flags (REFERENCE_RUN) as the run ROOT/runs/NAME:
    `rerun_config(shards, root, name, **overrides)`."""

    def make(shards: str, root: Path, name: str, **overrides) -> TrainConfig:
        values = dict(name=name, **REFERENCE_RUN)
        return small_config(shards, root / "runs", **{**values, **overrides})

    return make


@pytest.fixture(scope="module")
def reference(reference_run) -> tuple[dict, Path]:
    """The session's uninterrupted run: its result, and its run directory."""
    result, run_dir, _ = reference_run
    return result, run_dir
