"""A real Prometheus server (Debian's `prometheus`) on 127.0.0.1 for tests: its own config and
TSDB in a directory of the test's, static scrape targets, queried through its HTTP API, stopped
by PID.

    server = PrometheusServer(tmp_path / "prometheus", ["127.0.0.1:9100"], interval="1s")
    ...                                          # the targets serve /metrics for a while
    server.query("max_over_time(metatrainer_samples_trained_total[10m])")  # [(labels, value)]
    server.stop()

A target that has gone away gets a staleness marker at the next failed scrape: an instant
query for a series no longer returns it, a range function over the series (`max_over_time`,
`last_over_time`) still sees every sample scraped before.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from free_ports import free_port

PROMETHEUS = "prometheus"
MISSING = "needs a Prometheus server: the Debian package `prometheus` (.ci/run installs it)"


def prometheus_binary() -> str | None:
    """The `prometheus` executable on PATH (Debian: /usr/bin/prometheus), or None."""
    return shutil.which(PROMETHEUS) or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None
    )


class PrometheusServer:
    def __init__(
        self, root: Path, targets: list[str], interval: str = "1s", job: str = "metatrainer"
    ) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError(MISSING)
        root.mkdir(parents=True, exist_ok=True)
        self.log = root / "prometheus.log"
        config = root / "prometheus.yml"
        # JSON is YAML: the config without a YAML library.
        config.write_text(
            json.dumps(
                {
                    "global": {"scrape_interval": interval, "scrape_timeout": interval},
                    "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
                },
                indent=2,
            )
        )
        self.url = f"http://127.0.0.1:{free_port()}"
        command = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address={self.url.removeprefix('http://')}",
            "--log.level=warn",
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # no server left behind when it did not come up
            raise

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:  # not listening yet, or 503 while it starts
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus was not ready within {timeout} s")

    def api(self, path: str, **params: str) -> dict | list:
        """The `data` of an HTTP API answer (`/api/v1/...`), checked to be a success."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query now: (labels, value) per series of the vector it returns."""
        data = self.api("/api/v1/query", query=promql)
        assert data["resultType"] == "vector", data
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def targets(self) -> list[dict]:
        """The active scrape targets with their health ("up", "down", "unknown")."""
        return self.api("/api/v1/targets", state="active")["activeTargets"]

    def wait_scraping(self, health: str | None = None, timeout: float = 60) -> None:
        """Until every target's latest scrape is done (Prometheus hands new targets to its
        scrapers about 5 s after it starts) and, given `health`, was "up" or "down"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = {t["health"] for t in self.targets()}
            if states and states <= ({health} if health else {"up", "down"}):
                return
            time.sleep(0.2)
        raise RuntimeError(f"prometheus's targets were not scraped ({health}) within {timeout} s")

    def stop(self) -> None:
        """SIGTERM (Prometheus closes its TSDB), SIGKILL after 10 s; by PID, with its group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
