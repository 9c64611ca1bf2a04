"""The storage API on s3:// URLs, against a real S3 server over HTTP (moto on 127.0.0.1), with
a proxy that injects server errors and cut-off bodies, and every error a user can cause."""

from __future__ import annotations

import hashlib
import random
import threading
import time

import pytest
from boto3.s3.transfer import TransferConfig
from s3_support import free_port

from cluster import s3 as s3_module
from cluster import s3_stream, storage
from cluster.cli import main
from cluster.errors import UserError

SECRET = "wJalrXUtnFEMI-K7MDENG-thisIsTheSecret"

# Reading, writing and listing each reach S3 by a different request: each must name the fault.
OPERATIONS = [storage.read_bytes, lambda url: storage.write_bytes(url, b"x"), storage.list_dir]
OPERATION_IDS = ["read_bytes", "write_bytes", "list_dir"]


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def one_line_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    assert SECRET not in message
    return message


@pytest.fixture
def small_chunks(monkeypatch) -> int:
    """Streaming reads in 64 KiB ranged GETs, so a small object spans many chunks."""
    monkeypatch.setattr(s3_stream, "CHUNK", 64 * 2**10)
    return s3_stream.CHUNK


@pytest.fixture
def small_parts(monkeypatch) -> None:
    """Multipart uploads from 5 MiB (S3's smallest part) instead of 64 MiB."""
    monkeypatch.setattr(
        s3_module,
        "TRANSFER",
        TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20),
    )


def test_write_read_list_and_remove_round_trip(bucket, s3):
    run = storage.join(bucket, "run")
    storage.write_bytes(storage.join(run, "a.bin"), b"alpha")
    storage.write_bytes(storage.join(run, "sub", "b.bin"), b"beta")
    storage.write_bytes(storage.join(bucket, "runner", "c.bin"), b"not under run/")

    assert storage.exists(storage.join(run, "a.bin"))
    assert not storage.exists(storage.join(run, "missing.bin"))
    assert storage.read_bytes(storage.join(run, "sub", "b.bin")) == b"beta"
    assert storage.list_dir(run) == ["a.bin", "sub"]
    assert storage.list_dir(storage.join(bucket, "nothing-here")) == []

    storage.remove(run)
    assert s3.list_keys(bucket) == ["runner/c.bin"]
    assert storage.list_dir(run) == []


def test_a_failed_write_publishes_nothing(bucket, s3):
    url = storage.join(bucket, "manifest.json")
    storage.write_bytes(url, b"old")
    with pytest.raises(RuntimeError):
        with storage.open_write(url) as f:
            f.write(b"half of the new one")
            raise RuntimeError("writer killed")
    assert storage.read_bytes(url) == b"old"
    assert s3.list_keys(bucket) == ["manifest.json"]


def test_put_file_uploads_and_has_file_verifies(bucket, s3, tmp_path):
    data = payload(100_000)
    digest = hashlib.sha256(data).hexdigest()
    local = tmp_path / "shard.tar"
    local.write_bytes(data)
    url = storage.join(bucket, "data", "train-000000.tar")

    storage.put_file(local, url, digest)

    assert not local.exists()
    assert storage.read_bytes(url) == data
    assert storage.has_file(url, len(data), digest)
    assert not storage.has_file(url, len(data), hashlib.sha256(b"other").hexdigest())
    assert not storage.has_file(url, len(data) + 1, digest)
    assert not storage.has_file(storage.join(bucket, "data", "absent.tar"), len(data), digest)


def test_multipart_upload_arrives_byte_identical(bucket, s3, small_parts, tmp_path):
    data = payload(11 * 2**20 + 7)
    local = tmp_path / "big.tar"
    local.write_bytes(data)
    url = storage.join(bucket, "big.tar")

    storage.put_file(local, url, hashlib.sha256(data).hexdigest())

    name, key = s3_module.split(url)
    assert s3.client.head_object(Bucket=name, Key=key)["ETag"].endswith('-3"')  # 3 parts
    assert storage.read_bytes(url) == data
    assert storage.has_file(url, len(data), hashlib.sha256(data).hexdigest())


