"""Expert parallelism: dispatcher round trips with identity experts, layout invariance of every
exchange mode, all-to-all byte / message counters, and bad input."""

import pytest
import torch

from megamoe.config import ConfigError, MoEConfig
from megamoe.model.init import init_model_weights
from megamoe.moe.dispatcher import EPTopology
from megamoe.moe.layer import MoELayer, MoEParallel, MoEStats
from megamoe.moe.router import Routing
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.tensor import TPContext
from tests.harness import run_ranks, train_losses

H, E, K, T = 8, 8, 2, 24


class IdentityExperts(torch.nn.Module):
    def forward(self, x, counts):
        assert int(counts.sum()) == x.shape[0]
        self.seen = int(x.shape[0])
        return x


def _layer(rank, world, ep, hierarchical=False, rpn=0, tp=1, chunks=1):
    mesh = ParallelMesh(world_size=world, rank=rank, ep=ep, tp=tp, ranks_per_node=rpn)
    mesh.build_groups()
    par = MoEParallel(tp=TPContext.from_mesh(mesh), ep=EPTopology.from_mesh(mesh, hierarchical),
                      chunks=chunks)
    layer = MoELayer(1, H, 16, MoEConfig(num_experts=E, router_topk=K), 0.1, 0.1, MoEStats(), par=par)
    init_model_weights(layer, seed=1)
    return mesh, layer


def _routing(kind, rank, t=T):
    g = torch.Generator().manual_seed(100 + rank)
    if kind == "random":
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
    elif kind == "skewed":  # 90% of choices on experts 0/1
        ids = torch.where(torch.rand(t, 1, generator=g) < 0.9, torch.tensor([[0, 1]]),
                          torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]))
    else:  # every token to experts 0 and 1: every other EP rank receives nothing
        ids = torch.tensor([[0, 1]]).repeat(t, 1)
    combine = torch.rand(t, K, generator=g)
    return Routing(expert_ids=ids, combine=combine, keep=torch.ones(t, K, dtype=torch.bool),
                   tokens_per_expert=torch.bincount(ids.reshape(-1), minlength=E),
                   aux_loss=torch.zeros(()), z_loss=torch.zeros(()))


def _round_trip(rank, world, ep, kind, hierarchical, rpn, chunks=1):
    mesh, layer = _layer(rank, world, ep, hierarchical, rpn, chunks=chunks)
    layer.experts = IdentityExperts()
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    r = _routing(kind, rank)
    out = layer._dispatch_and_combine(x, r)
    torch.testing.assert_close(out, x * r.combine.sum(-1, keepdim=True))
    out.sum().backward()  # gradients travel back through the same exchanges
    torch.testing.assert_close(x.grad, r.combine.sum(-1, keepdim=True).expand(T, H))
    # a later collective still works, even on ranks whose experts received nothing
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    assert t.item() == world
    return layer.experts.seen if chunks == 1 else True


@pytest.mark.parametrize("ep", [2, 4, 8])
@pytest.mark.parametrize("kind", ["random", "skewed", "all-to-one"])
def test_identity_experts_round_trip(ep, kind):
    seen = run_ranks(ep, _round_trip, ep, kind, False, 0)
    assert sum(seen) == ep * T * K  # every (token, choice) reached exactly one expert
    if kind == "all-to-one":  # experts 0 and 1 live on EP rank 0 (ep <= 4) or ranks 0 and 1 (ep 8)
        assert seen[2:] == [0] * (ep - 2) if ep > 2 else seen[1] == 0


def test_hierarchical_round_trip_2_nodes_x_4():
    for kind in ("random", "all-to-one"):
        seen = run_ranks(8, _round_trip, 8, kind, True, 4)
        assert sum(seen) == 8 * T * K


@pytest.mark.parametrize("kind", ["random", "all-to-one"])
def test_overlapped_chunks_round_trip(kind):
    assert all(run_ranks(4, _round_trip, 4, kind, False, 0, 3))


