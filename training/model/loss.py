"""The meta-loss: Σ_datasets CE(head_d(f(x)), y) + λ · Σ_i mean(r_i²).

The second term is the source's "0.001 · MSE(output, residual)" made precise: r_i is adapter
i's added output, so the term keeps every adapter near the identity. Both terms are returned
separately so they can be logged.

Every term is a mean over the **global** step, never over one rank's part of it: each CE term
over the step's samples of its dataset, the penalty over all of the step's samples. With a mix
(`training.data.mix`) a rank's part of a dataset varies from step to step and rank to rank, and may
be empty, and so may its number of samples in all. So a rank divides each sum by the global
count over the ranks (`shares[d]`: the dataset's samples in the step / ranks; the penalty by
their total), and DDP's average of the ranks' gradients is exactly that of the global means,
whatever the split; a dataset with no sample in the step adds nothing (never 0 / 0).
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
        """`penalty`: each sample's Σ_i mean(r_i²) (`MetaModel.forward`), one value a row."""
        shares = self.shares or [len(y) for y in targets]
        ce = sum(
            (_cross_entropy(z, y, n) for z, y, n in zip(logits, targets, shares, strict=True)),
            penalty.new_zeros(()),
        )
        penalty = _mean(penalty, sum(shares))
        return LossParts(ce + self.meta_lambda * penalty, ce, penalty)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor, share: float) -> torch.Tensor:
    """The rank's part of a dataset's mean cross-entropy over `share` samples a rank."""
    if len(targets) == share > 0:
        return F.cross_entropy(logits, targets)  # the plain mean, as without a mix
    # An empty part sums to a zero that still reaches the head: DDP sees a gradient for every
    # parameter on every rank.
    total = F.cross_entropy(logits, targets, reduction="sum")
    return total / share if share else total


def _mean(values: torch.Tensor, share: float) -> torch.Tensor:
    """The rank's part of the mean of per-sample `values` over `share` samples a rank."""
    if len(values) == share > 0:
        return values.mean()
    return values.sum() / share if share else values.sum()
