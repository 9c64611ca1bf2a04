"""tests/deploy's own rule for the commands it runs (manifest_support.tool): a missing kubectl,
promtool or checkov fails the tests that need it under CI=true, where .ci/run installs them, and
elsewhere skips them saying what to install; no test over the builds passes on an empty list.

    pytest tests/deploy/test_manifest_support.py -q
"""

from __future__ import annotations

import manifest_support
import pytest
from manifest_support import INSTALL, built, tool


@pytest.fixture
def no_tools(monkeypatch, tmp_path):
    """An empty PATH and an empty .venv-tools/bin."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(manifest_support, "TOOLS_BIN", tmp_path)


@pytest.mark.parametrize("name", sorted(INSTALL))
def test_a_missing_tool_fails_in_ci(name, no_tools, monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=f"CI=true and {name} is not installed"):
        tool(name)


@pytest.mark.parametrize("name", sorted(INSTALL))
def test_a_missing_tool_skips_elsewhere_saying_what_to_install(name, no_tools, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        tool(name)
    assert INSTALL[name] in str(skipped.value)


def test_a_tool_in_venv_tools_is_found(no_tools, monkeypatch, tmp_path):
    """.ci/run installs checkov, and kubectl where the machine has none, in .venv-tools/bin."""
    tools_bin = tmp_path / "tools"
    tools_bin.mkdir()
    kubectl = tools_bin / "kubectl"
    kubectl.write_text("#!/bin/sh\n")
    kubectl.chmod(0o755)
    monkeypatch.setattr(manifest_support, "TOOLS_BIN", tools_bin)
    assert tool("kubectl") == str(kubectl)


def test_builds_never_give_an_empty_parameter_list(monkeypatch):
    """Without kubectl a test over the builds still runs once, for needs_kubectl to fail or skip."""
    monkeypatch.setattr(manifest_support, "KUBECTL", None)
    (case,) = built([])
    assert case.id == "no-kubectl"
    monkeypatch.setattr(manifest_support, "KUBECTL", "/usr/bin/kubectl")
    assert built(["x"]) == ["x"]
    with pytest.raises(AssertionError, match="kubectl built none of these"):
        built([])
