"""Environment variables set for a block of code, then restored."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

CACHE_DIR_VAR = "METATRAINER_CACHE_DIR"
"""A node's own cache disk (shards, weights files): set in its environment (pod, `ray start`)."""


@contextmanager
def environment(settings: dict[str, str]) -> Iterator[None]:
    """`settings` in `os.environ` inside the block; each variable's earlier value (or its
    absence) after it."""
    saved = {var: os.environ.get(var) for var in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
