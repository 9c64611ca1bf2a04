"""The one exception type a user can cause; the CLI prints it as one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment. The message says what is wrong and what to do about it."""


class Stopped(Exception):
    """A training stopped at a checkpoint on request (SIGUSR1, `training.run.stop`): not an
    error, not done. The message says where; the CLI exits with `STOPPED_EXIT`."""


STOPPED_EXIT = 75
"""EX_TEMPFAIL (sysexits.h): not done yet, run it again; SLURM shows it as the job's ExitCode."""


def one_line(error: BaseException) -> str | None:
    """The message of a UserError as the user should read it; None for any other exception.

    A UserError raised in a DataLoader worker comes back re-raised by torch with the worker's
    traceback as its message ("Caught UserError in DataLoader worker process 0. Original
    Traceback ... cluster.errors.UserError: MESSAGE"): the message is its last line.
    """
    if not isinstance(error, UserError):
        return None
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split("UserError: ", 1)[-1]
    return text.splitlines()[0] if text else type(error).__name__
