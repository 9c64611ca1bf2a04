"""SIGUSR1 to `metatrainer train` asks the ranks for a checkpoint, then a clean stop
(`training.run.stop`); the whole path, through a real SLURM job and back to the same weights,
is tests/slurm/test_sbatch.py."""

from __future__ import annotations

import os
import signal
import time

import torch

from cluster.world import World
from training.config import TrainConfig
from training.run import stop


def test_sigusr1_asks_the_ranks_to_stop_and_a_new_start_clears_it(ray_cluster, tmp_path):
    cfg = TrainConfig.of(data=[str(tmp_path / "d")], storage=str(tmp_path / "runs"), name="r")
    other = cfg.replace(name="other")
    before = signal.getsignal(signal.SIGUSR1)
    try:
        stop.listen(cfg)
        stop.listen(other)  # the handler is the other run's now; both keys are clear
        rank0, cpu = World(rank=0, world_size=1), torch.device("cpu")
        assert not stop.asked(cfg, rank0, cpu) and not stop.asked(other, rank0, cpu)
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not stop.asked(other, rank0, cpu):
            assert time.monotonic() < deadline, "SIGUSR1 did not reach the ranks"
            time.sleep(0.05)
        assert not stop.asked(cfg, rank0, cpu)  # a run's request is its own
        assert not stop.asked(other, World(rank=1, world_size=2), cpu)  # rank 0 reads it
        stop.listen(other)  # the run started again: the old request is gone
        assert not stop.asked(other, rank0, cpu)

        # A SIGUSR1 before the driver connects (`metatrainer train`'s first thing) is kept.
        stop.catch_early()
        os.kill(os.getpid(), signal.SIGUSR1)
        stop.listen(cfg)
        assert stop.asked(cfg, rank0, cpu)
        stop.listen(cfg)  # passed on once
        assert not stop.asked(cfg, rank0, cpu)
    finally:
        signal.signal(signal.SIGUSR1, before)
