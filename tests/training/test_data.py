"""The streaming loader: equal steps on every rank, disjoint rank slices, fixed order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.world import World
from data_prep.manifest import read_manifest
from data_prep.prep import prep
from training.data import ShardBatches, build_loader, decode_image, read_samples


@pytest.fixture(scope="module")
def shards(ray_cluster, digits_dir: Path, tmp_path_factory) -> str:
    """The digits in 3 shards per split: uneven for 2 ranks."""
    dst = str(tmp_path_factory.mktemp("shards3"))
    prep(str(digits_dir), dst, num_shards=3)
    return dst


def batches(shards: str, rank: int, world_size: int, train: bool = True, **kw) -> ShardBatches:
    manifest = read_manifest(shards)
    split = "train" if train else "test"
    return ShardBatches(
        shards,
        manifest.shards(split),
        World(rank, world_size),
        batch_size=kw.pop("batch_size", 16),
        image_size=32,
        train=train,
        augment=kw.pop("augment", True),
        seed=1234,
        num_classes=len(manifest.classes),
    )


def collect(b: ShardBatches, loader_workers: int = 0, epoch: int = 0) -> list:
    b.set_epoch(epoch)
    return list(build_loader(b, loader_workers))


def test_every_rank_runs_the_same_number_of_full_batches(shards):
    # 3 shards over 2 ranks: a shard-per-rank split would give one rank twice the data.
    assert len(read_manifest(shards).shards("train")) == 3
    for world_size in (1, 2, 3):
        per_rank = [collect(batches(shards, r, world_size)) for r in range(world_size)]
        lengths = {len(out) for out in per_rank}
        assert len(lengths) == 1 and lengths.pop() > 0
        assert all(x.shape == (16, 3, 32, 32) for out in per_rank for x, _ in out)


def test_rank_slices_are_disjoint_and_evaluation_covers_every_sample(shards):
    manifest = read_manifest(shards)
    order = manifest.shards("test")
    total = manifest.num_samples("test")
    world = [World(r, 2) for r in range(2)]
    keys = [
        [s.key for s in read_samples(shards, order, w.rank_range(total, drop_last=False))]
        for w in world
    ]
    assert not set(keys[0]) & set(keys[1])
    assert len(keys[0]) + len(keys[1]) == total
    evaluated = sum(len(y) for r in range(2) for _, y in collect(batches(shards, r, 2, False)))
    assert evaluated == total


def test_order_does_not_depend_on_loader_workers(shards):
    reference = collect(batches(shards, 1, 2), loader_workers=0, epoch=3)
    for workers in (1, 3):
        other = collect(batches(shards, 1, 2), loader_workers=workers, epoch=3)
        assert len(other) == len(reference)
        for (xa, ya), (xb, yb) in zip(reference, other, strict=True):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_each_epoch_has_its_own_order(shards):
    first = torch.cat([y for _, y in collect(batches(shards, 0, 1), epoch=0)])
    second = torch.cat([y for _, y in collect(batches(shards, 0, 1), epoch=1)])
    assert not torch.equal(first, second)
    assert sorted(first.tolist()) != [] and len(first) == len(second)


def test_unusual_images_decode_to_rgb(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    for mode, array in [
        ("I;16", (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)),
        ("RGBA", np.zeros((4, 4, 4), dtype=np.uint8)),
        ("L", np.zeros((1, 1), dtype=np.uint8)),
    ]:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        img = decode_image(buf.getvalue())
        assert img.mode == "RGB", mode
    wide = decode_image(buf.getvalue())
    assert wide.size == (1, 1)
