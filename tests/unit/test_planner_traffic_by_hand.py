"""The planner's traffic model by hand (tests/distributed/test_planner_traffic.py checks it against
real runs): expected exchange counts for uniform, skewed and capacity-limited routing, the exact
model on a hand-made count matrix, ring factors, a step's totals, and bad input.

openmoe-tiny with TINY_ARGS: seq 32 x micro-batch 2 = T 64 tokens per micro-batch, H 64 (fp32 rows
of 64 x 4 = 256 bytes), E 8 experts, top-2, MoE layers 1 and 3 of 4."""

from __future__ import annotations

import numpy as np
import pytest

from megamoe.arguments import parse_args
from megamoe.config import ConfigError
from megamoe.model.openmoe import count_parameters
from megamoe.planner.step_traffic import step_traffic
from megamoe.planner.traffic import (
    Collective,
    Traffic,
    exchange_traffic,
    expected_counts,
    expected_exchange_traffic,
)
from tests.harness import TINY_ARGS

EP, TP, RPN = "--expert-model-parallel-size", "--tensor-model-parallel-size", "--moe-ranks-per-node"
ROW = 64 * 4  # bytes of one dispatched fp32 row


def _cfg(*extra: str):
    return parse_args([*TINY_ARGS, *extra])


def test_uniform_flat_and_hierarchical_by_hand():
    # EP 4 on 2 nodes x 2. Each rank routes 64 tokens x top-2 = 128 rows, 16 per expert, so 32 to
    # each EP rank (2 experts each). Flat: to 1 node-mate and 2 remote ranks, 32 rows each, and the
    # combine sends as much back: intra 2 x 32 rows in 2 messages, inter 2 x 64 rows in 4.
    for traffic in expected_exchange_traffic(_cfg(EP, "4"), 4, 2):
        assert traffic.counters() == dict(a2a_bytes_intra=64 * ROW, a2a_bytes_inter=128 * ROW,
                                          a2a_msgs_intra=2, a2a_msgs_inter=4)
    # Hierarchical: step 1 sends the node-mate everything for its position (32 rows x 2 nodes), step 2
    # the same-position rank of the other node my node's rows for it (32 rows x 2 sources): the same
    # 128 inter-node rows (with the combine) in 2 messages instead of 4.
    for traffic in expected_exchange_traffic(_cfg(EP, "4", "--moe-hierarchical-alltoall"), 4, 2):
        assert traffic.counters() == dict(a2a_bytes_intra=128 * ROW, a2a_bytes_inter=128 * ROW,
                                          a2a_msgs_intra=2, a2a_msgs_inter=2)
        assert traffic.dispatch == traffic.combine  # uniform: what goes out comes back


def test_tp_dedup_sends_one_tp_th_and_gathers_outputs():
    # TP 2 x EP 2 (the EP group is the TP group): with dedup each rank dispatches 32 tokens -> 64 rows,
    # 32 of them to the other rank's 4 experts; without, 64 tokens -> 64 rows to the other rank.
    dedup = expected_exchange_traffic(_cfg(EP, "2", TP, "2"), 4, 4)
    flat = expected_exchange_traffic(_cfg(EP, "2", TP, "2", "--no-moe-tp-dedup"), 4, 4)
    assert [t.counters()["a2a_bytes_intra"] for t in dedup] == [2 * 32 * ROW] * 4
    assert [t.counters()["a2a_bytes_intra"] for t in flat] == [2 * 64 * ROW] * 4
    # dedup's output all-gather [64, H] over TP 2: a ring sends (n-1)/n of it, in one message
    assert dedup[0].tp_gather == Traffic(32 * ROW, 0, 1, 0) and flat[0].tp_gather == Traffic()


def test_chunks_keep_bytes_and_multiply_messages():
    # 64 tokens in 3 chunks of 22, 22, 20 (ceil split): 11, 11 and 10 rows to each rank, still 32
    counts = expected_counts(_cfg(EP, "4", "--moe-alltoall-chunks", "3"), 4)
    np.testing.assert_allclose(counts[0].sum(axis=1), [44, 44, 40])
    one = expected_exchange_traffic(_cfg(EP, "4"), 4, 2)[0].counters()
    three = expected_exchange_traffic(_cfg(EP, "4", "--moe-alltoall-chunks", "3"), 4, 2)[0].counters()
    assert three["a2a_bytes_inter"] == one["a2a_bytes_inter"] and three["a2a_msgs_inter"] == 3 * 4


