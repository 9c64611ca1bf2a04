"""The training step without Ray: what the loop runs, benchmarks time and tests call."""

from __future__ import annotations

import torch

from training.model.loss import MetaLoss
from training.model.network import build_model
from training.model.step import LossSums, prepare_compute, train_step

CPU = torch.device("cpu")


def test_a_step_trains_only_what_trains_and_sums_the_losses_on_the_device():
    torch.manual_seed(0)
    model = prepare_compute(build_model("none", [10, 4], ["layer4"]), CPU)
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items() if "adapter" not in k}
    trainable = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(6, 3, 32, 32)
    targets = [torch.tensor([1, 2, 3, 4]), torch.tensor([0, 3])]
    sums, seen = LossSums(CPU), []
    for _ in range(3):
        parts = train_step(model, x, targets, optimizer, MetaLoss(0.5))
        assert not any(p.requires_grad for p in parts)
        sums.add(parts)
        seen.append([float(p) for p in parts])
    totals, steps = sums.take()
    assert steps == 3 and totals == [sum(v[i] for v in seen) for i in range(3)]
    assert sums.take() == ([0.0, 0.0, 0.0], 0)
    after = model.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert all(not torch.equal(v, model.trainable_state_dict()[k]) for k, v in trainable.items())


def test_cached_features_give_the_images_logits():
    model = build_model("none", [10]).eval()
    x = torch.randn(20, 3, 32, 32)
    with torch.no_grad():
        from_images, _ = model(x)
        from_features, _ = model(model.features(x))
    assert torch.equal(from_images[0], from_features[0])


def test_the_model_compiles_to_one_graph_with_adapters():
    model = build_model("none", [10, 5], ["layer4"])
    explained = torch._dynamo.explain(model)(torch.randn(4, 3, 32, 32), [2, 2])
    assert explained.graph_break_count == 0 and explained.graph_count == 1
