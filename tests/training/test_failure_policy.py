"""Which failures end a run at once: a user's mistake in any worker does, anything else is
retried up to --max-failures times (the killed-worker runs of test_fault_tolerance.py and
tests/multinode go through the same policy)."""

from __future__ import annotations

from ray.train import FailureConfig
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from cluster.errors import UserError
from training.run.failures import FailFastOnUserError, root_cause


def decisions(failures: dict[int, Exception], max_failures: int, times: int) -> list[str]:
    policy = FailFastOnUserError(FailureConfig(max_failures=max_failures))
    error = WorkerGroupError("worker errors", failures)
    return [policy.make_decision(error).value for _ in range(times)]


RETRY, RAISE = FailureDecision.RETRY.value, FailureDecision.RAISE.value


def test_a_user_error_in_any_worker_ends_the_run_at_once():
    bad_label = UserError("s3://b/d: a label is outside the manifest's 3 classes")
    collateral = RuntimeError("Connection closed by peer")  # the other rank's side of it
    assert decisions({0: collateral, 1: bad_label}, max_failures=3, times=1) == [RAISE]
    assert root_cause(WorkerGroupError("x", {0: collateral, 1: bad_label})) == str(bad_label)


def test_a_user_error_from_a_dataloader_worker_ends_the_run_at_once():
    # torch re-raises a DataLoader worker's exception as its type, the traceback as its text.
    reraised = UserError(
        "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1\ncluster.errors.UserError: shard 3 is corrupt'
    )
    assert decisions({0: reraised}, max_failures=3, times=1) == [RAISE]
    assert root_cause(WorkerGroupError("x", {0: reraised})) == "shard 3 is corrupt"


def test_any_other_failure_is_retried_max_failures_times():
    died = RuntimeError("The actor died unexpectedly before finishing this task.")
    assert decisions({1: died}, max_failures=2, times=3) == [RETRY, RETRY, RAISE]
    assert decisions({0: died}, max_failures=0, times=1) == [RAISE]
