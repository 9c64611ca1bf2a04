"""Shared fixtures: one local Ray mini-cluster per test session, a digits ImageFolder, a real
S3 server (moto over HTTP on 127.0.0.1) with a fault-injecting proxy, and a real MLflow
tracking server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Ray's worker processes inherit these: keep every test on loopback and quiet.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Dummy credentials for the local moto server only, set before the session's Ray cluster
# starts so its workers inherit them; the endpoint is passed to Ray tasks explicitly.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

# Test modules are imported with --import-mode=importlib: make `import s3_moto` (and the
# other support modules here) work.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(items) -> None:
    """The multi-node tests last: their cluster lives to the end of the session, and Ray Train's
    placement-group cleaner in the one-node `ray_cluster` refuses to guess between two
    clusters on one machine (the multi-node nodes name theirs with RAY_ADDRESS)."""
    items.sort(key=lambda item: "/multinode/" in item.nodeid.replace("\\", "/"))


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster on 127.0.0.1, shared by every test that needs one."""
    import ray

    # 4 logical CPUs on a 2-core machine: prep tasks and 2 training workers never starve.
    ray.init(
        num_cpus=4,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """An ImageFolder of 600 real handwritten digits (32×32 JPEG), written once per session."""
    from data_prep.sample_data import write_digits_imagefolder

    root = tmp_path_factory.mktemp("digits") / "images"
    write_digits_imagefolder(root, size=32, limit=600)
    return root


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server over HTTP on 127.0.0.1 (moto, no authentication), for the session."""
    from s3_moto import S3Server

    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """This process pointed at `s3_server` with dummy credentials; restored afterwards."""
    from s3_moto import DUMMY_CREDENTIALS

    from cluster import s3 as s3_module

    for name, value in DUMMY_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    s3_module._clients.clear()
    s3_module.set_endpoint(s3_server.endpoint)
    yield s3_server
    # Tests may have moved the endpoint (to a proxy, a closed port): monkeypatch restores the
    # environment after this, and no cached client may outlive it.
    s3_module._clients.clear()


@pytest.fixture
def bucket(s3) -> str:
    """A fresh, empty bucket on the S3 server, as "s3://NAME"."""
    return s3.make_bucket()


@pytest.fixture
def fault_proxy(s3_server):
    """A FaultProxy in front of `s3_server`, faultless until `set_faults`; the test points
    clients at `fault_proxy.endpoint` itself (`cluster.s3.set_endpoint`)."""
    from s3_fault_proxy import FaultProxy

    proxy = FaultProxy(s3_server.endpoint)
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def s3_auth_server():
    """A second S3 server (a moto subprocess) that rejects made-up credentials."""
    from s3_moto_auth import AuthS3Server

    server = AuthS3Server()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server over HTTP on 127.0.0.1 (sqlite store, served artifacts),
    for the session; each test uses an experiment of its own."""
    from mlflow_support import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()
