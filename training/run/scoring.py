"""How the training loop scores the model on a split after an epoch and at the end: each rank
counts its share of the split (images through `training.run.evaluate`, or cached features),
and the counts are summed over the ranks, so every rank holds the same confusion matrices.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cluster.world import World
from data_prep.contract import Manifest
from training.config import TrainConfig
from training.data.batches import EvalBatches
from training.data.features import FeatureCache
from training.model.network import MetaModel
from training.run.evaluate import confusion_matrix, confusion_matrix_cached


def confusions(
    model: MetaModel,
    cfg: TrainConfig,
    world: World,
    manifests: list[Manifest],
    split: str,
    device: torch.device,
    cache: FeatureCache | None,
) -> list[torch.Tensor]:
    """Each dataset's counts [true class, predicted class] on `split` (all zero: no such split),
    each rank scoring its share, summed over the ranks."""
    matrices = []
    for i, (d, m) in enumerate(zip(cfg.data.datasets, manifests, strict=True)):
        k = len(m.classes)
        counts = torch.zeros(k, k, dtype=torch.int64)
        if split in m.splits and m.num_samples(split):
            if cache:
                feats = cache.load_eval(cache.fill(d, m, split), m.num_samples(split))
                counts = confusion_matrix_cached(model, i, feats.to(device), k)
            else:
                batches = EvalBatches.from_config(d, m, split, cfg, world)
                counts = confusion_matrix(model, i, batches, device, cfg.data.loader_workers, k)
        matrices.append(counts)
    if dist.is_available() and dist.is_initialized():
        flat = torch.cat([c.flatten() for c in matrices]).to(device)
        dist.all_reduce(flat)
        sizes = [c.numel() for c in matrices]
        matrices = [
            part.view(c.shape) for part, c in zip(flat.cpu().split(sizes), matrices, strict=True)
        ]
    return matrices


def accuracies(confusions: list[torch.Tensor]) -> list[float | None]:
    """Accuracy per dataset from its confusion counts (None: no samples in the split)."""
    return [int(c.trace()) / int(c.sum()) if c.sum() else None for c in confusions]


def mean(values: list[float | None]) -> float | None:
    """The mean of the values present (None: none is)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