def test_skewed_load_and_capacity():
    # loads 3:1:...:1 (sum 10): expert 0 gets 30% of the 128 rows = 38.4, the others 12.8 each, so EP
    # rank 0 (experts 0, 1) receives 51.2 rows from every other rank, ranks 1-3 25.6
    skewed = [3, 1, 1, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(expected_counts(_cfg(EP, "4"), 4, expert_load=skewed)[3, 0],
                               [38.4] + [12.8] * 7)
    rank3 = expected_exchange_traffic(_cfg(EP, "4"), 4, 2, expert_load=skewed)[3]  # node 1, with rank 2
    assert rank3.dispatch.bytes_inter == pytest.approx((51.2 + 25.6) * ROW)
    assert rank3.dispatch.bytes_intra == pytest.approx(25.6 * ROW)
    # capacity factor 1: round(1 x 64 / 8) = 8 rows per expert and group; uniform demand is 16: half kept
    capped = expected_counts(_cfg(EP, "4", "--moe-capacity-factor", "1.0"), 4)
    np.testing.assert_allclose(capped, 8.0)


def test_exact_counts_by_hand():
    # EP 2, one rank per node: rank 0 holds experts 0-3, rank 1 experts 4-7.
    counts = np.zeros((2, 8), dtype=int)
    counts[0, [0, 4, 7]] = [1, 2, 3]  # rank 0: 5 rows to rank 1
    counts[1, 4] = 4  # rank 1: everything stays home
    rank0, rank1 = exchange_traffic(_cfg(EP, "2"), 2, 1, counts)
    assert rank0.dispatch == Traffic(0, 5 * ROW, 0, 1) and rank0.combine == Traffic()
    assert rank1.dispatch == Traffic() and rank1.combine == Traffic(0, 5 * ROW, 0, 1)  # sent back
    # the counts all-gather: [1, 8] int64 from the other rank
    assert rank0.counts_gather == Traffic(0, 64, 0, 1)
    # experts 4-7 moved to rank 0: now rank 1 sends its 4 rows, rank 0 keeps its own
    moved = exchange_traffic(_cfg(EP, "2"), 2, 1, counts, placement=[1, 1, 1, 1, 0, 0, 0, 0])
    assert moved[0].dispatch == Traffic(0, 1 * ROW, 0, 1) and moved[1].dispatch == Traffic(0, 4 * ROW, 0, 1)


def test_ring_factors():
    s = 1000
    assert Collective("all_reduce", "dp", s).ring_bytes(4) == 2 * 3 / 4 * s  # 2(n-1)/n
    assert Collective("all_reduce", "dp", s).ring_msgs(4) == 6
    assert Collective("all_gather", "dp", s).ring_bytes(4) == 3 / 4 * s
    assert Collective("reduce_scatter", "dp", s).ring_msgs(4) == 3
    assert Collective("send", "pp", s, peer=1).ring_bytes(2) == s
    assert Collective("all_reduce", "dp", s).ring_bytes(1) == 0


def test_step_totals_by_hand():
    # EP 4 x DP 4, one node: 8 / (2 x 4) = 1 micro-batch, 2 MoE layers; full recompute re-runs both
    cfg = _cfg(EP, "4", "--recompute-granularity", "full")
    per_call = expected_exchange_traffic(cfg, 4, 4)[0].all_to_all
    step = step_traffic(cfg, 4, 4)[0]
    assert step.expert_exchange.forward == per_call.scaled(2) == step.expert_exchange.backward
    assert step.expert_exchange.recompute == per_call.scaled(2)
    assert step.tensor_parallel.total == Traffic() and step.pipeline.total == Traffic()
    # dense gradients: all parameters but the 2 layers x 8 experts x 4 H I, in one fp32 bucket (the
    # default holds 4M elements) all-reduced over DP 4: 2 x 3/4 of its bytes in 6 messages. The experts
    # have expert-DP 1: nothing to reduce.
    dense = count_parameters(cfg)["total"] - 2 * 8 * 4 * 64 * 64
    assert dense == 263872
    assert step.dense_grad.backward == Traffic(1.5 * dense * 4, 0, 6, 0)
    assert step.expert_grad.total == Traffic()


@pytest.mark.parametrize("call, message", [
    (lambda: exchange_traffic(_cfg(EP, "2"), 2, 2, np.zeros((3, 8))), "do not match [world 2"),
    (lambda: exchange_traffic(_cfg(EP, "2"), 2, 2, -np.ones((2, 8))), "finite and >= 0"),
    (lambda: exchange_traffic(_cfg(EP, "2", "--moe-alltoall-chunks", "2"), 2, 2, np.ones((2, 8))),
     "give the counts per chunk"),
    (lambda: exchange_traffic(_cfg(EP, "2"), 2, 2, np.ones((2, 8)), placement=[0] * 8), "must give each"),
    (lambda: expected_counts(_cfg(EP, "2"), 2, expert_load=[1, 2]), "expert load must list 8"),
    (lambda: step_traffic(_cfg(EP, "2"), 2, 2, expert_load=[[1] * 8] * 3), "lists 3 MoE layers"),
    (lambda: expected_exchange_traffic(_cfg(EP, "2"), 2, 0), "ranks per node must be >= 1"),
    (lambda: expected_exchange_traffic(_cfg(EP, "4"), 2, 2), "not divisible"),
])
def test_bad_input_is_one_config_error_line(call, message):
    with pytest.raises(ConfigError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)
