"""The planner's memory formulas (megamoe/planner/memory.py) on small numbers worked out by hand."""

from __future__ import annotations

import pytest

from megamoe.arguments import parse_args
from megamoe.config import ConfigError
from megamoe.planner.memory import (
    ParamSpec,
    bucket_layout,
    chunk_activation_bytes,
    exchange_buffer_bytes,
    layer_activations,
    memory_per_rank,
    owned_numel,
    pipeline_peak,
    recompute_segments,
    routed_rows,
    schedule_order,
    stage_params,
    state_bytes,
)
from tests.harness import TINY_ARGS

# openmoe-tiny: 4 layers (1 and 3 MoE), H 64, 4 heads x d 16, I 64, 8 experts top-2, vocab 1024;
# TINY_ARGS: seq 32, micro-batch 2 (T = 64 tokens), global batch 8
H, F, E, V, T = 64, 64, 8, 1024, 64  # F: the FFN width


def cfg(*extra: str):
    return parse_args(TINY_ARGS + list(extra))


def test_bucket_layout_pads_each_bucket_and_splits_at_dtype_changes():
    params = [ParamSpec("a", 5, 2), ParamSpec("b", 7, 2), ParamSpec("router", 3, 4), ParamSpec("c", 10, 2)]
    # reverse order: c (10, bf16) -> closed at >= 8 elements, padded to 12; router (fp32): own bucket 3 -> 4;
    # b + a (bf16): 7, then 12 >= 8 -> 12
    buckets = bucket_layout(params, size=4, bucket_numel=8)
    assert [(b.start, b.end, b.real_end, b.nbytes_per) for b in buckets] == [
        (0, 12, 10, 2), (12, 16, 15, 4), (16, 28, 28, 2)]
    # member 2 of 4 owns [6, 9) of bucket 0 (3 real of 3; rank 3 gets [9, 12): 1 real), [14, 15) of the
    # router bucket and [22, 25) of the last
    assert owned_numel(buckets, 4, 2) == (3 + 1 + 3, 3 + 3)
    assert owned_numel(buckets, 4, 3) == (1 + 0 + 3, 1 + 3)
    assert owned_numel(buckets, 1, 0) == (25, 22)  # not sharded: everything real


def test_stage_params_count_the_whole_model_once():
    c = cfg()
    per_layer_attn = 2 * H + 4 * H * 64  # two norms, q/k/v/o (4 heads x 16)
    dense = per_layer_attn + 4 * H * F
    moe = per_layer_attn + E * H + E * 4 * H * F + H + 4 * H * F  # router, experts, extra MLP and its norm
    assert sum(p.numel for p in stage_params(c)) == 2 * dense + 2 * moe + 2 * V * H + H
    # PP 2 TP 2 EP 2: stage 1 holds layers 2-3 (one MoE), the final norm and half the LM head
    c = cfg("--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
            "--expert-model-parallel-size", "2")
    half_attn = 2 * H + 4 * H * 32
    stage1 = (half_attn + 2 * H * F) + (half_attn + E * H + 4 * 4 * H * F + H + 2 * H * F) + H + V // 2 * H
    assert sum(p.numel for p in stage_params(c, 1)) == stage1
    assert sum(p.numel for p in stage_params(c, 1) if p.expert) == 4 * 4 * H * F


