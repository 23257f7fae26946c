"""The order of the data: which samples make each optimizer step, cut into which micro-batches on
which rank, a pure function of (seed, step)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from medvl.data.packing import plan_micro_batches


class GlobalBatchSampler(torch.utils.data.Sampler[list[tuple[int, int | None]]]):
    """Yields this rank's micro-batches as (sample index, image size) pairs, a deterministic
    function of (seed, epoch, step), so a resumed run sees exactly the batches the uninterrupted run
    would have seen.

    Each global batch of `global_bs` samples is cut into `accum * world` micro-batches (see
    `plan_micro_batches`: grouped by length and balanced across ranks when `lengths` is given);
    micro-batch j of the window goes to rank j % world. `size_at(step)` is the image size of the
    progressive-resolution schedule, `lengths(size)` the token counts at that size.
    """

    def __init__(
        self,
        n: int,
        global_bs: int,
        micro_bs: int,
        world: int,
        rank: int,
        seed: int,
        total_steps: int,
        start_step: int = 0,
        *,
        lengths: Callable[[int | None], list[int]] | None = None,
        size_at: Callable[[int], int | None] = lambda step: None,
        packed: bool = False,
    ) -> None:
        if n < global_bs:
            raise ValueError(f"the data has {n} samples, fewer than one global batch of {global_bs}")
        self.n, self.global_bs, self.micro_bs = n, global_bs, micro_bs
        self.world, self.rank, self.seed = world, rank, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.steps_per_epoch = n // global_bs  # drop the ragged tail: every step is a full batch
        self.lengths, self.size_at, self.packed = lengths, size_at, packed
        self._lengths: dict[int | None, list[int]] = {}

    @property
    def accum(self) -> int:
        return self.global_bs // (self.micro_bs * self.world)

    def global_batches(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        return perm[k * self.global_bs : (k + 1) * self.global_bs]

    def micro_batches(self, step: int) -> list[list[tuple[int, int | None]]]:
        """Every rank's micro-batches of `step`, micro-batch j for rank j % world."""
        batch, size = self.global_batches(step), self.size_at(step)
        if self.lengths is not None and size not in self._lengths:
            self._lengths[size] = self.lengths(size)
        lens = [self._lengths[size][i] for i in batch] if self.lengths is not None else [0] * len(batch)
        plan = plan_micro_batches(
            lens, self.accum * self.world, self.world, self.packed, self.lengths is not None
        )
        return [[(batch[j], size) for j in micro] for micro in plan]

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            yield from self.micro_batches(step)[self.rank :: self.world]

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accum
