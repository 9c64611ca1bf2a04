"""moto's S3 over HTTP on 127.0.0.1, in a thread of this process, for tests and benchmarks.

    server = S3Server()                       # on a free port, no authentication checks
    bucket = server.make_bucket()             # "s3://test-…"
    server.list_keys(bucket)                  # what is stored there

Credentials here are dummies for this local server only (`DUMMY_CREDENTIALS`).
"""

from __future__ import annotations

import logging
import uuid
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from free_ports import free_port

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def admin_client(endpoint: str):
    """A boto3 client for `endpoint` with dummy credentials, independent of the environment."""
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=DUMMY_CREDENTIALS["AWS_DEFAULT_REGION"],
        config=Config(retries={"mode": "standard", "max_attempts": 3}),
    )


def _bucket_and_prefix(bucket: str) -> tuple[str, str]:
    if bucket.startswith("s3://"):
        parsed = urlparse(bucket)
        return parsed.netloc, parsed.path.lstrip("/")
    return bucket, ""


class S3Server:
    """moto's S3 over HTTP in a thread of this process (no authentication checks)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client = admin_client(self.endpoint)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name when None); returns its URL, "s3://NAME"."""
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key in `bucket` (a name or an s3:// URL, whose path is a prefix) under `prefix`."""
        return sorted(self.etags(bucket, prefix))

    def etags(self, bucket: str, prefix: str = "") -> dict[str, str]:
        """{key: ETag} for every key under `prefix`, as `list_keys` names them: an ETag changes
        when new bytes are stored under the key."""
        name, url_prefix = _bucket_and_prefix(bucket)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=name, Prefix=url_prefix + prefix
        )
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}

    def stop(self) -> None:
        self._server.stop()
