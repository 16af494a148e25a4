"""Optimizer memory per rank: heterogeneous ZeRO vs plain data parallelism.

    PYTHONPATH=. python bench/memory.py

1. openmoe-8b on 64 GPUs (formula, megamoe.parallel.optimizer.optimizer_memory_estimate): bf16 weights,
   fp32 grad buffers, fp32 master + AdamW moments.
2. openmoe-tiny on 8 CPU ranks (measured: bytes of the optimizer's master shards and moments).
"""

from __future__ import annotations

from megamoe.arguments import parse_args
from megamoe.model.openmoe import count_parameters
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.optimizer import build_optimizer, optimizer_memory_estimate
from megamoe.training.run import build_stage_model
from tests.harness import TINY_ARGS, run_ranks

GIB = 2**30


def formula_8b() -> None:
    cfg = parse_args(["--model-preset", "openmoe-8b", "--mock-data"])
    m, moe = cfg.model, cfg.moe
    n_moe = sum(moe.is_moe_layer(i) for i in range(m.num_layers))
    expert = n_moe * moe.num_experts * 4 * m.hidden_size * m.ffn_hidden_size
    dense = count_parameters(cfg)["total"] - expert
    print(f"openmoe-8b: {dense / 1e9:.2f}B dense + {expert / 1e9:.2f}B expert parameters, 64 GPUs\n")
    print("| layout | optimizer | weights GiB | grads GiB | master+Adam GiB | total GiB |")
    print("|---|---|---:|---:|---:|---:|")
    for tp, pp, ep in ((2, 2, 8), (1, 1, 8), (2, 1, 8), (1, 1, 32)):
        dp = 64 // (tp * pp)
        edp = 64 // (ep * pp)
        for name, zero, stage in (("plain DP", False, 1), ("ZeRO-1", True, 1), ("ZeRO-2", True, 2)):
            r = optimizer_memory_estimate(dense, expert, tp, pp, ep, dp, edp, zero, zero_stage=stage)
            total = sum(r.values())
            print(f"| TP{tp} PP{pp} EP{ep} (DP{dp}, EDP{edp}) | {name} | "
                  f"{r['weights'] / GIB:.2f} | {r['grads'] / GIB:.2f} | {r['optimizer'] / GIB:.2f} | "
                  f"{total / GIB:.2f} |")


def _measured(rank: int, world: int, layout: list[str]) -> dict[str, int]:
    cfg = parse_args(TINY_ARGS + ["--global-batch-size", "16"] + layout)
    mesh = ParallelMesh.from_config(cfg.parallel, world, rank)
    mesh.build_groups()
    model = build_stage_model(cfg, mesh)
    return build_optimizer(model, cfg, mesh).memory_bytes()


def measured_tiny() -> None:
    print("\nopenmoe-tiny, 8 CPU ranks, EP 2 (measured on rank 0, KiB)\n")
    print("| optimizer | params | grads (+ transient buckets) | fp32 master | AdamW moments | "
          "optimizer state vs plain |")
    print("|---|---:|---:|---:|---:|---:|")
    base = None
    ep2 = ["--expert-model-parallel-size", "2"]
    z = ["--use-distributed-optimizer", "--ddp-bucket-size", "8192"]
    for name, layout in (("plain DP", ep2), ("ZeRO-1", ep2 + z), ("ZeRO-2", ep2 + z + ["--zero-stage", "2"])):
        r = run_ranks(8, _measured, layout)[0]
        state = r["master"] + r["optimizer"]
        base = base or state
        grads = f"{r['grads'] / 1024:.0f}"
        if "grad_buckets" in r:
            grads += f" (+{r['grad_buckets'] / 1024:.0f})"
        print(f"| {name} | {r['params'] / 1024:.0f} | {grads} | {r['master'] / 1024:.0f} | "
              f"{r['optimizer'] / 1024:.0f} | {state / base:.2f}x |")


if __name__ == "__main__":
    formula_8b()
    measured_tiny()
