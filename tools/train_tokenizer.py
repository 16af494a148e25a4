"""Train a SentencePiece tokenizer for code and English on a JSONL corpus.

    python tools/train_tokenizer.py --input corpus.jsonl --json-keys text --vocab-size 2048 \\
        --model-prefix data/tokenizer [--model-type bpe|unigram] [--input-sentence-size N]

Writes P.model and P.vocab: under temporary names, renamed into place once complete and synced, so
a failed run leaves any previous ones as they were; an existing one is replaced only with --overwrite.

Settings chosen for source code: identity normalisation and no dummy prefix (decode(encode(text)) ==
text exactly), whitespace kept as is with whitespace-only pieces allowed (indentation becomes a few
tokens), newline and tab as user-defined pieces (always one token), digits split, byte fallback (no
<unk> on rare characters). Ids: 0 <unk>, 1 <s>, 2 </s> (= eod).

Documents are cut at line boundaries into chunks of about --chunk-chars characters, since SentencePiece
trains on "sentences"; --input-sentence-size samples that many chunks, which bounds training time.
Malformed JSON lines are skipped with a warning.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.data.errors import DataError  # noqa: E402
from megamoe.data.indexed_dataset import WriteAside, existing_outputs  # noqa: E402


def read_texts(path: str, keys: list[str]) -> Iterator[str]:
    """Texts under ``keys`` of each JSONL line; malformed lines (bad JSON, missing keys, bytes that
    are not UTF-8) are skipped, counted and reported once, as preprocess_data.py does."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: input corpus not found; build it with tools/make_corpus.py")
    bad, first_bad = 0, None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                doc = json.loads(raw.decode("utf-8"))
                texts = [doc[k] for k in keys]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                bad, first_bad = bad + 1, first_bad or lineno
                continue
            yield from (t for t in texts if isinstance(t, str) and t)
    if bad:
        print(f"warning: {path}: skipped {bad} malformed line(s), first at line {first_bad}",
              file=sys.stderr)


def chunk_lines(text: str, chunk_chars: int) -> Iterator[str]:
    """Cut a document at line ends into pieces of about chunk_chars (newlines kept in the pieces)."""
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        line = line[:chunk_chars]  # a minified megaline would be dropped by SentencePiece anyway
        if buf and size + len(line) > chunk_chars:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


def train(input_path: str, keys: list[str], vocab_size: int, model_prefix: str, model_type: str = "bpe",
          input_sentence_size: int = 200_000, chunk_chars: int = 2000, threads: int | None = None,
          overwrite: bool = False) -> str:
    """Train and write ``model_prefix``.model/.vocab; returns the .model path."""
    import sentencepiece as spm

    outputs = [model_prefix + ".model", model_prefix + ".vocab"]
    existing_outputs(outputs, overwrite)  # before the (long) training

    chunks = [c for t in read_texts(input_path, keys) for c in chunk_lines(t, chunk_chars)]
    if not chunks:
        raise DataError(f"{input_path}: no text under key(s) {', '.join(keys)}; check --json-keys")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, add_dummy_prefix=False,
            split_digits=True, user_defined_symbols=["\n", "\t"], character_coverage=0.9999,
            max_sentence_length=4 * chunk_chars + 16,  # bytes: a chunk of 4-byte characters fits
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=threads or os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:  # e.g. vocab_size larger than the corpus supports
        raise DataError(f"{input_path}: SentencePiece training failed: {str(e).splitlines()[0]}; "
                        "lower --vocab-size or use a larger corpus") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    with WriteAside() as aside:
        os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
        with open(aside.path(outputs[0]), "wb") as f:
            f.write(model.getvalue())
        with open(aside.path(outputs[1]), "w", encoding="utf-8") as f:
            for i in range(sp.GetPieceSize()):
                f.write(f"{json.dumps(sp.IdToPiece(i), ensure_ascii=False)}\t{sp.GetScore(i)}\n")
        aside.commit()
    return outputs[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL corpus")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose texts are used")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--input-sentence-size", type=int, default=200_000,
                   help="chunks sampled for training (bounds time and memory); default 200000")
    p.add_argument("--chunk-chars", type=int, default=2000, help="training chunk size in characters")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing PREFIX.model/.vocab (only once the new one is complete)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        path = train(args.input, args.json_keys, args.vocab_size, args.model_prefix, args.model_type,
                     args.input_sentence_size, args.chunk_chars, overwrite=args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.model_type}, vocab {args.vocab_size}) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
