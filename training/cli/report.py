"""`metatrainer report RUN`: a run's curves and confusion matrices as PNGs (no Ray)."""

from __future__ import annotations

import argparse

from training.cli.flags import add_s3_endpoint_flag
from training.run.report import per_class_table, write_report


def add_report_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="a run's curves and confusion matrices as PNGs, and per-class accuracy (no Ray)",
        description="Plot a run's loss terms, validation accuracy and throughput per epoch "
        "(curves.png) and, scoring its newest checkpoint on a split, a confusion matrix per "
        "dataset (confusion-DATASET.png); print a per-class accuracy table.",
    )
    p.add_argument("run", metavar="RUN", help="run directory (STORAGE/NAME), local or s3://")
    p.add_argument("--out", default=None, help="where the PNGs go (default: RUN/report)")
    p.add_argument("--split", default="test", help="(default: %(default)s)")
    p.add_argument("--loader-workers", type=int, default=2, help="(default: %(default)s)")
    add_s3_endpoint_flag(p)
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from cluster import s3

    s3.set_endpoint(args.s3_endpoint)
    s3.set_timeout(args.s3_timeout)
    files, confusions = write_report(args.run, args.out, args.split, args.loader_workers)
    print(per_class_table(confusions, args.split))
    print(f"report          {files[0].rsplit('/', 1)[0]} ({len(files)} PNGs)")
    return 0
