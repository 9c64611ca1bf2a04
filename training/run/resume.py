"""What a run resumes from: one decision, taken where each kind of damage can be seen.

Ray Train keeps the run's list of checkpoints in `checkpoint_manager_snapshot.json` in the run
directory, and its controller refuses to start (`CheckpointManagerInitializationError`) when a
directory on that list is gone. So before `trainer.fit()` the driver drops the entries whose
directories are gone or empty (`repair_snapshot`). A checkpoint that is there but unreadable
(a truncated or corrupt state.pt) passes Ray's check; rank 0 finds it when it reads the state,
falls back to the previous checkpoint, and tells every rank which one it chose
(`restore_state`), so all ranks resume from the same step. Either way the user sees one
warning line.

What a resume may change is decided here too: the flags that define the run
(IDENTITY_FIELDS) must be as it started, the rest (APPLIED_FIELDS) take effect from the resume
point. The driver refuses a change before Ray starts (`check_run_unchanged`), and every rank
again against the checkpoint it loads (`check_resumable`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import ray.train
import torch.distributed as dist

from cluster import storage
from cluster.errors import UserError
from cluster.world import World
from training.config import FLAT_NAMES, SECTIONS, TrainConfig, flag_name
from training.model.checkpoint import TrainState, load_state

# Every TrainConfig field is one or the other (a test holds them to it). The identity fields
# define what a run trains: a resume that changes one is refused, so the config its
# checkpoints and result.json record held from its first step. --lr, --lr-step and --lr-gamma
# are identity rather than applied from the resume point: the scheduler's saved state is the
# schedule so far, and a new step size or rate could mean restarting the schedule or rewriting
# its past (which lr at epoch 7 under a new --lr-step 1?); a new schedule is a new run.
IDENTITY_FIELDS = frozenset({
    # the model and what of it trains (the optimizer's state covers exactly that)
    "weights", "adapters", "init_from", "train_adapters",
    # the data and its order
    "data", "seed", "partitions", "shuffle_block", "mix",
    # the recipe: inputs, loss and schedule
    "image_size", "augment", "meta_lambda", "lr", "lr_step", "lr_gamma",
})  # fmt: skip
"""Fields a resumed run must keep: a change is refused in one line (`check_same_run`)."""

# How long, where and how fast the run trains and what it logs: these take effect when the run
# resumes and are recorded from then on. The global batch, batch_size × workers, changes with
# the worker count anyway (elastic training: the position is in samples, the order the same),
# so batch_size may change too (2 × 8 → 1 × 16 trains on the same global batches), and so may
# global_batch, which holds the step's size fixed whatever the worker count. --storage
# and --name are where the run is found (a run copied elsewhere resumes there);
# --weights-sha256 only checks the file, the backbone is compared by its fingerprint
# (`check_resumable`); StepLR counts epochs from the run's start, so a raised --epochs
# continues the same schedule. --mlflow and --mlflow-experiment say where the run is tracked:
# a resume continues its MLflow run there (`training.run.tracking`).
APPLIED_FIELDS = frozenset({
    "storage", "name", "weights_sha256", "epochs", "batch_size", "global_batch",
    "workers", "min_workers", "resize_check", "gpus_per_worker", "cpus_per_worker",
    "loader_workers", "max_failures", "start_timeout", "checkpoint_every_steps",
    "keep_checkpoints", "decode", "compile", "feature_cache", "log_every", "sample_log",
    "debug", "metrics_port", "s3_endpoint", "s3_timeout", "cache_dir", "cache_size",
    "mlflow", "mlflow_experiment",
})  # fmt: skip
"""Fields a resumed run takes as given now: they apply from the resume point on."""

# Identity fields that checkpoints from before them lack, with the value those runs had.
# (The order's fields have none: a run from before them was read in another order.)
_BEFORE_THE_FIELD = {"init_from": None, "train_adapters": False}

SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train (V2)'s list of a run's checkpoints, in the run directory."""

# checkpoint_<step>_<ms> (see loop._report): names sort by progress.
CHECKPOINT_NAME = re.compile(r"checkpoint_\d+_\d+")


