"""Throughput of the whole path, measured side by side in one run, printed as one table.

    .venv/bin/python bench/throughput.py                    # CPU mode, here: about 6 minutes
    bash bench/device_wheels.sh                             # once, where pip works: .whl/
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
      PYTHONPATH=/tmp/site python3 bench/throughput.py --mode gpu --budget 420

GPU mode needs only torch and torchvision besides the pure-Python wheels that
`bench/device_wheels.sh` fetches (boto3, webdataset, …); without Ray the Ray row says so.
Photos come from scikit-learn's samples or `--photos DIR` (`bench/photos.py copy_sample_photos`).
Rows stop being measured once `--budget` seconds are spent, so the table always prints.

Rows (images/s; ratio against the row's anchor):
- the seed-style step (fp32, NCHW, BatchNorm in train mode, batch 32): the compute anchor;
- our step (frozen backbone, heads only) eager and compiled; with adapters in layer4;
- end to end from local shards: loader → device → step, CPU decode and GPU decode;
- a feature-cached epoch (heads on cached features in device memory, batch 4096);
- Ray Train (1 worker, DDP, a report every 10 steps) against the same plain-torch loop;
- our CPU loader against torchvision's ImageFolder + DataLoader at 224 and 64 px, equal workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines import seed_step_rate, torchvision_loader_rate  # noqa: E402
from photos import write_photo_folder, write_shards  # noqa: E402

from training.data.decode import to_input  # noqa: E402
from training.data.loader import StepLoader  # noqa: E402
from training.model.loss import MetaLoss  # noqa: E402
from training.model.network import build_model  # noqa: E402
from training.model.step import prepare_compute, train_step  # noqa: E402

MODES = {
    # compute image size, compute batch, timed steps, photos made, copies of each, loader workers
    "cpu": dict(size=64, batch=32, steps=3, photos=800, copies=4, workers=2),
    "gpu": dict(
        size=224, batch=256, steps=30, photos=1500, copies=20, workers=min(16, os.cpu_count() or 1)
    ),  # fmt: skip
}


LOADER_BATCHES = 40
"""Timed batches of 64 per loader measurement, after one warm-up batch."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_rate(device, size, batch, steps, adapters=(), compile=False, features=False) -> float:
    """Our train_step on fixed input (images, or 2048-d features) already on the device."""
    model = prepare_compute(build_model("none", [10], list(adapters)), device, compile)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, loss_fn = torch.optim.Adam(params, lr=1e-3), MetaLoss()
    shape = (batch, 2048) if features else (batch, 3, size, size)
    x = torch.randn(*shape, device=device)
    y = [torch.randint(0, 10, (batch,), device=device)]
    for _ in range(3 if compile else 1):
        train_step(model, x, y, optimizer, loss_fn)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, x, y, optimizer, loss_fn)
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def cached_epoch_rate(device: torch.device, samples: int = 1 << 20, batch: int = 4096) -> float:
    """An epoch of head training on cached features in device memory, gathered by index."""
    feats = torch.randn(samples, 2048, device=device)
    labels = torch.randint(0, 10, (samples,), device=device)
    model = prepare_compute(build_model("none", [10]), device)
    optimizer, loss_fn = torch.optim.Adam(model.heads.parameters(), lr=1e-3), MetaLoss()
    for _ in range(2):  # the first epoch warms up
        sync(device)
        start = time.perf_counter()
        for rows in torch.randperm(samples, device=device).split(batch):
            train_step(model, feats[rows], [labels[rows]], optimizer, loss_fn)
        sync(device)
    return samples / (time.perf_counter() - start)


def end_to_end_rate(
    shards: str, device, size, batch, steps, workers, device_decode, compile=False
) -> float:
    """Loader (read, decode) → device → our step (heads only), as one training rank runs it:
    persistent loader workers, epoch after epoch."""
    from loader_bench import train_batches

    batches, _ = train_batches(shards, batch, size, True, device_decode=device_decode)
    model = prepare_compute(build_model("none", [batches.num_classes]), device)
    optimizer = torch.optim.Adam(model.heads.parameters(), lr=1e-3)
    step_model = torch.compile(model) if compile else model
    loader = StepLoader([batches], workers, device.type == "cuda")
    loss_fn, images, start, epoch, k = MetaLoss(), 0, None, 0, 0
    while True:
        batches.set_position(epoch)
        for [(x, labels, _)] in loader.epoch():
            if k == 2 and start is None:  # after the loader's start-up (and compilation)
                sync(device)
                start = time.perf_counter()
            train_step(step_model, to_input(x, device), [labels.to(device)], optimizer, loss_fn)
            k += 1
            if start is not None and k > 2:
                images += len(labels)
                if images >= steps * batch:
                    sync(device)
                    return images / (time.perf_counter() - start)
        epoch += 1


