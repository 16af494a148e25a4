"""Expert migration bookkeeping by hand: which slots move, and how a slot is cut between owners."""

from types import SimpleNamespace

from megamoe.moe.dispatcher import ExpertPlacement
from megamoe.parallel.grad_buffer import Bucket, GroupLayout
from megamoe.training.expert_migration import Move, _owner_cuts, _segments, placement_moves


def test_moved_to_keeps_stayers_in_their_slots():
    old = ExpertPlacement.contiguous(8, 4)  # rank r holds experts 2r, 2r+1 in slots 0, 1
    new = old.moved_to([0, 1, 1, 3, 2, 2, 0, 3])  # a 3-cycle: 1 -> rank 1, 3 -> rank 3, 6 -> rank 0
    assert new.rank_of == (0, 1, 1, 3, 2, 2, 0, 3)
    # stayers keep their slots; each arrival takes the slot its rank's leaver freed
    assert new.slot_of == (0, 1, 0, 0, 0, 1, 1, 1)
    assert placement_moves(old, new) == [Move(1, src_rank=0, src_slot=1, dst_rank=1, dst_slot=1),
                                         Move(3, src_rank=1, src_slot=1, dst_rank=3, dst_slot=0),
                                         Move(6, src_rank=3, src_slot=0, dst_rank=0, dst_slot=1)]
    assert old.moved_to(list(old.rank_of)) == old


def test_owner_cuts_and_segments_split_a_slot_at_both_sides_boundaries():
    # a bucket of 40 positions [10, 50) sharded over 4 owners of 10 each: owner k has [10+10k, 20+10k)
    bucket = Bucket(10, 50, [])
    buffer = SimpleNamespace(sharded=True, layout=GroupLayout("expert", [], None, 4, 0, buckets=[bucket]))
    src = _owner_cuts(buffer, 14, 12)  # [14, 26): owner 0 for 6, owner 1 for 6
    dst = _owner_cuts(buffer, 27, 12)  # [27, 39): owner 1 for 3, owner 2 for 9
    assert src == [(0, 0), (6, 1)] and dst == [(0, 1), (3, 2)]
    assert list(_segments(src, dst, 12)) == [(0, 3, 0, 1), (3, 6, 0, 2), (6, 12, 1, 2)]
    unsharded = SimpleNamespace(sharded=False)
    assert list(_segments(_owner_cuts(unsharded, 14, 12), _owner_cuts(unsharded, 27, 12), 12)) == [
        (0, 12, None, None)]
