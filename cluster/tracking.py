"""MLflow tracking, best effort, for prep and training (`--mlflow URI`, or the standard
MLFLOW_TRACKING_URI): one MLflow run that any process (the driver, rank 0, prep) writes to by
its id.

    uri = resolve_uri(args.mlflow)                    # None: no tracking, mlflow never imported
    tracker = create_run(uri, "metatrainer", "digits", what="training")
    tracker.params({"lr": "0.001"}); tracker.metrics({"loss": 0.3}, step=20)
    tracker.artifacts({"result.json": data}); tracker.end("FINISHED")
    Tracker(uri, run_id, "training")                  # the same run, from another process

mlflow is imported only inside these functions, and only once a URI is given; without one
every object here is a `NullTracker`, which does nothing. A server that is down or refuses
never stops the work: the client makes few, short attempts (`CLIENT_SETTINGS`), the first
failed call is one `warning:` line, and that tracker calls the server no more.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cluster.errors import UserError

URI_VAR = "MLFLOW_TRACKING_URI"
"""The standard variable for the tracking URI: used where --mlflow is not given."""
DEFAULT_EXPERIMENT = "metatrainer"
INSTALL = "pip install 'metatrainer[mlflow]'"
SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "databricks")
"""Tracking URIs MLflow's client takes; a plain path is a file: URI."""
CLIENT_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ALLOW_FILE_STORE": "true",
}
"""The client's defaults retry a request for about 4 minutes (7 times, 120 s each): a down
server would hold up training that long. Here a call gives up after about 20 s; a setting in
the environment wins. The run's link is ours to print, not in the middle of other output. A
local directory is MLflow's file store, which MLflow 3 refuses unless asked for (it keeps it
in maintenance mode): asked for by giving one."""
MAX_PARAM = 6000
"""MLflow's longest parameter value (characters); its keys take 250."""
BATCH = 100
"""Parameters or tags per `log_batch` request (MLflow's limit)."""


def resolve_uri(uri: str | None) -> str | None:
    """The tracking URI: `uri`, else MLFLOW_TRACKING_URI, else None (nothing is tracked). A
    plain path becomes an absolute file: URI, which other processes read alike. A scheme
    MLflow does not take, or a missing client, is a UserError."""
    uri = uri or os.environ.get(URI_VAR) or None
    if uri is None:
        return None
    scheme = urlparse(uri).scheme
    if not scheme:
        uri = Path(uri).expanduser().resolve().as_uri()
    elif scheme.split("+")[0] not in SCHEMES:
        raise UserError(
            f"--mlflow {shown(uri)!r}: not a tracking URI MLflow takes; give http(s)://HOST:PORT "
            "of a tracking server, a file: URI or a local directory"
        )
    if urlparse(uri).username or urlparse(uri).password:
        # The URI is kept with the run (its config, MLflow's parameters): never a secret.
        raise UserError(
            f"--mlflow {shown(uri)}: put the credentials in MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), not in the URI"
        )
    if not _installed("mlflow"):
        raise UserError(f"--mlflow {shown(uri)} needs the MLflow client: {INSTALL}")
    return uri


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # in sys.modules as None: imports of it fail
        return False


def shown(uri: str) -> str:
    """`uri` with any `user:password@` in it hidden."""
    return re.sub(r"//[^/@\s]*@", "//***@", uri)


