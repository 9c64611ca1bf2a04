"""All rank and worker arithmetic, in one place.

A *reader* is one DataLoader worker of one training rank. Samples are dealt to ranks by
contiguous ranges of equal length, so every rank runs the same number of steps whatever the
shard sizes (an uneven split is the classic DDP hang).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    loader_worker: int = 0
    loader_workers: int = 1

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.world_size, (self.rank, self.world_size)
        assert 0 <= self.loader_worker < self.loader_workers

    @classmethod
    def from_ray(cls) -> World:
        import ray.train

        ctx = ray.train.get_context()
        return cls(
            rank=ctx.get_world_rank(),
            world_size=ctx.get_world_size(),
            local_rank=ctx.get_local_rank(),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def with_loader_worker(self, worker: int, workers: int) -> World:
        return World(self.rank, self.world_size, self.local_rank, worker, max(1, workers))

    def samples_per_rank(self, total: int, drop_last: bool) -> int:
        """Training drops the remainder so every rank gets the same count; evaluation keeps it."""
        if drop_last:
            return total // self.world_size
        return -(-total // self.world_size)

    def rank_range(self, total: int, drop_last: bool) -> range:
        """The contiguous slice [start, stop) of an epoch's `total` samples this rank reads."""
        if drop_last:
            n = total // self.world_size
            return range(self.rank * n, (self.rank + 1) * n)
        # Without dropping, spread the remainder over the first ranks (sizes differ by <= 1).
        base, extra = divmod(total, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def owns_batch(self, batch_index: int) -> bool:
        """Loader worker w produces batches w, w+W, ...; DataLoader's round robin restores order."""
        return batch_index % self.loader_workers == self.loader_worker
