"""deploy/: the prep and training RayJobs of every overlay: a head that trains nothing, jobs that
cannot hold their pods forever and clean up after themselves, a cluster with the GPUs the job
asks for, an object store that Ray keeps in /dev/shm on every pod, and entrypoints (and the
README's `ray job submit` examples) that the real `metatrainer` CLI accepts, with the backbone
weights read from S3 rather than the internet.

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
    OVERLAY_NAMES,
    OVERLAYS,
    RAY_NODES,
    PodTemplate,
    built,
    gpus_per_pod,
    needs_kubectl,
    quantity,
    ray_cluster_specs,
    rayjobs,
    template_id,
)

from training.cli.main import build_parser


@needs_kubectl
def test_head_runs_no_training():
    for _, doc in DOCS:
        for spec in ray_cluster_specs(doc):
            head = spec["headGroupSpec"]
            assert head["rayStartParams"].get("num-cpus") == "0"
            resources = head["template"]["spec"]["containers"][0].get("resources", {})
            for kind in ("limits", "requests"):
                assert GPU not in resources.get(kind, {}), kind


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_overlay_has_a_prep_and_a_train_job(build):
    assert set(rayjobs(build)) == {"prep", "train"}


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
@pytest.mark.parametrize("step", ["prep", "train"])
def test_rayjob_ends_and_cleans_up_after_itself(build, step):
    """A job waiting for GPUs gives up (preRunningDeadlineSeconds), a running one is bounded
    (activeDeadlineSeconds), and its cluster goes away after the job (shutdown + TTL)."""
    spec = rayjobs(build)[step]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 24 * 3600
    assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"] <= 7 * 24 * 3600
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode"


def train_flags(argv: list[str]) -> argparse.Namespace:
    """The few `metatrainer train` flags the cluster shape depends on, parsed independently."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--gpus-per-worker", type=float)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--metrics-port", type=int, default=METRICS_BASE_PORT)
    parser.add_argument("--weights")
    parser.add_argument("--weights-sha256")
    return parser.parse_known_args(argv[2:])[0]


