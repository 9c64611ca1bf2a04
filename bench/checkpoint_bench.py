"""Checkpoint size, save and load time of the trainable parts, and the frozen backbone's size.

    .venv/bin/python bench/checkpoint_bench.py

Prints a table; the numbers are this machine's. The backbone is never in a checkpoint.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from training.model.checkpoint import Position, TrainState, load_state, rng_state, save_state
from training.model.loss import MetaLoss
from training.model.network import build_model

CASES = [
    ("default: 1 head, 10 classes, no adapters", [10], []),
    ("1 head, 1000 classes, no adapters", [1000], []),
    ("3 heads, adapters in layer3+layer4", [10, 100, 1000], ["layer3", "layer4"]),
    ("1 head, adapters in every stage", [10], ["layer1", "layer2", "layer3", "layer4"]),
]


def measure(classes: list[int], adapters: list[str]) -> tuple[int, float, float]:
    model = build_model("none", classes, adapters)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    logits, penalty = model(torch.randn(2 * len(classes), 3, 32, 32), [2] * len(classes))
    targets = [torch.zeros(2, dtype=torch.long) for _ in classes]
    MetaLoss()(logits, targets, penalty).total.backward()
    optimizer.step()  # Adam's moment buffers now exist, as in any real checkpoint
    state = TrainState(
        model=model.trainable_state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler={},
        position=Position(),
        rng=rng_state(),
        config={},
        classes=[[str(i) for i in range(n)] for n in classes],
        backbone={"weights": "none", "sha256": model.backbone_fingerprint()},
    )
    with tempfile.TemporaryDirectory() as tmp:
        saves, loads = [], []
        for _ in range(5):
            t = time.perf_counter()
            path = save_state(tmp, state)
            saves.append(time.perf_counter() - t)
            t = time.perf_counter()
            load_state(path)
            loads.append(time.perf_counter() - t)
        size = Path(path).stat().st_size
    return size, min(saves), min(loads)


def main() -> None:
    backbone = sum(
        t.numel() * t.element_size()
        for t in build_model("none", [10]).backbone.state_dict().values()
    )
    print(f"frozen ResNet-50 backbone (never checkpointed): {backbone / 1e6:.1f} MB\n")
    print(f"{'model':<45} {'checkpoint':>11} {'save ms':>8} {'load ms':>8}")
    for name, classes, adapters in CASES:
        size, save, load = measure(classes, adapters)
        print(f"{name:<45} {size / 1e6:>8.2f} MB {save * 1e3:>8.1f} {load * 1e3:>8.1f}")


if __name__ == "__main__":
    main()
