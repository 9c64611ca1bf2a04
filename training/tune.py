"""`metatrainer tune`: a Ray Tune search in which every trial is one `metatrainer train` run.

    metatrainer tune --data ./shards --storage ./runs --name sweep --trials 8 --max-concurrent 2 \
        --lr loguniform:1e-4:1e-2 --meta-lambda uniform:0:1 \
        --adapters choice:none,layer4,layer3+layer4 --batch-size choice:16,32

The pattern Ray Train V2 recommends: a Tune *function* per trial builds and fits our
TorchTrainer (`training.driver.run_training`, so a trial checks, trains, checkpoints and
reports exactly as `metatrainer train` does), and a `TuneReportCallback` forwards its epoch
reports to Tune, where an ASHA scheduler stops the trials whose validation accuracy trails.
The trial function itself only waits on its Train controller: it asks for almost no CPU, so
the trials' training workers get the cluster. Everything lives under RUNS/NAME:

    RUNS/NAME/<trial id>/   a trial's training run (checkpoints, result.json, report/): what
                            `metatrainer evaluate/predict/report` take
    RUNS/NAME/tune/         Tune's own state (the experiment, a directory per trial)
    RUNS/NAME/tune.json     the flags the search started with; a rerun must give the same
    RUNS/NAME/trials.csv    one row a trial: its values, best val accuracy, epochs, status
    SAMPLE_LOG/<trial id>/  a trial's --sample-log, when one is given

Run the same command again and Tune restores the search: finished trials stay finished, an
interrupted or failed trial starts again and its training resumes from its own checkpoints.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import dataclass, replace
from typing import Any

from cluster import storage
from cluster.errors import UserError, one_line
from data_prep.contract import read_manifest
from training.config import TrainConfig
from training.search_space import FORMS, SEARCHED, adapter_stages, parse_space, spec_values

METRIC = "val_accuracy"
"""What ASHA ranks trials by: the mean validation accuracy of an epoch's report."""
TUNE_DIR = "tune"
SPEC_FILE = "tune.json"
TABLE_FILE = "trials.csv"
TRIAL_CPU = 0.01
"""A trial's own actor only waits on its Train controller; Ray refuses a request of 0."""
LOCAL_SETTINGS = ("debug", "s3_endpoint", "s3_timeout", "cache_dir", "cache_size", "start_timeout")
"""Flags that may differ on a rerun: they say where and how, not what, a trial trains."""


@dataclass
class TrialRow:
    trial: str
    values: dict[str, Any]
    best_val_accuracy: float | None
    epochs: int
    status: str
    run_dir: str
    error: str = ""


@dataclass
class TuneOutcome:
    rows: list[TrialRow]
    table_file: str
    best: TrialRow | None


# --- one trial, in its Tune actor -----------------------------------------------------------


def _reporter():
    """Ray Train's epoch reports to Tune; the mid-epoch checkpoints' reports (no validation
    accuracy yet) are not results for ASHA to rank, nor for Tune's strict metric check."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and metrics[0].get(METRIC) is not None:
                # Scalars only: the history and per-dataset dicts stay in the run's files.
                scalars = {k: v for k, v in metrics[0].items() if isinstance(v, int | float)}
                super().after_report(run_context, [scalars, *metrics[1:]], checkpoint)

    return EpochReports()


def run_trial(config: dict) -> None:
    """Train with this trial's values as the run RUNS/NAME/<trial id>: the name stays the same
    when Tune restarts the trial, so its training resumes from its own checkpoints."""
    from ray import tune

    from training.driver import run_training

    trial_id = tune.get_context().get_trial_id()
    values = {key: config[key] for key in SEARCHED}
    values["adapters"] = adapter_stages(str(values["adapters"]))
    cfg = TrainConfig.from_dict({**config["base"], **values, "name": trial_id})
    if cfg.metrics_port:
        # Trials share nodes: each gets its own block of ports, one per possible local rank.
        cfg.metrics_port += _trial_index(trial_id) * cfg.workers
    if cfg.sample_log:
        # Trials train at once, and each rank appends to its own file: a directory a trial.
        cfg.sample_log = storage.join(cfg.sample_log, trial_id)
    run_training(cfg, callbacks=[_reporter()])


def _trial_index(trial_id: str) -> int:
    """Tune numbers a search's trials in their ids (`3f2a1_00002`)."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _trial_dirname(trial) -> str:
    return trial.trial_id


