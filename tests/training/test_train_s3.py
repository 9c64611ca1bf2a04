"""Training from and to S3 on a real S3 server over HTTP on 127.0.0.1 (moto), with faults."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sample_log import wait_for

from cluster import s3 as s3_backend
from cluster import storage
from cluster.world import World
from data_prep.contract import read_manifest
from data_prep.prep import prep
from training.config import TrainConfig
from training.data.batches import TrainBatches
from training.data.loader import build_loader
from training.run.driver import run_training
from training.run.evaluate import evaluate_checkpoint


def test_prep_train_checkpoint_resume_evaluate_on_s3(
    ray_cluster, digits_dir: Path, s3, bucket: str, fault_proxy, small_config, tmp_path
):
    def config(data: str, runs: str, endpoint: str, **overrides) -> TrainConfig:
        # The image path: with the feature cache, the epochs after the first read no shards.
        values = {"name": "digits-s3", "batch_size": 16, "epochs": 2, "s3_endpoint": endpoint,
                  "feature_cache": "off"}  # fmt: skip
        return small_config(data, runs, **{**values, **overrides})

    data, runs = f"{bucket}/datasets/digits", f"{bucket}/runs"
    manifest = prep(str(digits_dir), data, num_shards=3)
    cache, log = tmp_path / "cache", tmp_path / "log"

    # 2 epochs, 2 workers × 2 loader workers, through a proxy that counts what S3 served: the
    # first epoch downloads each training byte once into the node's shard cache, the second
    # reads every image from there and nothing from S3.
    cfg = config(data, runs, fault_proxy.endpoint, cache_dir=str(cache), loader_workers=2,
                 sample_log=str(log))  # fmt: skip
    train = f"{data}/train-"
    last_step = (manifest.num_samples("train") // 32 - 1) * 32  # of the first epoch
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_training, cfg)
        deadline = time.monotonic() + 300
        wait_for(log / "rank-0.tsv", 0, (0, last_step), deadline, lambda: not running.done())
        # The first epoch has read all it trains on; the second reads after its validation.
        first_epoch = fault_proxy.bytes_served(train)
        fault_proxy.reset_counts()
        first = running.result()
    shard_bytes = sum(sh.bytes for sh in manifest.shards("train"))
    assert 0.9 * shard_bytes <= first_epoch <= 1.1 * shard_bytes, (first_epoch, shard_bytes)
    assert fault_proxy.requests_served(train) == 0 and fault_proxy.bytes_served(train) == 0
    assert first.metrics["feature_cache"] is False
    keys = s3.list_keys(bucket, "runs/digits-s3/")
    assert "runs/digits-s3/result.json" in keys
    assert sum(k.endswith("/state.pt") for k in keys) == 2
    assert first.checkpoint and first.checkpoint.startswith(f"{runs}/digits-s3/checkpoint_")
    result = json.loads(storage.read_bytes(first.result_file))

    # Resume from the S3 checkpoint, through a proxy that fails and cuts off responses.
    fault_proxy.set_faults(error_rate=0.1, truncate_rate=0.1, seed=7)
    second = run_training(config(data, runs, fault_proxy.endpoint, epochs=3))
    assert fault_proxy.injected["error"] > 0
    resumed = json.loads(storage.read_bytes(second.result_file))
    assert resumed["history"][:2] == result["history"]
    assert len(resumed["history"]) == 3 and resumed["step"] == result["step"] * 3 // 2

    s3_backend.set_endpoint(s3.endpoint)
    [(_, accuracy, n)] = evaluate_checkpoint(f"{runs}/digits-s3", loader_workers=0)
    assert accuracy == pytest.approx(resumed["test_accuracy"]) and n > 0


def test_an_epoch_reads_each_s3_byte_once_at_any_shape(shards, s3, bucket, fault_proxy):
    """No cache: 2 ranks × 2 loader workers, 3 ranks × 3 and 5 ranks × 1 (which do not divide
    the 16 partitions) read the training shards once."""
    data = f"{bucket}/datasets/once"
    for name in storage.list_dir(shards):
        storage.write_bytes(f"{data}/{name}", storage.read_bytes(storage.join(shards, name)))
    manifest = read_manifest(data)
    shard_bytes = sum(sh.bytes for sh in manifest.shards("train"))
    s3_backend.set_endpoint(fault_proxy.endpoint)
    cfg = TrainConfig.of(batch_size=8, partitions=16, shuffle_block=8)
    for ranks, workers in [(2, 2), (3, 3), (5, 1)]:
        fault_proxy.reset_counts()
        for rank in range(ranks):
            batches = TrainBatches.from_config(data, manifest, "train", cfg, World(rank, ranks))
            batches.set_position(epoch=1)
            assert sum(len(y) for _, y in build_loader(batches, workers)) > 0
        served = fault_proxy.bytes_served(f"{data}/train-")
        assert 0.9 * shard_bytes <= served <= 1.1 * shard_bytes, (ranks, workers, served)


def test_s3_errors_in_train_and_evaluate_are_one_line(s3, bucket, tmp_path, capsys):
    from training.cli.main import main

    cases = [
        (["train", "--data", "s3://no-such-bucket-here/d", "--storage", str(tmp_path)],
         "bucket no-such-bucket-here does not exist"),
        (["train", "--data", f"{bucket}/never-prepared", "--storage", str(tmp_path)],
         "metatrainer prep"),
        (["evaluate", "--checkpoint", f"{bucket}/runs/none"], "no checkpoint found"),
        (["train", "--data", "s3://", "--storage", str(tmp_path)], "not an S3 URL"),
    ]  # fmt: skip
    for argv, expected in cases:
        argv = [*argv, "--name", "x"] if argv[0] == "train" else argv
        assert main([*argv, "--s3-endpoint", s3.endpoint]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert "testing" not in err  # the (dummy) credentials never appear
