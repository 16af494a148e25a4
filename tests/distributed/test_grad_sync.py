"""The one gradient path: bucketing, overlapped reduction and bf16 reduction take effect with and
without ZeRO, and every parameter's gradient reaches its bucket once per micro-batch (chunked expert
exchange included)."""

import pytest

from tests.conftest import EP, Z, assert_same_losses, train_and_inspect
from tests.harness import TINY_ARGS, run_ranks, train_losses

MANY_MICRO_BATCHES = ["--global-batch-size", "16", "--micro-batch-size", "1"]  # 4 per rank at DP 4


@pytest.fixture(scope="module")
def single_many():
    return train_losses(1, MANY_MICRO_BATCHES)


def _reductions(rank, world, extra):
    """Train two steps; return how each bucket reduction started (async from a backward hook, or
    synchronously in finish) and the number of buckets per group."""
    from megamoe.parallel import grad_buffer

    started, original_reduce = [], grad_buffer.GradBuffer._reduce

    def spy_reduce(self, bucket, async_op):
        started.append(async_op)
        return original_reduce(self, bucket, async_op)

    grad_buffer.GradBuffer._reduce = spy_reduce
    def bucket_counts(trainer):
        return {b.layout.name: len(b.layout.buckets) for b in trainer.optimizer.buffers}

    buckets, recs = train_and_inspect(rank, world, TINY_ARGS + ["--train-iters", "2"] + extra, bucket_counts)
    return dict(started=started, buckets=buckets, losses=[r["lm_loss"] for r in recs])


def test_without_zero_bucket_size_and_overlap_take_effect(single):
    small = run_ranks(4, _reductions, ["--ddp-bucket-size", "3000", "--overlap-grad-reduce"])[0]
    default = run_ranks(4, _reductions, [])[0]
    assert default["buckets"] == {"dense": 1, "expert": 1}  # 4M-element default: one bucket a group
    assert small["buckets"]["dense"] > 10 and small["buckets"]["expert"] > 3
    assert all(small["started"]) and len(small["started"]) == 2 * sum(small["buckets"].values())
    assert not any(default["started"])  # without overlap every reduction waits for the step's end
    assert small["losses"] == pytest.approx([r["lm_loss"] for r in single[:2]], rel=1e-5)


def test_without_zero_overlap_equals_no_overlap_at_dp4(single):
    overlapped = train_losses(4, ["--overlap-grad-reduce", "--ddp-bucket-size", "3000"])
    assert_same_losses(single, overlapped, rel=1e-5)


def test_without_zero_grad_reduce_in_bf16_is_within_bf16_tolerance(single):
    recs = train_losses(4, ["--grad-reduce-in-bf16", "--ddp-bucket-size", "3000"])
    assert_same_losses(single, recs, rel=1e-2)
    assert [r["grad_norm"] for r in recs] != [r["grad_norm"] for r in single]  # it really reduced in bf16


@pytest.mark.parametrize("extra", [
    [],
    [Z],
    [Z, "--zero-stage", "2"],
], ids=["no-zero", "zero1", "zero2"])
@pytest.mark.parametrize("chunks", ["2", "4"])
def test_overlap_with_chunked_exchange_and_expert_dp(single_many, extra, chunks):
    # 4 ranks: EP 2 x expert-DP 2, 4 micro-batches each. Every chunk used to run its own expert
    # backward, so expert gradient hooks fired once per chunk and a bucket looked complete (and
    # started reducing) after 1/K of the micro-batches: 5.5e-5 away from one process.
    layout = [EP, "2", "--overlap-grad-reduce", "--moe-alltoall-chunks", chunks, "--ddp-bucket-size", "3000"]
    assert_same_losses(single_many, train_losses(4, MANY_MICRO_BATCHES + layout + extra), rel=1e-5)


def _precision(trainer):
    """Parameter, bucket and master dtypes after a step."""
    return dict(params={name: str(p.dtype) for name, p in trainer.model.named_parameters()},
                buckets=[sorted({str(p.dtype) for p in bucket.params})
                         for buffer in trainer.optimizer.buffers for bucket in buffer.layout.buckets],
                masters=sorted({str(piece.master.dtype) for piece in trainer.optimizer.pieces}))


@pytest.mark.parametrize("extra", [[], [Z, "--overlap-param-gather"]], ids=["plain", "zero"])
def test_router_gate_stays_fp32_under_bf16(extra):
    argv = TINY_ARGS + ["--train-iters", "1", "--bf16", "--ddp-bucket-size", "3000"] + extra
    seen = run_ranks(2, train_and_inspect, argv, _precision)[0][0]
    gates = {name: dtype for name, dtype in seen["params"].items() if name.endswith("gate_weight")}
    assert gates and set(gates.values()) == {"torch.float32"}
    others = {dtype for name, dtype in seen["params"].items() if name not in gates}
    assert others == {"torch.bfloat16"}
    assert all(len(dtypes) == 1 for dtypes in seen["buckets"])  # one dtype per bucket (all-gather)
    assert ["torch.bfloat16"] in seen["buckets"] and ["torch.float32"] in seen["buckets"]
    assert seen["masters"] == ["torch.float32"]
