"""moto's S3 server in a subprocess that checks credentials, so made-up keys are rejected:

auth = AuthS3Server()                     # on a free 127.0.0.1 port
auth.endpoint                             # "http://127.0.0.1:PORT"
auth.stop()
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import time

from free_ports import free_port


class AuthS3Server:
    """moto in a subprocess that authenticates every request, so made-up keys are rejected
    (InvalidAccessKeyId). moto reads INITIAL_NO_AUTH_ACTION_COUNT once, at import."""

    def __init__(self, timeout: float = 60.0) -> None:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_until_up(port, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto.server exited with status {self._process.returncode}")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            try:
                conn.request("GET", "/moto-api/")
                conn.getresponse().read()
                return
            except OSError:
                time.sleep(0.1)
            finally:
                conn.close()
        raise RuntimeError(f"moto.server did not answer on port {port} within {timeout} s")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
