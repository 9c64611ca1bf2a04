"""The node cache of shard byte ranges, against a real S3 server over HTTP (moto on 127.0.0.1)
behind a proxy that counts the bytes it serves, with real processes sharing one directory."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random

import pytest

from cluster import s3 as s3_module
from cluster import storage
from cluster.errors import UserError
from data_prep.contract import Shard
from training.data import shard_cache
from training.data.shard_cache import ShardCache

SIZE = 10_000
ENTRIES = [range(i, i + 1_000) for i in range(0, SIZE, 1_000)]


@pytest.fixture
def remote(bucket, s3, fault_proxy) -> tuple[str, Shard, bytes]:
    """A shard on S3, read through the counting proxy."""
    data = random.Random(0).randbytes(SIZE)
    url = storage.join(bucket, "data", "train-000000.tar")
    storage.write_bytes(url, data)
    s3_module.set_endpoint(fault_proxy.endpoint)
    shard = Shard("train-000000.tar", 10, SIZE, hashlib.sha256(data).hexdigest())
    return url, shard, data


def test_a_miss_downloads_the_entry_once_and_later_reads_come_from_disk(
    remote, fault_proxy, tmp_path, monkeypatch
):
    url, shard, data = remote
    monkeypatch.setattr(shard_cache, "PIECE", 1_500)  # an entry in several ranged reads
    cache = ShardCache(str(tmp_path / "cache"), limit_bytes=SIZE)
    entry = range(2_000, 6_000)

    assert cache.read(url, shard, entry, range(2_500, 2_600)) == data[2_500:2_600]
    assert fault_proxy.bytes_served(url) == len(entry)
    assert fault_proxy.requests_served(url) == 3

    fault_proxy.reset_counts()
    assert cache.read(url, shard, entry, range(5_000, 6_000)) == data[5_000:6_000]
    assert cache.read(url, shard, entry, entry) == data[2_000:6_000]
    assert ShardCache(str(tmp_path / "cache"), SIZE).read(url, shard, entry, range(2_000, 2_001))
    assert fault_proxy.bytes_served(url) == 0
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".part"] == []


def read_together(barrier, cache: ShardCache, url: str, shard: Shard, entry: range, want: range):
    barrier.wait(timeout=60)
    return cache.read(url, shard, entry, want)


def test_processes_reading_one_entry_at_once_download_it_once(
    remote, fault_proxy, tmp_path, monkeypatch, request
):
    url, shard, data = remote
    cache = ShardCache(str(tmp_path / "cache"), limit_bytes=SIZE)
    entry = range(1_000, 9_000)
    wants = [range(1_000, 1_100), range(3_000, 9_000), range(8_999, 9_000), entry]
    fault_proxy.set_faults(delay=0.3, methods={"GET"})  # the others ask while one downloads
    # Spawned processes import `read_together` from this module by its package path.
    monkeypatch.syspath_prepend(str(request.config.rootpath))
    spawn = multiprocessing.get_context("spawn")
    with spawn.Manager() as manager, spawn.Pool(len(wants)) as pool:
        barrier = manager.Barrier(len(wants))  # one task per process: each waits for the rest
        jobs = [(barrier, cache, url, shard, entry, want) for want in wants]
        results = pool.starmap(read_together, jobs)

    assert results == [data[w.start : w.stop] for w in wants]
    assert fault_proxy.bytes_served(url) == len(entry)
    assert fault_proxy.requests_served(url) == 1


def test_eviction_keeps_the_cache_under_its_limit_and_drops_the_least_recently_used(
    remote, fault_proxy, tmp_path
):
    url, shard, data = remote
    directory = tmp_path / "cache"
    cache = ShardCache(str(directory), limit_bytes=2_500)

    def use(entry: range) -> None:
        assert cache.read(url, shard, entry, entry) == data[entry.start : entry.stop]
        assert sum(p.stat().st_size for p in directory.iterdir()) <= 2_500
        # Recency is the entries' mtimes, set to now on admission and on every hit. Each use
        # ages every entry by a minute, so the next use is the newest whatever the clock's
        # tick: the order of the mtimes is the order of use.
        for p in directory.glob("*.entry"):
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - 60 * 10**9))

    for entry in [ENTRIES[0], ENTRIES[1], ENTRIES[0], *ENTRIES[2:]]:  # the first is used again
        use(entry)
        if entry == ENTRIES[2]:
            fault_proxy.reset_counts()
            use(ENTRIES[0])
            assert fault_proxy.bytes_served(url) == 0  # used after the second: kept

    fault_proxy.reset_counts()
    cache.read(url, shard, ENTRIES[-1], ENTRIES[-1])
    assert fault_proxy.bytes_served(url) == 0  # just admitted: kept
    cache.read(url, shard, ENTRIES[1], ENTRIES[1])
    assert fault_proxy.bytes_served(url) == 1_000  # evicted: downloaded again


def test_an_entry_larger_than_the_limit_is_still_served(remote, tmp_path):
    url, shard, data = remote
    cache = ShardCache(str(tmp_path / "cache"), limit_bytes=100)
    for entry in ENTRIES[:3]:
        assert cache.read(url, shard, entry, entry) == data[entry.start : entry.stop]


def test_a_reader_keeps_reading_an_entry_another_process_evicts(
    remote, fault_proxy, tmp_path, monkeypatch
):
    url, shard, data = remote
    directory = str(tmp_path / "cache")
    cache = ShardCache(directory, limit_bytes=1_500)
    cache.read(url, shard, ENTRIES[0], ENTRIES[0])
    read_open_entry = shard_cache._pread_exact

    def evict_then_read(fd: int, n: int, offset: int) -> bytes:
        # The entry is open here: another process admits a second one, which evicts it.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            other = ShardCache(directory, limit_bytes=1_500)
            pool.apply(other.read, (url, shard, ENTRIES[1], ENTRIES[1]))
        assert len(list(tmp_path.glob("cache/*.entry"))) == 1
        return read_open_entry(fd, n, offset)

    monkeypatch.setattr(shard_cache, "_pread_exact", evict_then_read)
    assert cache.read(url, shard, ENTRIES[0], range(100, 900)) == data[100:900]
    monkeypatch.setattr(shard_cache, "_pread_exact", read_open_entry)

    fault_proxy.reset_counts()
    cache.read(url, shard, ENTRIES[0], ENTRIES[0])
    assert fault_proxy.bytes_served(url) == 1_000  # it was evicted


def test_an_entry_locked_by_another_process_is_not_evicted(remote, fault_proxy, tmp_path):
    url, shard, data = remote
    cache = ShardCache(str(tmp_path / "cache"), limit_bytes=1_500)
    cache.read(url, shard, ENTRIES[0], ENTRIES[0])
    other = ShardCache(str(tmp_path / "cache"), limit_bytes=1_500)  # its own lock descriptors

    with other._locked(f"{shard.sha256}-0-1000", blocking=True):
        cache.read(url, shard, ENTRIES[1], ENTRIES[1])

    fault_proxy.reset_counts()
    cache.read(url, shard, ENTRIES[0], ENTRIES[0])
    assert fault_proxy.bytes_served(url) == 0


@pytest.mark.parametrize(
    "sha256", ["../../../etc/passwd", "A" * 64, "0" * 63, "0" * 63 + "/", "0" * 64 + "\n"]
)
def test_a_bad_sha256_in_the_manifest_is_a_user_error(sha256, tmp_path):
    cache = ShardCache(str(tmp_path / "cache"), limit_bytes=SIZE)
    shard = Shard("train-000000.tar", 10, SIZE, sha256)
    with pytest.raises(UserError, match="sha256 .* is not 64 lowercase hex digits; .*prep again"):
        cache.read(str(tmp_path / "train-000000.tar"), shard, ENTRIES[0], ENTRIES[0])
    assert list(tmp_path.rglob("*")) == [tmp_path / "cache"]


def test_a_range_outside_the_shard_is_a_user_error(tmp_path):
    cache = ShardCache(str(tmp_path / "cache"), limit_bytes=SIZE)
    shard = Shard("train-000000.tar", 10, SIZE, "0" * 64)
    with pytest.raises(UserError, match="outside its 10000 bytes"):
        cache.read(str(tmp_path / "x.tar"), shard, range(9_000, 11_000), range(9_000, 9_001))


def test_a_local_shard_is_cached_too(tmp_path):
    data = random.Random(1).randbytes(SIZE)
    url = str(tmp_path / "train-000000.tar")
    storage.write_bytes(url, data)
    shard = Shard("train-000000.tar", 10, SIZE, hashlib.sha256(data).hexdigest())
    cache = ShardCache(str(tmp_path / "cache"), limit_bytes=SIZE)
    assert cache.read(url, shard, ENTRIES[3], range(3_100, 3_200)) == data[3_100:3_200]
    storage.remove(url)
    assert cache.read(url, shard, ENTRIES[3], range(3_900, 4_000)) == data[3_900:4_000]
