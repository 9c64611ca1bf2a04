"""S3 failures a user can act on (`user_error`: one line, which kind, what to check), and the
one retry layer botocore does not have: reading a response body again when it was cut off.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import botocore.exceptions as bx

from cluster import s3
from cluster.errors import UserError

T = TypeVar("T")
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


def user_error(e: Exception, url: str) -> UserError:
    """The one-line message for an S3 failure: which kind, and what to check."""
    where = s3.endpoint() or "the default AWS endpoint"
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
        bucket = s3.split(url)[0]
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
