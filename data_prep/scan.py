"""Find the images of an ImageFolder directory and check every one of them.

`scan_source` walks SRC on the driver, the way `torchvision.datasets.ImageFolder` does (sorted
class folders, files with one of its extensions, symlinks followed), so class indices agree with
it. `validate_files` then checks a chunk of files, in a Ray task: every file is fully decoded,
because a truncated image is only found by decoding it to the end.

Nothing bad is fatal here: a file that cannot be used is returned as `Skipped` with a reason a
person can act on. The whole source is a `UserError` only when it is not an ImageFolder at all.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache

from PIL import Image, ImageFile, UnidentifiedImageError

from cluster.errors import UserError
from data_prep.contract import Skipped

# Pillow's own default; --max-pixels replaces it.
DEFAULT_MAX_PIXELS = 89_478_485

NOT_IMAGE_EXTENSION = "not an image extension"
NOT_UTF8_FILE = "file name is not valid UTF-8: rename it"
NOT_UTF8_DIR = "directory name is not valid UTF-8: rename it"


@dataclass(frozen=True)
class Candidate:
    """A file ImageFolder would load, not yet checked."""

    relpath: str
    class_index: int
    ext: str
    """The matching extension, lowercased, without the dot (`jpg`, `png`, ...)."""


@dataclass(frozen=True)
class ValidImage:
    relpath: str
    class_index: int
    ext: str
    width: int
    height: int
    size: int
    """File size in bytes when it was checked (the shard writer reads it again)."""


@dataclass
class SourceScan:
    classes: list[str]
    candidates: list[Candidate]
    skipped: list[Skipped] = field(default_factory=list)


def display_path(relpath: str) -> str:
    """The path as valid text: bytes that are not UTF-8 are shown as \\xNN escapes."""
    return os.fsencode(relpath).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    # os.scandir turns undecodable bytes into lone surrogates, which UTF-8 cannot encode.
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@cache
def _img_extensions() -> tuple[str, ...]:
    # Imported here, not at the top: it pulls in torch, which the checking tasks never need
    # (each Ray worker would pay seconds to import it).
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(IMG_EXTENSIONS)


def image_extension(name: str) -> str | None:
    """ImageFolder's rule: the name ends with one of its extensions, in any case."""
    lower = name.lower()
    for ext in _img_extensions():
        if lower.endswith(ext):
            return ext[1:]
    return None


def os_error_reason(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symlink loop (too many levels of symbolic links)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied: make it readable"
    return f"cannot read it: {e.strerror or e}"


def scan_source(src: str) -> SourceScan:
    """Classes and candidate files of the ImageFolder at `src` (an absolute path)."""
    top = _list_source(src)
    classes: list[str] = []
    skipped: list[Skipped] = []
    for entry in top:
        try:
            is_dir = entry.is_dir()
        except OSError as e:
            skipped.append(Skipped(display_path(entry.name), os_error_reason(e)))
            continue
        if not is_dir:
            skipped.append(Skipped(display_path(entry.name), "not inside a class folder"))
        elif not _is_utf8(entry.name):
            raise UserError(
                f"class folder {display_path(entry.name)!r} in {src} is not a valid UTF-8 "
                "name: rename it"
            )
        else:
            classes.append(entry.name)
    if not classes:
        raise UserError(
            f"{src} has no class folders: put the images in SRC/<class name>/<image>, "
            "the layout of torchvision's ImageFolder"
        )
    root = os.stat(src)
    candidates: list[Candidate] = []
    for index, name in enumerate(classes):
        _walk_class(src, (root.st_dev, root.st_ino), name, index, candidates, skipped)
    return SourceScan(classes, candidates, skipped)


def _list_source(src: str) -> list[os.DirEntry[str]]:
    try:
        st = os.stat(src)
    except FileNotFoundError:
        raise UserError(f"{src} does not exist: give the ImageFolder directory as SRC") from None
    except OSError as e:
        raise UserError(f"cannot read {src}: {os_error_reason(e)}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UserError(
            f"{src} is not a directory: SRC must be an ImageFolder directory "
            "(SRC/<class name>/<image>)"
        )
    try:
        with os.scandir(src) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"cannot list {src}: {os_error_reason(e)}") from None


