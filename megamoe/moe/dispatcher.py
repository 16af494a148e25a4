"""Token dispatch: [TP share] -> permute by expert -> [exchange over EP] -> experts -> [exchange back]
-> unpermute -> [TP gather].

The permutation is computed from a routing and an expert placement table, so expert parallelism
only adds the exchange (an all-to-all plan over the EP group, :mod:`megamoe.moe.exchange`) between
permute and the experts, and the load balancer can move experts by changing the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from megamoe.moe.exchange import (
    CommCounters,
    EPTopology,
    ExchangeStep,
    exchange_plan,
    pipelined_exchange,
    run_plan,
)
from megamoe.moe.router import Routing
from megamoe.parallel.comm import all_gather_rows, gather_from_sequence, scatter_to_sequence
from megamoe.parallel.tensor import TPContext

if TYPE_CHECKING:
    from megamoe.moe.layer import MoEStats

__all__ = ["ChunkPlan", "CommCounters", "DispatchState", "EPTopology", "ExpertPlacement", "MoEParallel",
           "Permutation", "TokenDispatcher", "permute", "unpermute"]


@dataclass(frozen=True)
class ExpertPlacement:
    """Logical expert -> (EP rank, local slot). The default is contiguous blocks of E/EP experts."""

    rank_of: tuple[int, ...]
    slot_of: tuple[int, ...]
    ep_size: int

    @staticmethod
    def contiguous(num_experts: int, ep_size: int = 1) -> ExpertPlacement:
        num_local = num_experts // ep_size
        return ExpertPlacement(rank_of=tuple(e // num_local for e in range(num_experts)),
                               slot_of=tuple(e % num_local for e in range(num_experts)), ep_size=ep_size)

    @staticmethod
    def from_ranks(rank_of: list[int], ep_size: int) -> ExpertPlacement:
        """A table from each logical expert's EP rank; slots follow expert order on each rank."""
        num_local = len(rank_of) // ep_size
        slots, held = [], [0] * ep_size
        for rank in rank_of:
            slots.append(held[rank])
            held[rank] += 1
        if held != [num_local] * ep_size:
            raise ValueError(f"placement {rank_of} does not give each of {ep_size} EP ranks "
                             f"{num_local} experts")
        return ExpertPlacement(rank_of=tuple(rank_of), slot_of=tuple(slots), ep_size=ep_size)

    @property
    def num_experts(self) -> int:
        return len(self.rank_of)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def local_experts(self, ep_rank: int) -> list[int]:
        """Global ids held by ``ep_rank``, in slot order."""
        held = [(self.slot_of[e], e) for e in range(self.num_experts) if self.rank_of[e] == ep_rank]
        return [e for _, e in sorted(held)]

    def order_key(self) -> torch.Tensor:
        """[E] sort key of each logical expert: (rank, slot) flattened, i.e. its dispatch position."""
        return torch.tensor([self.rank_of[e] * self.num_local_experts + self.slot_of[e]
                             for e in range(self.num_experts)])


@dataclass(frozen=True)
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
    num_tokens, topk = routing.expert_ids.shape
    keep = routing.keep.reshape(-1)  # [T*k], token-major
    experts = routing.expert_ids.reshape(-1)[keep]  # [N]
    tokens = torch.arange(num_tokens, device=x.device).repeat_interleave(topk)[keep]  # [N]
    weights = routing.combine.reshape(-1)[keep]  # [N]
    key = placement.order_key().to(x.device)[experts]  # [N] dispatch position
    order = torch.argsort(key, stable=True)  # stable: token order within an expert
    counts = torch.bincount(key, minlength=placement.num_experts)  # [E]
    token_idx = tokens[order]
    return x[token_idx], Permutation(token_idx=token_idx, weight=weights[order], counts=counts)


def unpermute(y: torch.Tensor, perm: Permutation, num_tokens: int) -> torch.Tensor:
    """y: [N, H] expert outputs in permuted order -> [T, H], sum_k combine_k * expert_k(x)."""
    out = y.new_zeros(num_tokens, y.shape[-1])
    weighted = y * perm.weight.to(y.dtype).unsqueeze(-1)
    return out.index_add_(0, perm.token_idx, weighted)


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


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk of the dispatched tokens: rows ``lo:hi`` of the (TP-shared) input.

    perm: how its rows were sorted by expert; steps: its exchange plan (empty without EP);
    received: [EP, E_local] rows this rank's experts get from each source EP rank, per local slot.
    """

    lo: int
    hi: int
    perm: Permutation
    steps: tuple[ExchangeStep, ...]
    received: torch.Tensor

    @property
    def num_received(self) -> int:
        """Rows this rank's experts get from the chunk (known on the host)."""
        return sum(self.steps[-1].recv_splits) if self.steps else self.perm.token_idx.shape[0]


