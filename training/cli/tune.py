"""`metatrainer tune`: a Ray Tune search in which every trial is one `metatrainer train` run.

    metatrainer tune --data ./shards --storage ./runs --name sweep --trials 8 --max-concurrent 2 \
        --lr loguniform:1e-4:1e-2 --meta-lambda uniform:0:1 \
        --adapters choice:none,layer4,layer3+layer4 --batch-size choice:16,32

The pattern Ray Train V2 recommends: a Tune *function* per trial builds and fits our
TorchTrainer (`training.run.driver.run_training`, so a trial checks, trains, checkpoints and
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
from typing import Any

from cluster import storage
from cluster.errors import UserError
from data_prep.contract import read_manifest
from training.cli.search_space import FORMS, SEARCHED, adapter_stages, parse_space
from training.cli.tune_spec import SPEC_FILE, record_search, settings
from training.cli.tune_table import METRIC, TuneOutcome, print_table, table_csv, trial_row
from training.config import TrainConfig
from training.run import tracking

"""What ASHA ranks trials by: the mean validation accuracy of an epoch's report."""
TUNE_DIR = "tune"
TABLE_FILE = "trials.csv"
TRIAL_CPU = 0.01
"""A trial's own actor only waits on its Train controller; Ray refuses a request of 0."""


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

    from training.cli.tune_tracking import trial_tags
    from training.run.driver import run_training

    trial_id = tune.get_context().get_trial_id()
    values = {key: config[key] for key in SEARCHED}
    values["adapters"] = adapter_stages(str(values["adapters"]))
    cfg = TrainConfig.from_dict(config["base"]).replace(**values, name=trial_id)
    if cfg.cluster.metrics_port:
        # Trials share nodes: each gets its own block of ports, one per possible local rank.
        cfg.cluster.metrics_port += _trial_index(trial_id) * cfg.cluster.workers
    if cfg.run.sample_log:
        # Trials train at once, and each rank appends to its own file: a directory a trial.
        cfg.run.sample_log = storage.join(cfg.run.sample_log, trial_id)
    # With --mlflow, the trial's MLflow run is a child of the search's.
    tags = trial_tags(cfg.run.storage, cfg.run.mlflow)
    run_training(cfg, callbacks=[_reporter()], mlflow_tags=tags)


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
    from ray import tune

    from cluster.ray_cluster import connect
    from training.cli.tune_tracking import finish_search, start_search
    from training.run.driver import resolve_locations, run_tags

    if trials < 1:
        raise UserError(f"--trials must be at least 1, not {trials}")
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent must be at least 1, not {max_concurrent}")
    space = parse_space(specs)
    resolve_locations(cfg)
    run_dir = storage.join(cfg.run.storage, cfg.run.name)
    _check_inputs(cfg)
    base = cfg.replace(storage=run_dir, name="")
    _preflight_batches(base, _choices(space["batch_size"]))
    path, filesystem = storage.ray_storage(run_dir)
    experiment = f"{path.rstrip('/')}/{TUNE_DIR}"
    restoring = tune.Tuner.can_restore(experiment, storage_filesystem=filesystem)
    spec = {"space": specs, "trials": trials, "max_concurrent": max_concurrent}
    record_search(run_dir, {**spec, "train": settings(base)}, restoring)

    connect(address)
    # With --mlflow, the search is an MLflow run, and each trial a child run of it.
    tracker = start_search(cfg, spec, run_tags(cfg) if cfg.run.mlflow else {})
    if restoring:
        print(f"restoring the search {run_dir}: finished trials stay finished", flush=True)
    tuner = _tuner(base, space, (path, filesystem), restoring, (trials, max_concurrent))
    try:
        grid = tuner.fit()
    except BaseException as e:
        tracking.end_run(tracker, cfg, tracking.status_of(e))
        raise
    outcome = _outcome(grid, run_dir, cfg.optim.epochs, tracker.link())
    files = {
        TABLE_FILE: storage.read_bytes(outcome.table_file),
        SPEC_FILE: storage.read_bytes(storage.join(run_dir, SPEC_FILE)),
    }
    finish_search(tracker, run_dir, outcome, cfg.optim.epochs, files)
    rows = outcome.rows
    if outcome.best is None and rows and all(r.status == "ERROR" for r in rows):
        raise UserError(
            f"every trial failed; the first: {rows[0].error} (table: {outcome.table_file})"
        )
    return outcome


