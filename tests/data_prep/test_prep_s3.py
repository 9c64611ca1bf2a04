"""`metatrainer prep` into S3: a real server (moto over HTTP on 127.0.0.1), a proxy that fails
on purpose, a prep killed mid-upload and run again, and the errors a user can cause."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from free_ports import free_port

from cluster import storage
from data_prep.contract import Manifest, read_manifest
from data_prep.prep import prep
from data_prep.progress import Progress
from training.cli.main import main

NUM_SHARDS = 3


@pytest.fixture(scope="module")
def clean_run(ray_cluster, digits_dir, tmp_path_factory) -> tuple[Path, bytes]:
    """An uninterrupted run into a local directory: what every S3 run must reproduce."""
    dst = tmp_path_factory.mktemp("clean") / "digits"
    prep(str(digits_dir), str(dst), num_shards=NUM_SHARDS, progress=Progress(enabled=False))
    return dst, (dst / "manifest.json").read_bytes()


def shard_names(manifest: Manifest) -> list[str]:
    return [s.name for shards in manifest.splits.values() for s in shards]


def assert_exactly_the_dataset(s3_server, dst: str, clean: tuple[Path, bytes]) -> None:
    """Under `dst`: the clean run's manifest and shards, byte for byte, and nothing else."""
    clean_dir, clean_manifest = clean
    bucket, prefix = dst[len("s3://") :].split("/", 1)
    manifest = Manifest.from_json(clean_manifest)
    keys = s3_server.list_keys(bucket, prefix + "/")
    assert keys == sorted(f"{prefix}/{n}" for n in [*shard_names(manifest), "manifest.json"])
    got = s3_server.client.get_object(Bucket=bucket, Key=f"{prefix}/manifest.json")
    assert got["Body"].read() == clean_manifest
    for shards in manifest.splits.values():
        for shard in shards:
            obj = s3_server.client.get_object(Bucket=bucket, Key=f"{prefix}/{shard.name}")
            assert obj["Body"].read() == (clean_dir / shard.name).read_bytes()
            assert obj["Metadata"]["sha256"] == shard.sha256
    # A killed multipart upload would hold parts outside the object listing.
    uploads = s3_server.client.list_multipart_uploads(Bucket=bucket, Prefix=prefix + "/")
    assert uploads.get("Uploads", []) == []


