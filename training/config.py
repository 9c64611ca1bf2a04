"""A run's settings, declared once: typed sections, each field with its docstring.

    [data]     what is read and how: datasets, inputs, the data order, loaders, caches
    [model]    the backbone, the adapters and the meta-loss
    [optim]    epochs, batch, learning-rate schedule, seed
    [cluster]  workers and their resources, restarts, metrics
    [run]      where the run lives, checkpoints, logging
    [s3]       the S3 endpoint and its timeout

The `train` and `tune` flags, their --help text and defaults are generated from these fields
(`training.cli.flags`); a `--config FILE` is TOML in the same sections
(`training.config_file`). A field's flag is `--` and its name with dashes unless its metadata
names another `flag` (None: no flag of its own); the metadata may also give the flag's
`metavar`, its `choices`, and `parse`, how its text is read (`size`: 50GB, `stages`:
layer3,layer4, `workers`: N or MIN-MAX, `mix`). Field names are unique across sections, so a
flat name (`lr`, `workers`) finds its section (`TrainConfig.of`, `flat`, `replace`). The
resolved config is stored in every checkpoint, in `result.json` and as `RUN/config.toml`.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import textwrap
import types
from dataclasses import Field, dataclass, field, fields
from typing import Any, get_type_hints

STAGES = ("layer1", "layer2", "layer3", "layer4")
"""The ResNet-50 stages whose bottleneck blocks can carry adapters."""


@dataclass
class DataConfig:
    """What is read and how."""

    datasets: list[str] = field(default_factory=list, metadata={"flag": "--data", "metavar": "DST"})
    """Prepared datasets, each a directory or s3:// prefix holding manifest.json (repeat
    --data to meta-train on several)."""
    image_size: int = 224
    """Side of the square training and evaluation inputs, in pixels."""
    augment: bool = True
    """Random resized crops and horizontal flips on training images."""
    partitions: int | None = field(default=None, metadata={"metavar": "P"})
    """Parts of the data order, dealt to the ranks (any number of workers serves any P);
    fixed for the life of a run, like the seed. Unset (None): 1024, or the largest power of two
    that leaves a small train split 64 samples a partition
    (`training.data.order.auto_partitions`)."""
    shuffle_block: int | None = field(default=None, metadata={"metavar": "N"})
    """Samples of a partition read and shuffled together; with the seed and partitions it fixes
    the data order. Unset (None): what keeps a dataset's readers under 2 GB, 8 to 4096
    (`training.data.order.auto_block`)."""
    mix: str = field(
        default="proportional",
        metadata={"metavar": "proportional|uniform|temperature:T", "parse": "mix"},
    )
    """Several datasets: how each step's batch is shared among them, `proportional` to their
    train samples, `uniform`, or `temperature:T` (∝ samples^(1/T)); an epoch reads every
    dataset at least once, smaller shares going round again in a fresh order
    (`training.data.mix`)."""
    loader_workers: int = 2
    """DataLoader processes per training worker, each decoding whole steps (0: decode in the
    training process)."""
    decode: str = field(default="auto", metadata={"choices": ("auto", "cpu", "gpu")})
    """Where training JPEGs are decoded: `cpu` (loader workers), `gpu` (in batches on the
    training GPU), `auto` (gpu when training on GPUs)."""
    feature_cache: str = field(default="auto", metadata={"choices": ("auto", "on", "off")})
    """`on`: train the heads on the frozen backbone's features, computed once per split and
    stored with the run (needs no adapters and no augmentation); `auto`: whenever that
    applies; `off`: never."""
    cache_dir: str | None = None
    """Keep shards streamed from S3 on local disk here for later epochs (default: each node's
    METATRAINER_CACHE_DIR, where it sets one: the node's own local disk)."""
    cache_size: int = field(default=10 * 10**9, metadata={"parse": "size"})
    """Bytes the shard cache may hold, e.g. 50GB; least recently used shards are dropped beyond
    it."""


@dataclass
class ModelConfig:
    """The frozen backbone, what trains on it, and the meta-loss."""

    weights: str = "imagenet"
    """Backbone weights: `imagenet` (torchvision's DEFAULT), `IMAGENET1K_V1`, `IMAGENET1K_V2`,
    `none` (random, seeded), a local resnet50 state_dict file, or one at an s3://, https:// or
    http:// URL with weights_sha256, which each node downloads once into its cache
    (METATRAINER_CACHE_DIR, else ~/.cache/metatrainer)."""
    weights_sha256: str | None = field(default=None, metadata={"metavar": "HEX"})
    """The weights file's sha256, as `sha256sum FILE` prints it: required for a URL, optional
    for a local file; checked on every load, a mismatch is an error naming both hashes."""
    adapters: list[str] = field(default_factory=list, metadata={"parse": "stages"})
    """ResNet stages (layer1..layer4) whose bottlenecks get a zero-initialised 1×1 residual
    adapter; on the command line comma-separated, or none."""
    meta_lambda: float = 1e-3
    """Weight λ of the adapter penalty Σ_i mean(r_i²) in the meta-loss."""
    init_from: str | None = field(default=None, metadata={"metavar": "RUN_OR_CHECKPOINT"})
    """Start from the adapters of this meta-trained run (a run directory, checkpoint directory
    or state.pt, local or s3://), frozen, with a new head per dataset; needs the same backbone
    (weights, seed); adapters default to the run's stages. Only a run without a checkpoint of
    its own starts from it (`training.model.transfer`)."""
    train_adapters: bool = False
    """With init_from: go on training its adapters instead of keeping them frozen."""
    compile: bool = False
    """torch.compile the model: a slower start, faster GPU steps."""


@dataclass
class OptimConfig:
    """How long and how the run trains."""

    epochs: int = 20
    """Epochs the run trains in all: raise it when resuming to train on."""
    batch_size: int | None = 32
    """Per worker: a step is batch_size × workers samples, so it follows the worker count.
    None when global_batch is given (exactly one of the two is)."""
    global_batch: int | None = field(default=None, metadata={"metavar": "G"})
    """Instead of batch_size: samples a step over all workers, however many; each takes the
    share the order deals it, so an elastic run (--workers MIN-MAX) trains the weights of a
    fixed-size one."""
    lr: float = 1e-3
    """Adam's learning rate; with lr_step and lr_gamma fixed for the life of a run."""
    lr_step: int = 5
    """StepLR step size in epochs."""
    lr_gamma: float = 0.1
    """StepLR's factor on the learning rate every lr_step epochs."""
    seed: int = 1234
    """Seeds the data order, the augmentation, the new heads and a `none` backbone."""


@dataclass
class ClusterConfig:
    """The workers and what they need."""

    workers: int = field(default=2, metadata={"metavar": "N|MIN-MAX", "parse": "workers"})
    """Training workers, one DDP rank each; with min_workers set, the most Ray may start (on
    the command line N, or MIN-MAX to train elastically)."""
    min_workers: int | None = field(default=None, metadata={"flag": None})
    """Elastic training: keep going with as few as this many workers when nodes are lost."""
    resize_check: float = field(default=60.0, metadata={"metavar": "SECONDS"})
    """Elastic (--workers MIN-MAX): seconds between Ray Train's checks for room to grow back to
    MAX workers."""
    gpus_per_worker: float = 0.0
    """GPUs per worker; 0 trains on CPU with gloo."""
    cpus_per_worker: float = 1.0
    """CPUs per worker."""
    max_failures: int = 3
    """Worker-group restarts from the latest checkpoint after a fault (a killed worker, a lost
    node); a mistake a worker finds in your input (a bad label) ends the run at once."""
    start_timeout: float = field(default=600.0, metadata={"metavar": "SECONDS"})
    """Seconds each of 3 attempts to start the workers waits for their resources (CPUs, GPUs,
    a placement group); then the run ends, saying what was missing."""
    metrics_port: int = 9100
    """Workers serve Prometheus /metrics on this port + their local rank; 0 disables."""


@dataclass
class RunConfig:
    """Where the run lives and what it keeps."""

    storage: str = field(default="./runs", metadata={"metavar": "RUNS"})
    """Where Ray Train writes checkpoints and results: a shared path or s3:// prefix."""
    name: str = field(default="run", metadata={"metavar": "RUN"})
    """Run name, the resume key: running again with the same storage and name resumes from the
    latest checkpoint."""
    checkpoint_every_steps: int = field(default=0, metadata={"metavar": "N"})
    """Also checkpoint every N global steps, not only at the end of each epoch (0: only
    there)."""
    keep_checkpoints: int = field(default=3, metadata={"metavar": "K"})
    """Checkpoints kept in storage, the newest; older ones are deleted (0 keeps all)."""
    log_every: int = 20
    """Read the loss terms from the device every N steps (metrics, epoch means): in between, a
    GPU never waits for the host."""
    sample_log: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Debug: append each trained batch's sample keys to rank-R.tsv in this local
    directory."""
    debug: bool = field(default=False, metadata={"flag": None})
    """Print the traceback of an error, the workers' too, not only its one line."""
    mlflow: str | None = field(default=None, metadata={"metavar": "URI"})
    """Track the run in MLflow at this tracking URI: http(s)://HOST:PORT of a tracking server,
    or a local directory (default: MLFLOW_TRACKING_URI; neither: nothing is tracked); needs
    pip install 'metatrainer[mlflow]' (`training.run.tracking`)."""
    mlflow_experiment: str = field(default="metatrainer", metadata={"metavar": "NAME"})
    """The MLflow experiment a new run is tracked in (a resumed run stays in its own)."""


@dataclass
class S3Config:
    """The S3-compatible endpoint of s3:// locations; credentials come only from the standard
    AWS chain."""

    endpoint: str | None = field(default=None, metadata={"flag": "--s3-endpoint", "metavar": "URL"})
    """S3-compatible endpoint URL, e.g. http://minio:9000 (default: AWS_ENDPOINT_URL_S3 or
    AWS_ENDPOINT_URL); credentials come only from the standard AWS chain."""
    timeout: float = field(default=60.0, metadata={"flag": "--s3-timeout", "metavar": "SECONDS"})
    """Seconds an S3 request waits for an answer, per attempt (botocore makes 8): a hung
    endpoint is reported after about 8 × this."""


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "cluster": ClusterConfig,
    "run": RunConfig,
    "s3": S3Config,
}
"""TrainConfig's sections, in the order of `--help` and of a config file."""

