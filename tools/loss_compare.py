#!/usr/bin/env python3
"""Compare two --metrics-file runs iteration by iteration.

    python tools/loss_compare.py A.jsonl B.jsonl [--rtol 1e-5] [--keys lm_loss grad_norm]

Prints a table of the iterations both runs logged and exits 1 if any compared value differs by more
than rtol (relative), or if the runs share no iteration; exit 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def load(path: str, keys: list[str]) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise SystemExit(f"error: cannot read metrics file {path}: {e.strerror}") from None
    lines = text.splitlines()
    if lines and not text.endswith("\n"):  # a run cut mid-record (never reopened): not a record yet
        print(f"note: {path}: ignoring its incomplete last line", file=sys.stderr)
        lines.pop()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if all(k in rec for k in keys):
                rows[int(rec["iteration"])] = {k: float(rec[k]) for k in keys}
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
            raise SystemExit(f"error: {path} line {lineno} is not a metrics record ({e})") from None
    return rows


def compare(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], keys: list[str],
            rtol: float) -> tuple[list[str], int]:
    lines, bad = [f"{'iter':>6} " + " ".join(f"{k + ' A':>14} {k + ' B':>14} {'rel':>9}" for k in keys)], 0
    for it in sorted(set(a) & set(b)):
        cells = []
        for k in keys:
            x, y = a[it][k], b[it][k]
            rel = abs(x - y) / max(abs(x), 1e-30)
            ok = math.isclose(x, y, rel_tol=rtol, abs_tol=0.0) or (x == y)
            bad += not ok
            cells.append(f"{x:14.8g} {y:14.8g} {rel:9.2e}{'' if ok else ' !'}")
        lines.append(f"{it:>6} " + " ".join(cells))
    return lines, bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--keys", nargs="+", default=["lm_loss"])
    args = p.parse_args(argv)
    try:
        a, b = load(args.a, args.keys), load(args.b, args.keys)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    lines, bad = compare(a, b, args.keys, args.rtol)
    print("\n".join(lines))
    common = len(lines) - 1
    if common == 0:
        print("no common iterations to compare", file=sys.stderr)
        return 1
    print(f"{common} iterations compared, {bad} values differ beyond rtol {args.rtol}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
