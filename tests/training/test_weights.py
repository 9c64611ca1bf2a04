"""Weights without the internet: `--weights s3://…|https://…|http://… --weights-sha256 HEX`,
fetched once per node into its cache and checked, against moto's S3 over HTTP (through the
counting fault proxy) and a plain HTTP server, both on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torchvision.models import resnet50

from cluster import s3 as s3_module
from cluster.errors import UserError
from data_prep.contract import BLOCK, Manifest, Shard, archive_bytes, encode_index, write_manifest
from training.cli.main import main
from training.model import weights
from training.model.network import build_model, load_resnet50

ROOT = Path(__file__).resolve().parents[2]
SMALL = os.urandom(300_000)  # fetch() never looks inside: any bytes stand in for a weights file
SMALL_SHA = hashlib.sha256(SMALL).hexdigest()
WRONG_SHA = "0" * 64


@pytest.fixture(autouse=True)
def node_cache(tmp_path, monkeypatch) -> Path:
    """This test's node cache (the weights under it): never the user's ~/.cache."""
    monkeypatch.setenv(weights.CACHE_DIR_VAR, str(tmp_path / "node-cache"))
    return tmp_path / "node-cache" / "weights"


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory) -> tuple[Path, str]:
    """A (seeded random) resnet50 state_dict file, as torchvision's are, and its sha256."""
    torch.manual_seed(11)
    buf = io.BytesIO()
    torch.save(resnet50().state_dict(), buf)
    path = tmp_path_factory.mktemp("weights") / "resnet50-test.pth"
    path.write_bytes(buf.getvalue())
    return path, hashlib.sha256(buf.getvalue()).hexdigest()


def put(bucket: str, key: str, data: bytes) -> str:
    s3_module.client().put_object(Bucket=bucket.removeprefix("s3://"), Key=key, Body=data)
    return f"{bucket}/{key}"


class FileServer:
    """Plain HTTP on 127.0.0.1 in a thread: GET of a path in `files` answers its bytes, of one
    in `statuses` that status (queries ignored); `gets` counts the GETs per path. A GET of a
    path in `held` waits for `stop` before it answers."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.statuses: dict[str, int] = {}
        self.gets: dict[str, int] = {}
        self.held: set[str] = set()
        self._released = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                server.gets[path] = server.gets.get(path, 0) + 1
                if path in server.held:
                    server._released.wait(60)
                status = server.statuses.get(path, 200 if path in server.files else 404)
                body = server.files.get(path, b"") if status == 200 else b"no"
                with contextlib.suppress(OSError):  # a client killed meanwhile
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, format: str, *args) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._released.set()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.stop()


@contextlib.contextmanager
def silent_server():
    """http://… of a server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # until the listener closes
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


FETCH = """
import hashlib, sys
from training.model import weights
print(hashlib.sha256(weights.fetch(sys.argv[1], sys.argv[2])).hexdigest())
"""


