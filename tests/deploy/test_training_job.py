"""deploy/: the training job: a head that trains nothing, a RayJob that cleans up after itself
and whose cluster has the GPUs it asks for, and a `metatrainer train` entrypoint that the real CLI
accepts everywhere it is shown (rayjob.yaml, raycluster.yaml and README.md).

    pytest tests/deploy -q
"""

from __future__ import annotations

import argparse
import shlex

import pytest
from manifest_support import (
    DEPLOY,
    DOCS,
    GPU,
    METRICS_BASE_PORT,
    gpus_per_pod,
    ray_cluster_specs,
    the_doc,
)


def test_head_runs_no_training():
    for _, doc in DOCS:
        for spec in ray_cluster_specs(doc):
            head = spec["headGroupSpec"]
            assert head["rayStartParams"].get("num-cpus") == "0"
            resources = head["template"]["spec"]["containers"][0].get("resources", {})
            for kind in ("limits", "requests"):
                assert GPU not in resources.get(kind, {}), kind


def test_rayjob_cleans_up_after_itself():
    spec = the_doc("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 24 * 3600
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"


def train_flags(argv: list[str]) -> argparse.Namespace:
    """The few `metatrainer train` flags the cluster shape depends on, parsed independently."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--gpus-per-worker", type=float)
    parser.add_argument("--metrics-port", type=int, default=METRICS_BASE_PORT)
    return parser.parse_known_args(argv[2:])[0]


def rayjob_argv() -> list[str]:
    return shlex.split(the_doc("RayJob")["spec"]["entrypoint"])


def test_cluster_has_the_gpus_the_job_asks_for():
    argv = rayjob_argv()
    assert argv[:2] == ["metatrainer", "train"], argv
    flags = train_flags(argv)
    assert flags.workers and flags.gpus_per_worker, "say --workers and --gpus-per-worker explicitly"
    (spec,) = ray_cluster_specs(the_doc("RayJob"))
    available = sum(
        g.get("replicas", g.get("minReplicas", 0)) * gpus_per_pod(g["template"])
        for g in spec["workerGroupSpecs"]
    )
    assert flags.workers * flags.gpus_per_worker <= available
    assert flags.metrics_port == METRICS_BASE_PORT  # the port the manifests and PodMonitor use


def submit_commands(text: str) -> list[list[str]]:
    """Every `ray job submit ... -- CMD` in a file (comments or code blocks): the CMD argv."""
    lines = [line.strip().lstrip("#").strip() for line in text.splitlines()]
    commands = []
    for start, line in enumerate(lines):
        if line.startswith("ray job submit"):
            command, nxt = line, start + 1
            while command.endswith("\\"):
                command, nxt = command[:-1] + " " + lines[nxt], nxt + 1
            argv = shlex.split(command)
            commands.append(argv[argv.index("--") + 1 :])
    return commands


ENTRYPOINTS = {
    "rayjob.yaml": rayjob_argv(),
    **{
        f"{name} ray job submit": argv
        for name in ("raycluster.yaml", "README.md")
        for argv in submit_commands((DEPLOY / name).read_text())
    },
}


def test_docs_show_a_ray_job_submit_command():
    assert {"raycluster.yaml ray job submit", "README.md ray job submit"} <= set(ENTRYPOINTS)


def metatrainer_parser() -> argparse.ArgumentParser:
    from cluster.cli import build_parser

    try:
        return build_parser()
    except ModuleNotFoundError as e:
        if e.name in ("training", "training.cli", "data_prep", "data_prep.cli"):
            pytest.skip(f"the metatrainer CLI is not assembled yet ({e.name} is missing)")
        raise


@pytest.mark.parametrize("where", ENTRYPOINTS)
def test_entrypoint_is_a_valid_train_command(where, capsys):
    argv = ENTRYPOINTS[where]
    assert argv[:2] == ["metatrainer", "train"], argv
    parser = metatrainer_parser()
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: metatrainer rejects {shlex.join(argv)}:\n{capsys.readouterr().err}")
    assert args.command == "train"
    assert getattr(args, "metrics_port", METRICS_BASE_PORT) == METRICS_BASE_PORT
