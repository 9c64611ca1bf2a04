"""A prep run in MLflow (`metatrainer prep --mlflow URI`, or MLFLOW_TRACKING_URI;
`cluster.tracking`): one MLflow run per prep, named `prep <DST's last part>`, created when prep
starts and ended when it does (FINISHED, FAILED, or KILLED by Ctrl-C).

    params     src, dst, splits, seed, shard_size, num_shards, max_pixels
    metrics    images, bytes, shards (all splits) and images/<split>, bytes/<split>,
               shards/<split>; skipped and skipped/<kind of reason>; duration_seconds
    tags       dataset (DST), manifest_sha256 (of manifest.json, as `sha256sum` prints it)
    artifacts  skipped.tsv (path, reason: every file skipped), summary.txt (the table printed)
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any

from cluster.tracking import NullTracker, Tracker, create_run
from data_prep.contract import Manifest
from data_prep.report import skip_reason_kind

WHAT = "prep"


def start_prep_run(
    uri: str | None, experiment: str, dataset: str, params: dict[str, Any]
) -> Tracker | NullTracker:
    """The prep's MLflow run, with its parameters (a NullTracker without a URI)."""
    name = "prep " + (dataset.rstrip("/").rsplit("/", 1)[-1] or dataset)
    tracker = create_run(uri, experiment, name, WHAT, {"dataset": dataset})
    tracker.params(params)
    return tracker


def prep_metrics(manifest: Manifest) -> dict[str, float]:
    """The counts prep wrote and skipped: totals, and per split or kind of reason."""
    values: dict[str, float] = {}
    for split, shards in manifest.splits.items():
        values[f"images/{split}"] = sum(s.num_samples for s in shards)
        values[f"bytes/{split}"] = sum(s.bytes for s in shards)
        values[f"shards/{split}"] = len(shards)
    for what in ("images", "bytes", "shards"):
        values[what] = sum(v for k, v in values.items() if k.startswith(what + "/"))
    values["skipped"] = len(manifest.skipped)
    kinds = Counter(skip_reason_kind(s.reason) for s in manifest.skipped)
    values |= {f"skipped/{kind}": n for kind, n in kinds.items()}
    return values


def skip_report(manifest: Manifest) -> bytes:
    """Every skipped file and why, a line each: `path<TAB>reason` (tabs and newlines in a
    name escaped)."""
    lines = ["path\treason"] + [f"{_cell(s.path)}\t{_cell(s.reason)}" for s in manifest.skipped]
    return ("\n".join(lines) + "\n").encode()


def finish_prep_run(
    tracker: Tracker | NullTracker, manifest: Manifest, summary: str, seconds: float
) -> None:
    tracker.metrics({**prep_metrics(manifest), "duration_seconds": seconds}, step=0)
    tracker.tags({"manifest_sha256": hashlib.sha256(manifest.to_json()).hexdigest()})
    tracker.artifacts({"skipped.tsv": skip_report(manifest), "summary.txt": summary.encode()})
    tracker.end("FINISHED")


def fail_prep_run(tracker: Tracker | NullTracker, seconds: float, interrupted: bool) -> None:
    tracker.metrics({"duration_seconds": seconds}, step=0)
    tracker.end("KILLED" if interrupted else "FAILED")


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
