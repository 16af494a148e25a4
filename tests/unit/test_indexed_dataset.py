"""Megatron mmap indexed dataset: byte-exact format, zero-copy reads, one-line errors on bad files."""

from __future__ import annotations

import errno
import os
import pickle
import struct

import numpy as np
import pytest

from megamoe.data.errors import DataError
from megamoe.data.indexed_dataset import DType, IndexedDataset, IndexedDatasetBuilder, WriteAside

DOCS = [[5, 6, 7], [1], [9, 9, 9, 9, 2], [], [65000, 3]]


def write(prefix, docs, dtype) -> None:
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for d in docs:
        b.add_item(np.array(d, dtype=np.int64))
        b.end_document()
    b.finalize(f"{prefix}.idx")


def expected_idx(docs, code: int, itemsize: int) -> bytes:
    lengths = [len(d) for d in docs]
    pointers = [itemsize * sum(lengths[:i]) for i in range(len(docs))]
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(docs)) + struct.pack("<Q", len(docs) + 1)
    out += struct.pack(f"<{len(docs)}i", *lengths) + struct.pack(f"<{len(docs)}q", *pointers)
    return out + struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1))


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_round_trip_and_header_bytes(tmp_path, dtype, code):
    prefix = str(tmp_path / "ds")
    write(prefix, DOCS, dtype)
    itemsize = np.dtype(dtype).itemsize
    assert (tmp_path / "ds.idx").read_bytes() == expected_idx(DOCS, code, itemsize)
    assert (tmp_path / "ds.bin").read_bytes() == np.concatenate(
        [np.array(d, dtype) for d in DOCS]).astype(f"<{np.dtype(dtype).char}").tobytes()
    ds = IndexedDataset(prefix)
    assert len(ds) == 5 and ds.dtype == np.dtype(dtype)
    for i, d in enumerate(DOCS):
        assert ds[i].dtype == np.dtype(dtype) and ds[i].tolist() == d
    assert ds.sequence_lengths.tolist() == [3, 1, 5, 0, 2]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4, 5]
    assert ds.get(2, offset=1, length=3).tolist() == [9, 9, 9]
    assert ds.get(2, offset=3).tolist() == [9, 2]
    assert ds[-1].tolist() == [65000, 3]
    assert not ds[0].flags.owndata  # a view of the mapped file, not a copy
    assert ds.max_token_id() == 65000 and ds.min_token_id() == 1
    with pytest.raises(IndexError):
        ds.get(0, offset=2, length=2)
    blob = pickle.dumps(ds)  # for data-loader workers: reopens the files rather than copying them
    assert len(blob) < 200 and pickle.loads(blob)[2].tolist() == DOCS[2]


def test_dtype_codes_and_choice():
    assert {d.name: d.value for d in DType} == {"uint8": 1, "int8": 2, "int16": 3, "int32": 4,
                                               "int64": 5, "float64": 6, "float32": 7, "uint16": 8}
    assert DType.optimal_dtype(65499) is np.uint16 and DType.optimal_dtype(65500) is np.int32
    assert DType.optimal_dtype(None) is np.int32


def test_multi_sequence_documents_and_add_index(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    builder = IndexedDatasetBuilder(f"{a}.bin", np.uint16)
    for seq in ([1, 2], [3], [4, 5, 6]):
        builder.add_item(seq)
    builder.end_document()  # one document of three sequences
    builder.add_item([7])
    builder.end_document()
    builder.finalize(f"{a}.idx")
    write(b, [[8, 9], [10]], np.uint16)
    merged = str(tmp_path / "m")
    builder = IndexedDatasetBuilder(f"{merged}.bin", np.uint16)
    builder.add_index(a)
    builder.add_index(b)
    builder.finalize(f"{merged}.idx")
    ds = IndexedDataset(merged)
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4, 5, 6], [7], [8, 9], [10]]
    assert ds.document_indices.tolist() == [0, 3, 4, 5, 6]
    assert ds.sequence_pointers.tolist() == [0, 4, 6, 12, 14, 18]
    other = IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.int32)
    with pytest.raises(DataError, match=r"a\.idx: dtype uint16 differs from int32"):
        other.add_index(a)


