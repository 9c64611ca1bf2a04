"""Any S3-compatible server: a proxy in front of moto acts like a server that lacks the
optional operations and stores aws-chunked uploads as they came (as servers that predate the
flexible checksums do). Everything written reads back byte-identical; optional operations
degrade with one warning."""

from __future__ import annotations

import os
import pickle
import random

from pyarrow import fs

from cluster import s3 as s3_module
from cluster import storage


def written_by_arrow(filesystem: fs.FileSystem, path: str, data: bytes) -> None:
    with filesystem.open_output_stream(path) as out:
        out.write(data)


def test_the_proxy_stores_aws_chunked_uploads_raw(s3, bucket, fault_proxy, monkeypatch):
    """The server the tests stand in for: pyarrow's default upload comes back corrupted."""
    fault_proxy.act_legacy({"ListMultipartUploads"})
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")
    host = fault_proxy.endpoint.removeprefix("http://")
    plain = fs.S3FileSystem(region="us-east-1", endpoint_override=host, scheme="http")
    data = random.Random(0).randbytes(1000)
    written_by_arrow(plain, f"{bucket[5:]}/plain.bin", data)
    stored = s3.client.get_object(Bucket=bucket[5:], Key="plain.bin")["Body"].read()
    assert fault_proxy.chunked_uploads == 1
    assert stored != data and data in stored  # chunk headers and the trailing checksum around it


def test_ray_trains_filesystem_reads_back_byte_identical(s3, bucket, fault_proxy, monkeypatch):
    fault_proxy.act_legacy({"ListMultipartUploads"})
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    s3_module.set_endpoint(fault_proxy.endpoint)
    path, filesystem = storage.ray_storage(f"{bucket}/runs")
    # Ray Train's controller and workers get the filesystem pickled.
    for i, copy in enumerate([filesystem, pickle.loads(pickle.dumps(filesystem))]):
        data = random.Random(i).randbytes(100_000)
        written_by_arrow(copy, f"{path}/object-{i}", data)
        assert (
            s3.client.get_object(Bucket=bucket[5:], Key=f"runs/object-{i}")["Body"].read() == data
        )
    assert fault_proxy.chunked_uploads == 0
    assert "AWS_REQUEST_CHECKSUM_CALCULATION" not in os.environ  # set only while it was made


def test_optional_operations_degrade_with_one_warning(s3, bucket, fault_proxy, capsys):
    fault_proxy.act_legacy({"ListMultipartUploads", "DeleteObjects"})
    s3_module.set_endpoint(fault_proxy.endpoint)
    s3_module._warned.clear()
    objects = {f"{bucket}/ds/part-{i}": random.Random(i).randbytes(5000) for i in range(3)}
    for url, data in objects.items():
        storage.write_bytes(url, data)
    for url, data in objects.items():
        assert storage.read_bytes(url) == data
    for _ in range(2):
        assert storage.clean_partial_writes(f"{bucket}/ds") == 0
    storage.remove(f"{bucket}/ds")
    assert s3.list_keys(bucket) == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert "does not implement ListMultipartUploads" in err[0] and err[0].startswith("warning: ")
    assert "does not implement DeleteObjects" in err[1]


def test_ray_trains_filesystem_keeps_retrying_however_many_writes_failed_before(
    s3, bucket, fault_proxy
):
    """The AWS SDK's standard strategy would fail writes that had attempts left once its
    per-client retry quota was spent (about 17 writes whose every request fails twice)."""
    from concurrent.futures import ThreadPoolExecutor

    s3_module.set_endpoint(fault_proxy.endpoint)
    path, filesystem = storage.ray_storage(f"{bucket}/runs")
    fault_proxy.set_faults(fail_first=2, errors=[(500, "InternalError", "Try again.")])
    names = [f"{path}/quota/{i:02d}" for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: written_by_arrow(filesystem, name, name.encode()), names))
    assert fault_proxy.injected["error"] >= 2 * len(names)
    s3_module.set_endpoint(s3.endpoint)
    stored = [storage.read_bytes(f"s3://{name}") for name in names]
    assert stored == [name.encode() for name in names]
