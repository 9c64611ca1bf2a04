"""The uninterrupted runs that the fault-tolerance and resume tests compare with (2 CPU workers,
2 epochs, a checkpoint every few steps); each trained once a session (`reference_run`,
`augmented_reference_run` in tests/training/conftest.py)."""

from pathlib import Path

from training.model.checkpoint import STATE_FILE
from training.run.resume import CHECKPOINT_NAME

REFERENCE_RUN = dict(
    batch_size=8, epochs=2, checkpoint_every_steps=4, keep_checkpoints=3, shuffle_block=128
)

AUGMENTED_RUN = dict(
    REFERENCE_RUN, augment=True, feature_cache="off", checkpoint_every_steps=8, shuffle_block=29
)
"""The same on the default path: augmentation on, so every step decodes and crops its images
(no feature cache). A checkpoint every 8 steps (each costs a second or two); chunks of 29
samples: the digits' 4 partitions of 115-116 training samples give no checkpoint position (every
8 steps of 16 samples) on a chunk boundary in either epoch, so a resume always starts inside a
chunk."""


def checkpoint_names(run_dir: Path) -> list[str]:
    """A run directory's checkpoints, oldest first (names sort by step)."""
    return sorted(p.name for p in run_dir.iterdir() if CHECKPOINT_NAME.fullmatch(p.name))


def cut_off(checkpoint: Path) -> None:
    """Truncate a checkpoint's state file: there, but unreadable."""
    (checkpoint / STATE_FILE).write_bytes((checkpoint / STATE_FILE).read_bytes()[:999])
