"""`metatrainer predict`: class names and probabilities of image files, from a checkpoint.

    metatrainer predict --checkpoint ./runs/flowers-1 photo.jpg ./more-photos/ --top-k 3
    metatrainer predict --checkpoint s3://bucket/runs/flowers-1 ./photos --json > preds.jsonl

An image goes through exactly the steps it would take through prep and evaluation: prep's
checks (`data_prep.scan.check_image`: a full decode, --max-pixels, truncated or unidentifiable
files refused, with prep's reason), then the evaluation decode of its unchanged bytes
(`training.data.decode.decode_cpu`: any mode prep accepts — CMYK, LA, P, 16-bit — to 8-bit RGB; EXIF
orientation is not applied, as prep stores the bytes as they are and training never applies it)
and centre crop (`eval_center` of the checkpoint's weights) at the checkpoint's image size. So
predicting a split's source files gives the accuracy `metatrainer evaluate` gives on its shards.

A file that cannot be used gets its reason in its row and the others are still predicted; the
exit status is then 1 (0 when every row has a prediction, 2 for a one-line `UserError`). No Ray:
one process, batches on the GPU when there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from cluster.errors import UserError
from data_prep.scan import (
    DEFAULT_MAX_PIXELS,
    check_image,
    display_path,
    image_extension,
    read_regular_file,
    strict_pillow,
)

if TYPE_CHECKING:
    import torch

    from training.model.network import MetaModel

# torch is imported where it is used: `build_parser` imports this module for every command,
# and `metatrainer --help` should not wait seconds for torch.

PATH_WIDTH = 60
"""Widest path column of the table; longer paths push their row's predictions right."""


@dataclass(frozen=True)
class Prediction:
    """One row: the top classes of an image, most probable first, or why it has none."""

    path: str
    top: list[tuple[str, float]]
    error: str | None = None

    def to_json(self) -> str:
        if self.error is not None:
            return json.dumps({"path": self.path, "error": self.error}, ensure_ascii=False)
        top = [{"class": c, "probability": p} for c, p in self.top]
        return json.dumps({"path": self.path, "top_k": top}, ensure_ascii=False)

    def to_row(self, width: int, cell: int) -> str:
        """The table row: the path in `width` columns, each class in `cell` columns."""
        if self.error is not None:
            return f"{self.path:<{width}}  error: {self.error}"
        cells = [f"{f'{c} ({p:.4f})':<{cell}}" for c, p in self.top]
        return f"{self.path:<{width}}  " + "  ".join(cells).rstrip()


def find_images(paths: list[str]) -> list[str]:
    """The files to predict, in the order given: a file as named (whatever its extension), a
    directory's image files (prep's extensions) recursively in sorted order, each directory
    once even through symlinks. A path that does not exist stays in the list: its row says so."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found += _walk(path)
        else:
            found.append(path)
    if not found:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        raise UserError(
            f"no image files in {', '.join(paths)}: give image files, or directories holding "
            f"files named like prep's images ({' '.join(IMG_EXTENSIONS)})"
        )
    return found


def _walk(top: str) -> list[str]:
    """Depth-first and sorted, as prep walks a class folder; a directory reached again through
    a symlink is not entered twice (a loop would never end)."""
    files, seen, stack = [], set(), [top]
    while stack:
        folder = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            files.append(folder)  # its row reports why it cannot be read
            continue
        subdirs = []
        for entry in entries:
            path = os.path.join(folder, entry.name)
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(path)
            elif image_extension(entry.name) is not None:
                files.append(path)
        stack.extend(reversed(subdirs))
    return files


def load_image(path: str, size: int, center: float, max_pixels: int) -> torch.Tensor | str:
    """The uint8 CHW crop evaluation would make of this file, or prep's reason to refuse it.
    Call it inside `strict_pillow()`, as prep does (in the thread that starts the threads:
    Pillow's settings are process-wide)."""
    from training.data.decode import decode_cpu, plan_crop

    if not os.path.lexists(path):
        return "no such file"
    checked = check_image(path, max_pixels)
    if isinstance(checked, str):
        return checked
    data = read_regular_file(path)
    if isinstance(data, str) or len(data) != checked[2]:
        return "the file changed while it was read"
    try:
        return decode_cpu(data, size, partial(plan_crop, rng=None, center=center))
    except Exception as e:  # noqa: BLE001 - a decoder's error is this row's, not the run's
        return f"corrupt image ({type(e).__name__}: {e})"


def choose_head(datasets: list[str], name: str | None) -> int:
    """The head of dataset `name`: its location as trained, a path to the same place, its
    label in result.json and the report (`a/flowers`), or its folder name when no other
    dataset has that one."""
    if name is None and len(datasets) == 1:
        return 0
    from training.run.loop import dataset_labels  # imports Ray's modules; starts no Ray

    labels = dataset_labels(datasets)
    if name is None:
        raise UserError(
            f"the checkpoint has {len(datasets)} heads: choose one with --dataset "
            f"({', '.join(labels)})"
        )
    place = _place(name)
    matches = [
        i
        for i, (d, label) in enumerate(zip(datasets, labels, strict=True))
        if name in (d, label) or (place is not None and place == _place(d))
    ]
    matches = matches or [
        i for i, d in enumerate(datasets) if d.rstrip("/").rsplit("/", 1)[-1] == name
    ]
    if len(matches) != 1:
        why = "matches several" if matches else "is none"
        raise UserError(
            f"--dataset {name} {why} of the checkpoint's datasets; give one of "
            f"{', '.join(labels)} (or its location)"
        )
    return matches[0]


def _place(location: str) -> str | None:
    """`location` normalised as every location is at training time (None: not a location)."""
    from cluster import storage

    try:
        return storage.normalize(location)
    except (UserError, OSError, RuntimeError, ValueError):
        return None


def predict(
    model: MetaModel,
    head: int,
    classes: list[str],
    paths: list[str],
    size: int,
    center: float,
    top_k: int,
    batch_size: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device: torch.device | None = None,
) -> Iterator[Prediction]:
    """A prediction per path, in order, computed `batch_size` images at a time; decoding runs
    in threads (Pillow and libjpeg-turbo release the GIL)."""
    import torch

    device = device or torch.device("cpu")
    model.to(device).eval()
    load = partial(load_image, size=size, center=center, max_pixels=max_pixels)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), batch_size):
            batch = paths[start : start + batch_size]
            with strict_pillow():
                images = list(pool.map(load, batch))
            good = [x for x in images if not isinstance(x, str)]
            tops = iter(top_classes(model, head, classes, good, top_k, device) if good else [])
            for path, image in zip(batch, images, strict=True):
                shown = display_path(path)  # a name that is not UTF-8 must still print
                if isinstance(image, str):
                    yield Prediction(shown, [], image)
                else:
                    yield Prediction(shown, next(tops))


