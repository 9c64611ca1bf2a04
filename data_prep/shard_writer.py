"""`ShardWriter`: byte-deterministic WebDataset tar files.

A sample is three members in this order: `<key>.<ext>` (the source image bytes, never
re-encoded), `<key>.cls` (the class index as ASCII digits) and `<key>.json` (source path, class
name, width, height). Every header field that could vary between runs or machines (mtime,
owner, mode) is fixed, so the same samples always give the same bytes and the same sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from types import TracebackType
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE

# ustar: the oldest format every tar reader knows. Our member names are short ASCII
# (`<24 hex>.<ext>`), so no pax or GNU extension headers are ever needed.
_FORMAT = tarfile.USTAR_FORMAT


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


class _HashingFile:
    """Passes writes through to `f`, counting bytes and hashing them on the way."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Write samples into one tar on an open binary file; `close()` returns (bytes, sha256).

    with storage.open_write(url) as f, ShardWriter(f) as shard:
        shard.write_sample(key, "jpg", image, 3, meta_json)
    size, sha256 = shard.size, shard.sha256
    """

    def __init__(self, f: BinaryIO) -> None:
        self._out = _HashingFile(f)
        self._tar = tarfile.open(fileobj=self._out, mode="w", format=_FORMAT)  # type: ignore[call-overload]
        self.num_samples = 0
        self.size = 0
        self.sha256 = ""

    def write_sample(
        self, key: str, ext: str, image: bytes, class_index: int, meta_json: bytes
    ) -> None:
        assert "." not in key and "/" not in key, key
        self._add(f"{key}.{ext}", image)
        self._add(f"{key}.cls", str(class_index).encode("ascii"))
        self._add(f"{key}.json", meta_json)
        self.num_samples += 1

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> tuple[int, str]:
        if not self.sha256:
            self._tar.close()  # writes the end-of-archive blocks and pads to a full record
            self.size, self.sha256 = self._out.size, self._out.sha256.hexdigest()
        return self.size, self.sha256

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # On an error the caller's atomic open_write discards the file; no need to finish it.
        if exc_type is None:
            self.close()
