"""The data contract, in one place: what prep writes and training reads.

- **Shards** are `<split>-NNNNNN.tar`, ustar archives any tar or webdataset reader can read. A
  sample is three members in this order: `<key>.<ext>` (the source image bytes, never
  re-encoded), `<key>.cls` (the class index as ASCII digits, torchvision ImageFolder's) and
  `<key>.json` (source path, class name, width, height).
- **`manifest.json`**, written last, is the only thing readers open: the class list, every
  shard of every split with its sample count, size, sha256 and `index` (the byte size of each of
  its samples, so a reader can fetch any run of samples with one ranged read), and every source
  file that was skipped and why. It holds no timestamps, so the same input always gives a
  byte-identical manifest. A manifest is untrusted input: names, hashes and indexes are checked
  when it is read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import tarfile
from dataclasses import asdict, dataclass, field
from functools import cached_property

import numpy as np

from cluster import storage
from cluster.errors import UserError

FORMAT = "metatrainer-webdataset"
VERSION = 2
"""2: shards carry a sample index (version 1 had none)."""
MANIFEST_NAME = "manifest.json"
META_SUFFIXES = ("cls", "json")
"""The members of a sample after its image, in this order."""
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
SHARD_NAME = re.compile(r"[A-Za-z0-9_]+-[0-9]{6}\.tar")
"""Names prep gives shards (`shard_name`): what a manifest may name and stale cleanup removes."""
SHA256 = re.compile(r"[0-9a-f]{64}")
"""A shard's sha256 as the manifest gives it (it names cache files: nothing else passes)."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(relpath: str) -> str:
    """A stable, dot-free id: webdataset splits a member name at the first dot of its basename."""
    return hashlib.sha256(relpath.encode()).hexdigest()[:24]


def sample_json(relpath: str, class_name: str, width: int, height: int) -> bytes:
    doc = {"path": relpath, "class": class_name, "width": width, "height": height}
    return json.dumps(doc, ensure_ascii=False).encode()


def member_bytes(size: int) -> int:
    """Bytes one member of `size` bytes takes in the tar: a header block plus padded data."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def sample_bytes(image_size: int, class_index: int, json_size: int) -> int:
    """Bytes one sample takes in the tar (its three members)."""
    cls_size = len(str(class_index))
    return member_bytes(image_size) + member_bytes(cls_size) + member_bytes(json_size)


def archive_bytes(members_total: int) -> int:
    """File size of a tar whose members take `members_total` bytes (end blocks, record pad)."""
    return -(-(members_total + 2 * BLOCK) // RECORD) * RECORD


def encode_index(sample_sizes: list[int]) -> str:
    """The manifest's `index` of a shard: its samples' byte sizes as base64 little-endian uint32
    (compact: 5⅓ characters a sample, where a JSON list of offsets takes twice that)."""
    return base64.b64encode(np.asarray(sample_sizes, dtype="<u4").tobytes()).decode("ascii")


@dataclass(frozen=True)
class Sample:
    """One sample as stored: the image's bytes (still compressed) and its label."""

    key: str
    image: bytes
    label: int


def parse_samples(data: bytes, count: int, where: str) -> list[Sample]:
    """The `count` samples in `data`, a run of whole samples cut from a shard by its index."""
    samples, pos = [], 0
    try:
        for _ in range(count):
            members = []
            for _ in range(1 + len(META_SUFFIXES)):
                info = tarfile.TarInfo.frombuf(data[pos : pos + BLOCK], "utf-8", "strict")
                start = pos + BLOCK
                members.append((info.name, data[start : start + info.size]))
                pos = start + -(-info.size // BLOCK) * BLOCK
            samples.append(_sample(members))
    except (tarfile.TarError, UnicodeDecodeError, ValueError) as e:
        raise UserError(
            f"{where} does not hold the samples its manifest indexes ({e}): the "
            "shard changed after prep; run prep again"
        ) from None
    if pos != len(data):
        raise UserError(f"{where} does not match its manifest's index; run prep again")
    return samples


def _sample(members: list[tuple[str, bytes]]) -> Sample:
    (image_name, image), *meta = members
    key = image_name.split(".", 1)[0]
    expected = [f"{key}.{suffix}" for suffix in META_SUFFIXES]
    if "." not in image_name or [name for name, _ in meta] != expected:
        raise ValueError(f"members {[n for n, _ in members]} are not one metatrainer sample")
    return Sample(key, image, int(meta[0][1]))


@dataclass(frozen=True)
class Shard:
    name: str
    """File name relative to the dataset location, e.g. `train-000000.tar`."""
    num_samples: int
    bytes: int
    sha256: str
    index: str = ""
    """Each sample's size in bytes (see `encode_index`)."""

    @cached_property
    def offsets(self) -> np.ndarray:
        """Byte offset of each sample, and of the end of the last (num_samples + 1 entries)."""
        sizes = np.frombuffer(base64.b64decode(self.index, validate=True), dtype="<u4")
        return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def check(self) -> None:
        """Raise ValueError unless the entry is safe to use (names, hash, index agree)."""
        if not SHARD_NAME.fullmatch(self.name):
            raise ValueError(f"shard name {self.name!r} is not <split>-NNNNNN.tar")
        if not SHA256.fullmatch(self.sha256):
            raise ValueError(f"shard {self.name} has no valid sha256")
        try:
            offsets = self.offsets
        except (binascii.Error, ValueError):
            raise ValueError(f"shard {self.name} has a damaged index") from None
        sizes = np.diff(offsets)
        if (
            len(sizes) != self.num_samples
            or (sizes % BLOCK).any()
            or (sizes < 3 * BLOCK).any()
            or archive_bytes(int(offsets[-1])) != self.bytes
        ):
            raise ValueError(f"shard {self.name}: its index does not match its size")


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

    def digest(self) -> str:
        """sha256 of the manifest's canonical form: changes when prep writes other data."""
        return hashlib.sha256(self.to_json()).hexdigest()

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
            manifest = cls(
                classes=list(doc["classes"]),
                splits={
                    name: [Shard(**s) for s in split["shards"]]
                    for name, split in doc["splits"].items()
                },
                skipped=[Skipped(**s) for s in doc.get("skipped", [])],
                seed=int(doc["seed"]),
            )
            for shards in manifest.splits.values():
                for shard in shards:
                    shard.check()
            return manifest
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
