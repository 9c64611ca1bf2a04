"""Bench and test data from real photos: an ImageNet-like ImageFolder, and its prepared shards.

    .venv/bin/python bench/photos.py /tmp/photos --count 2000
    .venv/bin/python bench/photos.py /tmp/photos --count 2000 --size 500x375 --shards
    python3 bench/photos.py /tmp/photos --count 2000 --photos ./sample-photos

The images are random crops (60-100 % of the side), zooms and horizontal flips of real
photographs, never noise, so JPEG sizes and decode costs are those of photos: by default
scikit-learn's two bundled sample images (china.jpg, flower.jpg, 640x427), or the .jpg files of
`--photos DIR` on a machine without scikit-learn (`copy_sample_photos` makes such a folder).
Everything is a function of the seed. `--shards` also writes DST-shards, a prepared dataset
(all samples in split "train") built the way `metatrainer prep` builds one, without Ray.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLE_PHOTOS = ("china.jpg", "flower.jpg")
SEED = 1234
"""`metatrainer prep`'s default seed: the shards' order is the one prep would give."""
NO_PHOTOS = "scikit-learn is not installed: pass --photos DIR (a folder of .jpg photos)"


def _sklearn_images_dir() -> Path | None:
    try:
        import sklearn
    except ImportError:
        return None
    return Path(sklearn.__file__).parent / "datasets" / "images"


def _load_sources(photos: str | Path | None) -> list[Image.Image]:
    """The photos to cut images from, as RGB images, in a fixed (sorted) order."""
    if photos is not None:
        files = sorted(p for p in Path(photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        if not files:
            raise SystemExit(f"{photos} holds no .jpg files")
    else:
        folder = _sklearn_images_dir()
        if folder is None:
            raise SystemExit(NO_PHOTOS)
        files = [folder / name for name in SAMPLE_PHOTOS]
    sources = []
    for path in files:
        with Image.open(path) as img:
            sources.append(img.convert("RGB"))
    return sources


def _variant(source: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random crop of `source` in the aspect ratio of `size`, zoomed to `size`, maybe flipped."""
    width, height = size
    aspect = width / height
    full_w = min(source.width, source.height * aspect)
    scale = rng.uniform(0.6, 1.0)
    crop_w, crop_h = full_w * scale, full_w * scale / aspect
    left = rng.uniform(0, source.width - crop_w)
    top = rng.uniform(0, source.height - crop_h)
    box = (left, top, left + crop_w, top + crop_h)
    img = source.resize(size, Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def write_photo_folder(
    dst: str | Path,
    count: int,
    classes: int = 10,
    size: tuple[int, int] = (500, 375),
    seed: int = 0,
    quality: int = 90,
    photos: str | None = None,
) -> Path:
    """Write `dst/<class>/<i>.jpg`, `count` JPEGs of `size` (width, height); class = i % classes.

    Cut from scikit-learn's sample photos, or from the .jpg files in `photos` when given.
    """
    sources = _load_sources(photos)
    rng = np.random.default_rng(seed)
    dst = Path(dst)
    digits = len(str(max(count - 1, 0)))
    names = [f"class{c:0{len(str(classes - 1))}d}" for c in range(classes)]
    for name in names:
        (dst / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        source = sources[int(rng.integers(len(sources)))]
        img = _variant(source, size, rng)
        img.save(dst / names[i % classes] / f"{i:0{digits}d}.jpg", quality=quality)
    return dst


def write_shards(
    folder: str | Path, dst: str | Path, shard_samples: int = 1000, seed: int = SEED
) -> Path:
    """Prepare the ImageFolder `folder` into `dst` (shards + manifest.json, split "train") as
    `metatrainer prep --splits train=1 --num-shards ceil(N / shard_samples)` would, without Ray:
    files found and checked by prep's own scan, shuffled by prep's seeded order, written with
    `ShardWriter` and indexed in the manifest by `data_prep.contract`."""
    # Imported here: they need boto3 (through cluster.storage), the photos above do not.
    from cluster import storage
    from cluster.errors import UserError
    from data_prep import splits
    from data_prep.contract import (
        MANIFEST_NAME,
        SHARD_NAME,
        Manifest,
        Shard,
        sample_json,
        sample_key,
        shard_name,
        write_manifest,
    )
    from data_prep.scan import DEFAULT_MAX_PIXELS, ValidImage, scan_source, validate_files
    from data_prep.shard_writer import ShardWriter

    if shard_samples < 1:
        raise ValueError(f"shard_samples must be at least 1, not {shard_samples}")
    src = str(Path(folder).resolve())
    out = storage.normalize(str(dst))
    if not storage.is_s3(out) and Path(src) in [Path(out).resolve(), *Path(out).resolve().parents]:
        raise UserError(f"{dst} is inside {folder}: choose a destination outside it")
    scan = scan_source(src)
    checked = validate_files(src, scan.candidates, DEFAULT_MAX_PIXELS)
    images = [c for c in checked if isinstance(c, ValidImage)]
    skipped = sorted(
        [*scan.skipped, *(c for c in checked if not isinstance(c, ValidImage))],
        key=lambda s: (s.path, s.reason),
    )
    if not images:
        raise UserError(f"{src} has no valid images")
    order = splits.shuffle_order([im.relpath for im in images], seed)
    ordered = [images[i] for i in order]
    ranges = splits.plan_by_count(len(ordered), math.ceil(len(ordered) / shard_samples))

    # As prep: no manifest may name bytes being replaced, and it is written last.
    storage.remove(storage.join(out, MANIFEST_NAME))
    storage.clean_partial_writes(out)
    shards = []
    for index, r in enumerate(ranges):
        name = shard_name("train", index)
        with storage.open_write(storage.join(out, name)) as f, ShardWriter(f) as writer:
            for im in ordered[r.start : r.stop]:
                data = (Path(src) / im.relpath).read_bytes()
                cls = scan.classes[im.class_index]
                meta = sample_json(im.relpath, cls, im.width, im.height)
                writer.write_sample(sample_key(im.relpath), im.ext, data, im.class_index, meta)
        shards.append(Shard(name, writer.num_samples, writer.size, writer.sha256, writer.index))
    manifest = Manifest(scan.classes, {"train": shards}, skipped=skipped, seed=seed)
    write_manifest(out, manifest)
    for name in storage.list_dir(out):
        if SHARD_NAME.fullmatch(name) and name not in {s.name for s in shards}:
            storage.remove(storage.join(out, name))  # an earlier run's, no longer named
    return Path(dst)


def copy_sample_photos(dst: str | Path) -> None:
    """Copy scikit-learn's sample photos into `dst`, for `--photos` on a machine without it."""
    folder = _sklearn_images_dir()
    if folder is None:
        raise SystemExit("copy_sample_photos needs scikit-learn installed")
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_PHOTOS:
        shutil.copyfile(folder / name, Path(dst) / name)


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or not int(width) * int(height):
        raise argparse.ArgumentTypeError(f"bad size {text!r}: write WIDTHxHEIGHT, e.g. 500x375")
    return int(width), int(height)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dst", help="the ImageFolder directory to write")
    parser.add_argument("--count", type=int, required=True, help="number of images")
    parser.add_argument("--size", type=_size, default=(500, 375), help="WIDTHxHEIGHT")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--photos", help="a folder of .jpg photos to use instead of sklearn's")
    parser.add_argument("--shards", action="store_true", help="also write DST-shards")
    parser.add_argument("--shard-samples", type=int, default=1000)
    args = parser.parse_args()
    folder = write_photo_folder(
        args.dst, args.count, args.classes, args.size, args.seed, photos=args.photos
    )
    print(f"wrote {args.count} images of {args.size[0]}x{args.size[1]} to {folder}")
    if args.shards:
        shards = folder.with_name(folder.name + "-shards")
        write_shards(folder, shards, args.shard_samples)
        print(f"wrote shards and manifest.json to {shards}")


if __name__ == "__main__":
    main()
