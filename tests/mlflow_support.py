"""A real MLflow tracking server for the tests: `mlflow server` on 127.0.0.1 at a free port,
its runs in a sqlite file and its artifacts served from a directory (`--artifacts-destination`),
as README's "Tracking runs in MLflow" starts one. Read back with `client()`.

The server is the full `mlflow` package, in a venv of its own (.ci/run makes .venv-mlflow), as a
team runs theirs; the project's venv has the client users install (`metatrainer[mlflow]`)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from free_ports import free_port
from tool_support import missing_tool

REPO = Path(__file__).resolve().parent.parent
SERVER_VENV = REPO / ".venv-mlflow"

START_SECONDS = 120.0
"""A first start creates the sqlite schema: tens of seconds on a busy 2-core machine."""


def server_command() -> list[str]:
    """`mlflow` with its server: .venv-mlflow's, else this venv's when it has the full package."""
    if (SERVER_VENV / "bin" / "mlflow").exists():
        return [str(SERVER_VENV / "bin" / "mlflow")]
    if importlib.util.find_spec("flask") and importlib.util.find_spec("sqlalchemy"):
        return [sys.executable, "-m", "mlflow"]
    missing_tool(
        "no MLflow tracking server: python3.11 -m venv .venv-mlflow && "
        ".venv-mlflow/bin/pip install mlflow"
    )
    raise AssertionError("unreachable")


class MlflowServer:
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        command = [
            *server_command(), "server",
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            # A session of its own: stop() ends the server and the workers it forks, by its id.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not start: {self.log.read_text()[-2000:]}")

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, experiment: str) -> list:
        """The runs of `experiment` (none if it does not exist)."""
        client = self.client()
        found = client.get_experiment_by_name(experiment)
        return client.search_runs([found.experiment_id]) if found else []

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
