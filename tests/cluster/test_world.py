"""Rank arithmetic: complete evaluation slices, batch ownership."""

from __future__ import annotations

import pytest

from cluster.world import World


@pytest.mark.parametrize("total", [0, 1, 7, 100, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_evaluation_slices_cover_everything_once(total, world_size):
    ranges = [World(r, world_size).rank_range(total) for r in range(world_size)]
    assert [i for r in ranges for i in r] == list(range(total))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_loader_workers_own_every_batch_exactly_once():
    workers = [World(0, 1).with_loader_worker(w, 3) for w in range(3)]
    for batch in range(10):
        assert sum(w.owns_batch(batch) for w in workers) == 1
