"""Who this process is: rank and loader worker; and how evaluation is split.

Training samples are dealt to ranks by partition (`training.data.order`: rank r reads the
partitions j ≡ r mod ranks, its loader workers only decode); evaluation samples go to ranks in
contiguous ranges, and to loader workers by batch.
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

    def rank_range(self, total: int) -> range:
        """This rank's contiguous share of `total` evaluation samples (sizes differ by <= 1)."""
        base, extra = divmod(total, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def owns_batch(self, batch_index: int) -> bool:
        """Loader worker w produces batches w, w+W, ...; DataLoader's round robin restores order."""
        return batch_index % self.loader_workers == self.loader_worker
