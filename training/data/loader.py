"""Batches → decoded tensors in loader workers: the last of the three data layers
(`training.data.batches`).

`StepLoader` runs a rank's training epoch over every dataset of a mix: the rank reads (`_Steps`,
a thread of the training process, `_read_ahead` steps in advance) and loader worker w of W
decodes steps t ≡ w (mod W) entire (`training.data.batches.StepDecoder`), handing each back as
one uint8 image tensor and one label tensor per dataset; the workers persist across epochs.
`build_loader` makes one pass over any training or evaluation batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from torch.utils.data import DataLoader, Sampler

from training.data.batches import EvalBatches, TrainBatches


class _Steps(Sampler):
    """The "indices" of a `StepLoader`: each step's samples of every dataset, read and
    assembled by a thread of the training process `ahead` steps in advance."""

    def __init__(self, datasets: list[TrainBatches], ahead: int) -> None:
        self.datasets, self.ahead = datasets, ahead

    def __len__(self) -> int:
        return min(len(b) for b in self.datasets)

    def __iter__(self) -> Iterator[tuple[int, list]]:
        epoch, steps = self.datasets[0].epoch, len(self)

        def jobs() -> Iterator[tuple[int, list]]:
            streams = [b.steps() for b in self.datasets]
            try:
                for _ in range(steps):
                    yield epoch, [next(s) for s in streams]
            finally:
                for s in streams:
                    s.close()

        return _read_ahead(jobs(), self.ahead)


class _Failed(NamedTuple):
    error: BaseException


_END = None


def _read_ahead(items: Iterator, ahead: int) -> Iterator:
    """`items`, produced by a daemon thread up to `ahead` in advance; its error raised here.
    Abandoning the iterator stops the thread (and closes `items`, with its reads)."""
    buffer: queue.Queue = queue.Queue(ahead)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            put(_Failed(e))
        finally:
            items.close()

    threading.Thread(target=produce, name="rank-reader", daemon=True).start()
    try:
        while (item := buffer.get()) is not _END:
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()


def _as_is(batch):
    return batch


class StepLoader:
    """One rank's training steps over every dataset of a mix, each a list of (images,
    labels, keys, places) per dataset. The rank reads (`_Steps`, a thread of this process); loader
    worker w decodes steps t ≡ w (mod W) entire, and persists across epochs when `persistent`;
    with W = 0 this process decodes. Set each dataset's position, then iterate `epoch()`."""

    def __init__(
        self,
        datasets: list[TrainBatches],
        loader_workers: int,
        pin_memory: bool = False,
        persistent: bool = True,
    ) -> None:
        self.loader = DataLoader(
            datasets[0].decoder,
            batch_size=None,
            sampler=_Steps(datasets, ahead=2 * max(1, loader_workers) + 2),
            num_workers=loader_workers,
            collate_fn=_as_is,
            pin_memory=pin_memory,
            persistent_workers=persistent and loader_workers > 0,
            prefetch_factor=2 if loader_workers else None,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self) -> Iterator[list[tuple]]:
        return iter(self.loader)


def build_loader(
    batches: TrainBatches | EvalBatches, loader_workers: int, pin_memory: bool = False
) -> Iterable[tuple]:
    """One pass over `batches` with `loader_workers` workers: training batches in the rank's
    step order, or evaluation batches; (images, labels), with keys when `with_keys`."""
    if isinstance(batches, TrainBatches):
        steps = StepLoader([batches], loader_workers, pin_memory, persistent=False).epoch()
        return (
            (images, labels, keys) if batches.with_keys else (images, labels)
            for [(images, labels, keys, _)] in steps
        )
    return DataLoader(
        batches,
        batch_size=None,
        num_workers=loader_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if loader_workers else None,
    )
