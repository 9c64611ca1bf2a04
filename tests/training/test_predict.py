"""`metatrainer predict` on real image files, against `metatrainer evaluate` on their shards.

No Ray: the digits are prepared in this process with prep's own steps (scan, check, plan,
write_shard, manifest) and a head is trained on the frozen backbone's features in a few
seconds, then saved as a checkpoint `load_trained` accepts.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cluster import storage
from cluster.errors import UserError
from cluster.world import World
from data_prep.contract import Manifest, read_manifest, write_manifest
from data_prep.prep import DEFAULT_SEED, plan_shards
from data_prep.scan import (
    DEFAULT_MAX_PIXELS,
    ValidImage,
    check_image,
    scan_source,
    strict_pillow,
    validate_files,
)
from data_prep.shard_task import write_shard
from data_prep.splits import DEFAULT_SPLITS, parse_splits
from training.cli.main import main
from training.cli.predict import choose_head
from training.config import TrainConfig
from training.data.batches import EvalBatches
from training.data.decode import to_input
from training.data.loader import build_loader
from training.model.checkpoint import Position, TrainState, save_state
from training.model.network import build_model
from training.run.evaluate import evaluate_checkpoint, load_trained
from training.run.loop import dataset_labels


def _odd_format(path: Path, variant: int) -> Path:
    """Rewrite a digit in one of the forms prep accepts besides a small greyscale JPEG."""
    img = Image.open(path)
    path.unlink()
    grey = np.asarray(img.convert("L"))
    if variant == 0:  # palette PNG
        out = path.with_suffix(".png")
        img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(out)
    elif variant == 1:  # greyscale + alpha
        out = path.with_suffix(".png")
        img.convert("LA").save(out)
    elif variant == 2:  # 16-bit greyscale
        out = path.with_suffix(".png")
        Image.fromarray(grey.astype(np.uint16) * 257).save(out)
    elif variant == 3:  # CMYK JPEG (PIL's path, not libjpeg-turbo's)
        out = path.with_suffix(".jpeg")
        img.convert("CMYK").save(out, quality=95)
    else:  # larger, not square, with an EXIF orientation: the DCT-scaled path
        out = path.with_suffix(".JPG")
        exif = Image.Exif()
        exif[0x0112] = 6
        img.convert("RGB").resize((120, 90)).save(out, quality=90, exif=exif)
    return out


def _prep_in_process(src: Path, dst: Path) -> Manifest:
    """What `prep(src, dst, num_shards=2)` writes, with its steps called here instead of in
    Ray tasks."""
    scan = scan_source(str(src))
    images = [
        r
        for r in validate_files(str(src), scan.candidates, DEFAULT_MAX_PIXELS)
        if isinstance(r, ValidImage)
    ]
    jobs = plan_shards(images, scan.classes, parse_splits(DEFAULT_SPLITS), DEFAULT_SEED, None, 2)
    dst.mkdir()
    splits = {
        name: [write_shard(str(src), str(dst / j.name), j.images, scan.classes)[0] for j in js]
        for name, js in jobs.items()
    }
    manifest = Manifest(scan.classes, splits, seed=DEFAULT_SEED)
    write_manifest(str(dst), manifest)
    return manifest


def _train_head(data: str, runs: Path) -> Path:
    """A checkpoint whose head was fitted, full batch, to the backbone's train features."""
    cfg = TrainConfig.of(data=[data], storage=str(runs), weights="none", image_size=32)
    cfg.data.augment, cfg.optim.batch_size = False, 128
    manifest = read_manifest(data)
    model = build_model(cfg.model.weights, [len(manifest.classes)], [], cfg.optim.seed)
    model.eval()
    batches = EvalBatches.from_config(data, manifest, "train", cfg, World())
    with torch.no_grad():
        parts = [
            (model.features(to_input(x, torch.device("cpu"))), y)
            for x, y in build_loader(batches, 0)
        ]
    features, labels = torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts])
    head = model.heads[0]
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features), labels).backward()
        optimizer.step()
    state = TrainState(
        model=model.trainable_state_dict(),
        optimizer={},
        scheduler={},
        position=Position(),
        rng={},
        config=cfg.to_dict(),
        classes=[manifest.classes],
        backbone={"weights": cfg.model.weights, "sha256": model.backbone_fingerprint()},
    )
    checkpoint = runs / "digits" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    save_state(checkpoint, state)
    return runs / "digits"