def test_state_bytes_by_zero_stage():
    # world 4, EP 2: DP 4, EDP 2. Expert params 2 layers x 4 local x 4 H I = 131072; dense the rest.
    expert = 2 * 4 * 4 * H * F
    dense = sum(p.numel for p in stage_params(cfg())) - 2 * E * 4 * H * F
    plain = state_bytes(cfg("--expert-model-parallel-size", "2"), 4)
    assert (plain.params, plain.grads, plain.master, plain.optimizer) == (
        4 * (dense + expert), 4 * (dense + expert), 0, 8 * (dense + expert))
    z1 = state_bytes(cfg("--expert-model-parallel-size", "2", "--use-distributed-optimizer"), 4)
    assert z1.grads == plain.grads and z1.optimizer == 8 * (dense // 4 + expert // 2)  # sizes divide
    z2 = state_bytes(cfg("--expert-model-parallel-size", "2", "--use-distributed-optimizer",
                         "--zero-stage", "2"), 4)
    assert z2.grads == 4 * (dense // 4 + expert // 2) and z2.optimizer == z1.optimizer
    # one bucket per group at the default 4M elements: two reducing and one filling = all of them
    assert z2.grad_buckets == 4 * (dense + expert)
    bf16 = state_bytes(cfg("--expert-model-parallel-size", "2", "--bf16"), 4)
    router = 2 * E * H  # fp32 even under bf16: no master
    assert bf16.params == 2 * (dense + expert) + 2 * router
    assert bf16.master == 4 * (dense + expert - router)


def test_one_dense_layer_saved_bytes():
    c = cfg("--moe-layer-freq", "4")  # layer 0 dense
    norm = 4 * T * H + 4 * T  # fp32 input, rsqrt [T, 1]
    # input, q k v out (4 heads x 16), cos and sin [32, 16], logsumexp [2, 4, 32]
    attention = 4 * T * H + 4 * T * 4 * 16 * 4 + 8 * 32 * 16 + 4 * 2 * 4 * 32
    mlp = 4 * T * (H + 4 * F)
    got = layer_activations(c, 1, 0)
    assert (got.norms, got.attention, got.mlp, got.router, got.moe) == (2 * norm, attention, mlp, 0, 0)
    sel = layer_activations(cfg("--moe-layer-freq", "4", "--recompute-granularity", "selective"), 1, 0)
    assert got.total - sel.total == 4 * 2 * 4 * 32  # only the logsumexp is dropped


def test_moe_layer_saved_bytes_dropless_and_with_capacity():
    c = cfg()
    rows = routed_rows(c, 1)
    assert (rows.sent, rows.received, rows.groups) == (2 * T, 2 * T, 1)
    router = 4 * T * H + 8 * T * E + 8 * T * 2 + 8 * T + 4 * E + T * 2 + 4 * T
    moe = 16 * 128 + 4 * 128 * (H + 4 * F) + 4 * 128 * (H + 1)
    got = layer_activations(c, 1, 1)
    assert (got.router, got.moe) == (router, moe)
    # capacity factor 0.5: round(0.5 x 64 / 8) = 4 rows per expert, 32 kept of 128
    capped = layer_activations(cfg("--moe-capacity-factor", "0.5"), 1, 1)
    assert routed_rows(cfg("--moe-capacity-factor", "0.5"), 1).sent == pytest.approx(32)
    assert got.moe - capped.moe == 96 * (16 + 4 * (H + 4 * F) + 4 * (H + 1))
    # a skewed load: EP 2, experts 0-3 take 3/4 of the assignments -> rank 0 receives 1.5 x its share
    skew = routed_rows(cfg("--expert-model-parallel-size", "2"), 2, [3, 3, 3, 3, 1, 1, 1, 1])
    assert (skew.sent, skew.received) == (128, 192)


def test_recompute_segments_and_chunk_totals():
    assert recompute_segments(cfg("--recompute-granularity", "full", "--recompute-num-layers", "3"),
                              range(4)) == [([0, 1, 2], True), ([3], True)]
    assert recompute_segments(cfg("--recompute-granularity", "full", "--recompute-method", "block",
                                  "--recompute-num-layers", "1"), range(2, 4)) == [([2], True), ([3], False)]
    plain = chunk_activation_bytes(cfg(), 1, 0)
    full = chunk_activation_bytes(cfg("--recompute-granularity", "full"), 1, 0)
    head = 4 * T * H + 4 * T + 4 * T * H + 4 * T * V + 4 * T + 8 * T
    assert plain.saved == sum(x.total for x in plain.layers.values()) + 8 * T + head
    assert full.saved == 4 * 4 * T * H + 8 * T + head  # each layer keeps only its input
    assert full.recompute_working == max(x.total for x in plain.layers.values())


def test_schedule_order_and_1f1b_in_flight():
    assert schedule_order(2, 1, 0, 3) == [("F", 0), ("F", 0), ("B", 0), ("F", 0), ("B", 0), ("B", 0)]
    assert schedule_order(2, 1, 1, 3) == [("F", 0), ("B", 0)] * 3
    c = cfg("--pipeline-model-parallel-size", "4", "--num-layers", "8", "--global-batch-size", "4")
    assert [pipeline_peak(c, 4, r).micro_batches for r in range(4)] == [2, 2, 2, 1]  # min(pp - r, 2)
    per_mb = chunk_activation_bytes(c, 4, 1).saved
    assert pipeline_peak(c, 4, 1).saved_bytes == 2 * per_mb


def test_exchange_buffers_and_the_whole_estimate():
    assert exchange_buffer_bytes(cfg(), 1) == 0
    ep2 = cfg("--expert-model-parallel-size", "2")
    assert exchange_buffer_bytes(ep2, 2) == 4 * H * (128 + 128)  # rows sent + received
    est = memory_per_rank(ep2, 2)
    stage = est.stages[0]
    assert est.total == stage.total == sum((stage.weights, stage.grads, stage.optimizer, stage.activations,
                                            stage.exchange_buffers))
    with pytest.raises(ConfigError, match="not MoE layers"):
        memory_per_rank(ep2, 2, {0: [1] * E})
    with pytest.raises(ConfigError, match="not divisible"):
        memory_per_rank(ep2, 3)
    with pytest.raises(ConfigError, match="--num-attention-heads 4 is not divisible"):
        memory_per_rank(cfg("--tensor-model-parallel-size", "8"), 8)
