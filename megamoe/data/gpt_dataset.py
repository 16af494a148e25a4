"""Megatron's GPT dataset: fixed-length samples packed across shuffled documents.

Three indices, built once in numpy and cached as .npy files (Megatron builds them in C++):

- document index: the split's document ids repeated for as many epochs as ``num_samples`` needs,
  each epoch a fresh permutation drawn from ``np.random.RandomState(seed)``;
- sample index ``[n + 1, 2]``: row i is (position in the document index, token offset) where sample i
  starts. Sample i covers tokens [i * seq_length, (i + 1) * seq_length] of the concatenated document
  stream, seq_length + 1 tokens, so consecutive samples share one token (inputs / shifted labels);
- shuffle index: a permutation of the n samples, so ``ds[i]`` is sample ``shuffle[i]``.

A deliberate difference from Megatron: Megatron shuffles all epochs' documents together (and shuffles
a final partial epoch separately); here every epoch is its own permutation, so each document appears
once per epoch. The sample index follows Megatron exactly given a document index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable

import numpy as np

from megamoe.data.errors import DataError
from megamoe.data.indexed_dataset import IndexedDataset

log = logging.getLogger(__name__)

INDEX_FORMAT = 1  # bump when the index construction changes, so stale caches are not reused


def _md5(arr: np.ndarray) -> str:
    return hashlib.md5(np.ascontiguousarray(arr).tobytes()).hexdigest()


class IndexCache:
    """Named .npy arrays under ``directory``, keyed by an md5 of a JSON description of their inputs."""

    def __init__(self, directory: str, stem: str, description: dict) -> None:
        self.description = json.dumps(description, sort_keys=True, indent=2)
        self.key = hashlib.md5(self.description.encode()).hexdigest()
        self.directory, self.stem = directory, stem

    def path(self, kind: str) -> str:
        return os.path.join(self.directory, f"{self.stem}-{self.key}-{kind}.npy")

    def load(self, kinds: tuple[str, ...]) -> dict[str, np.ndarray] | None:
        if not all(os.path.isfile(self.path(k)) for k in kinds):
            return None
        return {k: np.load(self.path(k), mmap_mode="r") for k in kinds}

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        """Write each array to a temporary name and rename it, so readers never see half a file."""
        try:
            os.makedirs(self.directory, exist_ok=True)
            with open(os.path.join(self.directory, f"{self.stem}-{self.key}-description.json"),
                      "w") as f:
                f.write(self.description + "\n")
            for kind, arr in arrays.items():
                tmp = self.path(kind) + f".tmp{os.getpid()}.npy"
                np.save(tmp, arr)
                os.replace(tmp, self.path(kind))
        except OSError as e:  # read-only data directory: every rank then builds in memory
            log.warning("cannot cache dataset indices in %s (%s); building them in memory; pass a "
                        "writable cache directory (--data-cache-path)", self.directory, e)

    def get_or_build(self, kinds: tuple[str, ...], build: Callable[[], dict[str, np.ndarray]],
                     is_rank0: bool, barrier: Callable[[], None]) -> dict[str, np.ndarray]:
        """Rank 0 builds and saves when missing; all ranks meet at ``barrier``; the others load."""
        arrays = None
        if is_rank0:
            arrays = self.load(kinds)
            if arrays is None:
                arrays = build()
                self.save(arrays)
        barrier()
        if not is_rank0:
            arrays = self.load(kinds)
            if arrays is None:  # rank 0 could not write the cache: same build, deterministic
                arrays = build()
        return arrays


def num_epochs_needed(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs whose tokens make num_samples samples of seq_length + 1 (sharing one token)."""
    need = num_samples * seq_length + 1
    return max(1, -(-need // tokens_per_epoch))


def build_document_index(document_ids: np.ndarray, num_epochs: int,
                         rng: np.random.RandomState) -> np.ndarray:
    return np.concatenate([rng.permutation(document_ids) for _ in range(num_epochs)]).astype(np.int32)


def build_sample_index(sizes: np.ndarray, doc_index: np.ndarray, seq_length: int,
                       num_samples: int) -> np.ndarray:
    """[num_samples + 1, 2] (document-index position, offset) of each sample start, as Megatron's C++.

    Sample i starts at global token i * seq_length. Megatron's loop lands on the last token of a
    document rather than the first of the next when a sample ends exactly there; a searchsorted over
    the document starts with side="right" gives the same row, and skips empty documents as it does.
    """
    starts = np.zeros(len(doc_index) + 1, np.int64)
    np.cumsum(sizes[doc_index], dtype=np.int64, out=starts[1:])
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    doc_pos = np.searchsorted(starts, positions, side="right") - 1
    return np.stack([doc_pos, positions - starts[doc_pos]], axis=1)


class GPTDataset:
    """``num_samples`` (at least) samples of ``seq_length + 1`` int64 tokens from the given documents."""

    KINDS = ("document_index", "sample_index", "shuffle_index")

    def __init__(self, indexed: IndexedDataset, document_ids: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, cache_dir: str | None, name: str,
                 vocab_size: int | None = None, is_rank0: bool = True,
                 barrier: Callable[[], None] = lambda: None) -> None:
        self.indexed, self.name = indexed, name
        self.seq_length, self.seed = seq_length, seed
        self.document_ids = np.asarray(document_ids, np.int64)
        prefix = indexed.prefix
        if num_samples < 1 or seq_length < 1:
            raise DataError(f"{prefix}: {name} split asks for {num_samples} samples of {seq_length} "
                            "tokens; both must be positive")
        if vocab_size is not None:
            check_vocab(indexed, vocab_size)
        sizes = indexed.sequence_lengths
        tokens_per_epoch = int(np.sum(sizes[self.document_ids], dtype=np.int64))
        if tokens_per_epoch <= seq_length:
            raise DataError(f"{prefix}: the {name} split has {tokens_per_epoch} tokens in "
                            f"{len(self.document_ids)} documents, fewer than seq_length + 1 = "
                            f"{seq_length + 1}; lower --seq-length or give this split more data")
        cache = IndexCache(
            cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache"),
            f"{os.path.basename(prefix)}-{name}",
            {"class": "GPTDataset", "format": INDEX_FORMAT, "prefix": os.path.abspath(prefix),
             "document_ids_md5": _md5(self.document_ids),
             "document_sizes_md5": _md5(np.asarray(sizes[self.document_ids], np.int32)),
             "num_samples": num_samples, "seq_length": seq_length, "seed": seed})
        self.cache = cache

        def build() -> dict[str, np.ndarray]:
            return self._build_indices(np.asarray(sizes), tokens_per_epoch, num_samples)

        arrays = cache.get_or_build(self.KINDS, build, is_rank0, barrier)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _build_indices(self, sizes: np.ndarray, tokens_per_epoch: int,
                       num_samples: int) -> dict[str, np.ndarray]:
        epochs = num_epochs_needed(tokens_per_epoch, self.seq_length, num_samples)
        rng = np.random.RandomState(self.seed)
        doc_index = build_document_index(self.document_ids, epochs, rng)
        # Every full sample the epochs hold (>= num_samples), as Megatron's __len__.
        total = (epochs * tokens_per_epoch - 1) // self.seq_length
        sample_index = build_sample_index(sizes, doc_index, self.seq_length, total)
        shuffle_index = rng.permutation(total).astype(np.int64)
        log.info("built %s indices for %s: %d samples over %d epochs", self.name, self.indexed.prefix,
                 total, epochs)
        return {"document_index": doc_index, "sample_index": sample_index,
                "shuffle_index": shuffle_index}

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, i: int) -> np.ndarray:
        j = int(self.shuffle_index[i])
        (beg, beg_off), (end, end_off) = self.sample_index[j], self.sample_index[j + 1]
        docs, get = self.document_index, self.indexed.get
        if beg == end:
            return get(int(docs[beg]), int(beg_off), int(end_off - beg_off + 1)).astype(np.int64)
        parts = [get(int(docs[beg]), int(beg_off))]
        parts += [get(int(docs[k])) for k in range(beg + 1, end)]
        parts.append(get(int(docs[end]), 0, int(end_off) + 1))
        return np.concatenate(parts).astype(np.int64)


def check_vocab(indexed: IndexedDataset, vocab_size: int) -> None:
    """Every token id must index the embedding; checked once per dataset over the whole .bin."""
    if indexed.dtype == np.uint16 and vocab_size > np.iinfo(np.uint16).max:
        return
    top, low = indexed.max_token_id(), indexed.min_token_id()
    fix = "preprocess the data with the tokenizer given as --tokenizer-model"
    if top >= vocab_size:
        raise DataError(f"{indexed.prefix}.bin: token id {top} >= vocab size {vocab_size} of the "
                        f"tokenizer; {fix}")
    if low < 0:
        raise DataError(f"{indexed.prefix}.bin: negative token id {low}; {fix}")
