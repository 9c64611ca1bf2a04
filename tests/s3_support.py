"""Real S3 servers over HTTP on 127.0.0.1 for tests and benchmarks, and a proxy that breaks them.

    server = S3Server()                       # moto, in this process, on a free port
    bucket = server.make_bucket()             # "s3://test-…"
    proxy = FaultProxy(server.endpoint)       # put it between a client and the server
    proxy.set_faults(error_rate=0.2, truncate_rate=0.2)
    proxy.bytes_served(bucket)                # GET body bytes sent for keys under a prefix
    proxy.act_legacy({"ListMultipartUploads"})  # a server without those, storing aws-chunked raw
    auth = AuthS3Server()                     # moto in a subprocess that checks credentials

Credentials here are dummies for these local servers only.
"""

from __future__ import annotations

import collections
import http.client
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import boto3
from botocore.config import Config

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


PORTS = range(20000, 32768)
"""Where `free_port` looks: above Ray's worker ports (10002-19999) and below the kernel's
ephemeral range (32768-60999), which every `bind(port 0)` on the machine (Ray's processes, moto,
clients) draws from: a port picked here is not taken between the asking and a later bind by
another process, as a port the kernel handed out once can be."""


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive TCP ports that nothing listens on (when asked)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(PORTS.start, PORTS.stop - count)
        if all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} free consecutive ports in {PORTS}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


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


