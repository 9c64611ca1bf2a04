"""Streamed reads of s3:// URLs (`storage.open_read`, `s3_stream`), against a real S3 server
over HTTP (moto on 127.0.0.1) with a proxy that injects server errors, cut-off bodies and
delays: byte-identical, closed early without hanging, failing again after an error."""

from __future__ import annotations

import random
import threading
import time

import pytest

from cluster import s3 as s3_module
from cluster import s3_stream, storage
from cluster.errors import UserError


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def small_chunks(monkeypatch) -> int:
    """Streaming reads in 64 KiB ranged GETs, so a small object spans many chunks."""
    monkeypatch.setattr(s3_stream, "CHUNK", 64 * 2**10)
    return s3_stream.CHUNK


def read_in_odd_pieces(url: str, size: int | None = None) -> bytes:
    pieces = []
    with storage.open_read(url, size) as f:
        while piece := f.read(40_009):
            pieces.append(piece)
    return b"".join(pieces)


def test_streaming_read_spanning_many_chunks_is_byte_identical(bucket, s3, small_chunks):
    data = payload(20 * small_chunks + 12_345)
    url = storage.join(bucket, "stream.tar")
    storage.write_bytes(url, data)

    assert read_in_odd_pieces(url) == data
    assert read_in_odd_pieces(url, size=len(data)) == data


def test_streaming_read_survives_errors_and_cut_off_bodies(bucket, s3, small_chunks, fault_proxy):
    data = payload(12 * small_chunks + 999, seed=2)
    url = storage.join(bucket, "stream.tar")
    storage.write_bytes(url, data)
    s3_module.set_endpoint(fault_proxy.endpoint)
    fault_proxy.set_faults(error_rate=0.2, truncate_rate=0.2, seed=4)

    assert read_in_odd_pieces(url) == data

    assert fault_proxy.injected["error"] > 0
    assert fault_proxy.injected["truncate"] > 0


def _fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_fetch" in t.name]


def test_closing_a_stream_early_returns_at_once_and_stops_reading_ahead(
    bucket, s3, small_chunks, fault_proxy
):
    url = storage.join(bucket, "long.tar")
    storage.write_bytes(url, payload(40 * small_chunks))
    # Slow GETs: the stream is closed while read-ahead requests are still in flight.
    s3_module.set_endpoint(fault_proxy.endpoint)
    fault_proxy.set_faults(delay=0.2, methods={"GET"})
    before = set(_fetch_threads())

    closed = threading.Event()

    def read_a_little_and_close() -> None:
        with storage.open_read(url) as f:
            assert len(f.read(10)) == 10
        closed.set()

    reader = threading.Thread(target=read_a_little_and_close, daemon=True)
    reader.start()
    assert closed.wait(timeout=10), "closing a half-read stream hung"

    deadline = time.monotonic() + 10
    while set(_fetch_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(_fetch_threads()) - before, "the read-ahead thread kept running after close"


def test_reading_again_after_a_stream_error_raises_again_instead_of_hanging(bucket, s3):
    # The size is given (as the loader does from the manifest), so the error comes mid-stream.
    # The raw stream, not storage.open_read's buffered one: closing that would wait forever
    # for the lock a hung read holds.
    stream = s3_stream.StreamReader(storage.join(bucket, "deleted-shard.tar"), size=1000)
    errors: list[Exception] = []

    def read_twice() -> None:
        for _ in range(2):
            try:
                stream.read(10)
            except UserError as e:
                errors.append(e)

    reader = threading.Thread(target=read_twice, daemon=True)
    reader.start()
    reader.join(timeout=3)
    stream.close()
    assert len(errors) == 2, "a second read after an error hung"
