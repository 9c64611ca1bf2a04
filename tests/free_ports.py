"""Free TCP ports on this machine, for servers the tests start (S3, Prometheus, Ray nodes,
metrics endpoints): `free_port(count)` is the first of `count` consecutive ones.
"""

from __future__ import annotations

import random
import socket

PORTS = range(20000, 32768)
"""Where `free_port` looks: above Ray's worker ports (10002-19999) and below the kernel's
ephemeral range (32768-60999), which every `bind(port 0)` on the machine (Ray's processes, moto,
clients) draws from: a port picked here is not taken between the asking and a later bind by
another process, as a port the kernel handed out once can be."""


def free_port(count: int = 1) -> int:
    """The first of `count` consecutive TCP ports that nothing listens on (when asked)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(PORTS.start, PORTS.stop - count)
        if all(_bindable(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} free consecutive ports in {PORTS}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False
