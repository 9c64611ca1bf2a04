"""What a failed training attempt means: a user's mistake ends the run at once, anything else is
retried from the latest checkpoint up to --max-failures times.

Ray Train retries every worker failure alike, so a bad label in a manifest would cost
--max-failures worker-group restarts (each reloading the model and the data) before its one line
arrived. `FailFastOnUserError` is Ray Train's own failure policy with one rule in front: a
`UserError` among the workers' failures raises right away. A killed worker, a lost node or a
network error still gets its restarts.

The policy is built in the driver and travels to Ray Train's controller with the run, as Ray
Train's default one does (`TorchTrainer.fit`); `FailFastTrainer` hands it over.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

from cluster.errors import one_line


class FailFastOnUserError(DefaultFailurePolicy):
    """Ray Train's default policy, except that a failure caused by a `UserError` in any
    worker is raised at its first occurrence."""

    def make_decision(self, training_failed_error):  # noqa: ANN001, ANN201  (Ray's signature)
        if user_message(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class FailFastTrainer(TorchTrainer):
    """A TorchTrainer whose controller decides failures with `FailFastOnUserError`."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):  # noqa: ANN003, ANN202
        controller_init_kwargs["failure_policy"] = FailFastOnUserError(
            self.run_config.failure_config
        )
        return super()._initialize_and_run_controller(**controller_init_kwargs)


def caused_by(error: BaseException, name: str) -> bool:
    """Whether an exception of class `name` is among `error`'s causes (Ray Train's own types
    are internal: matched by name)."""
    return any(type(e).__name__ == name for e in causes(error))


def causes(error: BaseException) -> list[BaseException]:
    """`error`, the workers' failures it carries, and their causes and contexts."""
    seen: list[BaseException] = []
    stack: list[BaseException] = [error]
    while stack:
        e = stack.pop()
        if e in seen:
            continue
        seen.append(e)
        stack.extend(getattr(e, "worker_failures", {}).values())
        for nested in (getattr(e, "controller_failure", None), e.__cause__, e.__context__):
            if nested is not None:
                stack.append(nested)
    return seen


def user_message(error: BaseException) -> str | None:
    """The first user-facing message among `error`'s causes; None when a user caused none."""
    for e in causes(error):
        message = one_line(e)
        if message is not None:
            return message
    return None


def root_cause(error: BaseException) -> str:
    """The first user-facing message among the workers' failures, else a short description."""
    message = user_message(error)
    if message is not None:
        return message
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
