"""One place that reads and writes locations: local paths and `s3://bucket/prefix` URLs alike.

Every location a user passes (prep's DST, train's --data and --storage, evaluate's
--checkpoint) goes through these functions, so the rest of the code never branches on the
kind of storage. Writes are atomic: a reader sees the old object or the complete new one,
never half (locally: a temporary name, then rename; on S3: an object appears only whole).
The S3 details live in `cluster.s3` and its `cluster.s3_*` modules.

Read log: when METATRAINER_READ_LOG names a directory, every `read_range`, `read_bytes` and
`open_read` stream appends `url<TAB>bytes` to `<dir>/<pid>.tsv` (a stream logs on close what
its reader was given, not the object's size), so tests and benchmarks can count the bytes a
reader pulled, from loader worker processes too; `read_log_totals` sums them by url.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from cluster import s3, s3_objects, s3_stream
from cluster.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)
SPOOL_BYTES = 16 * 2**20
"""An S3 write is buffered in memory up to this size, then in a temporary file."""
READ_LOG_VAR = "METATRAINER_READ_LOG"
"""Environment variable: a directory where every read appends `url<TAB>bytes` (see above)."""


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def _local(url: str) -> Path:
    if url.startswith("s3:"):
        s3.split(url)  # s3:/x or s3:bucket/x: say how to write it, never make a ./s3: folder
    if "://" in url:
        raise UserError(f"{url}: unsupported URL scheme; use a local path or s3://bucket/prefix")
    return Path(url).expanduser()


def normalize(url: str) -> str:
    """An absolute form of `url` that is the same on every node (Ray needs absolute paths)."""
    if is_s3(url):
        s3.split(url)
        return url.rstrip("/")
    return str(_local(url).resolve())


def join(base: str, *parts: str) -> str:
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(_local(base).joinpath(*parts))


def exists(url: str) -> bool:
    if is_s3(url):
        return s3_objects.head(url) is not None
    return _local(url).exists()


def read_bytes(url: str) -> bytes:
    if is_s3(url):
        data = s3_objects.read_bytes(url)
    else:
        try:
            data = _local(url).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{url} does not exist") from None
        except OSError as e:
            raise UserError(f"cannot read {url}: {e.strerror}") from None
    _log_read(url, len(data))
    return data


def read_range(url: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of `url`, exactly (on S3: one ranged GET, retried if cut off)."""
    if not 0 <= start <= stop:
        raise ValueError(f"invalid byte range [{start}, {stop}) of {url}")
    if start == stop:
        return b""
    if is_s3(url):
        data = s3_objects.read_range(url, start, stop)
    else:
        data = _read_local_range(url, start, stop)
    _log_read(url, len(data))
    return data


def _read_local_range(url: str, start: int, stop: int) -> bytes:
    try:
        with _local(url).open("rb") as f:
            f.seek(start)
            data = f.read(stop - start)  # a buffered read returns less only at the end
    except FileNotFoundError:
        raise UserError(f"{url} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read {url}: {e.strerror}") from None
    if len(data) != stop - start:
        raise UserError(
            f"{url} is shorter than expected (under {stop} bytes): it changed after prep; "
            "run prep again"
        )
    return data


def open_read(url: str, size: int | None = None) -> BinaryIO:
    """A stream of `url`; on S3 it reads ahead a bounded amount and retries cut-off chunks."""
    if is_s3(url):
        stream = s3_stream.open_stream(url, size)
    else:
        try:
            stream = _local(url).open("rb")
        except FileNotFoundError:
            raise UserError(f"{url} does not exist") from None
    return _LoggedStream(stream, url) if os.environ.get(READ_LOG_VAR) else stream


