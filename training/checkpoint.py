"""Checkpoint files: what trains, optimizer, scheduler, position, RNG, config, backbone identity.

Never the 98 MB frozen backbone: it is rebuilt from the config and checked against the stored
fingerprint. Files are written to a temporary name and renamed, and always loaded with
`weights_only=True`: a checkpoint from a bucket is untrusted input.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from cluster.errors import UserError

STATE_FILE = "state.pt"


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


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / STATE_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{STATE_FILE}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint there (expected a {STATE_FILE} file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or hostile: all "unreadable"
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__})") from None


def find_checkpoint(location: str | Path) -> Path:
    """A state file, a checkpoint directory, or a run directory (its newest checkpoint)."""
    path = Path(location)
    if path.is_file() or (path / STATE_FILE).is_file():
        return path if path.is_file() else path / STATE_FILE
    candidates = sorted(path.glob(f"checkpoint_*/{STATE_FILE}")) if path.is_dir() else []
    if not candidates:
        raise UserError(
            f"{location}: no checkpoint found; give a run directory (STORAGE/NAME), a "
            f"checkpoint directory, or a {STATE_FILE} file"
        )
    # Ray names checkpoint directories by time; the position in the file breaks ties.
    return max(candidates, key=lambda p: (_position(p), p.parent.name))


def _position(path: Path) -> tuple[int, int]:
    try:
        state = load_state(path)
    except UserError:
        return (-1, -1)
    return (int(state.get("epoch", -1)), int(state.get("step", -1)))
