"""Backbone weights from a bucket or a web server, fetched once per node and checked by sha256.

    metatrainer train ... --weights s3://BUCKET/weights/resnet50-11ad3fa6.pth --weights-sha256 HEX

A remote weights file (`s3://`, `https://`, or `http://` as pip allows it: the hash is
checked) is named together with its expected sha256. Each node keeps it as
`<METATRAINER_CACHE_DIR or ~/.cache/metatrainer>/weights/<sha256>.pth`, so every worker and
loader process of a node, and every later run there, reads one download:
- a process that finds the file reads it and checks its sha256: a damaged file is fetched again;
- a miss takes an exclusive `flock` on `<sha256>.lock`, looks again (another process may just
  have fetched it), downloads into memory, checks the sha256, and only then writes a temporary
  name and renames it into place. So a killed download or a wrong file never sits in the cache,
  and a node's processes download it once between them.
The bytes handed on are the bytes that were checked, never read again from disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cluster import s3_objects
from cluster.environ import CACHE_DIR_VAR
from cluster.errors import UserError

REMOTE_SCHEMES = ("s3://", "https://", "http://")
DEFAULT_CACHE_DIR = "~/.cache/metatrainer"
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
HTTP_TIMEOUT = 60.0
"""Seconds an https/http request waits for a connection or for data, per attempt."""
HTTP_ATTEMPTS = 3
"""Attempts of an https/http download (a 5xx answer, a refused or cut-off connection)."""
HOWTO = "see README 'Weights without the internet'"


def is_remote(weights: str) -> bool:
    return weights.startswith(REMOTE_SCHEMES)


def check_sha256(weights: str, sha256: str | None) -> str | None:
    """The expected sha256 in lowercase; a remote `weights` must have one."""
    if sha256 is None:
        if is_remote(weights):
            raise UserError(
                f"--weights {shown(weights)}: add --weights-sha256 HEX, the file's sha256 "
                "(compute it with `sha256sum FILE`), so every node can check its download"
            )
        return None
    if not SHA256_HEX.fullmatch(sha256):
        raise UserError(
            f"--weights-sha256 {sha256[:80]!r} is not a sha256 (64 hex digits, as "
            "`sha256sum FILE` prints)"
        )
    return sha256.lower()


def cache_dir() -> Path:
    """This node's weights cache: `<METATRAINER_CACHE_DIR or ~/.cache/metatrainer>/weights`."""
    root = os.environ.get(CACHE_DIR_VAR) or DEFAULT_CACHE_DIR
    return Path(root).expanduser() / "weights"


def fetch(url: str, sha256: str) -> bytes:
    """The bytes of the weights file at `url` whose sha256 is `sha256`: from this node's cache,
    downloaded into it first when it is missing or damaged (see the module docstring)."""
    expected = check_sha256(url, sha256)
    assert expected is not None
    directory = cache_dir()
    path = directory / f"{expected}.pth"
    data = _read_cached(path, expected)
    if data is not None:
        return data
    with _disk_errors(directory):
        directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory / f"{expected}.lock"):
        data = _read_cached(path, expected, warn=True)  # another process may just have fetched it
        if data is not None:
            return data
        with _disk_errors(directory):
            for leftover in directory.glob(f".{expected}.*.part"):
                leftover.unlink(missing_ok=True)  # a killed writer's: it held this lock
        data = download(url)
        check(data, expected, url)
        with _disk_errors(directory):
            _write_atomically(path, data)
    return data


def read_verified(path: str, sha256: str) -> bytes:
    """The bytes of the local file `path`, which must have this sha256."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(
            f"--weights {path}: no such file; give imagenet, none, or a file path"
        ) from None
    except OSError as e:
        raise UserError(f"--weights {path}: cannot read it ({e.strerror})") from None
    check(data, sha256.lower(), path)
    return data


def check(data: bytes, expected: str, where: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise UserError(
            f"--weights {shown(where)}: sha256 is {actual}, expected {expected} "
            "(--weights-sha256); a different or damaged file: check both"
        )


def download(url: str) -> bytes:
    """The whole file at `url` (s3:// through `cluster.s3`, with its retries and messages)."""
    if url.startswith("s3://"):
        try:
            return s3_objects.read_bytes(url)
        except UserError as e:
            raise UserError(f"--weights: {e}; {HOWTO}") from None
    for attempt in range(HTTP_ATTEMPTS):
        try:
            return _http_get(url)
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            if attempt == HTTP_ATTEMPTS - 1:
                raise UserError(
                    f"--weights {shown(url)}: failed after {HTTP_ATTEMPTS} attempts "
                    f"({_reason(e)}); check the URL and the network, or {HOWTO}"
                ) from None
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _http_get(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "metatrainer"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return response.read()  # IncompleteRead if the body ends before Content-Length
    except urllib.error.HTTPError as e:
        e.close()
        if e.code >= 500:
            raise  # the server's trouble: another attempt
        if e.code in (404, 410):
            what = "does not exist"
        elif e.code in (401, 403):
            what = "access denied"
        else:
            what = "refused"
        raise UserError(f"--weights {shown(url)}: {what} (HTTP {e.code}); {HOWTO}") from None


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code}"
    reason = getattr(e, "reason", None) or e
    return str(getattr(reason, "strerror", None) or reason) or type(e).__name__


def shown(url: str) -> str:
    """`url` as messages show it: without a user:password@ or a query (a presigned URL's
    signature), which may be credentials."""
    if not url.startswith(("https://", "http://")):
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _read_cached(path: Path, expected: str, warn: bool = False) -> bytes | None:
    """The cached file if it is there and has the sha256 in its name (else None)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _cache_error(path.parent, e) from None
    if hashlib.sha256(data).hexdigest() == expected:
        return data
    if warn:
        print(
            f"warning: {path} does not match its sha256 (damaged); fetching it again",
            file=sys.stderr,
        )
    return None


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.stem}.{os.getpid()}.part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # readable by the node
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with _disk_errors(path.parent):
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock, as a killed process's exit does


@contextmanager
def _disk_errors(directory: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise _cache_error(directory, e) from None


def _cache_error(directory: Path, e: OSError) -> UserError:
    return UserError(
        f"weights cache {directory}: {e.strerror or e}; set {CACHE_DIR_VAR} to a writable "
        "local directory"
    )
