"""Local storage: atomic writes, clear errors."""

from __future__ import annotations

import pytest

from cluster import storage
from cluster.errors import UserError


def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    url = storage.join(str(tmp_path), "a", "b.bin")
    storage.write_bytes(url, b"one")
    with pytest.raises(RuntimeError):
        with storage.open_write(url) as f:
            f.write(b"half of two")
            raise RuntimeError("interrupted")
    assert storage.read_bytes(url) == b"one"
    assert storage.list_dir(storage.join(str(tmp_path), "a")) == ["b.bin"]


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        storage.read_bytes(str(tmp_path / "nope"))


def test_unknown_scheme_is_a_user_error():
    with pytest.raises(UserError, match="unsupported URL scheme"):
        storage.exists("gs://bucket/x")


def test_join_and_normalize(tmp_path):
    assert storage.join("s3://bucket/prefix/", "x", "y.tar") == "s3://bucket/prefix/x/y.tar"
    assert storage.normalize(str(tmp_path / "." / "d")) == str(tmp_path / "d")
