"""Reading the debug sample log (`--sample-log DIR`: DIR/rank-R.tsv, one line per trained batch:
epoch, position, dataset, keys) to check that training was exact."""

from __future__ import annotations

import time
from pathlib import Path


def trained_history(log_dir: str) -> dict[tuple, list[str]]:
    """(epoch, position, rank, dataset) → keys, the last write winning: a step redone after a
    restore replaces the lost one, so this is the history the final weights descend from."""
    history: dict[tuple, list[str]] = {}
    for path in sorted(Path(log_dir).glob("rank-*.tsv")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            epoch, position, dataset, keys = line.split("\t")
            history[(int(epoch), int(position), rank, int(dataset))] = keys.split()
    return history


def assert_exactly_once(
    history: dict[tuple, list[str]], reference: dict[tuple, list[str]], epochs: int
) -> None:
    """The same batches as the reference, and no sample twice in an epoch."""
    assert history == reference
    for epoch in range(epochs):
        keys = [k for (e, *_), batch in history.items() if e == epoch for k in batch]
        assert keys and len(keys) == len(set(keys)), f"epoch {epoch}: a sample trained twice"


def progress(log: Path, offset: int = 0) -> tuple[int, int] | None:
    """The (epoch, position) of the newest step rank 0 logged after byte `offset`."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode().splitlines()
    except FileNotFoundError:
        return None
    return max(
        ((int(a), int(b)) for a, b, *_ in (ln.split("\t") for ln in lines if ln)), default=None
    )


def wait_for(log: Path, offset: int, target: tuple[int, int], deadline: float, alive) -> None:
    """Until rank 0 logged a step at or past `target` (while `alive()`, until `deadline`)."""
    while alive() and time.monotonic() < deadline:
        seen = progress(log, offset)
        if seen is not None and seen >= target:
            return
        time.sleep(0.05)
