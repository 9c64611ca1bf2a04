"""`metatrainer train`: meta-train on prepared datasets with Ray Train.

metatrainer train --data ./shards --storage ./runs --name digits
metatrainer train --config run.toml --lr 0.01          # the flags given win over the file
metatrainer train --config ./runs/digits/config.toml --name digits-again   # rerun a run
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

from cluster.errors import UserError
from training.cli.flags import DEFAULTS, REQUIRED, add_training_flags, given
from training.config import FLAGS, WHERE, TrainConfig
from training.config_file import read_config_file


def config_from_args(
    args: argparse.Namespace,
    defaults: TrainConfig = DEFAULTS,
    required: tuple[str, ...] = (),
    **overrides,
) -> TrainConfig:
    """The run's config: `defaults` ← the --config file ← the flags given on the command line
    ← `overrides`. The `required` fields (flat names) must come from the file or a flag."""
    values = copy.deepcopy(defaults.flat())
    path = getattr(args, "config", None)
    layers = [read_config_file(path) if path else {}, _given_values(args)]
    for layer in layers:
        # A batch is one setting with two spellings, and --workers gives both its bounds: a
        # layer that sets one replaces what the layers under it set.
        if "batch_size" in layer or "global_batch" in layer:
            values["batch_size"] = values["global_batch"] = None
        if "workers" in layer:
            values["min_workers"] = None
        values |= layer
    missing = [FLAGS[n] for n in required if not any(n in layer for layer in layers)]
    if missing:
        raise UserError(
            f"{', '.join(missing)}: required, on the command line or in a --config file"
        )
    if values["batch_size"] is None and values["global_batch"] is None:
        values["batch_size"] = defaults.optim.batch_size
    return TrainConfig.of(**{**values, **overrides})


def _given_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, by flat name."""
    values = {n: getattr(args, n) for n in given(args) if n in WHERE}
    if "workers" in values:
        values["min_workers"], values["workers"] = values["workers"]
    if values.get("batch_size") is not None and values.get("global_batch") is not None:
        raise UserError(
            "give --batch-size (per worker) or --global-batch (over all workers), not both"
        )
    if getattr(args, "debug", False):  # main's --debug, on every command
        values["debug"] = True
    return values


def add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="meta-train on prepared datasets with Ray Train",
        description="Train adapters and one head per dataset on a frozen ResNet-50. Running "
        "again with the same --storage and --name resumes from the latest checkpoint.",
    )
    add_training_flags(p, required=REQUIRED)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from training.run import stop

    stop.catch_early()  # a SIGUSR1 before training starts is kept, not fatal
    from training.run.driver import run_training

    outcome = run_training(
        config_from_args(args, required=REQUIRED), args.address, progress_stream=sys.stderr
    )
    print_outcome(outcome)
    return 0


def print_outcome(outcome) -> None:
    m = outcome.metrics
    acc = m.get("test_accuracy")
    print()
    print(
        f"test accuracy   {acc:.4f}" if acc is not None else "test accuracy   n/a (no test split)"
    )
    print(f"run directory   {outcome.run_dir}")
    print(f"checkpoint      {outcome.checkpoint}")
    print(f"result          {outcome.result_file}")
    print(f"fingerprint     {m.get('fingerprint')}")
    if outcome.report:
        print(f"report          {outcome.report} (per-class table: metatrainer report RUN)")
    if outcome.mlflow:
        print(f"mlflow          {outcome.mlflow}")
    urls = [u for u in m.get("metrics_urls") or [] if u]
    if urls:
        print(f"metrics         {', '.join(urls)} (served while workers run)")