def stderr_line(message: str) -> None:
    """One line on stderr (not through `print`, which Ray patches in its workers)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


class NullTracker:
    """No tracking: every call does nothing."""

    run_id: str | None = None
    failed = False

    def link(self) -> str | None:
        return None

    def params(self, values: dict[str, Any]) -> None:
        pass

    def logged_params(self) -> dict[str, str]:
        return {}

    def tags(self, values: dict[str, Any]) -> None:
        pass

    def metrics(self, values: dict[str, float | None], step: int) -> None:
        pass

    def artifacts(self, files: dict[str, bytes], path: str | None = None) -> None:
        pass

    def end(self, status: str) -> None:
        pass


class Tracker(NullTracker):
    """The MLflow run `run_id` at `uri`, written to from this process. Every call is best
    effort: the first that fails prints one warning (`warn`), calls `on_fail(reason)`, and
    the tracker calls the server no more. `metrics` logs a key only at steps past the last one
    the run holds for it, so a process restarted from a checkpoint does not log a step twice."""

    def __init__(
        self,
        uri: str,
        run_id: str,
        what: str,
        warn: Callable[[str], None] = stderr_line,
        on_fail: Callable[[str], None] | None = None,
    ) -> None:
        self.uri, self.run_id, self.what = uri, run_id, what
        self._warn, self._on_fail = warn, on_fail
        self.experiment_id: str | None = None
        self._client: Any = None
        self._last_step: dict[str, int] | None = None  # read from the run on first use

    def on_fail(self, hook: Callable[[str], None]) -> None:
        """Call `hook(reason)` when a call first fails (after the warning)."""
        self._on_fail = hook

    def link(self) -> str:
        """Where to see the run: its page in MLflow's UI, for a tracking server."""
        if urlparse(self.uri).scheme in ("http", "https") and self.experiment_id:
            base = shown(self.uri).rstrip("/")
            return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"run {self.run_id} at {shown(self.uri)}"

    def client(self) -> Any:
        if self._client is None:
            self._client = new_client(self.uri)
        return self._client

    def call(self, action: Callable[[], Any]) -> Any:
        """`action()`, or None once a call has failed (the first failure warns)."""
        if self.failed:
            return None
        try:
            return action()
        except Exception as e:  # noqa: BLE001  (tracking must never fail the work)
            self.fail(e)
            return None

    def fail(self, error: BaseException) -> None:
        self.failed = True
        reason = reason_of(error)
        self._warn(
            f"warning: MLflow at {shown(self.uri)} did not answer or refused ({reason}); "
            f"this {self.what} is not tracked from here on"
        )
        if self._on_fail:
            try:
                self._on_fail(reason)
            except Exception:  # noqa: BLE001, S110  (only saves other processes a warning)
                pass

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(_key(k), param_value(v)) for k, v in values.items()]
        for i in range(0, len(items), BATCH):
            self.call(lambda i=i: self.client().log_batch(self.run_id, params=items[i : i + BATCH]))

    def logged_params(self) -> dict[str, str]:
        run = self.call(lambda: self.client().get_run(self.run_id))
        return dict(run.data.params) if run else {}

    def tags(self, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(_key(k), _text(v, 8000)) for k, v in values.items() if v is not None]
        for i in range(0, len(items), BATCH):
            self.call(lambda i=i: self.client().log_batch(self.run_id, tags=items[i : i + BATCH]))

    def metrics(self, values: dict[str, float | None], step: int) -> None:
        from mlflow.entities import Metric

        last = self._logged_steps()
        if last is None:
            return
        now = int(time.time() * 1000)
        items = [
            Metric(_key(k), float(v), now, step)
            for k, v in values.items()
            if v is not None and math.isfinite(v) and last.get(_key(k), -1) < step
        ]
        if items:
            self.call(lambda: self.client().log_batch(self.run_id, metrics=items))
            last |= {m.key: step for m in items}

    def _logged_steps(self) -> dict[str, int] | None:
        """{key: the last step the run holds for it}, read once (None: tracking failed)."""
        if self._last_step is None:
            self._last_step = self.call(lambda: _last_steps(self.client(), self.run_id))
        return None if self.failed else self._last_step

    def artifacts(self, files: dict[str, bytes], path: str | None = None) -> None:
        """Each {name: bytes} as an artifact of the run, under `path`."""
        if not files or self.failed:
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            self.call(lambda: self.client().log_artifacts(self.run_id, tmp, path))

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED."""
        self.call(lambda: self.client().set_terminated(self.run_id, status))


def new_client(uri: str) -> Any:
    """An MlflowClient for `uri` that gives up on a call within about 20 s."""
    for name, value in CLIENT_SETTINGS.items():
        os.environ.setdefault(name, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def create_run(
    uri: str | None,
    experiment: str,
    name: str,
    what: str,
    tags: dict[str, Any] | None = None,
    warn: Callable[[str], None] = stderr_line,
) -> Tracker | NullTracker:
    """A new run named `name` in `experiment` (created if missing); a NullTracker without a
    URI, or (after one warning) when the server does not answer."""
    if uri is None:
        return NullTracker()
    tracker = Tracker(uri, "", what, warn)

    def create() -> str:
        client = tracker.client()
        tracker.experiment_id = _experiment_id(client, experiment)
        clean = {_key(k): _text(v, 8000) for k, v in (tags or {}).items() if v is not None}
        return client.create_run(tracker.experiment_id, tags=clean, run_name=name).info.run_id

    run_id = tracker.call(create)
    if run_id is None:
        return NullTracker()
    tracker.run_id = run_id
    return tracker


def continue_run(
    uri: str, run_id: str, what: str, warn: Callable[[str], None] = stderr_line
) -> Tracker | NullTracker | None:
    """The existing run `run_id` marked running again; None when the server no longer has it
    (deleted), a NullTracker (after one warning) when it does not answer."""
    from mlflow.exceptions import MlflowException

    tracker = Tracker(uri, run_id, what, warn)

    def reopen() -> bool:
        try:
            run = tracker.client().get_run(run_id)
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        if run.info.lifecycle_stage != "active":
            return False
        tracker.experiment_id = run.info.experiment_id
        tracker.client().update_run(run_id, status="RUNNING")
        return True

    found = tracker.call(reopen)
    if tracker.failed:
        return NullTracker()
    return tracker if found else None


def _experiment_id(client: Any, name: str) -> str:
    """The id of the experiment `name`, created if missing (another process may create it at
    the same moment: then it is read again)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage != "active":
            raise UserError(f"MLflow experiment {name!r} is deleted: restore it or use another")
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _last_steps(client: Any, run_id: str) -> dict[str, int]:
    history = {k: client.get_metric_history(run_id, k) for k in client.get_run(run_id).data.metrics}
    return {k: max((m.step for m in points), default=-1) for k, points in history.items()}


def _key(name: str) -> str:
    """A key MLflow takes: letters, digits and `_-. /:` only, no empty or `..` parts."""
    parts = [re.sub(r"[^\w.\- :]", "_", p) for p in str(name).split("/")]
    return "/".join(p if p.strip(".") else "_" for p in parts if p)[:250] or "_"


def param_value(value: Any) -> str:
    """`value` as MLflow keeps a parameter (cut to its longest)."""
    return _text(value, MAX_PARAM)


def _text(value: Any, limit: int) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def reason_of(error: BaseException) -> str:
    """An error's message on one short line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return shown(text if len(text) <= 200 else text[:199] + "…")
