"""Every S3 error a user can cause, against real S3 servers over HTTP (moto on 127.0.0.1, one
that checks credentials): one line, what to check, no secret, through the storage API and the
command line; and botocore's retries as the one retry layer, without a quota."""

from __future__ import annotations

import threading
import time

import pytest
from free_ports import free_port

from cluster import s3 as s3_module
from cluster import storage
from cluster.errors import UserError
from training.cli.main import main

SECRET = "wJalrXUtnFEMI-K7MDENG-thisIsTheSecret"

# Reading, writing and listing each reach S3 by a different request: each must name the fault.
OPERATIONS = [storage.read_bytes, lambda url: storage.write_bytes(url, b"x"), storage.list_dir]
OPERATION_IDS = ["read_bytes", "write_bytes", "list_dir"]


def one_line_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    assert SECRET not in message
    return message


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