def repair_snapshot(run_dir: str, warn: Callable[[str], None]) -> None:
    """Drop the checkpoints whose directories are gone or empty from Ray's list of the run's
    checkpoints, so that Ray restores the newest one still there instead of failing."""
    url = storage.join(run_dir, SNAPSHOT_FILE)
    if not storage.exists(url):
        return
    try:
        snapshot = json.loads(storage.read_bytes(url))
        results, indices = snapshot["checkpoint_results"], snapshot["checkpoint_report_indices"]
        entries = list(zip(results, indices, strict=True))
        pending = list(
            zip(
                snapshot["pending_training_results"],
                snapshot["pending_validation_specs"],
                strict=True,
            )
        )
        latest = snapshot["latest_checkpoint_result"]
        names = [e["checkpoint_dir_name"] for e, _ in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{url}, Ray Train's list of the run's checkpoints, is unreadable "
            f"({type(e).__name__}); start a new run with another --name"
        ) from None
    # Ray checks that each directory exists (on S3 an emptied one does not); an empty one
    # holds nothing to resume from either.
    gone = [n for n in names if not storage.list_dir(storage.join(run_dir, n))]
    if not gone:
        return
    for name in gone:
        storage.remove(storage.join(run_dir, name))  # empty: out of later fallbacks' way
    kept = [(e, i) for e, i in entries if e["checkpoint_dir_name"] not in gone]
    pending = [(e, v) for e, v in pending if e["checkpoint_dir_name"] not in gone]
    if latest is None or latest["checkpoint_dir_name"] in gone:
        # Entries are in the order Ray registered them; the report index says which is newest.
        latest = max(kept, key=lambda k: k[1], default=(None, None))[0]
    snapshot |= {
        "checkpoint_results": [e for e, _ in kept],
        "checkpoint_report_indices": [i for _, i in kept],
        "pending_training_results": [e for e, _ in pending],
        "pending_validation_specs": [v for _, v in pending],
        "latest_checkpoint_result": latest,
    }
    storage.write_bytes(url, json.dumps(snapshot).encode())
    then = (
        f"resuming from checkpoint {latest['checkpoint_dir_name']}"
        if latest
        else "no checkpoint is left; starting the run over"
    )
    warn(f"warning: skipping checkpoint {', '.join(gone)} (gone or empty); {then}")


def restore_state(cfg: TrainConfig, world: World, warn: Callable[[str], None]) -> TrainState | None:
    """The state every rank resumes from (None: start from scratch). Rank 0 chooses the newest
    readable checkpoint and broadcasts its choice; the other ranks load that one or fail."""
    checkpoint = ray.train.get_checkpoint()
    latest = checkpoint.path.rstrip("/").rsplit("/", 1)[-1] if checkpoint else None
    return agree_on_state(storage.join(cfg.run.storage, cfg.run.name), latest, world, warn)


def agree_on_state(
    run_dir: str, latest: str | None, world: World, warn: Callable[[str], None]
) -> TrainState | None:
    """`restore_state` once Ray's latest checkpoint is known (a name in `run_dir`, or None)."""
    shared = world.world_size > 1 and dist.is_available() and dist.is_initialized()
    chosen, state = None, None
    if world.is_main or not shared:
        chosen, state = choose_checkpoint(run_dir, latest, warn if world.is_main else _silent)
    if not shared:
        return state
    # Ranks deciding alone could pick different checkpoints: one that a copy finished
    # writing, or a read failed on, between rank 0's read and theirs.
    choice = [chosen]
    dist.broadcast_object_list(choice, src=0)
    if world.is_main:
        return state
    if choice[0] is None:
        return None
    try:
        return load_state(storage.join(run_dir, choice[0]))
    except UserError as e:
        raise UserError(
            f"rank {world.rank} cannot read checkpoint {choice[0]}, which rank 0 resumes from: {e}"
        ) from None


