"""The meta-loss: Σ_datasets CE(head_d(f(x)), y) + λ · Σ_i mean(r_i²).

The second term is the source's "0.001 · MSE(output, residual)" made precise: r_i is adapter
i's added output, so the term keeps every adapter near the identity. Both terms are returned
separately so they can be logged.
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
    def __init__(self, meta_lambda: float = 1e-3) -> None:
        super().__init__()
        self.meta_lambda = meta_lambda

    def forward(
        self, logits: list[torch.Tensor], targets: list[torch.Tensor], penalty: torch.Tensor
    ) -> LossParts:
        ce = sum(
            (F.cross_entropy(z, y) for z, y in zip(logits, targets, strict=True)),
            penalty.new_zeros(()),
        )
        return LossParts(ce + self.meta_lambda * penalty, ce, penalty)
