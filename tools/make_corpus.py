"""Build a JSONL text corpus ({"text": ...} per line) from sources available offline.

    python tools/make_corpus.py --source python-stdlib --output corpus.jsonl [--max-bytes N] [--overwrite]

``python-stdlib``: one document per .py file of the running interpreter's standard library (code with
English docstrings, ~13 MB), in sorted path order so the corpus is the same on every run; test
directories, site-packages and unreadable or empty files are skipped. ``--max-bytes N`` keeps, in that
order, each file that still fits in N bytes of UTF-8 text (a quick corpus for tests and the quickstart).
The output is written aside and renamed into place when complete; an existing one is replaced only
with ``--overwrite``, and a failed run keeps it as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.data.errors import DataError  # noqa: E402
from megamoe.data.indexed_dataset import WriteAside, existing_outputs  # noqa: E402

# Test suites are large, repetitive and full of deliberately odd code; packages are not the stdlib.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted paths of the standard library's .py files, test and third-party directories excluded."""
    root = root or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise DataError(f"{root}: standard library source directory not found; this Python ships "
                        "without .py sources, run make_corpus.py with another interpreter")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(paths, key=lambda p: os.path.relpath(p, root))


def stdlib_documents(root: str | None = None) -> Iterator[str]:
    for path in stdlib_files(root):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):  # unreadable or not UTF-8: not worth failing over
            continue
        if text.strip():
            yield text


def write_corpus(output: str, max_bytes: int | None = None, root: str | None = None,
                 overwrite: bool = False) -> tuple[int, int]:
    """Write the corpus; returns (documents, UTF-8 bytes of text). It is written aside (a hidden
    temporary beside ``output``) and renamed into place only when complete and synced, so a failed
    run (a full disk, no document) leaves any previous corpus as it was and no temporary behind; an
    existing ``output`` is replaced only with ``overwrite``."""
    existing_outputs([output], overwrite)  # before reading the library
    docs = nbytes = 0
    with WriteAside() as aside:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)  # before any temporary
        tmp = aside.path(output)
        with open(tmp, "w", encoding="utf-8") as out:
            for text in stdlib_documents(root):
                size = len(text.encode("utf-8"))
                if max_bytes is not None and nbytes + size > max_bytes:
                    continue  # skip a file too big for what is left, so smaller ones fill the budget
                out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
                docs, nbytes = docs + 1, nbytes + size
        if docs == 0:
            raise DataError(f"{output}: no document fits in --max-bytes {max_bytes}; raise --max-bytes")
        aside.commit()
    return docs, nbytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=["python-stdlib"])
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--max-bytes", type=int, default=None, help="stop before the text passes N bytes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (only once the new one is complete)")
    args = p.parse_args(argv)
    try:
        docs, nbytes = write_corpus(args.output, args.max_bytes, overwrite=args.overwrite)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {docs} documents, {nbytes / 1e6:.2f} MB of text to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