def _counters(rank, world, ep, hierarchical, rpn):
    mesh, layer = _layer(rank, world, ep, hierarchical, rpn)
    r = _routing("random", rank)
    x = torch.randn(T, H)
    layer._dispatch_and_combine(x, r)
    per = E // ep
    me = mesh.ep_rank
    leaving = int(((r.expert_ids // per) != me).sum())  # (token, choice) rows sent to other ranks
    return layer.stats.comm.as_dict(), leaving


def test_flat_bytes_equal_tokens_leaving_each_rank():
    res = run_ranks(4, _counters, 4, False, 0)
    sent_dispatch = [leaving for _, leaving in res]
    for (c, leaving) in res:
        # dispatch sends `leaving` rows; combine returns the rows this rank received
        assert c["a2a_bytes_intra"] >= leaving * H * 4
    total_bytes = sum(c["a2a_bytes_intra"] for c, _ in res)
    assert total_bytes == 2 * sum(sent_dispatch) * H * 4  # what leaves comes back, fp32 rows
    assert all(c["a2a_bytes_inter"] == 0 for c, _ in res)


def test_hierarchical_sends_fewer_inter_node_messages():
    flat = run_ranks(8, _counters, 8, False, 4)
    hier = run_ranks(8, _counters, 8, True, 4)
    for (f, _), (h, _) in zip(flat, hier):
        assert f["a2a_msgs_inter"] == 2 * 4  # dispatch + combine to each of the 4 remote ranks
        assert h["a2a_msgs_inter"] == 2 * 1  # one aggregated message to the same-position peer
        assert h["a2a_bytes_inter"] + h["a2a_bytes_intra"] > 0
    # the rows crossing nodes are the same; only how many messages carry them changes
    assert sum(f["a2a_bytes_inter"] for f, _ in flat) == sum(h["a2a_bytes_inter"] for h, _ in hier)


def _dedup_bytes(rank, world, dedup):
    mesh = ParallelMesh(world_size=world, rank=rank, ep=2, tp=2)
    mesh.build_groups()
    par = MoEParallel(tp=TPContext.from_mesh(mesh), ep=EPTopology.from_mesh(mesh, False), tp_dedup=dedup)
    layer = MoELayer(1, H, 16, MoEConfig(num_experts=E, router_topk=K), 0.1, 0.1, MoEStats(), par=par)
    init_model_weights(layer, seed=1)
    x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(0))  # same tokens on both TP ranks
    layer(x)
    return layer.stats.comm.bytes_intra


def test_tp_dedup_sends_one_tp_th_of_flat():
    flat = sum(run_ranks(2, _dedup_bytes, False))
    dedup = sum(run_ranks(2, _dedup_bytes, True))
    assert flat > 0 and 0.3 < dedup / flat < 0.7, (dedup, flat)


BIG = ["--global-batch-size", "16"]


@pytest.fixture(scope="module")
def single():
    return train_losses(1)


@pytest.fixture(scope="module")
def single_big():
    return train_losses(1, BIG)


def _same(a_recs, b_recs):
    assert len(a_recs) == len(b_recs) == 10
    for a, b in zip(a_recs, b_recs):
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["iteration"], key)


EP = "--expert-model-parallel-size"
TP = "--tensor-model-parallel-size"


@pytest.mark.parametrize("world, extra", [
    (2, [EP, "2"]),
    (4, [EP, "4"]),
    (4, [EP, "2", TP, "2"]),  # TP-deduplicated exchange (default)
    (4, [EP, "2", TP, "2", "--no-moe-tp-dedup"]),  # flat exchange of duplicated tokens
    (4, [EP, "2", TP, "2", "--sequence-parallel"]),
    (2, [EP, "2", "--moe-alltoall-chunks", "4"]),
    (4, [EP, "2", TP, "2", "--moe-alltoall-chunks", "4"]),
], ids=["ep2", "ep4", "ep2-tp2-dedup", "ep2-tp2-flat", "ep2-tp2-sp", "ep2-chunks4", "ep2-tp2-chunks4"])
def test_ep_layout_invariance(single, world, extra):
    _same(single, train_losses(world, extra))


@pytest.mark.parametrize("extra", [
    [EP, "8"],
    [EP, "4"],  # EP=4 x DP=2
    [EP, "8", "--moe-hierarchical-alltoall", "--moe-ranks-per-node", "4"],
], ids=["ep8", "ep4-dp2", "ep8-hier-2x4"])
def test_ep_layout_invariance_world8(single_big, extra):
    _same(single_big, train_losses(8, BIG + extra))


def test_capacity_mode_under_ep_matches_single():
    cap = ["--moe-capacity-factor", "1.0", "--moe-min-capacity", "1"]
    a, b = train_losses(1, cap), train_losses(2, cap + [EP, "2"])
    assert [r["lm_loss"] for r in b] == pytest.approx([r["lm_loss"] for r in a], rel=1e-5)


def test_metrics_carry_counters():
    recs = train_losses(2, [EP, "2", "--train-iters", "2"])
    assert recs[0]["a2a_bytes_intra"] > 0 and recs[0]["a2a_msgs_intra"] > 0


def test_bad_input():
    from megamoe.arguments import parse_args

    base = ["--model-preset", "openmoe-tiny", "--mock-data"]
    with pytest.raises(ConfigError, match="--num-experts 8 is not divisible by --expert-model-parallel"):
        parse_args(base + [EP, "3"]).validate(3)
    with pytest.raises(ConfigError, match="world size 6 is not divisible by .*expert-model-parallel-size"):
        parse_args(base + [EP, "4", "--global-batch-size", "6", "--micro-batch-size", "1"]).validate(6)
