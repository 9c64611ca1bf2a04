"""Several datasets in one run (`--mix`): each step's batch shared by fixed arithmetic, every
sample of every dataset trained on every epoch, the same order after a restart or a resize."""

from __future__ import annotations

import random
import shutil
from collections import Counter

import pytest
import torch

from cluster.errors import UserError
from cluster.world import World
from data_prep.contract import read_manifest, write_manifest
from training.cli.main import build_parser
from training.data.batches import TrainBatches
from training.data.features import CachedBatches, SplitFeatures
from training.data.loader import build_loader
from training.data.mix import Mix, parse_mix
from training.data.reader import SplitReader
from training.model.loss import MetaLoss
from training.model.network import build_model

G = 16  # global batch


@pytest.mark.parametrize(
    ("mix", "epoch", "splits"),
    [
        # Each dataset read once: 130 samples, 8 steps (2 dropped, as with one dataset).
        ("proportional", 130, {(12, 4), (13, 3)}),
        # Half and half until the 100 are read once; the 30 go round 3.3 times.
        ("uniform", 199, {(8, 8)}),
        # ∝ √N: 100 : 54.8.
        ("temperature:2", 154, {(10, 6), (11, 5)}),
    ],
)
def test_a_mix_splits_each_step_by_its_weights_and_reads_every_dataset_once(mix, epoch, splits):
    m = Mix.of(mix, [100, 30])
    assert m.epoch_samples == epoch and m.steps_left(G) == epoch // G
    seen = [m.split(t * G, G) for t in range(m.steps_left(G))]
    assert {tuple(s) for s in seen} == splits
    # The largest dataset is read exactly once, the smaller at least once, none cut short.
    assert m.taken(0, epoch) == 100 and m.taken(1, epoch) >= 30
    # Resuming (or resizing) after any number of samples continues the same split.
    for t in range(3, 6):
        halves = zip(m.split(t * G, G // 2), m.split(t * G + G // 2, G // 2), strict=True)
        assert m.split(t * G, G) == [a + b for a, b in halves]
    assert Mix.of("temperature:1", [100, 30]) == Mix.of("proportional", [100, 30])


def test_the_stream_shares_grow_one_sample_at_a_time_and_stay_near_the_weights():
    rng = random.Random(0)
    for _ in range(40):
        sizes = [rng.randint(1, 500) for _ in range(rng.randint(2, 5))]
        m = Mix.of(rng.choice(["proportional", "uniform", "temperature:3"]), sizes)
        total, previous = sum(m.weights), [0] * len(sizes)
        for c in range(min(m.epoch_samples, 600) + 1):
            now = [m.taken(d, c) for d in range(len(sizes))]
            assert sum(now) == c
            assert all(b - a in (0, 1) for a, b in zip(previous, now, strict=True))
            assert all(abs(n - c * w / total) < 2 for n, w in zip(now, m.weights, strict=True))
            previous = now
        assert all(m.taken(d, m.epoch_samples) >= n for d, n in enumerate(sizes))


def test_bad_mixes_are_refused_in_one_line(capsys):
    assert parse_mix("Temperature:2.0") == "temperature:2"
    base = ["train", "--data", "d", "--storage", "s", "--name", "n"]
    assert build_parser().parse_args(base).mix == "proportional"
    for bad in ("sqrt", "temperature", "temperature:0", "temperature:-1", "uniform:2"):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*base, "--mix", bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and "argument --mix:" in err and ("T" in err or "0" in err)
        with pytest.raises(UserError, match="--mix"):
            parse_mix(bad)


def test_the_loss_averages_each_dataset_over_the_whole_step_and_an_empty_part_adds_nothing():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    penalty = torch.zeros(5)
    head.zero_grad()
    MetaLoss()([head(x)], [y], penalty).total.backward()
    reference = head.weight.grad.clone()
    # Two ranks holding 5 and 0 samples of the step: DDP averages their gradients.
    shares = [5 / 2]
    head.zero_grad()
    for part in (slice(0, 5), slice(5, 5)):
        parts = MetaLoss().for_step(shares)([head(x[part])], [y[part]], penalty[part])
        assert torch.isfinite(parts.total)
        (parts.total / 2).backward()
    assert torch.allclose(head.weight.grad, reference, atol=1e-6)
    # A dataset with no sample in the step (share 0) is no NaN either.
    empty = MetaLoss().for_step([0.0, 2.5])([head(x[:0]), head(x)], [y[:0], y], penalty)
    assert torch.isfinite(empty.total)
    # A rank with no sample at all in the step (every part empty) is no NaN either.
    none = MetaLoss().for_step([0.0, 2.5])([head(x[:0]), head(x[:0])], [y[:0], y[:0]], x[:0, 0])
    assert torch.isfinite(none.total) and none.total.item() == 0


@pytest.fixture(scope="module")
def two_sizes(shards, tmp_path_factory) -> list[str]:
    """The digits, and a smaller dataset: their first train shard alone."""
    small = tmp_path_factory.mktemp("small-digits")
    manifest = read_manifest(shards)
    first = manifest.shards("train")[0]
    shutil.copy(f"{shards}/{first.name}", small / first.name)
    manifest.splits = {"train": [first]}
    write_manifest(str(small), manifest)
    return [shards, str(small)]


def mixed(datasets: list[str], mix: str, rank: int = 0, ranks: int = 1) -> list[TrainBatches]:
    manifests = [read_manifest(d) for d in datasets]
    m = Mix.of(mix, [x.num_samples("train") for x in manifests])
    return [
        TrainBatches(d, x.shards("train"), World(rank, ranks), batch_size=G // ranks,
                     image_size=32, augment=False, seed=1234, num_classes=len(x.classes),
                     with_keys=True, partitions=4, shuffle_block=4, mix=m, index=i)
        for i, (d, x) in enumerate(zip(datasets, manifests, strict=True))
    ]  # fmt: skip


def epoch_keys(batches: list[TrainBatches], consumed: int = 0, workers: int = 0) -> list:
    """Per dataset, each step's keys (epoch 1, from `consumed` stream samples)."""
    out = []
    for b in batches:
        b.set_position(1, consumed)
        out.append([keys for _, _, keys in build_loader(b, workers)])
    return out


def test_a_mixed_epoch_trains_on_every_sample_and_restarts_anywhere_in_its_order(two_sizes):
    big, small = mixed(two_sizes, "uniform")
    n_big, n_small = big.total, small.total
    assert n_small < n_big / 2
    steps = epoch_keys([big, small])
    assert len(steps[0]) == len(steps[1]) == len(big) > n_small // 8  # not cut to the smallest
    assert all(len(k) == G // 2 for d in steps for k in d)
    big_seen = Counter(k for step in steps[0] for k in step)
    small_seen = Counter(k for step in steps[1] for k in step)
    # The larger dataset read once (but for less than a global batch at the end); the smaller
    # goes round again, in another order, so every one of its samples is trained on.
    assert max(big_seen.values()) == 1 and n_big - len(big_seen) < G
    everything = SplitReader(two_sizes[1], small.shards, None).read(range(n_small))
    assert set(small_seen) == {s.key for s in everything}
    rounds = len(steps[1]) * G // 2 / n_small
    assert set(small_seen.values()) <= {int(rounds), int(rounds) + 1} and rounds > 2
    again, first = small.partition_epoch(0, 1).positions, small.partition_epoch(0, 0).positions
    assert again != first and sorted(again) == sorted(first)

    # A restart after any step continues the same sequence, with another world size too.
    for t in (1, len(big) // 2, len(big) - 1):
        assert epoch_keys([big, small], consumed=t * G, workers=1) == [d[t:] for d in steps]
    ranks = [epoch_keys(mixed(two_sizes, "uniform", r, 2), consumed=3 * G) for r in (0, 1)]
    for d in (0, 1):
        joined = [sorted(a + b) for a, b in zip(ranks[0][d], ranks[1][d], strict=True)]
        assert joined == [sorted(k) for k in steps[d][3:]]

    # The feature-cached path takes the same samples in the same order.
    for b, d, keys in zip((big, small), two_sizes, steps, strict=True):
        layout = SplitReader(d, b.shards, None).read(range(b.total))
        feats = SplitFeatures(torch.arange(b.total).unsqueeze(1).float(),
                              torch.tensor([s.label for s in layout]), [s.key for s in layout],
                              torch.arange(b.total))  # fmt: skip
        b.set_position(1, 0)
        assert [k for _, _, k, _ in CachedBatches(b, feats)] == keys


def digit_images(n: int) -> torch.Tensor:
    """The first n scanned digits as the model's 32-pixel input (real images, not noise)."""
    from data_prep.sample_data import load_digits

    images, _ = load_digits()
    x = torch.from_numpy(images[:n]).float().div(255).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear").expand(-1, 3, -1, -1)
    return (x - 0.45) / 0.25


def test_a_step_split_unevenly_over_ranks_has_the_gradients_of_the_whole_step():
    """Two datasets, 6 + 2 samples in the step, over two ranks holding 1 + 2 and 5 + 0 (one of
    them none of the small dataset): each term's gradient, averaged as DDP does, is the whole
    step's, the adapters' penalty too (a per-rank mean would weigh 3 and 5 samples alike)."""
    model = build_model("none", [10, 4], ["layer4"])
    for a in model.adapters:
        torch.nn.init.normal_(
            a.adapter.weight, std=0.02, generator=torch.Generator().manual_seed(1)
        )
    params = [p for p in model.parameters() if p.requires_grad]
    x = digit_images(8)
    big, small = (x[:6], torch.tensor([0, 1, 2, 3, 4, 5])), (x[6:], torch.tensor([3, 1]))

    def gradients(parts_of_ranks: list[tuple[slice, slice]], term: str) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        whole = len(parts_of_ranks) == 1
        loss = MetaLoss(1.0) if whole else MetaLoss(1.0).for_step([6 / 2, 2 / 2])
        for a, b in parts_of_ranks:
            (xa, ya), (xb, yb) = (big[0][a], big[1][a]), (small[0][b], small[1][b])
            logits, penalty = model(torch.cat([xa, xb]), [len(ya), len(yb)])
            parts = loss(logits, [ya, yb], penalty)
            (getattr(parts, term) / len(parts_of_ranks)).backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    split = [(slice(0, 1), slice(0, 2)), (slice(1, 6), slice(2, 2))]
    for term in ("cross_entropy", "penalty"):
        reference = gradients([(slice(0, 6), slice(0, 2))], term)
        assert any(g.abs().sum() > 0 for g in reference), term
        for got, want in zip(gradients(split, term), reference, strict=True):
            # Float rounding only: a per-rank mean of the penalty is off by about 10 %.
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max()), term
