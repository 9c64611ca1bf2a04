"""`metatrainer prep --mlflow URI`: a prep is an MLflow run on a real tracking server with its
flags, its counts, the manifest's sha256 and the list of skipped files; a failed prep is a
FAILED run."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from data_prep.contract import read_manifest
from data_prep.report import skip_reason_kind
from training.cli.main import main


def test_a_prep_is_an_mlflow_run_with_its_counts(
    ray_cluster, corpus, mlflow_server, tmp_path: Path, capsys
) -> None:
    dst = tmp_path / "flowers"
    flags = ["--num-shards", "2", "--mlflow", mlflow_server.uri, "--mlflow-experiment", "prep"]
    assert main(["prep", str(corpus.root), str(dst), *flags]) == 0
    assert "warning: MLflow" not in capsys.readouterr().err
    manifest = read_manifest(str(dst))
    [run] = mlflow_server.runs("prep")
    assert (run.info.run_name, run.info.status) == ("prep flowers", "FINISHED")
    assert run.data.params["dst"] == str(dst) and run.data.params["num_shards"] == "2"
    digest = hashlib.sha256((dst / "manifest.json").read_bytes()).hexdigest()
    assert run.data.tags["manifest_sha256"] == digest

    expected = {"images": 0, "bytes": 0, "shards": 0, "skipped": len(manifest.skipped)}
    for split, shards in manifest.splits.items():
        expected[f"images/{split}"] = manifest.num_samples(split)
        expected[f"bytes/{split}"] = sum(s.bytes for s in shards)
        expected[f"shards/{split}"] = len(shards)
        expected["images"] += manifest.num_samples(split)
        expected["bytes"] += sum(s.bytes for s in shards)
        expected["shards"] += len(shards)
    kinds = Counter(skip_reason_kind(s.reason) for s in manifest.skipped)
    assert len(kinds) >= 5  # the corpus has every kind of bad file
    expected |= {f"skipped/{kind}": n for kind, n in kinds.items()}
    metrics = dict(run.data.metrics)
    assert metrics.pop("duration_seconds") > 0
    assert metrics == expected

    client = mlflow_server.client()
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "skipped.tsv", "summary.txt"
    }  # fmt: skip
    local = Path(client.download_artifacts(run.info.run_id, "skipped.tsv", str(tmp_path)))
    rows = local.read_text().splitlines()
    assert rows[0] == "path\treason" and len(rows) == 1 + len(manifest.skipped)

    # A prep that fails: its run says so.
    (tmp_path / "bad/cat").mkdir(parents=True)
    (tmp_path / "bad/cat/a.jpg").write_text("not a jpeg")
    assert main(["prep", str(tmp_path / "bad"), str(tmp_path / "out"), *flags]) == 2
    failed = [r for r in mlflow_server.runs("prep") if r.info.run_name == "prep out"]
    assert [r.info.status for r in failed] == ["FAILED"]
