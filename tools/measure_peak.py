#!/usr/bin/env python3
"""Re-measure the per-rank peak that MFU divides by (docs/ARCHITECTURE.md, "MFU").

    python tools/measure_peak.py [--threads 1] [--n 2048] [--reps 5] [--dtype float32] [--replace]
    python tools/measure_peak.py --show        # what is stored, measuring nothing

CPU: times ``--reps`` n^3 GEMMs after a warm-up on ``--threads`` threads (training runs one per
rank), takes the largest rate, and stores it where training start-up reads it
($MEGAMOE_PEAK_CACHE, else ~/.cache/megamoe/peak_tflops.json) -- the larger of it and the stored
figure, since a busy machine only slows a GEMM down; ``--replace`` keeps the new figure instead.
Run it on a quiet machine, or a few times. A GPU needs no measurement: its datasheet peak is
printed (``--peak-tflops`` sets any other).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from megamoe.training import metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads, as each rank trains (default 1)")
    p.add_argument("--n", type=int, default=metrics.CPU_PEAK_N, help="GEMM size n (n x n times n x n)")
    p.add_argument("--reps", type=int, default=5, help="timed GEMMs after a warm-up; the largest rate counts")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    p.add_argument("--replace", action="store_true", help="store the new figure even if it is lower")
    p.add_argument("--show", action="store_true", help="print the stored figures and exit")
    args = p.parse_args(argv)
    if args.threads < 1 or args.n < 1 or args.reps < 1:
        p.error("--threads, --n and --reps must be positive")
    path = metrics.peak_cache_path()
    if args.show:
        print(json.dumps(metrics.read_peaks(path), indent=1, sort_keys=True) if path else
              f"nothing stored: ${metrics.PEAK_CACHE_ENV} is empty")
        return 0
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = metrics.known_peak(name)
        print(f"{name}: " + (f"{peak.name}, dense BF16 {peak.bf16:g} / FP8 {peak.fp8 or '-'} TFLOP/s "
                             "(datasheet; training uses it)" if peak else
                             "not in the datasheet table; training measures it, or pass --peak-tflops"))
    torch.set_num_threads(args.threads)
    metrics.cpu_peak_tflops(getattr(torch, args.dtype), args.n, args.reps, remeasure=True,
                            replace=args.replace, log=print)  # prints the figure and where it went
    return 0


if __name__ == "__main__":
    sys.exit(main())
