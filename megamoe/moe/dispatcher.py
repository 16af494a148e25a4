"""Token dispatch: permute by expert -> [exchange] -> experts -> [exchange] -> unpermute.

The permutation is computed from a routing and an expert placement table, so expert parallelism
only adds the exchange step (an all-to-all over the EP group) between permute and the experts, and
the load balancer can move experts by changing the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.moe.router import Routing


@dataclass(frozen=True)
class ExpertPlacement:
    """Logical expert -> (EP rank, local slot). The default is contiguous blocks of E/EP experts."""

    rank_of: tuple[int, ...]
    slot_of: tuple[int, ...]
    ep_size: int

    @staticmethod
    def contiguous(num_experts: int, ep_size: int = 1) -> ExpertPlacement:
        per = num_experts // ep_size
        return ExpertPlacement(rank_of=tuple(e // per for e in range(num_experts)),
                               slot_of=tuple(e % per for e in range(num_experts)), ep_size=ep_size)

    @property
    def num_experts(self) -> int:
        return len(self.rank_of)

    def local_experts(self, ep_rank: int) -> list[int]:
        """Global ids held by ``ep_rank``, in slot order."""
        held = [(self.slot_of[e], e) for e in range(self.num_experts) if self.rank_of[e] == ep_rank]
        return [e for _, e in sorted(held)]

    def order_key(self) -> torch.Tensor:
        """[E] sort key of each logical expert: (rank, slot) flattened, i.e. its dispatch position."""
        per = max(self.slot_of) + 1
        return torch.tensor([self.rank_of[e] * per + self.slot_of[e]
                             for e in range(self.num_experts)])


@dataclass
class Permutation:
    """How the kept (token, choice) assignments were sorted.

    token_idx: [N] source token of each sorted row; weight: [N] its combine weight;
    counts: [E] rows per logical expert, in dispatch (placement) order.
    """

    token_idx: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor


def permute(x: torch.Tensor, routing: Routing, placement: ExpertPlacement,
            ) -> tuple[torch.Tensor, Permutation]:
    """x: [T, H] -> rows [N, H] sorted by dispatch position of their expert (N = kept assignments)."""
    t, k = routing.expert_ids.shape
    keep = routing.keep.reshape(-1)  # [T*k], token-major
    experts = routing.expert_ids.reshape(-1)[keep]
    tokens = torch.arange(t, device=x.device).repeat_interleave(k)[keep]
    weights = routing.combine.reshape(-1)[keep]
    key = placement.order_key().to(x.device)[experts]
    order = torch.argsort(key, stable=True)  # stable: token order within an expert
    counts = torch.bincount(key, minlength=placement.num_experts)
    token_idx = tokens[order]
    return x[token_idx], Permutation(token_idx=token_idx, weight=weights[order], counts=counts)


def unpermute(y: torch.Tensor, perm: Permutation, num_tokens: int) -> torch.Tensor:
    """y: [N, H] expert outputs in permuted order -> [T, H], sum_k combine_k * expert_k(x)."""
    out = y.new_zeros(num_tokens, y.shape[-1])
    weighted = y * perm.weight.to(y.dtype).unsqueeze(-1)
    return out.index_add_(0, perm.token_idx, weighted)
