"""The S3 side of `cluster.storage`: one boto3 client per process, errors a user can act on,
retries botocore does not do, ranged reads, multipart uploads (streamed reads: `s3_stream`).

Endpoint: botocore's own `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (the CLI's --s3-endpoint
sets the first). Credentials: only the standard AWS chain (environment, shared config and
profile, web identity as on Kubernetes IRSA); they never appear in a message.
"""

from __future__ import annotations

import io
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO, TypeVar
from urllib.parse import urlparse

import boto3
import botocore.exceptions as bx
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.retries import standard

from cluster.errors import UserError

T = TypeVar("T")
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CHECKSUM_VARS = ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")
"""Checksums only where an operation requires them (unless these say otherwise): a server that
does not implement flexible checksums would store an aws-chunked upload's encoding as its body."""
# Parts in flight are buffered: 4 × 16 MiB bounds an upload's memory, whatever the file size.
TRANSFER = TransferConfig(
    multipart_threshold=64 * 2**20, multipart_chunksize=16 * 2**20, max_concurrency=4
)
ATTEMPTS = 8
"""botocore's attempts per request (connection errors, timeouts, 5xx, throttling): the one
retry layer for requests. An endpoint that accepts connections but never answers is reported
after ATTEMPTS × --s3-timeout plus backoff (8 minutes at the default 60 s); one that refuses
connections within seconds."""
DEFAULT_TIMEOUT = 60.0
BODY_ATTEMPTS = 8
"""Our own layer, only for what botocore does not retry: a body cut off while being read."""
BODY_ERRORS = (
    bx.IncompleteReadError,
    bx.ResponseStreamingError,
    bx.ReadTimeoutError,
    bx.ConnectionClosedError,
    ConnectionError,
    TimeoutError,
)


class CutBody(Exception):
    """A response body that ended early or broke while being read (retried by `retry`)."""


def read_body(response: dict, expected: int | None = None) -> bytes:
    """The body of a GET, all of it (`expected` bytes, default its ContentLength)."""
    try:
        data = response["Body"].read()
    except BODY_ERRORS as e:
        raise CutBody(f"{type(e).__name__}") from e
    if len(data) != (response["ContentLength"] if expected is None else expected):
        raise CutBody(f"{len(data)} of {expected or response['ContentLength']} bytes")
    return data


CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}

_clients: dict[int, object] = {}
_client_lock = threading.Lock()
_timeout = DEFAULT_TIMEOUT


def _after_fork_in_child() -> None:
    global _client_lock
    _client_lock = threading.Lock()  # a thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def endpoint() -> str | None:
    return next((os.environ[v] for v in ENDPOINT_VARS if os.environ.get(v)), None)


def set_endpoint(url: str | None) -> None:
    """Use `url` for S3 in this process (the driver passes it to Ray tasks and workers, whose
    environment was fixed when their node started)."""
    if url and url != endpoint():
        os.environ["AWS_ENDPOINT_URL_S3"] = url
        _clients.clear()


def set_timeout(seconds: float | None) -> None:
    """Seconds to wait for a connection (at most 10) or for an answer, per attempt
    (`--s3-timeout`; passed explicitly to Ray tasks and workers, like the endpoint)."""
    global _timeout
    if seconds and seconds != _timeout:
        if seconds <= 0:
            raise UserError(f"--s3-timeout must be more than 0 seconds, not {seconds}")
        _timeout = float(seconds)
        _clients.clear()


def timeout() -> float:
    return _timeout


def client():
    """A client for this process (boto3 clients must not cross a fork, so keyed by pid)."""
    pid = os.getpid()
    if pid in _clients:
        return _clients[pid]
    # One client per process, even when several reader threads ask at once (clients are
    # thread-safe; making one costs a session and its service model).
    with _client_lock:
        if pid not in _clients:
            # Ray workers log at INFO; botocore's "Found credentials in ..." is noise there.
            logging.getLogger("botocore").setLevel(logging.WARNING)
            config = Config(
                retries={"mode": "adaptive", "total_max_attempts": ATTEMPTS},
                connect_timeout=min(10.0, _timeout),
                read_timeout=_timeout,
                max_pool_connections=32,
                request_checksum_calculation=_checksums(CHECKSUM_VARS[0]),
                response_checksum_validation=_checksums(CHECKSUM_VARS[1]),
            )
            made = boto3.session.Session().client("s3", config=config)
            _without_retry_quota(made)
            _clients[pid] = made
    return _clients[pid]


