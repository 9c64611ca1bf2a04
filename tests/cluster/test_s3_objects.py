"""The storage API's object operations on s3:// URLs, against a real S3 server over HTTP (moto
on 127.0.0.1): writes, reads, listing, removal and multipart uploads, through a proxy that
injects server errors and cut-off bodies."""

from __future__ import annotations

import hashlib
import random

import pytest
from boto3.s3.transfer import TransferConfig

from cluster import s3 as s3_module
from cluster import s3_objects, storage


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def small_parts(monkeypatch) -> None:
    """Multipart uploads from 5 MiB (S3's smallest part) instead of 64 MiB."""
    monkeypatch.setattr(
        s3_objects,
        "TRANSFER",
        TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20),
    )


def test_write_read_list_and_remove_round_trip(bucket, s3):
    run = storage.join(bucket, "run")
    storage.write_bytes(storage.join(run, "a.bin"), b"alpha")
    storage.write_bytes(storage.join(run, "sub", "b.bin"), b"beta")
    storage.write_bytes(storage.join(bucket, "runner", "c.bin"), b"not under run/")

    assert storage.exists(storage.join(run, "a.bin"))
    assert not storage.exists(storage.join(run, "missing.bin"))
    assert storage.read_bytes(storage.join(run, "sub", "b.bin")) == b"beta"
    assert storage.list_dir(run) == ["a.bin", "sub"]
    assert storage.list_dir(storage.join(bucket, "nothing-here")) == []

    storage.remove(run)
    assert s3.list_keys(bucket) == ["runner/c.bin"]
    assert storage.list_dir(run) == []


def test_a_failed_write_publishes_nothing(bucket, s3):
    url = storage.join(bucket, "manifest.json")
    storage.write_bytes(url, b"old")
    with pytest.raises(RuntimeError):
        with storage.open_write(url) as f:
            f.write(b"half of the new one")
            raise RuntimeError("writer killed")
    assert storage.read_bytes(url) == b"old"
    assert s3.list_keys(bucket) == ["manifest.json"]


def test_put_file_uploads_and_has_file_verifies(bucket, s3, tmp_path):
    data = payload(100_000)
    digest = hashlib.sha256(data).hexdigest()
    local = tmp_path / "shard.tar"
    local.write_bytes(data)
    url = storage.join(bucket, "data", "train-000000.tar")

    storage.put_file(local, url, digest)

    assert not local.exists()
    assert storage.read_bytes(url) == data
    assert storage.has_file(url, len(data), digest)
    assert not storage.has_file(url, len(data), hashlib.sha256(b"other").hexdigest())
    assert not storage.has_file(url, len(data) + 1, digest)
    assert not storage.has_file(storage.join(bucket, "data", "absent.tar"), len(data), digest)


def test_multipart_upload_arrives_byte_identical(bucket, s3, small_parts, tmp_path):
    data = payload(11 * 2**20 + 7)
    local = tmp_path / "big.tar"
    local.write_bytes(data)
    url = storage.join(bucket, "big.tar")

    storage.put_file(local, url, hashlib.sha256(data).hexdigest())

    name, key = s3_module.split(url)
    assert s3.client.head_object(Bucket=name, Key=key)["ETag"].endswith('-3"')  # 3 parts
    assert storage.read_bytes(url) == data
    assert storage.has_file(url, len(data), hashlib.sha256(data).hexdigest())


def test_multipart_upload_survives_server_errors(bucket, s3, small_parts, fault_proxy):
    data = payload(10 * 2**20 + 1, seed=1)
    url = storage.join(bucket, "flaky-upload.bin")
    s3_module.set_endpoint(fault_proxy.endpoint)
    fault_proxy.set_faults(error_rate=0.25, seed=1)

    storage.write_bytes(url, data)

    assert fault_proxy.injected["error"] > 0
    assert storage.read_bytes(url) == data
    assert s3.client.list_multipart_uploads(Bucket=s3_module.split(url)[0]).get("Uploads") is None


def test_read_bytes_survives_errors_and_cut_off_bodies(bucket, s3, fault_proxy):
    objects = {storage.join(bucket, f"obj-{i}"): payload(50_000 + i, seed=i) for i in range(8)}
    for url, data in objects.items():
        storage.write_bytes(url, data)
    s3_module.set_endpoint(fault_proxy.endpoint)
    fault_proxy.set_faults(error_rate=0.2, truncate_rate=0.2, seed=5)

    assert {url: storage.read_bytes(url) for url in objects} == objects

    assert fault_proxy.injected["error"] > 0
    assert fault_proxy.injected["truncate"] > 0


def test_clean_partial_writes_aborts_dangling_multipart_uploads(bucket, s3):
    name = s3_module.split(bucket)[0]
    for key in ("run/train-000003.tar", "other-run/train-000000.tar"):
        upload = s3.client.create_multipart_upload(Bucket=name, Key=key)
        s3.client.upload_part(
            Bucket=name, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1000
        )

    assert storage.clean_partial_writes(storage.join(bucket, "run")) == 1

    left = s3.client.list_multipart_uploads(Bucket=name).get("Uploads", [])
    assert [u["Key"] for u in left] == ["other-run/train-000000.tar"]
    assert storage.clean_partial_writes(storage.join(bucket, "run")) == 0
