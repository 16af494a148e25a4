"""GPT samples (document / sample / shuffle indices and their cache), blending, split and data path."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megamoe.data.blended_dataset import BlendedDataset, build_blending_indices
from megamoe.data.builder import (
    build_train_valid_test_datasets,
    parse_data_path,
    split_boundaries,
)
from megamoe.data.errors import DataError
from megamoe.data.gpt_dataset import GPTDataset, build_sample_index
from megamoe.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def write(prefix, docs, dtype=np.uint16) -> IndexedDataset:
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for d in docs:
        b.add_item(np.asarray(d))
        b.end_document()
    b.finalize(f"{prefix}.idx")
    return IndexedDataset(str(prefix))


def megatron_sample_index(sizes, doc_idx, seq_length, num_samples):
    """A line-by-line port of Megatron's C++ build_sample_idx, the reference."""
    out = [(0, 0)]
    i, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + 1
        while remaining != 0:
            length = sizes[doc_idx[i]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                i, offset = i + 1, 0
        out.append((i, offset))
    return np.array(out)


DOCS = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]  # tokens 1..10 in document order


def test_sample_index_by_hand():
    idx = build_sample_index(np.array([3, 5, 2]), np.array([0, 1, 2]), seq_length=4, num_samples=2)
    assert idx.tolist() == [[0, 0], [1, 1], [2, 0]]


@pytest.mark.parametrize("seq_length", [1, 3, 7, 16])
def test_sample_index_matches_megatron(seq_length):
    rng = np.random.default_rng(seq_length)
    sizes = rng.integers(0, 12, size=40)
    sizes[0] = 5  # Megatron's loop starts at (0, 0), so the first document must not be empty
    doc_idx = np.concatenate([rng.permutation(40) for _ in range(3)])
    doc_idx[0] = 0
    n = (int(sizes[doc_idx].sum()) - 1) // seq_length
    ours = build_sample_index(sizes, doc_idx, seq_length, n)
    np.testing.assert_array_equal(ours, megatron_sample_index(sizes, doc_idx, seq_length, n))


def stream(ds: GPTDataset) -> np.ndarray:
    return np.concatenate([ds.indexed[int(d)] for d in ds.document_index]).astype(np.int64)


def test_packing_across_documents(tmp_path):
    indexed = write(tmp_path / "ds", DOCS)
    ds = GPTDataset(indexed, np.arange(3), num_samples=2, seq_length=4, seed=1, cache_dir=None,
                    name="train")
    assert len(ds) == 2  # (10 tokens - 1) // 4
    order = [int(d) for d in ds.document_index]
    assert sorted(order) == [0, 1, 2]
    tokens = [t for d in order for t in DOCS[d]]
    samples = {int(ds.shuffle_index[i]): ds[i].tolist() for i in range(len(ds))}
    assert samples == {0: tokens[0:5], 1: tokens[4:9]}  # one shared token between neighbours
    assert all(ds[i].dtype == np.int64 for i in range(2))
    # With the identity order the content is fully hand-checkable.
    unshuffled = GPTDataset.__new__(GPTDataset)
    unshuffled.__dict__.update(ds.__dict__, document_index=np.array([0, 1, 2]),
                               sample_index=build_sample_index(np.array([3, 5, 2]), np.arange(3), 4, 2),
                               shuffle_index=np.arange(2))
    assert unshuffled[0].tolist() == [1, 2, 3, 4, 5] and unshuffled[1].tolist() == [5, 6, 7, 8, 9]


def test_multiple_epochs(tmp_path):
    docs = [list(range(100 * d, 100 * d + n)) for d, n in enumerate([7, 3, 11, 1, 5, 9])]
    indexed = write(tmp_path / "ds", docs)
    ids = np.arange(1, 6)  # a split: documents 1..5 (29 tokens)
    ds = GPTDataset(indexed, ids, num_samples=40, seq_length=5, seed=3, cache_dir=None, name="train")
    epochs = len(ds.document_index) // 5
    assert epochs == 7  # fewest epochs with 40 * 5 + 1 tokens: 7 * 29 = 203
    assert len(ds) == (7 * 29 - 1) // 5 >= 40
    for e in range(epochs):  # each epoch is a permutation of the split's documents
        assert sorted(ds.document_index[5 * e:5 * e + 5].tolist()) == ids.tolist()
    assert ds.document_index[:5].tolist() != ds.document_index[5:10].tolist()
    flat = stream(ds)
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        np.testing.assert_array_equal(ds[i], flat[5 * j:5 * j + 6])
    assert sorted(ds.shuffle_index.tolist()) == list(range(len(ds)))


