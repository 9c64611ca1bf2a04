"""A live progress line on the driver's terminal, redrawn in place:

    epoch 2/12 · step 140/312 · 1,234 samples/s · ETA 0:42 · loss 0.7130

Rank 0 posts where it stands, at most twice a second, to a small actor the driver starts
(no CPU, fire-and-forget calls: the training step never waits for it); a driver thread reads it
and redraws one line on stderr. Only on a terminal: when stderr is a file, a pipe or a `ray job`
log, nothing is started and nothing is printed, so logs keep the one line per epoch the
workers print.
"""

from __future__ import annotations

import threading
import time
from typing import IO

import ray

POST_EVERY = 0.5
"""Seconds between rank 0's posts, and between the driver's redraws."""
CONFIG_KEY = "progress_board"
"""Where the board's handle rides in the train loop's config (not a TrainConfig field)."""


@ray.remote(num_cpus=0)
class Board:
    """The latest state rank 0 posted."""

    def __init__(self) -> None:
        self.state: dict | None = None

    def post(self, state: dict) -> None:
        self.state = state

    def read(self) -> dict | None:
        return self.state


class Poster:
    """Rank 0's side: `step()` after each optimizer step posts at most every POST_EVERY."""

    def __init__(self, board, epochs: int) -> None:
        self.board, self.epochs = board, epochs
        self.last = 0.0

    def step(self, epoch: int, step: int, steps: int, samples: int, seconds: float, loss) -> None:
        """`step` of `steps` this epoch done, `samples` of it in `seconds`; `loss`: the
        latest mean read from the device (None before the first read)."""
        if self.board is None:
            return
        now = time.monotonic()
        if now - self.last < POST_EVERY and step < steps:
            return
        self.last = now
        state = dict(epoch=epoch + 1, epochs=self.epochs, step=step, steps=steps,
                     samples=samples, seconds=seconds, loss=loss)  # fmt: skip
        self.board.post.remote(state)


def render(state: dict) -> str:
    """The line for a posted state; the ETA is this epoch's steps left at its pace so far."""
    step, steps, seconds = state["step"], state["steps"], max(state["seconds"], 1e-9)
    eta = round((steps - step) * seconds / step) if step else None
    return " · ".join(
        [
            f"epoch {state['epoch']}/{state['epochs']}",
            f"step {step}/{steps}",
            f"{state['samples'] / seconds:,.0f} samples/s",
            *([f"ETA {clock(eta)}"] if eta is not None else []),
            *([f"loss {state['loss']:.4f}"] if state["loss"] is not None else []),
        ]
    )


def clock(seconds: int) -> str:
    """`m:ss` below an hour, `h:mm:ss` from an hour on (`2:05:03`, not `125:03`)."""
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}:{secs:02d}"
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class Line:
    """The driver's side: a thread redrawing the board's state on `stream` until `close()`.

    The line ends in a carriage return, so whatever Ray prints next (a worker's epoch line)
    starts at the line's beginning and overwrites it rather than being appended to it."""

    def __init__(self, stream: IO[str], board) -> None:
        self.stream, self.board = stream, board
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        shown = None
        while not self._stop.wait(POST_EVERY):
            try:
                state = ray.get(self.board.read.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - the line is a convenience: never fail a run
                continue
            if state and state != shown:
                self.stream.write("\x1b[K" + render(state) + "\r")
                self.stream.flush()
                shown = state

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.stream.write("\x1b[K")
        self.stream.flush()


def start(stream: IO[str] | None) -> tuple[Line | None, dict]:
    """(the line, the train loop config entries for rank 0) — nothing unless `stream` is a
    terminal (or a stream that says it is one)."""
    if stream is None or not stream.isatty():
        return None, {}
    board = Board.remote()
    return Line(stream, board), {CONFIG_KEY: board}
