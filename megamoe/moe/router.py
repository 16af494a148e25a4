"""OpenMoE router math: fp32 gate, softmax over all experts, top-k, capacity, aux and z losses.

Pure functions of the router logits, so they are testable by hand and identical under every layout.
T = tokens in the routing group (the micro-batch), E = experts, k = top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Result of routing T tokens.

    expert_ids: [T, k] int64 chosen experts (column 0 = top-1).
    combine:    [T, k] fp32 combine weights: the un-renormalised softmax probability, 0 where dropped.
    keep:       [T, k] bool, False for assignments dropped by the capacity limit.
    tokens_per_expert: [E] int64 assignments per expert before dropping, over the whole group.
    aux_loss, z_loss: fp32 scalars (differentiable w.r.t. the logits); this rank's share.
    """

    expert_ids: torch.Tensor
    combine: torch.Tensor
    keep: torch.Tensor
    tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor

    def select(self, rows: torch.Tensor | slice, combine: torch.Tensor | None = None) -> Routing:
        """The routing of a subset of tokens (same losses and load statistics)."""
        return Routing(expert_ids=self.expert_ids[rows], keep=self.keep[rows],
                       combine=self.combine[rows] if combine is None else combine,
                       tokens_per_expert=self.tokens_per_expert, aux_loss=self.aux_loss,
                       z_loss=self.z_loss)


def expert_capacity(capacity_factor: float, tokens: int, num_experts: int, min_capacity: int) -> int:
    """OpenMoE/T5X: round(cf * tokens_per_group / E) -- no factor k -- and at least min_capacity."""
    return max(int(round(capacity_factor * tokens / num_experts)), min_capacity)


def load_balancing_loss(probs: torch.Tensor, fraction: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """Switch/flaxformer loss: E^2 * mean_e(fraction_e * mean_prob_e).

    probs: [T, E] softmax of this rank's tokens; fraction: [E] share of ALL tokens of the group that
    chose e among their k (a token counts once per expert, so the loss is k when perfectly balanced);
    no gradient flows through it, as in flaxformer. mean_prob divides by the group's total token
    count, so with tokens sharded over ranks the per-rank losses SUM to the group loss.
    """
    num_experts = probs.shape[-1]
    mean_prob = probs.sum(0) / total_tokens  # [E]
    return (fraction * mean_prob).mean() * num_experts**2


def router_z_loss(logits: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """ST-MoE router z-loss: mean over the group's tokens of logsumexp(logits)^2 (this rank's share)."""
    return torch.logsumexp(logits, dim=-1).pow(2).sum() / total_tokens


def capacity_keep_mask(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments fit the expert buffers, filling all top-1 choices before any top-2 choice,
    each round in token order (OpenMoE/T5X priority). expert_ids: [T, k] -> keep [T, k] bool."""
    t, k = expert_ids.shape
    # Priority order = k-major, then token: [k, T] flattened.
    order = expert_ids.t().reshape(-1)  # [k*T]
    # one_hot by hand (what F.one_hot does on CUDA): on CPU F.one_hot reads min/max back first
    onehot = torch.zeros(order.shape[0], num_experts, dtype=torch.int64, device=order.device)
    onehot.scatter_(1, order.unsqueeze(1), 1)  # [k*T, E]
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # slot taken in its expert's buffer
    return (position < capacity).view(k, t).t()


def route(logits: torch.Tensor, topk: int, capacity: int | None,
          count_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
          total_tokens: int | None = None) -> Routing:
    """Route tokens given fp32 logits [T, E]; ``capacity=None`` is dropless.

    When a routing group is sharded over ranks (sequence parallelism), ``count_reduce`` sums the
    per-expert counts over the group and ``total_tokens`` is the group's token count; aux and z losses
    are then this rank's additive share of the group's losses.
    """
    num_experts = logits.shape[-1]
    total = total_tokens or logits.shape[0]
    probs = torch.softmax(logits, dim=-1)  # [T, E] over ALL experts
    top_probs, expert_ids = probs.topk(topk, dim=-1)  # [T, k], sorted: column 0 is top-1
    if capacity is None:
        keep = torch.ones_like(expert_ids, dtype=torch.bool)
    else:
        keep = capacity_keep_mask(expert_ids, num_experts, capacity)
    combine = top_probs * keep  # un-renormalised, dropped -> 0
    # [E] assignments per expert (top-k ids of a token are distinct); scatter_add, not bincount,
    # whose CUDA kernel reads min and max back to the host
    flat_ids = expert_ids.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=logits.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    if count_reduce is not None:
        counts = count_reduce(counts)
    fraction = counts.to(probs.dtype) / total
    return Routing(expert_ids=expert_ids, combine=combine, keep=keep, tokens_per_expert=counts,
                   aux_loss=load_balancing_loss(probs, fraction, total),
                   z_loss=router_z_loss(logits, total))
