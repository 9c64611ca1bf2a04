"""Reference points other benchmarks compare against, in images/second.

    .venv/bin/python bench/baselines.py /tmp/photos --image-size 224 --workers 2
    python3 bench/baselines.py /tmp/photos --image-size 224 --workers 8 --steps 50

- the textbook torchvision input pipeline (ImageFolder + RandomResizedCrop + DataLoader) on an
  ImageFolder directory, e.g. one written by `bench/photos.py`;
- the "seed-style" training step the project started from: a frozen torchvision ResNet-50 in
  train mode (BatchNorm updating its running stats), fp32, NCHW, Adam on a new 10-class head.

Only torch, torchvision, numpy and PIL are needed (no project module), so it runs on a machine
that has nothing else installed. The step runs on CUDA when there is one, else (few steps) on
the CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, models
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_loader_rate(
    folder: str, image_size: int, workers: int, batch_size: int = 64, batches: int = 20
) -> float:
    """Images/s of the textbook loader over `batches` batches, after one untimed warm-up batch
    (which pays for starting the worker processes)."""
    transform = T.Compose(
        [
            T.RandomResizedCrop(image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(folder, transform=transform)
    if len(dataset) < (batches + 1) * batch_size:
        raise ValueError(
            f"{folder} has {len(dataset)} images: {batches} + 1 batches of {batch_size} need "
            f"{(batches + 1) * batch_size}"
        )
    loader = iter(DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers))
    next(loader)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        _, labels = next(loader)
        images += len(labels)
    return images / (time.perf_counter() - start)


def seed_model(device: torch.device) -> nn.Module:
    """The seed's model: torchvision ResNet-50, every parameter frozen, a new trainable head."""
    model = models.resnet50(weights=None)
    for p in model.parameters():
        p.requires_grad = False
    model.fc = nn.Linear(2048, 10)
    return model.to(device).train()


def seed_step_rate(
    device: torch.device,
    batch_size: int = 32,
    steps: int = 20,
    image_size: int = 224,
    warmup: int = 3,
) -> float:
    """Images/s of the seed-style training step on inputs already on `device`, over `steps`
    steps after `warmup` untimed ones."""
    torch.manual_seed(0)
    model = seed_model(device)
    optimizer = torch.optim.Adam(model.fc.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    # Normalised inputs have mean 0 and deviation 1 per channel, as standard normal noise does.
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="an ImageFolder directory (e.g. from bench/photos.py)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=64, help="the loader's batch size")
    parser.add_argument("--batches", type=int, default=20, help="timed loader batches")
    parser.add_argument("--steps", type=int, help="timed steps (default: 20 on CUDA, 2 on CPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    steps = args.steps or (20 if cuda else 2)
    loader = torchvision_loader_rate(
        args.folder, args.image_size, args.workers, args.batch_size, args.batches
    )
    step = seed_step_rate(device, steps=steps, image_size=args.image_size, warmup=3 if cuda else 1)
    where = torch.cuda.get_device_name(device) if cuda else f"cpu {torch.get_num_threads()} threads"
    rows = [
        (f"torchvision loader ({args.workers} workers, batch {args.batch_size})", loader),
        (f"seed step ({where}, batch 32, {steps} steps)", step),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'baseline':<{width}}  {'px':>4}  {'images/s':>9}")
    for name, rate in rows:
        print(f"{name:<{width}}  {args.image_size:>4}  {rate:>9.1f}")


if __name__ == "__main__":
    main()
