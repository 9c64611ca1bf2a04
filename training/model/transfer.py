"""Carry a meta-trained run to new datasets: `metatrainer train --init-from RUN_OR_CHECKPOINT`.

The new run starts from the source's adapters, frozen unless --train-adapters, and makes a new
head for each of its own datasets: heads are never carried, the new datasets have other
classes. The adapters only mean something on the backbone they were trained on, so the backbone
that --weights (and, for `none`, --seed) gives must be the source's, bit for bit; --adapters
left out takes the source's stages, given it must name them.

    metatrainer train --data ./shards-new --storage ./runs --name new --weights none \
        --init-from ./runs/meta [--train-adapters]

The driver checks all of this before Ray starts (`check_init`). The workers load the adapters
only when the run has no checkpoint of its own (`init_adapters`): a resumed run continues from
its own state. Frozen adapters are still stored in the new run's checkpoints, so `evaluate`,
`predict` and `report` rebuild the whole model from the run alone; and with them frozen and no
augmentation, nothing in the backbone trains, so the feature cache applies
(`training.data.features`, keyed on the adapters too).
"""

from __future__ import annotations

from cluster import storage
from cluster.errors import UserError
from training.config import TrainConfig
from training.model.checkpoint import TrainState, find_checkpoint, load_state
from training.model.network import MetaModel, build_model


def adapters_frozen(cfg: TrainConfig) -> bool:
    """Whether the run's adapters stay as --init-from gave them (nothing in the backbone
    trains then)."""
    return bool(cfg.model.init_from) and not cfg.model.train_adapters


def load_source(location: str) -> TrainState:
    """The newest checkpoint of the run, checkpoint directory or state file at `location`."""
    try:
        return load_state(find_checkpoint(location))
    except UserError as e:
        raise UserError(f"--init-from {e}") from None


def source_adapters(state: TrainState) -> dict:
    """The source's adapter tensors, by their names in the model."""
    return {k: v for k, v in state.model.items() if ".adapter." in k}


def check_init(cfg: TrainConfig) -> None:
    """Driver preflight: the source is a run with adapters, on the backbone --weights gives,
    with the stages --adapters names (filled in from the source when left out)."""
    if not cfg.model.init_from:
        if cfg.model.train_adapters:
            raise UserError(
                "--train-adapters goes with --init-from (adapters of a new run always train)"
            )
        return
    cfg.model.init_from = storage.normalize(cfg.model.init_from)
    own = _own_stages(cfg)
    if own is not None:
        # Resuming: the run goes on from its own checkpoint, whatever became of the source.
        same = not cfg.model.adapters or sorted(cfg.model.adapters) == sorted(own)
        cfg.model.adapters = own if same else cfg.model.adapters  # else check_resumable says so
        return
    state = load_source(cfg.model.init_from)
    source = TrainConfig.from_dict(state.config)
    stages = list(source.model.adapters)
    if not stages or not source_adapters(state):
        raise UserError(
            f"--init-from {cfg.model.init_from}: that run has no adapters to carry (it trained "
            "heads only); give a run trained with --adapters, or leave --init-from out"
        )
    if cfg.model.adapters and sorted(cfg.model.adapters) != sorted(stages):
        raise UserError(
            f"--adapters {','.join(cfg.model.adapters)} differs from the stages of --init-from "
            f"({','.join(stages)}); leave --adapters out or give {','.join(stages)}"
        )
    cfg.model.adapters = stages
    backbone = build_model(cfg.model.weights, [], [], cfg.optim.seed, cfg.model.weights_sha256)
    if backbone.backbone_fingerprint() != state.backbone["sha256"]:
        raise UserError(
            f"--weights {cfg.model.weights} --seed {cfg.optim.seed} gives another backbone than "
            f"the one --init-from was trained on (--weights {source.model.weights} --seed "
            f"{source.optim.seed}): its adapters only fit that one; use its --weights and --seed"
        )


def _own_stages(cfg: TrainConfig) -> list[str] | None:
    """The adapter stages of the run's own newest checkpoint (None: it has none to resume
    from, or none readable: then the source is checked as for a new run)."""
    try:
        state = load_state(find_checkpoint(storage.join(cfg.run.storage, cfg.run.name)))
    except UserError:
        return None
    return list(TrainConfig.from_dict(state.config).model.adapters)


def init_adapters(model: MetaModel, cfg: TrainConfig, backbone_sha: str) -> None:
    """Worker: load the source's adapters into a new run's model (its heads stay new). The
    driver checked the source; this checks again what may have changed since (it is read
    again here, on every rank)."""
    state = load_source(cfg.model.init_from)
    if state.backbone["sha256"] != backbone_sha:
        raise UserError(f"--init-from {cfg.model.init_from} was trained on another backbone")
    adapters = source_adapters(state)
    mine = {k for k in model.trainable_state_dict() if ".adapter." in k}
    if set(adapters) != mine:
        raise UserError(
            f"--init-from {cfg.model.init_from}: its adapters do not match --adapters "
            f"{','.join(cfg.model.adapters)}"
        )
    model.load_state_dict(adapters, strict=False)


def check_same_transfer(state: TrainState, cfg: TrainConfig) -> None:
    """A resumed run keeps its adapters frozen or training, as it started: the optimizer's
    state covers exactly what trained."""
    before = TrainConfig.from_dict(state.config)
    if adapters_frozen(before) != adapters_frozen(cfg):
        was = "frozen" if adapters_frozen(before) else "training"
        raise UserError(
            f"run {cfg.run.name!r} was started with its adapters {was}; resume with the same "
            "--init-from/--train-adapters or start a new run with another --name"
        )
