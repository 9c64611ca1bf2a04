"""A local disk cache for shards streamed from S3, so later epochs read them from disk.

Entries are named by the shard's sha256 (from the manifest), so a cached file can never be
stale, and datasets can share a cache directory. A shard is cached only when it was read to
the end and its bytes check out; the least recently used entries go when the size limit is
passed. Several loader processes may fill the cache at once: each writes its own temporary
file and renames it into place.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from cluster import storage
from data_prep.manifest import Shard


class ShardCache:
    def __init__(self, directory: str, limit_bytes: int) -> None:
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.limit = limit_bytes

    def open(self, url: str, shard: Shard) -> BinaryIO:
        path = self.directory / f"{shard.sha256}.tar"
        if path.is_file() and path.stat().st_size == shard.bytes:
            os.utime(path)  # mark as recently used
            return path.open("rb")
        return _Tee(storage.open_read(url, shard.bytes), self, path, shard)

    def _admit(self, tmp: Path, path: Path) -> None:
        os.replace(tmp, path)
        entries = sorted(self.directory.glob("*.tar"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for old in entries:
            if total <= self.limit:
                break
            total -= old.stat().st_size
            old.unlink(missing_ok=True)


class _Tee(io.RawIOBase):
    """Reads through to the remote stream and copies what it reads into a temporary file."""

    def __init__(self, remote: BinaryIO, cache: ShardCache, path: Path, shard: Shard) -> None:
        super().__init__()
        self.remote, self.cache, self.path, self.shard = remote, cache, path, shard
        fd, tmp = tempfile.mkstemp(dir=cache.directory, prefix=".", suffix=".tmp")
        self.tmp = Path(tmp)
        self.copy = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()
        self.seen = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.remote.read(len(b))
        b[: len(data)] = data
        self.copy.write(data)
        self.hash.update(data)
        self.seen += len(data)
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        complete = self.seen == self.shard.bytes and self.remote.read(1) == b""
        self.remote.close()
        self.copy.close()
        if complete and self.hash.hexdigest() == self.shard.sha256:
            self.cache._admit(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)
        super().close()
