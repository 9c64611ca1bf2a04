"""Each node's own shard cache (METATRAINER_CACHE_DIR, set per node): a node downloads its
readers' share of the training shards from S3 once per run, and a node that joins later
fills only its own share. Downloads are counted per node by the storage read log."""

from __future__ import annotations

import shutil

from ray_nodes import metatrainer

from cluster import storage
from data_prep.contract import read_manifest


def downloads(nodes, data: str) -> dict[str, int]:
    """Training-shard bytes each worker node has read from `data` so far."""
    totals = {}
    for node in nodes.nodes[1:]:
        log = storage.read_log_totals(node.env["METATRAINER_READ_LOG"])
        totals[node.name] = sum(n for url, n in log.items() if url.startswith(f"{data}/train-"))
    return totals


def test_each_node_downloads_its_share_once_and_a_new_node_only_its_own(
    nodes, shards, s3, bucket, tmp_path
):
    data = f"{bucket}/digits"
    for name in storage.list_dir(shards):
        storage.write_bytes(f"{data}/{name}", storage.read_bytes(storage.join(shards, name)))
    train = sum(s.bytes for s in read_manifest(data).shards("train"))
    for node in nodes.nodes[1:]:
        shutil.rmtree(node.env["METATRAINER_CACHE_DIR"], ignore_errors=True)

    def run(name: str, workers: int, epochs: int) -> dict[str, float]:
        before = downloads(nodes, data)
        done = metatrainer(
            "train", "--data", data, "--storage", str(tmp_path), "--name", name,
            "--weights", "none", "--image-size", "32", "--batch-size", "8", "--epochs", str(epochs),
            "--no-augment", "--workers", str(workers), "--loader-workers", "0",
            "--partitions", "6", "--feature-cache", "off", "--metrics-port", "0",
            "--s3-endpoint", s3.endpoint, "--address", nodes.address,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        after = downloads(nodes, data)
        return {n: (after[n] - before.get(n, 0)) / train for n in after}

    # 2 workers on 2 of the 3 nodes, 2 epochs: each downloads its half once, then reads its
    # cache (without it: each half twice).
    first = run("two", 2, epochs=2)
    used = sorted(n for n, share in first.items() if share > 0)
    assert len(used) == 2, first
    assert all(0.4 <= first[n] <= 0.6 for n in used), first
    # 3 workers: the third node, cold, downloads only its third; the other two only the one
    # partition of their new third that they do not have yet (a sixth each).
    second = run("three", 3, epochs=1)
    [new] = [n for n in second if n not in used]
    assert 0.25 <= second[new] <= 0.42, second
    assert all(0.1 <= second[n] <= 0.25 for n in used), second
