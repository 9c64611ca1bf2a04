"""`metatrainer report` on a run trained here (2 workers on a real Ray cluster, real digits),
and the report `metatrainer train` leaves in the run directory."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from data_prep.contract import read_manifest
from training.cli.main import main
from training.run.driver import TrainOutcome, run_training
from training.run.evaluate import evaluate_checkpoint, load_trained
from training.run.loop import dataset_labels

EPOCHS = 3


@pytest.fixture(scope="module")
def trained(shards, small_config, tmp_path_factory) -> TrainOutcome:
    storage = tmp_path_factory.mktemp("report-runs")
    return run_training(small_config(shards, storage, name="rep", epochs=EPOCHS, batch_size=8))


def assert_png(path: Path, min_width: int, min_height: int) -> None:
    """A real, non-blank PNG of at least that size."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= min_height, image.size
        lo, hi = image.convert("L").getextrema()
        assert hi - lo > 100, "a blank image"


def table_rows(out: str, dataset: str) -> list[tuple[str, int, int, float]]:
    """(class, correct, total, accuracy) rows of `dataset`'s per-class table, without `all`."""
    lines = out.splitlines()
    start = lines.index(f"{dataset} (test)") + 2  # the title, then the header
    rows = []
    for line in lines[start:]:
        name, correct, total, accuracy = line.split()
        if name == "all":
            return rows
        rows.append((name, int(correct), int(total), float(accuracy)))
    raise AssertionError("no `all` row")


def test_training_leaves_a_report_in_the_run_directory(trained, shards):
    run = Path(trained.run_dir)
    assert trained.report == str(run / "report")
    [name] = dataset_labels([shards])
    assert_png(run / "report" / "curves.png", 800, 500)
    assert_png(run / "report" / f"confusion-{name}.png", 400, 400)
    # The matrices it plots are the workers' last pass over the test split.
    [saved] = json.loads((run / "report" / "confusion-test.json").read_text()).values()
    counts = saved["counts"]
    assert saved["classes"] == read_manifest(shards).classes
    assert sum(map(sum, counts)) == read_manifest(shards).num_samples("test")
    accuracy = sum(counts[i][i] for i in range(len(counts))) / sum(map(sum, counts))
    assert accuracy == pytest.approx(trained.metrics["test_accuracy"])


def test_report_writes_curves_confusion_and_a_per_class_table(trained, shards, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", trained.run_dir, "--out", str(out), "--loader-workers", "0"]) == 0
    printed = capsys.readouterr().out
    [name] = dataset_labels([shards])
    assert sorted(p.name for p in out.iterdir()) == ["confusion-" + name + ".png", "curves.png"]
    assert_png(out / "curves.png", 800, 500)
    assert_png(out / f"confusion-{name}.png", 400, 400)

    rows = table_rows(printed, name)
    manifest = read_manifest(shards)
    assert [r[0] for r in rows] == manifest.classes
    assert sum(r[2] for r in rows) == manifest.num_samples("test")
    for _, correct, total, accuracy in rows:
        assert 0 <= correct <= total and accuracy == pytest.approx(correct / total, abs=1e-4)
    [(_, overall, n)] = evaluate_checkpoint(trained.run_dir, loader_workers=0)
    assert sum(r[1] for r in rows) / n == pytest.approx(overall)

    # The curves' data: one record per epoch, with the per-dataset validation accuracy.
    history = load_trained(trained.run_dir)[2].position.history
    assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1))
    assert all(0 <= r["val_accuracy_per_dataset"][name] <= 1 for r in history)

    assert main(["report", trained.run_dir, "--out", str(out), "--split", "tset"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no 'tset' split; choose from test, train, val" in err


def test_report_skips_an_unreadable_newest_checkpoint_with_one_warning(
    trained, shards, tmp_path, capsys
):
    run = tmp_path / "rep"
    shutil.copytree(trained.run_dir, run)
    *_, older, newest = sorted(p.parent.name for p in run.glob("checkpoint_*/state.pt"))
    state = run / newest / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # a copy that stopped early

    assert main(["report", str(run), "--out", str(tmp_path / "out"), "--loader-workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"warning: skipping checkpoint {newest} ("), err
    assert err.endswith(f"; using the older checkpoint {older}\n"), err
    # The report is the older checkpoint's: its scores, and its epochs on the curves.
    rows = table_rows(out, dataset_labels([shards])[0])
    [(_, accuracy, n)] = evaluate_checkpoint(str(run / older), loader_workers=0)
    assert sum(r[1] for r in rows) / n == pytest.approx(accuracy)
    assert len(load_trained(str(run))[2].position.history) == EPOCHS - 1


def test_report_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such run directory" in err, err
    (tmp_path / "empty-run").mkdir()
    (tmp_path / "empty-run" / "result.json").write_text("{}")
    assert main(["report", str(tmp_path / "empty-run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no checkpoint found" in err, err

    # At the end of a training that finished, the same failure is a warning, not an error.
    from training.run.driver import _write_report

    assert _write_report(str(tmp_path / "empty-run")) is None
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("warning: the report was not written")


def test_report_reads_and_writes_a_run_on_s3(trained, shards, s3, bucket, capsys):
    run = Path(trained.run_dir)
    for f in run.rglob("*"):
        if f.is_file() and f.parent.name != "report":
            s3.client.upload_file(str(f), bucket[5:], f"runs/rep/{f.relative_to(run)}")
    assert main(["report", f"{bucket}/runs/rep", "--loader-workers", "0"]) == 0
    assert f"report          {bucket}/runs/rep/report (2 PNGs)" in capsys.readouterr().out
    keys = s3.list_keys(bucket, "runs/rep/report/")
    [name] = dataset_labels([shards])
    assert [k.rsplit("/", 1)[1] for k in keys] == [f"confusion-{name}.png", "curves.png"]
    body = s3.client.get_object(Bucket=bucket[5:], Key=keys[1])["Body"].read()
    with Image.open(io.BytesIO(body)) as image:
        assert image.format == "PNG" and image.width >= 800
