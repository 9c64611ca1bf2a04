"""A head without CPUs and three one-CPU worker nodes, each with its own shard cache, shared
by the tests of this directory (see tests/README.md, "Many nodes")."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def nodes():
    from ray_nodes import RayNodes

    # Ray's socket paths must stay under 108 bytes: a short directory, not pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
    cluster = RayNodes(root, head_cpus=0)
    try:
        for i in range(1, 4):
            # Each worker node its own shard cache (as on its own disk) and read log.
            env = {"METATRAINER_CACHE_DIR": root / f"cache-node-{i}",
                   "METATRAINER_READ_LOG": root / f"reads-node-{i}"}  # fmt: skip
            cluster.add(cpus=1, env=env)
        cluster.wait_alive(4)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def shards(nodes, digits_dir, tmp_path_factory) -> str:
    """The digits prepared on `nodes` (2 shards per split), shard tasks on the worker nodes.
    Session-scoped like `nodes`; these tests run last (tests/conftest.py)."""
    from ray_nodes import metatrainer

    dst = str(tmp_path_factory.mktemp("multinode-shards") / "digits")
    argv = ["prep", str(digits_dir), dst, "--num-shards", "2", "--shared-dst"]
    done = metatrainer(*argv, "--address", nodes.address)
    assert done.returncode == 0, done.stderr[-3000:]
    return dst
