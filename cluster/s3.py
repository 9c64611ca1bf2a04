"""The S3 side of `cluster.storage`: one boto3 client per process and where it points, S3 URLs,
and what the server lacks. Errors and retries: `s3_errors`; object operations: `s3_objects`;
streamed reads: `s3_stream`; server differences and Ray Train's filesystem: `s3_compat`.

Endpoint: botocore's own `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (the CLI's --s3-endpoint
sets the first). Credentials: only the standard AWS chain (environment, shared config and
profile, web identity as on Kubernetes IRSA); they never appear in a message.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from urllib.parse import urlparse

import boto3
import botocore.exceptions as bx
from botocore.config import Config
from botocore.retries import standard

from cluster.errors import UserError

ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
CHECKSUM_VARS = ("AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION")
"""Checksums only where an operation requires them (unless these say otherwise): a server that
does not implement flexible checksums would store an aws-chunked upload's encoding as its body."""
ATTEMPTS = 8
"""botocore's attempts per request (connection errors, timeouts, 5xx, throttling): the one
retry layer for requests. An endpoint that accepts connections but never answers is reported
after ATTEMPTS × --s3-timeout plus backoff (8 minutes at the default 60 s); one that refuses
connections within seconds."""
DEFAULT_TIMEOUT = 60.0

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
