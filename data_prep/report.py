"""What a prep run reports: the summary table on stdout and, for monitoring, its metrics pushed
to a Prometheus Pushgateway (the convention for batch jobs, which are gone before a scrape).

    pusher = metrics_pusher("http://pushgateway:9091", "s3://bucket/flowers")
    pusher.push_success(manifest, seconds)   # or pusher.push_failure(seconds)

Pushed under the grouping key `job="metatrainer_prep", dataset="<DST>"`:

    metatrainer_prep_success                          1 after a successful run, 0 after a failed one
    metatrainer_prep_duration_seconds                 wall time of the last run
    metatrainer_prep_last_success_timestamp_seconds   Unix time the last successful run ended
    metatrainer_prep_images_total{split}              images written
    metatrainer_prep_bytes_total{split}               shard bytes written
    metatrainer_prep_shards_total{split}              shards written
    metatrainer_prep_skipped_total{reason}            files skipped, by kind of reason

A success replaces the whole group (so no series of an older run lingers); a failure updates
only `success` and `duration_seconds`, so the counts and the timestamp still describe the
dataset the last successful run wrote. Alert on `metatrainer_prep_success == 0`, or on
`time() - metatrainer_prep_last_success_timestamp_seconds` for a job that stopped running.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, push_to_gateway, pushadd_to_gateway
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from cluster import storage
from data_prep.contract import MANIFEST_NAME, Manifest, Skipped
from data_prep.progress import Progress

JOB = "metatrainer_prep"
PREFIX = "metatrainer_prep_"
PUSH_TIMEOUT_SECONDS = 10.0


def skip_reason_kind(reason: str) -> str:
    """The reason without its per-file details, for counting: `corrupt image (...)` → kind."""
    return reason.split(" (", 1)[0]


def skip_counts_line(skipped: list[Skipped]) -> str:
    counts = Counter(skip_reason_kind(s.reason) for s in skipped)
    if not counts:
        return "no files with an image extension were found"
    parts = [f"{n} {kind}" for kind, n in counts.most_common(3)]
    more = f", {len(counts) - 3} more kinds" if len(counts) > 3 else ""
    return f"{len(skipped)} files skipped: " + "; ".join(parts) + more


def summary(manifest: Manifest, dst: str, show_skipped: int = 5) -> str:
    """The table printed at the end of `metatrainer prep`."""
    rows = [("split", "images", "shards", "MB")]
    for name, shards in manifest.splits.items():
        mb = sum(s.bytes for s in shards) / 1e6
        rows.append(
            (name, f"{sum(s.num_samples for s in shards):,}", str(len(shards)), f"{mb:,.1f}")
        )
    all_shards = [s for shards in manifest.splits.values() for s in shards]
    total_mb = sum(s.bytes for s in all_shards) / 1e6
    total_images = sum(s.num_samples for s in all_shards)
    rows.append(("total", f"{total_images:,}", str(len(all_shards)), f"{total_mb:,.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    # The split name is left-aligned, the numbers right-aligned.
    lines = [
        "  ".join(
            [r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True))]
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"classes: {len(manifest.classes)}")
    if manifest.skipped:
        lines.append(f"skipped: {len(manifest.skipped):,} files")
        counts = Counter(skip_reason_kind(s.reason) for s in manifest.skipped)
        width = len(f"{counts.most_common(1)[0][1]:,}")
        lines += [f"  {n:>{width},}  {kind}" for kind, n in counts.most_common()]
        lines.append("first skipped:")
        lines += [f"  {_printable(s.path)}: {s.reason}" for s in manifest.skipped[:show_skipped]]
    else:
        lines.append("skipped: none")
    lines.append(f"manifest: {storage.join(dst, MANIFEST_NAME)}")
    return "\n".join(lines)


def _printable(text: str) -> str:
    """Keep a path on one line: a newline in a file name would break the table."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Metrics(Collector):
    """A fixed set of metric families: exactly what one push sends, and nothing else (a
    `Counter` object would add a `_created` series per label set)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def success_metrics(manifest: Manifest, seconds: float, now: float) -> list[Metric]:
    families: list[Metric] = [
        _gauge("success", "1 if the last prep run succeeded, 0 if it failed", 1),
        _gauge("duration_seconds", "wall time of the last prep run", seconds),
        _gauge(
            "last_success_timestamp_seconds",
            "Unix time at which the last successful prep run ended",
            now,
        ),
    ]
    per_split = {
        "images": ("images written to shards", lambda shards: sum(s.num_samples for s in shards)),
        "bytes": ("bytes of shards written", lambda shards: sum(s.bytes for s in shards)),
        "shards": ("shards written", len),
    }
    for name, (doc, value) in per_split.items():
        family = CounterMetricFamily(PREFIX + name, doc, labels=["split"])
        for split, shards in manifest.splits.items():
            family.add_metric([split], value(shards))
        families.append(family)
    skipped = CounterMetricFamily(
        PREFIX + "skipped", "source files skipped, by kind of reason", labels=["reason"]
    )
    for kind, n in sorted(Counter(skip_reason_kind(s.reason) for s in manifest.skipped).items()):
        skipped.add_metric([kind], n)
    families.append(skipped)
    return families


def failure_metrics(seconds: float) -> list[Metric]:
    return [
        _gauge("success", "1 if the last prep run succeeded, 0 if it failed", 0),
        _gauge("duration_seconds", "wall time of the last prep run", seconds),
    ]


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


class MetricsPusher:
    """Pushes a prep run's metrics to the Pushgateway at `url`; a failed push is one warning
    line, never a failed prep."""

    def __init__(self, url: str, dataset: str, progress: Progress | None = None) -> None:
        self.url = url
        self.dataset = dataset
        self._progress = progress or Progress()

    def push_success(self, manifest: Manifest, seconds: float) -> None:
        self._push(push_to_gateway, success_metrics(manifest, seconds, time.time()))

    def push_failure(self, seconds: float) -> None:
        self._push(pushadd_to_gateway, failure_metrics(seconds))

    def _push(self, method, families: list[Metric]) -> None:
        registry = CollectorRegistry()
        registry.register(_Metrics(families))
        try:
            method(
                self.url,
                job=JOB,
                registry=registry,
                grouping_key={"dataset": self.dataset},
                timeout=PUSH_TIMEOUT_SECONDS,
            )
        except Exception as e:  # a push is best effort: any failure is a warning
            why = _redact(" ".join(str(e).split()) or type(e).__name__)
            self._progress.message(
                f"warning: could not push metrics to the Pushgateway at {_redact(self.url)} "
                f"({why}); check --pushgateway"
            )


class NoPusher:
    """Without --pushgateway: pushes nothing."""

    def push_success(self, manifest: Manifest, seconds: float) -> None:
        pass

    def push_failure(self, seconds: float) -> None:
        pass


def metrics_pusher(
    url: str | None, dataset: str, progress: Progress | None = None
) -> MetricsPusher | NoPusher:
    return MetricsPusher(url, dataset, progress) if url else NoPusher()


def _redact(text: str) -> str:
    """`text` with any `user:password@` of a URL in it hidden."""
    return re.sub(r"//[^/@\s]*@", "//***@", text)
