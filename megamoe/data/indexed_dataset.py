"""Megatron's mmap indexed dataset: a headerless ``.bin`` of tokens plus an ``.idx`` index.

``.idx`` layout (little-endian, no padding), byte-compatible with megatron.core.datasets.indexed_dataset:

    9 bytes  b"MMIDIDX\\x00\\x00"     magic
    uint64   version = 1
    uint8    dtype code              (DType below)
    uint64   N                       sequences
    uint64   D                       document index length (documents + 1)
    int32[N] sequence lengths        in tokens
    int64[N] sequence pointers       byte offsets into .bin
    int64[D] document indices        sequence index where each document starts; starts with 0

The reader maps both files and hands out numpy views (no copies, no reads until a token is touched).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import struct
from enum import IntEnum

import numpy as np

from megamoe.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D: 34 bytes
_CHUNK = 1 << 22  # index entries validated per numpy pass (bounds the temporary memory)


class DType(IntEnum):
    """Megatron's dtype codes in the .idx header."""

    uint8 = 1
    int8 = 2
    int16 = 3
    int32 = 4
    int64 = 5
    float64 = 6
    float32 = 7
    uint16 = 8

    @classmethod
    def code_of(cls, dtype: type[np.number] | np.dtype) -> int:
        return cls[np.dtype(dtype).name].value

    @classmethod
    def dtype_of(cls, code: int) -> np.dtype:
        return np.dtype(cls(code).name)

    @staticmethod
    def optimal_dtype(vocab_size: int | None) -> type[np.number]:
        """Megatron's choice: uint16 below 65500 tokens, else int32."""
        return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def existing_outputs(paths: list[str], overwrite: bool, flag: str = "--overwrite") -> None:
    """Refuse (DataError) when one of ``paths`` exists and ``overwrite`` is not set."""
    for path in paths:
        if os.path.exists(path) and not overwrite:
            raise DataError(f"{path}: already exists; pass {flag} to replace it")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory
        pass
    finally:
        os.close(fd)


class WriteAside:
    """Outputs written under temporary names beside their final paths and renamed into place together.

        with WriteAside() as aside:
            write(aside.path("out.bin")); write(aside.path("out.idx"))
            aside.commit()      # fsync each temporary, os.replace it onto its final path

    Leaving the block without ``commit()`` (an exception, a failed check) removes the temporaries and
    leaves the final paths untouched, so a failed run never damages a previous good output. An
    OSError (disk full, permissions) becomes a one-line DataError naming the output.
    """

    def __init__(self) -> None:
        self._final: dict[str, str] = {}  # temporary -> final path
        self._scratch: list[str] = []
        self._token = f"{os.getpid()}.{secrets.token_hex(4)}"
        self._replaced: list[str] = []
        self.committed = False

    def _tmp(self, name: str) -> str:
        d, base = os.path.split(os.path.abspath(name))
        return os.path.join(d, f".{base}.{self._token}.tmp")

    def path(self, final: str) -> str:
        """A fresh temporary path in ``final``'s directory (hidden), renamed to ``final`` by commit."""
        tmp = self._tmp(final)
        self._final[tmp] = final
        return tmp

    def scratch(self, name: str) -> str:
        """A temporary name (or prefix) beside ``name`` for intermediate files: every file whose name
        starts with it is removed on leaving the block, committed or not."""
        tmp = self._tmp(name)
        self._scratch.append(tmp)
        return tmp

    def commit(self) -> None:
        for tmp in self._final:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, final in self._final.items():
            os.replace(tmp, final)
            self._replaced.append(final)
        for d in {os.path.dirname(t) for t in self._final}:
            _fsync_dir(d)
        self.committed = True

    def discard(self, committed: bool = False) -> None:
        doomed = [] if committed else list(self._final)
        for prefix in self._scratch:
            d, base = os.path.split(prefix)
            if os.path.isdir(d):
                doomed += [os.path.join(d, f) for f in os.listdir(d) if f.startswith(base)]
        for tmp in doomed:
            try:
                os.remove(tmp)
            except (FileNotFoundError, NotADirectoryError):  # never created (or under a file)
                pass

    def __enter__(self) -> WriteAside:
        return self

    def __exit__(self, typ, exc, tb) -> None:
        self.discard(self.committed)
        if isinstance(exc, OSError):
            first = next(iter(self._final.values()), "")
            name = self._final.get(exc.filename, exc.filename) or first
            if any(str(name).startswith(p) for p in self._scratch):
                name = first
            reason = exc.strerror or errno.errorcode.get(exc.errno or 0) or str(exc)
            kept = (f"only {', '.join(self._replaced)} replaced, the others kept" if self._replaced
                    else "nothing was replaced (any previous output is kept)")
            raise DataError(f"{name}: {reason}; {kept}") from exc


