"""MoELayer = router + dispatcher + grouped experts.

The router's aux and z losses do not travel through the model's return values: an autograd function
attaches their gradient to the layer output (Megatron's MoEAuxLossAutoScaler idea), so every pipeline
stage contributes its routers' losses to backward without plumbing, and a per-model
:class:`MoEStats` collects detached values for logging.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from megamoe.config import MoEConfig
from megamoe.moe.dispatcher import (
    CommCounters,
    EPTopology,
    ExpertPlacement,
    exchange_plan,
    overlapped_exchange,
    permute,
    run_plan,
    unpermute,
)
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.router import Routing, expert_capacity, route
from megamoe.parallel.comm import (
    all_gather_rows,
    all_reduce_sum,
    gather_from_sequence,
    scatter_to_sequence,
)
from megamoe.parallel.tensor import TPContext
from megamoe.params import replicated


@dataclass
class MoEStats:
    """Per-model accumulator, reset by the training step.

    grad_scale: multiplies the router-loss gradient (1 / number of micro-batches per step).
    aux/z: sums of per-layer loss values (this rank's share: sum over TP under SP for the layer's
    loss); calls: number of (layer, micro-batch) evaluations;
    tokens_per_expert: summed assignment counts per MoE layer (load imbalance metric).
    """

    grad_scale: float = 1.0
    aux: float = 0.0
    z: float = 0.0
    calls: int = 0
    tokens_per_expert: dict[int, torch.Tensor] = field(default_factory=dict)
    comm: CommCounters = field(default_factory=CommCounters)
    recomputing: bool = False  # inside activation recomputation: the forward already counted

    def reset(self, grad_scale: float = 1.0) -> None:
        self.grad_scale, self.aux, self.z, self.calls = grad_scale, 0.0, 0.0, 0
        self.tokens_per_expert = {}
        self.comm = CommCounters()
        self.recomputing = False

    @property
    def live_comm(self) -> CommCounters | None:
        """Where to count all-to-all traffic: nowhere while recomputing (counters are per forward)."""
        return None if self.recomputing else self.comm

    def recompute_contexts(self) -> tuple[contextlib.AbstractContextManager, _Recomputing]:
        """``context_fn`` for torch.utils.checkpoint: count nothing twice when a region re-runs."""
        return contextlib.nullcontext(), _Recomputing(self)

    def record(self, layer: int, aux: torch.Tensor, z: torch.Tensor, counts: torch.Tensor) -> None:
        if self.recomputing:
            return
        self.aux += float(aux)
        self.z += float(z)
        self.calls += 1
        prev = self.tokens_per_expert.get(layer)
        self.tokens_per_expert[layer] = counts if prev is None else prev + counts

    def imbalance(self) -> float:
        """max over layers of (max expert load / mean expert load); 1.0 is perfect balance."""
        vals = [float(c.max()) / max(float(c.float().mean()), 1e-9)
                for c in self.tokens_per_expert.values()]
        return max(vals) if vals else 0.0


class _Recomputing:
    """Marks ``stats`` as recomputing while entered (re-enterable: a region may re-run more than once)."""

    def __init__(self, stats: MoEStats) -> None:
        self.stats = stats

    def __enter__(self) -> None:
        self.stats.recomputing = True

    def __exit__(self, *exc: object) -> None:
        self.stats.recomputing = False


class _AttachRouterLoss(torch.autograd.Function):
    """forward: return ``out`` unchanged; backward: pass grad to ``out`` and send ``scale`` as the
    gradient of ``loss`` (so d total / d loss = coefficient / micro-batches without adding it)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        shape, dtype, device = ctx.loss_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


@dataclass(frozen=True)
class MoEParallel:
    """How an MoE layer is laid out: TP context, EP topology, and the exchange options."""

    tp: TPContext = field(default_factory=TPContext)
    ep: EPTopology = field(default_factory=EPTopology.single)
    tp_dedup: bool = True
    chunks: int = 1

    @property
    def dedup_active(self) -> bool:
        """TP ranks hold identical tokens (TP > 1 without SP): each dispatches only its 1/TP share."""
        return self.tp.size > 1 and not self.tp.sequence_parallel and self.tp_dedup