def top_classes(
    model: MetaModel,
    head: int,
    classes: list[str],
    images: list[torch.Tensor],
    top_k: int,
    device: torch.device,
) -> list[list[tuple[str, float]]]:
    """Per image (uint8 CHW crops), its `top_k` classes by the softmax of the head's logits."""
    import torch

    from training.data.decode import to_input

    with torch.no_grad():
        logits = model.heads[head](model.features(to_input(torch.stack(images), device)))
    probs, index = logits.float().softmax(dim=1).topk(min(top_k, len(classes)), dim=1)
    return [
        [(classes[i], p) for i, p in zip(row_i, row_p, strict=True)]
        for row_i, row_p in zip(index.tolist(), probs.tolist(), strict=True)
    ]


def add_predict_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="class names and probabilities of image files (no Ray needed)",
        description="Predict the classes of image files with a checkpoint (a run directory for "
        "its newest checkpoint, a checkpoint directory or a state.pt; local or s3://). Each "
        "image is checked and decoded exactly as prep and evaluation would; a file that cannot "
        "be used gets its reason in its row and the others are still predicted.",
        epilog="Exit status: 0 when every file was predicted, 1 when some rows are errors, 2 on "
        "a usage error (no such checkpoint, no images, a bad flag).",
    )
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint dir or file")
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="image files, and directories searched recursively for the extensions prep takes",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=5,
        help="classes per image, all when it has fewer (default: %(default)s)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        metavar="NAME",
        help="the head to use: its dataset's label in result.json and the report (a/flowers), "
        "or the dataset's location (default: the only head)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line, not a table")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="refuse larger images, as prep does (default: %(default)s)",
    )
    from training.cli.flags import add_s3_endpoint_flag

    add_s3_endpoint_flag(p)
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> int:
    import torch

    from cluster import s3
    from training.model.network import eval_center
    from training.run.evaluate import load_trained

    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, not {value}")
    if args.max_pixels < 1:
        raise UserError(f"--max-pixels must be at least 1, not {args.max_pixels}")
    paths = find_images(args.images)
    s3.set_endpoint(args.s3_endpoint)
    s3.set_timeout(args.s3_timeout)
    model, cfg, state = load_trained(args.checkpoint)
    head = choose_head(cfg.data.datasets, args.dataset)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classes = state.classes[head]
    rows = predict(
        model,
        head,
        classes,
        paths,
        cfg.data.image_size,
        eval_center(cfg.model.weights),
        args.top_k,
        args.batch_size,
        args.max_pixels,
        device,
    )
    width = min(PATH_WIDTH, max(len(p) for p in paths))
    cell = max(len(c) for c in classes) + len(" (0.0000)")
    if not args.json:
        tops = [f"{f'top-{i + 1}':<{cell}}" for i in range(min(args.top_k, len(classes)))]
        print(f"{'path':<{width}}  " + "  ".join(tops).rstrip())
    failed = 0
    try:
        for row in rows:
            failed += row.error is not None
            print(row.to_json() if args.json else row.to_row(width, cell), flush=True)
    except BrokenPipeError:  # `… | head`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1 if failed else 0
    if failed:
        print(f"metatrainer predict: {failed} of {len(paths)} files not predicted", file=sys.stderr)
    return 1 if failed else 0
