"""Expert parallelism: the token dispatcher's public API (round trips with identity experts, equality
with the single-process reference in every exchange mode, traffic counters, the frozen state, one
gradient accumulation per expert parameter under the K-chunk pipeline), layout invariance of every
exchange mode in training, and bad input."""

import dataclasses

import pytest
import torch

from megamoe.config import ConfigError, MoEConfig
from megamoe.model.init import init_model_weights
from megamoe.moe.dispatcher import EPTopology, ExpertPlacement, TokenDispatcher
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.layer import MoELayer, MoEParallel, MoEStats
from megamoe.moe.router import Routing
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.tensor import TPContext
from tests.harness import run_ranks, train_losses

H, E, K, T, FFN = 8, 8, 2, 24, 16


class IdentityExperts(torch.nn.Module):
    def forward(self, x, counts):
        assert int(counts.sum()) == x.shape[0]
        self.seen = getattr(self, "seen", 0) + int(x.shape[0])
        return x


def _mesh(rank, world, ep, tp=1, rpn=0):
    mesh = ParallelMesh(world_size=world, rank=rank, ep=ep, tp=tp, ranks_per_node=rpn)
    mesh.build_groups()
    return mesh


def _dispatcher(mesh, hierarchical=False, chunks=1, dedup=True):
    par = MoEParallel(tp=TPContext.from_mesh(mesh), ep=EPTopology.from_mesh(mesh, hierarchical),
                      tp_dedup=dedup, chunks=chunks)
    return TokenDispatcher(ExpertPlacement.contiguous(E, par.ep.size), par, MoEStats())


def _run(dispatcher, x, routing, experts, pipelined=None):
    """dispatch -> experts -> combine through the public API; ``pipelined`` (default: whenever the
    dispatcher can) runs the K-chunk pipeline instead."""
    if dispatcher.pipelined if pipelined is None else pipelined:
        return dispatcher.pipeline(x, routing, experts)
    rows, counts, state = dispatcher.dispatch(x, routing)
    return dispatcher.combine(experts(rows, counts), state)


def _routing(kind, seed, t=T):
    g = torch.Generator().manual_seed(100 + seed)
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


def _round_trip(rank, world, ep, kind, hierarchical, rpn, chunks=1, pipelined=None):
    dispatcher = _dispatcher(_mesh(rank, world, ep, rpn=rpn), hierarchical, chunks)
    experts = IdentityExperts()
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(rank)).requires_grad_()
    r = _routing(kind, rank)
    out = _run(dispatcher, x, r, experts, pipelined)
    torch.testing.assert_close(out, x * r.combine.sum(-1, keepdim=True))
    out.sum().backward()  # gradients travel back through the same exchanges
    torch.testing.assert_close(x.grad, r.combine.sum(-1, keepdim=True).expand(T, H))
    # a later collective still works, even on ranks whose experts received nothing
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    assert t.item() == world
    return experts.seen


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
@pytest.mark.parametrize("pipelined", [True, False], ids=["pipeline", "dispatch-combine"])
def test_chunked_round_trip(kind, pipelined):
    seen = run_ranks(4, _round_trip, 4, kind, False, 0, 3, pipelined)
    assert sum(seen) == 4 * T * K


def _vs_reference(rank, world, ep, tp, hierarchical, rpn, chunks, pipelined):
    """The EP dispatcher with real experts against the single-process dispatcher holding all E
    experts (same logical weights), on this rank's tokens: outputs and input gradients."""
    mesh = _mesh(rank, world, ep, tp, rpn)
    dispatcher = _dispatcher(mesh, hierarchical, chunks)
    experts = GroupedExperts(H, FFN, dispatcher.placement.local_experts(mesh.ep_rank), 0.1, 0.1)
    reference = TokenDispatcher(ExpertPlacement.contiguous(E), MoEParallel(), MoEStats())
    all_experts = GroupedExperts(H, FFN, list(range(E)), 0.1, 0.1)
    init_model_weights(experts, seed=1)
    init_model_weights(all_experts, seed=1)
    tokens = rank // tp  # TP ranks (adjacent) hold the same tokens
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(tokens))
    routing = _routing("skewed", tokens)
    grad_out = torch.randn(T, H, generator=torch.Generator().manual_seed(7))
    outs, grads = [], []
    for d, ex in ((dispatcher, experts), (reference, all_experts)):
        xi = x.clone().requires_grad_()
        out = _run(d, xi, routing, ex, pipelined)
        out.backward(grad_out)
        outs.append(out.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1])
    return True


@pytest.mark.parametrize("world, ep, tp, hierarchical, rpn, chunks, pipelined", [
    (2, 2, 1, False, 0, 1, False),
    (4, 4, 1, False, 0, 1, False),
    (4, 4, 1, True, 2, 1, False),
    (4, 4, 1, True, 2, 2, False),
    (4, 2, 2, False, 0, 1, False),
    (4, 2, 2, False, 0, 2, True),
    (2, 2, 1, False, 0, 2, True),
    (2, 2, 1, False, 0, 4, True),
    (2, 2, 1, False, 0, 4, False),
], ids=["flat-ep2", "flat-ep4", "hier-2x2", "hier-2x2-chunks2", "tp2-dedup", "tp2-dedup-chunks2",
        "chunks2-pipeline", "chunks4-pipeline", "chunks4-dispatch-combine"])
