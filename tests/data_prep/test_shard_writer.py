"""Shard tars: readable by any tar reader, byte-deterministic, sized as planned."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from data_prep.contract import (
    Shard,
    archive_bytes,
    parse_samples,
    sample_bytes,
    sample_json,
    sample_key,
)
from data_prep.shard_writer import ShardWriter

SAMPLES = [
    ("cat/1.jpg", "jpg", b"\xff\xd8" + b"x" * 1000, 0),
    ("dog/a b\nc.png", "png", b"\x89PNG" + b"y" * 513, 1),
    ("dog/ü.jpeg", "jpeg", b"z", 12),
]


def _write() -> tuple[bytes, ShardWriter]:
    buf = io.BytesIO()
    with ShardWriter(buf) as shard:
        for rel, ext, data, cls in SAMPLES:
            meta = sample_json(rel, rel.split("/")[0], 4, 3)
            shard.write_sample(sample_key(rel), ext, data, cls, meta)
    return buf.getvalue(), shard


def test_members_headers_and_hash() -> None:
    data, shard = _write()
    assert shard.num_samples == 3
    assert shard.size == len(data)
    assert shard.sha256 == hashlib.sha256(data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
        for i, (rel, ext, image, cls) in enumerate(SAMPLES):
            key = sample_key(rel)
            assert "." not in key
            assert names[3 * i : 3 * i + 3] == [f"{key}.{ext}", f"{key}.cls", f"{key}.json"]
            assert tar.extractfile(f"{key}.{ext}").read() == image
            assert tar.extractfile(f"{key}.cls").read() == str(cls).encode()


def test_two_writes_are_byte_identical() -> None:
    assert _write()[0] == _write()[0]


def test_size_is_known_before_writing() -> None:
    data, _ = _write()
    planned = sum(
        sample_bytes(len(image), cls, len(sample_json(rel, rel.split("/")[0], 4, 3)))
        for rel, _, image, cls in SAMPLES
    )
    assert archive_bytes(planned) == len(data)


def test_index_cuts_any_run_of_samples_out_of_the_shard() -> None:
    data, shard = _write()
    entry = Shard("train-000000.tar", shard.num_samples, shard.size, shard.sha256, shard.index)
    entry.check()
    offsets = entry.offsets
    for a in range(3):
        for b in range(a + 1, 4):
            got = parse_samples(data[offsets[a] : offsets[b]], b - a, "test")
            assert [s.key for s in got] == [sample_key(rel) for rel, *_ in SAMPLES[a:b]]
            assert [s.image for s in got] == [image for _, _, image, _ in SAMPLES[a:b]]
            assert [s.label for s in got] == [cls for *_, cls in SAMPLES[a:b]]


def test_a_hostile_manifest_entry_is_refused() -> None:
    data, shard = _write()
    good = dict(name="train-000000.tar", num_samples=3, bytes=shard.size, sha256=shard.sha256)
    for bad in (
        {"name": "../x.tar"},
        {"name": "/abs/train-000000.tar"},
        {"sha256": "../../etc"},
        {"index": "not base64!"},
        {"num_samples": 4},
        {"bytes": shard.size + 512 * 20},
    ):
        entry = Shard(**{**good, "index": shard.index, **bad})
        with pytest.raises(ValueError):
            entry.check()
