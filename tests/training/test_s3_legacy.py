"""prep, train, resume and evaluate against an S3-compatible server that lacks the optional
operations and stores aws-chunked uploads raw (a proxy in front of moto acting like one, see
`FaultProxy.act_legacy`), then every object written is read back and checked."""

from __future__ import annotations

import hashlib
import io
import json
import re

import pytest
import torch

from cluster import s3 as s3_module
from data_prep.contract import read_manifest
from training.cli.main import main

AWS_CHUNK = re.compile(rb"^[0-9a-fA-F]+(;[^\r\n]*)?\r\n")


def test_prep_train_resume_evaluate_on_a_legacy_s3_server(
    ray_cluster, digits_dir, s3, bucket, fault_proxy, capsys
):
    fault_proxy.act_legacy({"ListMultipartUploads"})
    s3_module._warned.clear()
    data, runs = f"{bucket}/datasets/digits", f"{bucket}/runs"
    endpoint = ["--s3-endpoint", fault_proxy.endpoint]
    assert main(["prep", str(digits_dir), data, "--num-shards", "3", *endpoint]) == 0
    err = capsys.readouterr().err
    assert err.count("does not implement ListMultipartUploads") == 1, err

    train = ["train", "--data", data, "--storage", runs, "--name", "legacy", *endpoint]
    small = ["--weights", "none", "--image-size", "32", "--workers", "2", "--batch-size", "16"]
    assert main([*train, *small, "--epochs", "1"]) == 0
    # The rerun resumes: Ray Train reads back the checkpoint list its pyarrow client wrote.
    assert main([*train, *small, "--epochs", "2"]) == 0
    capsys.readouterr()
    evaluate = ["evaluate", "--checkpoint", f"{runs}/legacy", "--loader-workers", "0"]
    assert main([*evaluate, *endpoint]) == 0
    accuracy = float(capsys.readouterr().out.strip().splitlines()[-1].split()[-1])
    result = s3.client.get_object(Bucket=bucket[5:], Key="runs/legacy/result.json")["Body"]
    result = json.loads(result.read())
    assert len(result["history"]) == 2 and accuracy == pytest.approx(result["test_accuracy"], 1e-3)

    # Every object, as the server stored it: nothing in the aws-chunked encoding, and each
    # reads as what it is.
    assert fault_proxy.chunked_uploads == 0
    manifest = read_manifest(data)
    digests = {
        sh.name: sh.sha256 for split in ("train", "val", "test") for sh in manifest.shards(split)
    }
    keys = s3.list_keys(bucket)
    assert any(k.endswith("state.pt") for k in keys) and len(digests) >= 3
    for key in keys:
        body = s3.client.get_object(Bucket=bucket[5:], Key=key)["Body"].read()
        name = key.rsplit("/", 1)[-1]
        assert not AWS_CHUNK.match(body) and b"x-amz-checksum" not in body, key
        if name.endswith(".tar") and key.startswith("datasets/"):
            assert hashlib.sha256(body).hexdigest() == digests[name], key
        elif name.endswith(".json"):
            json.loads(body)
        elif name.endswith(".pt"):
            torch.load(io.BytesIO(body), weights_only=True)
