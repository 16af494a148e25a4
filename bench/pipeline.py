"""Pipeline bubble: measured idle fraction per rank vs the theoretical (p-1)/(m+p-1) of 1F1B and
(p-1)/(v*m+p-1) of interleaved 1F1B with v virtual stages (Narayanan et al. 2021).

    PYTHONPATH=. python bench/pipeline.py [--pp 2] [--steps 6] [--hidden 128]

Ranks are fork-started gloo processes, one thread each; on a machine with fewer cores than ranks
the idle time includes waiting for a core, so keep --pp <= cores. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics

from tests.harness import TINY_ARGS, train_losses


def run(pp: int, m: int, vp: int, steps: int, hidden: int) -> float:
    layers = 4 * pp
    args = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--kv-channels", str(hidden // 4),
            "--ffn-hidden-size", str(hidden), "--seq-length", "64", "--micro-batch-size", "1",
            "--global-batch-size", str(m), "--train-iters", str(steps),
            "--pipeline-model-parallel-size", str(pp)]
    if vp > 1:
        args += ["--num-layers-per-virtual-pipeline-stage", str(layers // (pp * vp))]
    recs = train_losses(pp, args, base_args=TINY_ARGS)
    return statistics.median(r["pp_idle_frac"] for r in recs[1:])  # skip the warm-up step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--hidden", type=int, default=128)
    args = p.parse_args()
    pp = args.pp
    print("| schedule | p | m | measured idle | theory (p-1)/(v*m+p-1) |\n|---|---:|---:|---:|---:|")
    for m in (pp, 2 * pp, 4 * pp):
        for vp in (1, 2):
            idle = run(pp, m, vp, args.steps, args.hidden)
            theory = (pp - 1) / (vp * m + pp - 1)
            name = "1F1B" if vp == 1 else f"interleaved v={vp}"
            print(f"| {name} | {pp} | {m} | {idle:.3f} | {theory:.3f} |", flush=True)


if __name__ == "__main__":
    main()
