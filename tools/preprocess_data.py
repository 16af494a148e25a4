"""Tokenise a JSONL corpus into Megatron's mmap indexed format (PREFIX_KEY_document.bin/.idx).

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text --output-prefix data/stdlib \\
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --workers 2 --append-eod

One JSON object per line; each line's text under each --json-keys key becomes one document (one
sequence), followed by the tokenizer's EOD token with --append-eod. Tokens are stored as uint16 when
the vocabulary is below 65500, else int32. Output is the same whatever --workers and --partitions:
workers tokenise batches of lines in parallel and results are written in input order; --partitions K
cuts the file into K byte ranges processed by K processes (--workers split among them) into partial
files that are merged, in order, at the end.

Malformed lines (invalid JSON or UTF-8, not an object, a key missing, a non-string value) are skipped,
and their count and the first such line number are reported on stderr; --strict makes the first one
an error instead. Blank lines are ignored. An input with no documents is an error.

Outputs are written under temporary names and renamed into place only once every output is complete
and synced: a failed run (bad input, full disk, interrupt) leaves any previous dataset as it was. An
existing dataset is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from megamoe.data.errors import DataError  # noqa: E402
from megamoe.data.indexed_dataset import (  # noqa: E402
    DType,
    IndexedDatasetBuilder,
    WriteAside,
    bin_path,
    existing_outputs,
    idx_path,
)
from megamoe.data.tokenizer import build_tokenizer  # noqa: E402

BATCH_BYTES = 64 << 10  # per task: amortises the inter-process hop, small enough to balance 2 workers
BATCH_LINES = 256


@dataclass
class Stats:
    docs: int = 0
    tokens: int = 0
    lines: int = 0
    bad: int = 0
    first_bad: tuple[int, str] | None = None  # (line number, reason)
    bytes: int = 0

    def add(self, other: Stats) -> None:
        """Accumulate a later partition's counts (its first bad line comes after ours)."""
        for name in ("docs", "tokens", "lines", "bad", "bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.first_bad = self.first_bad or other.first_bad


# ---- worker side: each pool process builds its Encoder once, in the pool initializer ----

_ENC: Encoder | None = None


class Encoder:
    def __init__(self, tokenizer_type: str, tokenizer_model: str, keys: list[str], append_eod: bool):
        self.tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
        self.keys, self.append_eod = keys, append_eod
        self.dtype = np.dtype(DType.optimal_dtype(self.tokenizer.vocab_size))

    def parse(self, raw: bytes) -> list[str] | str:
        """The line's texts, one per key, or the reason it is malformed."""
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"invalid JSON ({e.msg if hasattr(e, 'msg') else e.reason})"
        if not isinstance(doc, dict):
            return "not a JSON object"
        missing = [k for k in self.keys if not isinstance(doc.get(k), str)]
        return f"no string under key '{missing[0]}'" if missing else [doc[k] for k in self.keys]

    def encode(self, batch: list[tuple[int, bytes]]) -> list[tuple[int, object]]:
        """[(line number, arrays per key | reason | None for blank)] in batch order."""
        parsed = [(n, self.parse(raw) if raw.strip() else None) for n, raw in batch]
        ok = [p for _, p in parsed if isinstance(p, list)]
        per_key = [self.tokenizer.tokenize_batch([p[k] for p in ok]) for k in range(len(self.keys))]
        eod = [self.tokenizer.eod] if self.append_eod else []
        arrays = iter([[np.asarray(ids[j] + eod, self.dtype) for ids in per_key]
                       for j in range(len(ok))])
        return [(n, next(arrays) if isinstance(p, list) else p) for n, p in parsed]


def _init_worker(*args) -> None:
    global _ENC
    _ENC = Encoder(*args)


def _encode(batch: list[tuple[int, bytes]]) -> list[tuple[int, object]]:
    return _ENC.encode(batch)


# ---- reading -------------------------------------------------------------------------------------

def partition_ranges(path: str, k: int) -> list[tuple[int, int, int]]:
    """K (start byte, end byte, first line number) ranges cut at line ends."""
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        for i in range(1, k):
            f.seek(max(size * i // k, cuts[-1]))
            if f.tell() > 0:
                f.readline()  # finish the line the cut falls in
            cuts.append(min(f.tell(), size))
        cuts.append(size)
        first_line, line = [1], 1
        for a, b in zip(cuts[:-1], cuts[1:]):
            f.seek(a)
            left = b - a
            while left > 0:
                block = f.read(min(left, 16 << 20))
                line, left = line + block.count(b"\n"), left - len(block)
            first_line.append(line)
    return [(cuts[i], cuts[i + 1], first_line[i]) for i in range(k)]


def read_batches(path: str, start: int, end: int, first_line: int
                 ) -> Iterator[list[tuple[int, bytes]]]:
    """Raw lines of bytes [start, end) of the JSONL file, numbered from first_line, in batches."""
    batch, size, lineno = [], 0, first_line
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            pos += len(raw)
            batch.append((lineno, raw))
            size, lineno = size + len(raw), lineno + 1
            if size >= BATCH_BYTES or len(batch) >= BATCH_LINES:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _ordered_results(batches, encoder_args: tuple, workers: int):
    """(input bytes, encoded lines) per batch in input order; at most 4 batches per worker in flight
    (Pool.imap would read the whole input ahead into its task queue)."""
    if workers <= 1:
        encoder = Encoder(*encoder_args)
        yield from ((sum(len(r) for _, r in b), encoder.encode(b)) for b in batches)
        return
    with mp.get_context("fork").Pool(workers, _init_worker, encoder_args) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((sum(len(r) for _, r in batch), pool.apply_async(_encode, (batch,))))
            if len(pending) >= 4 * workers:
                nbytes, res = pending.popleft()
                yield nbytes, res.get()
        while pending:
            nbytes, res = pending.popleft()
            yield nbytes, res.get()


def output_prefix(prefix: str, key: str) -> str:
    return f"{prefix}_{key}_document"


class Progress:
    """A tqdm bar on a terminal; in a log (stderr not a TTY), a plain line every --log-interval docs."""

    def __init__(self, args: argparse.Namespace, total_bytes: int, position: int) -> None:
        self.t0, self.every, self.quiet = time.perf_counter(), args.log_interval, args.quiet
        self.name = f"part {position}" if args.partitions > 1 else "tokenising"
        self.bar = None
        if not args.quiet and sys.stderr.isatty():
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, position=position,
                            file=sys.stderr, desc=self.name, mininterval=0.5)

    def update(self, stats: Stats, nbytes: int, docs_before: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)
        if self.quiet or stats.docs // self.every == docs_before // self.every:
            return
        dt = time.perf_counter() - self.t0
        rates = f"{stats.docs / dt:.0f} docs/s, {stats.tokens / dt:.0f} tokens/s"
        if self.bar is not None:
            self.bar.set_postfix_str(rates, refresh=False)
        else:
            print(f"{self.name}: {stats.docs} documents, {stats.bytes / 1e6:.1f} MB ({rates}, "
                  f"{stats.bytes / dt / 1e6:.2f} MB/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def process_range(args: argparse.Namespace, start: int, end: int, first_line: int,
                  outputs: list[tuple[str, str]], workers: int, position: int = 0) -> Stats:
    """Tokenise input bytes [start, end) into one (.bin path, .idx path) of ``outputs`` per key."""
    encoder_args = (args.tokenizer_type, args.tokenizer_model, args.json_keys, args.append_eod)
    builders = [IndexedDatasetBuilder(b, args.dtype) for b, _ in outputs]
    stats, progress = Stats(), Progress(args, end - start, position)
    try:
        for nbytes, results in _ordered_results(read_batches(args.input, start, end, first_line),
                                                encoder_args, workers):
            docs_before = stats.docs
            for lineno, res in results:
                stats.lines += 1
                if isinstance(res, str):
                    if args.strict:
                        raise DataError(f"{args.input} line {lineno}: malformed: {res}; fix or drop "
                                        "the line, or run without --strict to skip such lines")
                    stats.bad += 1
                    stats.first_bad = stats.first_bad or (lineno, res)
                elif res is not None:
                    for builder, arr in zip(builders, res):
                        builder.add_item(arr)
                        builder.end_document()
                        stats.tokens += arr.size
                    stats.docs += 1
            stats.bytes += nbytes
            progress.update(stats, nbytes, docs_before)
    finally:
        progress.close()
    for (_, idx), builder in zip(outputs, builders):
        builder.finalize(idx)
    return stats


def _run_partition(args, rng, outputs, workers, position, queue) -> None:
    try:
        queue.put((position, process_range(args, *rng, outputs, workers, position), None))
    except DataError as e:
        queue.put((position, None, str(e)))
    except BaseException as e:  # report rather than hang the parent waiting on the queue
        queue.put((position, None, f"{args.input}: partition {position} failed: {e!r}"))


def run_partitions(args: argparse.Namespace, aside: WriteAside, outputs: list[tuple[str, str]]
                   ) -> Stats:
    """K processes, each tokenising one byte range into partial files (scratch files of ``aside``);
    then merge them in order into ``outputs``."""
    k = args.partitions
    ranges = partition_ranges(args.input, k)
    # parts[i][j]: partition i's prefix for key j, hidden beside the output and removed at the end
    parts = [[aside.scratch(f"{output_prefix(args.output_prefix, key)}_part{i}")
              for key in args.json_keys] for i in range(k)]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run_partition,
                         args=(args, ranges[i], [(bin_path(p), idx_path(p)) for p in parts[i]],
                               max(1, args.workers // k), i, queue))
             for i in range(k)]
    for p in procs:
        p.start()
    results: dict[int, tuple[Stats | None, str | None]] = {}
    while len(results) < k:
        try:
            i, st, err = queue.get(timeout=1.0)
            results[i] = (st, err)
        except queue_mod.Empty:  # a partition killed outright (e.g. out of memory) never reports
            for i, p in enumerate(procs):
                if i not in results and p.exitcode not in (None, 0):
                    results[i] = (None, f"{args.input}: partition {i} died (exit code {p.exitcode})")
    for p in procs:
        p.join()
    errors = [results[i][1] for i in range(k) if results[i][1]]
    if errors:
        raise DataError(errors[0])  # partitions are in input order: the earliest bad line
    for j, (bin_out, idx_out) in enumerate(outputs):
        builder = IndexedDatasetBuilder(bin_out, args.dtype)
        for part in parts:
            builder.add_index(part[j])
        builder.finalize(idx_out)
    total = Stats()
    for i in range(k):
        total.add(results[i][0])
    return total


def preprocess(args: argparse.Namespace) -> Stats:
    if not os.path.isfile(args.input):
        raise DataError(f"{args.input}: input not found; build a corpus with tools/make_corpus.py")
    finals = [(bin_path(output_prefix(args.output_prefix, k)), idx_path(output_prefix(args.output_prefix, k)))
              for k in args.json_keys]
    existing_outputs([path for pair in finals for path in pair], getattr(args, "overwrite", False))
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)  # fail before forking
    args.dtype = np.dtype(DType.optimal_dtype(tokenizer.vocab_size))
    start = time.perf_counter()
    # Everything is written aside and renamed into place only when complete: a failed run leaves no
    # half-written dataset and keeps any previous one as it was.
    with WriteAside() as aside:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        outputs = [(aside.path(b), aside.path(i)) for b, i in finals]
        if args.partitions > 1:
            stats = run_partitions(args, aside, outputs)
        else:
            stats = process_range(args, 0, os.path.getsize(args.input), 1, outputs, args.workers)
        if stats.docs == 0 or stats.tokens == 0:
            raise DataError(f"{args.input}: empty corpus: no documents with key(s) "
                            f"{', '.join(args.json_keys)} in {stats.lines} lines ({stats.bad} "
                            "malformed); check --input and --json-keys")
        aside.commit()
    stats.seconds = time.perf_counter() - start
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file, one JSON object per line")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenise (default text)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX_KEY_document.bin/.idx")
    p.add_argument("--tokenizer-type", required=True,
                   help="SentencePieceTokenizer (or its alias GPTSentencePieceTokenizer), or "
                   "HuggingFaceTokenizer")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model file, or a Hugging Face tokenizer's local directory")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    p.add_argument("--partitions", type=int, default=1,
                   help="split the input into K byte ranges processed in parallel, then merged")
    p.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first malformed line instead of skipping it")
    p.add_argument("--log-interval", type=int, default=1000,
                   help="report rates every N documents (a log line when stderr is not a terminal)")
    p.add_argument("--quiet", action="store_true", help="no progress reports, only the summary")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset (only once the new one is complete)")
    args = p.parse_args(argv)
    if args.workers < 1 or args.partitions < 1 or args.log_interval < 1:
        p.error("--workers, --partitions and --log-interval must be >= 1")
    try:
        stats = preprocess(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if stats.bad:
        line, reason = stats.first_bad
        print(f"warning: {args.input}: skipped {stats.bad} malformed line(s), first at line {line} "
              f"({reason}); use --strict to stop at them", file=sys.stderr)
    outs = ", ".join(output_prefix(args.output_prefix, k) for k in args.json_keys)
    print(f"{stats.docs} documents, {stats.tokens} tokens ({args.dtype.name}) in {stats.seconds:.1f} s: "
          f"{stats.docs / stats.seconds:.0f} docs/s, {stats.tokens / stats.seconds:.0f} tokens/s, "
          f"{stats.bytes / stats.seconds / 1e6:.2f} MB/s -> {outs}.bin/.idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
