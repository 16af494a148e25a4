"""Expert load measurement and the periodic rebalancer (docs/ARCHITECTURE.md, "Expert rebalancing").

Load: per MoE layer, the tokens routed to each logical expert before capacity drops
(``MoEStats.tokens_per_expert``), one [E] count per step and layer kept on the device in a moving
window. Every rank of a pipeline stage routes a different micro-batch per DP replica, and the TP ranks
of a replica count the same tokens, so the stage's load is the window summed over the DP group (one
int64 all-reduce when it is read): the same integers on every rank of the stage.

Rebalance, every ``--moe-rebalance-interval`` steps after the optimizer step: per layer, the planner
(megamoe/moe/placement_plan.py) proposes a placement from the window's loads; the layers whose
predicted EP-rank load max/mean drops by at least ``--moe-rebalance-min-gain`` (relative) adopt theirs.
The stage's first rank decides and broadcasts it (one small int tensor), so the ranks can never
disagree; :class:`ExpertMigration` then moves the experts with their optimizer state.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from megamoe.config import Config
from megamoe.model.openmoe import StageModel
from megamoe.moe.layer import MoEStats
from megamoe.moe.placement_plan import max_over_mean, plan_placement
from megamoe.parallel.comm import merge_dicts
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.optimizer import DistributedOptimizer
from megamoe.training.expert_migration import ExpertMigration, placement_moves


class ExpertLoad:
    """The moving window of per-step expert loads of this stage's MoE layers; see the module docstring."""

    def __init__(self, model: StageModel, mesh: ParallelMesh, steps: int) -> None:
        self.mesh, self.layers = mesh, sorted(model.moe_layers())
        self.window: deque[torch.Tensor] = deque(maxlen=steps)  # [L_local, E] int64 per step

    def observe(self, stats: MoEStats) -> None:
        """After a training step: its counts (on the device; nothing is read back here)."""
        if self.layers:
            self.window.append(torch.stack([stats.tokens_per_expert[layer] for layer in self.layers]))

    def loads(self, steps: int | None = None) -> dict[int, list[int]]:
        """{layer: tokens per logical expert} over the last ``steps`` steps (all in the window when
        None) and every DP replica. A collective over the DP group: every rank of the stage calls it."""
        if not self.layers:
            return {}
        recent = list(self.window)[-steps:] if steps else list(self.window)
        total = torch.stack(recent).sum(0).cpu()  # [L_local, E]; observed after every step
        if self.mesh.dp > 1:
            dist.all_reduce(total, group=self.mesh.groups["dp"])
        return dict(zip(self.layers, total.tolist()))


