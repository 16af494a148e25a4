#!/usr/bin/env python3
"""Choose TP / SP / PP / EP / DP, ZeRO, the expert exchange and its chunking for a cluster (issue 19).

    python tools/plan_parallel.py --model-preset openmoe-8b --global-batch-size 1024 --seq-length 2048 \\
        --nodes 8 --gpus-per-node 8 --gpu-memory-gib 80 --peak-tflops 989 \\
        --intra-node-bandwidth 450 --inter-node-bandwidth 50 [--bf16] [--expert-load LOADS.json] \\
        [--top 5] [--json]
    python tools/plan_parallel.py --calibrate --model-preset openmoe-tiny ... --nodes 1 --gpus-per-node 4

The model is given as pretrain_openmoe.py takes it (a preset and any model, MoE, batch or precision
flag of megamoe/arguments.py; --bf16 for bf16 training); the layout flags are the planner's to choose
and may not be passed. Bandwidths are GB/s per GPU and direction. --expert-load: the rebalancer's
per-expert load file (a JSON list, one list of per-expert loads per MoE layer, as
tools/plan_placement.py --loads reads); uniform routing without it. Prints the --top fastest layouts
that fit in memory: predicted step time with its breakdown, memory per rank and the exact flags
(--json: a JSON list of them). --calibrate first measures this machine (GEMM rate, per-layer fixed
cost, AdamW rate, gloo all-to-all / all-reduce latency and bandwidth between forked ranks), writes the
constants to --calibration-file and plans with them instead of the cluster flags' rates;
--calibration-file alone reuses a stored measurement. A cluster too small for the model is one line
on stderr saying what does not fit and by how much (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megamoe.arguments import parse_args  # noqa: E402
from megamoe.config import Config, ConfigError  # noqa: E402
from megamoe.moe.placement_plan import read_layer_lists  # noqa: E402
from megamoe.planner.calibrate import Calibration, calibrate  # noqa: E402
from megamoe.planner.cost import (  # noqa: E402
    GIB,
    Cluster,
    NoLayoutFits,
    PlannedLayout,
    busiest,
    expert_load_by_layer,
    rank_layouts,
)
from megamoe.planner.layouts import LAYOUT_FLAGS, layout_of  # noqa: E402
from megamoe.planner.memory import memory_per_rank  # noqa: E402

DEFAULT_CALIBRATION = os.path.join(os.path.expanduser("~"), ".cache", "megamoe", "planner_calibration.json")
BREAKDOWN = (("compute", "compute_s"), ("of it recompute", "recompute_s"), ("fixed", "fixed_s"),
             ("TP comm", "tp_comm_s"), ("exchange intra", "exchange_intra_s"),
             ("exchange inter", "exchange_inter_s"), ("exchange hidden by chunks", "exchange_hidden_s"),
             ("PP p2p", "pp_p2p_s"), ("PP bubble", "pp_bubble_s"), ("DP reduce", "dp_reduce_s"),
             ("expert-DP reduce", "edp_reduce_s"), ("reduce hidden by backward", "grad_reduce_hidden_s"),
             ("ZeRO param gather", "param_gather_s"), ("gather hidden", "param_gather_hidden_s"),
             ("optimizer", "optimizer_s"))


def planner_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="plan_parallel.py", description=__doc__.splitlines()[0],
                                allow_abbrev=False,
                                epilog="Any other flag is a pretrain_openmoe.py model/batch flag.")
    c = p.add_argument_group("cluster")
    c.add_argument("--nodes", type=int, default=1)
    c.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node")
    c.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per rank (GiB)")
    c.add_argument("--memory-headroom-gib", type=float, default=0.0,
                   help="memory per rank a layout must leave free (fragmentation, NCCL buffers, the "
                        "memory model's error)")
    c.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak per rank (H100 BF16: 989)")
    c.add_argument("--efficiency", type=float, default=0.5, help="share of the peak the GEMMs reach")
    c.add_argument("--intra-node-bandwidth", type=float, default=450.0, help="GB/s per rank (NVLink)")
    c.add_argument("--inter-node-bandwidth", type=float, default=50.0, help="GB/s per rank (400 Gb/s IB)")
    o = p.add_argument_group("planner")
    o.add_argument("--expert-load", help="JSON list, per MoE layer, of per-expert loads (rebalancer format)")
    o.add_argument("--top", type=int, default=5, help="layouts to print")
    o.add_argument("--json", action="store_true", help="print the ranked layouts as a JSON list")
    o.add_argument("--max-evaluations", type=int, default=2000,
                   help="layouts whose full traffic model runs, at most (branch and bound stops earlier)")
    o.add_argument("--tolerance", type=float, default=0.01,
                   help="stop when no unevaluated layout can beat the --top-th by more than this fraction")
    o.add_argument("--evaluate", metavar="FLAGS",
                   help="also predict this layout (its layout flags in one string, e.g. a launch script's) "
                        "and say where it ranks")
    o.add_argument("--calibrate", action="store_true", help="measure this machine first and plan with it")
    o.add_argument("--calibration-file", default=None,
                   help=f"where --calibrate writes, or a stored measurement to plan with (default with "
                        f"--calibrate: {DEFAULT_CALIBRATION})")
    return p


def model_argv(rest: list[str]) -> list[str]:
    """The model flags as given, refusing the planner's layout flags; --mock-data when no data is
    named, so the flags parse (replace it with --data-path ... to train on a corpus)."""
    chosen = [a for a in rest if a.split("=")[0] in LAYOUT_FLAGS]
    if chosen:
        raise ConfigError(f"{chosen[0].split('=')[0]} is chosen by the planner; drop it from the model flags")
    if "--mock-data" in rest or any(a.split("=")[0] == "--data-path" for a in rest):
        return list(rest)
    return list(rest) + ["--mock-data"]


def parse_model(model: list[str]) -> Config:
    """The model's Config. Its micro-batch size is the planner's to choose, but a flag may constrain it
    (--moe-router-group-size must divide its tokens): parse with the first of 1, 2, 4, 8 that passes;
    every layout then sets and validates its own."""
    first: ConfigError | None = None
    for mbs in (1, 2, 4, 8):
        try:
            return parse_args(model + ["--micro-batch-size", str(mbs)])
        except ConfigError as e:
            first = first or e
    raise first


def check_cluster(args: argparse.Namespace) -> None:
    for name in ("nodes", "gpus_per_node", "top", "max_evaluations"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.tolerance < 1:
        raise ConfigError(f"--tolerance must be in [0, 1), got {args.tolerance}")
    for name in ("gpu_memory_gib", "peak_tflops", "efficiency", "intra_node_bandwidth",
                 "inter_node_bandwidth"):
        if not getattr(args, name) > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.memory_headroom_gib < args.gpu_memory_gib:
        raise ConfigError(f"--memory-headroom-gib must be in [0, --gpu-memory-gib {args.gpu_memory_gib:g}), "
                          f"got {args.memory_headroom_gib:g}")


def read_expert_load(path: str | None) -> list[list[float]] | None:
    """--expert-load in the rebalancer's format (one list of per-expert loads per MoE layer), or None."""
    if path is None:
        return None
    try:
        return read_layer_lists(path, "--expert-load")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def build_cluster(args: argparse.Namespace, cfg: Config) -> Cluster:
    world = args.nodes * args.gpus_per_node
    if args.calibrate:
        cal = calibrate(sorted({2, world} - {1}) or [2], cfg, log=lambda m: print(m, file=sys.stderr))
        path = args.calibration_file or DEFAULT_CALIBRATION
        cal.save(path)
        print(f" > calibration written to {path}", file=sys.stderr)
    elif args.calibration_file:
        try:
            cal = Calibration.load(args.calibration_file)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--calibration-file {args.calibration_file} is not a planner calibration "
                              f"({e}); run --calibrate") from None
    else:
        return Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib, args.peak_tflops,
                       args.intra_node_bandwidth, args.inter_node_bandwidth, efficiency=args.efficiency,
                       memory_headroom_gib=args.memory_headroom_gib)
    return Cluster.from_calibration(cal, args.nodes, args.gpus_per_node, args.gpu_memory_gib,
                                    args.memory_headroom_gib)


