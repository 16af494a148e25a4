"""MoELayer = router + token dispatcher + grouped experts: route -> dispatch -> experts -> combine.

The router's losses are not returned: :func:`attach_loss` puts their gradient on the layer output
(Megatron's MoEAuxLossAutoScaler idea), so every pipeline stage's routers reach backward without
plumbing; a per-model :class:`MoEStats` collects detached values for logging."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from megamoe.config import MoEConfig
from megamoe.moe.dispatcher import CommCounters, ExpertPlacement, MoEParallel, TokenDispatcher
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.fp8 import FP8Recipe
from megamoe.moe.router import RoutingGroups, expert_capacity, route
from megamoe.parallel.comm import all_gather_rows
from megamoe.params import replicated

__all__ = ["MoELayer", "MoEParallel", "MoEStats"]


@dataclass
class MoEStats:
    """Per-model accumulator, reset by the training step.

    grad_scale: multiplies the router-loss gradient (1 / number of micro-batches per step).
    aux/z: sums of per-layer loss values (this rank's share under SP), fp64 scalars on the layer's
    device (0.0 before the first record): :meth:`step_values` reads everything once per step, as a
    read every forward would block the host; calls: number of (layer, micro-batch) evaluations;
    tokens_per_expert: summed assignment counts per MoE layer (load imbalance metric), on the device.
    """

    grad_scale: float = 1.0
    aux: torch.Tensor | float = 0.0
    z: torch.Tensor | float = 0.0
    calls: int = 0
    output_z: torch.Tensor | float = 0.0  # sum over the last stage's micro-batches of the output z-loss
    tokens_per_expert: dict[int, torch.Tensor] = field(default_factory=dict)
    comm: CommCounters = field(default_factory=CommCounters)
    recomputing: bool = False  # inside activation recomputation: the forward already counted

    def reset(self, grad_scale: float = 1.0) -> None:
        self.__init__(grad_scale)  # every other field back to its default

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

    def record_output_z(self, z: torch.Tensor) -> None:
        """The output z-loss of one micro-batch (mean logsumexp(logits)^2), kept on the device."""
        self.output_z = self.output_z + z.double()

    def step_values(self) -> tuple[float, float, float, float]:
        """(aux sum, z sum, load imbalance, output z sum) of the step so far, read in one
        device-to-host copy; zeros when nothing ran. Imbalance: max over layers of max / mean expert
        load (1.0 is perfect balance)."""
        imbalance = 0.0
        if self.tokens_per_expert:
            imbalance = torch.stack([c.max().double() / c.float().mean().double().clamp_min(1e-9)
                                     for c in self.tokens_per_expert.values()]).max()
        values = [self.aux, self.z, imbalance, self.output_z]
        device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
        return tuple(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device)
                                  for v in values]).tolist())


class _Recomputing:
    """Marks ``stats`` as recomputing while entered (re-enterable: a region may re-run more than once)."""

    def __init__(self, stats: MoEStats) -> None:
        self.stats = stats

    def __enter__(self) -> None:
        self.stats.recomputing = True

    def __exit__(self, *exc: object) -> None:
        self.stats.recomputing = False


def attach_loss(out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``out`` unchanged, with ``loss`` (a scalar weighted by its coefficient) entering backward as if
    ``scale * loss`` had been added to the objective: for losses that are not returned (router losses
    of any pipeline stage, the output z-loss beside the logged LM loss)."""
    return _AttachLoss.apply(out, loss, scale)


class _AttachLoss(torch.autograd.Function):
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
    """Token-choice top-k MoE (route this rank's tokens, then :class:`TokenDispatcher`'s dispatch ->
    grouped experts -> combine). Parameters use HF OpenMoE names: gate_weight [E, H], experts.*."""

    def __init__(self, layer: int, hidden: int, ffn: int, moe: MoEConfig, std: float,
                 out_std: float, stats: MoEStats, placement: ExpertPlacement | None = None,
                 par: MoEParallel | None = None, num_moe_layers: int = 1, truncated_init: bool = False,
                 activation: str = "openmoe", renormalize: bool = False) -> None:
        """``activation``: the experts' (megamoe.ops.EXPERT_ACTIVATIONS); ``renormalize``: top-k combine
        weights divided by their sum (Mixtral) instead of raw softmax probabilities (OpenMoE)."""
        super().__init__()
        self.layer, self.cfg, self.stats, self.renormalize = layer, moe, stats, renormalize
        # T5X / OpenMoE average the router losses over the MoE layers (the coefficients are per
        # model); Megatron sums them (--no-moe-router-loss-average)
        self.loss_weight = 1.0 / num_moe_layers if moe.router_loss_average else 1.0
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
                                      out_std, grouped=moe.grouped_gemm, truncated=truncated_init,
                                      fp8=FP8Recipe.from_config(moe),
                                      activation=activation)
        self.dispatcher = TokenDispatcher(self.placement, self.par, stats)

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Route through ``placement`` from now on. The caller has already moved the expert weights
        (and their optimizer state) into the slots it names: see megamoe/training/rebalance.py."""
        self.placement = placement
        self.dispatcher.placement = placement
        self.experts.relabel(placement.local_experts(self.topo.index))

    def capacity(self, tokens: int) -> int | None:
        cf = self.cfg.capacity_factor
        if not self.training and self.cfg.eval_capacity_factor is not None:
            cf = self.cfg.eval_capacity_factor
        return None if cf is None else expert_capacity(cf, tokens, self.cfg.num_experts,
                                                       self.cfg.min_capacity)

    def _groups(self, b: int, s: int, device: torch.device) -> RoutingGroups:
        """This rank's [b, s] tokens in the micro-batch's routing groups. Under SP it holds positions
        [r*s, (r+1)*s) of every sample; the groups are runs of the whole micro-batch in sample-major
        order, as one process sees it, so every rank's choices are gathered (a few ints per token)."""
        tp = self.tp.size if self.tp.sequence_parallel else 1
        group_size = self.cfg.router_group_size or b * s * tp
        if tp == 1:
            return RoutingGroups(group_size)

        def gather(ids: torch.Tensor) -> torch.Tensor:  # [b*s, k] -> [tp, b, s, k] -> [b*tp*s, k]
            every = all_gather_rows(ids.view(b, s, -1), self.tp.group)
            return every.transpose(0, 1).reshape(b * tp * s, -1)

        sample = torch.arange(b, device=device).unsqueeze(1) * (s * tp)
        rows = (sample + self.tp.rank * s + torch.arange(s, device=device)).reshape(-1)  # [b*s]
        return RoutingGroups(group_size, gather, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape  # s is this rank's shard under SP
        xt = x.reshape(b * s, h)  # [T, H]
        logits = xt.float() @ self.gate_weight.float().t()  # [T, E] fp32
        groups = self._groups(b, s, x.device)
        routing = route(logits, self.cfg.router_topk, self.capacity(groups.group_size), groups,
                        renormalize=self.renormalize)
        if self.dispatcher.pipelined:  # K chunks: the experts run inside the exchange, overlapped
            out = self.dispatcher.pipeline(xt, routing, self.experts)
        else:
            rows, counts, state = self.dispatcher.dispatch(xt, routing)  # [N_local, H], [E_local]
            out = self.dispatcher.combine(self.experts(rows, counts, state.expert_sizes), state)  # [T, H]
        out = out.view(b, s, h)
        self.stats.record(self.layer, routing.aux_loss.detach(), routing.z_loss.detach(),
                          routing.tokens_per_expert.detach())
        if self.training and torch.is_grad_enabled():
            router_loss = (self.cfg.aux_loss_coeff * routing.aux_loss
                           + self.cfg.z_loss_coeff * routing.z_loss) * self.loss_weight
            out = attach_loss(out, router_loss, self.stats.grad_scale)
        return out