class _NoRetryQuota(standard.RetryQuotaChecker):
    """Every retry a request has attempts left for. botocore's standard and adaptive modes also
    keep a retry quota per client (500 tokens, 14 a retry, 1 back per clean request) that, once
    spent, fails requests at their first error: a long-lived client (a Ray worker's, a loader
    process's) on a flaky server runs it dry after a few hundred requests and then fails
    requests that had attempts left. ATTEMPTS and --s3-timeout bound each request instead."""

    def __init__(self) -> None:
        super().__init__(quota=None)

    def acquire_retry_quota(self, context) -> bool:
        return True

    def release_retry_quota(self, context, http_response, **kwargs) -> None:
        return None


def _without_retry_quota(client) -> None:
    """Replace `client`'s standard retry handler by the same one without the quota (the same
    retryable errors, backoff and ATTEMPTS). botocore has no setting for it."""
    name = client.meta.service_model.service_id.hyphenize()
    client.meta.events.unregister(f"needs-retry.{name}", unique_id=f"retry-config-{name}")
    handler = standard.register_retry_handler(client, max_attempts=ATTEMPTS)
    handler._retry_quota = _NoRetryQuota()  # the one quota a handler consults


def _checksums(var: str) -> str:
    return (os.environ.get(var) or "when_required").lower()


