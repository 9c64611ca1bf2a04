"""The streaming loader: one exact order for every cluster shape, each byte read once."""

from __future__ import annotations

import torch

from cluster import storage
from cluster.world import World
from data_prep.contract import read_manifest
from training.data import order
from training.data.batches import EvalBatches, TrainBatches
from training.data.loader import build_loader
from training.data.reader import SplitReader

PARTITIONS = 12


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
        partitions=kw.pop("partitions", PARTITIONS),
        shuffle_block=kw.pop("shuffle_block", 4),
    )


def collect(b, loader_workers: int = 0, epoch: int = 0, consumed: int = 0) -> list:
    if isinstance(b, TrainBatches):
        b.set_position(epoch, consumed)
    return list(build_loader(b, loader_workers))


def keys(batches: list) -> list[list[str]]:
    return [list(k) for _, _, k in batches]


def steps(
    shards: str,
    world_size: int,
    batch: int,
    workers: int = 0,
    epoch: int = 0,
    consumed: int = 0,
    **kw,
) -> list[set]:
    """Each global step's sample keys, gathered from every rank of a world."""
    ranks = [
        keys(collect(train_batches(shards, r, world_size, batch, **kw), workers, epoch, consumed))
        for r in range(world_size)
    ]
    return [set().union(*step) for step in zip(*ranks, strict=True)]


def layout_keys(shards: str) -> list[str]:
    manifest = read_manifest(shards)
    reader = SplitReader(shards, manifest.shards("train"), None)
    return [s.key for s in reader.read(range(manifest.num_samples("train")))]


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
        # An epoch drops fewer samples than one global batch.
        total = read_manifest(shards).num_samples("train")
        assert total - len(seen) < 16 * world_size


def test_readers_follow_the_reference_order_for_every_shape(shards):
    place = layout_keys(shards)
    total = len(place)
    # Ranks that divide the partitions, and ranks that do not (5: uneven; 16: 4 own none).
    shapes = [(1, 24, 0), (2, 12, 1), (2, 12, 3), (3, 8, 2), (4, 6, 0), (5, 4, 3), (16, 2, 1)]
    for (ranks, batch, workers), partitions, block in [
        *((shape, PARTITIONS, 4) for shape in shapes),
        ((2, 12, 1), 2, 3),  # many chunks a step
        ((1, 7, 1), 64, 5),  # more partitions than a step takes
    ]:
        reference = order.global_order(total, partitions, block, 1234, 2, ranks * batch)
        got = steps(
            shards, ranks, batch, workers, epoch=2, partitions=partitions, shuffle_block=block
        )
        assert got == [{place[p] for p in step} for step in reference], (ranks, workers)


def test_resuming_mid_epoch_continues_with_the_next_sample(shards):
    full = keys(collect(train_batches(shards, 1, 2), epoch=1))
    stride = 16 * 2
    for done in (1, 5, len(full) - 1):
        tail = keys(collect(train_batches(shards, 1, 2), epoch=1, consumed=done * stride))
        assert tail == full[done:]


def test_a_resize_mid_epoch_keeps_the_order(shards):
    """4 ranks × 4 for 3 steps, then 2 ranks × 12: every sample of the epoch once, and after
    each step exactly the samples an unresized run has trained by then."""
    unresized = steps(shards, 2, 12, epoch=1)
    before = steps(shards, 4, 4, epoch=1)[:3]
    after = steps(shards, 2, 12, epoch=1, consumed=3 * 16)
    assert set().union(*before, after[0]) == set().union(*unresized[:3])
    trained = [k for step in before + after for k in step]
    assert len(trained) == len(set(trained)) and set(trained) == set().union(*unresized)