def _tuner(
    base: TrainConfig,
    space: dict,
    where: tuple[str, Any],
    restoring: bool,
    limits: tuple[int, int | None],
):
    """A new search of `limits` (trials, at most how many at once) over `space` under `where`
    (Ray's storage path and filesystem of RUNS/NAME), or the search there restored."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    (path, filesystem), (trials, max_concurrent) = where, limits
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_CPU})
    if restoring:
        return tune.Tuner.restore(
            f"{path.rstrip('/')}/{TUNE_DIR}",
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    fits = _trials_that_fit(ray.cluster_resources(), base)
    return tune.Tuner(
        trainable,
        param_space={"base": base.to_dict(), **space},
        tune_config=tune.TuneConfig(
            num_samples=trials,
            scheduler=_scheduler(base.optim.epochs),
            # Seeded: the same flags draw the same trials.
            search_alg=BasicVariantGenerator(
                max_concurrent=max_concurrent or fits, random_state=base.optim.seed
            ),
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=path,
            storage_filesystem=filesystem,
            verbose=1 if base.run.debug else 0,  # the workers print a line per epoch
        ),
    )


def _outcome(grid, run_dir: str, epochs: int, mlflow: str | None) -> TuneOutcome:
    """The search's trials, a row each, written to RUNS/NAME/trials.csv, and the best."""
    # A Result has no status, and its `done` is not kept across a restore: Tune's trials say.
    statuses = {t.trial_id: t.status for t in grid._experiment_analysis.trials}
    rows = [trial_row(result, statuses, run_dir, epochs) for result in grid]
    rows.sort(key=lambda r: r.trial)
    table_file = storage.join(run_dir, TABLE_FILE)
    storage.write_bytes(table_file, table_csv(rows).encode())
    finished = [r for r in rows if r.best_val_accuracy is not None and r.status != "ERROR"]
    best = max(finished, key=lambda r: r.best_val_accuracy or 0.0, default=None)
    return TuneOutcome(rows, table_file, best, mlflow)


def _check_inputs(cfg: TrainConfig) -> None:
    if cfg.optim.epochs < 1:
        raise UserError(f"--epochs must be at least 1, not {cfg.optim.epochs}")
    if not cfg.data.datasets:
        raise UserError("give at least one --data location (a `metatrainer prep` output)")
    for d in cfg.data.datasets:
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
    from training.run.driver import preflight

    for batch_size in sorted(set(batch_sizes), reverse=True):
        preflight(base.replace(batch_size=batch_size))


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
    if cfg.cluster.gpus_per_worker:
        need, kind = cfg.cluster.gpus_per_worker * cfg.cluster.workers, "GPU"
    else:
        need, kind = cfg.cluster.cpus_per_worker * cfg.cluster.workers + TRIAL_CPU, "CPU"
    return max(1, int(resources.get(kind, 0) // need)) if need else 1


# --- the command ----------------------------------------------------------------------------


def add_tune_command(sub: argparse._SubParsersAction) -> None:
    from training.cli.flags import REQUIRED, add_training_flags

    p = sub.add_parser(
        "tune",
        help="search --lr, --meta-lambda, --adapters and --batch-size with Ray Tune (ASHA)",
        description="Run --trials training runs with values drawn from the search space, "
        "stopping early (ASHA, on validation accuracy per epoch) the ones that trail. Each "
        "trial is a `metatrainer train` run in RUNS/NAME/<trial id>. Running the same command "
        "again restores the search: finished trials are kept, the others resume from their "
        "checkpoints.",
        epilog=f"Searched flags take {FORMS}; --adapters values join stages with '+', e.g. "
        "choice:none,layer4,layer3+layer4. A --config file gives them plain values.",
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
    add_training_flags(p, required=REQUIRED)
    for action in p._actions:
        # The searched flags take a search-space spec; each is checked by parse_spec.
        if action.dest in SEARCHED:
            action.type = str
            action.default = _default_spec(action.dest)
            action.help = f"{FORMS} (default: {action.default})"
        if action.dest == "batch_size":  # not searched when --global-batch is given
            action.default = None
            action.help += "; or give --global-batch, the same for every trial"
        if action.dest == "storage":
            action.help = "where the search goes (shared path or s3://)"
        if action.dest == "name":
            action.metavar, action.help = "NAME", "the search's name, the resume key"
    p.set_defaults(func=_tune)


def _default_spec(key: str) -> str:
    return _plain_spec(key, TrainConfig().flat()[key])


def _plain_spec(key: str, value: Any) -> str:
    """A plain value as a spec: the same in every trial."""
    if key == "adapters":
        return "+".join(value) or "none"
    return str(value)


def _tune(args: argparse.Namespace) -> int:
    from training.cli.flags import REQUIRED
    from training.cli.train import config_from_args

    fixed = {key: TrainConfig().flat()[key] for key in SEARCHED}  # set per trial
    # Refuses --batch-size with --global-batch; a --global-batch replaces a file's batch_size.
    cfg = config_from_args(args, required=REQUIRED, **fixed)
    specs = _specs(args, cfg.optim.global_batch is not None)
    outcome = run_tune(cfg, specs, args.trials, args.max_concurrent, args.address)
    print_table(outcome)
    return 0


def _specs(args: argparse.Namespace, global_batch: bool) -> dict[str, str | None]:
    """Each searched field's spec: its flag's, else the --config file's plain value, else its
    default; no --batch-size beside a --global-batch."""
    from training.cli.flags import given
    from training.config_file import read_config_file

    from_file = read_config_file(args.config) if args.config else {}
    specs: dict[str, str | None] = {}
    for key in SEARCHED:
        if key in given(args):
            specs[key] = getattr(args, key)
        elif key in from_file:
            specs[key] = _plain_spec(key, from_file[key])
        else:
            specs[key] = _default_spec(key)
    if global_batch:
        specs["batch_size"] = None
    return specs
