"""What differs between S3-compatible servers: optional operations, and checksums.

Cleaning up the multipart uploads a killed writer left is optional: a server without
ListMultipartUploads gets one warning (`s3.warn_once`), as one without DeleteObjects does.

Ray Train's storage on S3 is a pyarrow S3 filesystem on our endpoint and retry budget, whose
uploads read back byte-identical on any S3-compatible server.

The AWS SDK in pyarrow sends uploads in the aws-chunked encoding with a trailing checksum by
default; a server that does not know that encoding stores the encoding itself as the object
(Ray Train then cannot read its own checkpoint list back). Like our boto3 client, this filesystem
asks for checksums only where an operation requires them. The SDK reads that setting from the
environment when a client is made, in whichever process unpickles the filesystem (Ray Train's
controller and workers), so the filesystem carries it along.
"""

from __future__ import annotations

import functools
import os
from urllib.parse import urlparse

import botocore.exceptions as bx
from pyarrow import fs

from cluster import s3, s3_errors
from cluster.environ import environment


def checksum_settings() -> dict[str, str]:
    """The AWS SDKs' checksum settings: the environment's, else "when_required"."""
    return {var: os.environ.get(var) or "when_required" for var in s3.CHECKSUM_VARS}


class ArrowS3(fs.S3FileSystem):
    """`pyarrow.fs.S3FileSystem` made with the SDK's checksum settings in the environment
    (read when its client is made, then restored), here and wherever it is unpickled."""

    def __init__(self, settings: dict[str, str], **kwargs) -> None:
        with environment(settings):
            super().__init__(**kwargs)
        self._settings, self._kwargs = settings, kwargs

    def __reduce__(self):
        return functools.partial(ArrowS3, self._settings, **self._kwargs), ()


def arrow_filesystem(url: str) -> tuple[str, fs.S3FileSystem]:
    """(path, pyarrow S3 filesystem) for Ray Train's storage, on the same endpoint and chain."""
    bucket, key = s3.split(url)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # Ray Train's checkpoint uploads go through this, not boto3: give it the same patience.
    # The AWS SDK's default strategy, not its standard one: the standard one also keeps a retry
    # quota per client that a long run on a flaky server spends, after which a write fails at
    # its first error however many attempts it had left (as boto3's would; `s3.client`).
    kwargs: dict = {
        "region": region,
        "retry_strategy": fs.AwsDefaultS3RetryStrategy(s3.ATTEMPTS),
        "connect_timeout": min(10.0, s3.timeout()),
        "request_timeout": s3.timeout(),
    }
    if s3.endpoint():
        parsed = urlparse(s3.endpoint())
        kwargs |= {
            "endpoint_override": parsed.netloc or parsed.path,
            "scheme": parsed.scheme or "https",
        }
    return f"{bucket}/{key}".rstrip("/"), ArrowS3(checksum_settings(), **kwargs)


def abort_uploads(url: str) -> int:
    """Abort multipart uploads left under the prefix `url` by a killed writer."""
    bucket, key = s3.split(url)
    prefix = key.rstrip("/") + "/" if key else ""

    def op() -> int:
        pages = (
            s3.client()
            .get_paginator("list_multipart_uploads")
            .paginate(Bucket=bucket, Prefix=prefix)
        )
        try:
            uploads = [u for page in pages for u in page.get("Uploads", [])]
        except bx.ClientError as e:
            if not s3.not_implemented(e):
                raise
            s3.warn_once(
                "ListMultipartUploads",
                "parts of uploads a killed run left are not cleaned up (a lifecycle rule that "
                "aborts incomplete multipart uploads removes them)",
            )
            return 0
        for u in uploads:
            s3.client().abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
        return len(uploads)

    return s3_errors.retry(op, url)
