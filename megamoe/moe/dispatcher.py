"""Token dispatch: [TP share] -> permute by expert -> [exchange over EP] -> experts -> [exchange back]
-> unpermute -> [TP gather].

The permutation is computed from a routing and an expert placement table, so expert parallelism
only adds the exchange (an all-to-all plan over the EP group, :mod:`megamoe.moe.exchange`) between
permute and the experts, and the load balancer can move experts by changing the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

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
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.router import Routing
from megamoe.parallel.comm import all_gather_rows, gather_from_sequence, scatter_to_sequence
from megamoe.parallel.tensor import TPContext

__all__ = ["ChunkPlan", "CommCounters", "DispatchState", "EPTopology", "ExpertPlacement", "ExpertSort",
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

    def order_key(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[E] sort key of each logical expert: (rank, slot) flattened, i.e. its dispatch position.
        Cached per device (read-only: callers index it, never write it)."""
        device = torch.device(device)
        key = self._order_keys.get(device)
        if key is None:
            key = torch.tensor([self.rank_of[e] * self.num_local_experts + self.slot_of[e]
                                for e in range(self.num_experts)], device=device)
            self._order_keys[device] = key
        return key


@dataclass(frozen=True)
class Permutation:
    """How the kept (token, choice) assignments were sorted.

    token_idx: [N] source token of each sorted row; weight: [N] its combine weight;
    counts: [E] rows per logical expert, in dispatch (placement) order.
    """

    token_idx: torch.Tensor
    weight: torch.Tensor
    counts: torch.Tensor


@dataclass(frozen=True)
class ExpertSort:
    """The device half of a permutation, computed without any host sync.

    order: [T*k] the (token, choice) assignments (flat token-major index) sorted by the dispatch
    position of their expert, stably (token order within an expert), the dropped ones last;
    counts: [E] kept assignments per dispatch position. The first ``counts.sum()`` entries of
    ``order`` are the rows to dispatch; that number is only needed on the host once per layer.
    """

    order: torch.Tensor
    counts: torch.Tensor


def sort_by_expert(routing: Routing, placement: ExpertPlacement) -> ExpertSort:
    """Sort a routing's assignments by dispatch position, on the device (no data-dependent shapes:
    dropped assignments get the key E, after every expert, instead of being masked out)."""
    num_experts = placement.num_experts
    experts = routing.expert_ids.reshape(-1)  # [T*k], token-major
    key = placement.order_key(experts.device)[experts]  # [T*k] dispatch position
    key = key.masked_fill(~routing.keep.reshape(-1), num_experts)  # dropped: sorted last
    order = torch.argsort(key, stable=True)  # stable: token order within an expert
    # scatter_add, not bincount: bincount reads min and max back to the host on CUDA
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=key.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return ExpertSort(order=order, counts=counts[:num_experts])


def permute(x: torch.Tensor, routing: Routing, placement: ExpertPlacement,
            sort: ExpertSort | None = None, num_rows: int | None = None,
            ) -> tuple[torch.Tensor, Permutation]:
    """x: [T, H] -> rows [N, H] sorted by dispatch position of their expert (N = kept assignments).

    ``sort``: :func:`sort_by_expert` of ``routing``, if already computed; ``num_rows``: N when the
    caller knows it on the host (the dispatcher does); otherwise it is read from the device here
    (one host sync)."""
    sort = sort or sort_by_expert(routing, placement)
    if num_rows is None:
        num_rows = int(sort.counts.sum())
    kept = sort.order[:num_rows]  # [N] flat (token, choice) index, grouped by expert
    token_idx = torch.div(kept, routing.expert_ids.shape[1], rounding_mode="floor")  # [N]
    weight = routing.combine.reshape(-1)[kept]  # [N]
    return x[token_idx], Permutation(token_idx=token_idx, weight=weight, counts=sort.counts)


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
    received: [EP, E_local] rows this rank's experts get from each source EP rank, per local slot
    (on the device); received_sizes: the same numbers on the host.
    """

    lo: int
    hi: int
    perm: Permutation
    steps: tuple[ExchangeStep, ...]
    received: torch.Tensor
    received_sizes: tuple[tuple[int, ...], ...]

    @property
    def num_received(self) -> int:
        """Rows this rank's experts get from the chunk (known on the host)."""
        return sum(map(sum, self.received_sizes))


@dataclass(frozen=True)
class DispatchState:
    """What :meth:`TokenDispatcher.combine` needs to undo a dispatch.

    chunks: the per-chunk plans, in token order (their token ranges cover this rank's tokens, or its
    1/TP share under TP-dedup); expert_order: [N_local] for each position of the expert-grouped
    rows, its row among the received ones (ordered chunk, source, slot); None when they coincide;
    expert_sizes: rows per local expert, on the host (what a per-expert GEMM loop needs).
    """

    chunks: tuple[ChunkPlan, ...]
    expert_order: torch.Tensor | None
    expert_sizes: list[int]


def _host_counts(counts: torch.Tensor) -> list:
    """THE device-to-host copy of an MoE layer forward (one host sync): every chunk's per-expert row
    counts of every EP rank at once, [EP, chunks, E] -> nested lists. The host needs them for the
    all-to-all split sizes and for the row counts that size everything after the routing."""
    return counts.tolist()


