"""Reading the debug sample log (`--sample-log DIR`: DIR/rank-R.tsv, one line per trained batch:
epoch, position, dataset, keys, time; and rank 0's line per start of the worker group: resume,
epoch, position, time) to check that training was exact."""

from __future__ import annotations

import time
from pathlib import Path


def trained_history(log_dir: str) -> dict[tuple, list[str]]:
    """(epoch, position, rank, dataset) → keys of the history the final weights descend from:
    in time order, a start that resumed at (epoch, position) drops the steps logged before it
    at or past that point (lost with the workers), and a step redone replaces the lost one."""
    events: list[tuple[float, tuple, list[str] | None]] = []
    for path in sorted(Path(log_dir).glob("rank-*.tsv")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text().splitlines():
            f = line.split("\t")
            if f[0] == "resume":
                events.append((float(f[3]), (int(f[1]), int(f[2])), None))
            else:
                key = (int(f[0]), int(f[1]), rank, int(f[2]))
                events.append((float(f[4]), key, f[3].split()))
    history: dict[tuple, list[str]] = {}
    for _, key, keys in sorted(events, key=lambda e: e[0]):
        if keys is None:
            history = {k: v for k, v in history.items() if k[:2] < key}
        else:
            history[key] = keys
    return history


def epochs_trained_once(history: dict[tuple, list[str]], epochs: int) -> list[set[str]]:
    """Each epoch's samples, checked to be trained once each (an epoch drops the remainder
    of its samples that does not fill a global batch, so its set may differ a little)."""
    seen = []
    for epoch in range(epochs):
        keys = [k for (e, *_), batch in history.items() if e == epoch for k in batch]
        assert keys and len(keys) == len(set(keys)), f"epoch {epoch}: a sample trained twice"
        seen.append(set(keys))
    return seen


def assert_exactly_once(
    history: dict[tuple, list[str]], reference: dict[tuple, list[str]], epochs: int
) -> None:
    """The same batches as the reference, and no sample twice in an epoch."""
    assert history == reference
    epochs_trained_once(history, epochs)


def steps_trained(history: dict[tuple, list[str]]) -> dict[tuple, list[str]]:
    """(epoch, position, dataset) → the step's keys over all ranks, sorted: what a step
    trained, whatever the number of ranks that shared it."""
    steps: dict[tuple, list[str]] = {}
    for (epoch, position, _, dataset), keys in history.items():
        steps.setdefault((epoch, position, dataset), []).extend(keys)
    return {k: sorted(v) for k, v in steps.items()}


def progress(log: Path, offset: int = 0) -> tuple[int, int] | None:
    """The (epoch, position) of the newest step rank 0 logged after byte `offset`."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            lines = f.read().decode().splitlines()
    except FileNotFoundError:
        return None
    return max(
        ((int(a), int(b)) for a, b, *_ in (ln.split("\t") for ln in lines if ln) if a != "resume"),
        default=None,
    )


def wait_for(log: Path, offset: int, target: tuple[int, int], deadline: float, alive) -> None:
    """Until rank 0 logged a step at or past `target` after byte `offset`, or `alive()` is
    false (the caller checks which); TimeoutError at `deadline` (time.monotonic())."""
    while True:
        seen = progress(log, offset)
        if seen is not None and seen >= target:
            return
        if not alive():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{log}: rank 0 logged no step at or past (epoch, position) {target} by the "
                f"deadline; its latest after byte {offset}: {seen}"
            )
        time.sleep(0.05)