# Names a field went by when the config was flat (checkpoints and result.json of older runs).
FLAT_NAMES = {"datasets": "data", "endpoint": "s3_endpoint", "timeout": "s3_timeout"}


def _where() -> dict[str, tuple[str, str]]:
    """Flat name → (section, field)."""
    found = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            found[FLAT_NAMES.get(f.name, f.name)] = (section, f.name)
    return found


WHERE = _where()


def flag_of(f: Field) -> str | None:
    """A field's flag: `--` and its name with dashes, unless its metadata names another."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


FLAGS = {
    FLAT_NAMES.get(f.name, f.name): flag_of(f) for cls in SECTIONS.values() for f in fields(cls)
}
"""Flat name → its flag (None: none of its own)."""


def flag_name(flat: str) -> str:
    """How a message names the flag of a flat config name (`--lr`), own flag or not."""
    return FLAGS.get(flat) or "--" + flat.replace("_", "-")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """A section's attribute docstrings, {field: text on one line}, read from its source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen build): flags without help
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@functools.cache
def field_types(cls: type) -> dict[str, type]:
    """A section's field types, {field: int, float, str, bool or list}; `X | None` is X."""
    found = {}
    for name, hint in get_type_hints(cls).items():
        if isinstance(hint, types.UnionType):
            hint = next(h for h in hint.__args__ if h is not type(None))
        found[name] = getattr(hint, "__origin__", hint)
    return found