def _group_by_expert(chunks: list[ChunkPlan]) -> tuple[torch.Tensor | None, torch.Tensor, list[int]]:
    """Rows received from ``chunks`` (ordered chunk, source, slot) -> the order that groups them by
    local expert ([N_local], None if already grouped), counts [E_local] on the device and on the host.
    No host sync: the number of rows is known on the host."""
    received = [chunk.received for chunk in chunks]  # [EP, E_local] each
    counts = torch.stack(received).sum((0, 1))  # [E_local]
    rows_per_slot = [row for chunk in chunks for row in chunk.received_sizes]  # [chunks*EP][E_local]
    sizes = [sum(column) for column in zip(*rows_per_slot)]
    if len(rows_per_slot) == 1:  # one chunk from one source: already in slot order
        return None, counts, sizes
    num_sources, num_local = received[0].shape
    slots = torch.arange(num_local, device=counts.device).repeat(num_sources * len(received))
    slot_of_row = slots.repeat_interleave(torch.cat(received).reshape(-1),
                                          output_size=sum(sizes))  # [N_local]; size given: no sync
    return torch.argsort(slot_of_row, stable=True), counts, sizes


def _run_experts(experts: nn.Module, rows: torch.Tensor, counts: torch.Tensor, sizes: list[int],
                 ) -> torch.Tensor:
    """experts(rows, counts); GroupedExperts also gets the host sizes (its per-expert GEMM loop would
    otherwise read ``counts`` back, a host sync). Other modules keep the two-argument contract."""
    if isinstance(experts, GroupedExperts):
        return experts(rows, counts, sizes)
    return experts(rows, counts)


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
        chunks, rows = self._plan(*self._tp_share(x, routing))
        received = [run_plan(chunk_rows, list(chunk.steps)) for chunk_rows, chunk in zip(rows, chunks)]
        order, counts, sizes = _group_by_expert(chunks)
        received_rows = received[0] if len(received) == 1 else torch.cat(received)  # [N_local, H]
        state = DispatchState(chunks=tuple(chunks), expert_order=order, expert_sizes=sizes)
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
            return self.combine(_run_experts(experts, rows, counts, state.expert_sizes), state)
        chunks, rows = self._plan(*self._tp_share(x, routing))

        def chunk_experts(i: int, received: torch.Tensor) -> torch.Tensor:
            """Chunk i's received rows [N_i, H], ordered (source, slot) -> outputs, same order."""
            order, counts, sizes = _group_by_expert([chunks[i]])
            if order is None:
                return _run_experts(experts, received, counts, sizes)
            return _run_experts(experts, received[order], counts, sizes)[torch.argsort(order)]

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
        exchange; counts the traffic. Returns the plans and each chunk's rows [N_i, H].

        One host sync for all chunks: every chunk is sorted on the device, their per-expert counts
        are all-gathered over EP on the device, and :func:`_host_counts` copies the lot to the host."""
        num_tokens, ep, me = x.shape[0], self.topo.size, self.topo.index
        num_chunks = self.par.chunks if ep > 1 else 1  # chunks only serve to overlap the exchange
        size = max(-(-num_tokens // num_chunks), 1)  # ceil: torch.chunk's split
        bounds = [(lo, min(lo + size, num_tokens)) for lo in range(0, max(num_tokens, 1), size)]
        routings = [routing if hi - lo == num_tokens else routing.select(slice(lo, hi)) for lo, hi in bounds]
        sorts = [sort_by_expert(r, self.placement) for r in routings]
        # every[source, chunk, dispatch position]: rows each EP rank sends (one all-gather, one copy)
        every = all_gather_rows(torch.stack([s.counts for s in sorts]), self.topo.group)  # [EP, K, E]
        host = _host_counts(every)  # [EP][K][E]
        num_local = self.placement.num_local_experts

        def to_rank(src: int, c: int, dst: int) -> list[int]:
            """Rows ``src`` sends to EP rank ``dst`` in chunk c, per slot of ``dst`` (host)."""
            return host[src][c][dst * num_local:(dst + 1) * num_local]

        counters, row_bytes = self.stats.live_comm, x.shape[-1] * x.element_size()
        chunks, rows = [], []
        for c, ((lo, hi), r, s) in enumerate(zip(bounds, routings, sorts)):
            chunk_rows, perm = permute(x[lo:hi], r, self.placement, s, sum(host[me][c]))
            steps: list[ExchangeStep] = []
            if ep > 1:
                steps = exchange_plan([[sum(to_rank(src, c, dst)) for dst in range(ep)]
                                       for src in range(ep)], self.topo, x.device)
                if counters is not None:
                    counters.add_exchange(steps, self.topo, row_bytes)
            received = every[:, c, me * num_local:(me + 1) * num_local]  # [EP, E_local]
            chunks.append(ChunkPlan(lo, hi, perm, tuple(steps), received,
                                    tuple(tuple(to_rank(src, c, me)) for src in range(ep))))
            rows.append(chunk_rows)
        return chunks, rows