def start_fetch(url: str, sha: str) -> subprocess.Popen:
    """Another process of this node fetching `url`, as a worker does."""
    return subprocess.Popen(
        [sys.executable, "-c", FETCH, url, sha],
        cwd=ROOT,
        env=os.environ,  # the node cache, the S3 endpoint and the dummy credentials
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def waiting_for_lock(lock: Path) -> set[int]:
    """The PIDs blocked in `flock` on the file `lock` (/proc/locks lists them after "->")."""
    inode = str(lock.stat().st_ino)
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()  # 1: -> FLOCK ADVISORY WRITE PID MAJOR:MINOR:INODE START END
        if fields[1] == "->" and fields[6].rsplit(":", 1)[-1] == inode:
            pids.add(int(fields[5]))
    return pids


def wait_until_waiting_for_lock(lock: Path, procs: list[subprocess.Popen]) -> None:
    """Until every process of `procs` waits for `lock`; AssertionError if one ends first, or
    after 60 s."""
    pids = {p.pid for p in procs}
    deadline = time.monotonic() + 60
    while not pids <= (waiting := waiting_for_lock(lock)):
        for p in procs:
            assert p.poll() is None, f"a fetch ended before waiting: {p.stderr.read()}"
        in_time = time.monotonic() < deadline
        assert in_time, f"fetches {sorted(pids - waiting)} did not wait for {lock} within 60 s"
        time.sleep(0.05)


# --- the same weights, whatever the source ---------------------------------------------------


def test_s3_weights_build_the_same_model_as_the_local_file(s3, bucket, resnet_file, node_cache):
    path, sha = resnet_file
    url = put(bucket, "weights/resnet50-test.pth", path.read_bytes())
    local = build_model(str(path), [10], ["layer4"])
    remote = build_model(url, [10], ["layer4"], weights_sha256=sha)
    assert remote.backbone_fingerprint() == local.backbone_fingerprint()
    for name, tensor in local.trainable_state_dict().items():
        assert torch.equal(remote.trainable_state_dict()[name], tensor), name
    assert (node_cache / f"{sha}.pth").read_bytes() == path.read_bytes()


def test_http_weights_are_fetched_once_and_checked(file_server, resnet_file, node_cache):
    path, sha = resnet_file
    file_server.files["/models/resnet50-test.pth"] = path.read_bytes()
    url = f"{file_server.url}/models/resnet50-test.pth"
    expected = load_resnet50(str(path), 0, sha.upper()).state_dict()  # checked, as given
    for _ in range(2):
        loaded = load_resnet50(url, 0, sha).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    assert file_server.gets == {"/models/resnet50-test.pth": 1}  # the second load: the cache


# --- once per node ---------------------------------------------------------------------------


def test_a_node_downloads_once_whatever_its_processes_do(s3, bucket, fault_proxy, node_cache):
    """Three processes of one node ask while the node's lock of the file is held (here by the
    test, as by a process downloading it): all three wait for it, and once it is free one GET
    reaches S3. Then none (cached); a damaged cache file is fetched again."""
    url = put(bucket, "weights/small.pth", SMALL)
    s3_module.set_endpoint(fault_proxy.endpoint)
    node_cache.mkdir(parents=True)
    lock = node_cache / f"{SMALL_SHA}.lock"
    procs = []
    try:
        with weights._locked(lock):
            procs = [start_fetch(url, SMALL_SHA) for _ in range(3)]
            wait_until_waiting_for_lock(lock, procs)
            assert fault_proxy.requests_served(url) == 0
        for p in procs:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert out.strip() == SMALL_SHA
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert fault_proxy.requests_served(url) == 1

    assert weights.fetch(url, SMALL_SHA) == SMALL
    assert fault_proxy.requests_served(url) == 1  # from the cache
    cached = node_cache / f"{SMALL_SHA}.pth"
    damaged = bytearray(SMALL)
    damaged[1000] ^= 0xFF
    cached.write_bytes(bytes(damaged))
    assert weights.fetch(url, SMALL_SHA) == SMALL
    assert fault_proxy.requests_served(url) == 2
    assert cached.read_bytes() == SMALL


def test_a_killed_download_leaves_nothing_behind(file_server, node_cache):
    file_server.files["/w.pth"] = SMALL
    file_server.held.add("/w.pth")
    url = f"{file_server.url}/w.pth"
    proc = start_fetch(url, SMALL_SHA)
    deadline = time.monotonic() + 30
    while not file_server.gets:
        assert proc.poll() is None, f"the fetch ended before its GET: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "the fetch sent no GET within 30 s"
        time.sleep(0.05)
    proc.kill()  # mid-download, holding the node's lock
    proc.wait()
    leftover = node_cache / f".{SMALL_SHA}.12345.part"  # as a writer killed mid-write leaves
    leftover.write_bytes(SMALL[:100])
    assert not (node_cache / f"{SMALL_SHA}.pth").exists()
    file_server.held.clear()
    assert weights.fetch(url, SMALL_SHA) == SMALL  # the dead process's lock went with it
    assert file_server.gets == {"/w.pth": 2}
    assert sorted(p.name for p in node_cache.iterdir()) == [
        f"{SMALL_SHA}.lock",
        f"{SMALL_SHA}.pth",
    ]


def test_a_wrong_hash_names_both_and_caches_nothing(s3, bucket, node_cache):
    url = put(bucket, "weights/small.pth", SMALL)
    with pytest.raises(UserError) as excinfo:
        weights.fetch(url, WRONG_SHA)
    message = str(excinfo.value)
    assert SMALL_SHA in message and WRONG_SHA in message
    assert not any(p.suffix in (".pth", ".part") for p in node_cache.iterdir())


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "words"), [(404, "does not exist (HTTP 404)"), (403, "access denied (HTTP 403)")]
)
def test_http_refusals_are_named_and_not_retried(file_server, status, words):
    file_server.statuses["/w.pth"] = status
    url = f"{file_server.url}/w.pth?X-Amz-Signature=secret"  # a presigned URL's query
    with pytest.raises(UserError) as excinfo:
        weights.fetch(url, SMALL_SHA)
    assert words in str(excinfo.value)
    assert "secret" not in str(excinfo.value)
    assert file_server.gets == {"/w.pth": 1}


