"""Typed training configuration: defaults here, overridden by CLI flags.

The resolved config is stored in every checkpoint and in `result.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

STAGES = ("layer1", "layer2", "layer3", "layer4")
"""The ResNet-50 stages whose bottleneck blocks can carry adapters."""


@dataclass
class TrainConfig:
    """A run's settings. Running again with the same storage and name resumes the run: the
    fields that make it what it is (model, data order, recipe) must be as it started, the rest
    take effect from the resume point (`training.resume.IDENTITY_FIELDS`, `APPLIED_FIELDS`)."""

    data: list[str] = field(default_factory=list)
    """Prepared dataset locations (each a directory or s3:// prefix holding manifest.json)."""
    storage: str = "./runs"
    """Where Ray Train writes checkpoints and results: a shared path or s3:// prefix."""
    name: str = "run"
    """Run name; running again with the same name resumes from the latest checkpoint."""

    weights: str = "imagenet"
    """Backbone weights: `imagenet`, `IMAGENET1K_V1`, `IMAGENET1K_V2`, `none`, a local file, or
    a file at an `s3://`, `https://` or `http://` URL (needs weights_sha256; each node downloads
    it once into `<METATRAINER_CACHE_DIR or ~/.cache/metatrainer>/weights/`)."""
    weights_sha256: str | None = None
    """The weights file's sha256 (`sha256sum FILE`): required for a URL, checked on every load
    (a mismatch is an error naming both hashes, and nothing is cached); for a local file
    optional, and checked when given."""
    adapters: list[str] = field(default_factory=list)
    """ResNet stages (layer1..layer4) whose bottlenecks get a zero-initialised 1×1 adapter."""
    meta_lambda: float = 1e-3
    """Weight λ of the adapter penalty Σ_i mean(r_i²) in the meta-loss."""
    init_from: str | None = None
    """A meta-trained run, checkpoint directory or state.pt whose adapters this run starts
    from (with new heads); only when the run has no checkpoint of its own (`training.transfer`)."""
    train_adapters: bool = False
    """With init_from: go on training the adapters (by default they stay frozen)."""

    epochs: int = 20
    """Epochs the run trains in all: raise it when resuming to train on."""
    batch_size: int | None = 32
    """Per worker: a step is batch_size × workers samples, so it follows the worker count.
    None when global_batch is given (exactly one of the two is)."""
    global_batch: int | None = None
    """Samples a step, over all workers whatever their number: each takes the share the order
    deals it (about global_batch / workers), so an elastic run that shrinks or grows trains
    the same steps, and ends with the same weights, as a fixed-size one."""
    lr: float = 1e-3
    """Adam's learning rate; with lr_step and lr_gamma fixed for the life of a run."""
    lr_step: int = 5
    """StepLR step size in epochs."""
    lr_gamma: float = 0.1
    """StepLR's factor on the learning rate every lr_step epochs."""
    image_size: int = 224
    """Side of the square training and evaluation inputs, in pixels."""
    augment: bool = True
    """Random resized crop + horizontal flip on training images."""
    seed: int = 1234
    """Seeds the data order, the augmentation, the new heads and a `none` backbone."""

    workers: int = 2
    """Training workers (DDP ranks); with min_workers set, the most Ray may start."""
    min_workers: int | None = None
    """Elastic training: keep going with as few as this many workers when nodes are lost."""
    resize_check: float = 60.0
    """Elastic training: seconds between Ray Train's checks for room to grow back to MAX."""
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    loader_workers: int = 2
    """DataLoader worker processes per training worker (0: decode in the training process)."""
    max_failures: int = 3
    start_timeout: float = 600.0
    """Seconds each attempt to start the workers waits for their resources (CPUs, GPUs, a
    placement group); after START_ATTEMPTS attempts the run ends and says what was missing."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every N global steps (0: only at the end of each epoch)."""
    keep_checkpoints: int = 3
    """Checkpoints kept in storage; older ones are deleted (0 keeps all)."""
    partitions: int | None = None
    """Parts of the data order, dealt to the ranks (any number of ranks serves any P). Fixed for
    the life of a run (part of the order, like the seed). None: 1024, fewer for a small train
    split (`training.order.auto_partitions`), resolved when the run starts."""
    shuffle_block: int | None = None
    """Samples of a partition read together and permuted together (part of the order). None:
    as many as keep a dataset's chunks in reading under 2 GB (`training.order.auto_block`)."""
    mix: str = "proportional"
    """With several datasets, how a step's batch is shared among them (part of the order):
    `proportional` to their train samples (each read once an epoch), `uniform`, or
    `temperature:T` (∝ samples^(1/T)); an epoch reads every dataset at least once, smaller
    shares wrapping into further passes (`training.mix`)."""
    decode: str = "auto"
    """Where training JPEGs are decoded: `cpu` (loader workers), `gpu` (in batches on the
    training GPU; other files fall back to the CPU), `auto` (gpu when training on GPUs)."""
    compile: bool = False
    """torch.compile the model: a slower start, faster GPU steps."""
    feature_cache: str = "auto"
    """`on`: compute the frozen backbone's features of each split once (stored with the run)
    and train the heads from them; needs no --adapters and --no-augment. `auto`: whenever that
    applies. `off`: never."""
    log_every: int = 20
    """Read the loss terms from the device every N steps (metrics, epoch means): in between,
    a GPU never waits for the host."""
    sample_log: str | None = None
    """Debug: append each trained batch's sample keys to SAMPLE_LOG/rank-R.tsv (a local dir)."""
    debug: bool = False
    """Print the traceback of an error, the workers' too, not only its one line."""
    metrics_port: int = 9100
    """Workers serve /metrics on this port + their local rank; 0 disables."""

    s3_endpoint: str | None = None
    """S3 endpoint URL for s3:// locations (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)."""
    s3_timeout: float = 60.0
    """Seconds an S3 request waits for an answer, per attempt (botocore makes 8)."""
    cache_dir: str | None = None
    """Keep shards read from S3 on local disk here, for later epochs (default: each node's
    METATRAINER_CACHE_DIR, where it sets one)."""
    cache_size: int = 10 * 10**9
    """Bytes the shard cache may hold; least recently used shards are dropped beyond it."""

    def step_samples(self, workers: int) -> int:
        """A global step's samples on `workers` workers."""
        return self.global_batch or (self.batch_size or 0) * workers

    def rank_batch(self, workers: int) -> int:
        """About one worker's share of a step: its evaluation batch size."""
        return self.batch_size or -(-(self.global_batch or 1) // workers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# `metatrainer demo`: sized to finish in minutes on 2 CPU cores. ImageNet weights cannot be
# assumed reachable, so it trains heads on a randomly initialised (seeded) frozen backbone.
DEMO_DEFAULTS = TrainConfig(
    weights="none",
    epochs=12,
    lr_step=8,
    image_size=32,
    augment=False,
    workers=2,
    loader_workers=0,
)
