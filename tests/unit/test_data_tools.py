"""The data tools end to end on a small stdlib corpus, the tokenizer, and their one-line errors."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
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


def load_tool(name: str):
    """A tool as a module, to call its main() in this process (where a failure can be patched in)."""
    mod_name = "tools_" + name.removesuffix(".py")
    spec = importlib.util.spec_from_file_location(mod_name, os.path.join(ROOT, "tools", name))
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def in_process_error(capsys, name: str, *args) -> str:
    """main() of tool ``name`` returns 1 with a single 'error: ...' line on stderr."""
    capsys.readouterr()
    assert load_tool(name).main([str(a) for a in args]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def snapshot(d) -> dict[str, bytes]:
    """Every file in directory d (hidden ones too) and its bytes."""
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d)) if (d / f).is_file()}


def disk_full(after: int = 0):
    """A stand-in that raises ENOSPC (a full disk) on its call number after + 1."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return fail


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


def test_make_corpus_refuses_overwrite_and_survives_failure(corpus, tmp_path, capsys, monkeypatch):
    """An existing corpus is replaced only with --overwrite, and only by a complete one: a full disk
    mid-write or at the sync, or a budget no document fits, keeps it byte for byte, no temporary left."""
    out = tmp_path / "c.jsonl"
    tool("make_corpus.py", "--source", "python-stdlib", "--output", out, "--max-bytes", 20000)
    before = snapshot(tmp_path)
    args = ["--source", "python-stdlib", "--output", out, "--max-bytes", 40000]
    err = one_line_error(tool("make_corpus.py", *args, ok=False))
    assert f"{out}: already exists; pass --overwrite to replace it" in err
    assert snapshot(tmp_path) == before
    dumps, full = json.dumps, disk_full(after=3)
    # the disk fills after 3 documents, or when the complete file is flushed before the rename
    for name, fail, stand_in in ((json, "dumps", lambda *a, **k: full() or dumps(*a, **k)),
                                 (os, "fsync", disk_full())):
        with monkeypatch.context() as m:
            m.setattr(name, fail, stand_in)
            err = in_process_error(capsys, "make_corpus.py", *args, "--overwrite")
        assert f"{out}: No space left on device; nothing was replaced" in err
        assert snapshot(tmp_path) == before
    err = in_process_error(capsys, "make_corpus.py", "--source", "python-stdlib", "--output", out,
                           "--max-bytes", 1, "--overwrite")
    assert "no document fits in --max-bytes 1" in err and snapshot(tmp_path) == before
    err = one_line_error(tool("make_corpus.py", *args[:3], out / "under_a_file.jsonl", ok=False))
    assert f"{out}: File exists" in err and snapshot(tmp_path) == before
    tool("make_corpus.py", *args, "--overwrite")
    tool("make_corpus.py", *args[:3], tmp_path / "fresh.jsonl", *args[4:])
    assert out.read_bytes() == (tmp_path / "fresh.jsonl").read_bytes() != before["c.jsonl"]
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "fresh.jsonl"]


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
    with pytest.raises(DataError, match="--tokenizer-type BertTokenizer: unsupported"):
        build_tokenizer("BertTokenizer", str(corpus / "tok.model"))
    with pytest.raises(DataError, match=r"tok\.model: not a directory"):
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


def preprocess_into(corpus, prefix, inp, *extra, ok: bool = True):
    return tool("preprocess_data.py", "--input", inp, "--json-keys", "text", "--output-prefix", prefix,
                "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus / "tok.model",
                "--append-eod", *extra, ok=ok)


def test_preprocess_rerun_refuses_or_replaces_never_loses_data(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("x = 1\n", "print('hi')\n")))
    preprocess_into(corpus, out / "ds", corpus / "corpus.jsonl")
    before = snapshot(out)
    assert set(before) == {"ds_text_document.bin", "ds_text_document.idx"}
    # A rerun without --overwrite refuses, before reading anything.
    err = one_line_error(preprocess_into(corpus, out / "ds", small, ok=False))
    assert f"{out / 'ds_text_document.bin'}: already exists; pass --overwrite to replace it" in err
    assert snapshot(out) == before
    # A failing rerun (empty input) with --overwrite keeps the previous dataset byte for byte.
    (tmp_path / "empty.jsonl").write_text("\n")
    for extra in ([], ["--workers", "2", "--partitions", "2"]):
        err = one_line_error(preprocess_into(corpus, out / "ds", tmp_path / "empty.jsonl", "--overwrite",
                                             *extra, ok=False))
        assert "empty.jsonl: empty corpus" in err
        assert snapshot(out) == before  # and no temporary or partial files left
    # A successful rerun with --overwrite replaces it, with what a fresh run writes.
    preprocess_into(corpus, out / "ds", small, "--overwrite")
    preprocess_into(corpus, tmp_path / "fresh", small)
    assert snapshot(out) == {f"ds_text_document{s}": (tmp_path / f"fresh_text_document{s}").read_bytes()
                             for s in (".bin", ".idx")}


