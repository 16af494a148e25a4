"""All-to-all traffic of one MoE layer forward (dispatch + combine) per exchange mode, from the
layer's byte / message counters: flat vs hierarchical (2 nodes x 4 ranks) over EP 8, and flat vs
TP-deduplicated under TP 2 x EP 2 (hidden 512, 2048 tokens per rank, 8 experts top-2, fp32).

    PYTHONPATH=. python bench/alltoall.py
"""

from __future__ import annotations

import torch

from megamoe.config import MoEConfig
from megamoe.model.init import init_model_weights
from megamoe.moe.dispatcher import EPTopology
from megamoe.moe.layer import MoELayer, MoEParallel, MoEStats
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.tensor import TPContext
from tests.harness import run_ranks

H, T = 512, 2048


def _traffic(rank: int, world: int, ep: int, tp: int, hierarchical: bool, dedup: bool) -> dict[str, int]:
    mesh = ParallelMesh(world_size=world, rank=rank, ep=ep, tp=tp, ranks_per_node=4 if world == 8 else 0)
    mesh.build_groups()
    par = MoEParallel(tp=TPContext.from_mesh(mesh), ep=EPTopology.from_mesh(mesh, hierarchical),
                      tp_dedup=dedup)
    layer = MoELayer(1, H, 64, MoEConfig(num_experts=8, router_topk=2), 0.02, 0.02, MoEStats(), par=par)
    init_model_weights(layer, seed=1)
    seed = mesh.dp_rank if tp > 1 else rank  # TP ranks hold the same tokens
    x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer(x)
    return layer.stats.comm.as_dict()


def main() -> None:
    print("per rank, mean over ranks\n\n| mode | layout | bytes intra MiB | bytes inter MiB | msgs intra | "
          "msgs inter |\n|---|---|---:|---:|---:|---:|")
    for name, world, ep, tp, hier, dedup in (
            ("flat", 8, 8, 1, False, True), ("hierarchical", 8, 8, 1, True, True),
            ("flat (TP copies)", 4, 2, 2, False, False), ("TP-deduplicated", 4, 2, 2, False, True)):
        res = run_ranks(world, _traffic, ep, tp, hier, dedup)
        mean = {k: sum(r[k] for r in res) / world for k in res[0]}
        layout = f"EP{ep} (2 nodes x 4)" if world == 8 else f"TP{tp} x EP{ep} (DP2)"
        print(f"| {name} | {layout} | {mean['a2a_bytes_intra'] / 2**20:.2f} | "
              f"{mean['a2a_bytes_inter'] / 2**20:.2f} | {mean['a2a_msgs_intra']:.1f} | "
              f"{mean['a2a_msgs_inter']:.1f} |")


if __name__ == "__main__":
    main()
