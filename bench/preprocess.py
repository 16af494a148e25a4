"""Preprocessing throughput against SentencePiece's own encode rate (the ceiling), side by side.

    python bench/preprocess.py [--max-bytes 2000000] [--vocab-size 2048] [--workers 1 2] [--reps 3]

Builds a stdlib corpus and a BPE tokenizer in a temporary directory, then alternates, for --reps
rounds: the ceiling (one ``sp.encode(all documents)`` call, one thread) and tools/preprocess_data.py's
pipeline (read JSONL, parse, tokenise in --workers processes, write .bin/.idx) for each worker count.
Reports medians and the min-max spread; "per worker / ceiling" is the pipeline's efficiency per core.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # forked pool workers find its functions by module name
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-bytes", type=int, default=2_000_000)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    make_corpus, train_tokenizer = load_tool("make_corpus"), load_tool("train_tokenizer")
    preprocess_data = load_tool("preprocess_data")
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as d:
        corpus, prefix = os.path.join(d, "corpus.jsonl"), os.path.join(d, "tok")
        docs_n, nbytes = make_corpus.write_corpus(corpus, args.max_bytes)
        train_tokenizer.train(corpus, ["text"], args.vocab_size, prefix)
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        tokens = sum(len(ids) for ids in sp.encode(texts, num_threads=1))
        times: dict[str, list[float]] = {"ceiling": []} | {f"w{w}": [] for w in args.workers}
        for _ in range(args.reps):
            t0 = time.perf_counter()
            sp.encode(texts, num_threads=1)
            times["ceiling"].append(time.perf_counter() - t0)
            for w in args.workers:
                ns = argparse.Namespace(
                    input=corpus, json_keys=["text"], output_prefix=os.path.join(d, f"out{w}"),
                    tokenizer_type="SentencePieceTokenizer", tokenizer_model=prefix + ".model",
                    workers=w, partitions=1, append_eod=False, strict=False, log_interval=10**9,
                    overwrite=True,  # every repetition writes the same prefix
                    quiet=True)
                times[f"w{w}"].append(preprocess_data.preprocess(ns).seconds)
    ceiling = tokens / statistics.median(times["ceiling"])
    print(f"corpus: {docs_n} stdlib files, {nbytes / 1e6:.2f} MB, {tokens} tokens (BPE vocab "
          f"{args.vocab_size}); {os.cpu_count()} CPUs; median of {args.reps}, spread min-max")
    print(f"{'':28s} {'tokens/s':>12s} {'spread':>20s} {'per worker':>12s} {'per worker / ceiling':>22s}")
    for key, ts in times.items():
        w = 1 if key == "ceiling" else int(key[1:])
        rate = tokens / statistics.median(ts)
        label = "sp.encode(list), 1 thread" if key == "ceiling" else f"preprocess_data --workers {w}"
        spread = f"{tokens / max(ts) / 1e6:.2f}-{tokens / min(ts) / 1e6:.2f} M"
        print(f"{label:28s} {rate / 1e6:10.2f} M {spread:>20s} {rate / w / 1e6:10.2f} M "
              f"{rate / w / ceiling:21.2f}x")


if __name__ == "__main__":
    main()
