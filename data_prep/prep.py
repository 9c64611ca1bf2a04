"""`prep`: an ImageFolder directory → WebDataset shards + `manifest.json`, with Ray tasks.

    metatrainer prep ~/data/flowers /data/flowers-wds
    metatrainer prep ~/data/flowers /data/flowers-wds --splits train=0.9,val=0.1 --num-shards 8
    metatrainer prep ~/data/flowers s3://bucket/flowers --s3-endpoint http://minio:9000

    from data_prep.prep import prep
    manifest = prep("/data/flowers", "/data/flowers-wds", splits={"train": 0.9, "val": 0.1})

How it runs: the driver walks SRC (directories only), Ray tasks check the files in chunks (a
full decode of every image), the driver assigns splits and plans the shards, one Ray task per
shard builds it in a local temporary file and uploads (or moves) it as soon as it is done, and
the driver writes `manifest.json` last. Memory stays flat however large the dataset: no task
holds more than one image in memory. Everything is a function of the input and the seed, so a
second run on the same input writes byte-identical shards and manifest.

SRC must be readable at the same path from every node of the Ray cluster (a shared
filesystem): the checking and writing tasks run wherever Ray places them. A local DST is
written only by tasks on the driver's node, so the shards land next to the manifest.

DST is a local directory or `s3://bucket/prefix` (endpoint: `s3_endpoint`, else the standard
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; credentials: the standard AWS chain, on every node).

Interrupted runs: run prep again and it finishes the job. It first removes what killed writers
left (multipart uploads on S3, `.*.tmp` files locally), rebuilds every shard and keeps those
already in DST with the same size and sha256, so only the missing ones are uploaded, and the
manifest comes out byte-identical to an uninterrupted run's. A task removes the old manifest
just before it replaces a shard with different bytes, so no manifest ever names bytes that
are not there, and a re-run that changes nothing leaves the dataset readable throughout.
Shards an earlier run wrote that the new manifest does not name are removed once it is
written (`data_prep.ledger`); other files in DST are never touched.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster import s3, storage
from cluster.errors import UserError
from cluster.ray_cluster import connect
from data_prep import ledger
from data_prep import splits as split_plan
from data_prep.contract import (
    Manifest,
    Shard,
    Skipped,
    archive_bytes,
    sample_bytes,
    sample_json,
    shard_name,
    write_manifest,
)
from data_prep.progress import Progress
from data_prep.report import skip_counts_line
from data_prep.scan import (
    DEFAULT_MAX_PIXELS,
    Candidate,
    ValidImage,
    scan_source,
    validate_files,
)
from data_prep.shard_task import write_shard

DEFAULT_SHARD_SIZE = 256 * 10**6
DEFAULT_SEED = 1234


@dataclass(frozen=True)
class ShardJob:
    name: str
    images: list[ValidImage]


def prep(
    src: str,
    dst: str,
    splits: dict[str, float] | None = None,
    seed: int = DEFAULT_SEED,
    shard_size: int | None = None,
    num_shards: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    address: str | None = None,
    progress: Progress | None = None,
    s3_endpoint: str | None = None,
    s3_timeout: float | None = None,
    shared_dst: bool = False,
) -> Manifest:
    """Prepare `src` into shards and a manifest at `dst`; returns the manifest written.

    `shard_size` (bytes, default 256 MB) and `num_shards` (per split) are exclusive.
    `s3_endpoint` overrides AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for an `s3://` DST.
    `shared_dst`: a local DST is a filesystem every node mounts at the same path, so shard
    tasks may run on any node (otherwise they run on the driver's node).
    """
    splits = (
        dict(splits) if splits is not None else split_plan.parse_splits(split_plan.DEFAULT_SPLITS)
    )
    shard_size = _check_sizes(splits, shard_size, num_shards, max_pixels)
    progress = progress or Progress()
    s3.set_endpoint(s3_endpoint)
    s3.set_timeout(s3_timeout)

    if "://" in src:
        raise UserError(
            f"SRC {src} is a URL: prep reads a local or shared-filesystem directory; copy the "
            "images there first (e.g. `aws s3 sync`)"
        )
    src = os.path.abspath(os.path.expanduser(src))
    dst = storage.normalize(dst)
    scan = scan_source(src)
    _check_dst(src, dst)

    if not scan.candidates:
        raise UserError(f"{src} has no valid images ({skip_counts_line(scan.skipped)})")
    connect(address)
    # A local DST exists on the driver's machine only, unless every node mounts it.
    pin_to = None if storage.is_s3(dst) or shared_dst else _driver_node_with_cpus(dst)
    images, skipped = _validate(src, scan.candidates, max_pixels, progress)
    skipped = sorted([*scan.skipped, *skipped], key=lambda s: (s.path, s.reason))
    if not images:
        raise UserError(f"{src} has no valid images ({skip_counts_line(skipped)})")
    _warn_empty_classes(scan.classes, images, progress)

    jobs = plan_shards(images, scan.classes, splits, seed, shard_size, num_shards, progress)
    cleaned = storage.clean_partial_writes(dst)
    if cleaned:
        progress.message(f"removed {cleaned} partial write(s) an interrupted run left in {dst}")
    known = ledger.record_shards(
        dst, {job.name for split_jobs in jobs.values() for job in split_jobs}
    )
    written = _write_shards(src, dst, scan.classes, jobs, progress, pin_to)

    by_name = {shard.name: shard for shard in written}
    manifest = Manifest(
        classes=scan.classes,
        splits={name: [by_name[job.name] for job in jobs[name]] for name in splits},
        skipped=skipped,
        seed=seed,
    )
    write_manifest(dst, manifest)
    stale = ledger.remove_stale_shards(dst, known, set(by_name))
    if stale:
        progress.message(
            f"removed {len(stale)} shard(s) of an earlier run the manifest no longer names"
        )
    return manifest


def _check_sizes(
    splits: dict[str, float], shard_size: int | None, num_shards: int | None, max_pixels: int
) -> int | None:
    """Refuse impossible sizes in one line; the shard size to use (None: --num-shards)."""
    split_plan.check_splits(splits)
    if shard_size is not None and num_shards is not None:
        raise UserError("give --shard-size or --num-shards, not both")
    if num_shards is not None and num_shards < 1:
        raise UserError(f"--num-shards must be at least 1, not {num_shards}")
    if shard_size is not None and shard_size < 1:
        raise UserError(f"--shard-size must be more than 0 bytes, not {shard_size}")
    if max_pixels < 1:
        raise UserError(f"--max-pixels must be at least 1, not {max_pixels}")
    return DEFAULT_SHARD_SIZE if shard_size is None and num_shards is None else shard_size


def _check_dst(src: str, dst: str) -> None:
    """Fail before any work if DST cannot be reached or written, or would be scanned as part
    of SRC."""
    if not storage.is_s3(dst):
        d, s = storage.local_path(dst).resolve(), Path(src).resolve()
        if d == s or s in d.parents:
            raise UserError(
                f"DST {dst} is inside SRC {src}: its files would be read as images on the next "
                "run; choose a DST outside SRC"
            )
    # Reading first: an unreachable endpoint, a missing bucket or rejected credentials show
    # up as one clear error before anything is written.
    storage.list_dir(dst)
    probe = storage.join(dst, ".metatrainer-prep-write-test")
    storage.write_bytes(probe, b"")
    storage.remove(probe)


def _validate(
    src: str, candidates: list[Candidate], max_pixels: int, progress: Progress
) -> tuple[list[ValidImage], list[Skipped]]:
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # A few chunks per CPU balance the load; 8..256 files keep the per-task overhead small.
    size = min(256, max(8, math.ceil(len(candidates) / (4 * cpus))))
    chunks = [candidates[i : i + size] for i in range(0, len(candidates), size)]
    task = ray.remote(num_cpus=1)(validate_files)
    refs = [task.remote(src, chunk, max_pixels) for chunk in chunks]
    progress.start("checking images", len(candidates), "files")
    results = _gather(refs, [len(c) for c in chunks], progress)
    seconds = progress.finish()
    images = [r for chunk in results for r in chunk if isinstance(r, ValidImage)]
    skipped = [r for chunk in results for r in chunk if isinstance(r, Skipped)]
    rate = len(candidates) / seconds if seconds > 0 else 0.0
    progress.message(f"checked {len(candidates):,} files in {seconds:.1f} s ({rate:,.0f}/s)")
    return images, skipped


def plan_shards(
    images: Sequence[ValidImage],
    classes: list[str],
    splits: dict[str, float],
    seed: int,
    shard_size: int | None,
    num_shards: int | None,
    progress: Progress | None = None,
) -> dict[str, list[ShardJob]]:
    """Per split, its shards in order: split by path, shuffled by seed, cut by size or count."""
    members: dict[str, list[ValidImage]] = {name: [] for name in splits}
    for image in images:
        members[split_plan.assign_split(image.relpath, seed, splits)].append(image)
    plan: dict[str, list[ShardJob]] = {}
    for name, group in members.items():
        order = split_plan.shuffle_order([im.relpath for im in group], seed)
        ordered = [group[i] for i in order]
        if num_shards is not None:
            ranges = split_plan.plan_by_count(len(ordered), num_shards)
            if progress and 0 < len(ordered) < num_shards:
                progress.message(
                    f"warning: split {name!r} has only {len(ordered)} images: "
                    f"writing {len(ordered)} shards instead of {num_shards}"
                )
        else:
            assert shard_size is not None
            costs = [_sample_cost(im, classes) for im in ordered]
            ranges = split_plan.plan_by_size(costs, shard_size, archive_bytes)
        if progress and not ordered:
            progress.message(f"warning: split {name!r} got no images")
        plan[name] = [
            ShardJob(shard_name(name, i), ordered[r.start : r.stop]) for i, r in enumerate(ranges)
        ]
    return plan


def _sample_cost(image: ValidImage, classes: list[str]) -> int:
    meta = sample_json(image.relpath, classes[image.class_index], image.width, image.height)
    return sample_bytes(image.size, image.class_index, len(meta))


def _write_shards(
    src: str,
    dst: str,
    classes: list[str],
    plan: dict[str, list[ShardJob]],
    progress: Progress,
    pin_to: str | None,
) -> list[Shard]:
    """Shard tasks, on node `pin_to` if given."""
    jobs = [job for split_jobs in plan.values() for job in split_jobs]
    strategy: Any = "DEFAULT"
    if pin_to is not None:
        strategy = NodeAffinitySchedulingStrategy(node_id=pin_to, soft=False)
    task = ray.remote(num_cpus=1, scheduling_strategy=strategy)(write_shard)
    endpoint = s3.endpoint() if storage.is_s3(dst) else None
    refs = [
        task.remote(src, storage.join(dst, job.name), job.images, classes, endpoint, s3.timeout())
        for job in jobs
    ]
    total = sum(len(job.images) for job in jobs)
    progress.start(f"writing {len(jobs)} shards", total, "images")
    results = _gather(refs, [len(job.images) for job in jobs], progress)
    seconds = progress.finish()
    shards = [shard for shard, _ in results]
    kept = sum(1 for _, k in results if k)
    mb = sum(s.bytes for s in shards) / 1e6
    note = f" ({kept} were already there from an earlier run and kept)" if kept else ""
    progress.message(f"wrote {len(jobs)} shards{note}, {mb:,.1f} MB in {seconds:.1f} s")
    return shards


def _driver_node_with_cpus(dst: str) -> str:
    """The driver's node, which must have a CPU for the shard tasks a local DST pins there."""
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    if cpus < 1:
        raise UserError(
            f"DST {dst} is a local directory and this node (the driver's) has no CPUs for "
            "prep's shard tasks: write to s3://BUCKET/PREFIX, or to a filesystem every node "
            "mounts at this path with --shared-dst"
        )
    return node


def _gather(refs: list, weights: list[int], progress: Progress) -> list:
    """Results of `refs` in order, advancing `progress` by each task's weight as it finishes."""
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
            while ready:
                ref = ready.pop(0)
                results[index[ref]] = _get(ref)
                progress.advance(weights[index[ref]])
    except BaseException:
        _settle(ready + pending)
        raise
    return results


def _settle(refs: list, timeout: float = 10.0) -> None:
    """Cancel `refs` and collect their outcomes: an error left in an object nobody reads is
    printed by Ray as an "Unhandled error" traceback, after prep's one-line error."""
    for ref in refs:
        ray.cancel(ref)
    deadline = time.monotonic() + timeout
    for ref in refs:
        try:
            ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except Exception:
            pass


def _get(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        # A UserError raised in a task should read as one line, not as a remote traceback.
        if isinstance(e.cause, UserError):
            raise UserError(str(e.cause)) from None
        raise


def _warn_empty_classes(classes: list[str], images: list[ValidImage], progress: Progress) -> None:
    counts = Counter(im.class_index for im in images)
    empty = [name for i, name in enumerate(classes) if counts[i] == 0]
    if empty:
        progress.message(
            f"warning: {len(empty)} class folder(s) have no valid images and keep their index "
            f"with no samples: {', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}"
        )
