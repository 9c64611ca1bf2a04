"""`ShardWriter`: byte-deterministic WebDataset tar files in the layout of `data_prep.contract`.

Every header field that could vary between runs or machines (mtime, owner, mode) is fixed, so
the same samples always give the same bytes and the same sha256. The writer records each
sample's size for the manifest's index.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from types import TracebackType
from typing import BinaryIO

from data_prep.contract import META_SUFFIXES, encode_index

# ustar: the oldest format every tar reader knows. Our member names are short ASCII
# (`<24 hex>.<ext>`), so no pax or GNU extension headers are ever needed.
_FORMAT = tarfile.USTAR_FORMAT


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
        self.sample_sizes: list[int] = []
        self.size = 0
        self.sha256 = ""

    def write_sample(
        self, key: str, ext: str, image: bytes, class_index: int, meta_json: bytes
    ) -> None:
        assert "." not in key and "/" not in key, key
        start = self._out.size
        self._add(f"{key}.{ext}", image)
        cls, meta = META_SUFFIXES
        self._add(f"{key}.{cls}", str(class_index).encode("ascii"))
        self._add(f"{key}.{meta}", meta_json)
        self.sample_sizes.append(self._out.size - start)

    @property
    def num_samples(self) -> int:
        return len(self.sample_sizes)

    @property
    def index(self) -> str:
        return encode_index(self.sample_sizes)

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
