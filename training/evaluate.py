"""Accuracy of a model on a split: used after each epoch, at the end of training, and by
`metatrainer evaluate`, which loads a checkpoint and works without Ray.

    metatrainer evaluate --checkpoint ./runs/demo --data ./shards --split test
"""

from __future__ import annotations

import torch

from cluster import storage
from cluster.errors import UserError
from cluster.world import World
from data_prep.contract import read_manifest
from training.checkpoint import TrainState, find_checkpoint, load_state
from training.config import TrainConfig
from training.data import EvalBatches, build_loader
from training.decode import to_input
from training.model import MetaModel, build_model


@torch.no_grad()
def count_correct(
    model: MetaModel, head: int, batches: EvalBatches, device: torch.device, loader_workers: int
) -> tuple[int, int]:
    """(correct, total) of head `head` over this rank's part of the split."""
    model.eval()
    correct = total = 0
    for images, labels, *_ in build_loader(batches, loader_workers):
        features = model.features(to_input(images, device))
        predicted = model.heads[head](features).argmax(dim=1).cpu()
        correct += int((predicted == labels).sum())
        total += len(labels)
    return correct, total


def load_trained(checkpoint: str) -> tuple[MetaModel, TrainConfig, TrainState]:
    """The trained model of a run or checkpoint (its newest readable one), on the CPU, with the
    config and state it was saved with; the backbone must be the one it was trained with."""
    state = load_state(find_checkpoint(storage.normalize(checkpoint)))
    cfg = TrainConfig.from_dict(state.config)
    classes = [len(c) for c in state.classes]
    model = build_model(cfg.weights, classes, cfg.adapters, cfg.seed, cfg.weights_sha256)
    if model.backbone_fingerprint() != state.backbone["sha256"]:
        raise UserError(
            f"--weights {cfg.weights} now gives a different backbone than the one this "
            "checkpoint was trained with"
        )
    model.load_trainable(state.model)
    return model, cfg, state


def evaluate_checkpoint(
    checkpoint: str, data: list[str] | None = None, split: str = "test", loader_workers: int = 2
) -> list[tuple[str, float, int]]:
    """[(dataset, accuracy, samples)] of the checkpoint's heads on `split`, on one process."""
    model, cfg, state = load_trained(checkpoint)
    data = data or cfg.data
    if len(data) != len(cfg.data):
        raise UserError(
            f"the checkpoint has {len(cfg.data)} heads (datasets {', '.join(cfg.data)}); give "
            f"that many --data locations in the same order"
        )
    manifests = [read_manifest(d) for d in data]
    for d, m, classes in zip(data, manifests, state.classes, strict=True):
        if m.classes != classes:
            raise UserError(f"{d} has classes {m.classes[:5]}…, the checkpoint {classes[:5]}…")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    results = []
    for i, (d, m) in enumerate(zip(data, manifests, strict=True)):
        batches = EvalBatches.from_config(d, m, split, cfg, World())
        correct, total = count_correct(model, i, batches, device, loader_workers)
        results.append((d, correct / max(total, 1), total))
    return results
