"""Connect to a running Ray cluster, or start a local mini-cluster on this machine.

`ray job submit` sets RAY_ADDRESS, so the same command works on a laptop and inside a job.
"""

from __future__ import annotations

import os

import ray

from cluster.errors import UserError


def connect(address: str | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); otherwise start a local one."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # Worker stdout carries the training log; keep it, but drop Ray's own chatter.
    kwargs = dict(log_to_driver=True, logging_level="WARNING", configure_logging=True)
    if address is None:
        # The dashboard (on 127.0.0.1) also serves the state API that Ray Train polls.
        ray.init(**kwargs)
        return
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot connect to the Ray cluster at {address} ({first}); check the address, "
            "or leave out --address and RAY_ADDRESS to start a local cluster"
        ) from None
