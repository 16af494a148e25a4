"""Token dispatch: [TP share] -> permute by expert -> [exchange over EP] -> experts -> [exchange back]
-> unpermute -> [TP gather]. The permutation comes from a routing and an expert placement table, so
the load balancer can move experts by changing the table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from megamoe.moe.exchange import (
    ChunkPipeline,
    CommCounters,
    EPTopology,
    ExchangeStep,
    exchange_plan,
    run_plan,
)
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.router import Routing
from megamoe.parallel.comm import all_gather_rows, gather_from_sequence, scatter_to_sequence
from megamoe.parallel.tensor import TPContext

__all__ = ["ChunkPlan", "CommCounters", "DispatchState", "EPTopology", "ExpertPlacement",
           "MoEParallel", "Permutation", "TokenDispatcher", "permute", "sort_by_expert", "unpermute"]


class TrafficSink(Protocol):
    """Where the dispatcher counts all-to-all traffic (MoEStats): None while recomputing."""

    @property
    def live_comm(self) -> CommCounters | None: ...


@dataclass(frozen=True)
class ExpertPlacement:
    """Logical expert -> (EP rank, local slot). The default is contiguous blocks of E/EP experts."""

    rank_of: tuple[int, ...]
    slot_of: tuple[int, ...]
    ep_size: int
    # order_key per device, built once: a host-to-device copy every forward would block the host
    _order_keys: dict[torch.device, torch.Tensor] = field(default_factory=dict, init=False, repr=False,
                                                          compare=False, hash=False)

    @staticmethod
    def contiguous(num_experts: int, ep_size: int = 1) -> ExpertPlacement:
        num_local = num_experts // ep_size
        return ExpertPlacement.from_ranks([e // num_local for e in range(num_experts)], ep_size)

    @staticmethod
    def from_ranks(rank_of: list[int], ep_size: int) -> ExpertPlacement:
        """A table from each logical expert's EP rank; slots follow expert order on each rank."""
        num_local = len(rank_of) // ep_size
        if sorted(rank_of) != [rank for rank in range(ep_size) for _ in range(num_local)]:
            raise ValueError(f"placement {rank_of} does not give each of {ep_size} EP ranks "
                             f"{num_local} experts")
        slots = [rank_of[:e].count(rank) for e, rank in enumerate(rank_of)]  # earlier experts on its rank
        return ExpertPlacement(rank_of=tuple(rank_of), slot_of=tuple(slots), ep_size=ep_size)

    def moved_to(self, rank_of: Sequence[int]) -> ExpertPlacement:
        """The table with each expert e on EP rank ``rank_of[e]``: an expert that stays on its rank
        keeps its slot (nothing to move), arrivals take the freed slots in expert order."""
        target = ExpertPlacement.from_ranks(list(rank_of), self.ep_size)  # validates the counts
        slot_of = list(self.slot_of)
        for rank in range(self.ep_size):
            stayers = [e for e in range(self.num_experts) if rank_of[e] == rank == self.rank_of[e]]
            free = sorted(set(range(self.num_local_experts)) - {self.slot_of[e] for e in stayers})
            arrivals = [e for e in range(self.num_experts) if rank_of[e] == rank != self.rank_of[e]]
            for e, slot in zip(arrivals, free):
                slot_of[e] = slot
        return ExpertPlacement(rank_of=target.rank_of, slot_of=tuple(slot_of), ep_size=self.ep_size)

    @property
    def num_experts(self) -> int:
        return len(self.rank_of)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def local_experts(self, ep_rank: int) -> list[int]:
        """Global ids held by ``ep_rank``, in slot order."""
        return sorted((e for e in range(self.num_experts) if self.rank_of[e] == ep_rank),
                      key=self.slot_of.__getitem__)

    def order_key(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[E] dispatch position of each logical expert: rank * E_local + slot. Cached per device
        (read-only: callers index it, never write it)."""
        device = torch.device(device)
        if device not in self._order_keys:
            self._order_keys[device] = torch.tensor(
                [rank * self.num_local_experts + slot for rank, slot in zip(self.rank_of, self.slot_of)],
                device=device)
        return self._order_keys[device]


@dataclass(frozen=True)
class Permutation:
    """How the kept (token, choice) assignments were sorted: token_idx [N] source token of each sorted
    row; weight [N] its combine weight; counts [E] rows per expert, in dispatch (placement) order."""

    token_idx: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor


def sort_by_expert(routing: Routing, placement: ExpertPlacement) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (order [T*k]: the flat token-major (token, choice) indices sorted by the dispatch position
    of their expert, stably, dropped ones last; counts [E]: kept assignments per dispatch position).
    On the device, without data-dependent shapes: dropped assignments get the key E instead of being
    masked out, and the number of rows to dispatch (counts.sum()) is left for the host to read once."""
    num_experts = placement.num_experts
    experts = routing.expert_ids.reshape(-1)  # [T*k], token-major
    key = placement.order_key(experts.device)[experts]  # [T*k] dispatch position
    key = key.masked_fill(~routing.keep.reshape(-1), num_experts)  # dropped: sorted last
    order = torch.argsort(key, stable=True)  # stable: token order within an expert
    # scatter_add, not bincount: bincount reads min and max back to the host on CUDA
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return order, counts[:num_experts]


def permute(x: torch.Tensor, routing: Routing, placement: ExpertPlacement,
            sort: tuple[torch.Tensor, torch.Tensor] | None = None, num_rows: int | None = None,
            ) -> tuple[torch.Tensor, Permutation]:
    """x: [T, H] -> rows [N, H] sorted by dispatch position of their expert (N = kept assignments).

    ``sort``: :func:`sort_by_expert` of ``routing``, if already computed; ``num_rows``: N when the
    caller knows it on the host (the dispatcher does); otherwise it is read here (one host sync)."""
    order, counts = sort or sort_by_expert(routing, placement)
    kept = order[:int(counts.sum()) if num_rows is None else num_rows]  # [N] flat (token, choice)
    token_idx = torch.div(kept, routing.expert_ids.shape[1], rounding_mode="floor")  # [N]
    weight = routing.combine.reshape(-1)[kept]  # [N]
    return x[token_idx], Permutation(token_idx=token_idx, weight=weight, counts=counts)


class _Unpermute(torch.autograd.Function):
    """forward: out[t] = sum over the rows n of token t of weight[n] * y[n]; backward: dy[n] =
    weight[n] * g[t(n)], dweight[n] = <g[t(n)], y[n]>, from ONE gather of g (autograd's graph for
    ``index_add_(y * weight)`` gathers g and forms two more [N, H] products)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, weight: torch.Tensor, token_idx: torch.Tensor, num_tokens: int,
                ) -> torch.Tensor:
        ctx.save_for_backward(y, weight, token_idx)
        out = y.new_zeros(num_tokens, y.shape[-1])  # [T, H]
        for lo, hi in _row_blocks(y):  # weighted rows [rows, H] one block at a time; same order of sums
            out.index_add_(0, token_idx[lo:hi], y[lo:hi] * weight[lo:hi].unsqueeze(-1))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        y, weight, token_idx = ctx.saved_tensors
        grad_rows = grad.index_select(0, token_idx)  # [N, H]
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = y.new_empty(y.shape[0])  # [N]
            for lo, hi in _row_blocks(y):
                torch.linalg.vecdot(grad_rows[lo:hi], y[lo:hi], out=d_weight[lo:hi])
        d_y = grad_rows.mul_(weight.unsqueeze(-1)) if ctx.needs_input_grad[0] else None
        return d_y, d_weight, None, None


def _row_blocks(x: torch.Tensor, block_bytes: int = 1 << 20) -> list[tuple[int, int]]:
    """Row ranges of ~1 MiB of ``x`` [N, H]: a temporary of one block comes from the allocator's heap,
    while one of all N rows (>= 32 MiB on the CPU: a fresh mmap) page-faults on first touch. One block
    on other devices (their caching allocators reuse memory; blocks would only add launches)."""
    if x.device.type != "cpu":
        return [(0, x.shape[0])] if x.shape[0] else []
    rows = max(1, block_bytes // max(1, x.shape[-1] * x.element_size()))
    return [(lo, min(lo + rows, x.shape[0])) for lo in range(0, x.shape[0], rows)]


def unpermute(y: torch.Tensor, perm: Permutation, num_tokens: int) -> torch.Tensor:
    """y: [N, H] expert outputs in permuted order -> [T, H], sum_k combine_k * expert_k(x)."""
    return _Unpermute.apply(y, perm.weight.to(y.dtype), perm.token_idx, num_tokens)


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
    """One chunk of the dispatched tokens, rows ``lo:hi`` of the (TP-shared) input: perm, how they were
    sorted by expert; steps, their exchange plan; received [EP, E_local], the rows this rank's experts
    get from each source EP rank per local slot, on the device (received_sizes: on the host)."""

    lo: int
    hi: int
    perm: Permutation
    steps: tuple[ExchangeStep, ...]
    received: torch.Tensor
    received_sizes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class DispatchState:
    """What :meth:`TokenDispatcher.combine` needs to undo a dispatch: chunks, the per-chunk plans in
    token order; expert_order [N_local], for each expert-grouped row its row among the received ones
    (ordered chunk, source, slot), None when they coincide; expert_sizes, rows per local expert on
    the host (what a per-expert GEMM loop needs)."""

    chunks: tuple[ChunkPlan, ...]
    expert_order: torch.Tensor | None
    expert_sizes: list[int]


def _host_counts(counts: torch.Tensor) -> list:
    """THE device-to-host copy (host sync) of an MoE layer forward: every EP rank's per-chunk, per-expert
    row counts, for the all-to-all split sizes and the row counts that size everything after routing."""
    return counts.tolist()


def _group_by_expert(chunks: Sequence[ChunkPlan], received: list[torch.Tensor],
                     ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
    """The rows received for ``chunks`` ([N_i, H] each, ordered source, slot) -> (rows [N_local, H]
    grouped by local expert, counts [E_local], state). No host sync: the sizes are on the host."""
    per_source = torch.stack([chunk.received for chunk in chunks])  # [chunks, EP, E_local]
    counts = per_source.sum((0, 1))  # [E_local]
    rows_per_slot = [row for chunk in chunks for row in chunk.received_sizes]  # [chunks*EP][E_local]
    sizes = [sum(column) for column in zip(*rows_per_slot)]
    rows = received[0] if len(received) == 1 else torch.cat(received)
    order = None
    if len(rows_per_slot) > 1:  # more than one chunk or source: the slots interleave
        slots = torch.arange(per_source.shape[-1], device=counts.device).repeat(len(rows_per_slot))
        slot_of_row = slots.repeat_interleave(per_source.reshape(-1),
                                              output_size=sum(sizes))  # [N_local]; size given: no sync
        order = torch.argsort(slot_of_row, stable=True)
        rows = rows[order]
    return rows, counts, DispatchState(chunks=tuple(chunks), expert_order=order, expert_sizes=sizes)


def _ungroup(y: torch.Tensor, state: DispatchState) -> torch.Tensor:
    """Expert outputs [N_local, H] in grouped order -> the received order (chunk, source, slot)."""
    return y if state.expert_order is None else y[torch.argsort(state.expert_order)]


def _run_experts(experts: nn.Module, rows: torch.Tensor, counts: torch.Tensor, state: DispatchState,
                 ) -> torch.Tensor:
    """experts(rows, counts), plus the host sizes for GroupedExperts (its per-expert GEMM loop would
    otherwise read ``counts`` back, a host sync)."""
    if isinstance(experts, GroupedExperts):
        return experts(rows, counts, state.expert_sizes)
    return experts(rows, counts)


class TokenDispatcher:
    """dispatch -> experts -> combine for one MoE layer, behind which:

    - TP-dedup (TP > 1 without SP, ``tp_dedup``): TP ranks hold identical tokens, so each dispatches
      only its 1/TP share and combine all-gathers the shares;
    - permute by expert, then (EP > 1) the flat or hierarchical all-to-all plan out and back;
    - ``chunks`` K > 1 (with EP): the tokens go in K chunks, each with its own exchange.

    ``pipeline(x, routing, experts)`` runs all three; when ``pipelined`` (K > 1, flat EP exchange)
    chunk i's experts run while chunk i+1's rows are in flight (:class:`~megamoe.moe.exchange.ChunkPipeline`);
    dispatch / combine exchange the chunks one after the other (same rows and traffic).
    All-to-all traffic is counted once per forward, when planned, into ``stats.live_comm``.
    """

    def __init__(self, placement: ExpertPlacement, par: MoEParallel, stats: TrafficSink) -> None:
        self.placement, self.par, self.stats = placement, par, stats
        self.topo = par.ep

    @property
    def pipelined(self) -> bool:
        return self.par.chunks > 1 and self.topo.size > 1 and not self.topo.hierarchical

    def dispatch(self, x: torch.Tensor, routing: Routing,
                 ) -> tuple[torch.Tensor, torch.Tensor, DispatchState]:
        """x [T, H], routing of its T tokens -> (rows [N_local, H] grouped by local expert,
        counts [E_local], state). Forward: all-to-all(s) out; backward: the mirrored all-to-all(s)."""
        chunks, rows = self._plan(x, routing)
        return _group_by_expert(chunks, [run_plan(r, chunk.steps) for r, chunk in zip(rows, chunks)])

    def combine(self, y: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Expert outputs y [N_local, H] (dispatch's row order) -> layer output [T, H].
        Forward: all-to-all(s) back (+ TP all-gather); backward: the mirrored collectives."""
        y = _ungroup(y, state)
        if len(state.chunks) > 1:  # a split of one piece would cost a full copy (cat) in backward
            sizes = [sum(map(sum, chunk.received_sizes)) for chunk in state.chunks]
            ys = y.split(sizes)
        else:
            ys = (y,)
        return self._unpermute([run_plan(y_chunk, chunk.steps, reverse=True)
                                for y_chunk, chunk in zip(ys, state.chunks)], state.chunks)

    def pipeline(self, x: torch.Tensor, routing: Routing, experts: nn.Module) -> torch.Tensor:
        """dispatch -> experts -> combine, the K chunks pipelined when ``pipelined``. x [T, H] -> [T, H];
        experts(rows [N, H] grouped by local expert, counts [E_local]) -> [N, H]."""
        if not self.pipelined:
            rows, counts, state = self.dispatch(x, routing)
            return self.combine(_run_experts(experts, rows, counts, state), state)
        chunks, rows = self._plan(x, routing)

        def chunk_experts(i: int, received: torch.Tensor) -> torch.Tensor:  # [N_i, H] (source, slot)
            grouped, counts, state = _group_by_expert([chunks[i]], [received])
            return _ungroup(_run_experts(experts, grouped, counts, state), state)

        params = [p for p in experts.parameters() if p.requires_grad]
        ys = ChunkPipeline.apply(chunk_experts, [c.steps[0] for c in chunks], len(rows), *rows, *params)
        return self._unpermute(ys, chunks)

    def _unpermute(self, ys: Sequence[torch.Tensor], chunks: Sequence[ChunkPlan]) -> torch.Tensor:
        """Each chunk's outputs back at their source [N_i, H] -> [T, H]; under TP-dedup, all-gather
        the shares (forward: all-gather over TP; backward: keep my share's gradient, as every TP rank
        computes the same full gradient)."""
        outs = [unpermute(y, chunk.perm, chunk.hi - chunk.lo) for y, chunk in zip(ys, chunks)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # [T/TP or T, H]
        dedup = self.par.dedup_active
        return gather_from_sequence(out, self.par.tp.group, dim=0, reduce_grad=False) if dedup else out

    def _plan(self, x: torch.Tensor, routing: Routing) -> tuple[list[ChunkPlan], list[torch.Tensor]]:
        """This rank's x [T, H] (under TP-dedup its 1/TP share: forward split, backward all-gather) in
        K token chunks (1 without EP), each permuted by expert, its exchange planned and its traffic
        counted -> the plans and each chunk's rows [N_i, H]. One host sync for all chunks: every
        chunk's per-expert counts are all-gathered over EP on the device and copied at once."""
        if self.par.dedup_active:
            group = self.par.tp.group
            routing = routing.select(self.par.tp.shard_range(x.shape[0]),
                                     combine=scatter_to_sequence(routing.combine, group, dim=0))
            x = scatter_to_sequence(x, group, dim=0)
        num_tokens, ep, me = x.shape[0], self.topo.size, self.topo.index
        num_chunks = self.par.chunks if ep > 1 else 1  # chunks only serve to overlap the exchange
        size = max(-(-num_tokens // num_chunks), 1)  # ceil: torch.chunk's split
        bounds = [(lo, min(lo + size, num_tokens)) for lo in range(0, max(num_tokens, 1), size)]
        # one chunk: no slicing (a slice's backward writes its gradient into a fresh zero tensor)
        whole = len(bounds) == 1
        routings = [routing if whole else routing.select(slice(lo, hi)) for lo, hi in bounds]
        sorts = [sort_by_expert(r, self.placement) for r in routings]
        # sent[source, chunk, destination, slot]: rows each EP rank sends (one all-gather, one copy)
        sent = all_gather_rows(torch.stack([counts for _, counts in sorts]), self.topo.group).view(
            ep, len(bounds), ep, self.placement.num_local_experts)  # dispatch position = (rank, slot)
        host = _host_counts(sent)  # [EP][K][EP][E_local]
        counters, row_bytes = self.stats.live_comm, x.shape[-1] * x.element_size()
        chunks, rows = [], []
        for c, ((lo, hi), r, s) in enumerate(zip(bounds, routings, sorts)):
            chunk_x = x if whole else x[lo:hi]
            chunk_rows, perm = permute(chunk_x, r, self.placement, s, sum(map(sum, host[me][c])))
            steps = exchange_plan([[sum(host[src][c][dst]) for dst in range(ep)] for src in range(ep)],
                                  self.topo, x.device)
            if counters is not None:
                counters.add_exchange(steps, self.topo, row_bytes)
            chunks.append(ChunkPlan(lo, hi, perm, tuple(steps), received=sent[:, c, me],
                                    received_sizes=tuple(tuple(host[src][c][me]) for src in range(ep))))
            rows.append(chunk_rows)
        return chunks, rows
