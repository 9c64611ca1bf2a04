"""`metatrainer evaluate`: a checkpoint's accuracy on a split (no Ray needed)."""

from __future__ import annotations

import argparse

from training.cli.flags import add_s3_endpoint_flag


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
    from training.run.evaluate import evaluate_checkpoint

    s3.set_endpoint(args.s3_endpoint)
    s3.set_timeout(args.s3_timeout)
    results = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.loader_workers)
    print(f"{'dataset':<50} {'samples':>8} {'accuracy':>9}")
    for dataset, accuracy, n in results:
        print(f"{dataset:<50} {n:>8} {accuracy:>9.4f}")
    return 0
