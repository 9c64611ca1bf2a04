"""The deploy/ tests share the parsed manifests through `manifest_support`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Test modules are imported with --import-mode=importlib: make `import manifest_support` work.
sys.path.insert(0, str(Path(__file__).parent))

import manifest_support  # noqa: E402


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl, for the tests marked `needs_kubectl`: a failure in CI without it, else a skip.

    Session-scoped, so that it comes before any module fixture that reads the builds.
    """
    path = manifest_support.tool("kubectl")
    assert manifest_support.DOCS, "kubectl built nothing from deploy/"
    return path