class AuthS3Server:
    """moto in a subprocess that authenticates every request, so made-up keys are rejected
    (InvalidAccessKeyId). moto reads INITIAL_NO_AUTH_ACTION_COUNT once, at import."""

    def __init__(self, timeout: float = 60.0) -> None:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_until_up(port, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto.server exited with status {self._process.returncode}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/moto-api/")
                conn.getresponse().read()
                return
            except OSError:
                time.sleep(0.1)
            finally:
                conn.close()
        raise RuntimeError(f"moto.server did not answer on port {port} within {timeout} s")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


# What a busy S3 answers; botocore retries all three.
S3_ERRORS = [
    (500, "InternalError", "We encountered an internal error. Please try again."),
    (503, "SlowDown", "Please reduce your request rate."),
    (503, "ServiceUnavailable", "Service is unable to handle request."),
]
HOP_BY_HOP = set(
    "connection keep-alive proxy-connection proxy-authenticate proxy-authorization te trailer "
    "transfer-encoding upgrade expect content-length".split()
)
NO_BODY_STATUSES = {204, 304}
OPTIONAL_OPERATIONS = {
    ("GET", "uploads"): "ListMultipartUploads",
    ("POST", "delete"): "DeleteObjects",
}


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` that can fail on purpose.

    Faults, drawn per request from one seeded generator: an S3 error reply (500/503) without
    forwarding, a GET response cut off after part of its body (full Content-Length, then the
    connection closes), and a delay before forwarding. `injected` counts "error" and "truncate".

    It also counts, per (method, "bucket/key"), the requests received and the response body
    bytes actually sent to the client (a cut-off body counts what was sent): `bytes_served`,
    `requests_served`, `reset_counts`.
    """

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.injected: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._bytes: collections.Counter[tuple[str, str]] = collections.Counter()
        self._requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.set_faults()
        self.act_legacy(set(), store_chunked_raw=False)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def set_faults(
        self,
        error_rate: float = 0.0,
        truncate_rate: float = 0.0,
        delay: float = 0.0,
        seed: int = 0,
        methods: set[str] | None = None,
        errors: list[tuple[int, str, str]] | None = None,
        keys: str = "",
        fail_first: int = 0,
    ) -> None:
        """Fault rates per request; errors and delays only for `methods` when given (e.g. PUT)
        and paths containing `keys`, errors drawn from `errors` (default: `S3_ERRORS`).
        `fail_first` N: each request (method and path) also fails its first N attempts, so a
        client that retries it N times gets through, whatever the order of concurrent ones."""
        with self._lock:
            self.fail_first = fail_first
            self._attempts: collections.Counter[tuple[str, str]] = collections.Counter()
            self.error_rate = error_rate
            self.truncate_rate = truncate_rate
            self.delay = delay
            self.fault_methods = {m.upper() for m in methods} if methods else None
            self.errors = errors or S3_ERRORS
            self.fault_keys = keys
            self._rng = random.Random(seed)

    def act_legacy(self, missing: set[str], store_chunked_raw: bool = True) -> None:
        """Behave like an S3-compatible server that predates parts of the API: operations in
        `missing` ("ListMultipartUploads", "DeleteObjects") answer 501 NotImplemented, and an
        upload in the aws-chunked encoding is stored as it came, chunk headers and trailing
        checksum included. `chunked_uploads` counts the uploads that came in that encoding."""
        with self._lock:
            self.missing = set(missing)
            self.store_chunked_raw = store_chunked_raw
            self.chunked_uploads = 0

    def _legacy(self, method: str, path: str, headers) -> tuple[int, str, str] | None:
        """The NotImplemented answer for a missing operation; strips what would tell the
        server that an upload is aws-chunked when it should be stored raw."""
        query = parse_qs(urlparse(path).query, keep_blank_values=True)
        for (m, param), name in OPTIONAL_OPERATIONS.items():
            if method == m and param in query and "uploadId" not in query and name in self.missing:
                return 501, "NotImplemented", f"{name} is not implemented by this server"
        encoding = headers.get("Content-Encoding", "")
        streaming = headers.get("x-amz-content-sha256", "").startswith("STREAMING-")
        if "aws-chunked" in encoding or streaming:
            with self._lock:
                self.chunked_uploads += 1
            if self.store_chunked_raw:
                rest = ",".join(e for e in encoding.split(",") if e.strip() != "aws-chunked")
                for name in ("Content-Encoding", "x-amz-decoded-content-length", "x-amz-trailer"):
                    del headers[name]
                if rest:
                    headers["Content-Encoding"] = rest
                headers.replace_header("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
        return None

    def _draw(
        self, method: str, path: str
    ) -> tuple[tuple[int, str, str] | None, float | None, float]:
        """(error to reply, fraction of the body to send before cutting off, delay)."""
        with self._lock:
            error_roll, truncate_roll = self._rng.random(), self._rng.random()
            error = self._rng.choice(self.errors)
            fraction = self._rng.random()
            chosen = self.fault_methods is None or method in self.fault_methods
            chosen = chosen and self.fault_keys in path
            delay = self.delay if chosen else 0
            self._attempts[method, path] += 1
            if chosen and self._attempts[method, path] <= self.fail_first:
                self.injected["error"] += 1
                return error, None, delay
            if error_roll < self.error_rate and chosen:
                self.injected["error"] += 1
                return error, None, delay
            if method == "GET" and truncate_roll < self.truncate_rate:
                return None, fraction, delay
            return None, None, delay

    def bytes_served(self, prefix: str = "", method: str = "GET") -> int:
        """Body bytes sent for `method` requests of keys under `prefix` ("s3://bucket/dir",
        "bucket/dir" or "" for all)."""
        return self._sum(self._bytes, prefix, method)

    def requests_served(self, prefix: str = "", method: str = "GET") -> int:
        """`method` requests received for keys under `prefix`, as in `bytes_served`."""
        return self._sum(self._requests, prefix, method)

    def reset_counts(self) -> None:
        with self._lock:
            self._bytes.clear()
            self._requests.clear()

    def _sum(self, counts: collections.Counter[tuple[str, str]], prefix: str, method: str) -> int:
        prefix = prefix.removeprefix("s3://")
        with self._lock:
            return sum(
                n for (m, key), n in counts.items() if m == method and key.startswith(prefix)
            )

    def _count(self, method: str, path: str, body_bytes: int, request: bool = False) -> None:
        key = unquote(urlparse(path).path).lstrip("/")  # path-style: "bucket/key"
        with self._lock:
            self._requests[method, key] += request
            self._bytes[method, key] += body_bytes

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" answered for us
    server: ThreadingHTTPServer

    def do_GET(self) -> None:
        self._forward()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def log_message(self, format: str, *args) -> None:
        pass

    def _forward(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self._read_body()  # always read, so a faulted connection stays in sync
        proxy._count(self.command, self.path, 0, request=True)
        error, cut_fraction, delay = proxy._draw(self.command, self.path)
        error = proxy._legacy(self.command, self.path, self.headers) or error
        if delay:
            time.sleep(delay)
        if error is not None:
            self._send_error(*error)
            return
        upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    upstream.putheader(name, value)
            if body is not None:
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            self._relay(response, cut_fraction, proxy)
        finally:
            upstream.close()

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length is not None else None

    def _relay(
        self, response: http.client.HTTPResponse, cut_fraction: float | None, proxy: FaultProxy
    ) -> None:
        headers = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
        if self.command == "HEAD" or response.status in NO_BODY_STATUSES:
            self._send_head(response.status, response.reason, headers)
            length = response.getheader("Content-Length")
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            return
        data = response.read()
        self._send_head(response.status, response.reason, headers)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if cut_fraction is not None and data:
            with proxy._lock:
                proxy.injected["truncate"] += 1
            self._send_body(data[: int(len(data) * cut_fraction)])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send_body(data)

    def _send_body(self, data: bytes) -> None:
        """Send `data` and count the bytes that went out. Each send is counted before it is
        made and corrected after, so the count is complete by the time the client has it all."""
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        view = memoryview(data)
        while view:
            proxy._count(self.command, self.path, len(view))
            sent = 0
            try:
                sent = self.connection.send(view)
            finally:
                proxy._count(self.command, self.path, sent - len(view))
            view = view[sent:]

    def _send_head(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)

    def _send_error(self, status: int, code: str, message: str) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{uuid.uuid4().hex}</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        self._send_body(b"" if self.command == "HEAD" else body)
