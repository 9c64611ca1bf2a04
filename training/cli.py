"""Subcommands `train`, `evaluate` and `demo`; flags map one to one onto `TrainConfig`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from cluster.errors import UserError
from training.config import DEMO_DEFAULTS, STAGES, TrainConfig

DEFAULTS = TrainConfig()


def _stages(text: str) -> list[str]:
    if text in ("", "none"):
        return []
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown stage {bad[0]!r}; choose from {','.join(STAGES)}"
        )
    return stages


def add_training_flags(p: argparse.ArgumentParser, defaults: TrainConfig = DEFAULTS) -> None:
    m = p.add_argument_group("model")
    m.add_argument(
        "--weights",
        default=defaults.weights,
        help="backbone weights: imagenet (torchvision's DEFAULT), IMAGENET1K_V1, IMAGENET1K_V2, "
        "none (random, seeded), a local resnet50 state_dict file, or one at an s3://, https:// "
        "or http:// URL with --weights-sha256, which each node downloads once into its cache "
        "(METATRAINER_CACHE_DIR, else ~/.cache/metatrainer) (default: %(default)s)",
    )
    m.add_argument(
        "--weights-sha256",
        default=defaults.weights_sha256,
        metavar="HEX",
        help="sha256 of the --weights file, as `sha256sum FILE` prints it: required for a URL, "
        "optional for a local file; checked on every load, a mismatch is an error",
    )
    m.add_argument(
        "--adapters",
        type=_stages,
        default=defaults.adapters,
        help=f"comma-separated stages that get residual adapters, from {','.join(STAGES)}, "
        "or none (default: none)",
    )
    m.add_argument(
        "--meta-lambda",
        type=float,
        default=defaults.meta_lambda,
        help="weight of the adapter penalty (default: %(default)s)",
    )
    m.add_argument(
        "--init-from",
        default=defaults.init_from,
        metavar="RUN_OR_CHECKPOINT",
        help="start from the adapters of this meta-trained run (a run directory, checkpoint "
        "directory or state.pt, local or s3://), frozen, with a new head per dataset; needs "
        "the same backbone (--weights, --seed); --adapters defaults to the run's stages",
    )
    m.add_argument(
        "--train-adapters",
        action="store_true",
        default=defaults.train_adapters,
        help="with --init-from: go on training its adapters instead of keeping them frozen",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=defaults.epochs, help="(default: %(default)s)")
    o.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"per worker: a step is batch size × workers (default: {defaults.batch_size})",
    )
    o.add_argument(
        "--global-batch",
        type=int,
        default=None,
        metavar="G",
        help="instead of --batch-size: G samples a step over all workers, however many; an "
        "elastic run (--workers MIN-MAX) then trains the weights of a fixed-size one",
    )
    o.add_argument("--lr", type=float, default=defaults.lr, help="Adam (default: %(default)s)")
    o.add_argument(
        "--lr-step",
        type=int,
        default=defaults.lr_step,
        help="StepLR step in epochs (default: %(default)s)",
    )
    o.add_argument(
        "--lr-gamma",
        type=float,
        default=defaults.lr_gamma,
        help="StepLR factor (default: %(default)s)",
    )
    o.add_argument(
        "--image-size", type=int, default=defaults.image_size, help="(default: %(default)s)"
    )
    o.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        default=defaults.augment,
        help="turn off random resized crops and flips",
    )
    o.add_argument("--seed", type=int, default=defaults.seed, help="(default: %(default)s)")
    o.add_argument(
        "--partitions",
        type=int,
        default=defaults.partitions,
        metavar="P",
        help="parts of the data order, dealt to the ranks (any number of workers serves any "
        "P); fixed for the life of a run (default: 1024, or the largest power of two that "
        "leaves a small train split 64 samples a partition)",
    )
    o.add_argument(
        "--shuffle-block",
        type=int,
        default=defaults.shuffle_block,
        metavar="N",
        help="samples of a partition read and shuffled together; with --seed and --partitions "
        "it fixes the data order (default: what keeps a dataset's readers under 2 GB, 8 to "
        "4096)",
    )
    o.add_argument(
        "--mix",
        type=_mix,
        default=defaults.mix,
        metavar="proportional|uniform|temperature:T",
        help="several --data: how each step's batch is shared among them, by train samples, "
        "equally, or by samples^(1/T); an epoch reads every dataset at least once, smaller "
        "shares going round again in a fresh order (default: %(default)s)",
    )
    c = p.add_argument_group("cluster")
    c.add_argument(
        "--workers",
        type=_workers,
        default=(defaults.min_workers, defaults.workers),
        metavar="N|MIN-MAX",
        help="training workers, one DDP rank each; MIN-MAX trains elastically, going on with "
        f"fewer workers when nodes are lost (default: {defaults.workers})",
    )
    c.add_argument(
        "--resize-check",
        type=float,
        default=defaults.resize_check,
        metavar="SECONDS",
        help="elastic (--workers MIN-MAX): how often Ray Train checks for room to grow back "
        "to MAX workers (default: %(default)s)",
    )
    c.add_argument(
        "--gpus-per-worker",
        type=float,
        default=defaults.gpus_per_worker,
        help="0 trains on CPU with gloo (default: %(default)s)",
    )
    c.add_argument(
        "--cpus-per-worker",
        type=float,
        default=defaults.cpus_per_worker,
        help="(default: %(default)s)",
    )
    c.add_argument(
        "--loader-workers",
        type=int,
        default=defaults.loader_workers,
        help="DataLoader processes per worker (default: %(default)s)",
    )
    c.add_argument(
        "--max-failures",
        type=int,
        default=defaults.max_failures,
        help="worker-group restarts from the latest checkpoint (default: %(default)s)",
    )
    c.add_argument(
        "--start-timeout",
        type=float,
        default=defaults.start_timeout,
        metavar="SECONDS",
        help="each of 3 attempts to start the workers waits this long for their resources; "
        "then the run ends, saying what was missing (default: %(default)s)",
    )
    c.add_argument(
        "--metrics-port",
        type=int,
        default=defaults.metrics_port,
        help="workers serve /metrics on this port + local rank; 0 disables (default: %(default)s)",
    )
    c.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: RAY_ADDRESS, else start a local one)",
    )
    add_compute_flags(p, defaults)
    add_checkpoint_flags(p, defaults)
    s = p.add_argument_group("storage")
    add_s3_endpoint_flag(s)
    s.add_argument(
        "--cache-dir",
        default=defaults.cache_dir,
        help="keep shards streamed from S3 on local disk here for later epochs (default: "
        "METATRAINER_CACHE_DIR of each node, where it is set: a node's own local disk)",
    )
    s.add_argument(
        "--cache-size",
        type=_size,
        default=defaults.cache_size,
        help="size limit of --cache-dir, e.g. 50GB (default: 10GB)",
    )


def add_compute_flags(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    g = p.add_argument_group("compute")
    g.add_argument(
        "--decode",
        choices=("auto", "cpu", "gpu"),
        default=defaults.decode,
        help="where JPEGs are decoded; auto: on the GPU when training on GPUs (default: auto)",
    )
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the model (faster GPU steps)"
    )
    g.add_argument(
        "--feature-cache",
        choices=("auto", "on", "off"),
        default=defaults.feature_cache,
        help="train the heads on the frozen backbone's features, computed once per split; "
        "auto: when there are no --adapters and no augmentation (default: auto)",
    )
    g.add_argument(
        "--log-every",
        type=int,
        default=defaults.log_every,
        help="read the loss from the device every N steps (default: %(default)s)",
    )


def add_checkpoint_flags(p: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    k = p.add_argument_group("checkpoints")
    k.add_argument(
        "--checkpoint-every-steps",
        type=int,
        default=defaults.checkpoint_every_steps,
        metavar="N",
        help="also checkpoint every N steps, not only at epoch ends (default: %(default)s)",
    )
    k.add_argument(
        "--keep-checkpoints",
        type=int,
        default=defaults.keep_checkpoints,
        metavar="K",
        help="keep the newest K checkpoints, 0 for all (default: %(default)s)",
    )
    k.add_argument(
        "--sample-log",
        default=None,
        metavar="DIR",
        help="debug: append the keys of every trained batch to DIR/rank-R.tsv",
    )


def _mix(text: str) -> str:
    from training.mix import parse_mix

    try:
        return parse_mix(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--mix {text!r}: ")) from None


def _workers(text: str) -> tuple[int | None, int]:
    low, _, high = text.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number or MIN-MAX, e.g. 2-8") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return (lo if high else None), hi


def add_s3_endpoint_flag(p) -> None:
    p.add_argument(
        "--s3-endpoint",
        default=None,
        metavar="URL",
        help="S3-compatible endpoint, e.g. http://minio:9000 (default: AWS_ENDPOINT_URL_S3 or "
        "AWS_ENDPOINT_URL; credentials come only from the standard AWS chain)",
    )
    p.add_argument(
        "--s3-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="per attempt of an S3 request (botocore makes 8): a hung endpoint is reported "
        "after about 8 × this (default: %(default)s)",
    )


def _size(text: str) -> int:
    from data_prep.splits import parse_size

    try:
        return parse_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def config_from_args(
    args: argparse.Namespace, defaults: TrainConfig = DEFAULTS, **overrides
) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    values["min_workers"], values["workers"] = args.workers
    if values.get("global_batch") is not None and values.get("batch_size") is not None:
        raise UserError(
            "give --batch-size (per worker) or --global-batch (over all workers), not both"
        )
    if values.get("batch_size") is None and values.get("global_batch") is None:
        values["batch_size"] = defaults.batch_size
    return TrainConfig(**{**values, **overrides})


def add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="meta-train on prepared datasets with Ray Train",
        description="Train adapters and one head per dataset on a frozen ResNet-50. Running "
        "again with the same --storage and --name resumes from the latest checkpoint.",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="DST",
        help="prepared dataset (repeat for meta-training on several)",
    )
    p.add_argument(
        "--storage",
        required=True,
        metavar="RUNS",
        help="where checkpoints and results go (shared path or s3://)",
    )
    p.add_argument("--name", required=True, metavar="RUN", help="run name, the resume key")
    add_training_flags(p)
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from training.driver import run_training

    outcome = run_training(config_from_args(args), args.address, progress_stream=sys.stderr)
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
    urls = [u for u in m.get("metrics_urls") or [] if u]
    if urls:
        print(f"metrics         {', '.join(urls)} (served while workers run)")


def add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="accuracy of a checkpoint on a split (no Ray needed)",
        description="Load a checkpoint (a state.pt, a checkpoint directory, or a run directory "
        "for its newest checkpoint) and report accuracy on a split of the datasets.",
    )
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint dir or file")
    p.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="DST",
        help="datasets, one per head, in training order (default: those it trained on)",
    )
    p.add_argument("--split", default="test", help="(default: %(default)s)")
    p.add_argument("--loader-workers", type=int, default=2, help="(default: %(default)s)")
    add_s3_endpoint_flag(p)
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from cluster import s3
    from training.evaluate import evaluate_checkpoint

    s3.set_endpoint(args.s3_endpoint)
    s3.set_timeout(args.s3_timeout)
    results = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.loader_workers)
    print(f"{'dataset':<50} {'samples':>8} {'accuracy':>9}")
    for dataset, accuracy, n in results:
        print(f"{dataset:<50} {n:>8} {accuracy:>9.4f}")
    return 0


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="end to end on sample data: digits → shards → 2-worker training → test accuracy",
        description="Writes scikit-learn's 1,797 handwritten digits as an ImageFolder of JPEGs, "
        "shards it, trains on a local Ray cluster and prints the test accuracy.",
    )
    p.add_argument(
        "--workdir",
        default="./metatrainer-demo",
        help="where images, shards and runs go (default: %(default)s)",
    )
    add_training_flags(p, DEMO_DEFAULTS)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from training.demo import run_demo

    run_demo(args.workdir, config_from_args(args, DEMO_DEFAULTS), args.address)
    return 0
