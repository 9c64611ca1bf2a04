"""One training step, plain PyTorch: the loop runs it under Ray, benchmarks and tests call it
without a cluster.

    model = prepare_compute(build_model("none", [10]), device, compile=False)
    parts = train_step(model, to_input(images, device), [labels], optimizer, MetaLoss())

On CUDA the step runs in bf16 autocast with channels_last activations and cuDNN autotuning;
on the CPU it stays fp32 and bitwise reproducible. The returned loss terms stay on the device
(`LossSums` adds them up there), so a GPU never waits for the host between steps.
"""

from __future__ import annotations

import torch
from torch import nn

from training.loss import LossParts, MetaLoss


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
