"""Moving experts between EP ranks, exactly: weights, fp32 masters and AdamW moments
(docs/ARCHITECTURE.md, "Expert rebalancing").

A move sends logical expert e from (EP rank a, slot s) to (EP rank b, slot t) in every expert
parameter of its layer (wi_gate, wi_up, wo: [E_local, ...], one slot = n contiguous elements).
Everything of an expert lives at the same place in every replica's numbering, so each piece goes
between ranks that differ only in their EP coordinate (same PP stage, same expert-DP coordinate):

    weight       every expert-DP replica holds the whole parameter: (a, d) -> (b, d), the whole slot
    optimizer    masters of bf16 parameters and the AdamW moments exist for the OWNED flat positions
    state        only. Without ZeRO every replica owns everything: (a, d) -> (b, d) as above. With
                 ZeRO the owner of a position is its 1/EDP share of the bucket, so the slot [s*n, s*n+n)
                 on rank a and [t*n, t*n+n) on rank b are cut at different owner boundaries: the slot
                 is split at both sets of cuts and each segment goes from its owner on a to its owner
                 on b.

Every rank lists every move of its stage in one canonical order (layer, parameter, kind, expert,
segment), keeps the items it sends or receives, and packs them per (peer, dtype) into ONE buffer:
one point-to-point message per pair, posted together (batch_isend_irecv). Sends are packed before
anything is written, so a slot that is both emptied and refilled is safe. Values travel in their own
dtype (bf16 weights as bf16, fp32 state as fp32): nothing is rebuilt from a lower-precision copy. The
AdamW step count is the same for every parameter of a run, so it needs no move. Gradient buffers hold
zeros between steps, where migration runs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megamoe.moe.dispatcher import ExpertPlacement
from megamoe.moe.layer import MoELayer
from megamoe.parallel.grad_buffer import GradBuffer
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.optimizer import DistributedOptimizer, MasterPiece


@dataclass(frozen=True)
class Move:
    """Logical expert ``expert`` goes from (EP rank src_rank, slot src_slot) to (dst_rank, dst_slot)."""

    expert: int
    src_rank: int
    src_slot: int
    dst_rank: int
    dst_slot: int


def placement_moves(old: ExpertPlacement, new: ExpertPlacement) -> list[Move]:
    """The experts whose (rank, slot) differs between two tables, in expert order."""
    return [Move(e, old.rank_of[e], old.slot_of[e], new.rank_of[e], new.slot_of[e])
            for e in range(old.num_experts)
            if (old.rank_of[e], old.slot_of[e]) != (new.rank_of[e], new.slot_of[e])]


@dataclass(frozen=True)
class _Item:
    """``length`` elements of ``kind`` of ``param``: from element src_offset (within the parameter)
    on world rank ``sender`` to element dst_offset on world rank ``receiver``."""

    param: nn.Parameter
    kind: str  # "weight" or an optimizer state kind ("master", "exp_avg", "exp_avg_sq")
    sender: int
    receiver: int
    src_offset: int
    dst_offset: int
    length: int


class _Peers:
    """World ranks of this rank's stage by (EP index, expert-DP index): the expert grid is
    [pp, edp, ep, etp] with etp fastest, so a rank's number is linear in its coordinates."""

    def __init__(self, mesh: ParallelMesh) -> None:
        me = mesh.rank
        self.ep_members = mesh.members.get("ep", [me])
        self.edp_members = mesh.members.get("edp", [me])
        self.me, self.edp_index = me, mesh.coord("edp")

    def rank(self, ep_index: int, edp_index: int | None = None) -> int:
        """``edp_index`` None: this rank's own expert-DP coordinate."""
        edp = self.edp_index if edp_index is None else edp_index
        return self.edp_members[edp] + self.ep_members[ep_index] - self.me


def _owner_cuts(buffer: GradBuffer | None, start: int, length: int) -> list[tuple[int, int | None]]:
    """Positions [start, start + length) of a group's numbering cut where their owner changes:
    [(offset from start, owner index)]; owner None: every replica owns it (not sharded)."""
    if buffer is None or not buffer.sharded:
        return [(0, None)]
    cuts, position = [], start
    while position < start + length:
        bucket, owner = buffer.layout.owner(position)
        cuts.append((position - start, owner))
        position = buffer.layout.owned(bucket, owner)[1]  # the next owner's first position
    return cuts


def _segments(src_cuts: list[tuple[int, int | None]], dst_cuts: list[tuple[int, int | None]],
              length: int) -> Iterator[tuple[int, int, int | None, int | None]]:
    """(lo, hi, source owner, destination owner) over [0, length), cut wherever either side's owner
    changes."""
    points = sorted({0, length} | {c for c, _ in src_cuts} | {c for c, _ in dst_cuts})

    def owner_at(cuts: list[tuple[int, int | None]], x: int) -> int | None:
        return [owner for c, owner in cuts if c <= x][-1]

    for lo, hi in zip(points, points[1:]):
        yield lo, hi, owner_at(src_cuts, lo), owner_at(dst_cuts, lo)