def test_the_order_does_not_depend_on_loader_workers(shards):
    reference = collect(train_batches(shards, 1, 2), loader_workers=0, epoch=3)
    for workers in (1, 3):
        other = collect(train_batches(shards, 1, 2), loader_workers=workers, epoch=3)
        assert len(other) == len(reference)
        for (xa, ya, ka), (xb, yb, kb) in zip(reference, other, strict=True):
            assert ka == kb and torch.equal(ya, yb) and torch.equal(xa, xb)


def test_a_sample_gets_the_same_crop_whoever_decodes_it(shards):
    def crops(ranks: int, batch: int, workers: int) -> dict[str, torch.Tensor]:
        out = {}
        for r in range(ranks):
            for x, _, k in collect(train_batches(shards, r, ranks, batch), workers, epoch=1):
                out |= dict(zip(k, x, strict=True))
        return out

    one = crops(1, 24, 0)
    for other in (crops(2, 12, 2), crops(3, 8, 0)):
        assert one.keys() == other.keys()
        assert all(torch.equal(one[k], other[k]) for k in one)
    # ... and augmentation is random: crops differ between epochs.
    again = {k: x for x, _, ks in collect(train_batches(shards, 0, 1, 24), 0, epoch=2)
             for k, x in zip(ks, x, strict=True)}  # fmt: skip
    assert sum(not torch.equal(one[k], again[k]) for k in one if k in again) > len(one) // 2


def test_each_epoch_has_its_own_order(shards):
    first = [k for batch in keys(collect(train_batches(shards, 0, 1), epoch=0)) for k in batch]
    second = [k for batch in keys(collect(train_batches(shards, 0, 1), epoch=1)) for k in batch]
    assert first != second and len(first) == len(second)


def test_ranks_with_unequal_or_no_partitions_step_together(shards):
    """5 ranks over 12 partitions own 3, 3, 2, 2, 2; 16 ranks, 4 of them none: every rank
    runs every step, its part of each step in proportion to what it owns."""
    for ranks in (5, 16):
        per_rank = [collect(train_batches(shards, r, ranks, 2)) for r in range(ranks)]
        assert len({len(out) for out in per_rank}) == 1
        for r, out in enumerate(per_rank):
            owned = len(order.rank_partitions(r, ranks, PARTITIONS))
            sizes = {len(y) for _, y, _ in out}
            assert (sizes == {0}) == (owned == 0), (ranks, r, sizes)
            assert all(x.shape[1:] == (3, 32, 32) for x, _, _ in out)


def test_each_byte_is_read_once_per_epoch(shards, tmp_path, monkeypatch):
    """Counted by the storage layer in every loader process, at two shapes."""
    manifest = read_manifest(shards)
    shard_bytes = sum(s.bytes for s in manifest.shards("train"))
    for ranks, workers in [(2, 2), (3, 3), (5, 4)]:
        log = tmp_path / f"reads-{ranks}x{workers}"
        log.mkdir()
        monkeypatch.setenv(storage.READ_LOG_VAR, str(log))
        for r in range(ranks):
            collect(train_batches(shards, r, ranks, 8), workers, epoch=1)
        monkeypatch.delenv(storage.READ_LOG_VAR)
        read = sum(storage.read_log_totals(str(log)).values())
        assert 0.9 * shard_bytes <= read <= 1.1 * shard_bytes, (ranks, workers, read)


def test_evaluation_covers_every_sample_once(shards, tmp_path, monkeypatch):
    manifest = read_manifest(shards)
    total = manifest.num_samples("test")
    monkeypatch.setenv(storage.READ_LOG_VAR, str(tmp_path))
    batches = [
        EvalBatches(
            shards,
            manifest.shards("test"),
            World(r, 2),
            batch_size=16,
            image_size=32,
            seed=1,
            num_classes=10,
            with_keys=True,
        )
        for r in range(2)
    ]
    seen = [k for b in batches for _, _, ks in collect(b, loader_workers=2) for k in ks]
    assert len(seen) == len(set(seen)) == total
    read = sum(storage.read_log_totals(str(tmp_path)).values())
    assert read <= sum(s.bytes for s in manifest.shards("test"))


