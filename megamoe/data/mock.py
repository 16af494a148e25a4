"""Deterministic synthetic tokens (``--mock-data``), so training runs without a corpus.

Sample i is an arithmetic progression modulo the vocabulary, with start and stride drawn from a
generator seeded by (seed, i): a pattern a model can learn (the loss falls), and a pure function of the
global sample index, so every data-parallel layout sees the same data.
"""

from __future__ import annotations

import numpy as np


class MockGPTDataset:
    """``size`` samples of ``seq_length + 1`` int64 tokens in [0, vocab_size)."""

    STRIDES = np.array([1, 1, 1, 2, 3, 5])

    def __init__(self, seq_length: int, vocab_size: int, seed: int, size: int) -> None:
        self.seq_length, self.vocab_size, self.seed, self.size = seq_length, vocab_size, seed, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(i)])
        start = int(rng.integers(0, self.vocab_size))
        stride = int(self.STRIDES[rng.integers(0, len(self.STRIDES))])
        return (start + stride * np.arange(self.seq_length + 1, dtype=np.int64)) % self.vocab_size