def test_dispatch_combine_equals_single_process(world, ep, tp, hierarchical, rpn, chunks, pipelined):
    assert all(run_ranks(world, _vs_reference, ep, tp, hierarchical, rpn, chunks, pipelined))


def _traffic(rank, world, chunks):
    """Counters after one forward, after a second one, and after a recomputed one."""
    dispatcher = _dispatcher(_mesh(rank, world, 2), chunks=chunks)
    x, r = torch.randn(T, H, generator=torch.Generator().manual_seed(rank)), _routing("random", rank)
    stats, seen = dispatcher.stats, []
    for recomputing in (False, False, True):
        stats.recomputing = recomputing
        _run(dispatcher, x, r, IdentityExperts())
        seen.append(stats.comm.as_dict())
    return seen


def test_traffic_counted_once_per_forward_and_equal_across_chunks():
    by_chunks = {k: run_ranks(2, _traffic, k) for k in (1, 2, 4)}
    for per_rank in by_chunks.values():
        for once, twice, recomputed in per_rank:
            assert once["a2a_bytes_intra"] > 0
            assert twice == {k: 2 * v for k, v in once.items()}
            assert recomputed == twice
    for k in (2, 4):  # the same rows cross the wire; only the number of messages grows
        for (one, _, _), (chunked, _, _) in zip(by_chunks[1], by_chunks[k]):
            assert chunked["a2a_bytes_intra"] == one["a2a_bytes_intra"]
            assert one["a2a_msgs_intra"] <= chunked["a2a_msgs_intra"] <= k * one["a2a_msgs_intra"]


def _state_frozen(rank, world):
    dispatcher = _dispatcher(_mesh(rank, world, 2), chunks=2)
    _, _, state = dispatcher.dispatch(torch.randn(T, H), _routing("random", rank))
    for obj, name in ((state, "chunks"), (state.chunks[0], "lo"), (state.chunks[0].perm, "counts")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, None)
    return len(state.chunks)


def test_dispatch_state_is_frozen():
    assert run_ranks(2, _state_frozen) == [2, 2]


def _expert_grad_accumulations(rank, world, chunks):
    """Two micro-batches through an EP2 MoE layer: how many times each expert parameter's gradient
    was accumulated per backward, and the summed gradients."""
    mesh = _mesh(rank, world, 2)
    par = MoEParallel(tp=TPContext.from_mesh(mesh), ep=EPTopology.from_mesh(mesh, False), chunks=chunks)
    layer = MoELayer(1, H, FFN, MoEConfig(num_experts=E, router_topk=K), 0.1, 0.1, MoEStats(), par=par)
    init_model_weights(layer, seed=1)
    fired = {name: 0 for name, _ in layer.experts.named_parameters()}
    for name, p in layer.experts.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: fired.__setitem__(name, fired[name] + 1))
    per_backward = []
    for micro in range(2):
        x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(10 * rank + micro))
        layer(x.requires_grad_()).pow(2).sum().backward()
        per_backward.append(dict(fired))
        fired.update({name: 0 for name in fired})
    return per_backward, {name: p.grad.clone() for name, p in layer.named_parameters()}


def test_k_chunk_pipeline_accumulates_each_expert_gradient_once():
    reference = run_ranks(2, _expert_grad_accumulations, 1)
    for chunks in (2, 4):
        for (per_backward, grads), (_, ref_grads) in zip(run_ranks(2, _expert_grad_accumulations, chunks),
                                                         reference):
            assert per_backward == [{name: 1 for name in per_backward[0]}] * 2, (chunks, per_backward)
            for name, grad in grads.items():
                torch.testing.assert_close(grad, ref_grads[name], msg=f"{name}, {chunks} chunks")


def _counters(rank, world, ep, hierarchical, rpn):
    mesh = _mesh(rank, world, ep, rpn=rpn)
    dispatcher = _dispatcher(mesh, hierarchical)
    r = _routing("random", rank)
    _run(dispatcher, torch.randn(T, H), r, IdentityExperts())
    leaving = int(((r.expert_ids // (E // ep)) != mesh.ep_rank).sum())  # (token, choice) rows sent away
    return dispatcher.stats.comm.as_dict(), leaving
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
    # expert-DP 2 with buckets reduced as their gradients complete: each expert gradient must be
    # accumulated once per micro-batch, not once per chunk (issue 20)
    (4, [EP, "2", "--use-distributed-optimizer", "--overlap-grad-reduce", "--moe-alltoall-chunks", "2"]),
], ids=["ep2", "ep4", "ep2-tp2-dedup", "ep2-tp2-flat", "ep2-tp2-sp", "ep2-chunks4", "ep2-tp2-chunks4",
        "ep2-edp2-zero-overlap-chunks2"])
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
