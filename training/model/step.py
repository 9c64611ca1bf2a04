"""One training step, plain PyTorch: the loop runs it under Ray, benchmarks and tests call it
without a cluster.

    model = prepare_compute(build_model("none", [10]), device, compile=False)
    parts = train_step(model, to_input(images, device), [labels], optimizer, MetaLoss())

On CUDA the step runs in bf16 autocast with channels_last activations and cuDNN autotuning;
on the CPU it stays fp32 and bitwise reproducible. The returned loss terms stay on the device
(`LossSums` adds them up there), so a GPU never waits for the host between steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from training.model.loss import LossParts, MetaLoss


def prepare_compute(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """`model` on `device`, laid out for it; `compile`: torch.compile it (after DDP wrapping,
    if any, so Dynamo splits the graph at DDP's buckets)."""
    model.to(device)
    if device.type == "cuda":
        # Tensor cores want NHWC; cuDNN picks the fastest kernels for the (fixed) input shape.
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return torch.compile(model) if compile else model


def autocast(device: torch.device) -> torch.autocast:
    """bf16 on CUDA; the CPU stays fp32, so CPU runs are exactly reproducible."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def forward(model: nn.Module, x: torch.Tensor, sizes: list[int]) -> tuple[list, torch.Tensor]:
    """Each dataset's logits (fp32) and the adapter penalty. `x`: normalised images (NCHW) or
    cached backbone features (N × 2048)."""
    if x.dim() == 4 and x.is_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device):
        logits, penalty = model(x, sizes)
    return [z.float() for z in logits], penalty.float()


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    targets: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    loss_fn: MetaLoss,
) -> LossParts:
    """Forward, meta-loss, backward and one optimizer step on one batch of every dataset (`x`
    concatenates them, `targets` says how many rows each has). Returns the detached terms."""
    logits, penalty = forward(model, x, [len(y) for y in targets])
    parts = loss_fn(logits, targets, penalty)
    optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    optimizer.step()
    return LossParts(*(p.detach() for p in parts))


INVARIANT_ROWS = 16
"""On the CPU, oneDNN picks its kernels by batch size (and thread count): a sample's features
in a batch of 1 to 8 rows differ by ~2e-5 from the same sample's in a batch of 64 on one
thread, while every batch of 16 rows runs the same kernels."""


def batch_invariant(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x), each row's result independent of the other rows: on the CPU, in calls of exactly
    INVARIANT_ROWS rows (the last padded with zero rows, whose results are dropped)."""
    if x.device.type != "cpu" or not len(x):
        return fn(x)
    n, pad = len(x), -len(x) % INVARIANT_ROWS
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    return torch.cat([fn(chunk) for chunk in x.split(INVARIANT_ROWS)])[:n]


def heads_step(
    features: Callable[[torch.Tensor], torch.Tensor],
    heads: nn.ModuleList,
    x: torch.Tensor,
    targets: list[torch.Tensor],
    places: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> LossParts:
    """A step where only the heads train (no adapters, or frozen ones), the same however the
    global step is dealt to ranks: each rank computes its samples' features, all ranks gather
    every dataset's features and labels, and each computes the whole step's loss and gradient
    alike, the samples in their order in the epoch (`places`: unique stream positions). No
    gradient is all-reduced, and the weights depend on the global batch only, not on the
    number of ranks (bit for bit on the CPU, where features are `batch_invariant`)."""
    with torch.no_grad():
        if x.dim() == 4:  # images; else cached features
            if x.is_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(x.device):
                x = batch_invariant(features, x)
        feats = x.float().split([len(y) for y in targets])
    counts = gather_counts([len(y) for y in targets], x.device)
    ce = x.new_zeros((), dtype=torch.float32)
    for d, (head, f, y, p) in enumerate(zip(heads, feats, targets, places, strict=False)):
        if not counts[:, d].any():
            # No sample of it in the step: a zero gradient, as DDP's path gives (Adam still
            # decays the head's moments), not none.
            ce = ce + 0.0 * sum(q.sum() for q in head.parameters())
            continue
        f = gather_rows(f, counts[:, d])
        y, p = gather_rows(torch.stack([y, p.to(y.device)], 1), counts[:, d]).unbind(1)
        order = torch.argsort(p)
        ce = ce + F.cross_entropy(head(f[order]), y[order])
    optimizer.zero_grad(set_to_none=True)
    if ce.requires_grad:
        ce.backward()
        optimizer.step()
    ce = ce.detach()
    return LossParts(ce, ce, torch.zeros_like(ce))


def gather_counts(counts: list[int], device: torch.device) -> torch.Tensor:
    """[ranks, datasets]: every rank's rows of each dataset in this step."""
    mine = torch.tensor([counts], dtype=torch.int64, device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine.cpu()
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return torch.cat(every).cpu()


def gather_rows(t: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` (counts[r] of rank r), rank by rank."""
    if len(counts) == 1:
        return t
    most = int(counts.max())
    padded = t.new_zeros((most, *t.shape[1:]))
    padded[: len(t)] = t
    every = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(every, padded)
    return torch.cat([part[: int(n)] for part, n in zip(every, counts, strict=True)])


class LossSums:
    """The loss terms of the steps since the last `take`, summed on the device (float64)."""

    def __init__(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.sums = torch.zeros(3, dtype=dtype, device=device)
        self.steps = 0

    def add(self, parts: LossParts) -> None:
        self.sums += torch.stack(list(parts)).to(self.sums.dtype)
        self.steps += 1

    def take(self) -> tuple[list[float], int]:
        """(sums, steps) since the last take: the one host sync."""
        sums, steps = self.sums.tolist(), self.steps
        self.sums.zero_()
        self.steps = 0
        return sums, steps
