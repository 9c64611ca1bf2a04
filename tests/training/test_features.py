"""The feature cache: the same model as the uncached run, computed once, keyed, resumable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from sample_log import trained_history

from cluster.errors import UserError
from cluster.world import World
from data_prep.contract import read_manifest
from training.config import TrainConfig
from training.data import features
from training.data.batches import TrainBatches
from training.data.decode import to_input
from training.data.features import CachedBatches, FeatureCache, cache_applies, cache_key
from training.data.loader import build_loader
from training.model.network import build_model
from training.model.step import batch_invariant
from training.run.driver import run_training

CPU = torch.device("cpu")


def cfg_for(shards: str, **kw) -> TrainConfig:
    values = dict(data=[shards], weights="none", image_size=32, augment=False, batch_size=16,
                  loader_workers=0, partitions=8, shuffle_block=4)  # fmt: skip
    return TrainConfig.of(**{**values, **kw})


def test_the_cache_applies_only_where_nothing_in_the_backbone_trains_and_inputs_are_fixed():
    assert cache_applies(TrainConfig.of(augment=False))
    assert not cache_applies(TrainConfig.of(augment=True))
    assert not cache_applies(TrainConfig.of(augment=False, adapters=["layer4"]))
    assert not cache_applies(TrainConfig.of(augment=False, feature_cache="off"))
    with pytest.raises(UserError, match="--no-augment"):
        cache_applies(TrainConfig.of(augment=True, feature_cache="on"))


def test_the_key_changes_with_anything_the_features_depend_on(shards):
    manifest = read_manifest(shards)
    base = cache_key("sha-a", cfg_for(shards), manifest, "train", CPU)
    assert base == cache_key("sha-a", cfg_for(shards, lr=0.5, epochs=9), manifest, "train", CPU)
    changed_shard = dataclasses.replace(manifest.shards("train")[0], sha256="0" * 64)
    other = dataclasses.replace(manifest)
    other.splits = {**manifest.splits, "train": [changed_shard, *manifest.shards("train")[1:]]}
    assert len({
        base,
        cache_key("sha-b", cfg_for(shards), manifest, "train", CPU),
        cache_key("sha-a", cfg_for(shards, image_size=48), manifest, "train", CPU),
        cache_key("sha-a", cfg_for(shards), manifest, "val", CPU),
        cache_key("sha-a", cfg_for(shards), other, "train", CPU),
    }) == 5  # fmt: skip


@pytest.mark.parametrize("ranks", [2, 3])
def test_cached_batches_are_the_loaders_batches_in_its_order(ranks, shards, tmp_path, monkeypatch):
    """Two ranks, without Ray: each rank's cached steps hold the samples the image loader
    gives it, in its order, with the features the backbone computes from its images. Three
    ranks over 2 partitions: the third owns none and steps with empty batches."""
    monkeypatch.setattr(features, "PIECE", 100)  # several pieces, split between the ranks
    cfg = cfg_for(shards, partitions=8 if ranks == 2 else 2, batch_size=16 if ranks == 2 else 8)
    manifest = read_manifest(shards)
    model = build_model("none", [len(manifest.classes)])
    sha = model.backbone_fingerprint()
    caches = [
        FeatureCache(str(tmp_path), model, sha, cfg, World(r, ranks), CPU, False)
        for r in range(ranks)
    ]
    where = [c.fill(shards, manifest, "train") for c in caches]
    assert len(set(where)) == 1
    pieces = sorted(Path(where[0]).glob("piece-*.pt"))
    assert len(pieces) == -(-manifest.num_samples("train") // 100)
    for rank, cache in enumerate(caches):
        batches = TrainBatches.from_config(shards, manifest, "train", cfg, World(rank, ranks),
                                           with_keys=True)  # fmt: skip
        batches.set_position(epoch=1, consumed=32)
        cached = list(CachedBatches(batches, cache.load_train(where[0], batches)))
        loaded = list(build_loader(batches, 2))
        assert len(cached) == len(loaded) == len(batches) > 0
        assert all(len(y) == 0 for _, y, _, _ in cached) == (rank == 2)
        model.eval()
        for (feats, labels, keys, _), (images, labels2, keys2) in zip(cached, loaded, strict=True):
            assert keys == keys2 and torch.equal(labels, labels2)
            with torch.no_grad():  # the features the training step computes from the images
                assert torch.equal(feats, batch_invariant(model.features, to_input(images, CPU)))


def test_an_interrupted_fill_computes_only_the_missing_pieces_and_a_new_key_starts_over(
    shards, tmp_path, monkeypatch
):
    monkeypatch.setattr(features, "PIECE", 30)
    manifest = read_manifest(shards)
    model = build_model("none", [len(manifest.classes)])
    sha = model.backbone_fingerprint()
    cache = FeatureCache(str(tmp_path), model, sha, cfg_for(shards), World(), CPU, False)
    where = Path(cache.fill(shards, manifest, "val"))
    pieces = sorted(where.glob("piece-*.pt"))
    assert len(pieces) >= 2
    before = {p.name: p.stat().st_mtime_ns for p in pieces}
    pieces[-1].unlink()  # as if the run had been killed before writing it
    assert Path(cache.fill(shards, manifest, "val")) == where
    after = {p.name: p.stat().st_mtime_ns for p in sorted(where.glob("piece-*.pt"))}
    assert after.keys() == before.keys()
    assert [n for n in after if after[n] != before[n]] == [pieces[-1].name]
    assert not list(where.glob(".*.tmp"))

    bigger = FeatureCache(str(tmp_path), model, sha, cfg_for(shards, image_size=40), World(),
                          CPU, False)  # fmt: skip
    other = Path(bigger.fill(shards, manifest, "val"))
    assert other != where and len(list(other.glob("piece-*.pt"))) == len(pieces)
    assert bigger.load_eval(str(other), manifest.num_samples("val")).features.shape[1] == 2048


def test_a_cached_run_trains_the_uncached_runs_model(shards, small_config, tmp_path):
    outcomes = {}
    for mode in ("off", "on"):
        log = str(tmp_path / mode)
        cfg = small_config(shards, tmp_path / "runs", name=f"cache-{mode}", epochs=2,
                           batch_size=16, feature_cache=mode, sample_log=log)  # fmt: skip
        outcomes[mode] = run_training(cfg).metrics
    off, on = outcomes["off"], outcomes["on"]
    assert off["feature_cache"] is False and on["feature_cache"] is True
    assert on["fingerprint"] == off["fingerprint"]
    assert on["test_accuracy"] == off["test_accuracy"]
    assert trained_history(str(tmp_path / "on")) == trained_history(str(tmp_path / "off"))
    assert list((tmp_path / "runs" / "cache-on" / "features").glob("*/piece-*.pt"))
    assert not (tmp_path / "runs" / "cache-off" / "features").exists()
