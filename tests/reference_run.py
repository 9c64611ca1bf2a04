"""The uninterrupted run that the fault-tolerance and resume tests compare with (2 CPU workers,
2 epochs, a checkpoint every 4 steps); trained once a session (`reference_run` in
tests/training/conftest.py)."""

REFERENCE_RUN = dict(
    batch_size=8, epochs=2, checkpoint_every_steps=4, keep_checkpoints=3, shuffle_block=128
)