def entrypoint(build: str, step: str) -> list[str]:
    return shlex.split(rayjobs(build)[step]["spec"]["entrypoint"])


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_cluster_has_the_resources_the_job_asks_for(build):
    argv = entrypoint(build, "train")
    assert argv[:2] == ["metatrainer", "train"], argv
    flags = train_flags(argv)
    assert flags.workers and flags.gpus_per_worker is not None, "say --workers, --gpus-per-worker"
    (spec,) = ray_cluster_specs(rayjobs(build)["train"])
    (group,) = spec["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    gpus = gpus_per_pod(group["template"])
    if flags.gpus_per_worker:
        assert flags.workers * flags.gpus_per_worker <= group["replicas"] * gpus
        assert flags.gpus_per_worker == gpus  # one training worker per GPU, ranks 0.. per pod
    else:  # CPU: one training worker per pod, so each pod serves metrics on 9100 only
        cpus = float(group["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
        assert gpus == 0 and flags.cpus_per_worker == cpus
        assert flags.workers <= group["replicas"]
    assert flags.metrics_port == METRICS_BASE_PORT  # the port the manifests and PodMonitor use


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_training_reads_the_weights_from_s3_with_a_checksum(build):
    """No pod downloads ImageNet weights from the internet: they come from the bucket, checked."""
    flags = train_flags(entrypoint(build, "train"))
    assert flags.weights and flags.weights.startswith("s3://"), flags.weights
    assert flags.weights_sha256, "--weights-sha256 pins the file"


@needs_kubectl
@pytest.mark.parametrize("build", OVERLAY_NAMES)
def test_prep_cluster_mounts_the_images_everywhere_read_only(build):
    argv = entrypoint(build, "prep")
    assert argv[:2] == ["metatrainer", "prep"], argv
    src = argv[2]
    (spec,) = ray_cluster_specs(rayjobs(build)["prep"])
    templates = [spec["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["workerGroupSpecs"]
    ]
    for template in templates:
        (mount,) = [
            m for m in template["spec"]["containers"][0]["volumeMounts"] if m["mountPath"] == src
        ]
        assert mount.get("readOnly") is True


# --- Ray's object store: in /dev/shm, as Ray 2.60 sizes and places it -----------------------------

MiB, GiB = 2**20, 2**30
# ray._private.ray_constants
OBJECT_STORE_PROPORTION = 0.3  # DEFAULT_OBJECT_STORE_MEMORY_PROPORTION
OBJECT_STORE_MAX = 200 * 10**9  # DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES
SHM_THRESHOLD = 10**10  # REQUIRE_SHM_SIZE_THRESHOLD
OBJECT_STORE_MIN = 75 * MiB  # OBJECT_STORE_MINIMUM_MEMORY_BYTES
RUNTIME_SHM = 64 * MiB  # a container's /dev/shm without a volume there


def default_object_store(memory: int, shm: int) -> int:
    """Ray's object store without `object-store-memory` (resolve_object_store_memory): 30% of the
    memory, capped at 95% of /dev/shm, but never below 10 GB."""
    cap = min(OBJECT_STORE_MAX, max(SHM_THRESHOLD, int(shm * 0.95)))
    return min(int(memory * OBJECT_STORE_PROPORTION), cap)


def in_dev_shm(store: int, shm: int) -> bool:
    """Whether Ray puts the store in /dev/shm (determine_plasma_store_config); else it falls back to
    /tmp/ray ("This will harm performance"), or refuses to start above 10 GB."""
    return shm >= store


def memory_limit(container: dict) -> int:
    return int(quantity(container.get("resources", {}).get("limits", {}).get("memory", 0)))


def dev_shm(t: PodTemplate) -> int:
    """The size of the pod's /dev/shm: a memory-backed emptyDir is a tmpfs of its sizeLimit, but no
    larger than the pod's memory limit (the kubelet's rule)."""
    volumes = {v["name"]: v for v in t.spec.get("volumes", [])}
    for mount in t.ray_container.get("volumeMounts", []):
        empty_dir = volumes.get(mount["name"], {}).get("emptyDir", {})
        if mount["mountPath"] == "/dev/shm" and empty_dir.get("medium") == "Memory":
            pod_memory = sum(memory_limit(c) for c in t.spec["containers"])
            return min(int(quantity(empty_dir["sizeLimit"])), pod_memory)
    return RUNTIME_SHM


def object_store(t: PodTemplate) -> int:
    """The store Ray 2.60 starts with on this pod. The default is computed from the memory limit,
    the most memory Ray can see there (it takes 30% of what is free at start)."""
    explicit = t.ray_start_params.get("object-store-memory")
    if explicit:
        return int(explicit)
    return default_object_store(memory_limit(t.ray_container), dev_shm(t))


@needs_kubectl
@pytest.mark.parametrize("t", built(RAY_NODES), ids=template_id)
def test_object_store_is_in_dev_shm(t):
    """Every Ray pod keeps its object store in memory (/dev/shm), not on disk under /tmp/ray; on a
    training worker it leaves half of /dev/shm to the DataLoader workers' tensors; and the memory
    limit, which a full /dev/shm counts against, still leaves the processes half of it."""
    store, shm, memory = object_store(t), dev_shm(t), memory_limit(t.ray_container)
    assert in_dev_shm(store, shm), f"object store {store / GiB:.2f} GiB > /dev/shm {shm / GiB} GiB"
    assert OBJECT_STORE_MIN <= store <= memory
    if t.role == "worker" and t.component == "train":
        assert store <= shm // 2, "no room left in /dev/shm for the DataLoader workers"
    assert shm <= memory // 2, f"/dev/shm {shm / GiB} GiB of a {memory / GiB} GiB memory limit"


def test_object_store_rules_are_rays(monkeypatch):
    """default_object_store and in_dev_shm against Ray's own functions, for the sizes we use and
    a node large enough for the 10 GB floor and the cap."""
    utils = pytest.importorskip("ray._private.utils")
    services = pytest.importorskip("ray._private.services")
    common = pytest.importorskip("ray._common.utils")
    monkeypatch.setattr(common, "get_system_memory", lambda: 512 * GiB)
    cases = [(8 * GiB, 2 * GiB), (48 * GiB, 16 * GiB), (4 * GiB, 1 * GiB), (400 * GiB, 64 * GiB)]
    for memory, shm in cases:
        monkeypatch.setattr(utils, "get_shared_memory_bytes", lambda shm=shm: shm)
        store = utils.resolve_object_store_memory(memory)
        assert default_object_store(memory, shm) == store, (memory, shm)
        for size in (store, shm, shm + 1):
            if size <= SHM_THRESHOLD or size <= shm:
                directory, _, _ = services.determine_plasma_store_config(size, "/tmp/ray")
                assert (directory == "/dev/shm") == in_dev_shm(size, shm), (size, shm)


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


def entrypoints() -> dict[str, list[str]]:
    found = {
        f"{build} {step}": entrypoint(build, step)
        for build in sorted(OVERLAYS)  # the ones kubectl built
        for step in ("prep", "train")
    }
    for i, argv in enumerate(submit_commands((DEPLOY / "README.md").read_text())):
        found[f"README.md ray job submit #{i + 1}"] = argv
    return found


ENTRYPOINTS = entrypoints()


@needs_kubectl
@pytest.mark.parametrize("where", built(list(ENTRYPOINTS)))
def test_entrypoint_is_a_valid_metatrainer_command(where, capsys):
    argv = ENTRYPOINTS[where]
    assert argv[0] == "metatrainer" and argv[1] in ("prep", "train", "evaluate"), argv
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: metatrainer rejects {shlex.join(argv)}:\n{capsys.readouterr().err}")
    assert args.command == argv[1]
    assert getattr(args, "metrics_port", METRICS_BASE_PORT) == METRICS_BASE_PORT