MEMORY_PARTS = ("weights", "grads", "optimizer", "activations", "exchange_buffers")  # MemoryEstimate's


def as_json(plan: PlannedLayout, flags: list[str]) -> dict:
    m = plan.memory
    return dict(label=plan.layout.label(), step_time_s=plan.step_time_s, memory_gib=plan.memory_gib,
                breakdown=plan.breakdown.as_dict(),
                memory={k: getattr(m, k) / GIB for k in MEMORY_PARTS},
                layout={k: v for k, v in vars(plan.layout).items()}, flags=flags)


def describe(i: int, plan: PlannedLayout, flags: list[str], cluster: Cluster) -> str:
    b, m = plan.breakdown, plan.memory
    terms = ", ".join(f"{name} {getattr(b, key):.3g}" for name, key in BREAKDOWN if getattr(b, key) > 0)
    mem = ", ".join(f"{k.replace('_', ' ')} {getattr(m, k) / GIB:.2f}" for k in MEMORY_PARTS)
    return (f"#{i} {plan.layout.label()}\n"
            f"   step {plan.step_time_s:.4g} s: {terms} (s)\n"
            f"   memory {plan.memory_gib:.2f} of {cluster.gpu_memory_gib:g} GiB per rank: {mem} (GiB)\n"
            f"   flags: {' '.join(flags)}")


