"""Rank arithmetic: equal training slices, complete evaluation slices, batch ownership."""

from __future__ import annotations

import pytest

from cluster.world import World


@pytest.mark.parametrize("total", [0, 1, 7, 100, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_training_slices_are_equal_and_disjoint(total, world_size):
    ranges = [World(r, world_size).rank_range(total, drop_last=True) for r in range(world_size)]
    assert len({len(r) for r in ranges}) == 1
    assert sum(len(r) for r in ranges) == total - total % world_size
    seen = [i for r in ranges for i in r]
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("total", [0, 1, 7, 100, 101])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_evaluation_slices_cover_everything_once(total, world_size):
    ranges = [World(r, world_size).rank_range(total, drop_last=False) for r in range(world_size)]
    assert [i for r in ranges for i in r] == list(range(total))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_loader_workers_own_every_batch_exactly_once():
    workers = [World(0, 1).with_loader_worker(w, 3) for w in range(3)]
    for batch in range(10):
        assert sum(w.owns_batch(batch) for w in workers) == 1