def test_multipart_upload_survives_server_errors(bucket, s3, small_parts, fault_proxy):
    data = payload(10 * 2**20 + 1, seed=1)
    url = storage.join(bucket, "flaky-upload.bin")
    s3_module.set_endpoint(fault_proxy.endpoint)
    fault_proxy.set_faults(error_rate=0.25, seed=1)

    storage.write_bytes(url, data)

    assert fault_proxy.injected["error"] > 0
    assert storage.read_bytes(url) == data
    assert s3.client.list_multipart_uploads(Bucket=s3_module.split(url)[0]).get("Uploads") is None


def read_in_odd_pieces(url: str, size: int | None = None) -> bytes:
    pieces = []
    with storage.open_read(url, size) as f:
        while piece := f.read(40_009):
            pieces.append(piece)
    return b"".join(pieces)


def test_streaming_read_spanning_many_chunks_is_byte_identical(bucket, s3, small_chunks):
    data = payload(20 * small_chunks + 12_345)
    url = storage.join(bucket, "stream.tar")
    storage.write_bytes(url, data)

    assert read_in_odd_pieces(url) == data
    assert read_in_odd_pieces(url, size=len(data)) == data


def test_streaming_read_survives_errors_and_cut_off_bodies(bucket, s3, small_chunks, fault_proxy):
    data = payload(12 * small_chunks + 999, seed=2)
    url = storage.join(bucket, "stream.tar")
    storage.write_bytes(url, data)
    s3_module.set_endpoint(fault_proxy.endpoint)
    fault_proxy.set_faults(error_rate=0.2, truncate_rate=0.2, seed=4)

    assert read_in_odd_pieces(url) == data

    assert fault_proxy.injected["error"] > 0
    assert fault_proxy.injected["truncate"] > 0


def test_read_bytes_survives_errors_and_cut_off_bodies(bucket, s3, fault_proxy):
    objects = {storage.join(bucket, f"obj-{i}"): payload(50_000 + i, seed=i) for i in range(8)}
    for url, data in objects.items():
        storage.write_bytes(url, data)
    s3_module.set_endpoint(fault_proxy.endpoint)
    fault_proxy.set_faults(error_rate=0.2, truncate_rate=0.2, seed=5)

    assert {url: storage.read_bytes(url) for url in objects} == objects

    assert fault_proxy.injected["error"] > 0
    assert fault_proxy.injected["truncate"] > 0


def _fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_fetch" in t.name]