class IndexedDatasetBuilder:
    """Streams token arrays into ``bin_path``; ``finalize(idx_path)`` writes the index. Tools pass
    paths from WriteAside so that nothing replaces a good dataset until it is complete and synced."""

    def __init__(self, bin_path: str, dtype: type[np.number] | np.dtype = np.int32) -> None:
        self.dtype = np.dtype(dtype)
        DType.code_of(self.dtype)  # fail early on a dtype the format cannot name
        self.bin_path = bin_path
        self._file = open(bin_path, "wb")
        self._lengths: list[np.ndarray] = []  # chunks, so add_index of a large dataset stays cheap
        self._pending: list[int] = []
        self._doc_idx: list[np.ndarray] = [np.zeros(1, np.int64)]
        self._pending_docs: list[int] = []
        self._count = 0

    def add_item(self, tokens: np.ndarray | list[int]) -> None:
        """Append one sequence (in this codebase one sequence is one document)."""
        arr = np.asarray(tokens)
        if arr.dtype != self.dtype:
            arr = arr.astype(self.dtype)
        self._file.write(arr.tobytes(order="C"))
        self._pending.append(arr.size)
        self._count += 1

    def end_document(self) -> None:
        self._pending_docs.append(self._count)

    def _flush(self) -> None:
        if self._pending:
            self._lengths.append(np.asarray(self._pending, np.int32))
            self._pending = []
        if self._pending_docs:
            self._doc_idx.append(np.asarray(self._pending_docs, np.int64))
            self._pending_docs = []

    def add_index(self, other_prefix: str) -> None:
        """Append every sequence and document of the dataset at ``other_prefix`` (for merging)."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise DataError(f"{idx_path(other_prefix)}: dtype {other.dtype.name} differs from "
                            f"{self.dtype.name} of the datasets before it; merge only datasets "
                            "preprocessed with the same tokenizer")
        self._flush()
        self._lengths.append(np.array(other.sequence_lengths, np.int32))
        self._doc_idx.append(self._count + np.asarray(other.document_indices[1:], np.int64))
        self._count += len(other)
        with open(bin_path(other_prefix), "rb") as f:
            shutil.copyfileobj(f, self._file, 16 << 20)
        del other

    def finalize(self, idx_path: str) -> None:
        self._flush()
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        doc_idx = np.concatenate(self._doc_idx)
        write_index(idx_path, self.dtype, lengths, doc_idx)


def write_index(path: str, dtype: np.dtype, lengths: np.ndarray, doc_idx: np.ndarray) -> None:
    """Write an .idx for sequences of ``lengths`` tokens laid out back to back in the .bin."""
    pointers = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, DType.code_of(dtype), len(lengths), len(doc_idx)))
        f.write(np.asarray(lengths, "<i4").tobytes())
        f.write(pointers.astype("<i8").tobytes())
        f.write(np.asarray(doc_idx, "<i8").tobytes())


class IndexedDataset:
    """Read-only view of ``prefix``.idx/.bin; ``ds[i]`` is sequence i as a numpy view of the .bin."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                raise DataError(f"{path}: not found; check --data-path (a prefix, without "
                                ".bin/.idx) or run tools/preprocess_data.py")
        self._read_index(ipath)
        self._bin_size = os.path.getsize(bpath)
        self._validate(ipath, bpath)
        # np.memmap refuses empty files
        self._bin = np.memmap(bpath, dtype=np.uint8, mode="r") if self._bin_size else np.zeros(0, np.uint8)
        self._max_token: int | None = None
        self._min_token = 0

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}  # pickling a memmap would copy the whole file: reopen instead

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def _read_index(self, path: str) -> None:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size or head[:9] != MAGIC:
            raise DataError(f"{path}: not a Megatron mmap index (bad magic {head[:9]!r}, expected "
                            f"{MAGIC!r}); pass the prefix of a .idx written by preprocess_data.py")
        _, version, code, n, d = HEADER.unpack(head)
        if version != VERSION:
            raise DataError(f"{path}: unsupported index version {version} (only {VERSION}); "
                            "re-preprocess the data with this codebase or Megatron")
        if code not in DType._value2member_map_:
            raise DataError(f"{path}: unknown dtype code {code} (known: 1-8); the file is corrupt "
                            "or from another format, re-run preprocessing")
        need = HEADER.size + 12 * n + 8 * d
        if size < need:
            raise DataError(f"{path}: truncated index: header says {n} sequences and {d} document "
                            f"entries ({need} bytes) but the file has {size}; re-run preprocessing")
        self.dtype: np.dtype = DType.dtype_of(code)
        idx = np.memmap(path, dtype=np.uint8, mode="r")
        off = HEADER.size
        self.sequence_lengths: np.ndarray = idx[off:off + 4 * n].view("<i4")
        off += 4 * n
        self.sequence_pointers: np.ndarray = idx[off:off + 8 * n].view("<i8")
        off += 8 * n
        self.document_indices: np.ndarray = idx[off:off + 8 * d].view("<i8")

    def _validate(self, ipath: str, bpath: str) -> None:
        """Check the whole index against the .bin size (vectorised, in chunks of bounded memory).

        Every writer (ours, tools/preprocess_data.py, tools/merge_datasets.py via add_index, and
        Megatron's _IndexWriter) derives the pointers from the lengths, so sequences lie back to back
        from byte 0 and the .bin ends exactly where the last sequence does. A wrong dtype code breaks
        that rule (pointers step by the real item size, lengths count tokens) or the .bin size.
        """
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        n, size, item, name = len(lengths), self._bin_size, self.dtype.itemsize, self.dtype.name
        fix = "rebuild it with tools/preprocess_data.py"

        def first(bad: np.ndarray, start: int = 0) -> int | None:
            hits = np.flatnonzero(bad)
            return start + int(hits[0]) if hits.size else None

        # pass 1: lengths >= 0 and the pointers are exactly the running sum of the lengths
        contiguous_upto = n  # first sequence whose pointer breaks the back-to-back layout
        carry = 0
        for lo in range(0, n, _CHUNK):
            ln = np.asarray(lengths[lo:lo + _CHUNK], np.int64)
            i = first(ln < 0, lo)
            if i is not None:
                raise DataError(f"{ipath}: sequence {i} has length {int(lengths[i])}; lengths must be "
                                f">= 0, the index is corrupt: {fix}")
            if contiguous_upto == n:
                expect = np.cumsum(ln * item) - ln * item + carry
                i = first(np.asarray(pointers[lo:lo + _CHUNK]) != expect, lo)
                if i is not None:
                    contiguous_upto = i
                carry = int(expect[-1]) + int(ln[-1]) * item
        if contiguous_upto == n:
            end = carry
            if end > size:
                raise DataError(f"{bpath}: truncated: the index needs {end} bytes but the file has "
                                f"{size}; re-run preprocessing (or copy the file again)")
            if end < size:
                raise DataError(f"{bpath}: has {size} bytes but the index ({ipath}, dtype {name}) "
                                f"covers only {end}; the dtype code or the index is wrong: {fix}")
        else:
            self._pointer_error(ipath, bpath, contiguous_upto, fix)
        # document indices: 0, non-decreasing, ending at the number of sequences
        if len(docs) == 0 or int(docs[0]) != 0:
            got = "no entries" if len(docs) == 0 else f"starts at {int(docs[0])}"
            raise DataError(f"{ipath}: document index {got}, expected it to start at 0; {fix}")
        for lo in range(0, len(docs), _CHUNK):
            d = np.asarray(docs[lo:lo + _CHUNK + 1])
            i = first((d < 0) | (d > n), lo)
            if i is not None:
                raise DataError(f"{ipath}: document {i} starts at sequence {int(docs[i])}, outside the "
                                f"{n} sequences; {fix}")
            i = first(d[1:] < d[:-1], lo + 1)
            if i is not None:
                raise DataError(f"{ipath}: document {i} starts at sequence {int(docs[i])}, before "
                                f"document {i - 1} (sequence {int(docs[i - 1])}); {fix}")
        if int(docs[-1]) != n:
            raise DataError(f"{ipath}: the document index ends at sequence {int(docs[-1])}, not at the "
                            f"number of sequences {n}; {fix}")

    def _pointer_error(self, ipath: str, bpath: str, bad: int, fix: str) -> None:
        """Raise the most telling error for pointers that are not back to back from ``bad`` on."""
        lengths, pointers = self.sequence_lengths, self.sequence_pointers
        n, size, item = len(lengths), self._bin_size, self.dtype.itemsize
        for lo in range(0, n, _CHUNK):
            p = np.asarray(pointers[lo:lo + _CHUNK])
            hits = np.flatnonzero((p < 0) | (p > size))
            if hits.size:
                i = lo + int(hits[0])
                raise DataError(f"{ipath}: sequence {i} starts at byte {int(pointers[i])}, outside "
                                f"{bpath} ({size} bytes); {fix}")
            e = p + np.asarray(lengths[lo:lo + _CHUNK], np.int64) * item
            hits = np.flatnonzero(e > size)
            if hits.size:
                i = lo + int(hits[0])
                raise DataError(f"{ipath}: sequence {i} ({int(lengths[i])} tokens from byte "
                                f"{int(pointers[i])}) ends at byte {int(e[hits[0]])}, beyond the end "
                                f"of {bpath} ({size} bytes); {fix}")
            p = np.asarray(pointers[max(lo - 1, 0):lo + _CHUNK])
            hits = np.flatnonzero(p[1:] < p[:-1])
            if hits.size:
                i = max(lo - 1, 0) + int(hits[0]) + 1
                raise DataError(f"{ipath}: sequence {i} starts at byte {int(pointers[i])}, before "
                                f"sequence {i - 1} (byte {int(pointers[i - 1])}); pointers must not "
                                f"decrease: {fix}")
        if bad == 0:
            raise DataError(f"{ipath}: sequence 0 starts at byte {int(pointers[0])}, not 0; {fix}")
        prev_end = int(pointers[bad - 1]) + int(lengths[bad - 1]) * item
        raise DataError(f"{ipath}: sequence {bad} starts at byte {int(pointers[bad])} but sequence "
                        f"{bad - 1} ends at byte {prev_end} ({int(lengths[bad - 1])} tokens of "
                        f"{self.dtype.name}); the dtype code or the pointers are wrong: {fix}")

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i, a view into the mapped .bin."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences in {self.prefix}")
        size = int(self.sequence_lengths[i])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) outside sequence {i} of {size}")
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return self._bin[start:start + length * self.dtype.itemsize].view(self.dtype)

    def max_token_id(self) -> int:
        """Largest token id in the .bin (one pass over the map, remembered); -1 when empty."""
        if self._max_token is None:
            tokens = self._bin[:self._used_bytes()].view(self.dtype)
            self._max_token = int(tokens.max()) if tokens.size else -1
            self._min_token = int(tokens.min()) if tokens.size else 0
        return self._max_token

    def min_token_id(self) -> int:
        self.max_token_id()
        return self._min_token

    def _used_bytes(self) -> int:
        if not len(self):
            return 0
        return int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