class MoELayer(nn.Module):
    """Token-choice top-k MoE. Parameters use HF OpenMoE names: gate_weight [E, H], experts.*.

    forward: route (all tokens of this rank) -> [TP-dedup: keep my 1/TP share] -> permute by expert
    -> exchange over EP -> grouped experts -> exchange back -> unpermute -> [TP-dedup: all-gather].
    """

    def __init__(self, layer: int, hidden: int, ffn: int, moe: MoEConfig, std: float,
                 out_std: float, stats: MoEStats, placement: ExpertPlacement | None = None,
                 par: MoEParallel | None = None) -> None:
        super().__init__()
        self.layer, self.cfg, self.stats = layer, moe, stats
        self.par = par or MoEParallel()
        self.tp, self.topo = self.par.tp, self.par.ep
        if moe.num_experts % self.topo.size:
            raise ValueError(f"{moe.num_experts} experts are not divisible by EP {self.topo.size}")
        self.placement = placement or ExpertPlacement.contiguous(moe.num_experts, self.topo.size)
        # Router gate kept in fp32 (as trained): routing decisions are precision-sensitive. It is
        # replicated over TP; under SP each rank routes its own sequence shard.
        self.gate_weight = replicated(nn.Parameter(torch.empty(moe.num_experts, hidden)),
                                      std=moe.router_init_std, sp_partial=True)
        self.experts = GroupedExperts(hidden, ffn, self.placement.local_experts(self.topo.index), std,
                                      out_std, grouped=moe.grouped_gemm)

    def capacity(self, tokens: int) -> int | None:
        cf = self.cfg.capacity_factor
        if not self.training and self.cfg.eval_capacity_factor is not None:
            cf = self.cfg.eval_capacity_factor
        if cf is None:
            return None
        return expert_capacity(cf, tokens, self.cfg.num_experts, self.cfg.min_capacity)

    def _route(self, xt: torch.Tensor) -> Routing:
        t = xt.shape[0]
        logits = xt.float() @ self.gate_weight.float().t()  # [T, E] fp32
        reduce, total = None, t
        if self.tp.sequence_parallel:  # the routing group (micro-batch) spans the TP ranks
            reduce, total = partial(all_reduce_sum, group=self.tp.group), t * self.tp.size
        # Capacity groups are the tokens this rank routes (under SP: its sequence shard).
        return route(logits, self.cfg.router_topk, self.capacity(t), reduce, total)

    def _plan(self, counts: torch.Tensor) -> tuple[list, torch.Tensor]:
        """Exchange plan for rows with per-expert ``counts`` [E] (dispatch order) and the [src, slot]
        counts of the rows this rank will receive."""
        topo = self.topo
        ep, per = topo.size, self.cfg.num_experts // topo.size
        every = all_gather_rows(counts, topo.group).view(ep, ep, per)  # [src, dst, slot]
        return exchange_plan(every.sum(-1), topo), every[:, topo.index, :]

    def _local_experts(self, received: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
        """Rows received ordered by (src, slot) with [src, slot] counts ``mine`` -> expert outputs
        in the same order (grouped by slot for the grouped GEMM, then put back)."""
        ep, per = mine.shape
        slot_of_row = torch.arange(per, device=received.device).repeat(ep).repeat_interleave(
            mine.reshape(-1).to(received.device))
        order = torch.argsort(slot_of_row, stable=True)
        y = self.experts(received[order], mine.sum(0))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return y[inverse]

    def _experts_over_ep(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, H] sorted by dispatch position, counts [E] per expert in dispatch order ->
        expert outputs for the same rows. Exchanges over EP when EP > 1."""
        if self.topo.size == 1:
            return self.experts(rows, counts)
        plan, mine = self._plan(counts)
        counters = self.stats.live_comm
        received = run_plan(rows, plan, False, counters, self.topo)  # ordered by (src, slot)
        return run_plan(self._local_experts(received, mine), plan, True, counters, self.topo)

    def _dispatch_and_combine(self, xt: torch.Tensor, routing: Routing) -> torch.Tensor:
        """xt [T, H] and its routing -> sum_k combine_k * expert_k(x) [T, H].

        With --moe-alltoall-chunks K the tokens go in K chunks; over a flat EP exchange the chunks
        are pipelined (all-to-all of one chunk overlaps the experts of another)."""
        t = xt.shape[0]
        chunks = [idx for idx in torch.arange(t, device=xt.device).chunk(self.par.chunks)]
        permuted = [permute(xt[idx] if len(idx) < t else xt, routing if len(idx) == t else
                            routing.select(idx), self.placement) for idx in chunks]
        if len(chunks) > 1 and self.topo.size > 1 and not self.topo.hierarchical:
            plans = [self._plan(perm.counts) for _, perm in permuted]
            steps = [plan[0] for plan, _ in plans]
            counters = self.stats.live_comm
            if counters is not None:  # dispatch sends in_splits rows, combine sends out_splits back
                row_bytes = xt.shape[-1] * xt.element_size()
                for step in steps:
                    for splits in (step.in_splits, step.out_splits):
                        counters.add(splits, list(step.peers), self.topo.rank, self.topo.node_of, row_bytes)
            ys = overlapped_exchange(lambda i, recv: self._local_experts(recv, plans[i][1]), steps,
                                     [rows for rows, _ in permuted])
        else:
            ys = [self._experts_over_ep(rows, perm.counts) for rows, perm in permuted]
        out = [unpermute(y, perm, len(idx)) for y, (_, perm), idx in zip(ys, permuted, chunks)]
        return out[0] if len(out) == 1 else torch.cat(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape  # s is this rank's shard under SP
        xt = x.reshape(b * s, h)  # [T, H]
        routing = self._route(xt)
        if self.par.dedup_active:
            # TP ranks hold identical tokens: each sends only its share; the scatter's backward
            # all-gathers the share gradients so x and the router see full gradients on every rank.
            group = self.tp.group
            share = scatter_to_sequence(xt, group, dim=0)
            part = routing.select(self.tp.shard_range(b * s),
                                  combine=scatter_to_sequence(routing.combine, group, dim=0))
            out = gather_from_sequence(self._dispatch_and_combine(share, part), group, dim=0,
                                       reduce_grad=False)
        else:
            out = self._dispatch_and_combine(xt, routing)
        out = out.view(b, s, h)
        self.stats.record(self.layer, routing.aux_loss.detach(), routing.z_loss.detach(),
                          routing.tokens_per_expert.detach())
        if self.training and torch.is_grad_enabled():
            router_loss = (self.cfg.aux_loss_coeff * routing.aux_loss
                           + self.cfg.z_loss_coeff * routing.z_loss)
            out = _AttachRouterLoss.apply(out, router_loss, self.stats.grad_scale)
        return out
