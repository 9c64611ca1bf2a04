"""Finding the state to resume from: Ray's latest checkpoint, or the newest readable one.

A checkpoint that is incomplete or unreadable (a truncated file, a half-copied directory) is
never loaded: the worker warns and falls back to the previous checkpoint in the run directory.
"""

from __future__ import annotations

import ray.train

from cluster import storage
from cluster.errors import UserError
from training.checkpoint import load_state
from training.config import TrainConfig

# A resumed run must train the same model on the same data in the same order.
IDENTITY_FIELDS = ("data", "weights", "adapters", "seed", "shuffle_block")


def restore_state(cfg: TrainConfig, warn) -> dict | None:
    """The newest readable checkpoint's state, or None to start from scratch."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    latest = checkpoint.path.rstrip("/").rsplit("/", 1)[-1]
    try:
        with checkpoint.as_directory() as directory:
            return load_state(directory)
    except UserError as e:
        warn(f"warning: skipping checkpoint {latest}: {e}")
    run_dir = storage.join(cfg.storage, cfg.name)
    older = sorted(
        (n for n in storage.list_dir(run_dir) if n.startswith("checkpoint_")), reverse=True
    )
    for name in older:
        if name >= latest:
            continue
        try:
            state = load_state(storage.join(run_dir, name))
        except UserError as e:
            warn(f"warning: skipping checkpoint {name}: {e}")
            continue
        warn(f"warning: resuming from the older checkpoint {name} instead")
        return state
    warn("warning: no readable checkpoint is left; starting the run over")
    return None


def check_resumable(state: dict, cfg: TrainConfig, backbone_sha: str) -> None:
    before = state["config"]
    changed = [f for f in IDENTITY_FIELDS if before.get(f) != getattr(cfg, f)]
    if changed:
        flags = ", ".join(f"--{f.replace('_', '-')}" for f in changed)
        raise UserError(
            f"run {cfg.name!r} was started with other {flags}; resume with the same values or "
            "start a new run with another --name"
        )
    if state["backbone"]["sha256"] != backbone_sha:
        raise UserError(
            f"--weights {cfg.weights} now gives a different backbone than the one run "
            f"{cfg.name!r} was trained with; start a new run with another --name"
        )
