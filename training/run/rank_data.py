"""A rank's training data for the whole run: each dataset's `TrainBatches` in the one stream
of samples an epoch that --mix shares among them (`training.data.mix`), fed either by the
feature cache, filled here where it applies (`training.data.features`), or by a `StepLoader`
whose workers decode the images and live as long as the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from cluster import storage
from cluster.world import World
from training.config import TrainConfig
from training.data.batches import TrainBatches
from training.data.features import CachedBatches, FeatureCache, SplitFeatures, cache_applies
from training.data.loader import StepLoader
from training.data.mix import Mix
from training.run.rank_state import RankState


@dataclass
class TrainData:
    """Each dataset's batches, the mix that shares a step among them, and what feeds them:
    the feature cache's features on the device, else a loader."""

    sets: list[TrainBatches]
    mix: Mix
    cache: FeatureCache | None = None
    features: list[SplitFeatures] | None = None
    loader: StepLoader | None = None

    def epoch(self) -> Iterator[list[tuple]]:
        """The steps left in the epoch from the sets' position, each a batch per dataset."""
        if self.cache:
            cached = [CachedBatches(b, f) for b, f in zip(self.sets, self.features, strict=True)]
            return zip(*cached, strict=False)
        return self.loader.epoch()


def build_loaders(
    cfg: TrainConfig,
    world: World,
    state: RankState,
    device: torch.device,
    say: Callable[[str], None],
) -> TrainData:
    """This rank's training data; the feature cache is filled before it returns."""
    device_decode = cfg.data.decode == "gpu" or (
        cfg.data.decode == "auto" and device.type == "cuda"
    )
    mix = Mix.of(cfg.data.mix, [m.num_samples("train") for m in state.manifests])
    kw = {"with_keys": bool(cfg.run.sample_log), "device_decode": device_decode, "mix": mix}
    sets = [
        TrainBatches.from_config(d, m, "train", cfg, world, index=i, **kw)
        for i, (d, m) in enumerate(zip(cfg.data.datasets, state.manifests, strict=True))
    ]
    if cache_applies(cfg):
        run_dir = storage.join(cfg.run.storage, cfg.run.name)
        cache = FeatureCache(
            run_dir, state.model, state.backbone_sha, cfg, world, device, device_decode, say
        )
        features = [
            cache.load_train(cache.fill(d, m, "train"), b).to(device)
            for d, m, b in zip(cfg.data.datasets, state.manifests, sets, strict=True)
        ]
        return TrainData(sets, mix, cache, features)
    # The rank reads; its loader workers decode whole steps and live as long as the run.
    return TrainData(
        sets, mix, loader=StepLoader(sets, cfg.data.loader_workers, device.type == "cuda")
    )
