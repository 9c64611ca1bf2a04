"""The meta-loss: Σ_datasets CE(head_d(f(x)), y) + λ · Σ_i mean(r_i²).

The second term is the source's "0.001 · MSE(output, residual)" made precise: r_i is adapter
i's added output, so the term keeps every adapter near the identity. Both terms are returned
separately so they can be logged.

Each CE term is the mean over the step's samples of its dataset. With a mix (`training.mix`)
a rank's part of a dataset varies from step to step and rank to rank, and may be empty: so a
rank divides its sum by `shares[d]`, the dataset's samples in the global step over the ranks,
and DDP's average of the ranks' gradients is then exactly that of the global mean, whatever
the split; a dataset with no sample in the step adds nothing (never 0 / 0).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


class LossParts(NamedTuple):
    total: torch.Tensor
    cross_entropy: torch.Tensor
    penalty: torch.Tensor


class MetaLoss(nn.Module):
    def __init__(self, meta_lambda: float = 1e-3, shares: list[float] | None = None) -> None:
        super().__init__()
        self.meta_lambda = meta_lambda
        self.shares = shares
        """Per dataset: its samples in the global step / ranks (None: each rank's own count)."""

    def for_step(self, shares: list[float]) -> MetaLoss:
        """This loss with the datasets' shares of one step (see the module docstring)."""
        return MetaLoss(self.meta_lambda, shares)

    def forward(
        self, logits: list[torch.Tensor], targets: list[torch.Tensor], penalty: torch.Tensor
    ) -> LossParts:
        shares = self.shares or [len(y) for y in targets]
        ce = sum(
            (_cross_entropy(z, y, n) for z, y, n in zip(logits, targets, shares, strict=True)),
            penalty.new_zeros(()),
        )
        return LossParts(ce + self.meta_lambda * penalty, ce, penalty)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, share: float) -> torch.Tensor:
    """The rank's part of a dataset's mean cross-entropy over `share` samples a rank."""
    if len(targets) == share > 0:
        return F.cross_entropy(logits, targets)  # the plain mean, as without a mix
    # An empty part sums to a zero that still reaches the head: DDP sees a gradient for every
    # parameter on every rank.
    total = F.cross_entropy(logits, targets, reduction="sum")
    return total / share if share else total
