"""Shared fixtures: one local Ray mini-cluster per test session and a digits ImageFolder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray's worker processes inherit these: keep every test on loopback and quiet.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


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