def test_shuffle_determinism(tmp_path):
    indexed = write(tmp_path / "ds", [list(range(i, i + 9)) for i in range(50)])

    def build(seed, sub):
        return GPTDataset(indexed, np.arange(50), 60, 8, seed, str(tmp_path / sub), "train")

    a, b, c = build(7, "a"), build(7, "b"), build(8, "c")
    np.testing.assert_array_equal(a.document_index, b.document_index)
    np.testing.assert_array_equal(a.shuffle_index, b.shuffle_index)
    assert [a[i].tolist() for i in range(len(a))] == [b[i].tolist() for i in range(len(b))]
    assert a.document_index.tolist() != c.document_index.tolist()
    assert a.shuffle_index.tolist() != c.shuffle_index.tolist()


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    indexed = write(tmp_path / "ds", [list(range(i, i + 9)) for i in range(20)])
    first = GPTDataset(indexed, np.arange(20), 10, 8, 1, None, "train")
    cache = tmp_path / "cache"  # default: next to the data
    files = sorted(p.name for p in cache.iterdir() if p.suffix == ".npy")
    assert len(files) == 3 and all(first.cache.key in f for f in files)
    mtimes = {f: os.stat(cache / f).st_mtime_ns for f in files}

    def no_build(*a, **k):
        raise AssertionError("indices rebuilt although cached")

    monkeypatch.setattr(GPTDataset, "_build_indices", no_build)
    barrier_calls = []
    again = GPTDataset(indexed, np.arange(20), 10, 8, 1, None, "train", is_rank0=False,
                       barrier=lambda: barrier_calls.append(1))
    assert barrier_calls == [1] and again.cache.key == first.cache.key
    np.testing.assert_array_equal(again.shuffle_index, first.shuffle_index)
    assert {f: os.stat(cache / f).st_mtime_ns for f in files} == mtimes
    monkeypatch.undo()
    keys = {first.cache.key}
    for change in ({"num_samples": 11}, {"seq_length": 7}, {"seed": 2}, {"document_ids": np.arange(19)}):
        kw = {"document_ids": np.arange(20), "num_samples": 10, "seq_length": 8, "seed": 1} | change
        ds = GPTDataset(indexed, cache_dir=None, name="train", **kw)
        keys.add(ds.cache.key)
    assert len(keys) == 5
    assert len([p for p in cache.iterdir() if p.suffix == ".npy"]) == 15


def test_seq_length_longer_than_split(tmp_path):
    indexed = write(tmp_path / "tiny", [[1, 2, 3], [4, 5]])
    with pytest.raises(DataError, match=r"tiny: the valid split has 5 tokens in 2 documents, fewer than "
                                        r"seq_length \+ 1 = 9"):
        GPTDataset(indexed, np.arange(2), 1, 8, 0, None, "valid")


def test_token_id_beyond_vocab(tmp_path):
    indexed = write(tmp_path / "big", [[1, 2, 3, 4], [5, 600, 7]])
    GPTDataset(indexed, np.arange(2), 1, 4, 0, None, "train", vocab_size=601)
    with pytest.raises(DataError, match=r"big\.bin: token id 600 >= vocab size 512 of the tokenizer"):
        GPTDataset(indexed, np.arange(2), 1, 4, 0, None, "train", vocab_size=512)


