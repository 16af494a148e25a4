"""Train / valid / test datasets from ``--data-path``, ``--split`` and sample counts, as Megatron.

Each prefix's documents are split into contiguous train / valid / test ranges by ``--split``; each
non-empty range with a positive sample count becomes a GPTDataset; several prefixes are blended by
weight, each component built with ``ceil(num_samples * weight * 1.005)`` samples (Megatron's margin,
so the blend never runs a component dry).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable

import numpy as np

from megamoe.data.blended_dataset import BlendedDataset, normalize_weights
from megamoe.data.errors import DataError
from megamoe.data.gpt_dataset import GPTDataset
from megamoe.data.indexed_dataset import IndexedDataset, bin_path, idx_path

log = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")
Dataset = GPTDataset | BlendedDataset


def _as_float(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def parse_data_path(data_path: list[str]) -> list[tuple[float, str]]:
    """``PREFIX`` | ``P1 P2 ...`` (equal weights) | ``W1 P1 W2 P2 ...`` -> [(weight, prefix)]."""
    if not data_path:
        raise DataError("--data-path is empty; give PREFIX or W1 PREFIX1 W2 PREFIX2 ...")
    if len(data_path) == 1 or _as_float(data_path[0]) is None:
        pairs = [(1.0, p) for p in data_path]
        for _, p in pairs:
            if _as_float(p) is not None:
                raise DataError(f"--data-path {' '.join(data_path)}: '{p}' looks like a weight but the "
                                "first entry is a prefix; give weights for all (W1 P1 W2 P2 ...) or none")
    else:
        if len(data_path) % 2:
            raise DataError(f"--data-path {' '.join(data_path)}: odd number of entries; give pairs "
                            "W1 PREFIX1 W2 PREFIX2 ...")
        pairs = []
        for w, p in zip(data_path[::2], data_path[1::2]):
            weight = _as_float(w)
            if weight is None or not math.isfinite(weight) or weight < 0:
                raise DataError(f"--data-path: blend weight '{w}' (before {p}) is not a non-negative "
                                "number; give pairs W1 PREFIX1 W2 PREFIX2 ...")
            pairs.append((weight, p))
        normalize_weights([w for w, _ in pairs])  # all zero -> DataError
    for _, p in pairs:
        for path in (idx_path(p), bin_path(p)):
            if not os.path.isfile(path):
                raise DataError(f"{path}: not found; --data-path takes prefixes (without .bin/.idx) "
                                "written by tools/preprocess_data.py")
    return pairs


def parse_split(split: str) -> list[float]:
    """'969,30,1' or '98/2/0' -> three normalised fractions (missing entries are 0)."""
    sep = "/" if "/" in split else ","
    try:
        parts = [float(s) for s in split.split(sep)]
    except ValueError:
        parts = []
    parts = (parts + [0.0, 0.0])[:3] if 0 < len(parts) <= 3 else []
    if not parts or min(parts) < 0 or sum(parts) <= 0:
        raise DataError(f"--split {split}: expected up to three non-negative numbers with a positive "
                        "sum, like 969,30,1 or 98,2,0")
    return [p / sum(parts) for p in parts]


def split_boundaries(split: str, num_documents: int) -> list[int]:
    """Megatron's get_train_valid_test_split_: rounded cumulative sizes, rounding error off the ends."""
    bounds = [0]
    for frac in parse_split(split):
        bounds.append(bounds[-1] + int(round(frac * float(num_documents))))
    diff = bounds[-1] - num_documents
    return [bounds[0]] + [b - diff for b in bounds[1:]]


def build_train_valid_test_datasets(
        data_path: list[str], split: str, seq_length: int, seed: int,
        num_samples: tuple[int, int, int], cache_dir: str | None = None, vocab_size: int | None = None,
        is_rank0: bool = True, barrier: Callable[[], None] = lambda: None,
) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """(train, valid, test): None where the split is empty or asks for no samples."""
    blend = parse_data_path(data_path)
    weights = normalize_weights([w for w, _ in blend])
    indexed = [IndexedDataset(p) for _, p in blend]
    bounds = [split_boundaries(split, len(ds)) for ds in indexed]
    out: list[Dataset | None] = []
    for s, name in enumerate(SPLIT_NAMES):
        n = int(num_samples[s])
        if n <= 0:
            out.append(None)
            continue
        parts: list[tuple[float, GPTDataset]] = []
        for w, ds, b in zip(weights, indexed, bounds):
            if b[s + 1] <= b[s] or w == 0:
                continue
            n_d = n if len(blend) == 1 else int(math.ceil(n * w * 1.005))
            parts.append((w, GPTDataset(ds, np.arange(b[s], b[s + 1]), n_d, seq_length, seed,
                                        cache_dir, name, vocab_size=vocab_size, is_rank0=is_rank0,
                                        barrier=barrier)))
        if not parts:
            out.append(None)
        elif len(blend) == 1:
            out.append(parts[0][1])
        else:
            if len(parts) < len(blend):
                log.warning("%s split: %d of %d data paths have no documents in it; blending the rest",
                            name, len(blend) - len(parts), len(blend))
            comps = [d for _, d in parts]
            out.append(BlendedDataset(
                comps, [w for w, _ in parts], n,
                cache_dir=cache_dir or comps[0].cache.directory,
                cache_key=[d.cache.key for d in comps], is_rank0=is_rank0, barrier=barrier))
    return out[0], out[1], out[2]