class ExpertRebalancer:
    """Plans and moves experts every ``--moe-rebalance-interval`` steps; logs what it did."""

    def __init__(self, cfg: Config, model: StageModel, optimizer: DistributedOptimizer,
                 mesh: ParallelMesh) -> None:
        p = cfg.parallel
        self.interval, self.min_gain, self.window = p.moe_rebalance_interval, p.moe_rebalance_min_gain, \
            p.moe_rebalance_window
        self.model, self.optimizer, self.mesh = model, optimizer, mesh
        self.load = ExpertLoad(model, mesh, max(self.window, cfg.train.log_interval))
        self.migration = ExpertMigration(optimizer, mesh)
        # EP ranks per node, when the EP group spans nodes: the planner keeps moves inside a node
        per_node = len(mesh.members.get("ep_intra", [])) if mesh.ranks_per_node else 0
        self.ranks_per_node = per_node if 0 < per_node < mesh.ep else 0

    def due(self, iteration: int) -> bool:
        return self.interval > 0 and iteration % self.interval == 0

    def _decide(self, loads: dict[int, list[int]], before: dict[int, float]) -> dict[int, list[int]]:
        """{layer: new EP rank of each expert} for the layers worth moving, decided on the stage's
        first rank and broadcast over the stage (its DP x TP ranks) so that every rank migrates the
        same. ``before``: each layer's predicted max/mean now."""
        layers = self.load.layers
        num_experts = len(next(iter(loads.values())))
        decision = torch.full((len(layers), num_experts), -1, dtype=torch.int64)
        stage = self.mesh.members.get("stage", [self.mesh.rank])
        if self.mesh.rank == stage[0]:
            moe_layers = self.model.moe_layers()
            for row, layer in enumerate(layers):
                current = list(moe_layers[layer].placement.rank_of)
                new = plan_placement(loads[layer], current, self.mesh.ep, ranks_per_node=self.ranks_per_node)
                after = max_over_mean(loads[layer], new, self.mesh.ep)
                if new != current and before[layer] - after >= self.min_gain * before[layer]:
                    decision[row] = torch.tensor(new)
        if len(stage) > 1:
            dist.broadcast(decision, src=stage[0], group=self.mesh.groups["stage"])
        return {layer: row for layer, row in zip(layers, decision.tolist()) if row[0] >= 0}

    def rebalance(self) -> dict[str, Any]:
        """Plan from the window and move; the metrics of this rebalance (the same on every rank)."""
        start = time.perf_counter()
        self.optimizer.finish_param_sync()  # the weights we send must be the gathered ones
        loads = self.load.loads(self.window)
        moe_layers = self.model.moe_layers()
        before = {layer: max_over_mean(loads[layer], moe_layers[layer].placement.rank_of, self.mesh.ep)
                  for layer in self.load.layers}
        plans = self._decide(loads, before) if self.load.layers else {}
        changes = {moe_layers[layer]: moe_layers[layer].placement.moved_to(plans[layer])
                   for layer in sorted(plans)}
        moved = sum(len(placement_moves(moe.placement, new)) for moe, new in changes.items())
        sent = self.migration.run(changes)
        after = {layer: max_over_mean(loads[layer], moe_layers[layer].placement.rank_of, self.mesh.ep)
                 for layer in self.load.layers}
        seconds = time.perf_counter() - start
        totals = torch.tensor([float(moved) if self._counts_moves() else 0.0, float(sent), seconds],
                              dtype=torch.float64)
        if self.mesh.world_size > 1:
            sums = totals[:2].clone()
            dist.all_reduce(sums)
            longest = totals[2:].clone()
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
            totals = torch.cat([sums, longest])
        pairs = {layer: (before[layer], after[layer]) for layer in before}
        pairs = merge_dicts(pairs, self.mesh.groups.get("pp"))  # every stage's layers
        before, after = ({layer: pair[i] for layer, pair in pairs.items()} for i in (0, 1))
        return dict(moe_experts_moved=int(totals[0]), moe_rebalance_bytes=int(totals[1]),
                    moe_rebalance_seconds=float(totals[2]),
                    moe_rank_load_before=[before[layer] for layer in sorted(before)],
                    moe_rank_load_after=[after[layer] for layer in sorted(after)],
                    moe_rank_imbalance_before=max(before.values(), default=1.0),
                    moe_rank_imbalance_after=max(after.values(), default=1.0))

    def _counts_moves(self) -> bool:
        """One rank per stage counts the stage's moved experts (every rank of it moved the same)."""
        return self.mesh.rank == self.mesh.members.get("stage", [self.mesh.rank])[0]

    def load_record(self, steps: int) -> dict[str, Any]:
        """Per-layer, per-expert loads of the last ``steps`` steps and where each expert is now, for
        the metrics file (every MoE layer of the model, gathered over PP)."""
        loads = self.load.loads(steps)
        local = {layer: (loads[layer], list(moe.placement.rank_of))
                 for layer, moe in self.model.moe_layers().items()}
        merged = merge_dicts(local, self.mesh.groups.get("pp"))  # every stage's layers
        layers = sorted(merged)
        return dict(moe_expert_load_layers=layers, moe_expert_load=[merged[layer][0] for layer in layers],
                    moe_expert_rank=[merged[layer][1] for layer in layers])

