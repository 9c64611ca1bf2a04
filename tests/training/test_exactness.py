"""One model whatever the cluster shape: 1 × 4b, 2 × 2b and 4 × b train the same parameters,
with random augmentation on (crops are seeded per sample, not per batch or process)."""

from __future__ import annotations

import torch

from training.checkpoint import load_state
from training.driver import run_training
from training.model import build_model

BATCH = 4


def test_shapes_that_divide_the_partitions_train_the_same_model(shards, small_config, tmp_path):
    trained = {}
    for workers in (1, 2, 4):
        cfg = small_config(
            shards,
            tmp_path / "runs",
            name=f"shape-{workers}",
            workers=workers,
            batch_size=4 * BATCH // workers,
            epochs=1,
            augment=True,
            loader_workers=1,
            partitions=8,
        )
        outcome = run_training(cfg)
        trained[workers] = load_state(outcome.checkpoint).model
    reference = trained[1]
    for workers in (2, 4):
        state = trained[workers]
        assert state.keys() == reference.keys()
        for name in reference:
            # Adam divides by √v: where a gradient is ~0, float rounding (sums split across
            # ranks) can move an element by a small fraction of lr = 1e-3; other samples or
            # crops would move thousands of elements by about lr.
            assert torch.allclose(state[name], reference[name], rtol=1e-4, atol=1e-4), (
                workers,
                name,
            )
    # Not trivially equal: training moved the parameters away from where they started.
    start = build_model("none", [10], [], 1234).trainable_state_dict()
    assert all(not torch.allclose(reference[n], start[n], atol=1e-3) for n in reference)
