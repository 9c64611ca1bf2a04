"""`metatrainer prep` end to end on a local Ray cluster: digits, a hostile corpus, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torchvision
import webdataset as wds

from cluster.errors import UserError
from data_prep.contract import Manifest, read_manifest
from data_prep.prep import prep
from data_prep.progress import Progress
from data_prep.scan import ValidImage
from data_prep.shard_task import write_shard
from training.cli.main import main


def read_shard(path: Path) -> list[dict]:
    """Samples of a shard in order: {"key", "ext", "image", "cls", "meta"}."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            data = tar.extractfile(m).read()
            s = samples.setdefault(key, {"key": key})
            if ext == "cls":
                s["cls"] = int(data)
            elif ext == "json":
                s["meta"] = json.loads(data)
            else:
                s["ext"], s["image"] = ext, data
    return list(samples.values())


def read_all(dst: Path, manifest: Manifest) -> dict[str, list[dict]]:
    return {
        split: [s for shard in shards for s in read_shard(dst / shard.name)]
        for split, shards in manifest.splits.items()
    }


@pytest.fixture(scope="module")
def prepared(ray_cluster, digits_dir, tmp_path_factory) -> tuple[Path, Manifest]:
    dst = tmp_path_factory.mktemp("prepared") / "shards"
    return dst, prep(str(digits_dir), str(dst), num_shards=3)


def test_round_trip_agrees_with_imagefolder(prepared, digits_dir: Path) -> None:
    dst, manifest = prepared
    folder = torchvision.datasets.ImageFolder(str(digits_dir))
    assert manifest.classes == folder.classes
    assert {c: i for i, c in enumerate(manifest.classes)} == folder.class_to_idx
    assert read_manifest(str(dst)).to_json() == manifest.to_json()
    labels = {str(Path(p).relative_to(digits_dir)): y for p, y in folder.samples}

    seen = []
    for split, samples in read_all(dst, manifest).items():
        assert len(samples) == manifest.num_samples(split)
        for s in samples:
            rel = s["meta"]["path"]
            seen.append(rel)
            assert s["image"] == (digits_dir / rel).read_bytes()
            assert s["cls"] == labels[rel]
            assert s["meta"]["class"] == folder.classes[labels[rel]]
            assert (s["meta"]["width"], s["meta"]["height"]) == (32, 32)
            assert s["ext"] == "jpg"
    assert sorted(seen) == sorted(labels) and len(seen) == 600
    assert manifest.skipped == []
    for shards in manifest.splits.values():
        for shard in shards:
            data = (dst / shard.name).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (shard.bytes, shard.sha256)


def test_webdataset_reads_the_shards(prepared) -> None:
    dst, manifest = prepared
    urls = [str(dst / s.name) for s in manifest.shards("train")]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls"))
    assert len(samples) == manifest.num_samples("train")
    assert samples[0][0].size == (32, 32) and 0 <= int(samples[0][1]) < 10


def test_num_shards_and_class_mixing(prepared) -> None:
    dst, manifest = prepared
    assert list(manifest.splits) == ["train", "val", "test"]
    for split, samples in read_all(dst, manifest).items():
        shards = manifest.shards(split)
        assert [s.name for s in shards] == [f"{split}-{i:06d}.tar" for i in range(3)]
        sizes = [s.num_samples for s in shards]
        assert max(sizes) - min(sizes) <= 1
        start = 0
        for size in sizes:
            classes = Counter(s["cls"] for s in samples[start : start + size])
            assert len(classes) >= 5, classes  # shuffled: never one class per shard
            start += size
    assert abs(manifest.num_samples("train") / 600 - 0.8) < 0.06


def test_two_runs_are_byte_identical(prepared, digits_dir: Path, tmp_path: Path) -> None:
    dst, manifest = prepared
    again = prep(str(digits_dir), str(tmp_path), num_shards=3)
    assert (tmp_path / "manifest.json").read_bytes() == (dst / "manifest.json").read_bytes()
    for shards in again.splits.values():
        for s in shards:
            assert (tmp_path / s.name).read_bytes() == (dst / s.name).read_bytes()


