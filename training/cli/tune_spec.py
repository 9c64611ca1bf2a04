"""A search's flags, kept in RUNS/NAME/tune.json (`metatrainer tune`): written when the search
starts, compared when it is run again. Tune restores trials with the values and flags they
started with, so a rerun with other flags is refused in one line."""

from __future__ import annotations

import json

from cluster import storage
from cluster.errors import UserError
from training.cli.search_space import SEARCHED, spec_values
from training.config import TrainConfig, flag_name

SPEC_FILE = "tune.json"
LOCAL_SETTINGS = ("debug", "s3_endpoint", "s3_timeout", "cache_dir", "cache_size", "start_timeout")
"""Flags that may differ on a rerun: they say where and how, not what, a trial trains."""


def settings(base: TrainConfig) -> dict:
    return {k: v for k, v in base.flat().items() if k not in LOCAL_SETTINGS}


def record_search(run_dir: str, spec: dict, restoring: bool) -> None:
    """RUNS/NAME/tune.json holds the flags a search started with. Tune restores the trials
    with the values and flags they started with, so a rerun must give the same ones."""
    url = storage.join(run_dir, SPEC_FILE)
    spec = json.loads(json.dumps(spec))  # as it reads back: lists, not tuples
    if restoring and storage.exists(url):
        _check_same_search(run_dir, json.loads(storage.read_bytes(url)), spec)
        return
    storage.write_bytes(url, (json.dumps(spec, indent=2) + "\n").encode())


def _check_same_search(run_dir: str, before: dict, now: dict) -> None:
    difference = _first_difference(before, now)
    if difference:
        raise UserError(
            f"the search {run_dir} was started with other flags ({difference}); rerun it "
            "with the flags it started with to resume it, or give a new --name"
        )
    given, started = now["max_concurrent"], before.get("max_concurrent")
    if given is not None and given != started:
        # Tuner.restore takes no TuneConfig, and the searcher's saved state has its limit.
        raise UserError(
            f"--max-concurrent {given}: Ray resumes the search {run_dir} with the limit it "
            f"started with ({started or 'as many trials as the cluster fitted'}); rerun "
            "without --max-concurrent, or give a new --name"
        )


def _first_difference(before: dict, now: dict) -> str | None:
    """The first flag that differs, searched specs compared by value (1e-3 is 0.001)."""
    if before.get("trials") != now["trials"]:
        return f"--trials {before.get('trials')}, now {now['trials']}"
    for key, flag in SEARCHED.items():
        old, new = before.get("space", {}).get(key), now["space"][key]
        if old is None and new is None:
            continue  # --batch-size, not searched beside --global-batch
        if old is None or new is None or spec_values(flag, old) != spec_values(flag, new):
            return f"{flag} {old}, now {now['space'][key]}"
    old = before.get("train", {})
    for key, value in now["train"].items():
        if old.get(key) != value:
            return f"{flag_name(key)} {old.get(key)}, now {value}"
    if old.keys() != now["train"].keys():
        return "a different version of metatrainer"
    return None
