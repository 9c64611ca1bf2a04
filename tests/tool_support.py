"""Tools from outside PyPI that `.ci/run` installs (Prometheus, Pushgateway, promtool, kubectl,
checkov). A test that needs a missing one fails under CI=true, so CI never passes a check it could
not run, and elsewhere skips, saying what to install."""

from __future__ import annotations

import os

import pytest


def missing_tool(message: str) -> None:
    """Fail the test under CI=true, else skip it; `message` says what is missing and how to
    install it."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {message} (.ci/run installs it)", pytrace=False)
    pytest.skip(message)
