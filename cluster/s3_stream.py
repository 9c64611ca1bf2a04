"""Streamed reads of S3 objects with bounded read-ahead, for readers that want a file object
(webdataset pipelines through `storage.open_read`); training reads ranges
(`s3_objects.read_range`).
"""

from __future__ import annotations

import io
import queue
import threading
from typing import BinaryIO

from cluster import s3, s3_objects
from cluster.errors import UserError

CHUNK = 8 * 2**20
"""Bytes per ranged GET of a streaming read; each chunk is retried on its own."""
READ_AHEAD = 4
"""Chunks a streaming read fetches ahead of the reader (bounds its memory)."""


class StreamReader(io.RawIOBase):
    """A read-only stream of an S3 object: ranged GETs of CHUNK bytes fetched by a background
    thread at most READ_AHEAD chunks ahead, each chunk retried on its own if cut off."""

    def __init__(self, url: str, size: int | None = None) -> None:
        super().__init__()
        self.url = url
        self.bucket, self.key = s3.split(url)
        info = None if size is not None else s3_objects.head(url)
        if size is None and info is None:
            raise UserError(f"{url} does not exist")
        self.size = size if size is not None else int(info["ContentLength"])
        self._chunks: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
        self._stop = threading.Event()
        self._buffer = memoryview(b"")
        self._thread = threading.Thread(target=self._fetch, daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        offset = 0
        try:
            while offset < self.size and not self._stop.is_set():
                end = min(offset + CHUNK, self.size) - 1
                data = self._get(offset, end)
                offset += len(data)
                self._put(data)
            self._put(b"")
        except Exception as e:  # noqa: BLE001 - handed to the reader, raised there
            self._put(e)

    def _get(self, start: int, end: int) -> bytes:
        return s3_objects.read_range(self.url, start, end + 1)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if not self._buffer:
            item = self._chunks.get()
            if isinstance(item, Exception) or not item:
                self._chunks.put(item)  # the fetcher is done: hand EOF or the error on
            if isinstance(item, Exception):
                raise item
            if not item:
                return 0
            self._buffer = memoryview(item)
        n = min(len(b), len(self._buffer))
        b[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        super().close()


def open_stream(url: str, size: int | None = None) -> BinaryIO:
    return io.BufferedReader(StreamReader(url, size), buffer_size=2**20)