def test_unusual_images_decode_to_uint8_rgb_crops():
    import io

    import numpy as np
    from PIL import Image

    from training.data.decode import decode_cpu, plan_crop

    ramp = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    for mode, array, fmt in [
        ("I;16", ramp, "PNG"),
        ("RGBA", np.zeros((4, 4, 4), dtype=np.uint8), "PNG"),
        ("L", np.zeros((1, 1), dtype=np.uint8), "PNG"),
        ("CMYK", np.full((8, 8, 4), 40, dtype=np.uint8), "JPEG"),
        ("L", ramp.astype(np.uint8), "JPEG"),
    ]:
        buf = io.BytesIO()
        Image.fromarray(array, mode=mode if mode == "CMYK" else None).save(buf, format=fmt)
        crop = decode_cpu(buf.getvalue(), 4, lambda w, h: plan_crop(w, h, None))
        assert crop.dtype == torch.uint8 and crop.shape == (3, 4, 4), mode
        if mode == "I;16":  # scaled to 8 bits, not clipped at 255
            assert 0 < crop.float().mean() < 200


def test_the_loader_ships_uint8_and_the_device_normalises_as_torchvision_does(shards):
    import io

    from PIL import Image
    from torchvision import transforms as T

    from training.data.decode import IMAGENET_MEAN, IMAGENET_STD, pil_to_rgb, to_input
    from training.data.reader import SplitReader

    [(images, _, keys), *_] = collect(train_batches(shards, 0, 1, 64, augment=False))
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    manifest = read_manifest(shards)
    by_key = {s.key: s for s in SplitReader(shards, manifest.shards("train"), None).read(
        range(manifest.num_samples("train")))}  # fmt: skip
    reference = T.Compose(
        [T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    expected = torch.stack(
        [reference(pil_to_rgb(Image.open(io.BytesIO(by_key[k].image)))) for k in keys]
    )
    assert torch.equal(to_input(images, torch.device("cpu")), expected)  # bitwise


def test_device_decode_batches_match_cpu_decode_batches_through_loader_workers(shards):
    """--decode gpu's loader (workers ship JPEG bytes and crops), decoded here on the CPU."""
    from training.data.decode import Encoded, to_device

    cpu = collect(train_batches(shards, 1, 2, 16), loader_workers=2)
    device = train_batches(shards, 1, 2, 16)
    device.device_decode = True
    encoded = collect(device, loader_workers=2)
    assert keys(encoded) == keys(cpu)
    for (images, labels, _), (cpu_images, cpu_labels, _) in zip(encoded, cpu, strict=True):
        assert isinstance(images, Encoded) and torch.equal(labels, cpu_labels)
        decoded = to_device(images, torch.device("cpu"))
        assert decoded.shape == cpu_images.shape
        assert (decoded.float() - cpu_images.float()).abs().mean() < 2


def test_evaluation_uses_the_weights_own_eval_transform(shards):
    """Resize 232 → crop 224 for IMAGENET1K_V2 (256 for V1): the centre 224/232 of the short
    side, scaled to the image size; weights without a transform keep the whole short side."""
    from training.config import TrainConfig
    from training.data.decode import plan_crop

    assert plan_crop(500, 375, None, 224 / 256) == (24, 86, 328, 328, False)
    manifest = read_manifest(shards)
    batches = {
        w: EvalBatches.from_config(
            shards,
            manifest,
            "test",
            TrainConfig.of(weights=w, batch_size=16, image_size=32),
            World(),
        )  # fmt: skip
        for w in ("IMAGENET1K_V1", "IMAGENET1K_V2", "none")
    }
    assert [b.center for b in batches.values()] == [224 / 256, 224 / 232, 1.0]
    first = {w: next(iter(build_loader(b, 0)))[0] for w, b in batches.items()}
    assert not torch.equal(first["IMAGENET1K_V2"], first["none"])
