"""The Ray Train wiring: the driver that starts a run (`driver`), the loop every rank runs
(`loop`), restoring a checkpoint (`resume`), the evaluation pass, the run's report, the
progress line and quiet worker logs.

Imports `training.data`, `training.model`, `training.config`, `cluster` and `data_prep`;
never `training.cli`.
"""