@dataclass(frozen=True)
class DispatchState:
    """What :meth:`TokenDispatcher.combine` needs to undo a dispatch.

    chunks: the per-chunk plans, in token order (their token ranges cover this rank's tokens, or its
    1/TP share under TP-dedup); expert_order: [N_local] for each position of the expert-grouped
    rows, its row among the received ones (ordered chunk, source, slot); None when they coincide.
    """

    chunks: tuple[ChunkPlan, ...]
    expert_order: torch.Tensor | None


def _group_by_expert(received: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Rows received per chunk as [EP, E_local] counts (rows ordered chunk, source, slot) -> the
    order that groups them by local expert ([N_local], None if already grouped) and counts [E_local]."""
    counts = torch.stack(received).sum((0, 1))  # [E_local]
    if len(received) == 1 and received[0].shape[0] == 1:  # one chunk from one source: slot order
        return None, counts
    num_sources, num_local = received[0].shape
    slots = torch.arange(num_local, device=counts.device).repeat(num_sources * len(received))
    slot_of_row = slots.repeat_interleave(torch.cat(received).reshape(-1))  # [N_local]
    return torch.argsort(slot_of_row, stable=True), counts


class TokenDispatcher:
    """dispatch -> experts -> combine for one MoE layer.

    ``dispatch(x, routing)`` takes this rank's tokens x [T, H] and their routing and returns the rows
    for this rank's local experts [N_local, H] grouped by local expert, their per-expert counts
    [E_local] and a :class:`DispatchState`; ``combine(y, state)`` takes the experts' outputs for
    those rows and returns the layer output [T, H] = sum_k combine_k * expert_k(x). Behind the two:

    - TP-dedup (TP > 1 without SP, ``tp_dedup``): TP ranks hold identical tokens, so each dispatches
      only its 1/TP share; combine all-gathers the shares (forward: split / all-gather; backward:
      all-gather / split, so x and the router see full gradients on every rank);
    - permute by expert, then (EP > 1) the flat or hierarchical all-to-all plan out and back;
    - ``chunks`` K > 1: the tokens go in K chunks, each with its own exchange.

    Pipelining (``pipelined``: K > 1 over a flat EP exchange) needs the experts between the chunks'
    exchanges, which the dispatch / experts / combine split cannot give: :meth:`pipeline` runs all
    three for a given experts module, with every chunk's all-to-all started at once and chunk i's
    experts running while chunk i+1's rows are in flight (:func:`~megamoe.moe.exchange.pipelined_exchange`;
    backward overlaps the same way and accumulates each expert parameter's gradient once).
    dispatch / combine with K > 1 exchange the chunks one after the other (same rows and traffic).

    All-to-all traffic is counted once per forward, when a chunk is planned, into
    ``stats.live_comm`` (nowhere while recomputing).
    """

    def __init__(self, placement: ExpertPlacement, par: MoEParallel, stats: MoEStats) -> None:
        self.placement, self.par, self.stats = placement, par, stats
        self.topo = par.ep

    @property
    def pipelined(self) -> bool:
        return self.par.chunks > 1 and self.topo.size > 1 and not self.topo.hierarchical

    def dispatch(self, x: torch.Tensor, routing: Routing,
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """x [T, H], routing of its T tokens -> (rows [N_local, H] grouped by local expert,
        counts [E_local], state). Forward: all-to-all(s) out; backward: the mirrored all-to-all(s)."""
        chunks, rows = self._plan(*self._tp_share(x, routing))
        received = [run_plan(chunk_rows, list(chunk.steps)) for chunk_rows, chunk in zip(rows, chunks)]
        order, counts = _group_by_expert([chunk.received for chunk in chunks])
        received_rows = received[0] if len(received) == 1 else torch.cat(received)  # [N_local, H]
        state = DispatchState(chunks=tuple(chunks), expert_order=order)
        return received_rows if order is None else received_rows[order], counts, state

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Expert outputs y [N_local, H] (dispatch's row order) -> layer output [T, H].
        Forward: all-to-all(s) back (+ TP all-gather); backward: the mirrored collectives."""
        if state.expert_order is not None:  # back to (chunk, source, slot) order
            y = y[torch.argsort(state.expert_order)]
        sizes = [chunk.num_received for chunk in state.chunks]
        outs = [unpermute(run_plan(y_chunk, list(chunk.steps), reverse=True), chunk.perm,
                          chunk.hi - chunk.lo)
                for y_chunk, chunk in zip(y.split(sizes), state.chunks)]
        return self._tp_gather(outs[0] if len(outs) == 1 else torch.cat(outs))

    def pipeline(self, x: torch.Tensor, routing: Routing, experts: nn.Module) -> torch.Tensor:
        """dispatch -> experts -> combine with the K chunks pipelined (see the class docstring).
        x [T, H] -> [T, H]; experts(rows [N, H] grouped by local expert, counts [E_local]) -> [N, H].
        Without anything to pipeline, simply dispatch -> experts -> combine."""
        if not self.pipelined:
            rows, counts, state = self.dispatch(x, routing)
            return self.combine(experts(rows, counts), state)
        chunks, rows = self._plan(*self._tp_share(x, routing))

        def chunk_experts(i: int, received: torch.Tensor) -> torch.Tensor:
            """Chunk i's received rows [N_i, H], ordered (source, slot) -> outputs, same order."""
            order, counts = _group_by_expert([chunks[i].received])
            if order is None:
                return experts(received, counts)
            return experts(received[order], counts)[torch.argsort(order)]

        params = [p for p in experts.parameters() if p.requires_grad]
        ys = pipelined_exchange(rows, [chunk.steps[0] for chunk in chunks], chunk_experts, params)
        outs = [unpermute(y, chunk.perm, chunk.hi - chunk.lo) for y, chunk in zip(ys, chunks)]
        return self._tp_gather(outs[0] if len(outs) == 1 else torch.cat(outs))

    def _tp_share(self, x: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, Routing]:
        """Under TP-dedup, this TP rank's 1/TP of the tokens x [T, H] -> [T/TP, H] and their routing.
        Forward: split (no communication); backward: all-gather the shares' gradients."""
        if not self.par.dedup_active:
            return x, routing
        group = self.par.tp.group
        share = routing.select(self.par.tp.shard_range(x.shape[0]),
                               combine=scatter_to_sequence(routing.combine, group, dim=0))
        return scatter_to_sequence(x, group, dim=0), share

    def _tp_gather(self, out: torch.Tensor) -> torch.Tensor:
        """Under TP-dedup, [T/TP, H] shares -> [T, H] on every TP rank. Forward: all-gather over TP;
        backward: keep my share's gradient (every TP rank computes the same full gradient)."""
        if not self.par.dedup_active:
            return out
        return gather_from_sequence(out, self.par.tp.group, dim=0, reduce_grad=False)

    def _plan(self, x: torch.Tensor, routing: Routing) -> tuple[list[ChunkPlan], list[torch.Tensor]]:
        """Split x [T, H] into K token chunks (1 without EP), permute each by expert and plan its
        exchange; counts the traffic. Returns the plans and each chunk's rows [N_i, H]."""
        num_tokens, ep = x.shape[0], self.topo.size
        num_chunks = self.par.chunks if ep > 1 else 1  # chunks only serve to overlap the exchange
        size = max(-(-num_tokens // num_chunks), 1)  # ceil: torch.chunk's split
        bounds = [(lo, min(lo + size, num_tokens)) for lo in range(0, max(num_tokens, 1), size)]
        permuted = [permute(x[lo:hi], routing if hi - lo == num_tokens else routing.select(slice(lo, hi)),
                            self.placement) for lo, hi in bounds]
        num_local = self.placement.num_local_experts
        if ep == 1:
            return [ChunkPlan(lo, hi, perm, (), perm.counts.view(1, num_local))
                    for (lo, hi), (_, perm) in zip(bounds, permuted)], [rows for rows, _ in permuted]
        # every[source, chunk, destination, slot]: rows each source sends (one all-gather for all chunks)
        every = all_gather_rows(torch.stack([perm.counts for _, perm in permuted]), self.topo.group)
        every = every.view(ep, len(bounds), ep, num_local)
        blocks = every.sum(-1).tolist()  # [source][chunk][destination]
        counters, row_bytes = self.stats.live_comm, x.shape[-1] * x.element_size()
        chunks = []
        for c, ((lo, hi), (_, perm)) in enumerate(zip(bounds, permuted)):
            steps = exchange_plan([[blocks[src][c][dst] for dst in range(ep)] for src in range(ep)],
                                  self.topo, x.device)
            if counters is not None:
                counters.add_exchange(steps, self.topo, row_bytes)
            chunks.append(ChunkPlan(lo, hi, perm, tuple(steps), every[:, c, self.topo.index, :]))
        return chunks, [rows for rows, _ in permuted]