# --- the search -----------------------------------------------------------------------------


def run_tune(
    cfg: TrainConfig,
    specs: dict[str, str],
    trials: int,
    max_concurrent: int | None = None,
    address: str | None = None,
) -> TuneOutcome:
    """Search, or restore the search RUNS/NAME; write and return the table of its trials."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from cluster.ray_cluster import connect
    from training.driver import resolve_locations

    if trials < 1:
        raise UserError(f"--trials must be at least 1, not {trials}")
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent must be at least 1, not {max_concurrent}")
    space = parse_space(specs)
    resolve_locations(cfg)
    run_dir = storage.join(cfg.storage, cfg.name)
    _check_inputs(cfg)
    base = replace(cfg, storage=run_dir, name="")
    _preflight_batches(base, _choices(space["batch_size"]))
    path, filesystem = storage.ray_storage(run_dir)
    experiment = f"{path.rstrip('/')}/{TUNE_DIR}"
    restoring = tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)
    spec = {"space": specs, "trials": trials, "max_concurrent": max_concurrent}
    _record_search(run_dir, {**spec, "train": _settings(base)}, restoring)

    connect(address)
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_CPU})
    if restoring:
        print(f"restoring the search {run_dir}: finished trials stay finished", flush=True)
        tuner = tune.Tuner.restore(
            experiment,
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        fits = _trials_that_fit(ray.cluster_resources(), cfg)
        tuner = tune.Tuner(
            trainable,
            param_space={"base": base.to_dict(), **space},
            tune_config=tune.TuneConfig(
                num_samples=trials,
                scheduler=_scheduler(cfg.epochs),
                # Seeded: the same flags draw the same trials.
                search_alg=BasicVariantGenerator(
                    max_concurrent=max_concurrent or fits, random_state=cfg.seed
                ),
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR,
                storage_path=path,
                storage_filesystem=filesystem,
                verbose=1 if cfg.debug else 0,  # the workers print a line per epoch
            ),
        )
    grid = tuner.fit()
    # A Result has no status, and its `done` is not kept across a restore: Tune's trials say.
    statuses = {t.trial_id: t.status for t in grid._experiment_analysis.trials}
    rows = [_row(result, statuses, run_dir, cfg.epochs) for result in grid]
    rows.sort(key=lambda r: r.trial)
    table_file = storage.join(run_dir, TABLE_FILE)
    storage.write_bytes(table_file, table_csv(rows).encode())
    finished = [r for r in rows if r.best_val_accuracy is not None and r.status != "ERROR"]
    best = max(finished, key=lambda r: r.best_val_accuracy or 0.0, default=None)
    if best is None and rows and all(r.status == "ERROR" for r in rows):
        raise UserError(f"every trial failed; the first: {rows[0].error} (table: {table_file})")
    return TuneOutcome(rows, table_file, best)


def _check_inputs(cfg: TrainConfig) -> None:
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be at least 1, not {cfg.epochs}")
    if not cfg.data:
        raise UserError("give at least one --data location (a `metatrainer prep` output)")
    for d in cfg.data:
        manifest = read_manifest(d)
        if "val" not in manifest.splits or not manifest.num_samples("val"):
            raise UserError(
                f"{d}: tune ranks trials by validation accuracy, and this dataset has no val "
                "split; prep it with one, e.g. --splits train=0.8,val=0.1,test=0.1"
            )


def _choices(domain: Any) -> list[Any]:
    return list(getattr(domain, "categories", None) or [domain])


def _preflight_batches(base: TrainConfig, batch_sizes: list[int]) -> None:
    """Every --batch-size choice passes the driver's preflight here, in one line, rather than
    failing its trials later: a large batch may outgrow the train split, a small one be shared
    by too many datasets. (Each trial checks its own config again.)"""
    from training.driver import preflight

    for batch_size in sorted(set(batch_sizes), reverse=True):
        preflight(replace(base, batch_size=batch_size))


def _scheduler(epochs: int):
    """ASHA on validation accuracy per epoch, which never stops a trial at its last epoch: a
    STOP there ends the trial while it writes result.json and its report. Ray's ASHA may: it
    puts a rung at max_t and ranks a trailing trial there whatever stop_last_trials says, and
    a restored search (its rungs empty again) ranks a resumed trial at the highest rung its
    first report reaches, the last epoch's included."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class LastEpochFinishes(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            if result.get("epoch", 0) >= epochs:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    return LastEpochFinishes(
        time_attr="epoch",
        metric=METRIC,
        mode="max",
        max_t=epochs,
        grace_period=1,
        stop_last_trials=False,
    )


