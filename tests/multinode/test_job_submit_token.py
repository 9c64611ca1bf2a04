"""The README's "Submitting to a Ray cluster", run as written: a head started the usual way
(`ray get-auth-token --generate`, `ray start --head`) by one user, and `ray job submit` from
another user's shell with nothing of Ray's set, which the head refuses until the README's two
exports are made; then prep and train submitted as jobs succeed.

What the test fills in: the README's placeholders (HEAD, TOKEN, IMAGES, DATA, RUNS), ports
of its own on 127.0.0.1 for `ray start` (beside the session's clusters), and a small, fast
training (appended flags)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from free_ports import free_port
from ray_nodes import METATRAINER, RAY, kill_tree, node_ports

from data_prep.contract import read_manifest

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- tested literally by tests/multinode/test_job_submit_token.py -->"
SMALL_RUN = [
    "--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
    "--workers", "1", "--loader-workers", "0", "--metrics-port", "0",
]  # fmt: skip
RAY_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS")


def readme_commands() -> list[str]:
    """The command lines of the README's block under MARKER, comments left out."""
    text = README.read_text()
    assert MARKER in text, f"README.md lost its block marked {MARKER}"
    block = text.split(MARKER, 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def shell_env(home: Path) -> dict[str, str]:
    """A user's login environment: their own HOME, none of Ray's variables, metatrainer and
    ray on PATH (as where metatrainer is installed)."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARIABLES}
    env["HOME"] = str(home)
    env["PATH"] = os.pathsep.join([str(Path(METATRAINER).parent), env.get("PATH", "")])
    return env


class Head:
    """`ray start --head` as the README runs it, with its own ports and directory, `--block`
    so that the test owns its processes (a `ray stop` would stop every cluster here)."""

    def __init__(self, root: Path, argv: list[str], env: dict[str, str]) -> None:
        self.dashboard_port = free_port()
        ports = {"port": free_port(), "dashboard-port": self.dashboard_port, **node_ports()}
        command = [
            RAY, *argv[1:], "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
            "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(100 * 2**20),
            f"--temp-dir={root / 'ray'}", *(f"--{k}={v}" for k, v in ports.items()),
        ]  # fmt: skip
        self.log = root / "head.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )  # fmt: skip

    def wait_dashboard(self, timeout: float = 120) -> None:
        """Until the job API answers (401 without a token: it is up)."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.dashboard_port}/api/version"
        while True:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=5)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                assert time.monotonic() < deadline, self.log.read_text()[-3000:]
                time.sleep(0.5)

    def stop(self) -> None:
        kill_tree(self.process)


def fill_in(line: str, values: dict[str, str]) -> list[str]:
    """The README's line as argv, its placeholders replaced by `values`."""
    pattern = "|".join(re.escape(k) for k in values)
    argv = shlex.split(re.sub(rf"\b(?:{pattern})\b", lambda m: values[m[0]], line))
    return [RAY if a == "ray" else a for a in argv]


@pytest.fixture
def tiny_images(digits_dir, tmp_path) -> Path:
    """8 digits of each class: a job in seconds."""
    root = tmp_path / "images"
    for cls in sorted(p for p in digits_dir.iterdir() if p.is_dir()):
        (root / cls.name).mkdir(parents=True)
        for image in sorted(cls.iterdir())[:8]:
            shutil.copy(image, root / cls.name / image.name)
    return root


def test_the_readme_submits_to_a_token_authenticated_head(tiny_images, tmp_path):
    # Ray's socket paths must stay under 108 bytes: a short directory, not pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="tk-", dir="/tmp"))
    head_home, user_home = root / "head-user", root / "submitting-user"
    head_home.mkdir()
    user_home.mkdir()
    head_env, user_env = shell_env(head_home), shell_env(user_home)
    commands = readme_commands()
    head_lines = [c for c in commands if c.startswith("ray ") and "job submit" not in c]
    exports = [c for c in commands if c.startswith("export ")]
    submits = [c for c in commands if "ray job submit" in c]
    assert [shlex.split(c)[:2] for c in head_lines] == [["ray", "get-auth-token"], ["ray", "start"]]
    assert exports and len(submits) == 2

    generated = subprocess.run(shlex.split(head_lines[0]), env=head_env, capture_output=True)
    assert generated.returncode == 0, generated.stderr
    head = Head(root, shlex.split(head_lines[1]), head_env)
    try:
        head.wait_dashboard()
        token = subprocess.run(
            [RAY, "get-auth-token"], env=head_env, capture_output=True, text=True, check=True
        ).stdout.strip()
        values = {
            "HEAD:8265": f"127.0.0.1:{head.dashboard_port}",
            "TOKEN": token,
            "IMAGES": str(tiny_images),
            "DATA": str(tmp_path / "shards"),
            "RUNS": str(tmp_path / "runs"),
        }

        # From a shell with nothing of Ray's set, the head refuses the job.
        prep = fill_in(submits[0], values)
        refused = subprocess.run(prep, env=user_env, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert "authentication token" in (refused.stdout + refused.stderr).lower()

        for line in exports:
            name, value = shlex.split(line.removeprefix("export "))[0].split("=", 1)
            user_env[name] = fill_in(value, values)[0]  # TOKEN: the head's
        done = subprocess.run(prep, env=user_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert len(read_manifest(str(tmp_path / "shards")).classes) == 10

        train = fill_in(submits[1], values) + SMALL_RUN
        done = subprocess.run(train, env=user_env, capture_output=True, text=True, timeout=420)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        result = json.loads((tmp_path / "runs" / "digits" / "result.json").read_text())
        assert result["config"]["data"]["datasets"] == [str(tmp_path / "shards")]
        assert len(result["history"]) == 1 and "test_accuracy" in result
    finally:
        if "head" in locals():
            head.stop()
        shutil.rmtree(root, ignore_errors=True)
