"""The data tools end to end on a small stdlib corpus, the tokenizer, and their one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megamoe.data.errors import DataError
from megamoe.data.indexed_dataset import IndexedDataset
from megamoe.data.tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tool(name: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """A failing tool exits 1 with a single 'error: ...' line on stderr, no traceback."""
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, \
        proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    tool("make_corpus.py", "--source", "python-stdlib", "--output", d / "corpus.jsonl",
         "--max-bytes", 300000)
    tool("train_tokenizer.py", "--input", d / "corpus.jsonl", "--json-keys", "text", "--vocab-size", 512,
         "--model-prefix", d / "tok")
    return d


def preprocess(d, out: str, *extra: str, inp: str = "corpus.jsonl", ok: bool = True):
    return tool("preprocess_data.py", "--input", d / inp, "--json-keys", "text", "--output-prefix",
                d / out, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                d / "tok.model", "--append-eod", *extra, ok=ok)


def test_make_corpus_deterministic_and_bounded(corpus, tmp_path):
    tool("make_corpus.py", "--source", "python-stdlib", "--output", tmp_path / "again.jsonl",
         "--max-bytes", 300000)
    raw = (corpus / "corpus.jsonl").read_bytes()
    assert raw == (tmp_path / "again.jsonl").read_bytes()
    texts = [json.loads(line)["text"] for line in raw.decode().splitlines()]
    assert len(texts) > 5 and all(t.strip() for t in texts)
    assert 250_000 < sum(len(t.encode()) for t in texts) <= 300_000


def test_tokenizer(corpus):
    tok = build_tokenizer("SentencePieceTokenizer", str(corpus / "tok.model"))
    assert tok.vocab_size == 512 and tok.eod == 2
    assert build_tokenizer("GPTSentencePieceTokenizer", str(corpus / "tok.model")).vocab_size == 512
    code = "def f(x):\n\treturn  x  # é 😀\n\n    pass\n"
    ids = tok.tokenize(code)
    assert tok.detokenize(ids) == code and tok.eod not in ids  # exact, whitespace and all
    assert tok.tokenize("\n") == [tok.tokenize("a\nb")[1]]  # newline is one piece
    for line in (corpus / "corpus.jsonl").read_text().splitlines()[:5]:
        text = json.loads(line)["text"]
        assert tok.detokenize(tok.tokenize(text)) == text
    with pytest.raises(DataError, match="--tokenizer-type HuggingFaceTokenizer: unsupported"):
        build_tokenizer("HuggingFaceTokenizer", str(corpus / "tok.model"))
    with pytest.raises(DataError, match=r"nope\.model: tokenizer model not found"):
        build_tokenizer("SentencePieceTokenizer", str(corpus / "nope.model"))
    with pytest.raises(DataError, match=r"corpus\.jsonl: not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", str(corpus / "corpus.jsonl"))


def test_tokenizer_without_eos(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g h"] * 50), vocab_size=12,
                                   model_prefix=str(tmp_path / "noeos"), eos_id=-1, minloglevel=2)
    with pytest.raises(DataError, match="has no EOS piece"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "noeos.model"))


def test_preprocess_identical_across_workers_and_partitions(corpus):
    preprocess(corpus, "w1")
    proc = preprocess(corpus, "w2", "--workers", "2")
    assert "docs/s" in proc.stderr and "tokens/s" in proc.stderr
    preprocess(corpus, "p2", "--workers", "2", "--partitions", "2")
    preprocess(corpus, "p3", "--partitions", "3")
    ref = [(corpus / f"w1_text_document{s}").read_bytes() for s in (".bin", ".idx")]
    for out in ("w2", "p2", "p3"):
        assert [(corpus / f"{out}_text_document{s}").read_bytes() for s in (".bin", ".idx")] == ref
    assert not list(corpus.glob("*part*"))  # partial files merged and removed

    tok = build_tokenizer("SentencePieceTokenizer", str(corpus / "tok.model"))
    ds = IndexedDataset(str(corpus / "w1_text_document"))
    texts = [json.loads(line)["text"] for line in (corpus / "corpus.jsonl").read_text().splitlines()]
    assert ds.dtype == np.uint16 and len(ds) == len(texts)
    for i in (0, len(ds) // 2, len(ds) - 1):
        assert ds[i].tolist() == tok.tokenize(texts[i]) + [tok.eod]


def test_merge_datasets(corpus):
    if not (corpus / "w1_text_document.idx").exists():
        preprocess(corpus, "w1")
    small = corpus / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("x = 1\n", "print('hi')\n")))
    preprocess(corpus, "small", inp="small.jsonl")
    tool("merge_datasets.py", "--input", corpus / "w1_text_document", corpus / "small_text_document",
         "--output-prefix", corpus / "merged" / "all")
    a = IndexedDataset(str(corpus / "w1_text_document"))
    b = IndexedDataset(str(corpus / "small_text_document"))
    m = IndexedDataset(str(corpus / "merged" / "all"))
    assert len(m) == len(a) + len(b)
    assert [m[i].tolist() for i in range(len(m))] == [a[i].tolist() for i in range(len(a))] + \
        [b[i].tolist() for i in range(len(b))]
    assert m.document_indices.tolist() == list(range(len(m) + 1))
    # A directory of prefixes merges in sorted name order.
    tool("merge_datasets.py", "--input", corpus / "merged", "--output-prefix", corpus / "again")
    assert (corpus / "again.bin").read_bytes() == (corpus / "merged" / "all.bin").read_bytes()


def test_merge_dtype_mismatch(tmp_path):
    from megamoe.data.indexed_dataset import IndexedDatasetBuilder

    for name, dtype in (("u", np.uint16), ("i", np.int32)):
        b = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), dtype)
        b.add_item([1, 2])
        b.end_document()
        b.finalize(str(tmp_path / f"{name}.idx"))
    err = one_line_error(tool("merge_datasets.py", "--input", tmp_path / "u", tmp_path / "i",
                              "--output-prefix", tmp_path / "out", ok=False))
    assert "i.idx: dtype int32 differs from uint16" in err
    assert not (tmp_path / "out.bin").exists()


def test_malformed_lines_skipped_or_strict(corpus):
    lines = ['{"text": "a = 1\\n"}', "", '{"text": "b = 2\\n"', '["not", "an object"]',
             '{"other": "x"}', '{"text": "c = 3\\n"}']
    (corpus / "bad.jsonl").write_text("\n".join(lines) + "\n")
    proc = preprocess(corpus, "bad", inp="bad.jsonl")
    assert "skipped 3 malformed line(s), first at line 3 (invalid JSON" in proc.stderr
    tok = build_tokenizer("SentencePieceTokenizer", str(corpus / "tok.model"))
    ds = IndexedDataset(str(corpus / "bad_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.tokenize("a = 1\n") + [2],
                                                         tok.tokenize("c = 3\n") + [2]]
    for extra in ([], ["--workers", "2", "--partitions", "2"]):
        err = one_line_error(preprocess(corpus, "strict", "--strict", *extra, inp="bad.jsonl", ok=False))
        assert "bad.jsonl line 3: malformed: invalid JSON" in err
        assert not list(corpus.glob("strict*"))


def test_preprocess_errors(corpus, tmp_path):
    (corpus / "empty.jsonl").write_text("\n\n")
    err = one_line_error(preprocess(corpus, "empty", inp="empty.jsonl", ok=False))
    assert "empty.jsonl: empty corpus: no documents with key(s) text in 2 lines" in err
    assert not list(corpus.glob("empty_text_document*"))
    err = one_line_error(preprocess(corpus, "x", inp="missing.jsonl", ok=False))
    assert "missing.jsonl: input not found" in err
    proc = tool("preprocess_data.py", "--input", corpus / "corpus.jsonl", "--output-prefix",
                tmp_path / "x", "--tokenizer-type", "GPT2BPETokenizer", "--tokenizer-model",
                corpus / "tok.model", ok=False)
    assert "--tokenizer-type GPT2BPETokenizer: unsupported tokenizer type" in one_line_error(proc)
    proc = tool("train_tokenizer.py", "--input", corpus / "corpus.jsonl", "--vocab-size", 10**6,
                "--model-prefix", tmp_path / "t", ok=False)
    assert "SentencePiece training failed" in one_line_error(proc)