def evaluate(model: list[str], flags: str, cluster: Cluster,
             expert_load: list[list[float]] | None) -> PlannedLayout:
    """The prediction for ``model`` under the layout ``flags`` (validated for the cluster's world)."""
    cfg = parse_args(model + flags.split()).validate(cluster.world_size)
    layout = layout_of(cfg, cluster.world_size, cluster.gpus_per_node)
    mem = memory_per_rank(cfg, cluster.world_size, expert_load_by_layer(cfg, expert_load))
    return PlannedLayout(layout, busiest(cfg, layout, cluster, expert_load, mem.optimizer), mem)


def main(argv: list[str] | None = None) -> int:
    parser = planner_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        check_cluster(args)
        model = model_argv(rest)
        cfg = parse_model(model)
        cluster = build_cluster(args, cfg)
        name = next((model[i + 1] for i, a in enumerate(model[:-1]) if a == "--model-preset"), "the model")
        load = read_expert_load(args.expert_load)
        ranking = rank_layouts(cfg, cluster, load, model_name=name, top=args.top,
                               max_evaluations=args.max_evaluations, tolerance=args.tolerance)
        given = None if args.evaluate is None else evaluate(model, args.evaluate, cluster, load)
    except (ConfigError, NoLayoutFits) as e:
        print(f"plan_parallel.py: error: {e}", file=sys.stderr)
        return 2
    top = ranking.plans
    flags = [model + p.layout.flags(cfg.model.num_layers) for p in top]
    if args.json:
        out = [as_json(p, f) for p, f in zip(top, flags)]
        if given is not None:
            out.append(as_json(given, model + args.evaluate.split()) | {"evaluated": True})
        print(json.dumps(out, indent=1))
        return 0
    print(f"{ranking.fitting} layouts fit {cluster.nodes}x{cluster.gpus_per_node} ranks "
          f"({cluster.gpu_memory_gib:g} GiB each, {cluster.memory_headroom_gib:g} kept free); "
          f"the {len(top)} fastest predicted "
          f"({ranking.evaluated} evaluated in full; "
          + ("STOPPED at --max-evaluations: not proven the fastest" if ranking.exhausted else
             f"no other can be more than {ranking.tolerance:.0%} faster than #{len(top)}") + "):")
    for i, (p, f) in enumerate(zip(top, flags), 1):
        print(describe(i, p, f, cluster))
    if given is not None:
        fits = given.memory_gib <= cluster.usable_memory_gib
        print(f"--evaluate: {given.step_time_s / top[0].step_time_s:.3f}x #1's step"
              + ("" if fits else " and DOES NOT FIT in memory") + "\n"
              + describe(0, given, model + args.evaluate.split(), cluster))
    return 0


if __name__ == "__main__":
    sys.exit(main())