def _walk_class(
    src: str,
    root_id: tuple[int, int],
    name: str,
    index: int,
    candidates: list[Candidate],
    skipped: list[Skipped],
) -> None:
    """Depth-first, sorted, following directory symlinks like ImageFolder's os.walk.

    Unlike os.walk, a directory reached a second time (a symlink to an ancestor, or two links
    to one place) is not entered again: a loop would never end, a duplicate would put the same
    images in the sample list twice. SRC itself counts as reached, so a link back to it cannot
    pull the other classes' images into this one.
    """
    try:
        st = os.stat(os.path.join(src, name))
    except OSError as e:
        skipped.append(Skipped(display_path(name) + "/", os_error_reason(e)))
        return
    visited = {root_id, (st.st_dev, st.st_ino)}
    stack = [name]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(src, rel_dir)) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append(Skipped(display_path(rel_dir) + "/", os_error_reason(e)))
            continue
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}"
            try:
                # Both follow symlinks; a dangling one is not a directory.
                st = entry.stat() if entry.is_dir() else None
                dir_id = None if st is None else (st.st_dev, st.st_ino)
            except OSError as e:
                skipped.append(Skipped(display_path(rel), os_error_reason(e)))
                continue
            if dir_id is not None:
                if not _is_utf8(entry.name):
                    skipped.append(Skipped(display_path(rel) + "/", NOT_UTF8_DIR))
                elif dir_id in visited:
                    skipped.append(
                        Skipped(
                            display_path(rel) + "/",
                            "directory already scanned through another path "
                            "(a symlink loop or a second link): not followed",
                        )
                    )
                else:
                    visited.add(dir_id)
                    subdirs.append(rel)
                continue
            ext = image_extension(entry.name)
            if ext is None:
                skipped.append(Skipped(display_path(rel), NOT_IMAGE_EXTENSION))
            elif not _is_utf8(entry.name):
                skipped.append(Skipped(display_path(rel), NOT_UTF8_FILE))
            else:
                candidates.append(Candidate(rel, index, ext))
        stack.extend(reversed(subdirs))


@contextmanager
def strict_pillow() -> Iterator[None]:
    """Pillow settings for checking: our --max-pixels check, truncated files are errors.

    Pillow's MAX_IMAGE_PIXELS is process-global and would reject images below a larger
    --max-pixels, so it is switched off while we check, and restored afterwards.
    """
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def validate_files(
    src: str, candidates: list[Candidate], max_pixels: int
) -> list[ValidImage | Skipped]:
    """Check a chunk of files; one result per candidate, in order."""
    results: list[ValidImage | Skipped] = []
    with strict_pillow():
        for c in candidates:
            checked = check_image(os.path.join(src, c.relpath), max_pixels)
            if isinstance(checked, str):
                results.append(Skipped(c.relpath, checked))
            else:
                width, height, size = checked
                results.append(ValidImage(c.relpath, c.class_index, c.ext, width, height, size))
    return results


def check_image(path: str, max_pixels: int) -> tuple[int, int, int] | str:
    """(width, height, file size) of a usable image, or why it cannot be used."""
    data = read_regular_file(path)
    if isinstance(data, str):
        return data
    decoded = _decode(data, max_pixels)
    if isinstance(decoded, str):
        return decoded
    return (*decoded, len(data))


def read_regular_file(path: str) -> bytes | str:
    """The bytes of a non-empty regular file, or why not. Never blocks on a FIFO or device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return "dangling symlink (its target does not exist)"
        return "file disappeared while prep was running"
    except OSError as e:
        return os_error_reason(e)
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({_file_kind(st.st_mode)})"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    try:
        # O_NONBLOCK: if the file was swapped for a FIFO since the stat, open must not hang.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return os_error_reason(e)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            return f"not a regular file ({_file_kind(mode)})"
        try:
            data = f.read()
        except OSError as e:
            return os_error_reason(e)
    return data if data else "empty file (0 bytes)"


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ]
    return next((kind for test, kind in kinds if test(mode)), "not a plain file")


def _decode(data: bytes, max_pixels: int) -> tuple[int, int] | str:
    """Decode fully, the way a training loader would; (width, height) or why it failed."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            # The header alone gives the size: refuse before a single pixel is allocated.
            if width * height > max_pixels:
                return (
                    f"too many pixels ({width}x{height} = {width * height:,} is over "
                    f"--max-pixels {max_pixels:,}): a possible decompression bomb"
                )
            if img.format == "JPEG":
                # Decoding at 1/8 scale still reads every entropy-coded byte, so truncation
                # and corrupt data are still found, at a fraction of the cost.
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
            img.convert("RGB")  # what ImageFolder's loader does with every image
    except UnidentifiedImageError:
        return "not an image (Pillow cannot identify its format)"
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"too many pixels ({e}): a possible decompression bomb"
    except OSError as e:
        if "truncated" in str(e):
            return "truncated image (the data ends before the image does)"
        return f"corrupt image ({e})"
    except Exception as e:  # Pillow's plugins raise SyntaxError, ValueError, struct.error, ...
        return f"corrupt image ({type(e).__name__}: {e})"
    if width < 1 or height < 1:
        return "corrupt image (it has no pixels)"
    return width, height