def test_prep_into_s3_and_read_it_back(
    ray_cluster, s3, bucket, digits_dir, clean_run, monkeypatch, capsys
) -> None:
    secret = "round-trip-secret-7f3a"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    dead_gateway = f"http://127.0.0.1:{free_port()}"
    dst = f"{bucket}/datasets/digits"
    argv = ["prep", str(digits_dir), dst, "--num-shards", str(NUM_SHARDS)]
    assert main([*argv, "--pushgateway", dead_gateway]) == 0
    out, err = capsys.readouterr()

    assert_exactly_the_dataset(s3, dst, clean_run)
    manifest = read_manifest(dst)
    assert manifest.to_json() == clean_run[1]
    shard = manifest.shards("train")[0]
    with storage.open_read(storage.join(dst, shard.name)) as f:
        members = tarfile.open(fileobj=io.BytesIO(f.read())).getnames()
    assert len(members) == 3 * shard.num_samples
    assert f"manifest: {dst}/manifest.json" in out
    # An unreachable Pushgateway costs one warning line, not the run.
    warnings = [line for line in err.splitlines() if "Pushgateway" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: could not push metrics")
    assert secret not in out + err and "Traceback" not in err


def test_prep_survives_a_flaky_s3(
    ray_cluster, s3, bucket, fault_proxy, digits_dir, clean_run
) -> None:
    fault_proxy.set_faults(error_rate=0.2, truncate_rate=0.3, seed=7)
    dst = f"{bucket}/flaky"
    quiet = Progress(enabled=False)
    manifest = prep(
        str(digits_dir),
        dst,
        num_shards=NUM_SHARDS,
        progress=quiet,
        s3_endpoint=fault_proxy.endpoint,
    )
    assert manifest.to_json() == clean_run[1]
    assert fault_proxy.injected["error"] > 0
    # Read back through the faults too, one request at a time so the seed fixes which are cut.
    fault_proxy.set_faults(error_rate=0.2, truncate_rate=0.3, seed=7)
    assert read_manifest(dst).to_json() == clean_run[1]
    for name in shard_names(manifest):
        with storage.open_read(storage.join(dst, name)) as f:
            assert f.read() == (clean_run[0] / name).read_bytes()
    assert fault_proxy.injected["truncate"] > 0
    assert_exactly_the_dataset(s3, dst, clean_run)


def _start_prep(src: Path, dst: str, endpoint: str, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["AWS_ENDPOINT_URL_S3"] = endpoint
    # A fresh local Ray cluster of its own, bound to loopback like the session's.
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    argv = [sys.executable, "-m", "training.cli.main", "prep", str(src), dst]
    return subprocess.Popen(
        [*argv, "--num-shards", str(NUM_SHARDS)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the Ray cluster it starts dies with it
    )


def _stat(pid: int | str) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()  # the command name (field 2) may hold spaces


def _is_running(pid: int | str) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _session_members(sid: int) -> list[int]:
    """Live processes of session `sid`: Ray puts its workers in process groups of their own."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if (s := _stat(pid)) and s[0] != "Z" and int(s[3]) == sid]


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the prep and every process its Ray cluster started, and wait until all are gone."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # it finished before the kill: the test fails on its status
        pass
    process.wait()
    deadline = time.monotonic() + 30
    while members := _session_members(process.pid):
        assert time.monotonic() < deadline, f"processes of the killed prep survive: {members}"
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def test_prep_killed_mid_upload_then_rerun_finishes_the_job(
    ray_cluster, s3, bucket, fault_proxy, digits_dir, clean_run, tmp_path
) -> None:
    dst = f"{bucket}/killed"
    name, prefix = bucket[len("s3://") :], "killed/"
    # An older run with more shards, then a file of the user's that only looks like a shard.
    prep(str(digits_dir), dst, num_shards=8, progress=Progress(enabled=False))
    users = prefix + "train-000042.tar"
    s3.client.put_object(Bucket=name, Key=users, Body=b"not prep's")
    older = s3.etags(name, prefix)
    # Slow uploads stretch the upload phase over seconds, so the kill lands inside it.
    fault_proxy.set_faults(delay=0.5, methods={"PUT", "POST"})
    log_path = tmp_path / "prep.log"
    with log_path.open("wb") as log:
        process = _start_prep(digits_dir, dst, fault_proxy.endpoint, log)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and process.poll() is None:
                if len(_new_shards(s3, name, prefix, older)) >= 2:
                    break
                time.sleep(0.05)
        finally:
            _kill_session(process)
    assert process.returncode == -signal.SIGKILL, log_path.read_text()
    uploaded = _new_shards(s3, name, prefix, older)
    assert 2 <= len(uploaded) < 3 * NUM_SHARDS, uploaded
    assert prefix + "manifest.json" not in s3.list_keys(name, prefix)
    # Shards here are too small for multipart uploads: leave one as a killed large upload would.
    s3.client.create_multipart_upload(Bucket=name, Key=prefix + "train-000001.tar")

    fault_proxy.set_faults()
    stderr = io.StringIO()
    manifest = prep(
        str(digits_dir),
        dst,
        num_shards=NUM_SHARDS,
        progress=Progress(stream=stderr),
        s3_endpoint=fault_proxy.endpoint,
    )
    assert manifest.to_json() == clean_run[1]
    assert "kept" in stderr.getvalue() and "partial write" in stderr.getvalue()
    # The killed run removed the older manifest: the ledger still named its shards.
    assert "removed 15 shard(s) of an earlier run" in stderr.getvalue()
    assert s3.client.get_object(Bucket=name, Key=users)["Body"].read() == b"not prep's"
    s3.client.delete_object(Bucket=name, Key=users)
    assert_exactly_the_dataset(s3, dst, clean_run)
    # The killed tasks' local temporary shards went with the rerun, too.
    owner = f"metatrainer-prep-{socket.gethostname()}-pid"
    files = [p.name for p in Path(tempfile.gettempdir()).glob(owner + "*.tmp")]
    assert [f for f in files if not _is_running(f[len(owner) :].split("-")[0])] == []


def _new_shards(s3_server, bucket: str, prefix: str, older: dict[str, str]) -> list[str]:
    """Shards stored since `older` was listed (new keys, or new bytes under an old key)."""
    now = s3_server.etags(bucket, prefix)
    return [k for k, tag in now.items() if k.endswith(".tar") and older.get(k) != tag]


def _one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("metatrainer prep: error: "), err
    return lines[0]


def test_rejected_credentials(
    ray_cluster, s3, s3_auth_server, digits_dir, monkeypatch, capsys
) -> None:
    secret = "wrong-secret-9c1e"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    argv = ["prep", str(digits_dir), "s3://data/digits", "--s3-endpoint", s3_auth_server.endpoint]
    err = _one_line_error(argv, capsys)
    assert "credentials" in err and "AWS_ACCESS_KEY_ID" in err and secret not in err


def test_missing_bucket(ray_cluster, s3, digits_dir, capsys) -> None:
    err = _one_line_error(["prep", str(digits_dir), "s3://no-such-bucket/digits"], capsys)
    assert "bucket no-such-bucket does not exist" in err


def test_unreachable_endpoint(ray_cluster, s3, digits_dir, capsys) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    argv = ["prep", str(digits_dir), "s3://data/digits", "--s3-endpoint", endpoint]
    err = _one_line_error(argv, capsys)
    assert "cannot reach the S3 endpoint" in err and endpoint in err and "--s3-endpoint" in err


def test_bad_url(ray_cluster, s3, digits_dir, tmp_path, capsys) -> None:
    err = _one_line_error(["prep", str(digits_dir), "s3:///digits"], capsys)
    assert "s3://BUCKET/PREFIX" in err
    err = _one_line_error(["prep", str(digits_dir), "gs://bucket/digits"], capsys)
    assert "unsupported URL scheme" in err
    err = _one_line_error(["prep", "s3://bucket/images", str(tmp_path / "out")], capsys)
    assert "SRC" in err and "local" in err


def test_an_error_in_a_shard_task_is_one_line(ray_cluster, s3, bucket, fault_proxy, digits_dir):
    """Shard uploads refused (in the Ray tasks, after prep's own write test passed): one line,
    exit status 2, from a `metatrainer prep` process that joins the cluster."""
    denied = [(403, "AccessDenied", "Access Denied")]
    fault_proxy.set_faults(error_rate=1.0, methods={"PUT"}, keys="/digits/train-", errors=denied)
    command = [
        str(Path(sys.executable).parent / "metatrainer"), "prep", str(digits_dir),
        f"{bucket}/digits", "--num-shards", "4", "--s3-endpoint", fault_proxy.endpoint,
        "--address", ray_cluster.get_runtime_context().gcs_address,
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    assert run.returncode == 2, run.stderr
    # Nothing else about the failure: no traceback, and none of the other refused tasks' errors
    # printed by Ray as "Unhandled error" when prep exits.
    for noise in ("Traceback", "UserError", "ray::", "Unhandled"):
        assert noise not in run.stderr, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"metatrainer prep: error: access denied to {bucket}/digits/train-")
    assert run.stderr.count("error:") == 1, run.stderr
    assert fault_proxy.injected["error"] >= 1
