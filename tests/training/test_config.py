"""The config declared once: flags generated from `TrainConfig`, `--config FILE` between the
defaults and the flags given, and every run's `RUN/config.toml`, which reruns it."""

from __future__ import annotations

import json
import re
from dataclasses import fields

import pytest

from training.cli.main import build_parser, main
from training.cli.train import config_from_args
from training.config import (
    DEMO_DEFAULTS,
    FLAGS,
    FLAT_NAMES,
    SECTIONS,
    TrainConfig,
    field_docs,
)
from training.config_file import config_toml, config_values

tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
DEFAULTS = TrainConfig()


def help_entries(command: str, capsys, monkeypatch) -> dict[str, str]:
    """`metatrainer COMMAND --help`, one entry a flag: {its first option: invocation and help
    on one line}."""
    monkeypatch.setenv("COLUMNS", "1000")  # nothing wraps, so no word is split at a hyphen
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    entries: dict[str, str] = {}
    flag = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            flag = re.split(r"[ ,]", line.strip())[0]
            entries[flag] = line.strip()
        elif flag and line.startswith("    "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


def shown(value) -> str:
    """A default as a user reads it in --help."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(value) or "none"
    return str(value)


def test_every_field_with_a_flag_is_in_train_help_with_its_docstring_and_default(
    capsys, monkeypatch
):
    entries = help_entries("train", capsys, monkeypatch)
    special = {"cache_size": "10GB", "data": None, "storage": None, "name": None}
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for f in fields(cls):
            name = FLAT_NAMES.get(f.name, f.name)
            if FLAGS[name] is None:
                continue
            entry = entries[FLAGS[name]]
            # The docstring's first words, up to a field's name (which help gives as its flag).
            words = " ".join(re.split(r"\S*_\S*", docs[f.name])[0].split()[:5]).rstrip(".")
            assert words and words in entry, (name, entry)
            value = special.get(name, DEFAULTS.flat()[name])
            if name in ("data", "storage", "name"):
                assert entry.endswith("(required, here or in --config)"), entry
            elif value is not None:
                assert entry.endswith(f"(default: {shown(value)})"), entry
    assert "--no-augment" in entries["--augment"] and "--config FILE" in entries["--config"]
    assert "--address" in entries and "--min-workers" not in entries


def test_the_parsed_defaults_are_the_configs(capsys, monkeypatch):
    args = build_parser().parse_args(["train"])
    for name, flag in FLAGS.items():
        if flag and name != "workers":
            assert getattr(args, name) == DEFAULTS.flat()[name], name
    assert args.workers == (None, DEFAULTS.cluster.workers)
    assert config_from_args(args) == DEFAULTS
    assert config_from_args(build_parser().parse_args(["demo"]), DEMO_DEFAULTS) == DEMO_DEFAULTS
    demo = help_entries("demo", capsys, monkeypatch)
    assert "(default: 12)" in demo["--epochs"] and "(default: off)" in demo["--augment"]
    assert "--data" not in demo and "--name" not in demo  # the demo's own


RUN_TOML = """
[data]
datasets = ["a", "b"]
augment = false
cache_size = "50GB"

[optim]
lr = 0.01
global_batch = 64

[cluster]
workers = 8
min_workers = 2

[run]
storage = "runs"
name = "from-file"
"""


def test_a_config_file_sits_between_the_defaults_and_the_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(RUN_TOML)

    def config(*flags: str) -> TrainConfig:
        return config_from_args(build_parser().parse_args(["train", "--config", str(path), *flags]))

    cfg = config()
    assert cfg.data.datasets == ["a", "b"] and cfg.data.augment is False
    assert cfg.data.cache_size == 50 * 10**9 and cfg.optim.lr == 0.01
    assert (cfg.optim.batch_size, cfg.optim.global_batch) == (None, 64)
    assert (cfg.cluster.min_workers, cfg.cluster.workers) == (2, 8)
    assert (cfg.run.storage, cfg.run.name) == ("runs", "from-file")
    assert cfg.optim.epochs == DEFAULTS.optim.epochs  # not in the file: the default

    # A flag given wins, even when it says the default; a pair is replaced as one setting.
    cfg = config("--data", "c", "--augment", "--lr", "0.001", "--batch-size", "8", "--workers", "3")
    assert cfg.data.datasets == ["c"] and cfg.data.augment is True and cfg.optim.lr == 0.001
    assert (cfg.optim.batch_size, cfg.optim.global_batch) == (8, None)
    assert (cfg.cluster.min_workers, cfg.cluster.workers) == (None, 3)
    assert cfg.run.name == "from-file" and cfg.data.cache_size == 50 * 10**9


def test_tune_takes_the_searched_values_from_a_config_file_as_plain_values(tmp_path, capsys):
    path = tmp_path / "sweep.toml"
    path.write_text("[optim]\nlr = 0.0\n")
    args = ["tune", "--data", "d", "--storage", str(tmp_path), "--name", "s", "--config", str(path)]
    assert main(args) == 2  # the file's lr reached the search space, which refuses it
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lr 0.0: must be more than 0" in err, err
    assert main([*args, "--lr", "loguniform:0:1"]) == 2  # the flag's spec wins
    err = capsys.readouterr().err.strip()
    assert "--lr loguniform:0:1" in err and "LOW > 0" in err, err


@pytest.mark.parametrize(
    "text, hint",
    [
        ("[optimiser]\nlr = 0.01\n", "unknown section [optimiser]"),
        ("[optim]\nlearning_rate = 0.01\n", "[optim] has no key 'learning_rate'"),
        ("[optim]\nimage_size = 64\n", "'image_size': it belongs in [data]"),
        ('[optim]\nlr = "fast"\n', "[optim] lr must be a number, not 'fast'"),
        ("[optim]\nepochs = 1.5\n", "[optim] epochs must be a whole number, not 1.5"),
        ('[data]\ndatasets = "x"\n', "[data] datasets must be a list of strings"),
        ('[data]\ndecode = "tpu"\n', "[data] decode must be one of auto, cpu, gpu"),
        ("[optim]\nlr = \n", "not valid TOML"),
        (None, "no such file"),
    ],
)
def test_a_bad_config_file_is_one_line(tmp_path, capsys, text, hint):
    path = tmp_path / "run.toml"
    if text is not None:
        path.write_text(text)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--config {path}: " in err and hint in err, err


def test_the_run_flags_are_required_from_the_command_line_or_the_file(tmp_path, capsys):
    assert main(["train", "--data", "d"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "error: --storage, --name: required, on the command line or in a --config file"
    )


def test_the_written_toml_reads_back_as_the_config():
    cfg = TrainConfig.of(
        data=['/a b/"q"\\x', "é\x7f\n"],
        lr=1e-5,
        global_batch=64,
        batch_size=None,
        partitions=16,
        adapters=["layer4"],
        augment=False,
        gpus_per_worker=0.5,
        min_workers=1,
    )
    text = config_toml(cfg)
    assert "batch_size" not in text and "endpoint" not in text  # None: left out
    back = config_values(tomllib.loads(text))
    assert TrainConfig.of(**back).replace(batch_size=None) == cfg


def test_a_run_reruns_from_its_config_toml(shards, tmp_path, capsys):
    """RUN/config.toml holds the resolved config (the run's storage and name too): rerun with
    another --name, it trains the same parameters."""
    first = [
        "train", "--data", shards, "--storage", str(tmp_path), "--name", "first",
        "--weights", "none", "--image-size", "32", "--no-augment", "--epochs", "2",
        "--global-batch", "32", "--loader-workers", "0", "--metrics-port", "0",
        "--max-failures", "0",
    ]  # fmt: skip
    assert main(first) == 0
    recorded = tmp_path / "first" / "config.toml"
    settings = tomllib.loads(recorded.read_text())
    assert settings["data"]["partitions"] >= 1 and settings["run"]["name"] == "first"
    assert "batch_size" not in settings["optim"] and settings["optim"]["global_batch"] == 32

    result = json.loads((tmp_path / "first" / "result.json").read_text())
    args = build_parser().parse_args(["train", "--config", str(recorded)])
    assert config_from_args(args).to_dict() == result["config"]

    assert main(["train", "--config", str(recorded), "--name", "again"]) == 0
    capsys.readouterr()
    again = json.loads((tmp_path / "again" / "result.json").read_text())
    assert again["fingerprint"] == result["fingerprint"]
    assert again["config"] == {
        **result["config"],
        "run": {**result["config"]["run"], "name": "again"},
    }
