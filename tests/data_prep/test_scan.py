"""Walking an ImageFolder and checking each file, without Ray."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torchvision
from PIL import Image

from cluster.errors import UserError
from data_prep.scan import (
    DEFAULT_MAX_PIXELS,
    check_image,
    image_extension,
    scan_source,
    strict_pillow,
)


def test_classes_and_files_match_imagefolder(digits_dir: Path) -> None:
    scan = scan_source(str(digits_dir))
    folder = torchvision.datasets.ImageFolder(str(digits_dir))
    assert scan.classes == folder.classes
    ours = {(str(digits_dir / c.relpath), c.class_index) for c in scan.candidates}
    assert ours == set(folder.samples)
    assert scan.skipped == []


def test_extensions_are_imagefolders_in_any_case() -> None:
    assert image_extension("x.JPG") == "jpg"
    assert image_extension("x.Jpeg") == "jpeg"
    assert image_extension("x.tiff") == "tiff"
    assert image_extension("x.webp") == "webp"
    assert image_extension("x.gif") is None
    assert image_extension(".DS_Store") is None


def test_hostile_tree_is_walked_once(corpus) -> None:
    scan = scan_source(str(corpus.root))
    from torchvision.datasets.folder import find_classes

    assert scan.classes == find_classes(str(corpus.root))[0] == ["a", "b", "empty"]
    found = {c.relpath for c in scan.candidates}
    assert corpus.good <= found
    # The loops are reported, not followed: no path goes through them.
    assert not any("/up/" in p or "/to-src/" in p for p in found)
    skipped = {s.path: s.reason for s in scan.skipped}
    for path in ("a/notes.txt", "a/.DS_Store", "README.txt", "a/caf\\xe9.jpg"):
        assert path in skipped
    assert skipped["a/caf\\xe9.jpg"] == "file name is not valid UTF-8: rename it"
    assert "already scanned" in skipped["b/nested/deeper/up/"]


def _check(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, int] | str:
    # A FIFO opened for reading blocks forever: fail the test instead of hanging it.
    def hung(*_: object) -> None:
        raise TimeoutError(f"checking {path} hung")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with strict_pillow():
            return check_image(str(path), max_pixels)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_every_bad_file_gets_a_reason(corpus) -> None:
    for rel, word in corpus.bad.items():
        if rel.endswith("/") or word in ("not an image extension", "not inside a class folder"):
            continue
        if "\\x" in rel:
            continue  # found by the walk; the name cannot be opened as text
        result = _check(corpus.root / rel)
        assert isinstance(result, str), rel
        assert word in result, (rel, result)


def test_unusual_valid_images_pass(corpus) -> None:
    for rel in corpus.good:
        result = _check(corpus.root / rel)
        assert not isinstance(result, str), (rel, result)
        with Image.open(corpus.root / rel) as img:
            assert result[:2] == img.size
        assert result[2] == (corpus.root / rel).stat().st_size


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("progressive", [False, True])
def test_truncation_found_despite_draft_decoding(tmp_path: Path, fraction, progressive) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.random((240, 320, 3)) * 255).astype(np.uint8))
    path = tmp_path / "x.jpg"
    img.save(path, "JPEG", quality=90, progressive=progressive)
    assert _check(path) == (320, 240, path.stat().st_size)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    assert "truncated" in str(_check(path))


def test_max_pixels_is_read_from_the_header(corpus) -> None:
    one = corpus.root / "a/gray.png"
    w, h, _ = _check(one)
    assert "too many pixels" in str(_check(one, max_pixels=w * h - 1))
    assert not isinstance(_check(one, max_pixels=w * h), str)
    assert "too many pixels" in str(_check(corpus.root / "a/bomb.png"))
    # Above Pillow's own limit, --max-pixels decides, not Pillow's global default.
    big = corpus.root / "a/big.png"
    assert "too many pixels" in str(_check(big))
    assert _check(big, max_pixels=10**8)[:2] == (10_000, 10_000)
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS  # restored afterwards


def test_unreadable_file(tmp_path: Path, digits_dir: Path) -> None:
    """`.ci/run` also runs this with root's file-permission override dropped (setpriv)."""
    path = tmp_path / "locked.jpg"
    path.write_bytes(next(digits_dir.glob("*/*.jpg")).read_bytes())
    path.chmod(0)
    try:
        path.read_bytes()
        pytest.skip("this process reads files whatever their mode (root with CAP_DAC_OVERRIDE)")
    except PermissionError:
        pass
    assert "permission denied" in str(_check(path))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("x"), "not a directory"),
        (lambda p: (p.mkdir(), (p / "loose.jpg").write_text("x")), "no class folders"),
    ],
)
def test_unusable_source_is_a_user_error(tmp_path: Path, make, message) -> None:
    src = tmp_path / "src"
    make(src)
    with pytest.raises(UserError, match=message):
        scan_source(str(src))
