"""One place that reads and writes locations: local paths now, `s3://bucket/prefix` URLs next.

Every location a user passes (prep's DST, train's --data and --storage, evaluate's --checkpoint)
goes through these functions, so the rest of the code never branches on the kind of storage.
Writes are atomic: a reader sees either the old object or the complete new one, never half.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cluster.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def _local(url: str) -> Path:
    if is_s3(url):
        raise UserError(f"{url}: s3:// locations are not supported yet; use a local directory")
    if "://" in url:
        raise UserError(f"{url}: unsupported URL scheme; use a local path or s3://bucket/prefix")
    return Path(url).expanduser()


def normalize(url: str) -> str:
    """An absolute form of `url` that is the same on every node (Ray needs absolute paths)."""
    return url.rstrip("/") if is_s3(url) else str(_local(url).resolve())


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(_local(base).joinpath(*parts))


def exists(url: str) -> bool:
    return _local(url).exists()


def read_bytes(url: str) -> bytes:
    try:
        return _local(url).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{url} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {url}: {e.strerror}") from None


@contextmanager
def open_read(url: str) -> Iterator[BinaryIO]:
    try:
        f = _local(url).open("rb")
    except FileNotFoundError:
        raise UserError(f"{url} does not exist") from None
    with f:
        yield f


@contextmanager
def open_write(url: str) -> Iterator[BinaryIO]:
    """Write to a temporary name beside `url`; rename into place only if the block succeeds."""
    path = _local(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror}") from None
    try:
        # mkstemp creates 0600; published files get the usual mode, as open() would give.
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(url: str, data: bytes) -> None:
    with open_write(url) as f:
        f.write(data)


def list_dir(url: str) -> list[str]:
    """Names directly under `url` (empty if it does not exist)."""
    path = _local(url)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def remove(url: str) -> None:
    path = _local(url)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def local_path(url: str) -> Path:
    """The local filesystem path behind `url` (for readers that need a real file)."""
    return _local(url)
