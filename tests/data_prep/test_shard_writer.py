"""Shard tars: readable by any tar reader, byte-deterministic, sized as planned."""

from __future__ import annotations

import hashlib
import io
import tarfile

from data_prep.shard_writer import (
    ShardWriter,
    archive_bytes,
    sample_bytes,
    sample_json,
    sample_key,
)

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
