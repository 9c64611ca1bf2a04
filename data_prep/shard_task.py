"""The Ray task that writes one shard: build it locally, then publish it unless DST already
holds exactly these bytes.

Shards are byte-deterministic, so a re-run after an interrupted one rebuilds the same bytes and
finds the shards that were already published by size and sha256 (on S3 without downloading
them: `storage.put_file` records the sha256 in the object's metadata).
"""

from __future__ import annotations

import glob
import os
import re
import socket
import tempfile
from pathlib import Path

from cluster import s3, storage
from cluster.errors import UserError
from data_prep.contract import MANIFEST_NAME, Shard, sample_json, sample_key
from data_prep.scan import ValidImage, read_regular_file
from data_prep.shard_writer import ShardWriter


def write_shard(
    src: str,
    url: str,
    images: list[ValidImage],
    classes: list[str],
    endpoint: str | None = None,
    timeout: float | None = None,
) -> tuple[Shard, bool]:
    """Write one shard from the source files. Returns the shard and whether `url` already held
    exactly its bytes (left by an interrupted run), so that nothing was uploaded.

    `endpoint` and `timeout` are the driver's S3 settings: a Ray worker's environment is fixed
    when its node starts, so the driver's --s3-endpoint reaches the task only as an argument.
    """
    s3.set_endpoint(endpoint)
    s3.set_timeout(timeout)
    tmp = _temporary_file(url)
    try:
        # On disk, not in memory: a shard may be gigabytes.
        with open(tmp, "wb") as f:
            with ShardWriter(f) as shard:
                for image in images:
                    _write_sample(shard, src, image, classes)
            if not storage.is_s3(url):
                f.flush()
                os.fsync(f.fileno())  # it becomes the published file by a rename
        kept = storage.has_file(url, shard.size, shard.sha256)
        if not kept:
            # The previous run's manifest may name the bytes being replaced: it goes first.
            storage.remove(storage.join(url.rsplit("/", 1)[0], MANIFEST_NAME))
            storage.put_file(tmp, url, shard.sha256)
    finally:
        Path(tmp).unlink(missing_ok=True)
    name = url.rsplit("/", 1)[-1]
    return Shard(name, shard.num_samples, shard.size, shard.sha256, shard.index), kept


def _write_sample(shard: ShardWriter, src: str, image: ValidImage, classes: list[str]) -> None:
    path = os.path.join(src, image.relpath)
    data = read_regular_file(path)
    if isinstance(data, str) or len(data) != image.size:
        why = data if isinstance(data, str) else "its size changed"
        raise UserError(f"{path} changed while prep was running ({why}); run prep again")
    meta = sample_json(image.relpath, classes[image.class_index], image.width, image.height)
    shard.write_sample(sample_key(image.relpath), image.ext, data, image.class_index, meta)


def _temporary_file(url: str) -> str:
    """A new, empty local file to build the shard for `url` in.

    For a local DST it sits next to the shard (`.<name>.XXXX.tmp`), so publishing it is a
    rename and a killed run's leftover is removed by the next run's
    `storage.clean_partial_writes`. For S3 it sits in this machine's temporary directory, named
    after this process, so a later task can tell a killed task's leftover from a live one's.
    """
    name = url.rsplit("/", 1)[-1]
    if storage.is_s3(url):
        folder = Path(tempfile.gettempdir())
        owner = f"metatrainer-prep-{socket.gethostname()}-pid"
        _remove_orphans(folder, owner)
        prefix = f"{owner}{os.getpid()}-{name}."
    else:
        folder = storage.local_path(url).parent
        prefix = f".{name}."
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror}") from None
    os.close(fd)
    return tmp


def _remove_orphans(folder: Path, owner: str) -> None:
    """Remove temporary shards of tasks on this machine that died without cleaning up (a Ray
    worker can be SIGKILLed, by Ray's memory monitor or with its job, before `finally` runs)."""
    pid_of = re.compile(re.escape(owner) + r"(\d+)-")
    for path in folder.glob(glob.escape(owner) + "*.tmp"):
        match = pid_of.match(path.name)
        if match and not _is_running(int(match.group(1))):
            path.unlink(missing_ok=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc to ask: it answered the signal, so it is there
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited; its files are orphans
