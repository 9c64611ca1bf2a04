"""Operations on S3 objects for `cluster.storage`: HEAD, whole and ranged reads, multipart
uploads, listing and removal, each retried by `s3_errors.retry` and failing as a UserError.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import botocore.exceptions as bx
from boto3.s3.transfer import TransferConfig

from cluster import s3
from cluster.errors import UserError
from cluster.s3_errors import read_body, retry, user_error

# Parts in flight are buffered: 4 × 16 MiB bounds an upload's memory, whatever the file size.
TRANSFER = TransferConfig(
    multipart_threshold=64 * 2**20, multipart_chunksize=16 * 2**20, max_concurrency=4
)


def _is_missing(e: bx.ClientError) -> bool:
    return str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")


def head(url: str) -> dict | None:
    """The object's metadata, or None if there is no such object."""
    bucket, key = s3.split(url)

    def op():
        try:
            return s3.client().head_object(Bucket=bucket, Key=key)
        except bx.ClientError as e:
            if not _is_missing(e):
                raise
        # A HEAD answer has no body to say which is missing: the object, or the bucket.
        try:
            s3.client().head_bucket(Bucket=bucket)
        except bx.ClientError as e:
            if _is_missing(e):
                where = s3.endpoint() or "the default AWS endpoint"
                raise UserError(
                    f"bucket {bucket} does not exist at {where}: create it or fix the URL"
                ) from None
            raise
        return None

    return retry(op, url)


def read_bytes(url: str) -> bytes:
    bucket, key = s3.split(url)

    def op() -> bytes:
        return read_body(s3.client().get_object(Bucket=bucket, Key=key))

    return retry(op, url)


def read_range(url: str, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of the object: one ranged GET, retried if its body is cut off."""
    if start == stop:
        return b""
    bucket, key = s3.split(url)
    return retry(lambda: _get_range(bucket, key, url, start, stop), url)


def _get_range(bucket: str, key: str, url: str, start: int, stop: int) -> bytes:
    try:
        response = s3.client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{stop - 1}")
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
    bucket, key = s3.split(url)
    extra = {"Metadata": metadata} if metadata else None

    def op() -> None:
        fileobj.seek(0)
        # s3transfer closes the file it is given, which would break the next attempt.
        s3.client().upload_fileobj(
            _Unclosable(fileobj), bucket, key, ExtraArgs=extra, Config=TRANSFER
        )

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
    bucket, key = s3.split(url)
    prefix = key.rstrip("/") + "/" if key else ""
    names: list[str] = []

    def op() -> None:
        names.clear()
        pages = (
            s3.client()
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
    bucket, key = s3.split(url)

    def op() -> None:
        keys = [key] if key else []
        pages = (
            s3.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=key.rstrip("/") + "/")
        )
        keys += [o["Key"] for page in pages for o in page.get("Contents", [])]
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            try:
                objects = [{"Key": k} for k in batch]
                s3.client().delete_objects(
                    Bucket=bucket, Delete={"Objects": objects, "Quiet": True}
                )
            except bx.ClientError as e:
                if not s3.not_implemented(e):
                    raise
                s3.warn_once("DeleteObjects", "deleting objects one request at a time")
                for k in batch:
                    s3.client().delete_object(Bucket=bucket, Key=k)

    retry(op, url)
