"""A multi-node Ray cluster on 127.0.0.1 for tests: a head and worker nodes, each one
`ray start ... --block` process (its own session, so its whole process tree can be killed),
each node with its own ports, CPUs and a custom resource naming it.

    nodes = RayNodes(tmp_path, head_cpus=0)      # the head: "head" resource, no CPUs
    a = nodes.add(cpus=1)                        # a worker node: {"node-1": 1}
    nodes.wait_alive(2)
    subprocess.run([..., "--address", nodes.address])
    nodes.kill(a)                                # SIGKILL `ray start` and every descendant
    nodes.restart(a)                             # the same node again (same name, resources)
    nodes.stop()                                 # every node, by PID

The test process stays out of the cluster (it may be a driver of the session's single-node
cluster): drivers are subprocesses given `address`, and `alive_nodes` / `actors` ask the GCS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from free_ports import free_port

RAY = str(Path(sys.executable).parent / "ray")
METATRAINER = str(Path(sys.executable).parent / "metatrainer")
# The GCS declares a silent node dead after 1 s × 3 missed health checks (Ray's defaults,
# 3 s × 5, take about 17 s here): a test's node loss is noticed in seconds.
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@dataclass
class Node:
    name: str
    cpus: int
    resources: dict[str, float]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    ports: dict[str, int] = field(default_factory=dict)


class RayNodes:
    def __init__(
        self,
        root: Path,
        head_cpus: int = 0,
        head_resources: dict | None = None,
        fast_health_checks: bool = True,
    ):
        use_token_auth()
        self.root = root
        self.health_checks = HEALTH_CHECKS if fast_health_checks else {}
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{free_port()}"
        self.nodes: list[Node] = []
        self.head = self._start(
            Node("head", head_cpus, {"head": 1, **(head_resources or {})}, root / "head.log"),
            head=True,
        )
        try:
            self.wait_alive(1)
        except BaseException:
            self.stop()  # no cluster left behind when it did not come up
            raise

    def add(self, cpus: int = 1, resources: dict | None = None, env: dict | None = None) -> Node:
        """Start a worker node with `cpus` and the resource {"node-N": 1} (plus `resources`),
        its processes with `env` on top of this one's (a node's own settings)."""
        name = f"node-{len(self.nodes)}"
        node = Node(name, cpus, {name: 1, **(resources or {})}, self.root / f"{name}.log")
        node.env = {k: str(v) for k, v in (env or {}).items()}
        return self._start(node)

    def _start(self, node: Node, head: bool = False) -> Node:
        ports = node_ports()
        node.ports = ports
        command = [
            RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(node.cpus), "--num-gpus", "0",
            "--resources", json.dumps(node.resources),
            "--object-store-memory", str(100 * 2**20),
            *(f"--{k}={v}" for k, v in ports.items()),
        ]  # fmt: skip
        if head:
            dashboard_port = self.dashboard.rsplit(":", 1)[1]
            command += [
                "--head", f"--port={self.port}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
            ]  # fmt: skip
        else:
            command += [f"--address={self.address}"]
        # Each node its own temporary directory: nodes on one machine would otherwise race for
        # the names of their sockets and logs in one session directory.
        command += [f"--temp-dir={self.root / node.name}"]
        # Ray's processes that look for "the" cluster on their machine (Ray Train's placement
        # group cleaner) find several here: name this one.
        env = {**os.environ, "RAY_ADDRESS": self.address, **self.health_checks, **node.env}
        # `metatrainer` on every node's PATH, as in our image: what a `ray job submit --
        # metatrainer …` entrypoint runs, whether or not this environment was activated.
        env["PATH"] = os.pathsep.join([str(Path(METATRAINER).parent), env.get("PATH", "")])
        with node.log.open("ab") as log:
            node.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        if node not in self.nodes:
            self.nodes.append(node)
        return node

    def alive_nodes(self) -> list[dict]:
        """The GCS's view: alive nodes with their resources."""
        from ray.util.state import list_nodes

        nodes = list_nodes(
            address=self.address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False
        )
        return [{"id": n.node_id, "resources": n.resources_total} for n in nodes]

    def node_id(self, node: Node) -> str | None:
        for n in self.alive_nodes():
            if node.name in n["resources"]:
                return n["id"]
        return None

    def wait_alive(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        seen: object = None
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process and node.process.poll() is not None:
                    raise RuntimeError(f"{node.name} exited: {node.log.read_text()[-2000:]}")
            try:
                seen = self.alive_nodes()
                if len(seen) == count:
                    return
            except Exception as e:  # noqa: BLE001 - the GCS is still starting
                seen = e
            time.sleep(0.5)
        raise RuntimeError(
            f"{count} Ray nodes did not come up within {timeout} s; last seen: {seen!r:.1500}"
        )

    def actors(self, class_name: str) -> list:
        from ray.util.state import list_actors

        filters = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
        return list_actors(address=self.address, filters=filters, raise_on_missing_output=False)

    def kill(self, node: Node) -> None:
        """SIGKILL the node's `ray start` process and every process below it."""
        assert node.process is not None
        kill_tree(node.process)

    def restart(self, node: Node) -> Node:
        return self._start(node)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.process and node.process.poll() is None:
                self.kill(node)


def node_ports() -> dict[str, int]:
    """`ray start` flags → free ports for the ports every node opens, so that several nodes
    (and clusters) share this machine."""
    names = (
        "node-manager-port", "object-manager-port", "metrics-export-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
    )  # fmt: skip
    return {name: free_port() for name in names}


def use_token_auth() -> None:
    """Ray's token authentication, as `ray.init` sets it up for a local cluster: the token in
    ~/.ray/auth_token (made if missing), required by every node and sent by every client,
    this process included."""
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
    os.environ["RAY_AUTH_MODE"] = "token"
    # Ray reads its config once per process: read it again, as `ray.init` does when it turns
    # token auth on, or this process would not send the token without a `ray.init` before.
    from ray._raylet import Config

    Config.initialize("")


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL `process` and every process below it (started in a session of its own), and
    reap it."""
    for pid in [process.pid, *descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # anything forked since
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children before grandchildren."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def metatrainer(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([METATRAINER, *argv], capture_output=True, text=True, timeout=timeout)


def one_line_error(done: subprocess.CompletedProcess, command: str) -> str:
    """The error line of a run that failed as a user error should: exit 2, no traceback, one
    error line (lines Ray streams from its actors may arrive after it)."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    prefix = f"metatrainer {command}: error: "
    errors = [line for line in done.stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


class LiveRun:
    """A `metatrainer` process whose output (stdout and stderr) is read as it comes."""

    def __init__(self, argv: list[str]) -> None:
        self.process = subprocess.Popen(
            [METATRAINER, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, after: int = 0, timeout: float = 300) -> int:
        """The index of the first line from `after` on containing `text`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i in range(after, len(self.lines)):
                if text in self.lines[i]:
                    return i
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line with {text!r}:\n" + self.output[-3000:])

    def kill(self) -> None:
        """SIGKILL the driver and everything it started on this machine."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def finish(self, timeout: float = 600) -> int:
        self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return self.process.returncode