def _log_read(url: str, n: int) -> None:
    """Append `url<TAB>n` to this process's read log, if METATRAINER_READ_LOG is set."""
    directory = os.environ.get(READ_LOG_VAR)
    if not directory:
        return
    path = os.path.join(directory, f"{os.getpid()}.tsv")
    line = os.fsencode(url) + b"\t" + str(n).encode() + b"\n"
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    try:
        fd = os.open(path, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(path, flags, 0o666)
    try:
        os.write(fd, line)  # one append per line: whole lines, whatever else writes there
    finally:
        os.close(fd)


def read_log_totals(directory: str) -> dict[str, int]:
    """Bytes read per url, summed over every process's read log in `directory`."""
    totals: Counter[str] = Counter()
    for path in sorted(Path(directory).glob("*.tsv")):
        for line in path.read_bytes().splitlines():
            url, n = line.rsplit(b"\t", 1)
            totals[os.fsdecode(url)] += int(n)
    return dict(totals)


class _LoggedStream(io.BufferedIOBase):
    """A stream that counts the bytes its reader was given and logs them when closed."""

    def __init__(self, stream: BinaryIO, url: str) -> None:
        super().__init__()
        self.stream, self.url, self.count = stream, url, 0

    def _counted(self, data: bytes) -> bytes:
        self.count += len(data)
        return data

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        return self._counted(self.stream.read(n))

    def read1(self, n: int = -1) -> bytes:
        return self._counted(self.stream.read1(n))  # type: ignore[attr-defined]

    def readinto(self, b) -> int:
        n = self.stream.readinto(b)  # type: ignore[attr-defined]
        self.count += n
        return n

    def readline(self, limit: int | None = -1) -> bytes:
        return self._counted(self.stream.readline(limit))

    def seekable(self) -> bool:
        return self.stream.seekable()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.stream.close()
        finally:
            _log_read(self.url, self.count)
            super().close()


@contextmanager
def open_write(url: str) -> Iterator[BinaryIO]:
    """Write to a temporary place; publish at `url` only if the block succeeds."""
    if is_s3(url):
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as f:
            yield f
            s3_objects.upload(f, url)
        return
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


def put_file(local: str | Path, url: str, sha256: str) -> None:
    """Publish a finished local file at `url` (moved locally, uploaded to S3 with its sha256
    recorded in the object's metadata so `has_file` can verify it without downloading)."""
    if is_s3(url):
        with open(local, "rb") as f:
            s3_objects.upload(f, url, metadata={"sha256": sha256})
        Path(local).unlink()
        return
    path = _local(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(local, 0o666 & ~_UMASK)
    shutil.move(str(local), path)


def has_file(url: str, size: int, sha256: str) -> bool:
    """True if `url` holds exactly these bytes (by size and sha256)."""
    if is_s3(url):
        info = s3_objects.head(url)
        return (
            info is not None
            and int(info["ContentLength"]) == size
            and info.get("Metadata", {}).get("sha256") == sha256
        )
    path = _local(url)
    if not path.is_file() or path.stat().st_size != size:
        return False
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest() == sha256


def list_dir(url: str) -> list[str]:
    """Names directly under `url` (empty if it does not exist)."""
    if is_s3(url):
        return s3_objects.list_names(url)
    path = _local(url)
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def remove(url: str) -> None:
    """Delete `url`, and everything under it if it is a directory or prefix."""
    if is_s3(url):
        s3_objects.remove(url)
        return
    path = _local(url)
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def clean_partial_writes(url: str) -> int:
    """Remove what killed writers left under `url`: temporary files or multipart uploads."""
    if is_s3(url):
        from cluster import s3_compat

        return s3_compat.abort_uploads(url)
    path = _local(url)
    leftovers = list(path.glob(".*.tmp")) if path.is_dir() else []
    for p in leftovers:
        p.unlink(missing_ok=True)
    return len(leftovers)


def local_path(url: str) -> Path:
    """The local filesystem path behind `url` (for readers that need a real file)."""
    if is_s3(url):
        raise UserError(f"{url}: this operation needs a local path")
    return _local(url)


def ray_storage(url: str):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig."""
    if is_s3(url):
        from cluster import s3_compat

        return s3_compat.arrow_filesystem(url)
    return str(_local(url).resolve()), None