def one_line_error(prefix: str, match: str) -> str:
    with pytest.raises(DataError, match=match) as e:
        IndexedDataset(prefix)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def patch(path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.fixture
def good(tmp_path):
    prefix = tmp_path / "ds"
    write(str(prefix), DOCS, np.uint16)
    return prefix


def test_missing_files(good):
    good.with_suffix(".bin").unlink()
    assert "ds.bin: not found" in one_line_error(str(good), "not found")
    good.with_suffix(".idx").unlink()
    assert "ds.idx: not found" in one_line_error(str(good), "not found")


def test_wrong_magic(good):
    patch(good.with_suffix(".idx"), 0, b"NOTANIDX\x00")
    assert "ds.idx: not a Megatron mmap index" in one_line_error(str(good), "bad magic")


def test_wrong_version(good):
    patch(good.with_suffix(".idx"), 9, struct.pack("<Q", 2))
    assert "ds.idx: unsupported index version 2" in one_line_error(str(good), "version")


def test_unknown_dtype_code(good):
    patch(good.with_suffix(".idx"), 17, bytes([9]))
    assert "ds.idx: unknown dtype code 9" in one_line_error(str(good), "dtype code")


def test_truncated_bin(good):
    path = good.with_suffix(".bin")
    path.write_bytes(path.read_bytes()[:-2])
    msg = one_line_error(str(good), "truncated")
    assert "ds.bin: truncated: the index needs 22 bytes but the file has 20" in msg


def test_truncated_idx(good):
    path = good.with_suffix(".idx")
    path.write_bytes(path.read_bytes()[:-8])
    assert "ds.idx: truncated index: header says 5 sequences" in one_line_error(str(good), "truncated")
    path.write_bytes(path.read_bytes()[:20])
    one_line_error(str(good), "bad magic")  # shorter than the header itself


def test_empty_dataset(tmp_path):
    write(str(tmp_path / "e"), [], np.uint16)
    ds = IndexedDataset(str(tmp_path / "e"))
    assert len(ds) == 0 and ds.document_indices.tolist() == [0] and ds.max_token_id() == -1


def test_write_aside_replaces_only_complete_outputs(tmp_path, good):
    """Builder output through WriteAside: same bytes as a direct write; an error before commit keeps
    the previous files byte for byte and leaves no temporary (or scratch) file behind."""
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    new = [[1, 2, 3], [4]]
    with pytest.raises(DataError, match=r"ds\.bin: No space left on device; nothing was replaced"):
        with WriteAside() as aside:
            open(aside.scratch(str(good)) + ".part0", "wb").close()
            b = IndexedDatasetBuilder(aside.path(f"{good}.bin"), np.uint16)
            b.add_item(new[0])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # the disk fills mid-write
    with pytest.raises(KeyError):  # any other failure after complete files, e.g. a bug or an interrupt
        with WriteAside() as aside:
            b = IndexedDatasetBuilder(aside.path(f"{good}.bin"), np.uint16)
            b.add_item(new[0])
            b.finalize(aside.path(f"{good}.idx"))
            raise KeyError
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with WriteAside() as aside:
        b = IndexedDatasetBuilder(aside.path(f"{good}.bin"), np.uint16)
        for d in new:
            b.add_item(d)
            b.end_document()
        b.finalize(aside.path(f"{good}.idx"))
        open(aside.scratch(str(good)) + ".part0", "wb").close()
        assert IndexedDataset(str(good)).sequence_lengths.tolist() == [3, 1, 5, 0, 2]  # not yet
        aside.commit()
    write(str(tmp_path / "direct"), new, np.uint16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.bin", "direct.idx", "ds.bin", "ds.idx"]
    for s in (".bin", ".idx"):
        assert (tmp_path / f"ds{s}").read_bytes() == (tmp_path / f"direct{s}").read_bytes()


@pytest.mark.megatron
def test_megatron_core_compat(tmp_path):
    """Their builder -> our reader, and our builder -> their reader (skipped without megatron-core)."""
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    torch = pytest.importorskip("torch")
    for dtype in (np.uint16, np.int32):
        theirs, ours = str(tmp_path / f"theirs{dtype.__name__}"), str(tmp_path / f"ours{dtype.__name__}")
        builder = mcore.IndexedDatasetBuilder(f"{theirs}.bin", dtype=dtype)
        for d in DOCS:
            builder.add_item(torch.tensor(d, dtype=torch.int64))
            builder.end_document()
        builder.finalize(f"{theirs}.idx")
        ds = IndexedDataset(theirs)
        assert [ds[i].tolist() for i in range(len(ds))] == DOCS and ds.dtype == np.dtype(dtype)
        write(ours, DOCS, dtype)
        assert (tmp_path / f"{ours}.idx").read_bytes() == (tmp_path / f"{theirs}.idx").read_bytes()
        their = mcore.IndexedDataset(ours)
        assert [their[i].tolist() for i in range(len(their))] == DOCS
        assert their.get(2, offset=1, length=3).tolist() == [9, 9, 9]
        assert their.document_indices.tolist() == list(range(6))


# Offsets into the .idx of `good` (DOCS as uint16: 5 sequences of [3, 1, 5, 0, 2] tokens, 22-byte .bin).
LEN, PTR, DOC = 34, 34 + 4 * 5, 34 + 12 * 5


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


def i64(v: int) -> bytes:
    return struct.pack("<q", v)


CORRUPT = {  # name: (offset, bytes, expected message)
    "negative length": (LEN + 4 * 3, i32(-5), "ds.idx: sequence 3 has length -5"),
    "pointer beyond bin": (PTR + 8 * 2, i64(10**6), "ds.idx: sequence 2 starts at byte 1000000, outside "),
    "negative pointer": (PTR + 8 * 1, i64(-4), "ds.idx: sequence 1 starts at byte -4, outside "),
    "length beyond bin": (LEN + 4 * 2, i32(1000),
                          r"ds.idx: sequence 2 \(1000 tokens from byte 8\) ends at byte 2008, beyond "),
    "last length beyond bin": (LEN + 4 * 4, i32(1000),
                               "ds.bin: truncated: the index needs 2018 bytes but the file has 22"),
    "pointers decrease": (PTR + 8 * 2, i64(2), "ds.idx: sequence 2 starts at byte 2, before sequence 1 "
                                               r"\(byte 6\)"),
    "gap between sequences": (PTR + 8 * 2, i64(10), "ds.idx: sequence 2 starts at byte 10 but sequence 1 "
                                                    "ends at byte 8"),
    "first pointer not 0": (PTR, i64(2), "ds.idx: sequence 0 starts at byte 2, not 0"),
    "document index 1e9": (DOC + 8 * 2, i64(10**9),
                           "ds.idx: document 2 starts at sequence 1000000000, outside the 5 sequences"),
    "document index decreases": (DOC + 8 * 3, i64(1),
                                 r"ds.idx: document 3 starts at sequence 1, before document 2 \(sequence"),
    "document index not from 0": (DOC, i64(1), "ds.idx: document index starts at 1, expected it to start at"),
    "document index short": (DOC + 8 * 5, i64(4), "ds.idx: the document index ends at sequence 4, not at the "
                                                  "number of sequences 5"),
    "uint8 code for uint16 data": (17, bytes([DType.uint8]),
                                   r"ds.idx: sequence 1 starts at byte 6 but sequence 0 ends at byte 3 "
                                   r"\(3 tokens of uint8\); the dtype code or the pointers are wrong"),
    "unknown dtype code 0": (17, bytes([0]), "ds.idx: unknown dtype code 0"),
    "unknown dtype code 9": (17, bytes([9]), "ds.idx: unknown dtype code 9"),
}


@pytest.mark.parametrize("chunk", [None, 2], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_index_is_one_line_error(good, monkeypatch, case, chunk):
    """Each corruption fails at open with one line naming the file, the fault and the fix, whether the
    index is checked in one numpy pass or in chunks (chunk boundaries must not hide a fault)."""
    if chunk:
        monkeypatch.setattr("megamoe.data.indexed_dataset._CHUNK", chunk)
    offset, data, expected = CORRUPT[case]
    patch(good.with_suffix(".idx"), offset, data)
    msg = one_line_error(str(good), expected)
    assert "re-run preprocessing" in msg or "tools/preprocess_data.py" in msg


def test_wrong_dtype_code_single_sequence(tmp_path):
    """With one sequence there is no pointer step to disagree: the .bin size still exposes a uint8 code
    for uint16 data (the index covers half the file) and an int32 code (it needs twice the file)."""
    prefix = tmp_path / "one"
    write(str(prefix), [[1, 2, 3]], np.uint16)
    patch(prefix.with_suffix(".idx"), 17, bytes([DType.uint8]))
    one_line_error(str(prefix), r"one\.bin: has 6 bytes but the index .*dtype uint8\) covers only 3; "
                                "the dtype code or the index is wrong")
    patch(prefix.with_suffix(".idx"), 17, bytes([DType.int32]))
    one_line_error(str(prefix), r"one\.bin: truncated: the index needs 12 bytes but the file has 6")


def test_bin_longer_than_index(good):
    path = good.with_suffix(".bin")
    path.write_bytes(path.read_bytes() + b"\x00\x00")
    one_line_error(str(good), r"ds\.bin: has 24 bytes but the index .* covers only 22")


def test_valid_chunk_boundaries(good, monkeypatch):
    """A valid index opens whatever the chunk size (the running pointer carries across chunks)."""
    for chunk in (1, 2, 3, 5, 7):
        monkeypatch.setattr("megamoe.data.indexed_dataset._CHUNK", chunk)
        assert [IndexedDataset(str(good))[i].tolist() for i in range(5)] == DOCS


def test_large_valid_index_opens_cheaply(tmp_path):
    """Validation is vectorised: three million sequences open in well under a second per million."""
    import time

    from megamoe.data.indexed_dataset import write_index

    n = 3_000_000
    lengths = np.random.default_rng(0).integers(0, 2000, n).astype(np.int32)
    write_index(str(tmp_path / "big.idx"), np.dtype(np.uint16), lengths, np.arange(n + 1))
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * 2)  # sparse: only the size matters here
    t = time.perf_counter()
    ds = IndexedDataset(str(tmp_path / "big"))
    assert len(ds) == n and time.perf_counter() - t < 3.0
