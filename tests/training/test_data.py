"""The streaming loader: equal steps on every rank, disjoint rank slices, fixed order."""

from __future__ import annotations

import torch

from cluster.world import World
from data_prep.manifest import read_manifest
from training.data import EvalBatches, TrainBatches, build_loader, decode_image, read_samples


def train_batches(shards: str, rank: int, world_size: int, batch_size: int = 16, **kw):
    manifest = read_manifest(shards)
    return TrainBatches(
        shards,
        manifest.shards("train"),
        World(rank, world_size),
        batch_size=batch_size,
        image_size=32,
        augment=kw.pop("augment", True),
        seed=1234,
        num_classes=len(manifest.classes),
        with_keys=True,
        shuffle_block=kw.pop("shuffle_block", 100),
    )


def collect(b, loader_workers: int = 0, epoch: int = 0, consumed: int = 0) -> list:
    if isinstance(b, TrainBatches):
        b.set_position(epoch, consumed)
    return list(build_loader(b, loader_workers))


def keys(batches: list) -> list[list[str]]:
    return [list(k) for _, _, k in batches]


def test_every_rank_runs_the_same_number_of_full_batches(shards):
    # 3 shards over 2 ranks: a shard-per-rank split would give one rank twice the data.
    assert len(read_manifest(shards).shards("train")) == 3
    for world_size in (1, 2, 3):
        per_rank = [collect(train_batches(shards, r, world_size)) for r in range(world_size)]
        lengths = {len(out) for out in per_rank}
        assert len(lengths) == 1 and lengths.pop() > 0
        assert all(x.shape == (16, 3, 32, 32) for out in per_rank for x, _, _ in out)
        seen = [k for out in per_rank for batch in keys(out) for k in batch]
        assert len(seen) == len(set(seen))


def test_two_ranks_see_what_one_rank_with_twice_the_batch_sees(shards):
    single = keys(collect(train_batches(shards, 0, 1, batch_size=32), epoch=2))
    pair = [keys(collect(train_batches(shards, r, 2, batch_size=16), epoch=2)) for r in range(2)]
    assert single == [a + b for a, b in zip(pair[0], pair[1], strict=True)]


def test_resuming_mid_epoch_continues_with_the_next_sample(shards):
    full = keys(collect(train_batches(shards, 1, 2), epoch=1))
    stride = 16 * 2
    for done in (1, 5, len(full) - 1):
        tail = keys(collect(train_batches(shards, 1, 2), epoch=1, consumed=done * stride))
        assert tail == full[done:]


def test_evaluation_covers_every_sample_once(shards):
    manifest = read_manifest(shards)
    order = manifest.shards("test")
    total = manifest.num_samples("test")
    per_rank = [
        [s.key for s in read_samples(shards, order, World(r, 2).rank_range(total, False))]
        for r in range(2)
    ]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == total
    batches = [
        EvalBatches(
            shards, order, World(r, 2), batch_size=16, image_size=32, seed=1, num_classes=10
        )
        for r in range(2)
    ]
    assert sum(len(y) for b in batches for _, y in collect(b)) == total


def test_order_does_not_depend_on_loader_workers(shards):
    reference = collect(train_batches(shards, 1, 2), loader_workers=0, epoch=3)
    for workers in (1, 3):
        other = collect(train_batches(shards, 1, 2), loader_workers=workers, epoch=3)
        assert len(other) == len(reference)
        for (xa, ya, ka), (xb, yb, kb) in zip(reference, other, strict=True):
            assert ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)


def test_each_epoch_has_its_own_order(shards):
    first = [k for batch in keys(collect(train_batches(shards, 0, 1), epoch=0)) for k in batch]
    second = [k for batch in keys(collect(train_batches(shards, 0, 1), epoch=1)) for k in batch]
    assert first != second and len(first) == len(second)


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
