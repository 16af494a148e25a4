"""Which samples each data-parallel rank reads, as a pure function of the consumed-sample count.

Global batch g covers samples [c, c + global_batch) with c = g * global_batch; data-parallel rank r
takes the contiguous slice [c + r*G/DP, c + (r+1)*G/DP) and cuts it into micro-batches. So a resumed
run (same c) and any DP size see the same global batches, and each micro-batch holds the same samples
whatever the layout (which keeps capacity-based routing groups identical too).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch


class SampleDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> np.ndarray: ...


def micro_batch_indices(consumed: int, global_batch: int, micro_batch: int, dp_rank: int,
                        dp_size: int) -> list[list[int]]:
    """Sample indices of each micro-batch this rank runs for the global batch starting at consumed."""
    per_rank = global_batch // dp_size
    start = consumed + dp_rank * per_rank
    return [list(range(start + j, start + j + micro_batch)) for j in range(0, per_rank, micro_batch)]


def collate(dataset: SampleDataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples of seq_length+1 tokens -> (tokens [b, s], labels [b, s]), wrapping past the end."""
    n = len(dataset)
    batch = torch.from_numpy(np.stack([np.asarray(dataset[i % n], dtype=np.int64)
                                       for i in indices]))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def micro_batches(dataset: SampleDataset, consumed: int, global_batch: int, micro_batch: int,
                  dp_rank: int, dp_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for idx in micro_batch_indices(consumed, global_batch, micro_batch, dp_rank, dp_size):
        yield collate(dataset, idx)
