"""A node-local disk cache of shard byte ranges, shared by every rank and loader process.

An entry is one byte range of one shard (the part a data partition owns, the same every
epoch), kept as the file `<sha256>-<start>-<stop>.entry`; the shard's sha256 comes from an
untrusted manifest, so it is checked before it names a file. Entries cannot be stale (a new
shard has a new sha256), but their bytes cannot be checked either: the sha256 covers the whole
shard, and an entry is only part of it.

Processes coordinate through the filesystem only:
- A hit opens the entry and then checks its size on the open file. Another process may unlink
  the entry at any moment; an open descriptor keeps reading it, and ENOENT is a miss.
- A miss takes an exclusive `flock` on `<name>.lock`, looks again (another process may just
  have filled it), else downloads the entry in ranged reads of at most PIECE bytes into
  `<name>.part`, fsyncs it and renames it into place. So a node downloads an entry once.
- Eviction, after each admission, unlinks least recently used entries (mtime, touched on every
  hit) until the total is under the limit; never the entry just admitted, never one whose lock
  another process holds. It removes an entry's lock file while holding it, so whoever takes a
  lock checks that its file is still the one at the path.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster import storage
from cluster.errors import UserError
from data_prep.contract import SHA256, Shard

PIECE = 16 * 2**20
"""The most bytes one ranged read fetches while filling an entry."""
_SUFFIXES = (".entry", ".part")


class ShardCache:
    def __init__(self, directory: str, limit_bytes: int) -> None:
        self.directory = Path(directory).expanduser()
        with self._disk_errors():
            self.directory.mkdir(parents=True, exist_ok=True)
        self.limit = limit_bytes

    def read(self, url: str, shard: Shard, entry: range, want: range) -> bytes:
        """Bytes `want` of the shard at `url`, from the cached entry `entry` that holds them
        (downloaded first on a miss). Both are byte ranges of the whole shard."""
        name = _entry_name(shard, entry)
        if not (entry.start <= want.start <= want.stop <= entry.stop and want.step == 1):
            raise ValueError(f"{want} is not a byte range inside the entry {entry}")
        if not want:
            return b""
        fd = _open_entry(self.directory / f"{name}.entry", len(entry))
        admitted = fd is None
        if fd is None:
            fd = self._fill(url, name, entry)
        try:
            if admitted:
                self._evict(keep=name)
            return _pread_exact(fd, len(want), want.start - entry.start)
        finally:
            os.close(fd)

    def _fill(self, url: str, name: str, entry: range) -> int:
        """Download the entry unless another process just did; an open descriptor of it."""
        path = self.directory / f"{name}.entry"
        with self._locked(name, blocking=True):
            fd = _open_entry(path, len(entry))
            if fd is not None:
                return fd
            part = self.directory / f"{name}.part"
            with self._disk_errors():
                fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                for start in range(entry.start, entry.stop, PIECE):
                    data = storage.read_range(url, start, min(start + PIECE, entry.stop))
                    with self._disk_errors():
                        _write_all(fd, data)
                with self._disk_errors():
                    os.fsync(fd)
                    os.replace(part, path)
            except BaseException:
                os.close(fd)
                part.unlink(missing_ok=True)
                raise
        return fd

    @contextmanager
    def _disk_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            raise UserError(
                f"cannot write the shard cache {self.directory}: {e.strerror}; free space there "
                "or choose another cache directory"
            ) from None

    def _evict(self, keep: str) -> None:
        """Unlink least recently used entries until the total is under the limit."""
        entries: dict[str, tuple[int, int]] = {}  # name -> (last used, bytes)
        for p in self.directory.iterdir():
            if p.suffix not in _SUFFIXES:
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # another process evicted it
            used, size = entries.get(p.stem, (0, 0))
            entries[p.stem] = (max(used, st.st_mtime_ns), size + st.st_size)
        total = sum(size for _, size in entries.values())
        entries.pop(keep, None)
        for name, (_, size) in sorted(entries.items(), key=lambda item: item[1]):
            if total <= self.limit:
                return
            if self._remove(name):
                total -= size

    def _remove(self, name: str) -> bool:
        """Unlink the entry (and a leftover partial download) unless another process holds its
        lock; True if so."""
        with self._locked(name, blocking=False) as locked:
            if not locked:
                return False
            try:
                for suffix in _SUFFIXES:
                    (self.directory / f"{name}{suffix}").unlink(missing_ok=True)
                # Still holding the lock: whoever waits on this file sees it gone, starts over.
                (self.directory / f"{name}.lock").unlink(missing_ok=True)
            except PermissionError:
                return False  # another user's entry in a shared directory
        return True

    @contextmanager
    def _locked(self, name: str, blocking: bool) -> Iterator[bool]:
        """Hold the exclusive lock of entry `name`; yields False if not blocking and it is held."""
        path = self.directory / f"{name}.lock"
        while True:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, path):
                break
            os.close(fd)  # evicted while we waited: lock the new file at the path
        try:
            yield True
        finally:
            os.close(fd)  # closing releases the lock


def _entry_name(shard: Shard, entry: range) -> str:
    if not isinstance(shard.sha256, str) or not SHA256.fullmatch(shard.sha256):
        raise UserError(
            f"shard {shard.name}: sha256 {str(shard.sha256)[:80]!r} is not 64 lowercase hex "
            "digits; the manifest is corrupt, run prep again"
        )
    if not (0 <= entry.start <= entry.stop <= shard.bytes and entry.step == 1):
        raise UserError(
            f"shard {shard.name}: byte range [{entry.start}, {entry.stop}) is outside its "
            f"{shard.bytes} bytes; the manifest is corrupt, run prep again"
        )
    return f"{shard.sha256}-{entry.start}-{entry.stop}"


def _open_entry(path: Path, size: int) -> int | None:
    """An open descriptor of a complete entry, or None. Open first, then check: an entry may be
    unlinked at any time, and a descriptor opened before that keeps reading it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    if os.fstat(fd).st_size != size:
        os.close(fd)
        return None
    try:
        os.utime(fd)  # recently used
    except PermissionError:
        pass  # another user's entry: still readable, its age just goes unrefreshed
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    pieces = []
    while n:
        piece = os.pread(fd, n, offset)
        if not piece:
            raise AssertionError("a cache entry is shorter than its size")  # checked at open
        pieces.append(piece)
        n -= len(piece)
        offset += len(piece)
    return b"".join(pieces)