class ExpertMigration:
    """Moves experts of this stage's MoE layers; see the module docstring."""

    def __init__(self, optimizer: DistributedOptimizer, mesh: ParallelMesh) -> None:
        self.optimizer, self.mesh, self.peers = optimizer, mesh, _Peers(mesh)
        self.buffer_of: dict[int, GradBuffer] = {id(p): b for b in optimizer.buffers for p in b.layout.params}
        self.piece_of: dict[int, MasterPiece] = {id(piece.param): piece for piece in optimizer.pieces}

    def _items(self, moe: MoELayer, moves: list[Move]) -> Iterator[_Item]:
        """Every piece of every move of one layer, in the canonical order."""
        for param in moe.experts.parameters(recurse=False):
            slot_numel = param[0].numel()
            buffer = self.buffer_of.get(id(param))
            start = buffer.layout.offsets[id(param)] if buffer is not None else 0
            for move in moves:
                src, dst = move.src_slot * slot_numel, move.dst_slot * slot_numel
                yield _Item(param, "weight", self.peers.rank(move.src_rank), self.peers.rank(move.dst_rank),
                            src, dst, slot_numel)
                cuts = (_owner_cuts(buffer, start + src, slot_numel),
                        _owner_cuts(buffer, start + dst, slot_numel))
                for kind in self.optimizer.state_kinds(param):  # none for untrained state (FP8 amax history)
                    for lo, hi, src_owner, dst_owner in _segments(*cuts, slot_numel):
                        yield _Item(param, kind, self.peers.rank(move.src_rank, src_owner),
                                    self.peers.rank(move.dst_rank, dst_owner), src + lo, dst + lo, hi - lo)

    def _values(self, item: _Item, offset: int) -> torch.Tensor:
        """The flat tensor holding ``item.kind`` of its parameter, sliced to [offset, offset + length)
        of the parameter's elements (which this rank owns)."""
        if item.kind == "weight":
            return item.param.detach().view(-1)[offset:offset + item.length]
        piece = self.piece_of[id(item.param)]
        flat = piece.master if item.kind == "master" else self.optimizer.inner.state[piece.master][item.kind]
        first = piece.param_range().start
        if not first <= offset <= offset + item.length <= first + flat.numel():
            raise RuntimeError(f"expert migration: {item.kind} [{offset}, {offset + item.length}) is not "
                               "owned by this rank (a bug: owners are computed from the same layout)")
        return flat[offset - first:offset - first + item.length]

    @torch.no_grad()
    def run(self, changes: dict[MoELayer, ExpertPlacement]) -> int:
        """Move every expert whose place differs between each layer's table and ``changes[layer]``,
        then route through the new tables. Returns the bytes this rank sent."""
        me = self.mesh.rank
        outgoing: dict[tuple[int, torch.dtype], list[torch.Tensor]] = defaultdict(list)
        incoming: dict[tuple[int, torch.dtype], list[torch.Tensor]] = defaultdict(list)  # targets
        for moe, new in changes.items():
            for item in self._items(moe, placement_moves(moe.placement, new)):
                if item.sender == me:
                    values = self._values(item, item.src_offset)
                    outgoing[(item.receiver, values.dtype)].append(values)
                if item.receiver == me:
                    target = self._values(item, item.dst_offset)
                    incoming[(item.sender, target.dtype)].append(target)
        sends = {key: torch.cat(parts) for key, parts in outgoing.items()}  # packed before any write
        receives = {key: torch.empty(sum(t.numel() for t in targets), dtype=key[1], device=targets[0].device)
                    for key, targets in incoming.items()}
        ops = [dist.P2POp(dist.isend, buf, peer) for (peer, _), buf in sorted(sends.items(), key=_order)]
        ops += [dist.P2POp(dist.irecv, buf, peer) for (peer, _), buf in sorted(receives.items(), key=_order)]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for key, targets in incoming.items():
            position = 0
            for target in targets:
                target.copy_(receives[key][position:position + target.numel()])
                position += target.numel()
        for moe, new in changes.items():
            moe.set_placement(new)
        return sum(buf.numel() * buf.element_size() for buf in sends.values())


def _order(entry: tuple[tuple[int, torch.dtype], torch.Tensor]) -> tuple[int, str]:
    """Post messages in (peer, dtype) order on every rank."""
    (peer, dtype), _ = entry
    return peer, str(dtype)
