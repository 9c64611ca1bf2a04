"""Ranged reads of local files and S3 objects (a real S3 server over HTTP: moto on 127.0.0.1),
the read log that counts the bytes they read, and the test proxy's count of bytes served."""

from __future__ import annotations

import multiprocessing
import os
import random

import pytest

from cluster import s3 as s3_module
from cluster import storage
from cluster.errors import UserError

RANGES = [(0, 1), (0, 10_000), (123, 4_567), (9_999, 10_000), (500, 500)]


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def local_file(tmp_path) -> tuple[str, bytes]:
    data = payload(10_000)
    url = str(tmp_path / "train-000000.tar")
    storage.write_bytes(url, data)
    return url, data


@pytest.fixture
def s3_object(bucket, s3) -> tuple[str, bytes]:
    data = payload(10_000, seed=1)
    url = storage.join(bucket, "data", "train-000000.tar")
    storage.write_bytes(url, data)
    return url, data


@pytest.fixture
def read_log(tmp_path, monkeypatch) -> str:
    directory = str(tmp_path / "read-log")
    monkeypatch.setenv(storage.READ_LOG_VAR, directory)
    return directory


@pytest.mark.parametrize("where", ["local_file", "s3_object"])
def test_read_range_returns_exactly_the_bytes_asked_for(where, request):
    url, data = request.getfixturevalue(where)
    for start, stop in RANGES:
        assert storage.read_range(url, start, stop) == data[start:stop]


@pytest.mark.parametrize("where", ["local_file", "s3_object"])
@pytest.mark.parametrize("start", [9_000, 10_000, 20_000], ids=["across", "at", "past"])
def test_reading_past_the_end_says_the_file_changed_after_prep(where, start, request):
    url, _ = request.getfixturevalue(where)
    with pytest.raises(UserError, match="shorter than expected.*changed after prep.*prep again"):
        storage.read_range(url, start, start + 2_000)


def test_read_range_of_a_missing_file_is_a_user_error(tmp_path, bucket, s3):
    for url in (str(tmp_path / "nope.tar"), storage.join(bucket, "nope.tar")):
        with pytest.raises(UserError, match="does not exist"):
            storage.read_range(url, 0, 10)


def test_s3_read_range_survives_errors_and_cut_off_bodies(s3_object, fault_proxy):
    url, data = s3_object
    s3_module.set_endpoint(fault_proxy.endpoint)
    fault_proxy.set_faults(error_rate=0.2, truncate_rate=0.4, seed=3)

    for start in range(0, 8_700, 900):
        assert storage.read_range(url, start, start + 1_300) == data[start : start + 1_300]

    assert fault_proxy.injected["truncate"] > 0
    assert fault_proxy.injected["error"] > 0


def test_the_proxy_counts_exactly_the_bytes_of_a_ranged_get(s3_object, fault_proxy):
    url, data = s3_object
    s3_module.set_endpoint(fault_proxy.endpoint)

    assert storage.read_range(url, 1_000, 3_500) == data[1_000:3_500]
    assert storage.read_range(url, 7, 7) == b""  # no request at all

    assert fault_proxy.requests_served(url) == 1
    assert fault_proxy.bytes_served(url) == 2_500
    assert fault_proxy.bytes_served(storage.join(url, "..", "other")) == 0
    fault_proxy.reset_counts()
    assert fault_proxy.bytes_served() == 0


def test_the_proxy_counts_only_what_it_sent_of_a_cut_off_body(s3_object, fault_proxy):
    url, data = s3_object
    s3_module.set_endpoint(fault_proxy.endpoint)
    fault_proxy.set_faults(truncate_rate=1.0, seed=7)
    client = s3_module.client()
    name, key = s3_module.split(url)

    body = client.get_object(Bucket=name, Key=key, Range="bytes=0-3999")["Body"]
    with pytest.raises(Exception, match="(?i)read|connection"):
        body.read()

    assert fault_proxy.requests_served(url) == 1
    assert 0 < fault_proxy.bytes_served(url) < 4_000


def test_the_read_log_counts_exactly_the_bytes_read(local_file, s3_object, read_log):
    for url, data in (local_file, s3_object):
        storage.read_range(url, 100, 300)
        storage.read_range(url, 5_000, 5_001)
        storage.read_range(url, 9, 9)
        assert storage.read_bytes(url) == data
        with storage.open_read(url) as f:
            assert f.read(777) == data[:777]
            assert f.readline() == data[777 : data.index(b"\n", 777) + 1]

    totals = storage.read_log_totals(read_log)
    for url, data in (local_file, s3_object):
        line_end = data.index(b"\n", 777) + 1
        assert totals[url] == 200 + 1 + len(data) + line_end
    assert set(totals) == {local_file[0], s3_object[0]}


def test_the_read_log_counts_reads_of_child_processes(local_file, s3_object, read_log):
    jobs = [(local_file[0], 0, 1_000), (s3_object[0], 2_000, 2_345), (s3_object[0], 0, 10)]
    # Spawned, like DataLoader workers on macOS: nothing inherited but the environment.
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(storage.read_range, jobs)

    assert results == [local_file[1][:1_000], s3_object[1][2_000:2_345], s3_object[1][:10]]
    assert storage.read_log_totals(read_log) == {local_file[0]: 1_000, s3_object[0]: 355}
    assert f"{os.getpid()}.tsv" not in os.listdir(read_log)


def test_nothing_is_logged_without_the_variable(local_file, tmp_path, monkeypatch):
    monkeypatch.delenv(storage.READ_LOG_VAR, raising=False)
    url, data = local_file
    with storage.open_read(url) as f:
        assert f.read() == data
    storage.read_range(url, 0, 10)
    assert storage.read_log_totals(str(tmp_path)) == {}
