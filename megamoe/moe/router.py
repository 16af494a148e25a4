"""OpenMoE router math: softmax over all experts, top-k, capacity, aux and z losses. Pure functions
of the fp32 router logits, identical under every layout. T = tokens, E = experts, k = top-k."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Result of routing T tokens:
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


def capacity_keep_mask(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments fit the expert buffers of their routing group, filling all top-1 choices
    before any top-2 choice, each round in token order (OpenMoE/T5X priority).

    expert_ids: [G, T_g, k] (or [T, k], one group) -> keep of the same shape, bool."""
    grouped = expert_ids if expert_ids.dim() == 3 else expert_ids.unsqueeze(0)
    groups, t, k = grouped.shape
    order = grouped.transpose(1, 2).reshape(groups, k * t)  # priority order: k-major, then token
    # one_hot by hand (what F.one_hot does on CUDA): on CPU F.one_hot reads min/max back first
    onehot = torch.zeros(groups, k * t, num_experts, dtype=torch.int64, device=order.device)
    onehot.scatter_(2, order.unsqueeze(2), 1)  # [G, k*T_g, E]
    position = (onehot.cumsum(1) * onehot).sum(-1) - 1  # slot taken in its expert's buffer
    keep = (position < capacity).view(groups, k, t).transpose(1, 2)
    return keep if expert_ids.dim() == 3 else keep[0]


@dataclass(frozen=True)
class RoutingGroups:
    """How this rank's tokens sit in the micro-batch's routing groups (T5X: consecutive runs of
    ``group_size`` tokens of the whole micro-batch, in token order; capacity and drop order are per
    group, so the groups must be the same tokens in every layout).

    gather: [T, k] this rank's choices -> [T_all, k] every rank's, in micro-batch order (None: this
    rank holds the whole micro-batch); rows: where this rank's tokens are in that order (None: all)."""

    group_size: int
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    rows: torch.Tensor | None = None


def route(logits: torch.Tensor, topk: int, capacity: int | None, groups: RoutingGroups | None = None,
          renormalize: bool = False) -> Routing:
    """Route this rank's tokens given fp32 logits [T, E]; ``capacity=None`` is dropless;
    ``renormalize``: combine weights are the top-k probabilities divided by their sum (Mixtral) instead
    of the raw softmax probabilities (OpenMoE). When the
    micro-batch is sharded over ranks (sequence parallelism), ``groups.gather`` brings every rank's
    top-k choices (small ints) so that counts, capacity positions and drops are those of the whole
    group; aux and z losses are then this rank's additive share."""
    num_experts = logits.shape[-1]
    groups = groups or RoutingGroups(group_size=logits.shape[0])  # one group: this rank's tokens
    probs = torch.softmax(logits, dim=-1)  # [T, E] over ALL experts
    top_probs, expert_ids = probs.topk(topk, dim=-1)  # [T, k], sorted: column 0 is top-1
    if renormalize:  # HF Mixtral: router_top_value /= router_top_value.sum(-1)
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    all_ids = expert_ids if groups.gather is None else groups.gather(expert_ids)  # [T_all, k]
    total = all_ids.shape[0]
    num_groups = total // groups.group_size
    grouped = all_ids.view(num_groups, groups.group_size, topk)
    # [G, E] assignments per group and expert (top-k ids of a token are distinct); scatter_add, not
    # bincount, whose CUDA kernel reads min and max back to the host
    counts = torch.zeros(num_groups, num_experts, dtype=torch.int64, device=logits.device)
    flat = grouped.reshape(num_groups, -1)
    counts.scatter_add_(1, flat, torch.ones_like(flat))
    mine = slice(None) if groups.rows is None else groups.rows  # this rank's tokens among all
    if capacity is None:
        keep = torch.ones_like(expert_ids, dtype=torch.bool)
    else:
        keep = capacity_keep_mask(grouped, num_experts, capacity).reshape(total, topk)[mine]
    group_of_token = (torch.arange(total, device=logits.device) // groups.group_size)[mine]  # [T]
    # Switch/flaxformer aux loss averaged over groups: E^2 * mean_g mean_e(fraction * mean prob), with
    # fraction from ALL the group's tokens (a token counts once per chosen expert: k when perfectly
    # balanced; no gradient through the counts, as in flaxformer) and probabilities summed over this
    # rank's; both divided by the group size, so SP ranks' losses SUM to the group loss.
    probs_per_group = probs.new_zeros(num_groups, num_experts).index_add_(0, group_of_token, probs)
    fraction = counts.to(probs.dtype) / groups.group_size  # [G, E]
    aux_loss = (fraction * (probs_per_group / groups.group_size)).mean() * num_experts**2
    return Routing(expert_ids=expert_ids, combine=top_probs * keep, keep=keep,  # dropped -> weight 0
                   tokens_per_expert=counts.sum(0), aux_loss=aux_loss,
                   # ST-MoE z-loss: mean over the micro-batch's tokens of logsumexp^2 (this rank's share)
                   z_loss=torch.logsumexp(logits, dim=-1).pow(2).sum() / total)
