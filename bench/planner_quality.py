"""Expert placement planner quality and time: ours (megamoe.moe.placement_plan.plan_placement) against
ColossalAI's beam search over swaps (beam_search_placement), from the contiguous placement.

    PYTHONPATH=. python bench/planner_quality.py [--output planner.json] [--trace METRICS.jsonl]
        [--experts 8 32 64 256] [--ep 4 8 16 64] [--exponents 0.5 1.0] [--seeds 3] [--ranks-per-node 0]

Layers: synthetic Zipf loads (expert weights 1 / rank^s, shuffled over the experts, 1000 x E tokens drawn
multinomially), "perfect" layers built to have a placement with max / mean exactly 1.0 (the bound is
achievable there), and with --trace every MoE layer of every metrics line carrying "moe_expert_load".
Each row: max / mean before, the issue's lower bound max(1, max expert / mean rank load), the slot-aware
bound (placement_plan.slot_lower_bound: every rank also holds E/EP - 1 other experts; the optimum itself
when E/EP <= 2), per planner the mean and worst max / mean over seeds, the worst ratio to the slot-aware
bound (<= 1.05: within 5% of the optimum), mean experts moved and the median planning time per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.moe.placement_plan import (  # noqa: E402
    beam_search_placement,
    lower_bound,
    max_over_mean,
    moves,
    plan_placement,
    slot_lower_bound,
)
from megamoe.training.metrics import write_json_aside  # noqa: E402

Planner = Callable[[list[float], list[int], int], list[int]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64, 256])
    parser.add_argument("--ep", type=int, nargs="+", default=[4, 8, 16, 64])
    parser.add_argument("--exponents", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--seeds", type=int, default=3, help="layers per (E, EP, family)")
    parser.add_argument("--ranks-per-node", type=int, default=0, help="EP ranks per node for ours")
    parser.add_argument("--trace", help="metrics file whose lines may carry moe_expert_load")
    parser.add_argument("--output", help="write the results as JSON here")
    return parser.parse_args(argv)


def zipf_loads(num_experts: int, exponent: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_experts + 1) ** exponent
    rng.shuffle(weights)
    return rng.multinomial(1000 * num_experts, weights / weights.sum()).astype(float).tolist()


def perfect_loads(num_experts: int, ep_size: int, seed: int) -> list[float]:
    """Loads some placement balances exactly: each rank's last expert tops it up to the same total."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(100, 1000, size=(ep_size, num_experts // ep_size)).astype(float)
    grid[:, -1] += grid.sum(axis=1).max() + 50 - grid.sum(axis=1)
    return rng.permutation(grid.ravel()).tolist()


def trace_layers(path: str) -> list[list[float]]:
    """Every layer's per-expert loads from the lines of ``path`` that carry moe_expert_load."""
    layers = []
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
            if isinstance(record, dict) and isinstance(record.get("moe_expert_load"), list):
                layers.extend([float(load) for load in layer] for layer in record["moe_expert_load"])
    return layers


def layer_sets(args: argparse.Namespace) -> Iterator[tuple[str, int, int, list[list[float]]]]:
    """(family, E, EP, layers) for every synthetic configuration with EP <= E."""
    for num_experts in args.experts:
        for ep_size in (ep for ep in args.ep if ep <= num_experts and num_experts % ep == 0):
            for exponent in args.exponents:
                yield (f"zipf {exponent:g}", num_experts, ep_size,
                       [zipf_loads(num_experts, exponent, seed) for seed in range(args.seeds)])
            yield ("perfect", num_experts, ep_size,
                   [perfect_loads(num_experts, ep_size, seed) for seed in range(args.seeds)])


def measure(planner: Planner, layers: list[list[float]], ep_size: int, ranks_per_node: int) -> dict:
    imbalance, ratio, moved, cross_node, times = [], [], [], [], []
    node_size = ranks_per_node if 0 < ranks_per_node < ep_size else ep_size
    for loads in layers:
        current = [expert // (len(loads) // ep_size) for expert in range(len(loads))]
        start = time.perf_counter()
        new = planner(loads, current, ep_size)
        times.append(1e3 * (time.perf_counter() - start))
        imbalance.append(max_over_mean(loads, new, ep_size))
        ratio.append(imbalance[-1] / slot_lower_bound(loads, ep_size))
        moved.append(len(moves(current, new)))
        cross_node.append(sum(m["from"] // node_size != m["to"] // node_size for m in moves(current, new)))
    return {"mean": statistics.fmean(imbalance), "worst": max(imbalance), "worst_ratio": max(ratio),
            "moves": statistics.fmean(moved), "cross_node_moves": statistics.fmean(cross_node),
            "ms": statistics.median(times)}


def evaluate(family: str, num_experts: int, ep_size: int, layers: list[list[float]],
             ranks_per_node: int) -> dict:
    def ours(loads: list[float], current: list[int], ep: int) -> list[int]:
        return plan_placement(loads, current, ep, ranks_per_node if ranks_per_node < ep else 0)

    contiguous = [expert // (num_experts // ep_size) for expert in range(num_experts)]
    return {
        "family": family, "experts": num_experts, "ep": ep_size, "layers": len(layers),
        "before": statistics.fmean(max_over_mean(loads, contiguous, ep_size) for loads in layers),
        "bound": statistics.fmean(lower_bound(loads, ep_size) for loads in layers),
        "slot_bound": statistics.fmean(slot_lower_bound(loads, ep_size) for loads in layers),
        "ours": measure(ours, layers, ep_size, ranks_per_node),
        "beam": measure(beam_search_placement, layers, ep_size, ranks_per_node),
    }


def trace_rows(path: str, ep_sizes: list[int], ranks_per_node: int) -> list[dict]:
    layers = trace_layers(path)
    if not layers:
        print(f"{path}: no line carries moe_expert_load (a run logs it per --log-interval once the "
              f"rebalancer records loads); skipping the trace")
        return []
    rows = []
    for num_experts in sorted({len(layer) for layer in layers}):
        same_size = [layer for layer in layers if len(layer) == num_experts and sum(layer) > 0]
        for ep_size in (ep for ep in ep_sizes if ep <= num_experts and num_experts % ep == 0):
            rows.append(evaluate("trace", num_experts, ep_size, same_size, ranks_per_node))
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| layers | E | EP | before | bound | slot bound | ours mean | ours worst | ours / slot bound "
            "| ours moves | ours ms | beam mean | beam worst | beam / slot bound | beam moves | beam ms |")
    lines = [head, "|---|---:|---:|" + "---:|" * 13]
    for row in rows:
        cells = [f"{row['family']} (x{row['layers']})", str(row["experts"]), str(row["ep"]),
                 f"{row['before']:.3f}", f"{row['bound']:.3f}", f"{row['slot_bound']:.3f}"]
        for name in ("ours", "beam"):
            m = row[name]
            cells += [f"{m['mean']:.3f}", f"{m['worst']:.3f}", f"{m['worst_ratio']:.3f}",
                      f"{m['moves']:.1f}", f"{m['ms']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [evaluate(family, num_experts, ep_size, layers, args.ranks_per_node)
            for family, num_experts, ep_size, layers in layer_sets(args)]
    if args.trace:
        try:
            rows += trace_rows(args.trace, args.ep, args.ranks_per_node)
        except OSError as error:
            print(f"planner_quality.py: error: cannot read --trace {args.trace}: {error.strerror}",
                  file=sys.stderr)
            return 2
    print(markdown(rows))
    if args.output:
        write_json_aside(args.output, {"config": vars(args), "rows": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
