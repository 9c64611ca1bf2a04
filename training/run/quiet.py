"""What Ray Train logs that metatrainer says better itself, in one line (all kept with --debug).

Ray Train 2.60 logs through loggers named after its internal modules, in the processes it
starts: the workers (`quiet_worker_logs`, called by the training function) and the controller
(`QuietController`, a callback, which is the one piece of ours that runs there: it installs
its filter when it is unpickled). If Ray renames a logger, its lines simply show again.
"""

from __future__ import annotations

import logging
import sys

import ray.train

from cluster.errors import one_line


def quiet_worker_logs() -> None:
    """Ray Train logs every report at INFO through a logger named by its file path (not under
    `ray.train`, so RunConfig's LoggingConfig cannot quiet it; our epoch line says it), and a
    UserError with its traceback from every worker at every retry (the driver says it)."""
    try:
        from ray.train.v2._internal import util
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    util.logger.addFilter(_not_a_user_error)  # once: the same filter is not added twice


def _not_a_user_error(record: logging.LogRecord) -> bool:
    """Keep a record unless it is logged while a UserError is being handled."""
    return one_line(sys.exc_info()[1] or Exception()) is None


class QuietController(ray.train.UserCallback):
    """In Ray Train's controller: a worker group that could not be placed in time is logged
    as one line per attempt instead of a traceback ("Error in control loop iteration")."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._install()

    def _install(self) -> None:
        try:
            from ray.train.v2._internal.execution.controller import controller
        except ImportError:
            return
        for f in controller.logger.filters:
            if isinstance(f, _StartupTimeouts):
                return
        controller.logger.addFilter(_StartupTimeouts(self.attempts))


class _StartupTimeouts(logging.Filter):
    def __init__(self, attempts: int) -> None:
        super().__init__()
        self.attempts, self.seen = attempts, 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if type(error).__name__ == "WorkerGroupStartupTimeoutError":
            self.seen += 1
            record.msg, record.args, record.exc_info = (
                f"the training workers were not placed within --start-timeout (attempt "
                f"{self.seen} of {self.attempts})",
                (),
                None,
            )
        return True
