"""A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd from Debian's
packages (`.ci/run` installs them), started as root with a `slurm.conf` written here, talking
over 127.0.0.1 on free ports. Jobs go through the real `sbatch`, `scancel` and `scontrol`.

    cluster = SlurmCluster(root)          # needs root and the packages; skips or fails without
    job = cluster.sbatch(["train", ...], env={...})
    cluster.wait(job)                      # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}
    cluster.job_processes(job)             # PIDs still running with the job's SLURM_JOB_ID
    cluster.stop()
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from free_ports import free_port
from tool_support import missing_tool

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "deploy" / "slurm" / "metatrainer.sbatch"
VENV_BIN = REPO / ".venv" / "bin"
DAEMONS = ("munged", "slurmctld", "slurmd")
NODE = "mt1"
CPUS = 4
"""The node's CPUs as SLURM counts them (more than this machine's 2: `config_overrides`), so
that a job's Ray has room for two training workers beside its driver."""
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).exists()), None
    )


class SlurmCluster:
    def __init__(self, root: Path) -> None:
        if os.geteuid() != 0:
            missing_tool("SLURM's daemons run as root here: run the tests as root")
        found = {name: _find(name) for name in (*DAEMONS, "sbatch", "scontrol", "scancel")}
        if not all(found.values()):
            missing = ", ".join(name for name, path in found.items() if not path)
            missing_tool(f"no {missing}: apt-get install slurmctld slurmd slurm-client munge")
        self.bin = found
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []
        self._start_munge()
        self._write_conf()
        self._start("slurmctld", [self.bin["slurmctld"], "-D", "-f", str(self.conf)])
        self._start("slurmd", [self.bin["slurmd"], "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait_idle()

    # --- the daemons -----------------------------------------------------------------------

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = self.root / "munge.socket"
        self._start("munged", [
            self.bin["munged"], "--foreground", "--force", f"--key-file={key}",
            f"--socket={self.munge_socket}", f"--pid-file={self.root / 'munged.pid'}",
            f"--log-file={self.root / 'munged.log'}", f"--seed-file={self.root / 'munge.seed'}",
        ])  # fmt: skip
        deadline = time.monotonic() + 30
        while not self.munge_socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start: {self._log('munged')}")
            time.sleep(0.2)

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        port = free_port(2)
        for d in ("state", "spool"):
            (self.root / d).mkdir(exist_ok=True)
        r = self.root
        self.conf.write_text(f"""\
ClusterName=metatrainer-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={port}
SlurmdPort={port + 1}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "slurmctld.log"}
SlurmdLogFile={r / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
KillWait=15
SlurmdParameters=config_overrides
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory=4000 State=UNKNOWN
PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def _start(self, name: str, command: list[str]) -> None:
        log = (self.root / f"{name}.out").open("ab")
        self.processes.append(
            subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )  # fmt: skip
        )

    def _log(self, name: str) -> str:
        texts = [(self.root / f).read_text(errors="replace") for f in (f"{name}.log", f"{name}.out")
                 if (self.root / f).exists()]  # fmt: skip
        return "\n".join(texts)[-3000:]

    def _wait_idle(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            for process, name in zip(self.processes, DAEMONS, strict=False):
                if process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{name} exited: {self._log(name)}")
            seen = self.scontrol("show", "node", NODE, check=False)
            if "State=IDLE" in seen:
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"the SLURM node did not come up within {timeout} s: {seen}\n{self._log('slurmd')}"
        )

    def stop(self) -> None:
        if self.processes:  # cancel what still runs, so that no job outlives its daemons
            subprocess.run([self.bin["scancel"], "--user", "root"], env=self.env, check=False)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self.scontrol(
                "show", "jobs", "--oneliner", check=False
            ).count("JobState=RUNNING"):
                time.sleep(1)
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self.processes = []

    # --- jobs --------------------------------------------------------------------------------

    def scontrol(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            [self.bin["scontrol"], *args], env=self.env, capture_output=True, text=True
        )
        if check and done.returncode:
            raise RuntimeError(f"scontrol {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def sbatch(self, args: list[str], env: dict[str, str], options: tuple[str, ...] = ()) -> str:
        """Submit deploy/slurm/metatrainer.sbatch with `args` on the node's CPUs, from a shell
        whose environment is `env` with metatrainer's venv on PATH (as a user's, activated);
        the job id."""
        job_env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "SLURM_CONF": str(self.conf),
            **env,
        }
        done = subprocess.run(
            [self.bin["sbatch"], "--parsable", f"--output={self.root}/job-%j.out",
             f"--chdir={self.root}", f"--cpus-per-task={CPUS}", *options, str(SBATCH), *args],
            env=job_env, capture_output=True, text=True, cwd=self.root,
        )  # fmt: skip
        if done.returncode:
            raise RuntimeError(f"sbatch failed: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job`'s fields."""
        text = self.scontrol("show", "job", job_id, "--oneliner")
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def wait(self, job_id: str, timeout: float = 600) -> dict[str, str]:
        """The job's fields once it has ended (and its processes are gone)."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields.get("JobState") in FINAL:
                return fields
            time.sleep(1)
        raise TimeoutError(f"job {job_id} did not end within {timeout} s: {fields}\n"
                           f"{self.output(job_id)[-3000:]}")  # fmt: skip

    def output(self, job_id: str) -> str:
        path = self.root / f"job-{job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def job_processes(self, job_id: str, wait: float = 30) -> list[str]:
        """`pid command` of processes that still carry SLURM_JOB_ID=<job> in their
        environment, after giving them `wait` seconds to go."""
        needle = f"\0SLURM_JOB_ID={job_id}\0".encode()
        deadline = time.monotonic() + wait
        while True:
            left = []
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if needle in b"\0" + (entry / "environ").read_bytes():
                        cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                        left.append(f"{entry.name} {cmd.strip()[:200]}")
                except OSError:
                    continue
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(1)

    def cancel(self, job_id: str, *options: str) -> None:
        subprocess.run([self.bin["scancel"], *options, job_id], env=self.env, check=True)
