"""The data contract: `manifest.json`, written last, is the only thing readers open.

It names every shard of every split with its sample count, size and sha256, the class list
(torchvision ImageFolder's order), and every source file that was skipped and why. It holds no
timestamps, so the same input always gives a byte-identical manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from cluster import storage
from cluster.errors import UserError

FORMAT = "metatrainer-webdataset"
VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Shard:
    name: str
    """File name relative to the dataset location, e.g. `train-000000.tar`."""
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Skipped:
    path: str
    """Path relative to the source directory (non-UTF-8 bytes escaped as \\xNN)."""
    reason: str


@dataclass
class Manifest:
    classes: list[str]
    splits: dict[str, list[Shard]]
    skipped: list[Skipped] = field(default_factory=list)
    seed: int = 1234
    format: str = FORMAT
    version: int = VERSION

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self.shards(split))

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits:
            have = ", ".join(sorted(self.splits)) or "none"
            raise UserError(f"the dataset has no split {split!r} (it has: {have})")
        return self.splits[split]

    def to_json(self) -> bytes:
        doc = {
            "format": self.format,
            "version": self.version,
            "seed": self.seed,
            "classes": self.classes,
            "splits": {
                name: {
                    "num_samples": sum(s.num_samples for s in shards),
                    "shards": [asdict(s) for s in shards],
                }
                for name, shards in self.splits.items()
            },
            "skipped": [asdict(s) for s in self.skipped],
        }
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "manifest") -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise UserError(f"{where} is not a {FORMAT} manifest")
            if doc.get("version") != VERSION:
                raise UserError(
                    f"{where} has format version {doc.get('version')}; this metatrainer reads "
                    f"version {VERSION}: prepare the data again with this version"
                )
            return cls(
                classes=list(doc["classes"]),
                splits={
                    name: [Shard(**s) for s in split["shards"]]
                    for name, split in doc["splits"].items()
                },
                skipped=[Skipped(**s) for s in doc.get("skipped", [])],
                seed=int(doc["seed"]),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{where} is damaged ({type(e).__name__}: {e}); run prep again"
            ) from None


def manifest_url(dataset: str) -> str:
    return storage.join(dataset, MANIFEST_NAME)


def read_manifest(dataset: str) -> Manifest:
    url = manifest_url(dataset)
    if not storage.exists(url):
        raise UserError(
            f"{dataset} holds no {MANIFEST_NAME}: prepare it first with `metatrainer prep SRC "
            f"{dataset}`"
        )
    return Manifest.from_json(storage.read_bytes(url), where=url)


def write_manifest(dataset: str, manifest: Manifest) -> None:
    """Atomic, and by convention the last write of a prep run."""
    storage.write_bytes(manifest_url(dataset), manifest.to_json())
