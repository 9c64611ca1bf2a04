"""`metatrainer prep SRC DST`: the command line of `data_prep.prep.prep`.

metatrainer prep ~/data/flowers /data/flowers-wds
metatrainer prep ~/data/flowers /data/flowers-wds --splits train=0.9,val=0.1 --shard-size 1GiB
RAY_ADDRESS=auto metatrainer prep /shared/flowers /shared/flowers-wds --num-shards 64
metatrainer prep /shared/flowers s3://bucket/flowers --s3-endpoint http://minio:9000 \
    --pushgateway http://pushgateway:9091
metatrainer prep ~/data/flowers /data/flowers-wds --mlflow http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import time

from cluster import storage
from cluster.errors import UserError
from cluster.tracking import DEFAULT_EXPERIMENT, resolve_uri
from data_prep.prep import DEFAULT_SEED, prep
from data_prep.report import metrics_pusher, summary
from data_prep.scan import DEFAULT_MAX_PIXELS
from data_prep.splits import DEFAULT_SPLITS, parse_size, parse_splits
from data_prep.tracking import fail_prep_run, finish_prep_run, start_prep_run

DESCRIPTION = """\
Turn an ImageFolder directory (SRC/<class name>/<image>) into WebDataset shards
(DST/<split>-000000.tar) and DST/manifest.json. Class indices are torchvision ImageFolder's.
Every file is checked by fully decoding it; files that cannot be used are skipped and listed
in the manifest with the reason. Runs as Ray tasks: SRC must be readable at the same path
from every node of the cluster. Progress goes to stderr, a summary table to stdout.

DST may be s3://BUCKET/PREFIX: each shard is uploaded as soon as it is written, manifest.json
last. Credentials come from the standard AWS chain only (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a web-identity role), on every node of the cluster.
If prep is interrupted, run it again: shards already uploaded intact are kept, the rest are
written, and the manifest is the same as an uninterrupted run's.

With --pushgateway, the run's metrics are pushed at the end, grouped by job="metatrainer_prep"
and dataset="<DST>": metatrainer_prep_success (1, or 0 after a failed run),
metatrainer_prep_duration_seconds, metatrainer_prep_last_success_timestamp_seconds, and
metatrainer_prep_{images,bytes,shards}_total{split}, metatrainer_prep_skipped_total{reason}.
A failed run pushes only success=0 and its duration, so the counts still describe the last
dataset written. A failed push is a warning, never a failed prep.

With --mlflow (or MLFLOW_TRACKING_URI), the run is an MLflow run named "prep <DST's last
part>": its flags as parameters, the counts (images, bytes, shards per split, skipped per
reason) as metrics, the list of skipped files and the summary as artifacts. A tracking server
that does not answer is a warning, never a failed prep."""


def add_prep_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prep",
        help="ImageFolder directory → WebDataset shards + manifest.json",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="the ImageFolder directory to read")
    p.add_argument(
        "dst",
        metavar="DST",
        help="where the shards and manifest.json go: a local directory (created if missing) "
        "or s3://BUCKET/PREFIX",
    )
    p.add_argument(
        "--splits",
        default=DEFAULT_SPLITS,
        metavar="NAME=FRACTION,...",
        help="split names and fractions, summing to 1; an image's split depends only on its "
        "path and --seed, so adding images never moves old ones (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help="seed of the split assignment and the shuffle (default: %(default)s)",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--shard-size",
        metavar="SIZE",
        help="largest shard size: bytes, or a number with a unit such as 500kB, 256MB, 1GiB "
        "(default: 256MB)",
    )
    size.add_argument(
        "--num-shards",
        type=int,
        metavar="N",
        help="write N shards per split instead, with equal sample counts (fewer where a split "
        "has fewer than N images)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="skip images with more than N pixels (width × height, read from the header "
        "before decoding), against decompression bombs (default: %(default)s, Pillow's)",
    )
    _add_where_flags(p)
    p.set_defaults(func=run_prep)
    return p


def _add_where_flags(p: argparse.ArgumentParser) -> None:
    """Where prep runs and where its output and metrics go."""
    p.add_argument(
        "--address",
        help="address of a running Ray cluster (default: RAY_ADDRESS, or else start a local "
        "one on this machine)",
    )
    p.add_argument(
        "--shared-dst",
        action="store_true",
        help="a local DST is a filesystem every Ray node mounts at the same path: write shards "
        "from any node (default: from the driver's node, which then needs a CPU)",
    )
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3 endpoint for an s3:// DST, e.g. http://minio:9000 (default: "
        "AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS S3)",
    )
    p.add_argument(
        "--s3-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="per attempt of an S3 request (botocore makes 8) (default: %(default)s)",
    )
    p.add_argument(
        "--pushgateway",
        metavar="URL",
        help="push the run's metrics to this Prometheus Pushgateway, e.g. "
        "http://pushgateway:9091 (default: push nothing)",
    )
    p.add_argument(
        "--mlflow",
        metavar="URI",
        help="track the run in MLflow at this tracking URI, e.g. http://127.0.0.1:5000, or a "
        "local directory (default: MLFLOW_TRACKING_URI; neither: nothing is tracked); needs "
        "pip install 'metatrainer[mlflow]'",
    )
    p.add_argument(
        "--mlflow-experiment",
        default=DEFAULT_EXPERIMENT,
        metavar="NAME",
        help="the MLflow experiment of the run (default: %(default)s)",
    )


def run_prep(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        dataset = storage.normalize(args.dst)
    except UserError:
        dataset = args.dst
    pusher = metrics_pusher(args.pushgateway, dataset)
    tracker = start_prep_run(
        resolve_uri(args.mlflow), args.mlflow_experiment, dataset, _params(args, dataset)
    )
    try:
        manifest = prep(
            args.src,
            args.dst,
            splits=parse_splits(args.splits),
            seed=args.seed,
            shard_size=parse_size(args.shard_size) if args.shard_size is not None else None,
            num_shards=args.num_shards,
            max_pixels=args.max_pixels,
            address=args.address,
            s3_endpoint=args.s3_endpoint,
            s3_timeout=args.s3_timeout,
            shared_dst=args.shared_dst,
        )
    except BaseException as e:
        pusher.push_failure(time.monotonic() - started)
        fail_prep_run(tracker, time.monotonic() - started, isinstance(e, KeyboardInterrupt))
        raise
    seconds = time.monotonic() - started
    pusher.push_success(manifest, seconds)
    table = summary(manifest, dataset)
    finish_prep_run(tracker, manifest, table, seconds)
    print(table)
    return 0


def _params(args: argparse.Namespace, dataset: str) -> dict[str, object]:
    """What the prep was asked to do, as MLflow parameters."""
    return {
        "src": args.src,
        "dst": dataset,
        "splits": args.splits,
        "seed": args.seed,
        "shard_size": args.shard_size,
        "num_shards": args.num_shards,
        "max_pixels": args.max_pixels,
    }
