"""The shards prep may delete in DST: those it wrote, and nothing a user put there.

Before its tasks write anything, prep records in DST's ledger every shard name it is about to
write and every name the manifest already there names (tasks may remove that manifest before
it is replaced). After the new manifest is written, the ledger's names the manifest does not
name are removed, then the ledger. A killed run leaves its ledger, so the next run still
knows what the killed one wrote; a file the user named `train-000009.tar` is never touched.

    known = record_shards(dst, names)      # before writing shards
    remove_stale_shards(dst, known, keep)  # after writing the manifest
"""

from __future__ import annotations

import json

from cluster import storage
from cluster.errors import UserError
from data_prep.contract import SHARD_NAME, read_manifest

LEDGER_NAME = ".metatrainer-prep-shards.json"


def record_shards(dst: str, names: set[str]) -> set[str]:
    """Add `names` and the present manifest's shard names to DST's ledger; returns them all."""
    known = names | _ledger(dst) | _manifest_names(dst)
    storage.write_bytes(ledger_url(dst), json.dumps({"shards": sorted(known)}).encode())
    return known


def remove_stale_shards(dst: str, known: set[str], keep: set[str]) -> list[str]:
    """Remove the shards in `known` that are not in `keep`, then the ledger; returns them."""
    stale = sorted(known - keep)
    for name in stale:
        storage.remove(storage.join(dst, name))
    storage.remove(ledger_url(dst))
    return stale


def ledger_url(dst: str) -> str:
    return storage.join(dst, LEDGER_NAME)


def _ledger(dst: str) -> set[str]:
    """The names a killed run recorded (only names prep gives shards: the file is input)."""
    url = ledger_url(dst)
    if not storage.exists(url):
        return set()
    try:
        names = json.loads(storage.read_bytes(url))["shards"]
    except (ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and SHARD_NAME.fullmatch(n)}


def _manifest_names(dst: str) -> set[str]:
    try:
        manifest = read_manifest(dst)
    except UserError:  # none there, or unreadable: it names nothing prep can trust
        return set()
    return {shard.name for shards in manifest.splits.values() for shard in shards}
