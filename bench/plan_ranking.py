"""Does the planner rank layouts as they really run? Predicted vs measured step time on this machine
(issue 19): Spearman rank correlation per world size, after calibrating the cost model here.

    PYTHONPATH=. python bench/plan_ranking.py [--worlds 4 8] [--layouts 8] [--iters 4] [--passes 1] \
        [--calibration FILE] [--output bench/results/plan_ranking.json]

1. Calibrate (megamoe/planner/calibrate.py): the robust CPU GEMM peak, the rate of the model's own
   GEMM shape, the fixed cost per decoder layer, the AdamW rate, and gloo all-to-all / all-reduce
   latency + bandwidth between W fork-started ranks for every W (or --calibration FILE from an earlier
   run). The machine's cores are shared by the ranks (2 cores, 4 or 8 ranks): the cost model divides
   the compute rate by world / cores and lets nothing overlap (``Cluster.share``, ``Cluster.overlap``).
2. Per world size W: every layout megamoe accepts for the bench model on W ranks
   (megamoe/planner/layouts.py, one node of W ranks, micro-batch 1-4, K 1-2), a seeded random sample of
   --candidates of them predicted (cost.busiest), and --layouts chosen at evenly spaced predicted
   ranks, so that the measured set spans the predicted range rather than crowding where the model
   says nothing apart.
3. Each chosen layout trains the bench model (OpenMoE code path, hidden 256, 4 layers, 8 experts top-2
   every 2nd layer, seq 128, global batch 16, fp32, mock data) for --iters steps on W fork-started gloo
   ranks (tests/harness.py); measured = rank 0's median Trainer step_time after the first step, the
   smallest over --passes (each pass measures every layout once, in turn).
Prints a markdown table per W and the Spearman correlation of predicted vs measured step time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megamoe.arguments import parse_args  # noqa: E402
from megamoe.planner.calibrate import Calibration, calibrate  # noqa: E402
from megamoe.planner.cost import Cluster, busiest, spearman  # noqa: E402
from megamoe.planner.layouts import Layout, SearchSpace, enumerate_layouts  # noqa: E402
from megamoe.planner.memory import memory_per_rank  # noqa: E402

MODEL = ["--model-preset", "openmoe-tiny", "--mock-data", "--num-layers", "4", "--hidden-size", "256",
         "--num-attention-heads", "4", "--kv-channels", "64", "--ffn-hidden-size", "512",
         "--moe-layer-freq", "2", "--vocab-size", "1024", "--seq-length", "128", "--global-batch-size", "16"]
RUN = ["--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1000000", "--eval-interval", "1000000",
       "--peak-tflops", "1"]
SPACE = SearchSpace(micro_batch_sizes=(1, 2, 4), chunks=(1, 2))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[4, 8])
    p.add_argument("--layouts", type=int, default=8, help="layouts measured per world size")
    p.add_argument("--candidates", type=int, default=40, help="layouts predicted to choose them from")
    p.add_argument("--iters", type=int, default=4, help="training steps per layout (the first is dropped)")
    p.add_argument("--passes", type=int, default=1,
                   help="measure every layout this many times; keep the least")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration", help="a stored calibration (default: measure now)")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "plan_ranking.json"))
    return p.parse_args(argv)


def choose(predicted: list[tuple[float, Layout]], n: int) -> list[tuple[float, Layout]]:
    """n of the predicted layouts at evenly spaced ranks of their predicted step time."""
    ordered = sorted(predicted, key=lambda p: p[0])
    if len(ordered) <= n:
        return ordered
    return [ordered[round(i * (len(ordered) - 1) / (n - 1))] for i in range(n)]


def measure(world: int, layout: Layout, iters: int) -> float:
    from tests.harness import train_losses

    flags = layout.flags(int(MODEL[MODEL.index("--num-layers") + 1]))
    records = train_losses(world, MODEL + RUN + ["--train-iters", str(iters)] + flags)
    return statistics.median(r["step_time"] for r in records[1:])


def run_world(world: int, cal: Calibration, args: argparse.Namespace) -> dict[str, Any]:
    base = parse_args(MODEL)
    cluster = Cluster.from_calibration(cal, nodes=1, gpus_per_node=world, memory_gib=4.0)
    layouts = enumerate_layouts(base, world, world, SPACE)
    sample = random.Random(args.seed).sample(layouts, min(args.candidates, len(layouts)))
    predicted = []
    for layout in sample:
        cfg = layout.apply(base)
        predicted.append((busiest(cfg, layout, cluster, None, memory_per_rank(cfg, world).optimizer).total_s,
                          layout))
    chosen = choose(predicted, args.layouts)
    measured: list[float] = [float("inf")] * len(chosen)
    for _ in range(args.passes):  # all layouts in turn, then again: a busy spell hits one pass
        for i, (pred, layout) in enumerate(chosen):
            measured[i] = min(measured[i], measure(world, layout, args.iters))
            print(f"  W={world} {layout.label():58s} predicted {pred:.3f} s measured {measured[i]:.3f} s",
                  flush=True)
    rows = [dict(layout=layout.label(), predicted_s=pred, measured_s=meas,
                 flags=layout.flags(base.model.num_layers)) for (pred, layout), meas in zip(chosen, measured)]
    rho = spearman([r["predicted_s"] for r in rows], [r["measured_s"] for r in rows])
    return dict(world=world, enumerated=len(layouts), spearman=rho, rows=rows)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.calibration:
        cal = Calibration.load(args.calibration)
    else:
        cal = calibrate(args.worlds, parse_args(MODEL + ["--micro-batch-size", "2"]))
    results = [run_world(w, cal, args) for w in args.worlds]
    for res in results:
        print(f"\nW = {res['world']} ranks on {cal.cores} cores ({res['enumerated']} valid layouts); "
              f"Spearman {res['spearman']:.2f}\n\n| layout | predicted s | measured s |\n|---|---:|---:|")
        for r in sorted(res["rows"], key=lambda r: r["predicted_s"]):
            print(f"| {r['layout']} | {r['predicted_s']:.3f} | {r['measured_s']:.3f} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(dict(calibration=cal.to_json(), results=results), indent=1))


if __name__ == "__main__":
    main()
