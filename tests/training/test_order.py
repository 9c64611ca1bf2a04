"""The data order's arithmetic: partitions cover the split once, every step is a full global
batch, split equally over ranks that divide the partitions and in proportion to the partitions
owned over any other number of ranks."""

from __future__ import annotations

import pytest

from training.data import order


@pytest.mark.parametrize("total", [0, 1, 5, 97, 480])
@pytest.mark.parametrize("partitions", [1, 2, 3, 8, 12, 64, 1024])
def test_partitions_cover_the_split_once(total, partitions):
    parts = [order.Partition.of(j, partitions, total) for j in range(partitions)]
    covered = sorted(p for part in parts for p in range(part.start, part.start + part.size))
    assert covered == list(range(total))
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    # Each epoch reorders every partition without losing or repeating a sample.
    for part in parts[:5]:
        sequence = order.PartitionEpoch(part, 4, 1234, 3).positions
        assert sorted(sequence) == list(range(part.start, part.start + part.size))


@pytest.mark.parametrize("total", [97, 480, 1000])
@pytest.mark.parametrize("partitions", [4, 12, 64])
@pytest.mark.parametrize("global_batch", [12, 48])
def test_steps_are_full_and_split_equally(total, partitions, global_batch):
    sizes = [order.Partition.of(j, partitions, total).size for j in range(partitions)]
    steps = order.steps_left(total, global_batch)
    assert total - steps * global_batch < global_batch  # drops less than one global batch
    for consumed in range(0, steps * global_batch, 7):  # any point, as after a resize
        if consumed + global_batch > total:
            break
        share = [
            order.taken(j, partitions, consumed + global_batch)
            - order.taken(j, partitions, consumed)
            for j in range(partitions)
        ]
        assert sum(share) == global_batch
        for ranks in (1, 2, 3, 4, 6, 12):
            if partitions % ranks or global_batch % ranks:
                continue
            per_rank = {sum(share[r::ranks]) for r in range(ranks)}
            assert per_rank == {global_batch // ranks}, (ranks, consumed)
        for ranks in (5, 7, partitions + 3):  # no divisibility: uneven, some ranks own none
            per_rank = [sum(share[r::ranks]) for r in range(ranks)]
            assert sum(per_rank) == global_batch
            for r in range(ranks):
                owned = len(order.rank_partitions(r, ranks, partitions))
                per_partition = -(-global_batch // partitions)
                assert per_rank[r] <= owned * per_partition, (ranks, r, consumed)
    # Which step takes a sample is known ahead (readers prefetch by it), from any start.
    for start in (0, 5):
        for t in range(order.steps_left(total, global_batch, start)):
            before, after = start + t * global_batch, start + (t + 1) * global_batch
            for j in range(partitions):
                first, stop = order.taken(j, partitions, before), order.taken(j, partitions, after)
                for i in range(first, stop):
                    assert order.step_taking(i, j, partitions, start, global_batch) == t
    # No partition runs out before the epoch ends.
    end = steps * global_batch
    assert all(order.taken(j, partitions, end) <= sizes[j] for j in range(partitions))


def test_a_step_draws_from_all_over_the_split():
    total, partitions, global_batch = 100_000, 1024, 64
    steps = order.global_order(total, partitions, 8, 1234, 0, global_batch)[:3]
    for step in steps:
        positions = sorted(step)
        assert positions[-1] - positions[0] > 0.9 * total
        # No gap wider than a few partitions' worth: the batch is spread, not clustered.
        assert max(b - a for a, b in zip(positions, positions[1:], strict=False)) < total / 16


def test_batch_keys_list_each_ranks_partitions_together():
    keys = order.batch_keys(16)
    by_key = sorted(range(16), key=lambda j: keys[j])
    for ranks in (1, 2, 4, 8, 16):
        runs = [j % ranks for j in by_key]
        # Each rank's partitions form one block: the rank changes ranks - 1 times.
        assert sum(a != b for a, b in zip(runs, runs[1:], strict=False)) == ranks - 1


@pytest.mark.parametrize("partitions", [1, 2, 16, 1024])
@pytest.mark.parametrize("ranks", [1, 2, 3, 5, 8, 24])
def test_every_partition_has_one_owning_rank_on_any_shape(partitions, ranks):
    owned = [order.rank_partitions(r, ranks, partitions) for r in range(ranks)]
    assert sorted(j for mine in owned for j in mine) == list(range(partitions))
    assert max(map(len, owned)) - min(map(len, owned)) <= 1
    keys = order.batch_keys(partitions)
    assert all([keys[j] for j in mine] == sorted(keys[j] for j in mine) for mine in owned)


@pytest.mark.parametrize(
    ("total", "partitions", "global_batch", "ranks"),
    [(1000, 8, 12, 3), (997, 16, 64, 3), (500, 7, 100, 3), (300, 4, 16, 1), (300, 4, 16, 3),
     (640, 64, 16, 5), (200, 2, 16, 3)],
)  # fmt: skip
def test_most_per_rank_bounds_every_rank_in_every_step(total, partitions, global_batch, ranks):
    """No rank ever gets more of a step than `most_per_rank` says (the most an elastic run's
    workers must hold on MIN of them), and some rank of some start gets that many."""
    steps = order.global_order(total, partitions, 8, 0, 0, global_batch)
    starts = order._starts(partitions, total)
    owner = {}
    for j in range(partitions):
        owner.update(
            {p: j % ranks for p in range(starts[j], starts[j] + (total + j) // partitions)}
        )
    seen = max(max(sum(owner[p] == r for p in step) for r in range(ranks)) for step in steps)
    most = order.most_per_rank(global_batch, partitions, ranks)
    assert seen <= most <= global_batch
    assert most >= -(-global_batch // ranks)
    if ranks == 1:
        assert most == global_batch