def test_blending_rule_by_hand():
    # i=0: errors .7/.3 -> 0; i=1: -.3/.3 -> 1; i=2: .4/-.4 -> 0; i=3: .1/-.1 -> 0; i=4: -.2/.2 -> 1 ...
    which, within = build_blending_indices([0.7, 0.3], 10)
    assert which.tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert within.tolist() == [0, 0, 1, 2, 1, 3, 4, 2, 5, 6]
    which, _ = build_blending_indices([7, 3], 10)  # weights are normalised
    assert which.tolist() == [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert build_blending_indices([1, 1], 4)[0].tolist() == [0, 1, 0, 1]  # ties: lowest index
    which, _ = build_blending_indices([0.5, 0.3, 0.2], 1000)
    assert np.bincount(which).tolist() == [500, 300, 200]


def test_blended_dataset_returns_inner_samples():
    a, b = [np.array([10 + i]) for i in range(7)], [np.array([20 + i]) for i in range(3)]
    blend = BlendedDataset([a, b], [0.7, 0.3], 10)
    assert [int(blend[i][0]) for i in range(10)] == [10, 20, 11, 12, 21, 13, 14, 22, 15, 16]
    with pytest.raises(DataError, match="needs 3 samples from it but it has 2"):
        BlendedDataset([a, b[:2]], [0.7, 0.3], 10)


def test_blend_indices_cached(tmp_path, monkeypatch):
    a, b = [np.array([i]) for i in range(7)], [np.array([i]) for i in range(3)]
    first = BlendedDataset([a, b], [0.7, 0.3], 10, cache_dir=str(tmp_path), cache_key=["a", "b"])
    assert len(list(tmp_path.glob("blend-*.npy"))) == 2
    monkeypatch.setattr("megamoe.data.blended_dataset.build_blending_indices",
                        lambda *a: pytest.fail("blend indices rebuilt although cached"))
    again = BlendedDataset([a, b], [0.7, 0.3], 10, cache_dir=str(tmp_path), cache_key=["a", "b"])
    np.testing.assert_array_equal(again.dataset_index, first.dataset_index)
    with pytest.raises(pytest.fail.Exception):  # another blend (other components): a new key
        BlendedDataset([a, b], [0.7, 0.3], 10, cache_dir=str(tmp_path), cache_key=["a", "c"])


def test_split_boundaries_megatron_rule():
    assert split_boundaries("969,30,1", 1000) == [0, 969, 999, 1000]
    assert split_boundaries("98,2,0", 100) == [0, 98, 100, 100]
    assert split_boundaries("98/2/0", 10) == [0, 10, 10, 10]  # round(9.8) = 10, round(0.2) = 0
    assert split_boundaries("1,1,1", 10) == [0, 4, 7, 10]  # Megatron shifts all by the rounding error
    assert split_boundaries("100", 7) == [0, 7, 7, 7]
    with pytest.raises(DataError, match="--split a,b"):
        split_boundaries("a,b", 10)


def test_parse_data_path(tmp_path):
    for name in ("a", "b"):
        write(tmp_path / name, [[1, 2]])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert parse_data_path([a]) == [(1.0, a)]
    assert parse_data_path(["0.3", a, "0.7", b]) == [(0.3, a), (0.7, b)]
    assert parse_data_path([a, b]) == [(1.0, a), (1.0, b)]
    with pytest.raises(DataError, match="blend weight 'x0.7' .* is not a non-negative number"):
        parse_data_path(["0.3", a, "x0.7", b])
    with pytest.raises(DataError, match="odd number of entries"):
        parse_data_path(["0.3", a, "0.7"])
    with pytest.raises(DataError, match=r"missing\.idx: not found"):
        parse_data_path([str(tmp_path / "missing")])


def test_build_train_valid_test(tmp_path):
    docs = [list(range(d, d + 20)) for d in range(100)]
    a = write(tmp_path / "a", docs).prefix
    train, valid, test = build_train_valid_test_datasets([a], "90,10,0", 16, 5, (30, 7, 4),
                                                         vocab_size=1000)
    assert test is None and isinstance(train, GPTDataset) and isinstance(valid, GPTDataset)
    assert train.document_ids.tolist() == list(range(90))
    assert valid.document_ids.tolist() == list(range(90, 100))
    assert len(train) >= 30 and len(valid) >= 7 and train[0].shape == (17,)
    assert build_train_valid_test_datasets([a], "90,10,0", 16, 5, (30, 0, 0))[1] is None

    b = write(tmp_path / "b", [[1000 + t for t in d] for d in docs]).prefix
    train, valid, _ = build_train_valid_test_datasets(["0.75", a, "0.25", b], "90,10,0", 16, 5,
                                                      (200, 7, 0))
    assert isinstance(train, BlendedDataset) and len(train) == 200
    # Megatron's margin: each component is built for ceil(200 * w * 1.005) samples.
    assert [c.cache.description.count('"num_samples": 151') for c in train.datasets] == [1, 0]
    assert '"num_samples": 51' in train.datasets[1].cache.description
    from_b = sum(int(train[i][0] >= 1000) for i in range(200))
    assert from_b == 50
    with pytest.raises(DataError, match=r"token id 1118 >= vocab size 1000"):
        build_train_valid_test_datasets(["0.75", a, "0.25", b], "90,10,0", 16, 5, (20, 0, 0),
                                        vocab_size=1000)
