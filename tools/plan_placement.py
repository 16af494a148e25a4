#!/usr/bin/env python3
"""Plan expert placements offline from measured expert loads (issue 14).

    python tools/plan_placement.py --loads LOADS.json --expert-model-parallel-size N \
        [--current CUR.json] [--ranks-per-node G] [--method ours|beam] [--move-cost C]

LOADS.json: a list, one entry per MoE layer, of per-expert loads (tokens routed to each logical expert).
CUR.json: a list of per-layer placements, the EP rank of each logical expert (default: contiguous,
expert e on rank e // (E / N)). Prints one JSON object: "placement" (per layer, the new EP rank of each
expert), "max_over_mean" (per layer, max / mean rank load of the new placement), "moves" (per layer,
{"expert", "from", "to"} for each expert that changes rank), plus "max_over_mean_before" and
"lower_bound" (max(1, max expert load / mean rank load)) per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.moe.placement_plan import (  # noqa: E402
    beam_search_placement,
    check_expert_count,
    check_loads,
    check_placement,
    check_ranks_per_node,
    lower_bound,
    max_over_mean,
    moves,
    plan_placement,
    read_layer_lists,
)


def contiguous(num_experts: int, ep_size: int) -> list[int]:
    """The default placement: blocks of E / EP consecutive experts per rank."""
    return [expert // (num_experts // ep_size) for expert in range(num_experts)]


def plan_layers(layer_loads: list, current: list | None, ep_size: int, ranks_per_node: int,
                method: str, move_cost: float) -> dict:
    """The output object; ValueError naming the layer for loads or placements that do not fit."""
    check_ranks_per_node(ranks_per_node, ep_size)
    if current is not None and len(current) != len(layer_loads):
        raise ValueError(f"--current has placements for {len(current)} layer(s), --loads for "
                         f"{len(layer_loads)}; give one placement per MoE layer")
    result: dict[str, list] = {"placement": [], "max_over_mean": [], "moves": [],
                               "max_over_mean_before": [], "lower_bound": []}
    for layer, loads in enumerate(layer_loads):
        try:
            values = check_loads(loads)
            check_expert_count(len(values), ep_size)
        except ValueError as error:
            raise ValueError(f"--loads layer {layer}: {error}") from None
        start = contiguous(len(values), ep_size) if current is None else current[layer]
        try:
            check_placement(start, len(values), ep_size)
        except ValueError as error:
            raise ValueError(f"--current layer {layer}: {error}") from None
        if method == "beam":
            new = beam_search_placement(values, start, ep_size)
        else:
            new = plan_placement(values, start, ep_size, ranks_per_node, move_cost)
        result["placement"].append(new)
        result["max_over_mean"].append(max_over_mean(values, new, ep_size))
        result["moves"].append(moves(start, new))
        result["max_over_mean_before"].append(max_over_mean(values, start, ep_size))
        result["lower_bound"].append(lower_bound(values, ep_size))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plan_placement.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", required=True, help="JSON list (per MoE layer) of per-expert loads")
    parser.add_argument("--expert-model-parallel-size", type=int, required=True, help="EP size N")
    parser.add_argument("--current", help="JSON list (per MoE layer) of the EP rank of each expert")
    parser.add_argument("--ranks-per-node", type=int, default=0,
                        help="EP ranks per node: prefer moves inside a node (0: one node)")
    parser.add_argument("--method", choices=("ours", "beam"), default="ours",
                        help="ours: LPT + swap search; beam: ColossalAI's beam search (baseline)")
    parser.add_argument("--move-cost", type=float, default=0.0,
                        help="max/mean a moved expert must buy (ours only; 0: any gain)")
    args = parser.parse_args(argv)
    try:
        layer_loads = read_layer_lists(args.loads, "--loads")
        current = None if args.current is None else read_layer_lists(args.current, "--current")
        result = plan_layers(layer_loads, current, args.expert_model_parallel_size,
                             args.ranks_per_node, args.method, args.move_cost)
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
