"""The `metatrainer` command.

    metatrainer demo                          # sample digits → shards → train → test accuracy
    metatrainer prep SRC DST                  # ImageFolder → WebDataset shards + manifest.json
    metatrainer train --data DST --storage RUNS --name RUN
    metatrainer evaluate --checkpoint RUNS/RUN --data DST
    metatrainer predict --checkpoint RUNS/RUN IMAGE_OR_DIR…   # classes of image files
    metatrainer report RUNS/RUN               # PNG curves + confusion matrices, per-class table
    metatrainer tune --data DST --storage RUNS --name SWEEP --lr loguniform:1e-4:1e-2 --trials 8

Each subcommand is defined next to the code it runs; this module only dispatches and turns a
`UserError` into one line on stderr and exit status 2 (its traceback too with --debug).
"""

from __future__ import annotations

import argparse
import sys
import traceback

from cluster.errors import STOPPED_EXIT, Stopped, UserError, one_line


def build_parser() -> argparse.ArgumentParser:
    from data_prep.cli import add_prep_command
    from training.cli.demo import add_demo_command
    from training.cli.evaluate import add_evaluate_command
    from training.cli.predict import add_predict_command
    from training.cli.report import add_report_command
    from training.cli.train import add_train_command
    from training.cli.tune import add_tune_command

    parser = argparse.ArgumentParser(
        prog="metatrainer",
        description="Meta-train a frozen ResNet-50 on WebDataset shards with Ray Train.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_command(sub)
    add_prep_command(sub)
    add_train_command(sub)
    add_evaluate_command(sub)
    add_predict_command(sub)
    add_report_command(sub)
    add_tune_command(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--debug",
            action="store_true",
            help="on an error, print its traceback (and the Ray workers') before the one line",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"metatrainer {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"metatrainer {args.command}: {e}", file=sys.stderr)
        return STOPPED_EXIT
    except KeyboardInterrupt:
        print(f"metatrainer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