def split(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise UserError(f"{url}: not an S3 URL; write s3://BUCKET/PREFIX")
    return parsed.netloc, parsed.path.lstrip("/")


def user_error(e: Exception, url: str) -> UserError:
    """The one-line message for an S3 failure: which kind, and what to check."""
    where = endpoint() or "the default AWS endpoint"
    if isinstance(e, UserError):
        return e
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
        return UserError(
            f"no AWS credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or a web-identity role"
        )
    if isinstance(e, bx.EndpointConnectionError | bx.ConnectTimeoutError):
        return UserError(
            f"cannot reach the S3 endpoint {where} for {url}: check AWS_ENDPOINT_URL_S3 (or "
            "--s3-endpoint) and that the server is up"
        )
    if isinstance(e, bx.ClientError):
        code = str(e.response.get("Error", {}).get("Code", "")) or "unknown"
        bucket = split(url)[0]
        if code in CREDENTIAL_CODES:
            return UserError(
                f"S3 at {where} rejected the credentials ({code}) for {url}: check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            )
        if code == "NoSuchBucket":
            return UserError(f"bucket {bucket} does not exist at {where}: create it or fix the URL")
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return UserError(
                f"access denied to {url} at {where}: check the credentials (AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and their permissions"
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return UserError(f"{url} does not exist")
        return UserError(f"S3 error {code} for {url} at {where}")
    if isinstance(e, bx.ParamValidationError):
        return UserError(f"{url}: invalid bucket name or key; write s3://BUCKET/PREFIX")
    if isinstance(e, bx.BotoCoreError):
        return UserError(f"S3 request for {url} failed ({type(e).__name__}) at {where}")
    if isinstance(e, CutBody | ConnectionError | TimeoutError):
        return UserError(
            f"reading {url} from {where} kept breaking off ({e or type(e).__name__}); check "
            "the network and the server"
        )
    raise e


def retry(operation: Callable[[], T], url: str) -> T:
    """Run `operation`; a cut-off body is read again (jittered backoff), any other error has
    had botocore's retries already and becomes a UserError at once."""
    for attempt in range(BODY_ATTEMPTS):
        try:
            return operation()
        except CutBody as e:
            if attempt == BODY_ATTEMPTS - 1:
                raise user_error(e, url) from None
            time.sleep(min(5.0, 0.1 * 2**attempt) * (0.5 + random.random()))
        except (bx.BotoCoreError, bx.ClientError, *BODY_ERRORS) as e:
            raise user_error(e, url) from None
    raise AssertionError("unreachable")


def _is_missing(e: bx.ClientError) -> bool:
    return str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")


def head(url: str) -> dict | None:
    """The object's metadata, or None if there is no such object."""
    bucket, key = split(url)

    def op():
        try:
            return client().head_object(Bucket=bucket, Key=key)
        except bx.ClientError as e:
            if not _is_missing(e):
                raise
        # A HEAD answer has no body to say which is missing: the object, or the bucket.
        try:
            client().head_bucket(Bucket=bucket)
        except bx.ClientError as e:
            if _is_missing(e):
                where = endpoint() or "the default AWS endpoint"
                raise UserError(
                    f"bucket {bucket} does not exist at {where}: create it or fix the URL"
                ) from None
            raise
        return None

    return retry(op, url)


def read_bytes(url: str) -> bytes:
    bucket, key = split(url)

    def op() -> bytes:
        return read_body(client().get_object(Bucket=bucket, Key=key))

    return retry(op, url)


def read_range(url: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of the object: one ranged GET, retried if its body is cut off."""
    if start == stop:
        return b""
    bucket, key = split(url)
    return retry(lambda: _get_range(bucket, key, url, start, stop), url)


def _get_range(bucket: str, key: str, url: str, start: int, stop: int) -> bytes:
    try:
        response = client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")
    except bx.ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) != "InvalidRange":
            raise
        raise _shorter(url, stop) from None  # the range starts at or past the object's end
    if response["ContentLength"] < stop - start:  # all there is: the object ends early
        raise _shorter(url, stop)
    return read_body(response, stop - start)


def _shorter(url: str, size: int) -> UserError:
    return UserError(
        f"{url} is shorter than expected (under {size} bytes): it changed after prep; "
        "run prep again"
    )


def upload(fileobj: BinaryIO, url: str, metadata: dict[str, str] | None = None) -> None:
    """Upload from the start of `fileobj`; large files go multipart with parallel parts."""
    bucket, key = split(url)
    extra = {"Metadata": metadata} if metadata else None

    def op() -> None:
        fileobj.seek(0)
        # s3transfer closes the file it is given, which would break the next attempt.
        client().upload_fileobj(_Unclosable(fileobj), bucket, key, ExtraArgs=extra, Config=TRANSFER)

    try:
        retry(op, url)
    except Exception as e:  # noqa: BLE001 - s3transfer wraps client errors in its own types
        cause = e.__cause__ or e.__context__
        if isinstance(e, UserError) or cause is None:
            raise
        raise user_error(cause, url) from None


class _Unclosable(io.RawIOBase):
    def __init__(self, f: BinaryIO) -> None:
        super().__init__()
        self.f = f

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def readinto(self, b) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        pass


def list_names(url: str) -> list[str]:
    """Names directly under the prefix `url` (objects and sub-prefixes)."""
    bucket, key = split(url)
    prefix = key.rstrip("/") + "/" if key else ""
    names: list[str] = []

    def op() -> None:
        names.clear()
        pages = (
            client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        )
        for page in pages:
            names.extend(o["Key"][len(prefix) :] for o in page.get("Contents", []))
            names.extend(
                p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            )

    retry(op, url)
    return sorted(names)


def remove(url: str) -> None:
    """Delete the object `url` and everything under the prefix `url/`."""
    bucket, key = split(url)

    def op() -> None:
        keys = [key] if key else []
        pages = (
            client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/")
        )
        keys += [o["Key"] for page in pages for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            try:
                objects = [{"Key": k} for k in batch]
                client().delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
            except bx.ClientError as e:
                if not not_implemented(e):
                    raise
                warn_once("DeleteObjects", "deleting objects one request at a time")
                for k in batch:
                    client().delete_object(Bucket=bucket, Key=k)

    retry(op, url)


_warned: set[str] = set()


def not_implemented(e: bx.ClientError) -> bool:
    """An optional operation this server does not have (it answers 501 NotImplemented)."""
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("NotImplemented", "501") or status == 501


def warn_once(operation: str, instead: str) -> None:
    """One line per process and operation, on stderr: the run goes on without it."""
    if operation not in _warned:
        _warned.add(operation)
        where = endpoint() or "the default AWS endpoint"
        print(f"warning: S3 at {where} does not implement {operation}; {instead}", file=sys.stderr)