def test_shard_size_is_respected(ray_cluster, digits_dir: Path, tmp_path: Path) -> None:
    manifest = prep(str(digits_dir), str(tmp_path), shard_size=200_000)
    train = manifest.shards("train")
    assert len(train) >= 5
    assert all(s.bytes <= 200_000 for shards in manifest.splits.values() for s in shards)
    assert sum(manifest.num_samples(s) for s in manifest.splits) == 600


def test_adding_images_moves_no_old_image(ray_cluster, small_digits: Path, tmp_path: Path) -> None:
    held = tmp_path / "held"
    for i, path in enumerate(sorted(small_digits.glob("*/*.jpg"))):
        if i % 3 == 0:  # a third of the images arrive later
            (held / path.parent.name).mkdir(parents=True, exist_ok=True)
            path.rename(held / path.parent.name / path.name)

    def split_of(manifest: Manifest, dst: Path) -> dict[str, str]:
        return {
            s["meta"]["path"]: split
            for split, samples in read_all(dst, manifest).items()
            for s in samples
        }

    before = split_of(prep(str(small_digits), str(tmp_path / "a")), tmp_path / "a")
    shutil.copytree(held, small_digits, dirs_exist_ok=True)
    after = split_of(prep(str(small_digits), str(tmp_path / "b")), tmp_path / "b")
    assert len(before) == 400 and len(after) == 600
    assert {p: after[p] for p in before} == before


def test_rerun_removes_shards_the_new_manifest_does_not_name(
    ray_cluster, digits_dir: Path, tmp_path: Path
) -> None:
    """Only shards an earlier prep wrote: files of the user's stay, even named like shards."""
    (tmp_path / "notes-000001.txt").write_text("not ours")
    (tmp_path / "train-000009.tar").write_text("not ours either")
    prep(str(digits_dir), str(tmp_path), num_shards=4)
    assert (tmp_path / "train-000003.tar").exists()
    manifest = prep(str(digits_dir), str(tmp_path), num_shards=2)
    named = {s.name for shards in manifest.splits.values() for s in shards}
    tars = {p.name for p in tmp_path.glob("*.tar")}
    assert tars == named | {"train-000009.tar"} and len(named) == 6
    assert (tmp_path / "notes-000001.txt").exists()
    assert sorted(p.name for p in tmp_path.glob(".*")) == []  # no ledger left behind


