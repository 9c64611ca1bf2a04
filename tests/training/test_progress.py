"""The live progress line's text (the line on a terminal is tested in test_train.py)."""

from __future__ import annotations

import pytest

from training.run import progress


@pytest.mark.parametrize(
    "seconds_left, shown",
    [(42, "0:42"), (3599, "59:59"), (3600, "1:00:00"), (7503, "2:05:03"), (36000, "10:00:00")],
)
def test_the_eta_shows_hours_past_an_hour(seconds_left, shown):
    # One step done in a second, `seconds_left` steps to go at that pace.
    state = dict(epoch=1, epochs=1, step=1, steps=1 + seconds_left, samples=8, seconds=1.0)
    line = progress.render({**state, "loss": None})
    assert line.endswith(f" · ETA {shown}"), line
