"""Megatron's blended dataset: interleave several datasets in proportion to their weights.

Sample i goes to the dataset d maximising ``w_d * max(i, 1) - count_d`` (weights normalised, ties to
the lowest index), then takes that dataset's next sample ``count_d``: a greedy that keeps every
dataset's share within one sample of its target at every prefix of the stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from megamoe.data.errors import DataError
from megamoe.data.gpt_dataset import INDEX_FORMAT, IndexCache


def normalize_weights(weights: Sequence[float]) -> list[float]:
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise DataError(f"blend weights {list(weights)}: need non-negative numbers with a positive sum")
    return (w / w.sum()).tolist()


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each sample, sample index within it), as Megatron's C++ build_blending_indices.

    A sequential greedy, so a Python loop; ~1 s per million samples, and cached by BlendedDataset.
    """
    w = normalize_weights(weights)
    counts = [0] * len(w)
    which = np.empty(size, np.int16)
    within = np.empty(size, np.int64)
    others = range(1, len(w))
    for i in range(size):
        x = float(max(i, 1))
        best, best_err = 0, w[0] * x - counts[0]
        for k in others:
            err = w[k] * x - counts[k]
            if err > best_err:  # strict: equal errors keep the lower index, as Megatron
                best, best_err = k, err
        which[i], within[i] = best, counts[best]
        counts[best] += 1
    return which, within


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in the proportions of ``weights``."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int,
                 cache_dir: str | None = None, cache_key: list | dict | None = None, is_rank0: bool = True,
                 barrier: Callable[[], None] = lambda: None) -> None:
        if len(datasets) != len(weights):
            raise DataError(f"{len(datasets)} datasets but {len(weights)} blend weights; give one "
                            "weight per data path")
        self.datasets, self.weights, self.size = list(datasets), normalize_weights(weights), size

        def build() -> dict[str, np.ndarray]:
            which, within = build_blending_indices(self.weights, size)
            return {"dataset_index": which, "dataset_sample_index": within}

        kinds = ("dataset_index", "dataset_sample_index")
        if cache_dir is None or cache_key is None:
            arrays = build()
        else:
            desc = {"class": "BlendedDataset", "format": INDEX_FORMAT, "weights": self.weights,
                    "size": size, "datasets": cache_key}
            cache = IndexCache(cache_dir, "blend", desc)
            arrays = cache.get_or_build(kinds, build, is_rank0, barrier)
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        for d, ds in enumerate(self.datasets):
            need = int(np.count_nonzero(self.dataset_index == d))
            if need > len(ds):
                name = getattr(getattr(ds, "indexed", None), "prefix", f"dataset {d}")
                raise DataError(f"{name}: the blend needs {need} samples from it but it has "
                                f"{len(ds)}; build it with more samples")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