def test_closing_a_stream_early_returns_at_once_and_stops_reading_ahead(
    bucket, s3, small_chunks, fault_proxy
):
    url = storage.join(bucket, "long.tar")
    storage.write_bytes(url, payload(40 * small_chunks))
    # Slow GETs: the stream is closed while read-ahead requests are still in flight.
    s3_module.set_endpoint(fault_proxy.endpoint)
    fault_proxy.set_faults(delay=0.2, methods={"GET"})
    before = set(_fetch_threads())

    closed = threading.Event()

    def read_a_little_and_close() -> None:
        with storage.open_read(url) as f:
            assert len(f.read(10)) == 10
        closed.set()

    reader = threading.Thread(target=read_a_little_and_close, daemon=True)
    reader.start()
    assert closed.wait(timeout=10), "closing a half-read stream hung"

    deadline = time.monotonic() + 10
    while set(_fetch_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not set(_fetch_threads()) - before, "the read-ahead thread kept running after close"


def test_reading_again_after_a_stream_error_raises_again_instead_of_hanging(bucket, s3):
    # The size is given (as the loader does from the manifest), so the error comes mid-stream.
    # The raw stream, not storage.open_read's buffered one: closing that would wait forever
    # for the lock a hung read holds.
    stream = s3_stream.StreamReader(storage.join(bucket, "deleted-shard.tar"), size=1000)
    errors: list[Exception] = []

    def read_twice() -> None:
        for _ in range(2):
            try:
                stream.read(10)
            except UserError as e:
                errors.append(e)

    reader = threading.Thread(target=read_twice, daemon=True)
    reader.start()
    reader.join(timeout=3)
    stream.close()
    assert len(errors) == 2, "a second read after an error hung"


def test_clean_partial_writes_aborts_dangling_multipart_uploads(bucket, s3):
    name = s3_module.split(bucket)[0]
    for key in ("run/train-000003.tar", "other-run/train-000000.tar"):
        upload = s3.client.create_multipart_upload(Bucket=name, Key=key)
        s3.client.upload_part(
            Bucket=name, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1000
        )

    assert storage.clean_partial_writes(storage.join(bucket, "run")) == 1

    left = s3.client.list_multipart_uploads(Bucket=name).get("Uploads", [])
    assert [u["Key"] for u in left] == ["other-run/train-000000.tar"]
    assert storage.clean_partial_writes(storage.join(bucket, "run")) == 0


# --- errors a user can cause: one line, what to check, no secret ---------------------------


@pytest.fixture
def wrong_credentials(s3, s3_auth_server, monkeypatch) -> str:
    """Made-up keys against a server that checks them; returns a URL there."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAMADEUPMADEUPMADE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    s3_module.set_endpoint(s3_auth_server.endpoint)
    return "s3://some-bucket/run/manifest.json"


@pytest.mark.parametrize("operation", OPERATIONS, ids=OPERATION_IDS)
def test_wrong_credentials_are_named(wrong_credentials, operation):
    with pytest.raises(UserError) as excinfo:
        operation(wrong_credentials)
    message = one_line_error(excinfo)
    assert "rejected the credentials (InvalidAccessKeyId)" in message
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message


def test_wrong_credentials_on_a_head_request_still_say_what_to_check(wrong_credentials):
    # A HEAD reply has no body, so S3 cannot say *why* it refused: a bare 403.
    with pytest.raises(UserError) as excinfo:
        storage.exists(wrong_credentials)
    assert "access denied" in one_line_error(excinfo)


def test_missing_credentials_are_named(bucket, monkeypatch, tmp_path):
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254
    s3_module._clients.clear()

    with pytest.raises(UserError) as excinfo:
        storage.read_bytes(storage.join(bucket, "x"))
    message = one_line_error(excinfo)
    assert message.startswith(f"no AWS credentials for {bucket}/x")
    assert "AWS_ACCESS_KEY_ID" in message


@pytest.mark.parametrize("operation", OPERATIONS, ids=OPERATION_IDS)
def test_missing_bucket_is_named(s3, operation):
    with pytest.raises(UserError) as excinfo:
        operation("s3://no-such-bucket-here/run/x")
    message = one_line_error(excinfo)
    assert (
        message
        == f"bucket no-such-bucket-here does not exist at {s3.endpoint}: create it or fix the URL"
    )


def test_unreachable_endpoint_fails_fast_and_names_the_endpoint(s3):
    closed = f"http://127.0.0.1:{free_port()}"
    s3_module.set_endpoint(closed)

    start = time.monotonic()
    with pytest.raises(UserError) as excinfo:
        storage.exists("s3://bucket/run/manifest.json")
    seconds = time.monotonic() - start

    message = one_line_error(excinfo)
    assert f"cannot reach the S3 endpoint {closed}" in message
    assert "AWS_ENDPOINT_URL_S3" in message
    assert seconds < 30, f"an unreachable endpoint took {seconds:.0f} s to report"


@pytest.mark.parametrize("url", ["s3://", "s3:///key"])
def test_s3_url_without_bucket_is_rejected(url):
    for operation in (storage.normalize, storage.exists, storage.read_bytes, storage.list_dir):
        with pytest.raises(UserError, match="not an S3 URL; write s3://BUCKET/PREFIX"):
            operation(url)


def test_malformed_s3_scheme_is_rejected_not_used_as_a_local_path():
    with pytest.raises(UserError, match="s3:/bucket/x"):
        storage.normalize("s3:/bucket/x")


def test_missing_key_is_named(bucket, s3):
    url = storage.join(bucket, "run", "missing.tar")
    with pytest.raises(UserError) as excinfo:
        storage.read_bytes(url)
    assert one_line_error(excinfo) == f"{url} does not exist"
    with pytest.raises(UserError, match="does not exist"):
        storage.open_read(url)
    assert not storage.exists(url)


# --- the same errors through the command line: exit status 2 and one line on stderr ---------


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    from data_prep.sample_data import write_digits_imagefolder

    root = tmp_path_factory.mktemp("tiny") / "images"
    write_digits_imagefolder(root, size=16, limit=20)
    return root


def run_prep_cli(src, dst: str, capsys) -> str:
    assert main(["prep", str(src), dst]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metatrainer prep: error: ")
    assert SECRET not in err
    return err


def test_prep_to_a_missing_bucket_exits_2_with_one_line(s3, tiny_imagefolder, capsys):
    err = run_prep_cli(tiny_imagefolder, "s3://no-such-bucket-here/digits", capsys)
    assert "bucket no-such-bucket-here does not exist" in err


def test_prep_with_wrong_credentials_exits_2_with_one_line(
    wrong_credentials, tiny_imagefolder, capsys
):
    err = run_prep_cli(tiny_imagefolder, "s3://some-bucket/digits", capsys)
    assert "rejected the credentials" in err


def test_prep_to_an_s3_url_without_bucket_exits_2_with_one_line(s3, tiny_imagefolder, capsys):
    err = run_prep_cli(tiny_imagefolder, "s3://", capsys)
    assert "not an S3 URL" in err


def test_a_hung_endpoint_is_reported_after_one_layer_of_retries(s3):
    """An endpoint that accepts connections and never answers: botocore's attempts, each
    waiting --s3-timeout, and no second retry layer on top (8, not 8 × 8, connections)."""
    import contextlib
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # until the listener closes
            while True:
                accepted.append(listener.accept()[0])  # and never answer

    threading.Thread(target=accept, daemon=True).start()
    hung = f"http://127.0.0.1:{listener.getsockname()[1]}"
    s3_module.set_endpoint(hung)
    s3_module.set_timeout(0.5)
    try:
        with pytest.raises(UserError) as excinfo:
            storage.read_bytes("s3://bucket/run/manifest.json")
    finally:
        s3_module.set_timeout(s3_module.DEFAULT_TIMEOUT)
        listener.close()
    assert hung in one_line_error(excinfo)
    assert 1 <= len(accepted) <= s3_module.ATTEMPTS, len(accepted)


def test_one_client_keeps_retrying_however_many_requests_failed_before(s3, bucket, fault_proxy):
    """botocore's per-client retry quota (500 tokens, 14 a retry) would fail requests that had
    attempts left once a long-lived process had seen ~36 requests retried twice; every one of
    these 80 concurrent writes fails twice and then goes through."""
    from concurrent.futures import ThreadPoolExecutor

    fault_proxy.set_faults(fail_first=2, errors=[(500, "InternalError", "Try again.")])
    s3_module.set_endpoint(fault_proxy.endpoint)
    urls = [f"{bucket}/quota/{i:03d}" for i in range(80)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda url: storage.write_bytes(url, url.encode()), urls))
    assert fault_proxy.injected["error"] == 2 * len(urls)
    s3_module.set_endpoint(s3.endpoint)
    assert [storage.read_bytes(url) for url in urls] == [url.encode() for url in urls]