@pytest.fixture(scope="module")
def trained(digits_dir: Path, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(source ImageFolder, its shards, a run directory with one checkpoint)."""
    root = tmp_path_factory.mktemp("predict")
    src = root / "images"
    shutil.copytree(digits_dir, src)
    for i, path in enumerate(sorted(src.glob("*/*.jpg"))):
        if i % 2:
            _odd_format(path, i // 2 % 5)
    _prep_in_process(src, root / "shards")
    return src, root / "shards", _train_head(str(root / "shards"), root / "runs")


def _split_files(shards: Path, split: str) -> list[tuple[str, str]]:
    """(source path relative to SRC, class) of every sample of a split, from the `.json`
    member prep writes next to each image in its shards."""
    out = []
    for shard in read_manifest(str(shards)).shards(split):
        with tarfile.open(shards / shard.name) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    doc = json.load(io.BytesIO(tar.extractfile(member).read()))
                    out.append((doc["path"], doc["class"]))
    return out


def _predict(argv: list[str], capsys) -> tuple[int, str, str]:
    status = main(["predict", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_predicting_the_test_files_gives_evaluates_accuracy(trained, capsys):
    src, shards, run = trained
    files = _split_files(shards, "test")
    assert {Path(p).suffix for p, _ in files} >= {".jpg", ".png", ".jpeg", ".JPG"}

    status, out, err = _predict(
        ["--checkpoint", str(run), "--json", "--top-k", "1", *[str(src / p) for p, _ in files]],
        capsys,
    )
    assert status == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == [str(src / p) for p, _ in files]
    correct = sum(r["top_k"][0]["class"] == c for r, (_, c) in zip(rows, files, strict=True))

    [(_, accuracy, n)] = evaluate_checkpoint(str(run), loader_workers=0)
    assert n == len(files)
    assert correct / n == accuracy
    assert accuracy > 0.5  # a trained head: the equality is not that of two constant guesses

    # Image by image, the probabilities evaluation computes from the shards (in the same
    # order: the shards' manifest order), up to float rounding of other batch shapes.
    model, cfg, _ = load_trained(str(run))
    model.eval()
    batches = EvalBatches.from_config(str(shards), read_manifest(str(shards)), "test", cfg, World())
    with torch.no_grad():
        probabilities = torch.cat(
            [
                model.heads[0](model.features(to_input(x, torch.device("cpu")))).softmax(1)
                for x, _ in build_loader(batches, 0)
            ]
        )
    expected = probabilities.max(1).values.tolist()
    assert [r["top_k"][0]["probability"] for r in rows] == pytest.approx(expected, abs=1e-5)


def test_json_rows_are_sorted_probabilities_and_directories_are_walked(trained, capsys):
    src, _, run = trained
    status, out, err = _predict(
        ["--checkpoint", str(run / "checkpoint_000001"), str(src / "3"), "--json", "--top-k", "3"],
        capsys,
    )
    assert status == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(list((src / "3").iterdir())) > 0
    for row in rows:
        probabilities = [t["probability"] for t in row["top_k"]]
        assert len(probabilities) == 3
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6
    assert sum(r["top_k"][0]["class"] == "3" for r in rows) > len(rows) / 2

    # More than the classes: all ten, summing to one.
    one = str(next((src / "3").glob("*.jpg")))
    status, out, _ = _predict(["--checkpoint", str(run), one, "--json", "--top-k", "50"], capsys)
    top = json.loads(out.splitlines()[0])["top_k"]
    assert sorted(t["class"] for t in top) == [str(d) for d in range(10)]
    assert sum(t["probability"] for t in top) == pytest.approx(1, abs=1e-5)


def test_unreadable_files_are_reported_in_their_rows(trained, tmp_path, capsys):
    src, _, run = trained
    good = sorted((src / "7").glob("*.jpg"))[:2]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:300])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    paths = [good[0], truncated, text, tmp_path / "missing.png", good[1]]

    status, out, err = _predict(["--checkpoint", str(run), *map(str, paths)], capsys)
    assert status == 1
    assert "3 of 5 files not predicted" in err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["path", "top-1", "top-2"]
    assert [r.split()[0] for r in rows] == list(map(str, paths))
    # Prep's reasons, word for word: prep would have skipped these files the same way.
    with strict_pillow():
        reasons = [check_image(str(bad), DEFAULT_MAX_PIXELS) for bad in (truncated, text)]
    for row, reason in zip(rows[1:3], reasons, strict=True):
        assert row.endswith(f"  error: {reason}")
    assert "not an image" in rows[2] and rows[3].endswith("  error: no such file")
    for row in (rows[0], rows[4]):
        assert "error" not in row and row.count("(") == 5  # default --top-k 5

    status, out, _ = _predict(["--checkpoint", str(run), "--json", str(truncated)], capsys)
    reason = rows[1].split("  error: ", 1)[1]
    assert status == 1 and json.loads(out) == {"path": str(truncated), "error": reason}


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--checkpoint", "{tmp}/nowhere", "{img}"], "no checkpoint found"),
        (["--checkpoint", "{run}", "{tmp}"], "no image files in"),
        (["--checkpoint", "{run}", "--top-k", "0", "{img}"], "--top-k must be at least 1"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(trained, tmp_path, capsys, argv, words):
    src, _, run = trained
    img = next((src / "1").glob("*.jpg"))
    argv = [a.format(tmp=tmp_path, run=run, img=img) for a in argv]
    status, out, err = _predict(argv, capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("metatrainer predict: error: "), err
    assert words in err


def test_the_head_is_chosen_by_dataset_location_or_folder():
    two = ["s3://bucket/flowers", "/data/birds/"]
    assert choose_head(["/data/digits"], None) == 0
    assert choose_head(two, "birds") == 1 and choose_head(two, "s3://bucket/flowers") == 0
    with pytest.raises(UserError, match="2 heads: choose one with --dataset .*flowers.*birds"):
        choose_head(two, None)
    with pytest.raises(UserError, match="--dataset cars is none of .*flowers"):
        choose_head(two, "cars")
    with pytest.raises(UserError, match="matches several"):
        choose_head(["/a/flowers", "/b/flowers"], "flowers")


def test_the_head_is_chosen_by_its_label_in_the_results_or_a_path_to_its_dataset(
    tmp_path, monkeypatch
):
    datasets = [str(tmp_path / "a" / "flowers"), str(tmp_path / "b" / "flowers"), "s3://b/birds"]
    labels = dataset_labels(datasets)  # as result.json and the report name them
    assert labels == ["a/flowers", "b/flowers", "b/birds"]
    assert [choose_head(datasets, label) for label in labels] == [0, 1, 2]
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    assert choose_head(datasets, "../a/flowers") == 0
    assert choose_head(datasets, "./flowers/") == 1
    assert choose_head(datasets, f"{tmp_path}/a/../b/flowers") == 1
    assert choose_head(datasets, "s3://b/birds/") == 2
    assert choose_head(["/x/f", "/x/f"], "1:/x/f") == 1  # one location twice: labels by index

    monkeypatch.chdir(tmp_path)
    for name, why in [("flowers", "matches several"), ("roses", "is none")]:
        with pytest.raises(UserError) as e:
            choose_head(datasets, name)
        assert str(e.value) == (
            f"--dataset {name} {why} of the checkpoint's datasets; give one of a/flowers, "
            "b/flowers, b/birds (or its location)"
        )
    with pytest.raises(UserError, match=r"choose one with --dataset \(a/flowers, b/flowers, b"):
        choose_head(datasets, None)


def test_predict_takes_a_relative_path_to_the_dataset_and_lists_labels_when_lost(
    trained, monkeypatch, capsys
):
    src, shards, run = trained
    image = str(next((src / "4").glob("*.jpg")))
    expected = _predict(["--checkpoint", str(run), image, "--json"], capsys)
    monkeypatch.chdir(shards.parent / "images")
    status, out, err = _predict(
        ["--checkpoint", str(run), "--dataset", "../shards/", image, "--json"], capsys
    )
    assert (status, out) == expected[:2] and status == 0, err

    status, out, err = _predict(["--checkpoint", str(run), "--dataset", "x", image], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1
    assert err.endswith("--dataset x is none of the checkpoint's datasets; give one of shards "
                        "(or its location)\n")  # fmt: skip


def _cut(state: Path) -> None:
    """Truncate a state file, as a copy or write that stopped halfway leaves it."""
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def test_an_unreadable_newest_checkpoint_is_skipped_with_one_warning(trained, tmp_path, capsys):
    src, _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.copytree(copy / "checkpoint_000001", copy / "checkpoint_000002")
    _cut(copy / "checkpoint_000002" / "state.pt")
    image = str(next((src / "6").glob("*.jpg")))
    expected = _predict(["--checkpoint", str(run), image, "--json"], capsys)

    status, out, err = _predict(["--checkpoint", str(copy), image, "--json"], capsys)
    assert (status, out) == expected[:2] and status == 0
    assert err.count("\n") == 1, err
    assert err.startswith(f"warning: skipping checkpoint checkpoint_000002 ({copy}/checkpoint_0")
    assert "state.pt: unreadable checkpoint (" in err
    assert err.endswith("); using the older checkpoint checkpoint_000001\n"), err

    # Named explicitly, the unreadable checkpoint is an error: the user chose it.
    for chosen in (copy / "checkpoint_000002", copy / "checkpoint_000002" / "state.pt"):
        status, out, err = _predict(["--checkpoint", str(chosen), image], capsys)
        assert status == 2 and out == "" and err.count("\n") == 1
        assert "unreadable checkpoint" in err

    _cut(copy / "checkpoint_000001" / "state.pt")
    status, out, err = _predict(["--checkpoint", str(copy), image], capsys)
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"metatrainer predict: error: {copy}: no readable checkpoint (")
    assert "checkpoint_000002 (" in err and "; checkpoint_000001 (" in err


def test_a_checkpoint_on_s3_predicts_as_the_local_one(trained, s3, bucket, capsys):
    src, _, run = trained
    state = run / "checkpoint_000001" / "state.pt"
    storage.write_bytes(f"{bucket}/runs/digits/checkpoint_000001/state.pt", state.read_bytes())
    images = [str(next((src / "5").glob("*.jpg"))), "--json"]
    assert (
        _predict(["--checkpoint", str(run), *images], capsys)[:2]
        == _predict(
            ["--checkpoint", f"{bucket}/runs/digits", "--s3-endpoint", s3.endpoint, *images], capsys
        )[:2]
    )


def test_a_file_name_that_is_not_utf8_is_predicted_and_printed_escaped(trained, tmp_path, capsys):
    src, _, run = trained
    image = tmp_path / os.fsdecode(b"caf\xe9.jpg")
    image.write_bytes(next((src / "2").glob("*.jpg")).read_bytes())
    status, out, err = _predict(["--checkpoint", str(run), str(tmp_path), "--json"], capsys)
    assert status == 0, err
    row = json.loads(out)
    assert row["path"] == f"{tmp_path}/caf\\xe9.jpg" and len(row["top_k"]) == 5
