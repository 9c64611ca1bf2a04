"""What a rank trains and where it stands: the model, its optimizer and schedule, and the
position in the data, built from the config, then restored from the run's newest readable
checkpoint (mid-epoch included) or, for a new run with --init-from, given that run's adapters
(`training.model.transfer`). Every checkpoint holds all of it (`RankState.train_state`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cluster.world import World
from data_prep.contract import Manifest
from training.config import TrainConfig
from training.model.checkpoint import Position, TrainState, rng_state, set_rng_state
from training.model.network import MetaModel, build_model
from training.model.transfer import adapters_frozen, check_same_transfer, init_adapters
from training.run.resume import check_resumable, restore_state


@dataclass
class RankState:
    """The run's model, optimizer, schedule and position on this rank, and what identifies
    the run's backbone and data in its checkpoints."""

    cfg: TrainConfig
    manifests: list[Manifest]
    model: MetaModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    backbone_sha: str
    digests: list[str]
    """sha256 of each dataset's manifest (`Manifest.digest`)."""
    pos: Position = field(default_factory=Position)

    def train_state(self) -> TrainState:
        """The checkpoint's contents as they stand now."""
        cfg = self.cfg
        return TrainState(
            model=self.model.trainable_state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            position=self.pos,
            rng=rng_state(),
            config=cfg.to_dict(),
            classes=[m.classes for m in self.manifests],
            backbone={"weights": cfg.model.weights, "sha256": self.backbone_sha},
            datasets=self.digests,
        )


def build_model_and_optim(cfg: TrainConfig, manifests: list[Manifest]) -> RankState:
    """A new model with a head per dataset, and an optimizer for what of it trains."""
    classes = [len(m.classes) for m in manifests]
    model = build_model(
        cfg.model.weights, classes, cfg.model.adapters, cfg.optim.seed, cfg.model.weights_sha256
    )
    backbone_sha = model.backbone_fingerprint()
    digests = [m.digest() for m in manifests]
    if adapters_frozen(cfg):
        model.freeze_adapters()  # before the optimizer, which takes what trains
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, cfg.optim.lr_step, cfg.optim.lr_gamma)
    return RankState(cfg, manifests, model, optimizer, scheduler, backbone_sha, digests)


def restore(state: RankState, world: World, say: Callable[[str], None]) -> None:
    """Load the checkpoint the run resumes from into `state`, RNGs and position included; a
    run without one of its own starts from --init-from's adapters, if given."""
    cfg = state.cfg
    saved = restore_state(cfg, world, say)
    if saved:
        check_resumable(saved, cfg, state.backbone_sha, state.digests)
        check_same_transfer(saved, cfg)
        state.model.load_trainable(saved.model)
        state.optimizer.load_state_dict(saved.optimizer)
        state.scheduler.load_state_dict(saved.scheduler)
        set_rng_state(saved.rng)
        state.pos = pos = saved.position
        if world.is_main:
            say(
                f"resuming {cfg.run.name} at epoch {pos.epoch + 1}, sample {pos.consumed} "
                f"(step {pos.step}) on {world.world_size} workers"
            )
    elif cfg.model.init_from:
        # Only a run without a checkpoint of its own starts from another run's adapters.
        init_adapters(state.model, cfg, state.backbone_sha)
        if world.is_main:
            how = "training" if cfg.model.train_adapters else "frozen"
            say(f"adapters from {cfg.model.init_from} ({how}), new heads")