def choose_checkpoint(
    run_dir: str, latest: str | None, warn: Callable[[str], None]
) -> tuple[str | None, TrainState | None]:
    """(name, state) of the newest readable checkpoint from `latest` back, or (None, None)."""
    if latest is None:
        return None, None
    older = sorted(
        (n for n in storage.list_dir(run_dir) if CHECKPOINT_NAME.fullmatch(n) and n < latest),
        reverse=True,
    )
    skipped: list[str] = []
    for name in [latest, *older]:
        try:
            state = load_state(storage.join(run_dir, name))
        except UserError as e:
            skipped.append(f"{name} ({e})")
            continue
        if skipped:
            warn(
                f"warning: skipping checkpoint {', '.join(skipped)}; resuming from the older "
                f"checkpoint {name}"
            )
        return name, state
    warn(
        f"warning: skipping checkpoint {', '.join(skipped)}; no readable checkpoint is left; "
        "starting the run over"
    )
    return None, None


def _silent(_: str) -> None:
    pass


def check_resumable(
    state: TrainState, cfg: TrainConfig, backbone_sha: str, datasets: list[str]
) -> None:
    """Refuse, in one line, to resume onto another model, recipe, order or data. `datasets`:
    each dataset's manifest digest now (`manifest_digest`)."""
    check_same_run(state.config, cfg)
    if state.backbone["sha256"] != backbone_sha:
        raise UserError(
            f"--weights {cfg.model.weights} now gives a different backbone than the one run "
            f"{cfg.run.name!r} was trained with; start a new run with another --name"
        )
    changed_data = [
        d for d, before, now in zip(cfg.data.datasets, state.datasets, datasets, strict=False)
        if before != now
    ]  # fmt: skip
    if changed_data:
        raise UserError(
            f"{changed_data[0]} changed since run {cfg.run.name!r} started (prepared again?); "
            "resume with the data it started with, or start a new run with another --name"
        )


def check_same_run(before: dict, cfg: TrainConfig) -> None:
    """Refuse, in one line naming the flags, a resume whose IDENTITY_FIELDS differ from those
    in the config of a checkpoint of the run (`before`)."""
    # One dataset's order is the same under every --mix (and runs from before --mix had none).
    now = cfg.flat()
    names = [n for n in now if n in IDENTITY_FIELDS]
    names = [n for n in names if n != "mix" or len(cfg.data.datasets) > 1]
    recorded = _recorded(before)
    was = {n: recorded.get(n, _BEFORE_THE_FIELD.get(n)) for n in names}
    changed = [n for n in names if was[n] != now[n]]
    if changed:
        then = ", ".join(_as_flags(n, was[n]) for n in changed)
        now = ", ".join(_as_flags(n, now[n]) for n in changed)
        raise UserError(
            f"run {cfg.run.name!r} was started with {then} (now {now}); resume with its values "
            "or start a new run with another --name"
        )


def _recorded(config: dict) -> dict:
    """A checkpoint's config by flat field names, only the fields it recorded (sections, or
    the flat dict of runs from before them)."""
    if not any(isinstance(config.get(s), dict) for s in SECTIONS):
        return dict(config)
    return {
        FLAT_NAMES.get(k, k): v
        for s, values in config.items()
        if s in SECTIONS and isinstance(values, dict)
        for k, v in values.items()
    }


def check_run_unchanged(cfg: TrainConfig) -> None:
    """Driver, before Ray starts: `check_same_run` against the config of the run's newest
    readable checkpoint (none: a new run, or one the workers will start over)."""
    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    names = [n for n in storage.list_dir(run_dir) if CHECKPOINT_NAME.fullmatch(n)]
    _, state = choose_checkpoint(run_dir, max(names, default=None), _silent)
    if state is not None:
        check_same_run(state.config, cfg)


def _as_flags(name: str, value: Any) -> str:
    """A field's value as the flags that give it (`--lr 0.05`, `no --init-from`)."""
    if name == "augment":
        return "augmentation on" if value else "--no-augment"
    flag = flag_name(name)
    if value is None or value is False or value == []:
        return f"no {flag}"
    if value is True:
        return flag
    if name == "data":
        return " ".join(f"{flag} {v}" for v in value)
    return f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}"
