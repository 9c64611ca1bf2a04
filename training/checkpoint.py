"""Checkpoint files: what trains, optimizer, scheduler, position, RNG, config, backbone identity.

Never the 98 MB frozen backbone: it is rebuilt from the config and checked against the stored
fingerprint. Files are written to a temporary name and renamed, and always loaded with
`weights_only=True`: a checkpoint from a bucket is untrusted input.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from cluster import storage
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


def load_state(location: str | Path) -> dict[str, Any]:
    """Load a state file, or the state file in a checkpoint directory (local or s3://)."""
    url = str(location)
    if not url.endswith(STATE_FILE):
        url = storage.join(url, STATE_FILE)
    if not storage.exists(url):
        raise UserError(f"{url}: no checkpoint there (expected a {STATE_FILE} file)")
    data = storage.read_bytes(url)
    try:
        # A checkpoint from a bucket is untrusted input: tensors and plain containers only.
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or hostile: all "unreadable"
        raise UserError(f"{url}: unreadable checkpoint ({type(e).__name__})") from None


def find_checkpoint(location: str) -> str:
    """A state file, a checkpoint directory, or a run directory (its newest checkpoint)."""
    if location.endswith(STATE_FILE) and storage.exists(location):
        return location
    if storage.exists(storage.join(location, STATE_FILE)):
        return storage.join(location, STATE_FILE)
    # Checkpoint directories are named by global step, then time: newest last.
    names = sorted(n for n in storage.list_dir(location) if n.startswith("checkpoint_"))
    for name in reversed(names):
        url = storage.join(location, name, STATE_FILE)
        if storage.exists(url):
            return url
    raise UserError(
        f"{location}: no checkpoint found; give a run directory (STORAGE/NAME), a checkpoint "
        f"directory, or a {STATE_FILE} file"
    )
