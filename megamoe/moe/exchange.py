"""Expert-parallel exchange: all-to-all plans (flat or hierarchical), their traffic counters, and the
K-chunk pipeline that overlaps the exchange with the experts (the dispatcher drives them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch

from megamoe.parallel.comm import all_to_all, all_to_all_async


@dataclass(frozen=True)
class EPTopology:
    """This rank's expert-parallel group (members: global ranks, in EP index order) and, for the
    hierarchical all-to-all, the groups (and members) of the EP ranks on this node (intra) and at
    this node position on every node (inter)."""

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
        groups, members = mesh.groups, mesh.members
        return EPTopology(group=groups.get("ep"), members=tuple(members["ep"]), rank=mesh.rank,
                          intra=groups.get("ep_intra"), intra_members=tuple(members["ep_intra"]),
                          inter=groups.get("ep_inter"), inter_members=tuple(members["ep_inter"]),
                          ranks_per_node=mesh.ranks_per_node,
                          hierarchical=hierarchical and len(members["ep_inter"]) > 1)


@dataclass(frozen=True)
class ExchangeStep:
    """One all-to-all of a plan: reorder the rows (``perm`` [N] row index, None = keep), then send
    ``send_splits[j]`` rows to ``peers[j]`` and receive ``recv_splits[j]`` rows from it."""

    perm: torch.Tensor | None
    group: object | None
    peers: tuple[int, ...]
    send_splits: list[int]
    recv_splits: list[int]


@dataclass
class CommCounters:
    """Bytes and messages this rank SENT in all-to-alls (dispatch + combine, forward only; backward
    mirrors them, and activation recomputation repeats the forward's without counting it again),
    split by whether the peer is on this rank's node."""

    bytes_intra: int = 0
    bytes_inter: int = 0
    msgs_intra: int = 0
    msgs_inter: int = 0

    def add_exchange(self, plan: list[ExchangeStep], topo: EPTopology, row_bytes: int) -> None:
        """Count one dispatch over ``plan`` and its combine (which sends back, step by step, the rows
        the dispatch received). The only place all-to-all traffic is counted."""
        me = topo.node_of(topo.rank)
        for step in plan:
            for splits in (step.send_splits, step.recv_splits):  # dispatch sends, combine sends back
                for rows, peer in zip(splits, step.peers):
                    if rows == 0 or peer == topo.rank:  # nothing sent, or sent to itself
                        continue
                    if topo.node_of(peer) == me:
                        self.bytes_intra += rows * row_bytes
                        self.msgs_intra += 1
                    else:
                        self.bytes_inter += rows * row_bytes
                        self.msgs_inter += 1

    def as_dict(self) -> dict[str, int]:
        return dict(a2a_bytes_intra=self.bytes_intra, a2a_bytes_inter=self.bytes_inter,
                    a2a_msgs_intra=self.msgs_intra, a2a_msgs_inter=self.msgs_inter)


def _reorder_blocks(sizes: list[int], order: list[int], device: torch.device) -> torch.Tensor:
    """Row index that lays out contiguous blocks (of ``sizes``, in their current order) in ``order``."""
    offsets = [0, *accumulate(sizes)]
    # built on the device from host-known bounds: a host-built index copied over would block the host
    return torch.cat([torch.arange(offsets[block], offsets[block + 1], device=device) for block in order])


def exchange_plan(blocks: list[list[int]], topo: EPTopology, device: torch.device,
                  ) -> list[ExchangeStep]:
    """Steps that deliver blocks[source][destination] rows (EP indices) from every source to every
    destination. Rows leave sorted by destination and arrive ordered by source, whichever plan is used:
      flat         one all-to-all over the EP group;
      hierarchical (N nodes x L ranks) intra-node all-to-all to the peer at the destination's node
                   position, then an inter-node all-to-all among same-position ranks: each rank sends
                   N-1 inter-node messages, each aggregating its node's L sources.
    """
    me, ep = topo.index, topo.size
    if not topo.hierarchical:
        return [ExchangeStep(None, topo.group, topo.members, [blocks[me][dst] for dst in range(ep)],
                             [blocks[src][me] for src in range(ep)])]
    num_nodes = len(topo.inter_members)
    per_node = ep // num_nodes
    my_node, my_pos = divmod(me, per_node)  # EP indices are node-major: (node, position)
    nodes, positions = range(num_nodes), range(per_node)

    def ep_index(node: int, pos: int) -> int:
        return node * per_node + pos

    def relayed(src_pos: int, node: int) -> int:
        """Rows from (my node, src_pos) for (node, my position): they pass through me."""
        return blocks[ep_index(my_node, src_pos)][ep_index(node, my_pos)]

    # Step 1 (intra-node): my blocks (ordered by destination) regrouped by destination position,
    # then destination node; peer `pos` on my node receives everything bound for position `pos`.
    step1 = ExchangeStep(
        _reorder_blocks(blocks[me], [ep_index(node, pos) for pos in positions for node in nodes], device),
        topo.intra, topo.intra_members,
        [sum(blocks[me][ep_index(node, pos)] for node in nodes) for pos in positions],
        [sum(relayed(src_pos, node) for node in nodes) for src_pos in positions])
    # Received: for each source position s on my node, its blocks for (node n, my position), n in
    # order. Step 2 (inter-node): regroup them by destination node n, then source position s.
    step2 = ExchangeStep(
        _reorder_blocks([relayed(src_pos, node) for src_pos in positions for node in nodes],
                        [src_pos * num_nodes + node for node in nodes for src_pos in positions], device),
        topo.inter, topo.inter_members,
        [sum(relayed(src_pos, node) for src_pos in positions) for node in nodes],
        [sum(blocks[ep_index(node, src_pos)][me] for src_pos in positions) for node in nodes])
    return [step1, step2]


def run_plan(rows: torch.Tensor, plan: Sequence[ExchangeStep], reverse: bool = False) -> torch.Tensor:
    """Dispatch (rows [N, H] sorted by destination -> [N_recv, H] ordered by source) or, with
    ``reverse``, combine (the steps undone in reverse order: rows go back where they came from).
    forward: one all-to-all per step; backward: the same all-to-alls with the splits swapped."""
    for step in (reversed(plan) if reverse else plan):
        if reverse:
            rows = all_to_all(rows, step.send_splits, step.recv_splits, step.group)
            if step.perm is not None:
                rows = rows[torch.argsort(step.perm)]  # undo the reorder
        else:
            if step.perm is not None:
                rows = rows[step.perm]
            rows = all_to_all(rows, step.recv_splits, step.send_splits, step.group)
    return rows


class ChunkPipeline(torch.autograd.Function):
    """K chunks through (all-to-all -> experts -> all-to-all back), pipelined.

    forward: every chunk's dispatch all-to-all starts at once; as chunk i arrives its experts run
    while chunks i+1.. are still in flight, and its outputs start back at once.
    backward: the same pipeline on gradients: every chunk's output gradient starts back at once, and
    as chunk i's arrives, its saved expert graph is differentiated while the others travel.

    The expert parameters are inputs of this function: backward takes each chunk's parameter
    gradients with ``torch.autograd.grad`` (which does not accumulate), sums them over chunks and
    returns them, so autograd accumulates each parameter's gradient -- and fires its post-accumulate
    hook -- exactly once per backward, as the gradient-reduction buckets expect.

    apply(experts, steps, num_chunks, *rows, *params): experts(i, received rows of chunk i) -> their
    outputs; steps: each chunk's flat exchange step; rows: each chunk's [N_i, H], sorted by
    destination; params: the tensors ``experts`` trains. -> each chunk's outputs back at the source.
    """

    @staticmethod
    def forward(ctx, experts: Callable[[int, torch.Tensor], torch.Tensor], steps: list[ExchangeStep],
                num_chunks: int, *rows_and_params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows, params = rows_and_params[:num_chunks], rows_and_params[num_chunks:]
        inflight = [all_to_all_async(chunk, step.recv_splits, step.send_splits, step.group)
                    for chunk, step in zip(rows, steps)]
        track = any(ctx.needs_input_grad[3:])  # training: keep each chunk's expert graph
        received, outputs, back = [], [], []
        for i, ((recv, work), step) in enumerate(zip(inflight, steps)):
            work.wait()
            recv = recv.detach().requires_grad_(track)  # [N_recv_i, H], ordered by source
            with torch.set_grad_enabled(track):
                y = experts(i, recv)  # [N_recv_i, H]
            received.append(recv)
            outputs.append(y)
            back.append(all_to_all_async(y.detach(), step.send_splits, step.recv_splits, step.group))
        for _, work in back:
            work.wait()
        ctx.steps, ctx.received, ctx.outputs, ctx.params = steps, received, outputs, params
        return tuple(buf for buf, _ in back)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        steps, params = ctx.steps, ctx.params
        inflight = [all_to_all_async(grad, step.recv_splits, step.send_splits, step.group)
                    for grad, step in zip(grads, steps)]
        param_grads: list[torch.Tensor | None] = [None] * len(params)
        back = []
        for (grad_y, work), recv, y, step in zip(inflight, ctx.received, ctx.outputs, steps):
            work.wait()
            grad_recv, *grad_params = torch.autograd.grad(y, (recv, *params), grad_y, allow_unused=True)
            for j, grad in enumerate(grad_params):
                if grad is not None:
                    param_grads[j] = grad if param_grads[j] is None else param_grads[j].add_(grad)
            grad_recv = torch.zeros_like(recv) if grad_recv is None else grad_recv  # input ignored
            back.append(all_to_all_async(grad_recv, step.send_splits, step.recv_splits, step.group))
        for _, work in back:
            work.wait()
        ctx.received = ctx.outputs = ctx.params = None
        # Unused parameters get zeros, not None: their accumulation (and hook) must still happen once.
        param_grads = [torch.zeros_like(p) if g is None else g for g, p in zip(param_grads, params)]
        return (None, None, None, *(buf for buf, _ in back), *param_grads)