@pytest.mark.parametrize("where", ["write", "sync", "partitions"])
def test_preprocess_failure_mid_write_keeps_previous(corpus, tmp_path, capsys, monkeypatch, where):
    from megamoe.data.indexed_dataset import IndexedDatasetBuilder

    preprocess_into(corpus, tmp_path / "ds", corpus / "corpus.jsonl")
    before = snapshot(tmp_path)
    extra = []
    if where == "write":  # the disk fills after 5 documents
        monkeypatch.setattr(IndexedDatasetBuilder, "add_item", disk_full(after=5))
    elif where == "sync":  # ... or when the complete files are flushed before the rename
        monkeypatch.setattr(os, "fsync", disk_full())
    else:  # ... or while merging the partitions' files
        monkeypatch.setattr(IndexedDatasetBuilder, "add_index", disk_full(after=1))
        extra = ["--partitions", "3"]
    err = in_process_error(capsys, "preprocess_data.py", "--input", corpus / "corpus.jsonl",
                           "--output-prefix", tmp_path / "ds", "--tokenizer-type", "SentencePieceTokenizer",
                           "--tokenizer-model", corpus / "tok.model", "--append-eod", "--overwrite",
                           "--quiet", *extra)
    assert f"{tmp_path / 'ds_text_document.bin'}: No space left on device; nothing was replaced" in err
    assert snapshot(tmp_path) == before


def test_train_tokenizer_refuses_overwrite_and_survives_full_disk(corpus, tmp_path, capsys, monkeypatch):
    for ext in (".model", ".vocab"):
        shutil.copy(corpus / f"tok{ext}", tmp_path / f"tok{ext}")
    before = snapshot(tmp_path)
    args = ["--input", corpus / "corpus.jsonl", "--vocab-size", 400, "--model-prefix", tmp_path / "tok"]
    err = one_line_error(tool("train_tokenizer.py", *args, ok=False))
    assert f"{tmp_path / 'tok.model'}: already exists; pass --overwrite to replace it" in err
    assert snapshot(tmp_path) == before
    # The disk fills halfway through the .vocab, or when the files are flushed before the rename.
    for name, fail in ((json, "dumps"), (os, "fsync")):
        with monkeypatch.context() as m:
            m.setattr(name, fail, disk_full(after=200 if fail == "dumps" else 0))
            err = in_process_error(capsys, "train_tokenizer.py", *args, "--overwrite")
        assert "No space left on device; nothing was replaced" in err
        assert snapshot(tmp_path) == before  # previous model intact, no temporary files
    tool("train_tokenizer.py", *args, "--overwrite")
    assert build_tokenizer("SentencePieceTokenizer", str(tmp_path / "tok.model")).vocab_size == 400
    assert sorted(os.listdir(tmp_path)) == ["tok.model", "tok.vocab"]


def test_outputs_under_a_file_or_in_an_unwritable_place_are_one_line(corpus, tmp_path):
    """Issue 17: these were tracebacks. /proc takes no new directories, even from root."""
    (tmp_path / "file").write_text("x")
    for prefix, reason in ((tmp_path / "file" / "out", f"{tmp_path / 'file'}: File exists"),
                           ("/proc/megamoe/out", "/proc/megamoe: No such file or directory")):
        err = one_line_error(preprocess_into(corpus, prefix, corpus / "corpus.jsonl", ok=False))
        assert reason in err and "nothing was replaced" in err
        err = one_line_error(tool("train_tokenizer.py", "--input", corpus / "corpus.jsonl", "--vocab-size",
                                  400, "--model-prefix", prefix, ok=False))
        assert reason in err and "nothing was replaced" in err
    assert (tmp_path / "file").read_text() == "x"


def test_merge_refuses_overwrite_and_survives_failure(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    preprocess_into(corpus, tmp_path / "a", corpus / "corpus.jsonl")
    a = tmp_path / "a_text_document"
    tool("merge_datasets.py", "--input", a, "--output-prefix", out / "m")
    before = snapshot(out)
    err = one_line_error(tool("merge_datasets.py", "--input", a, a, "--output-prefix", out / "m", ok=False))
    assert f"{out / 'm.bin'}: already exists; pass --overwrite to replace it" in err
    assert snapshot(out) == before

    def copy_half_then_fail(src, dst, length=0):
        dst.write(src.read(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "copyfileobj", copy_half_then_fail)
    err = in_process_error(capsys, "merge_datasets.py", "--input", a, a, "--output-prefix", out / "m",
                           "--overwrite")
    assert f"{out / 'm.bin'}: No space left on device; nothing was replaced" in err
    assert snapshot(out) == before
    monkeypatch.undo()
    tool("merge_datasets.py", "--input", a, a, "--output-prefix", out / "m", "--overwrite")
    assert len(IndexedDataset(str(out / "m"))) == 2 * len(IndexedDataset(str(a)))
    assert sorted(os.listdir(out)) == ["m.bin", "m.idx"]


def test_train_tokenizer_skips_lines_that_are_not_utf8(corpus, tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b"\xff\xfe\x00binary\n" + (corpus / "corpus.jsonl").read_bytes())
    proc = tool("train_tokenizer.py", "--input", mixed, "--json-keys", "text", "--vocab-size", 512,
                "--model-prefix", tmp_path / "tok")
    assert "skipped 1 malformed line(s), first at line 1" in proc.stderr and (tmp_path / "tok.model").exists()
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    proc = tool("train_tokenizer.py", "--input", binary, "--json-keys", "text", "--vocab-size", 512,
                "--model-prefix", tmp_path / "bin", ok=False)
    lines = proc.stderr.strip().splitlines()  # the skip count, then the error: no traceback
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 2
    assert "skipped 5 malformed line(s)" in lines[0] and lines[1].startswith("error: ")
    assert "no text under key(s) text" in lines[1]
