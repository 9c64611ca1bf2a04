"""Rank arithmetic: reader numbers, complete evaluation slices, batch ownership."""

from __future__ import annotations

import pytest

from cluster.world import World


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("loader_workers", [1, 2, 3])
def test_every_reader_has_its_own_number(world_size, loader_workers):
    worlds = [
        World(r, world_size).with_loader_worker(w, loader_workers)
        for r in range(world_size)
        for w in range(loader_workers)
    ]
    assert sorted(x.reader for x in worlds) == list(range(world_size * loader_workers))
    # A rank's readers are world_size apart: rank r serves partitions j ≡ r (mod world_size).
    assert all(x.reader % world_size == x.rank for x in worlds)
    assert {x.readers for x in worlds} == {world_size * loader_workers}


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
