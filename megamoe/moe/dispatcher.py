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

    @staticmethod
    def from_ranks(rank_of: list[int], ep_size: int) -> ExpertPlacement:
        """A table from each logical expert's EP rank; slots follow expert order on each rank."""
        per = len(rank_of) // ep_size
        slots, seen = [], [0] * ep_size
        for r in rank_of:
            slots.append(seen[r])
            seen[r] += 1
        if seen != [per] * ep_size:
            raise ValueError(f"placement {rank_of} does not give each of {ep_size} EP ranks {per} experts")
        return ExpertPlacement(rank_of=tuple(rank_of), slot_of=tuple(slots), ep_size=ep_size)

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


# ----------------------------------------------------------------------------------------------
# Expert-parallel exchange
# ----------------------------------------------------------------------------------------------


@dataclass
class CommCounters:
    """Bytes and messages this rank SENT in all-to-alls (dispatch + combine, forward only; backward
    mirrors them, and activation recomputation repeats the forward's without counting it again),
    split by whether the peer is on this rank's node."""

    bytes_intra: int = 0
    bytes_inter: int = 0
    msgs_intra: int = 0
    msgs_inter: int = 0

    def add(self, splits: list[int], peers: list[int], me: int, node_of, row_bytes: int) -> None:
        for rows, peer in zip(splits, peers):
            if rows == 0 or peer == me:
                continue
            if node_of(peer) == node_of(me):
                self.bytes_intra += rows * row_bytes
                self.msgs_intra += 1
            else:
                self.bytes_inter += rows * row_bytes
                self.msgs_inter += 1

    def as_dict(self) -> dict[str, int]:
        return dict(a2a_bytes_intra=self.bytes_intra, a2a_bytes_inter=self.bytes_inter,
                    a2a_msgs_intra=self.msgs_intra, a2a_msgs_inter=self.msgs_inter)


@dataclass(frozen=True)
class EPTopology:
    """This rank's expert-parallel group and, for hierarchical all-to-all, its node split.

    members: global ranks of the EP group (EP index order); intra/inter: groups (and members) of the
    EP ranks on this node / at this node position on every node.
    """

    group: object | None
    members: tuple[int, ...]
    rank: int  # global rank
    intra: object | None = None
    intra_members: tuple[int, ...] = ()
    inter: object | None = None
    inter_members: tuple[int, ...] = ()
    ranks_per_node: int = 0
    hierarchical: bool = False

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def index(self) -> int:
        return self.members.index(self.rank)

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node if self.ranks_per_node else 0

    @staticmethod
    def single() -> EPTopology:
        return EPTopology(group=None, members=(0,), rank=0)

    @staticmethod
    def from_mesh(mesh, hierarchical: bool) -> EPTopology:  # mesh: ParallelMesh
        return EPTopology(group=mesh.groups.get("ep"), members=tuple(mesh.members["ep"]),
                          rank=mesh.rank, intra=mesh.groups.get("ep_intra"),
                          intra_members=tuple(mesh.members["ep_intra"]),
                          inter=mesh.groups.get("ep_inter"),
                          inter_members=tuple(mesh.members["ep_inter"]),
                          ranks_per_node=mesh.ranks_per_node,
                          hierarchical=hierarchical and len(mesh.members["ep_inter"]) > 1)


@dataclass(frozen=True)
class _Step:
    """One exchange step: reorder rows (perm, None = keep), then all-to-all with these splits."""

    perm: torch.Tensor | None
    group: object | None
    peers: tuple[int, ...]
    in_splits: list[int]
    out_splits: list[int]


