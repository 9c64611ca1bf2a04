"""An HTTP proxy on 127.0.0.1 in front of an S3 server that breaks it on purpose, counts what
it served, and can act like a legacy S3-compatible server:

    proxy = FaultProxy(server.endpoint)       # put it between a client and the server
    proxy.set_faults(error_rate=0.2, truncate_rate=0.2)
    proxy.bytes_served(bucket)                # GET body bytes sent for keys under a prefix
    proxy.act_legacy({"ListMultipartUploads"})  # a server without those, storing aws-chunked raw
"""

from __future__ import annotations

import collections
import http.client
import random
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

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
    forwarding, an object's GET response cut off after part of its body (full Content-Length,
    then the connection closes), and a delay before forwarding. `injected` counts "error" and
    "truncate". Listings are never cut off: botocore turns a
    cut-off listing into a retried 500, so at the rates the tests use (0.2 errors, 0.3 cuts:
    0.44 an attempt) one listing in about 700 would fail all 8 attempts; the cut-off bodies
    under test are the objects' (`cluster.s3_errors.CutBody`).

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
            if method == "GET" and not _listing(path) and truncate_roll < self.truncate_rate:
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


LISTING_PARAMS = ("list-type", "prefix", "delimiter", "uploads", "uploadId", "versions")
"""Query parameters of S3's listings (ListObjects v1/v2, multipart uploads, parts, versions);
GetObject's own query (botocore adds `x-id=GetObject`) has none of them."""


def _listing(path: str) -> bool:
    query = parse_qs(urlparse(path).query, keep_blank_values=True)
    return any(p in query for p in LISTING_PARAMS)


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
