"""Batch planning: length-grouped, rank-balanced micro-batches and soft packing of samples into rows.

All of it is a pure function of the sample lengths and their order, so a resumed run rebuilds exactly
the batches of the uninterrupted one. Soft packing never splits a sample: a row holds whole samples,
its position ids restart at 0 for each, and the model keeps each sample to itself (see `PackedCollator`).
"""

from __future__ import annotations

import heapq
import math

import torch

from medvl.data.conversations import IGNORE, Collator, Item
from medvl.model.attention import boundaries


def balanced_bins(weights: list[int], k: int) -> list[list[int]]:
    """Deal positions of `weights` into `k` bins with near-equal sums (longest first, each to the
    lightest bin). Deterministic: ties break on position. Bins keep their positions in order."""
    heap = [(0, b) for b in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        total, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (total + weights[i], b))
    return [sorted(b) for b in bins]


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Positions of `lengths` packed into the fewest rows of at most `max_length` tokens that
    `balanced_bins` can fill: the rows come out of near-equal length, so padding them to the longest
    wastes little."""
    if max(lengths) > max_length:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a row of max_length={max_length}")
    k = math.ceil(sum(lengths) / max_length)
    while True:
        rows = balanced_bins(lengths, k)
        if max(sum(lengths[i] for i in r) for r in rows) <= max_length:
            return [r for r in rows if r]
        k += 1


def plan_micro_batches(
    lengths: list[int], n_micro: int, world: int, packed: bool, group: bool
) -> list[list[int]]:
    """Cut one global batch (positions 0..len-1, `lengths` their token counts) into `n_micro`
    micro-batches, ordered so that micro-batch j goes to rank j % world.

    - not grouped: consecutive slices of the (already shuffled) batch;
    - packed: near-equal token counts per rank, then per micro-batch (packed into rows afterwards);
    - padded: samples of similar length share a micro-batch (little padding), and the micro-batches,
      costed as size x longest, are dealt to ranks heaviest first in snake order so ranks even out.
    """
    n = len(lengths)
    size = n // n_micro
    if not group:
        return [list(range(i * size, (i + 1) * size)) for i in range(n_micro)]
    accum = n_micro // world
    if packed:  # even tokens per rank first, then per micro-batch within each rank
        per_rank = []
        for rank in balanced_bins(lengths, world):
            micro = balanced_bins([lengths[i] for i in rank], accum)
            per_rank.append([[rank[j] for j in m] for m in micro])
        return [per_rank[r][a] for a in range(accum) for r in range(world)]
    by_len = sorted(range(n), key=lambda i: (lengths[i], i))
    chunks = [by_len[i * size : (i + 1) * size] for i in range(n_micro)]
    chunks.sort(key=lambda c: (-len(c) * max(lengths[i] for i in c), c[0]))
    per_rank: list[list[list[int]]] = [[] for _ in range(world)]
    for j, chunk in enumerate(chunks):
        lap, pos = divmod(j, world)
        per_rank[pos if lap % 2 == 0 else world - 1 - pos].append(chunk)
    return [per_rank[r][a] for a in range(accum) for r in range(world)]


class PackedCollator(Collator):
    """Whole samples packed into rows. No attention mask: the sample boundaries are in the restarting
    `position_ids` (which transformers' sdpa/eager paths turn into a block-diagonal mask, and which
    needs `use_cache=False`) and, for the varlen paths (medvl's `varlen`, flash-attention), in
    `cu_seq_lens` / `max_seq_len`. The first token of each sample gets no label, so no sample learns
    to predict its neighbour.

    `row_length`: rows of at most that many tokens, of near-equal length (a masked attention path
    computes every row in full, so rows are kept short). None: the whole micro-batch in one row, no
    padding at all, for varlen attention, whose cost does not depend on the row."""

    def __init__(
        self, vlm, row_length: int | None, loss_normalization: str = "token", vision_filler: bool = False
    ) -> None:
        super().__init__(vlm, loss_normalization, vision_filler)
        self.row_length = row_length

    def __call__(self, samples: list[Item]) -> dict[str, torch.Tensor]:
        batch = samples + self.filler(samples)
        lengths = [len(s.input_ids) for s, _ in batch]
        rows = [list(range(len(batch)))] if self.row_length is None else pack_rows(lengths, self.row_length)
        width = max(sum(lengths[i] for i in r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        weights = torch.zeros((len(rows), width))
        order = []
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                s = batch[i][0]
                n = len(s.input_ids)
                ids[r, at : at + n] = torch.tensor(s.input_ids)
                labels[r, at : at + n] = torch.tensor(s.labels)
                labels[r, at] = IGNORE
                positions[r, at : at + n] = torch.arange(n)
                weights[r, at : at + n] = self.weights(s, labels[r, at : at + n])
                at += n
                order.append(i)
            # the padded tail is one more "sample" of its own, with no labels
            positions[r, at:] = torch.arange(width - at)
        cu, longest = boundaries(positions)
        out = {
            "input_ids": ids,
            "labels": labels,
            "position_ids": positions,
            "loss_weights": weights,
            "cu_seq_lens": cu,
            "max_seq_len": torch.tensor(longest),
        }
        out.update(self.head_positions(labels) | self.counts(samples, weights))
        return out | self.pixels([batch[i] for i in order])
