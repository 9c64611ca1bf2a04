"""The model and meta-loss as DESIGN.md defines them (plain PyTorch, no Ray)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.ops import FrozenBatchNorm2d

from cluster.errors import UserError
from training.model.loss import MetaLoss
from training.model.network import build_model, freeze_batchnorm, load_resnet50, state_fingerprint


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_backbone_is_frozen_and_has_no_batchnorm():
    model = build_model("none", [10], ["layer4"])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 53
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n or n.startswith("heads.") for n in trainable)


def test_frozen_batchnorm_keeps_statistics_and_eps():
    bn = nn.BatchNorm2d(8, eps=1e-3)
    bn.running_mean.uniform_()
    bn.running_var.uniform_(0.5, 2)
    frozen = freeze_batchnorm(nn.Sequential(bn))[0]
    assert isinstance(frozen, FrozenBatchNorm2d) and frozen.eps == 1e-3
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(frozen(x), bn.eval()(x), atol=1e-6)


def test_training_steps_in_train_mode_change_no_backbone_weight_or_buffer(images):
    model = build_model("none", [10], ["layer3"])
    before = {k: v.clone() for k, v in model.backbone.state_dict().items() if ".adapter." not in k}
    heads_before = model.heads[0].weight.clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        logits, penalty = model(images)
        loss = MetaLoss()(logits, [torch.tensor([0, 1, 2, 3])], penalty).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = {k: v for k, v in model.backbone.state_dict().items() if ".adapter." not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(heads_before, model.heads[0].weight)
    assert any(a.adapter.weight.abs().sum() > 0 for a in model.adapters)


def test_zero_initialised_adapters_leave_the_output_unchanged(images):
    plain = build_model("none", [10])
    adapted = build_model("none", [10], ["layer1", "layer2", "layer3", "layer4"])
    assert len(adapted.adapters) == 16
    with torch.no_grad():
        (a,), pa = plain(images)
        (b,), pb = adapted(images)
    assert torch.equal(a, b)
    assert pa.abs().sum() == 0 and pb.abs().sum() == 0 and len(pb) == len(images)
    assert plain.backbone_fingerprint() == adapted.backbone_fingerprint()


def test_output_does_not_depend_on_mode_or_batch(images):
    model = build_model("none", [10], ["layer2"])
    with torch.no_grad():
        model.train()
        (train_out,), _ = model(images)
        model.eval()
        (eval_out,), _ = model(images)
        (single,), _ = model(images[:1])
    assert torch.allclose(train_out, eval_out)
    assert torch.allclose(single[0], eval_out[0], atol=1e-5)


def test_meta_loss_is_cross_entropy_plus_lambda_penalty():
    logits = [torch.randn(5, 3), torch.randn(4, 7)]
    targets = [torch.randint(0, 3, (5,)), torch.randint(0, 7, (4,))]
    penalty = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 0.5, 1.5, 2.5, 2.0])  # one per sample
    parts = MetaLoss(0.01)(logits, targets, penalty)
    ce = sum(nn.functional.cross_entropy(z, y) for z, y in zip(logits, targets, strict=True))
    assert torch.allclose(parts.cross_entropy, ce)
    assert torch.allclose(parts.penalty, torch.tensor(21.5 / 9))
    assert torch.allclose(parts.total, ce + 0.01 * 21.5 / 9)


def test_penalty_is_sum_of_mean_squared_adapter_outputs(images):
    model = build_model("none", [10], ["layer4"])
    for a in model.adapters:
        nn.init.normal_(a.adapter.weight, std=0.01)
    # r_i read off each adapter's 1×1 conv as it runs, not from the model's own bookkeeping.
    outputs = []
    hooks = [a.adapter.register_forward_hook(lambda m, i, o: outputs.append(o.detach()))
             for a in model.adapters]  # fmt: skip
    logits, penalty = model(images)
    for h in hooks:
        h.remove()
    assert len(outputs) == len(model.adapters) == 3
    expected = sum(float((r**2).mean()) for r in outputs)  # Σ_i mean(r_i²) over the batch
    loss = MetaLoss(0.5)(logits, [torch.tensor([0, 1, 2, 3])], penalty)
    assert expected > 0 and abs(loss.penalty.item() - expected) < 1e-6 * expected
    # Per sample: each image's own Σ_i mean(r_i²).
    first = sum(float((r[0] ** 2).mean()) for r in outputs)
    assert penalty.shape == (4,) and abs(penalty[0].item() - first) < 1e-6 * first


def test_one_head_per_dataset():
    model = build_model("none", [10, 3, 5])
    logits, _ = model(torch.randn(6, 3, 32, 32), [2, 1, 3])
    assert [tuple(z.shape) for z in logits] == [(2, 10), (1, 3), (3, 5)]


def test_weights_from_a_local_file(tmp_path):
    torch.manual_seed(7)
    reference = resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    loaded = load_resnet50(str(path), seed=0)
    assert state_fingerprint(loaded.state_dict()) == state_fingerprint(reference.state_dict())


def test_bad_weights_are_one_line_errors(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a PyTorch state_dict"):
        load_resnet50(str(junk), 0)
    with pytest.raises(UserError, match="no such file"):
        load_resnet50(str(tmp_path / "missing.pth"), 0)
    other = tmp_path / "other.pth"
    torch.save({"layer9.weight": torch.zeros(1)}, other)
    with pytest.raises(UserError, match="not a resnet50 state_dict"):
        load_resnet50(str(other), 0)


def test_unreachable_imagenet_weights_name_the_alternatives(tmp_path, monkeypatch):
    # No model hub is reachable from the test machines: the real download must fail clearly,
    # never fall back to a silent random initialisation.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # refuse fast, even with internet
    with pytest.raises(UserError, match="--weights PATH, or use --weights none"):
        load_resnet50("imagenet", 0)


def test_random_init_is_seeded():
    a = build_model("none", [10], seed=3).backbone_fingerprint()
    b = build_model("none", [10], seed=3).backbone_fingerprint()
    c = build_model("none", [10], seed=4).backbone_fingerprint()
    assert a == b != c


def test_cached_imagenet_weights_are_hash_checked_and_never_unpickle_code(tmp_path, monkeypatch):
    """torchvision's file names carry a sha256 prefix: a cached file is checked on every load,
    not only after its download, and read with weights_only=True."""
    import functools
    import hashlib
    import io
    import os

    from torchvision.models import resnet50

    from training.model.network import load_hub_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)

    def cached(obj) -> str:
        buf = io.BytesIO()
        torch.save(obj, buf)
        name = f"resnet50-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}.pth"
        (cache / name).write_bytes(buf.getvalue())
        return f"https://download.invalid/models/{name}"  # never fetched: it is cached

    state = resnet50(weights=None).state_dict()
    url = cached(state)
    assert torch.equal(load_hub_weights(url)["fc.weight"], state["fc.weight"])
    damaged = cache / url.rsplit("/", 1)[-1]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    damaged.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match the sha256 in its name"):
        load_hub_weights(url)
    with pytest.raises(UserError, match="not a PyTorch state_dict"):
        load_hub_weights(cached({"run": functools.partial(os.system, "true")}))
