"""MoELayer = router + token dispatcher + grouped experts: route -> dispatch -> experts -> combine.

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
from megamoe.moe.dispatcher import CommCounters, ExpertPlacement, MoEParallel, TokenDispatcher
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.router import Routing, expert_capacity, route
from megamoe.parallel.comm import all_reduce_sum
from megamoe.params import replicated

__all__ = ["MoELayer", "MoEParallel", "MoEStats"]


@dataclass
class MoEStats:
    """Per-model accumulator, reset by the training step.

    grad_scale: multiplies the router-loss gradient (1 / number of micro-batches per step).
    aux/z: sums of per-layer loss values (this rank's share: sum over TP under SP for the layer's
    loss), fp64 scalars on the layer's device (0.0 before the first record): reading them every
    forward would block the host, so :meth:`step_values` reads everything once per step;
    calls: number of (layer, micro-batch) evaluations;
    tokens_per_expert: summed assignment counts per MoE layer (load imbalance metric), on the device.
    """

    grad_scale: float = 1.0
    aux: torch.Tensor | float = 0.0
    z: torch.Tensor | float = 0.0
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
        # fp64 sums, as the host floats they replace (same values, bit for bit)
        self.aux = self.aux + aux.double()
        self.z = self.z + z.double()
        self.calls += 1
        prev = self.tokens_per_expert.get(layer)
        self.tokens_per_expert[layer] = counts if prev is None else prev + counts

    def _imbalance(self) -> torch.Tensor:
        """[] fp64 on the device: max over layers of (max expert load / mean expert load)."""
        return torch.stack([c.max().double() / c.float().mean().double().clamp_min(1e-9)
                            for c in self.tokens_per_expert.values()]).max()

    def step_values(self) -> tuple[float, float, float]:
        """(aux sum, z sum, load imbalance) of the step so far, read in one device-to-host copy;
        zeros when no MoE layer ran. Imbalance: max over layers of max / mean expert load (1.0 is
        perfect balance)."""
        if not self.tokens_per_expert:
            return float(self.aux), float(self.z), 0.0
        aux, z, imbalance = torch.stack([torch.as_tensor(self.aux, dtype=torch.float64),
                                         torch.as_tensor(self.z, dtype=torch.float64),
                                         self._imbalance()]).tolist()
        return aux, z, imbalance

    def imbalance(self) -> float:
        """max over layers of (max expert load / mean expert load); 1.0 is perfect balance."""
        return self.step_values()[2]


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


class MoELayer(nn.Module):
    """Token-choice top-k MoE. Parameters use HF OpenMoE names: gate_weight [E, H], experts.*.

    forward: route (all tokens of this rank) -> dispatch (TP share, permute by expert, exchange over
    EP) -> grouped experts -> combine (exchange back, unpermute, TP all-gather): see TokenDispatcher.
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
                                      std=moe.router_init_std, sp_partial=True, keep_fp32=True)
        self.experts = GroupedExperts(hidden, ffn, self.placement.local_experts(self.topo.index), std,
                                      out_std, grouped=moe.grouped_gemm)
        self.dispatcher = TokenDispatcher(self.placement, self.par, stats)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape  # s is this rank's shard under SP
        xt = x.reshape(b * s, h)  # [T, H]
        routing = self._route(xt)
        if self.dispatcher.pipelined:  # K chunks: the experts run chunk by chunk inside the exchange
            out = self.dispatcher.pipeline(xt, routing, self.experts)
        else:
            rows, counts, state = self.dispatcher.dispatch(xt, routing)  # [N_local, H], [E_local]
            out = self.dispatcher.combine(self.experts(rows, counts, state.expert_sizes), state)  # [T, H]
        out = out.view(b, s, h)
        self.stats.record(self.layer, routing.aux_loss.detach(), routing.z_loss.detach(),
                          routing.tokens_per_expert.detach())
        if self.training and torch.is_grad_enabled():
            router_loss = (self.cfg.aux_loss_coeff * routing.aux_loss
                           + self.cfg.z_loss_coeff * routing.z_loss)
            out = _AttachRouterLoss.apply(out, router_loss, self.stats.grad_scale)
        return out