@dataclass
class TrainConfig:
    """A run's settings. Running again with the same storage and name resumes the run: the
    fields that make it what it is (model, data order, recipe) must be as it started, the rest
    take effect from the resume point (`training.run.resume.IDENTITY_FIELDS`,
    `APPLIED_FIELDS`)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)
    s3: S3Config = field(default_factory=S3Config)

    @classmethod
    def of(cls, **flat: Any) -> TrainConfig:
        """A config from flat field names, the rest defaults: `TrainConfig.of(lr=0.01)`."""
        cfg = cls()
        for name, value in flat.items():
            section, key = _locate(name)
            setattr(getattr(cfg, section), key, value)
        return cfg

    def flat(self) -> dict[str, Any]:
        """Every field by its flat name (`lr`, `data`, `s3_endpoint`)."""
        return {n: getattr(getattr(self, s), k) for n, (s, k) in WHERE.items()}

    def replace(self, **flat: Any) -> TrainConfig:
        """A copy with these fields (flat names) changed; the original is left as it is."""
        return TrainConfig.of(**{**copy.deepcopy(self.flat()), **flat})

    def step_samples(self, workers: int) -> int:
        """A global step's samples on `workers` workers."""
        o = self.optim
        return o.global_batch or (o.batch_size or 0) * workers

    def rank_batch(self, workers: int) -> int:
        """About one worker's share of a step: its evaluation batch size."""
        o = self.optim
        return o.batch_size or -(-(o.global_batch or 1) // workers)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{section: {field: value}}, as stored in checkpoints and result.json."""
        return {
            s: {f.name: copy.deepcopy(getattr(getattr(self, s), f.name)) for f in fields(cls)}
            for s, cls in SECTIONS.items()
        }

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From `to_dict`'s sections, or from the flat dict older runs recorded; keys this
        version does not know are left out."""
        if any(isinstance(d.get(s), dict) for s in SECTIONS):
            flat = {}
            for section, values in d.items():
                if section in SECTIONS and isinstance(values, dict):
                    known = {f.name for f in fields(SECTIONS[section])}
                    flat |= {FLAT_NAMES.get(k, k): v for k, v in values.items() if k in known}
            return cls.of(**flat)
        return cls.of(**{k: v for k, v in d.items() if k in WHERE})


def _locate(name: str) -> tuple[str, str]:
    try:
        return WHERE[name]
    except KeyError:
        raise TypeError(f"TrainConfig has no field {name!r}") from None


# `metatrainer demo`: sized to finish in minutes on 2 CPU cores. ImageNet weights cannot be
# assumed reachable, so it trains heads on a randomly initialised (seeded) frozen backbone.
DEMO_DEFAULTS = TrainConfig.of(
    weights="none",
    epochs=12,
    lr_step=8,
    image_size=32,
    augment=False,
    workers=2,
    loader_workers=0,
)
