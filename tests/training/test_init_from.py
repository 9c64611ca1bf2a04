"""`metatrainer train --init-from`: a meta-trained run's adapters carried to a new dataset.

The source is a meta-trained run's checkpoint written here, as training writes it (layer4
adapters away from zero, a 3-class head, on the random backbone the small config trains on):
a Ray run to meta-train it would double this file's time. The new runs train on the digits
(10 classes) on the session's Ray cluster.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from training.cli.main import main
from training.config import TrainConfig
from training.model.checkpoint import Position, TrainState, rng_state, save_state
from training.model.network import build_model
from training.run.driver import run_training
from training.run.evaluate import evaluate_checkpoint, load_trained

# One worker, decoding in its own process: the least start-up per run on 2 cores.
ONE_WORKER = dict(workers=1, loader_workers=0, batch_size=32)


def _adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".adapter." in k}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """(run directory, its adapters) of a meta-trained run on three classes."""
    model = build_model("none", [3], ["layer4"], seed=1234)
    torch.manual_seed(0)
    with torch.no_grad():
        for a in model.adapters:
            a.adapter.weight.normal_(0, 0.05)  # trained adapters change the features
    cfg = TrainConfig.of(data=["/meta/a"], weights="none", adapters=["layer4"], image_size=32)
    state = TrainState(
        model=model.trainable_state_dict(),
        optimizer={},
        scheduler={},
        position=Position(epoch=1, step=5),
        rng=rng_state(),
        config=cfg.to_dict(),
        classes=[["a", "b", "c"]],
        backbone={"weights": "none", "sha256": model.backbone_fingerprint()},
    )
    run = tmp_path_factory.mktemp("meta") / "meta"
    (run / "checkpoint_000000005_1").mkdir(parents=True)
    save_state(run / "checkpoint_000000005_1", state)
    return str(run), _adapters(state.model)


def test_frozen_adapters_carry_bitwise_with_new_heads_and_resume(
    shards, small_config, tmp_path, source
):
    run, adapters = source
    run = shutil.copytree(run, tmp_path / "meta")
    cfg = small_config(shards, tmp_path, name="new", init_from=str(run), epochs=1, **ONE_WORKER)
    outcome = run_training(cfg)
    result = json.loads(Path(outcome.result_file).read_text())
    assert result["config"]["model"]["adapters"] == ["layer4"]  # --adapters left out: the source's
    # Nothing in the backbone trains: the heads train on features computed once, through
    # the carried adapters (the cache key covers them, so evaluating the images through the
    # model scores the same).
    assert result["feature_cache"] is True

    model, _, state = load_trained(outcome.run_dir)
    carried = _adapters(state.model)
    assert carried.keys() == adapters.keys()
    assert all(torch.equal(carried[k], adapters[k]) for k in adapters)
    assert [h.out_features for h in model.heads] == [10]  # the new dataset's classes
    [(_, accuracy, n)] = evaluate_checkpoint(outcome.run_dir, loader_workers=0)
    assert n > 0 and accuracy == pytest.approx(result["test_accuracy"])

    # The same --name resumes from its own checkpoint, even with the source gone since.
    shutil.rmtree(run)
    cfg = small_config(shards, tmp_path, name="new", init_from=str(run), epochs=2, **ONE_WORKER)
    again = json.loads(Path(run_training(cfg).result_file).read_text())
    assert len(again["history"]) == 2 and again["history"][0] == result["history"][0]
    _, _, state = load_trained(outcome.run_dir)
    assert all(torch.equal(state.model[k], adapters[k]) for k in adapters)


def test_train_adapters_goes_on_training_them(shards, small_config, tmp_path, source):
    run, adapters = source
    cfg = small_config(shards, tmp_path, name="tuned", init_from=run, train_adapters=True,
                       epochs=1, **ONE_WORKER)  # fmt: skip
    outcome = run_training(cfg)
    result = json.loads(Path(outcome.result_file).read_text())
    assert result["feature_cache"] is False  # the adapters train: the image path
    model, _, state = load_trained(outcome.run_dir)
    assert [h.out_features for h in model.heads] == [10]
    assert all(not torch.equal(state.model[k], adapters[k]) for k in adapters)


def test_a_source_that_does_not_fit_is_one_line_before_ray(shards, tmp_path, source, capsys):
    run, _ = source
    base = ["train", "--data", shards, "--storage", str(tmp_path), "--name", "x",
            "--weights", "none", "--image-size", "32"]  # fmt: skip
    for flags, expected in [
        (["--init-from", str(tmp_path / "nothing")], "no checkpoint found"),
        (["--init-from", shards], "no checkpoint found"),  # a dataset, not a run
        (["--init-from", run, "--seed", "7"], "another backbone"),
        (["--init-from", run, "--adapters", "layer3"], "leave --adapters out or give layer4"),
        (["--train-adapters"], "--train-adapters goes with --init-from"),
    ]:
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "x").exists()  # refused before Ray Train made the run


def test_features_through_other_adapters_are_another_cache_key(shards, source):
    """Features computed through adapters are reusable only with those very adapters."""
    from data_prep.contract import read_manifest
    from training.data.features import adapters_fingerprint, cache_key

    _, adapters = source
    model = build_model("none", [10], ["layer4"], seed=1234)
    zero = adapters_fingerprint(model)
    model.load_state_dict(adapters, strict=False)
    carried = adapters_fingerprint(model)
    assert adapters_fingerprint(build_model("none", [10], [], seed=1234)) is None
    cfg, manifest, cpu = TrainConfig.of(image_size=32), read_manifest(shards), torch.device("cpu")
    fingerprints = [None, zero, carried]
    keys = {cache_key("sha", cfg, manifest, "train", cpu, adapters=a) for a in fingerprints}
    assert len(keys) == 3