def _block_perm(sizes: list[int], order: list[int]) -> torch.Tensor:
    """Row index that lays out contiguous blocks (of ``sizes``, in their current order) in ``order``."""
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    parts = [torch.arange(offsets[b], offsets[b + 1]) for b in order]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def exchange_plan(blocks: torch.Tensor, topo: EPTopology) -> list[_Step]:
    """Steps that deliver, for every (src, dst) pair in the EP group, src's rows for dst.

    blocks: [ep, ep] rows src sends dst (indices in EP order). Rows leave sorted by dst and arrive
    ordered by src, whichever plan is used:
      flat         one all-to-all over the EP group;
      hierarchical (N nodes x L ranks) intra-node all-to-all to the peer at the destination's node
                   position, then an inter-node all-to-all among same-position ranks: each rank sends
                   N-1 inter-node messages, each aggregating its node's L sources.
    """
    b = blocks.tolist()
    me, ep = topo.index, topo.size
    if not topo.hierarchical:
        return [_Step(None, topo.group, topo.members, [b[me][d] for d in range(ep)],
                      [b[s][me] for s in range(ep)])]
    n_nodes = len(topo.inter_members)
    per = ep // n_nodes
    node, pos = divmod(me, per)  # EP indices are node-major: (node, position)

    def idx(n: int, j: int) -> int:
        return n * per + j

    # Step 1 (intra-node): my blocks (ordered by dst) regrouped by dst position j, then dst node n.
    order1 = [idx(n, j) for j in range(per) for n in range(n_nodes)]
    step1 = _Step(_block_perm([b[me][d] for d in range(ep)], order1), topo.intra, topo.intra_members,
                  [sum(b[me][idx(n, j)] for n in range(n_nodes)) for j in range(per)],
                  [sum(b[idx(node, s)][idx(n, pos)] for n in range(n_nodes)) for s in range(per)])
    # Received: for each local source s, blocks (src=(node, s), dst=(n, pos)) for n. Step 2 (inter):
    # regroup by destination node n, then source s.
    sizes2 = [b[idx(node, s)][idx(n, pos)] for s in range(per) for n in range(n_nodes)]
    order2 = [s * n_nodes + n for n in range(n_nodes) for s in range(per)]
    step2 = _Step(_block_perm(sizes2, order2), topo.inter, topo.inter_members,
                  [sum(b[idx(node, s)][idx(n, pos)] for s in range(per)) for n in range(n_nodes)],
                  [sum(b[idx(m, s)][me] for s in range(per)) for m in range(n_nodes)])
    return [step1, step2]


def run_plan(x: torch.Tensor, plan: list[_Step], reverse: bool, counters: CommCounters | None,
             topo: EPTopology) -> torch.Tensor:
    """Dispatch (reverse=False) or combine (reverse=True: steps undone in reverse order)."""
    from megamoe.parallel.comm import all_to_all

    row_bytes = x.shape[-1] * x.element_size()
    for step in (reversed(plan) if reverse else plan):
        send, recv = (step.out_splits, step.in_splits) if reverse else (step.in_splits, step.out_splits)
        if not reverse and step.perm is not None:
            x = x[step.perm.to(x.device)]
        if counters is not None:
            counters.add(send, list(step.peers), topo.rank, topo.node_of, row_bytes)
        x = all_to_all(x, recv, send, step.group)
        if reverse and step.perm is not None:
            inv = torch.empty_like(step.perm)
            inv[step.perm] = torch.arange(len(step.perm))
            x = x[inv.to(x.device)]
    return x


class _OverlappedExchange(torch.autograd.Function):
    """K chunks through (all-to-all -> experts -> all-to-all back), pipelined: every dispatch is
    started at once, and while chunk i's experts run, chunk i+1's rows are in flight and chunk i-1's
    results travel back. Backward runs the same pipeline on gradients, calling autograd on each
    chunk's saved expert graph (which also accumulates the expert weight gradients).

    inputs: rows of each chunk ([N_i, H], sorted by destination); steps: each chunk's flat plan step;
    expert_fn(i, received rows of chunk i) -> outputs for them.
    """

    @staticmethod
    def forward(ctx, expert_fn, steps: list[_Step], *rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from megamoe.parallel.comm import all_to_all_async

        inflight = [all_to_all_async(r, s.out_splits, s.in_splits, s.group) for r, s in zip(rows, steps)]
        track = any(ctx.needs_input_grad[2:])  # training: keep each chunk's expert graph
        leaves, outs, back = [], [], []
        for i, ((recv, work), step) in enumerate(zip(inflight, steps)):
            work.wait()
            leaf = recv.detach().requires_grad_(track)
            with torch.set_grad_enabled(track):
                y = expert_fn(i, leaf)
            leaves.append(leaf)
            outs.append(y)
            back.append(all_to_all_async(y.detach(), step.in_splits, step.out_splits, step.group))
        for _, work in back:
            work.wait()
        ctx.steps, ctx.leaves, ctx.outs = steps, leaves, outs
        return tuple(buf for buf, _ in back)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        from megamoe.parallel.comm import all_to_all_async

        steps = ctx.steps
        inflight = [all_to_all_async(g, s.out_splits, s.in_splits, s.group) for g, s in zip(grads, steps)]
        back = []
        for (grad_y, work), leaf, y, step in zip(inflight, ctx.leaves, ctx.outs, steps):
            work.wait()
            torch.autograd.backward(y, grad_y)
            back.append(all_to_all_async(leaf.grad, step.in_splits, step.out_splits, step.group))
        for _, work in back:
            work.wait()
        ctx.leaves = ctx.outs = None
        return (None, None, *(buf for buf, _ in back))


def overlapped_exchange(expert_fn, steps: list[_Step], rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run :class:`_OverlappedExchange`; rows/steps per chunk, returns each chunk's combined rows."""
    return list(_OverlappedExchange.apply(expert_fn, steps, *rows))
