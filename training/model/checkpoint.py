"""Checkpoint files: what trains, optimizer, scheduler, position, RNG, config, backbone identity.

Never the 98 MB frozen backbone: it is rebuilt from the config and checked against the stored
fingerprint. Files are written to a temporary name and renamed, and always loaded with
`weights_only=True`: a checkpoint from a bucket is untrusted input.
"""

from __future__ import annotations

import io
import os
import random
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from cluster import storage
from cluster.errors import UserError

STATE_FILE = "state.pt"


@dataclass
class Position:
    """Where training stands; saved in every checkpoint, so a restart continues exactly."""

    epoch: int = 0
    consumed: int = 0
    """Samples of the epoch's stream consumed, all datasets and ranks together
    (`training.data.mix`)."""
    step: int = 0
    """Global optimizer steps since the start of the run."""
    epoch_steps: int = 0
    totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """Sums of loss, cross-entropy and penalty over this epoch's steps (rank-local)."""
    history: list[dict] = field(default_factory=list)
    segments: list[dict] = field(default_factory=list)
    """How many workers trained which steps: {"workers", "first_step", "last_step"} (1-based,
    inclusive), consecutive runs on the same number of workers merged. Only the steps the
    weights descend from: steps trained after the last checkpoint and lost are not in it."""

    def start_segment(self, workers: int) -> None:
        """The worker group (re)starts here with `workers` workers."""
        last = self.segments[-1] if self.segments else None
        if last and last["last_step"] < last["first_step"]:
            self.segments.pop()  # a start that trained no step before the next
            last = self.segments[-1] if self.segments else None
        if not last or last["workers"] != workers:
            self.segments.append(
                {"workers": workers, "first_step": self.step + 1, "last_step": self.step}
            )

    def advance(self, samples: int) -> None:
        self.step += 1
        self.epoch_steps += 1
        self.consumed += samples
        if self.segments:
            self.segments[-1]["last_step"] = self.step

    def add_losses(self, sums: list[float]) -> None:
        self.totals = [a + v for a, v in zip(self.totals, sums, strict=True)]

    def next_epoch(self, record: dict) -> Position:
        return Position(
            self.epoch + 1, 0, self.step, 0, [0.0, 0.0, 0.0], [*self.history, record],
            self.segments,
        )  # fmt: skip


@dataclass
class TrainState:
    """What a checkpoint holds: what trains, the optimizer and schedule, where training stands,
    the RNGs, the resolved config, the datasets' classes and the backbone's identity. Tensors
    and plain containers only, so it loads with `weights_only=True`."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    position: Position
    rng: dict[str, Any]
    config: dict[str, Any]
    classes: list[list[str]]
    backbone: dict[str, str]
    """{"weights": what --weights said, "sha256": `MetaModel.backbone_fingerprint()`}."""
    datasets: list[str] = field(default_factory=list)
    """sha256 of each dataset's manifest when the run started (empty in older checkpoints)."""

    @property
    def step(self) -> int:
        return self.position.step

    def to_dict(self) -> dict[str, Any]:
        # Not asdict(self): it would deep-copy every tensor of the model and the optimizer.
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "position": asdict(self.position)
        }

    @classmethod
    def from_dict(cls, d: Any) -> TrainState:
        """Raises KeyError/TypeError/ValueError on anything that is not a state we wrote."""
        if not isinstance(d, dict):
            raise TypeError(f"a checkpoint is a dict, not {type(d).__name__}")
        return cls(
            model=dict(d["model"]),
            optimizer=dict(d["optimizer"]),
            scheduler=dict(d["scheduler"]),
            position=Position(**d["position"]),
            rng=dict(d["rng"]),
            config=dict(d["config"]),
            classes=[list(c) for c in d["classes"]],
            backbone={"weights": str(d["backbone"]["weights"]), "sha256": d["backbone"]["sha256"]},
            datasets=[str(x) for x in d.get("datasets", [])],
        )


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


def save_state(directory: str | Path, state: TrainState) -> Path:
    path = Path(directory) / STATE_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{STATE_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state.to_dict(), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_state(location: str | Path) -> TrainState:
    """Load a state file, or the state file in a checkpoint directory (local or s3://)."""
    url = str(location)
    if not url.endswith(STATE_FILE):
        url = storage.join(url, STATE_FILE)
    if not storage.exists(url):
        raise UserError(f"{url}: no checkpoint there (expected a {STATE_FILE} file)")
    data = storage.read_bytes(url)
    try:
        # A checkpoint from a bucket is untrusted input: tensors and plain containers only.
        return TrainState.from_dict(
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        )
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or hostile: all "unreadable"
        raise UserError(f"{url}: unreadable checkpoint ({type(e).__name__})") from None


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def find_checkpoint(location: str, warn: Callable[[str], None] = _to_stderr) -> str:
    """A state file, a checkpoint directory, or a run directory: its newest readable checkpoint.

    In a run directory an unreadable checkpoint (a truncated or corrupt state.pt) is skipped
    for the one before it, with one `warning:` line (`warn`, default stderr), as a resumed run
    does; a state file or checkpoint directory named explicitly is returned as it is."""
    if location.endswith(STATE_FILE) and storage.exists(location):
        return location
    if storage.exists(storage.join(location, STATE_FILE)):
        return storage.join(location, STATE_FILE)
    # Checkpoint directories are named by global step, then time: newest last.
    names = sorted(n for n in storage.list_dir(location) if n.startswith("checkpoint_"))
    skipped: list[str] = []
    for name in reversed(names):
        url = storage.join(location, name, STATE_FILE)
        if not storage.exists(url):
            continue  # not a checkpoint: Ray's checkpoint_manager_snapshot.json, or one being made
        try:
            load_state(url)
        except UserError as e:
            skipped.append(f"{name} ({e})")
            continue
        if skipped:
            warn(
                f"warning: skipping checkpoint {', '.join(skipped)}; using the older checkpoint "
                f"{name}"
            )
        return url
    if skipped:
        raise UserError(
            f"{location}: no readable checkpoint ({'; '.join(skipped)}); give another run or "
            "checkpoint, or train the run again"
        )
    raise UserError(
        f"{location}: no checkpoint found; give a run directory (STORAGE/NAME), a checkpoint "
        f"directory, or a {STATE_FILE} file"
    )