def test_hostile_corpus_through_the_cli(ray_cluster, corpus, tmp_path: Path, capsys) -> None:
    assert main(["prep", str(corpus.root), str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest.classes == ["a", "b", "empty"]
    skipped = {s.path: s.reason for s in manifest.skipped}
    for path, word in corpus.bad.items():
        assert path in skipped, path
        assert word in skipped[path], (path, skipped[path])

    samples = [s for ss in read_all(tmp_path / "out", manifest).values() for s in ss]
    assert {s["meta"]["path"] for s in samples} == corpus.good
    for s in samples:
        assert s["image"] == (corpus.root / s["meta"]["path"]).read_bytes()
        assert s["cls"] == manifest.classes.index(s["meta"]["path"].split("/")[0])
    exts = {s["meta"]["path"]: s["ext"] for s in samples}
    assert exts["b/UPPER.JPEG"] == "jpeg" and exts["a/one.png"] == "png"

    assert "manifest:" in out and "skipped:" in out and "train" in out
    assert "no valid images" in err and "empty" in err  # the empty class is warned about


def _one_line_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    # Progress lines may come first; the error itself is the last line, with no traceback.
    assert "Traceback" not in err, err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("metatrainer prep: error: "), err
    return last


def test_missing_source(ray_cluster, tmp_path: Path, capsys) -> None:
    err = _one_line_error(["prep", str(tmp_path / "nope"), str(tmp_path / "out")], capsys)
    assert "does not exist" in err


def test_source_without_valid_images(ray_cluster, tmp_path: Path, capsys) -> None:
    (tmp_path / "src/cat").mkdir(parents=True)
    (tmp_path / "src/cat/a.jpg").write_text("not a jpeg")
    (tmp_path / "src/cat/b.txt").write_text("not an image")
    err = _one_line_error(["prep", str(tmp_path / "src"), str(tmp_path / "out")], capsys)
    assert "no valid images" in err and "not an image" in err
    assert not (tmp_path / "out/manifest.json").exists()


def test_bad_splits(ray_cluster, digits_dir: Path, tmp_path: Path, capsys) -> None:
    err = _one_line_error(
        ["prep", str(digits_dir), str(tmp_path), "--splits", "train=0.7,val=0.1"], capsys
    )
    assert "sum to 0.8" in err


def test_unwritable_destination(ray_cluster, digits_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("")
    err = _one_line_error(["prep", str(digits_dir), str(tmp_path / "file/out")], capsys)
    assert "cannot write" in err


def test_destination_inside_source(ray_cluster, small_digits: Path, capsys) -> None:
    err = _one_line_error(["prep", str(small_digits), str(small_digits / "shards")], capsys)
    assert "inside SRC" in err


def test_a_source_file_changed_before_writing_is_an_error(small_digits: Path, tmp_path) -> None:

    rel = sorted(p.relative_to(small_digits) for p in small_digits.glob("*/*.jpg"))[0]
    size = (small_digits / rel).stat().st_size
    image = ValidImage(str(rel), 0, "jpg", 32, 32, size)
    out = tmp_path / "out"
    url = str(out / "train-000000.tar")
    assert write_shard(str(small_digits), url, [image], ["0"])[0].num_samples == 1
    (small_digits / rel).write_bytes(b"\xff\xd8 shorter now")
    with pytest.raises(UserError, match="changed while prep was running"):
        write_shard(str(small_digits), str(out / "val-000000.tar"), [image], ["0"])
    assert [p.name for p in out.iterdir()] == ["train-000000.tar"]  # no temporary left


def test_a_rerun_keeps_the_shards_that_are_already_there(
    ray_cluster, digits_dir: Path, tmp_path: Path
) -> None:
    prep(str(digits_dir), str(tmp_path), num_shards=3, progress=Progress(enabled=False))
    inodes = {p.name: p.stat().st_ino for p in tmp_path.glob("*.tar")}
    log = io.StringIO()
    prep(str(digits_dir), str(tmp_path), num_shards=3, progress=Progress(stream=log))
    assert "9 were already there from an earlier run and kept" in log.getvalue()
    assert {p.name: p.stat().st_ino for p in tmp_path.glob("*.tar")} == inodes


def test_the_old_manifest_goes_just_before_a_shard_it_names_changes(
    digits_dir: Path, tmp_path: Path
) -> None:
    paths = sorted(digits_dir.glob("*/*.jpg"))[:3]
    images = [
        ValidImage(str(p.relative_to(digits_dir)), 0, "jpg", 32, 32, p.stat().st_size)
        for p in paths
    ]
    url = str(tmp_path / "train-000000.tar")
    old_manifest = tmp_path / "manifest.json"
    assert write_shard(str(digits_dir), url, images[:2], ["0"])[1] is False
    old_manifest.write_text("{}")
    # The same bytes again: nothing is replaced, so the old manifest stays valid and readable.
    assert write_shard(str(digits_dir), url, images[:2], ["0"])[1] is True
    assert old_manifest.exists()
    # Different bytes under the same name: the manifest naming the old ones goes first.
    shard, kept = write_shard(str(digits_dir), url, images, ["0"])
    assert not kept and shard.num_samples == 3 and not old_manifest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]