def _trials_that_fit(resources: dict, cfg: TrainConfig) -> int:
    """As many trials at once as the cluster has room for all their workers."""
    if cfg.gpus_per_worker:
        need, kind = cfg.gpus_per_worker * cfg.workers, "GPU"
    else:
        need, kind = cfg.cpus_per_worker * cfg.workers + TRIAL_CPU, "CPU"
    return max(1, int(resources.get(kind, 0) // need)) if need else 1


def _settings(base: TrainConfig) -> dict:
    return {k: v for k, v in base.to_dict().items() if k not in LOCAL_SETTINGS}


def _record_search(run_dir: str, spec: dict, restoring: bool) -> None:
    """RUNS/NAME/tune.json holds the flags a search started with. Tune restores the trials
    with the values and flags they started with, so a rerun must give the same ones."""
    url = storage.join(run_dir, SPEC_FILE)
    spec = json.loads(json.dumps(spec))  # as it reads back: lists, not tuples
    if restoring and storage.exists(url):
        _check_same_search(run_dir, json.loads(storage.read_bytes(url)), spec)
        return
    storage.write_bytes(url, (json.dumps(spec, indent=2) + "\n").encode())


def _check_same_search(run_dir: str, before: dict, now: dict) -> None:
    difference = _first_difference(before, now)
    if difference:
        raise UserError(
            f"the search {run_dir} was started with other flags ({difference}); rerun it "
            "with the flags it started with to resume it, or give a new --name"
        )
    given, started = now["max_concurrent"], before.get("max_concurrent")
    if given is not None and given != started:
        # Tuner.restore takes no TuneConfig, and the searcher's saved state has its limit.
        raise UserError(
            f"--max-concurrent {given}: Ray resumes the search {run_dir} with the limit it "
            f"started with ({started or 'as many trials as the cluster fitted'}); rerun "
            "without --max-concurrent, or give a new --name"
        )


def _first_difference(before: dict, now: dict) -> str | None:
    """The first flag that differs, searched specs compared by value (1e-3 is 0.001)."""
    if before.get("trials") != now["trials"]:
        return f"--trials {before.get('trials')}, now {now['trials']}"
    for key, flag in SEARCHED.items():
        old, new = before.get("space", {}).get(key), now["space"][key]
        if old is None and new is None:
            continue  # --batch-size, not searched beside --global-batch
        if old is None or new is None or spec_values(flag, old) != spec_values(flag, new):
            return f"{flag} {old}, now {now['space'][key]}"
    old = before.get("train", {})
    for key, value in now["train"].items():
        if old.get(key) != value:
            flag = "--" + key.replace("_", "-")
            return f"{flag} {old.get(key)}, now {value}"
    if old.keys() != now["train"].keys():
        return "a different version of metatrainer"
    return None


# --- the table ------------------------------------------------------------------------------


def _row(result, statuses: dict[str, str], run_dir: str, epochs: int) -> TrialRow:
    """A trial's row. Its status: TERMINATED (trained every epoch), STOPPED (by ASHA),
    ERROR, or Tune's (PENDING, RUNNING, PAUSED) when the search was interrupted."""
    trial = result.path.rstrip("/").rsplit("/", 1)[-1]
    config = result.config or {}
    values = {key: config.get(key) for key in SEARCHED}
    frame = result.metrics_dataframe
    best, done_epochs = None, 0
    if frame is not None and METRIC in frame and len(frame):
        best = float(frame[METRIC].max())
        done_epochs = int(frame["epoch"].max())
    status = "ERROR" if result.error is not None else statuses.get(trial, "PENDING")
    if status == "TERMINATED" and done_epochs < epochs:
        status = "STOPPED"
    error = "" if result.error is None else _error_line(result.error)
    return TrialRow(trial, values, best, done_epochs, status, storage.join(run_dir, trial), error)


def _error_line(error: BaseException) -> str:
    """The line of a trial's failure: Tune hands back Ray's wrapper (a traceback as its
    message) of what run_training raised, which is its `cause`."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    return one_line(error) or (str(error).strip().splitlines() or [type(error).__name__])[-1]


COLUMNS = ["trial", *SEARCHED, "best_val_accuracy", "epochs", "status", "run_dir", "error"]


def table_csv(rows: list[TrialRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        acc = "" if r.best_val_accuracy is None else f"{r.best_val_accuracy:.4f}"
        values = [r.values[k] for k in SEARCHED]
        writer.writerow([r.trial, *values, acc, r.epochs, r.status, r.run_dir, r.error])
    return out.getvalue()


def print_table(outcome: TuneOutcome) -> None:
    header = f"{'trial':<13} {'lr':>10} {'meta_lambda':>11} {'adapters':<16} {'batch':>5} "
    print()
    print(header + f"{'best val_acc':>12} {'epochs':>6}  status")
    for r in outcome.rows:
        v = r.values
        acc = "n/a" if r.best_val_accuracy is None else f"{r.best_val_accuracy:.4f}"
        batch = "-" if v["batch_size"] is None else v["batch_size"]  # --global-batch
        print(
            f"{r.trial:<13} {v['lr']:>10.3g} {v['meta_lambda']:>11.3g} {v['adapters']!s:<16} "
            f"{batch!s:>5} {acc:>12} {r.epochs:>6}  {r.status}"
            + (f"  {r.error}" if r.error else "")
        )
    print()
    print(f"trials          {outcome.table_file}")
    if outcome.best:
        acc = outcome.best.best_val_accuracy or 0.0
        print(f"best trial      {outcome.best.trial} (val accuracy {acc:.4f})")
        print(f"best run        {outcome.best.run_dir}")
    else:
        print("best run        none yet (no trial has finished an epoch)")


# --- the command ----------------------------------------------------------------------------


def add_tune_command(sub: argparse._SubParsersAction) -> None:
    from training.cli import add_training_flags

    p = sub.add_parser(
        "tune",
        help="search --lr, --meta-lambda, --adapters and --batch-size with Ray Tune (ASHA)",
        description="Run --trials training runs with values drawn from the search space, "
        "stopping early (ASHA, on validation accuracy per epoch) the ones that trail. Each "
        "trial is a `metatrainer train` run in RUNS/NAME/<trial id>. Running the same command "
        "again restores the search: finished trials are kept, the others resume from their "
        "checkpoints.",
        epilog=f"Searched flags take {FORMS}; --adapters values join stages with '+', e.g. "
        "choice:none,layer4,layer3+layer4.",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="DST",
        help="prepared dataset (repeat for several)",
    )
    p.add_argument(
        "--storage",
        required=True,
        metavar="RUNS",
        help="where the search goes (shared path or s3://)",
    )
    p.add_argument(
        "--name", required=True, metavar="NAME", help="the search's name, the resume key"
    )
    p.add_argument("--trials", type=int, default=8, help="trials to run (default: %(default)s)")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        metavar="K",
        help="trials training at once (default: as many as the cluster has room for all their "
        "workers); a restored search keeps the limit it started with",
    )
    add_training_flags(p)
    for action in p._actions:
        # The searched flags take a search-space spec; each is checked by parse_spec.
        if action.dest in SEARCHED:
            action.type = str
            action.default = _default_spec(action.dest)
            action.help = f"{FORMS} (default: {action.default})"
        if action.dest == "batch_size":  # not searched when --global-batch is given
            action.default = None
            action.help += "; or give --global-batch, the same for every trial"
    p.set_defaults(func=_tune)


def _default_spec(key: str) -> str:
    value = getattr(TrainConfig(), key)
    if key == "adapters":
        return "+".join(value) or "none"
    return str(value)


def _tune(args: argparse.Namespace) -> int:
    from training.cli import config_from_args

    specs = {key: getattr(args, key) for key in SEARCHED}
    if args.global_batch is None:
        specs["batch_size"] = specs["batch_size"] or _default_spec("batch_size")
    fixed = {key: TrainConfig().__dict__[key] for key in SEARCHED}  # set per trial
    cfg = config_from_args(args, **fixed)  # refuses --batch-size with --global-batch
    outcome = run_tune(cfg, specs, args.trials, args.max_concurrent, args.address)
    print_table(outcome)
    return 0
