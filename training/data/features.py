"""The feature cache: the frozen backbone's pooled features of each split, computed once a run.

When nothing inside the backbone trains (no adapters, or adapters frozen as `--init-from`
carried them) and no random augmentation is on, a sample's 2048-d features never change:
computing them every epoch is the whole cost of an epoch. So they are computed once, stored
with the run, and every epoch trains the heads from them, in exactly the order (and so to
exactly the weights) of the uncached run.

    STORAGE/NAME/features/<key>/piece-000000.pt     PIECE samples of a split's layout each

The key digests everything the features depend on: the backbone's fingerprint, the frozen
adapters' (if any), image size and crop, where JPEGs are decoded, the precision, and the
split's shards (names and sha256). A change of any of them is a new key, so stale features are
never used. A piece is written atomically (temporary name, then rename; one PUT on S3), so a
run interrupted while filling the cache keeps its finished pieces and computes only the rest
when it resumes.

Rank r fills pieces r, r+R, …; training then loads, from all pieces, only the rows of its own
partitions (1/R of the split), and evaluation counts on the rank's own pieces.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cluster import storage
from cluster.errors import UserError
from cluster.world import World
from data_prep.contract import Manifest
from training.config import TrainConfig
from training.data import order
from training.data.batches import EvalBatches, TrainBatches
from training.data.decode import to_input
from training.data.loader import build_loader
from training.model.network import MetaModel, eval_center, state_fingerprint
from training.model.step import autocast, batch_invariant
from training.model.transfer import adapters_frozen

PIECE = 4096
"""Samples per stored piece (at most): the unit of filling, resuming and loading."""
FILL_BATCH = 64
"""Samples per backbone forward when filling (at least; nearly equal batches within a piece).
On the CPU, oneDNN computes a sample's features bit for bit alike in any batch of 16 or more
samples, but with other kernels in smaller ones: so the cached run equals the uncached one
exactly when its per-rank batches hold at least 16 samples (and within rounding otherwise)."""


def cache_applies(cfg: TrainConfig) -> bool:
    """Whether this run trains from cached features (`--feature-cache`)."""
    fits = (not cfg.model.adapters or adapters_frozen(cfg)) and not cfg.data.augment
    if cfg.data.feature_cache == "on" and not fits:
        raise UserError(
            "--feature-cache on needs a backbone with nothing to train and fixed inputs: drop "
            "--adapters (or keep --init-from's frozen: no --train-adapters) and add "
            "--no-augment, or use --feature-cache auto"
        )
    return cfg.data.feature_cache != "off" and fits


def cache_key(
    backbone_sha: str,
    cfg: TrainConfig,
    manifest: Manifest,
    split: str,
    device: torch.device,
    device_decode: bool = False,
    adapters: str | None = None,
) -> str:
    """What a split's features depend on, digested (see the module docstring); `device_decode`
    as the loop resolved --decode for this worker; `adapters` the frozen adapters'
    fingerprint (`adapters_fingerprint`), None without adapters."""
    described = {
        "format": 1,
        "backbone": backbone_sha,
        "image_size": cfg.data.image_size,
        "crop": ["resize-center", _center(cfg, split)],
        "decode": "gpu" if device_decode else "cpu",
        "precision": "bf16" if device.type == "cuda" else "fp32",
        "shards": [[s.name, s.sha256] for s in manifest.shards(split)],
        "piece": PIECE,
    } | ({"adapters": adapters} if adapters else {})
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def adapters_fingerprint(model: MetaModel) -> str | None:
    """The adapters' values as the features see them (None: no adapters): features computed
    through adapters are only reusable with those very adapters."""
    state = {k: v for k, v in model.state_dict().items() if ".adapter." in k}
    return state_fingerprint(state) if state else None


@dataclass
class SplitFeatures:
    """Cached features of some of a split's samples, with a row for each layout position."""

    features: torch.Tensor
    """(rows, 2048) float32."""
    labels: torch.Tensor
    keys: list[str]
    row_of: torch.Tensor
    """Layout position → row (-1: not loaded here)."""

    def to(self, device: torch.device) -> SplitFeatures:
        self.features, self.labels = self.features.to(device), self.labels.to(device)
        self.row_of = self.row_of.to(device)
        return self


