"""Fixtures: a hostile ImageFolder (real digit scans, unusual valid images, every kind of bad
file) and a private copy of the digits."""

from __future__ import annotations

import io
import os
import shutil
import socket
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@dataclass
class Corpus:
    root: Path
    good: set[str] = field(default_factory=set)
    """Relative paths that must end up in the shards."""
    bad: dict[str, str] = field(default_factory=dict)
    """Relative path (as the manifest shows it) → a word its skip reason must contain."""


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width × height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def build_corpus(root: Path, digits: Path) -> Corpus:
    c = Corpus(root)
    jpegs = sorted(digits.glob("*/*.jpg"))
    jpeg = jpegs[0].read_bytes()
    gray = np.asarray(Image.open(jpegs[1]).convert("L"))

    def put(rel: str, data: bytes, good: bool = True) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if good:
            c.good.add(rel)

    # Real digits, so every class has ordinary images too.
    for i, src in enumerate(jpegs[2:14]):
        put(f"{'ab'[i % 2]}/digit{i}.jpg", src.read_bytes())
    # Valid but unusual: all kept.
    put("a/gray.png", encode(Image.fromarray(gray), "PNG"))
    put("a/cmyk.jpg", encode(Image.fromarray(gray).convert("CMYK"), "JPEG"))
    rgba = Image.fromarray(np.dstack([gray] * 3 + [255 - gray]).astype(np.uint8), "RGBA")
    put("a/alpha.png", encode(rgba, "PNG"))
    put("a/palette.png", encode(Image.fromarray(gray).convert("P"), "PNG"))
    put("a/deep16.png", encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"))
    put("a/one.png", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
    put("b/UPPER.JPEG", jpeg)
    put("b/with space.jpg", jpeg)
    put("b/ünïcödé.jpg", jpeg)
    put("b/-leading-dash.jpg", jpeg)
    put("b/new\nline.jpg", jpeg)
    put("b/.hidden.jpg", jpeg)
    put("b/nested/deeper/inner.jpg", jpeg)
    put("b/folder.jpg/inside.png", encode(Image.fromarray(gray), "PNG"))
    os.symlink("digit1.jpg", root / "b/link-to-file.jpg")
    c.good.add("b/link-to-file.jpg")

    # Bad files: each skipped with a reason.
    put("a/truncated.jpg", jpeg[: len(jpeg) // 2], good=False)
    c.bad["a/truncated.jpg"] = "truncated"
    put("a/zero.jpg", b"", good=False)
    c.bad["a/zero.jpg"] = "empty"
    put("a/text.jpg", b"this is not a picture\n" * 20, good=False)
    c.bad["a/text.jpg"] = "not an image"
    put("a/bomb.png", bomb_png(30_000, 30_000), good=False)
    c.bad["a/bomb.png"] = "too many pixels"
    # Over Pillow's default limit but cheap to decode: lets a test raise --max-pixels.
    put("a/big.png", bomb_png(10_000, 10_000), good=False)
    c.bad["a/big.png"] = "too many pixels"
    png = bytearray(encode(Image.fromarray(gray), "PNG"))
    png[-20] ^= 0xFF  # inside the IDAT data: its CRC no longer matches
    put("a/corrupt.png", bytes(png), good=False)
    c.bad["a/corrupt.png"] = "corrupt"
    put("a/notes.txt", b"hello", good=False)
    c.bad["a/notes.txt"] = "not an image extension"
    put("a/.DS_Store", b"\0\0\0\1Bud1", good=False)
    c.bad["a/.DS_Store"] = "not an image extension"
    put("README.txt", b"top-level file", good=False)
    c.bad["README.txt"] = "not inside a class folder"

    os.mkfifo(root / "a/fifo.jpg")
    c.bad["a/fifo.jpg"] = "FIFO"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "a/socket.jpg"))
    sock.close()
    c.bad["a/socket.jpg"] = "socket"
    os.symlink("/dev/null", root / "a/device.jpg")
    c.bad["a/device.jpg"] = "device"
    os.symlink("does-not-exist.jpg", root / "a/dangling.jpg")
    c.bad["a/dangling.jpg"] = "dangling symlink"
    os.symlink("loop2.jpg", root / "a/loop1.jpg")
    os.symlink("loop1.jpg", root / "a/loop2.jpg")
    c.bad["a/loop1.jpg"] = "symlink loop"
    c.bad["a/loop2.jpg"] = "symlink loop"
    (root / "b/nested/deeper").joinpath("up").symlink_to("../..")  # b itself: a loop
    c.bad["b/nested/deeper/up/"] = "already scanned"
    (root / "a/to-src").symlink_to("..")  # SRC: would pull class b into class a
    c.bad["a/to-src/"] = "already scanned"

    bad_name = os.fsencode(str(root / "a")) + b"/caf\xe9.jpg"
    with open(bad_name, "wb") as f:
        f.write(jpeg)
    c.bad["a/caf\\xe9.jpg"] = "not valid UTF-8"

    (root / "empty").mkdir()  # a class with no images keeps its index
    return c


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, digits_dir) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("hostile") / "src", digits_dir)


@pytest.fixture
def small_digits(tmp_path, digits_dir) -> Path:
    """A private copy of the digits, for tests that change the source."""
    dst = tmp_path / "digits"
    shutil.copytree(digits_dir, dst)
    return dst
