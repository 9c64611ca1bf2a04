"""Accuracy of a model on a split: used after each epoch, at the end of training, and by
`metatrainer evaluate`, which loads a checkpoint and works without Ray.

    metatrainer evaluate --checkpoint ./runs/demo --data ./shards --split test
"""

from __future__ import annotations

import json

import torch

from cluster import storage
from cluster.errors import UserError
from cluster.world import World
from data_prep.contract import read_manifest
from training.config import TrainConfig
from training.data.batches import EvalBatches
from training.data.decode import to_input
from training.data.features import PIECE, SplitFeatures
from training.data.loader import build_loader
from training.model.checkpoint import TrainState, find_checkpoint, load_state
from training.model.network import MetaModel, build_model

REPORT_DIR = "report"
"""In the run directory: the report's PNGs (`training.run.report`) and the data they plot."""
TEST_CONFUSIONS = "confusion-test.json"
"""In REPORT_DIR: the test split's confusion matrices, scored by the workers at the end."""


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
    model = build_model(
        cfg.model.weights, classes, cfg.model.adapters, cfg.optim.seed, cfg.model.weights_sha256
    )
    if model.backbone_fingerprint() != state.backbone["sha256"]:
        raise UserError(
            f"--weights {cfg.model.weights} now gives a different backbone than the one this "
            "checkpoint was trained with"
        )
    model.load_trainable(state.model)
    return model, cfg, state


def evaluate_checkpoint(
    checkpoint: str, data: list[str] | None = None, split: str = "test", loader_workers: int = 2
) -> list[tuple[str, float, int]]:
    """[(dataset, accuracy, samples)] of the checkpoint's heads on `split`, on one process."""
    model, cfg, state = load_trained(checkpoint)
    data = data or cfg.data.datasets
    trained = cfg.data.datasets
    if len(data) != len(trained):
        raise UserError(
            f"the checkpoint has {len(trained)} heads (datasets {', '.join(trained)}); give "
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


@torch.no_grad()
def confusion_matrix(
    model: MetaModel,
    head: int,
    batches: EvalBatches,
    device: torch.device,
    loader_workers: int,
    num_classes: int,
) -> torch.Tensor:
    """Counts [true class, predicted class] of head `head` over this rank's part of the split:
    its diagonal is `count_correct`'s correct, its sum the total."""
    model.eval()
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for images, labels, *_ in build_loader(batches, loader_workers):
        features = model.features(to_input(images, device))
        predicted = model.heads[head](features).argmax(dim=1).cpu()
        counts += torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    return counts.view(num_classes, num_classes)


@torch.no_grad()
def confusion_matrix_cached(
    model: MetaModel, head: int, feats: SplitFeatures, num_classes: int
) -> torch.Tensor:
    """`confusion_matrix` on cached features (this rank's pieces), scored `PIECE` samples at a
    time."""
    counts = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for a in range(0, len(feats.labels), PIECE):
        predicted = model.heads[head](feats.features[a : a + PIECE]).argmax(dim=1)
        cells = (feats.labels[a : a + PIECE] * num_classes + predicted).cpu()
        counts += torch.bincount(cells, minlength=num_classes**2)
    return counts.view(num_classes, num_classes)


def save_confusions(
    url: str, names: list[str], classes: list[list[str]], matrices: list[torch.Tensor]
) -> None:
    """{dataset: {"classes": [...], "counts": [[true × predicted]]}} as JSON: training writes
    the test split's at its end, and its report plots them instead of scoring again."""
    document = {
        n: {"classes": c, "counts": m.tolist()}
        for n, c, m in zip(names, classes, matrices, strict=True)
    }
    storage.write_bytes(url, (json.dumps(document) + "\n").encode())


def load_confusions(url: str) -> tuple[list[str], list[list[str]], list[torch.Tensor]]:
    """What `save_confusions` wrote: (names, classes, matrices)."""
    document = json.loads(storage.read_bytes(url))
    return (
        list(document),
        [d["classes"] for d in document.values()],
        [torch.tensor(d["counts"], dtype=torch.int64) for d in document.values()],
    )


def checkpoint_confusions(
    checkpoint: str, split: str = "test", loader_workers: int = 2
) -> tuple[TrainState, list[torch.Tensor]]:
    """The checkpoint's state and a confusion matrix per head on `split` of the datasets it
    trained on, on one process (empty for a dataset without that split)."""
    model, cfg, state = load_trained(checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    manifests = [read_manifest(d) for d in cfg.data.datasets]
    if not any(split in m.splits for m in manifests):
        known = sorted({s for m in manifests for s in m.splits})
        raise UserError(
            f"the run's datasets have no {split!r} split; choose from {', '.join(known)}"
        )
    matrices = []
    for i, (d, m, classes) in enumerate(
        zip(cfg.data.datasets, manifests, state.classes, strict=True)
    ):
        if m.classes != classes:
            raise UserError(f"{d} has classes {m.classes[:5]}…, the checkpoint {classes[:5]}…")
        k = len(classes)
        if split in m.splits and m.num_samples(split):
            batches = EvalBatches.from_config(d, m, split, cfg, World())
            matrices.append(confusion_matrix(model, i, batches, device, loader_workers, k))
        else:
            matrices.append(torch.zeros(k, k, dtype=torch.int64))
    return state, matrices
