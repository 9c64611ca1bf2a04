"""Split specs, stable split assignment, shuffling and shard plans."""

from __future__ import annotations

from collections import Counter

import pytest

from cluster.errors import UserError
from data_prep.contract import archive_bytes
from data_prep.splits import (
    assign_split,
    parse_size,
    parse_splits,
    plan_by_count,
    plan_by_size,
    shuffle_order,
)


def test_parse_splits_keeps_the_order_given() -> None:
    assert parse_splits("train=0.8,val=0.1,test=0.1") == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert list(parse_splits(" test = 0.5 , train=0.5 ")) == ["test", "train"]
    assert parse_splits("all=1") == {"all": 1.0}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("train=0.8,val=0.1", "sum to 0.9"),
        ("train=0.8,val", "NAME=FRACTION"),
        ("train=lots", "not a number"),
        ("train=0.5,train=0.5", "named twice"),
        ("tr-ain=1", "letters, digits and _"),
        ("train=1.5,val=-0.5", "must be in"),
        ("", "NAME=FRACTION"),
    ],
)
def test_bad_split_specs_say_what_to_write(spec: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_splits(spec)


def test_parse_size() -> None:
    assert parse_size("256MB") == 256_000_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("500kB") == 500_000
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("4096") == 4096
    for bad in ("", "MB", "12 parsecs", "-5MB", "0"):
        with pytest.raises(UserError):
            parse_size(bad)


def test_assignment_depends_on_path_and_seed_only() -> None:
    splits = {"train": 0.8, "val": 0.1, "test": 0.1}
    paths = [f"c{i % 7}/img{i}.jpg" for i in range(5000)]
    first = {p: assign_split(p, 1234, splits) for p in paths}
    assert first == {p: assign_split(p, 1234, splits) for p in reversed(paths)}
    counts = Counter(first.values())
    assert abs(counts["train"] / 5000 - 0.8) < 0.03
    assert abs(counts["val"] / 5000 - 0.1) < 0.02
    other_seed = {p: assign_split(p, 99, splits) for p in paths}
    assert sum(first[p] != other_seed[p] for p in paths) > 1000


def test_shuffle_does_not_depend_on_input_order() -> None:
    paths = [f"{c}/{i}.jpg" for c in "abc" for i in range(50)]
    order = [paths[i] for i in shuffle_order(paths, 7)]
    rev = list(reversed(paths))
    assert order == [rev[i] for i in shuffle_order(rev, 7)]
    assert order != paths
    # Classes are mixed: the first 30 are not all from one class.
    assert len({p[0] for p in order[:30]}) == 3


def test_plan_by_count_is_even() -> None:
    assert [len(r) for r in plan_by_count(10, 3)] == [4, 3, 3]
    assert [len(r) for r in plan_by_count(2, 5)] == [1, 1]
    assert plan_by_count(0, 4) == []


def test_plan_by_size_never_exceeds_the_limit() -> None:
    costs = [3000, 5000, 1500, 9000, 700, 40_000, 2500]
    shards = plan_by_size(costs, 20_480, archive_bytes)
    assert [i for r in shards for i in r] == list(range(len(costs)))
    for r in shards:
        size = archive_bytes(sum(costs[i] for i in r))
        assert size <= 20_480 or len(r) == 1  # a sample larger than a shard gets one alone