class FeatureCache:
    """Fills and loads the features of a run's splits (see the module docstring)."""

    def __init__(
        self,
        run_dir: str,
        model: MetaModel,
        backbone_sha: str,
        cfg: TrainConfig,
        world: World,
        device: torch.device,
        device_decode: bool,
        say=print,
    ) -> None:
        self.root = storage.join(run_dir, "features")
        self.model, self.backbone_sha, self.cfg = model, backbone_sha, cfg
        self.world, self.device, self.device_decode, self.say = world, device, device_decode, say
        self._eval: dict[str, SplitFeatures] = {}

    def _pieces(self, total: int) -> list[range]:
        """Nearly equal runs of at most PIECE samples (no tiny last piece: see FILL_BATCH)."""
        k = -(-total // PIECE)
        return [range(total * i // k, total * (i + 1) // k) for i in range(k)]

    def _mine(self, total: int) -> list[int]:
        r, n = self.world.rank, self.world.world_size
        return list(range(r, len(self._pieces(total)), n))

    def fill(self, dataset: str, manifest: Manifest, split: str) -> str:
        """Compute this rank's missing pieces of `split`; returns the cache directory."""
        key = cache_key(
            self.backbone_sha, self.cfg, manifest, split, self.device, self.device_decode,
            adapters_fingerprint(self.model),
        )  # fmt: skip
        where = storage.join(self.root, key)
        total = manifest.num_samples(split)
        pieces = self._pieces(total)
        todo = [i for i in self._mine(total) if not storage.exists(_piece_url(where, i))]
        if not todo:
            return where
        if self.world.is_main:
            self.say(f"feature cache: computing {split} features of {dataset} ({total} samples)")
        runs = [pieces[i] for i in todo]
        fill_batch = max(self.cfg.rank_batch(self.world.world_size), FILL_BATCH)
        cfg = self.cfg.replace(batch_size=fill_batch, global_batch=None)
        batches = EvalBatches.from_config(
            dataset, manifest, split, cfg, self.world, runs=runs, with_keys=True,
            device_decode=self.device_decode, center=_center(cfg, split),
        )  # fmt: skip
        batch_iter = iter(build_loader(batches, self.cfg.data.loader_workers))
        self.model.eval()
        for i, run in zip(todo, runs, strict=True):
            parts, rows = [], 0
            while rows < len(run):  # batches never straddle two pieces
                images, labels, keys = next(batch_iter)
                with torch.no_grad(), autocast(self.device):
                    x = to_input(images, self.device)
                    # As the training step computes them (`step.heads_step`): the same values.
                    feats = batch_invariant(self.model.features, x).float().cpu()
                parts.append((feats, labels, keys))
                rows += len(labels)
            _write_piece(_piece_url(where, i), parts)
        return where

    def load_train(self, where: str, batches: TrainBatches) -> SplitFeatures:
        """The rows of this rank's partitions, once every rank has filled its pieces."""
        if self.world.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()
        r, n, p = self.world.rank, self.world.world_size, batches.partitions
        wanted = torch.zeros(batches.total, dtype=torch.bool)
        for j in range(r, p, n):
            run = order.Partition.of(j, p, batches.total).run
            wanted[run.start : run.stop] = True
        pieces = self._pieces(batches.total)
        needed = [i for i, piece in enumerate(pieces) if wanted[piece.start : piece.stop].any()]
        return _load(where, needed, pieces, wanted)

    def load_eval(self, where: str, total: int) -> SplitFeatures:
        """This rank's pieces of an evaluation split (read once, then kept: every epoch
        scores the validation split)."""
        if where not in self._eval:
            wanted = torch.ones(total, dtype=torch.bool)
            self._eval[where] = _load(where, self._mine(total), self._pieces(total), wanted)
        return self._eval[where]


def _center(cfg: TrainConfig, split: str) -> float:
    """Training sees the whole short side (Resize + CenterCrop to the image size); evaluation
    the weights' own eval transform."""
    return 1.0 if split == "train" else eval_center(cfg.model.weights)


def _piece_url(where: str, i: int) -> str:
    return storage.join(where, f"piece-{i:06d}.pt")


def _write_piece(url: str, parts: list[tuple]) -> None:
    buf = io.BytesIO()
    torch.save(
        {
            "features": torch.cat([f for f, _, _ in parts]),
            "labels": torch.cat([torch.as_tensor(y) for _, y, _ in parts]),
            "keys": [k for _, _, keys in parts for k in keys],
        },
        buf,
    )
    storage.write_bytes(url, buf.getvalue())


def _load(
    where: str, indices: list[int], pieces: list[range], wanted: torch.Tensor
) -> SplitFeatures:
    feats, labels, keys = [], [], []
    row_of = torch.full((len(wanted),), -1, dtype=torch.int64)
    rows = 0
    for i in indices:
        url = _piece_url(where, i)
        try:
            piece = torch.load(io.BytesIO(storage.read_bytes(url)), weights_only=True)
        except Exception as e:  # noqa: BLE001 - cache files are untrusted input too
            raise UserError(
                f"{url}: unreadable feature cache piece ({type(e).__name__}); delete it and "
                "resume the run to compute it again"
            ) from None
        keep = wanted[pieces[i].start : pieces[i].stop]
        positions = torch.arange(pieces[i].start, pieces[i].stop)[keep]
        row_of[positions] = torch.arange(rows, rows + len(positions))
        rows += len(positions)
        feats.append(piece["features"][keep])
        labels.append(piece["labels"][keep])
        keys += [k for k, w in zip(piece["keys"], keep.tolist(), strict=True) if w]
    empty = torch.empty(0, 2048)
    return SplitFeatures(
        torch.cat(feats) if feats else empty,
        torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64),
        keys,
        row_of,
    )


class CachedBatches:
    """One rank's training batches from cached features, in exactly `TrainBatches`' order:
    its partitions in `order.batch_keys` order, each partition's samples in sequence order
    (what `TrainBatches.steps` gives)."""

    def __init__(self, batches: TrainBatches, feats: SplitFeatures) -> None:
        self.batches, self.feats = batches, feats

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple]:
        b, feats = self.batches, self.feats
        p = b.partitions
        mine = b.owned  # none: a rank with more ranks than partitions steps with empty parts
        sequences: dict[tuple[int, int], list[int]] = {}  # (pass, partition) → its positions
        for t in range(len(b)):
            runs = b.step_runs(t)  # several passes only where a mixed dataset wraps
            for k, _, _ in runs:
                # A new pass: those before the last are done with.
                if mine and (k, mine[0]) not in sequences:
                    sequences = {key: v for key, v in sequences.items() if key[0] >= k - 1}
                    sequences |= {(k, j): b.partition_epoch(j, k).positions for j in mine}
            # (layout position, place in the stream: the position in later passes offset by
            # the split's size, as `TrainBatches` numbers them).
            positions = [
                (x, x + k * b.total)
                for j in mine
                for k, first, end in runs
                for x in sequences[k, j][order.taken(j, p, first) : order.taken(j, p, end)]
            ]
            device = feats.row_of.device
            where = torch.tensor([x for x, _ in positions], dtype=torch.int64, device=device)
            places = torch.tensor([y for _, y in positions], dtype=torch.int64)
            rows = feats.row_of[where]
            keys_out = [feats.keys[i] for i in rows.tolist()] if b.with_keys else []
            yield feats.features[rows], feats.labels[rows], keys_out, places