def test_a_server_error_is_retried(file_server):
    file_server.statuses["/w.pth"] = 503
    with pytest.raises(UserError, match=r"after 3 attempts \(HTTP 503\)"):
        weights.fetch(f"{file_server.url}/w.pth", SMALL_SHA)
    assert file_server.gets == {"/w.pth": weights.HTTP_ATTEMPTS}


def prepared(where: Path) -> Path:
    """A dataset's manifest as prep writes it (64 training samples), without its shards: the
    driver's preflight reads no shard, and fails on the weights before Ray starts."""
    sizes = [3 * BLOCK] * 64
    shard = Shard("train-000000.tar", 64, archive_bytes(sum(sizes)), "0" * 64, encode_index(sizes))
    write_manifest(str(where), Manifest(classes=["a", "b"], splits={"train": [shard]}))
    return where


def train_error(flags: list[str], tmp_path: Path, capsys) -> str:
    """`metatrainer train … FLAGS`: exit 2 and one line, from the driver before Ray starts."""
    data = prepared(tmp_path / "data")
    argv = ["train", "--data", str(data), "--storage", str(tmp_path / "runs"), "--workers", "1"]
    argv += ["--loader-workers", "0"]
    assert main([*argv, "--name", "w", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metatrainer train: error: --weights"), err
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in err
    return err.strip()


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--weights", "imagenet", "--weights-sha256", SMALL_SHA], "not --weights imagenet"),
        (["--weights", "none", "--weights-sha256", SMALL_SHA], "not --weights none"),
        (["--weights", "https://example.invalid/w.pth", "--weights-sha256", "abc"], "64 hex"),
        (["--weights", "https://example.invalid/w.pth"], "(compute it with `sha256sum FILE`)"),
    ],
)
def test_flag_mistakes_are_one_line(flags, words, tmp_path, capsys):
    assert words in train_error(flags, tmp_path, capsys)


def test_a_local_file_with_another_hash_is_one_line(resnet_file, tmp_path, capsys):
    path, sha = resnet_file
    err = train_error(["--weights", str(path), "--weights-sha256", WRONG_SHA], tmp_path, capsys)
    assert f"sha256 is {sha}, expected {WRONG_SHA}" in err


@pytest.mark.parametrize("case", ["missing", "denied", "wrong hash"])
def test_s3_weights_errors_are_one_line(
    case, s3, bucket, fault_proxy, tmp_path, capsys, node_cache
):
    url = put(bucket, "weights/small.pth", SMALL)
    flags = ["--weights", url, "--weights-sha256", SMALL_SHA]
    if case == "missing":
        flags[1] = f"{bucket}/weights/nothing.pth"
        words = f"--weights: {bucket}/weights/nothing.pth does not exist"
    elif case == "denied":
        denied = [(403, "AccessDenied", "Access Denied")]
        fault_proxy.set_faults(error_rate=1.0, methods={"GET"}, errors=denied)
        flags += ["--s3-endpoint", fault_proxy.endpoint]
        words = f"--weights: access denied to {url}"
    else:
        flags[3] = WRONG_SHA
        words = f"sha256 is {SMALL_SHA}, expected {WRONG_SHA}"
    assert words in train_error(flags, tmp_path, capsys)
    assert not node_cache.exists() or not any(p.suffix == ".pth" for p in node_cache.iterdir())


def test_an_https_server_that_does_not_answer_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(weights, "HTTP_TIMEOUT", 0.2)
    with silent_server() as url:
        https = url.replace("http:", "https:") + "/w.pth"
        err = train_error(["--weights", https, "--weights-sha256", SMALL_SHA], tmp_path, capsys)
    assert f"--weights {https}: failed after 3 attempts (" in err
