"""A checkpoint on request, then a clean stop: SIGUSR1 to `metatrainer train` (SLURM's
`--signal B:USR1@SECONDS` through deploy/slurm/metatrainer.sbatch, or `kill -USR1 PID`).

    driver   `listen`: on SIGUSR1, puts the request in the Ray cluster's key-value store
             (namespace "metatrainer", a key per run directory); a new start of the run
             clears an old one
    ranks    `asked`: every --log-every steps rank 0 reads the request and broadcasts it, so
             that every rank stops at the same step; they checkpoint there (the report's
             metrics say `stopped`) and end the training function
    driver   raises `cluster.errors.Stopped`: no result.json; one line saying where the run
             stopped, exit status 75 (EX_TEMPFAIL: run the same command again to resume)
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING

from cluster import storage
from cluster.world import World
from training.config import TrainConfig

if TYPE_CHECKING:
    import torch

NAMESPACE = "metatrainer"
STOPPED = "stopped"
"""The key of a stop's checkpoint report: what tells the driver the run did not finish."""


def key(cfg: TrainConfig) -> bytes:
    return f"checkpoint-and-stop:{storage.join(cfg.run.storage, cfg.run.name)}".encode()


_early: list[int] = []
"""SIGUSR1s that came before the driver could pass them on (`catch_early`)."""


def catch_early() -> None:
    """`metatrainer train`, first thing: keep a SIGUSR1 that comes before training starts
    (Python's default would end the process) for `listen` to pass on."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, lambda signum, frame: _early.append(signum))


def listen(cfg: TrainConfig) -> None:
    """The driver, connected: clear an old request, and on SIGUSR1 ask the ranks to stop (in
    the main thread only, where Python takes signals: not in a Tune trial)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key(cfg), namespace=NAMESPACE)
    if threading.current_thread() is not threading.main_thread():
        return

    def put() -> None:
        internal_kv._internal_kv_put(key(cfg), b"1", overwrite=True, namespace=NAMESPACE)

    if _early:
        _early.clear()
        put()

    def on_usr1(signum, frame) -> None:
        print(
            "metatrainer train: SIGUSR1: checkpointing at the next --log-every step, then stopping",
            file=sys.stderr,
            flush=True,
        )
        threading.Thread(target=put, daemon=True).start()  # no RPC inside a signal handler

    signal.signal(signal.SIGUSR1, on_usr1)


def asked(cfg: TrainConfig, world: World, device: torch.device) -> bool:
    """Every rank, at the same step: whether a stop was asked for (rank 0 reads it)."""
    import torch
    import torch.distributed as dist

    flag = 0
    if world.is_main:
        from ray.experimental import internal_kv

        flag = int(bool(internal_kv._internal_kv_get(key(cfg), namespace=NAMESPACE)))
    if world.world_size > 1 and dist.is_initialized():
        shared = torch.tensor([flag], device=device)
        dist.broadcast(shared, src=0)
        flag = int(shared.item())
    return bool(flag)


def stopped_line(cfg: TrainConfig, metrics: dict, checkpoint: str | None) -> str:
    return (
        f"stopped at step {metrics.get('step')} (epoch {int(metrics.get('epoch', 0)) + 1} of "
        f"{cfg.optim.epochs}) on request, checkpoint {checkpoint}; run the same command "
        "again to continue from there"
    )