def ray_overhead(device: torch.device, size: int, batch: int, steps: int) -> tuple[float, float]:
    """(plain torch, Ray Train) images/s of the same loop: DDP-wrapped, reporting every 10."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        torch.set_num_threads(config["threads"])  # Ray would give its worker 1 thread
        model = build_model("none", [10])
        if config["ray"]:
            model = ray.train.torch.prepare_model(model)
        dev = torch.device(config["device"])
        model = prepare_compute(model, dev)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, loss_fn = torch.optim.Adam(params, lr=1e-3), MetaLoss()
        x = torch.randn(config["batch"], 3, config["size"], config["size"], device=dev)
        y = [torch.randint(0, 10, (config["batch"],), device=dev)]
        train_step(model, x, y, optimizer, loss_fn)
        sync(dev)
        start = time.perf_counter()
        for i in range(config["steps"]):
            train_step(model, x, y, optimizer, loss_fn)
            if config["ray"] and (i + 1) % 10 == 0:
                ray.train.report({"step": i})
        sync(dev)
        rate = config["batch"] * config["steps"] / (time.perf_counter() - start)
        Path(config["out"]).with_suffix(".ray" if config["ray"] else ".plain").write_text(f"{rate}")

    out = Path(tempfile.mkdtemp()) / "rate"
    threads = torch.get_num_threads()
    config = dict(device=str(device), size=size, batch=batch, steps=steps, ray=False,
                  out=str(out), threads=threads)  # fmt: skip
    # Ray first: its own processes idle beside both loops, so the difference is Ray Train's.
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             num_cpus=os.cpu_count(), num_gpus=int(device.type == "cuda"))  # fmt: skip
    try:
        loop(config)
        with tempfile.TemporaryDirectory() as storage:
            trainer = TorchTrainer(
                loop,
                train_loop_config={**config, "ray": True},
                scaling_config=ScalingConfig(
                    num_workers=1,
                    use_gpu=device.type == "cuda",
                    resources_per_worker={"CPU": threads},
                ),
                run_config=RunConfig(storage_path=storage, name="overhead"),
            )
            trainer.fit()
        return float(out.with_suffix(".plain").read_text()), float(
            out.with_suffix(".ray").read_text()
        )
    finally:
        ray.shutdown()


def replicate(folder: Path, times: int) -> None:
    """Each photo `times` times under other names (hard links): more images to stream, the
    same decode work per image, without the minutes of making new ones."""
    for path in sorted(folder.glob("*/*.jpg")):
        for k in range(1, times):
            link = path.with_name(f"{path.stem}-{k}.jpg")
            if not link.exists():
                os.link(path, link)


class Table:
    """Rows as they are measured; each row is skipped once the time budget is spent."""

    def __init__(self, budget: float) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.deadline = time.monotonic() + budget

    def row(self, name: str, measure, anchor: float | None = None, target: str = "") -> float:
        if time.monotonic() > self.deadline:
            self.rows.append((name, "skipped: time budget spent", "", target))
            return float("nan")
        try:
            rate = measure()
        except Exception as e:  # noqa: BLE001 - one row failing must not lose the others
            self.rows.append((name, f"failed: {type(e).__name__}: {str(e)[:60]}", "", target))
            return float("nan")
        ratio = f"{rate / anchor:.2f}×" if anchor and anchor == anchor else ""  # not NaN
        self.rows.append((name, f"{rate:,.0f}", ratio, target))
        print(f"  {name}: {rate:,.0f} images/s {ratio}", flush=True)
        return rate

    def note(self, name: str, value: str, target: str = "") -> None:
        self.rows.append((name, value, "", target))

    def print(self, title: str) -> None:
        print(f"\n{title}\n")
        print("| measurement | images/s | ratio | target |\n|---|---:|---:|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=tuple(MODES), default=None,
                        help="default: gpu when CUDA is available, else cpu")  # fmt: skip
    parser.add_argument("--budget", type=float, default=420, help="seconds for all rows")
    parser.add_argument("--photos", help="a folder of .jpg photos (default: scikit-learn's)")
    parser.add_argument("--workdir", help="keep the generated photos and shards here")
    parser.add_argument("--compile", action="store_true", help="also the compiled row on CPU")
    args = parser.parse_args()
    mode = args.mode or ("gpu" if torch.cuda.is_available() else "cpu")
    m = MODES[mode]
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="throughput-"))
    table = Table(args.budget)
    started = time.perf_counter()
    folder = work / "photos"
    if not folder.exists():
        write_photo_folder(folder, m["photos"], photos=args.photos)
    replicate(folder, m["copies"])
    shards = str(work / "shards")
    if not (Path(shards) / "manifest.json").exists():
        write_shards(folder, shards, shard_samples=500)
    print(f"{mode} mode on {torch.cuda.get_device_name() if mode == 'gpu' else 'CPU'}: "
          f"{len(list(folder.glob('*/*.jpg')))} photos (500×375 JPEG) ready in "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    size, batch, steps, workers = m["size"], m["batch"], m["steps"], m["workers"]

    tv = {}
    for px in (224, 64):
        name = f"torchvision ImageFolder + DataLoader, {px} px, {workers} workers (best of 2)"
        tv[px] = table.row(name, lambda px=px: best_of(2, lambda: torchvision_loader_rate(
            folder, px, workers, 64, LOADER_BATCHES)))  # fmt: skip
        table.row(f"our CPU loader, {px} px, {workers} workers (best of 2)",
                  lambda px=px: best_of(2, lambda: end_to_end_loader(shards, px, workers)),
                  tv[px], "≥ 1.8×" if px == 224 else "≥ 3×")  # fmt: skip
    seed = table.row(f"seed-style step: fp32, BN train mode, batch 32, {size} px",
                     lambda: seed_step_rate(device, 32, steps, size))  # fmt: skip
    table.row(f"our step, heads only, eager, batch {batch}",
              lambda: step_rate(device, size, batch, steps), seed)  # fmt: skip
    if mode == "gpu" or args.compile:
        table.row(f"our step, heads only, compiled, batch {batch}",
                  lambda: step_rate(device, size, batch, steps, compile=True), seed)  # fmt: skip
    table.row(f"our step, adapters in layer4, eager, batch {batch}",
              lambda: step_rate(device, size, batch, steps, ["layer4"]), seed, "≥ 2×")  # fmt: skip
    if mode == "gpu" or args.compile:
        table.row(f"our step, adapters in layer4, compiled, batch {batch}",
                  lambda: step_rate(device, size, batch, steps, ["layer4"], compile=True),
                  seed)  # fmt: skip
    table.row(f"end to end, CPU decode, {workers} loader workers",
              lambda: end_to_end_rate(shards, device, size, batch, steps, workers, False), seed,
              "≥ 20,000 on one H100 (GPU decode)")  # fmt: skip
    if mode == "gpu":
        table.row(f"end to end, GPU decode, {workers} loader workers",
                  lambda: end_to_end_rate(shards, device, size, batch, steps * 3, workers, True),
                  seed, "≥ 20,000 on one H100")  # fmt: skip
        table.row(f"end to end, GPU decode, heads only, compiled, {workers} loader workers",
                  lambda: end_to_end_rate(shards, device, size, batch, steps * 3, workers, True,
                                          compile=True),
                  seed, "≥ 10,000 on one H100 or H200")  # fmt: skip
    table.row("feature-cached epoch, batch 4096",
              lambda: cached_epoch_rate(device, 1 << (20 if mode == "gpu" else 16)), seed,
              "≥ 1,000,000 on one H100")  # fmt: skip
    try:
        import ray  # noqa: F401
    except ImportError:
        table.note("Ray Train vs plain torch", "n/a: ray is not installed here", "≤ 5 % overhead")
    else:
        rates: list[float] = []

        def plain_rate() -> float:
            rates.extend(ray_overhead(device, size, batch, steps * 3))
            return rates[0]

        table.row(f"plain torch loop (heads only, batch {batch})", plain_rate)
        if rates:
            plain, in_ray = rates
            table.note("the same loop in Ray Train (1 worker, DDP, reports)",
                       f"{in_ray:,.0f} ({100 * (1 - in_ray / plain):+.1f} % overhead)",
                       "≤ 5 % overhead")  # fmt: skip
    table.print(f"bench/throughput.py --mode {mode}: {time.perf_counter() - started:.0f} s, "
                f"torch {torch.__version__}")  # fmt: skip


def end_to_end_loader(shards: str, size: int, workers: int) -> float:
    """Our training loader alone (one rank, decode included), as `bench/loader_bench.py`."""
    from loader_bench import measure

    args = argparse.Namespace(data=shards, batch_size=64, image_size=size, augment=True,
                              loader_workers=workers, batches=LOADER_BATCHES)  # fmt: skip
    images, seconds = measure(args)
    return images / seconds


def best_of(times: int, measure) -> float:
    """The best of a few runs: this machine is shared, and noise only ever slows a run down."""
    return max(measure() for _ in range(times))


if __name__ == "__main__":
    main()
