"""Heterogeneous ZeRO: layout invariance with the distributed optimizer, per-rank optimizer bytes,
clipping with expert gradients under EP+TP, bf16 against fp32, exact resume, memory formula."""

import pytest
import torch

from megamoe.arguments import parse_args
from megamoe.model.openmoe import count_parameters
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.optimizer import build_optimizer, optimizer_memory_estimate
from megamoe.params import is_expert
from megamoe.training.run import build_stage_model
from tests.conftest import (
    BIG,
    EP,
    PP,
    TP,
    Z,
    assert_one_line_config_error,
    assert_same_losses,
    poison_expert_grads,
    train_and_inspect,
)
from tests.harness import TINY_ARGS, run_ranks, train_losses


def _same(a_recs, b_recs, rel=1e-5):
    assert_same_losses(a_recs, b_recs, rel, n=None)


@pytest.mark.parametrize("world, extra", [
    (4, [Z]),
    (4, [Z, "--overlap-grad-reduce"]),
    (4, [Z, TP, "2", "--sequence-parallel", "--overlap-grad-reduce"]),
], ids=["dp4", "dp4-overlap", "tp2-sp-dp2-overlap"])
def test_zero_layout_invariance(single, world, extra):
    _same(single, train_losses(world, extra))


@pytest.mark.parametrize("extra", [
    [Z, EP, "2"],  # DP 8, expert-DP 4
    [Z, TP, "2", EP, "2"],  # TP2 x DP4, EP2 x EDP4... experts fold TP x DP
    [Z, PP, "2", EP, "2"],  # PP2 x DP4, EP2 x EDP2
], ids=["ep2-dp8", "tp2-ep2-dp4", "pp2-ep2-dp4"])
def test_zero_layout_invariance_world8(single_big, extra):
    _same(single_big, train_losses(8, BIG + extra))


def _optimizer_bytes(rank, world, extra):
    cfg = parse_args(TINY_ARGS + extra)
    mesh = ParallelMesh.from_config(cfg.parallel, world, rank)
    mesh.build_groups()
    model = build_stage_model(cfg, mesh)
    model.init_weights(1)
    opt = build_optimizer(model, cfg, mesh)
    dense = sum(p.numel() for p in model.parameters() if not is_expert(p))
    expert = sum(p.numel() for p in model.parameters() if is_expert(p))
    return opt.memory_bytes()["optimizer"] // 8, dense, expert, mesh.dp, mesh.edp  # 2 fp32 moments


def test_optimizer_state_is_sharded_dense_over_dp_experts_over_edp():
    res = run_ranks(4, _optimizer_bytes, [Z, EP, "2", "--global-batch-size", "8"])
    masters, dense, expert, dp, edp = res[0]
    assert (dp, edp) == (4, 2)
    for m, d, e, _, _ in res:
        # each rank owns 1/DP of the dense and 1/EDP of its experts (up to bucket padding)
        assert d / dp + e / edp <= m <= d / dp + e / edp + 2 * (dp + edp)
    # the experts of rank 0 are the same as rank 2's (EDP replicas), not rank 1's
    assert sum(r[0] for r in res) == pytest.approx(dense + 2 * expert, abs=16)


def test_clipping_when_only_expert_gradients_are_large(monkeypatch):
    # Expert weight gradients x1000 (a hook on those parameters, installed before the ranks fork):
    # the global norm is then all experts, so an expert norm dropped or double counted under
    # EP+TP would change the clip coefficient; Adam's eps 1e-3 makes the update feel it.
    from megamoe.moe.experts import GroupedExperts

    original = GroupedExperts.__init__

    def loud_experts(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for p in (self.wi_gate, self.wi_up, self.wo):
            p.register_hook(lambda g: g * 1000.0)

    monkeypatch.setattr(GroupedExperts, "__init__", loud_experts)
    # Megatron's N(0, 0.02) init: T5X's (scale 0.1) leaves even x1000 expert gradients below the clip
    clip = ["--clip-grad", "1.0", "--adam-eps", "1e-3", "--train-iters", "5", "--init-method", "normal"]
    single = train_losses(1, clip)
    assert all(r["grad_norm"] > 2.0 for r in single)  # experts dominate; clipping active every step
    _same(single, train_losses(4, clip + [TP, "2", EP, "2"]))
    _same(single, train_losses(4, clip + [Z, TP, "2", EP, "2"]))


def test_bf16_within_bf16_tolerance_of_fp32():
    steps = ["--train-iters", "4"]
    fp32 = train_losses(1, steps + [Z])
    bf16 = train_losses(1, steps + [Z, "--bf16"])
    for a, b in zip(fp32, bf16):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=2e-2)
    assert bf16[-1]["lm_loss"] != fp32[-1]["lm_loss"]  # it really ran in bf16
    bf16_zero2 = train_losses(2, steps + [Z, "--bf16", "--zero-stage", "2", "--overlap-param-gather"])
    for a, b in zip(fp32, bf16_zero2):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=2e-2)


def test_resume_with_distributed_optimizer_is_exact(tmp_path):
    common = [Z, "--lr-decay-iters", "6"]
    full = train_losses(2, common + ["--train-iters", "6"])
    train_losses(2, common + ["--train-iters", "3", "--save", str(tmp_path)])
    resumed = train_losses(2, common + ["--train-iters", "6", "--load", str(tmp_path)])
    assert [r["lm_loss"] for r in resumed] == [r["lm_loss"] for r in full[3:]]


def test_memory_formula_openmoe_8b_64_gpus():
    cfg = parse_args(["--model-preset", "openmoe-8b", "--mock-data"])
    counts = count_parameters(cfg)
    m, moe = cfg.model, cfg.moe
    n_moe = sum(moe.is_moe_layer(i) for i in range(m.num_layers))
    expert = n_moe * moe.num_experts * 4 * m.hidden_size * m.ffn_hidden_size
    dense = counts["total"] - expert
    # 64 GPUs: TP 2 x PP 2 x DP 16 dense; experts EP 8 x EDP 4 per stage
    plain = optimizer_memory_estimate(dense, expert, 2, 2, 8, 16, 4, zero=False)
    zero = optimizer_memory_estimate(dense, expert, 2, 2, 8, 16, 4, zero=True)
    assert zero["optimizer"] < plain["optimizer"] / 4
    assert zero["weights"] == plain["weights"]
    torch.testing.assert_close(torch.tensor(zero["optimizer"]),
                               torch.tensor(dense / 4 * 12 / 16 + expert / 16 * 12 / 4))


def test_grad_reduce_in_bf16_stays_close_to_fp32(single):
    recs = train_losses(2, [Z, "--grad-reduce-in-bf16"])
    for a, b in zip(single, recs):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-2)


@pytest.mark.parametrize("extra", [[], [Z], [Z, "--zero-stage", "2"]], ids=["plain", "zero", "zero2"])
def test_non_finite_gradient_skips_the_step(monkeypatch, extra):
    # An inf in one expert gradient at iteration 2 only: the step is skipped (logged), the weights are
    # untouched, and training continues from the same weights as if that batch were never applied.
    poison_expert_grads(monkeypatch, lambda n: 8 < n <= 16)  # 4 micro-batches x 2 MoE layers per step
    recs = train_losses(1, ["--train-iters", "4"] + extra)
    assert [r["skipped"] for r in recs] == [False, True, False, False]
    assert recs[1]["grad_norm"] != recs[1]["grad_norm"] or recs[1]["grad_norm"] == float("inf")
    assert all(r["lm_loss"] == r["lm_loss"] for r in recs)  # no NaN loss afterwards


Z2 = [Z, "--zero-stage", "2", "--ddp-bucket-size", "3000"]  # many small buckets


@pytest.mark.parametrize("world, extra", [
    (4, Z2),
    (4, Z2 + [TP, "2", "--sequence-parallel"]),
    (4, Z2 + [PP, "2", "--num-layers-per-virtual-pipeline-stage", "1"]),  # buckets span model chunks
    (4, Z2 + [EP, "2", "--grad-reduce-in-bf16"]),
], ids=["dp4", "tp2-sp-dp2", "pp2-interleaved-dp2", "ep2-dp4-bf16-reduce"])
def test_zero2_layout_invariance(single, world, extra):
    _same(single, train_losses(world, extra), rel=1e-2 if "--grad-reduce-in-bf16" in extra else 1e-5)


@pytest.mark.parametrize("world, extra", [
    (1, Z2),
    (2, Z2 + [EP, "2"]),  # expert-DP 1: the expert group has no one to reduce with
], ids=["single", "ep2-edp1"])
def test_zero2_groups_of_one(single, world, extra):
    _same(single, train_losses(world, extra))


def test_zero2_layout_invariance_world8(single_big):
    _same(single_big, train_losses(8, BIG + Z2 + [TP, "2", EP, "2"]))


def _grad_memory(trainer):
    """Persistent and peak gradient bytes of this rank after a real training step."""
    opt = trainer.optimizer
    return dict(opt.memory_bytes(), peak=opt.peak_grad_bytes,
                full=sum(b.layout.numel for b in opt.buffers) * 4, dp=trainer.mesh.dp)


def test_zero2_keeps_only_the_gradient_shard():
    bucket = 3000
    two_steps = TINY_ARGS + ["--train-iters", "2"]
    stage1 = two_steps + [Z, "--ddp-bucket-size", str(bucket)]
    s1 = run_ranks(4, train_and_inspect, stage1, _grad_memory)[0][0]
    s2 = run_ranks(4, train_and_inspect, two_steps + Z2, _grad_memory)[0][0]
    assert s1["grads"] == s1["full"]  # stage 1: the whole fp32 buffer stays for accumulation
    assert s2["full"] == s1["full"] and s2["dp"] == 4
    assert s2["grads"] == s2["full"] // 4  # stage 2: the 1/DP shard persists
    # measured high-water mark: shard + a few transient buckets, well under the full buffer
    assert s2["grads"] < s2["peak"] <= s2["grads"] + s2["grad_buckets"]
    assert s2["peak"] < 0.6 * s1["grads"]


def test_zero2_resume_is_exact_and_loads_into_stage1(tmp_path):
    common = [Z, "--lr-decay-iters", "6", "--ddp-bucket-size", "3000"]
    full = train_losses(2, common + ["--zero-stage", "2", "--train-iters", "6"])
    train_losses(2, common + ["--zero-stage", "2", "--train-iters", "3", "--save", str(tmp_path)])
    resumed = train_losses(2, common + ["--zero-stage", "2", "--train-iters", "6", "--load", str(tmp_path)])
    assert [r["lm_loss"] for r in resumed] == [r["lm_loss"] for r in full[3:]]
    other = train_losses(4, common + ["--train-iters", "6", "--load", str(tmp_path)])  # stage 1, DP 4
    _same(full[3:], other)


@pytest.mark.parametrize("argv, flag", [
    (["--zero-stage", "2"], "--zero-stage 2 needs --use-distributed-optimizer"),
    ([Z, "--zero-stage", "3"], "--zero-stage must be 1 or 2"),
    ([Z, "--ddp-bucket-size", "0"], "--ddp-bucket-size must be positive"),
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
])
def test_zero_stage_bad_input(argv, flag):
    assert_one_line_config_error(argv, 4, flag)


OPG = [Z, "--overlap-param-gather", "--ddp-bucket-size", "3000"]


@pytest.mark.parametrize("world, extra", [
    (4, OPG),
    (4, OPG + ["--zero-stage", "2", "--overlap-grad-reduce"]),
    (4, OPG + [TP, "2", "--sequence-parallel", EP, "2"]),
    (4, OPG + [PP, "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
], ids=["dp4", "dp4-zero2", "tp2-sp-ep2-dp2", "pp2-interleaved-dp2"])
def test_overlap_param_gather_layout_invariance(single, world, extra):
    _same(single, train_losses(world, extra))


def test_overlap_param_gather_eval_and_checkpoint_see_updated_weights(tmp_path):
    # eval right after a step (forward hooks must wait) and a save right after a step (must finish
    # the pending gathers) give the same numbers as the synchronous gather
    args = ["--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--lr-decay-iters", "6"]
    sync = train_losses(2, [Z] + args + ["--save", str(tmp_path / "a")])
    over = train_losses(2, OPG + args + ["--save", str(tmp_path / "b")])
    _same(sync, over)
    cont = [Z, "--lr-decay-iters", "6", "--train-iters", "6"]
    resumed = [train_losses(2, cont + ["--load", str(tmp_path / d)])
               for d in ("a", "b")]
    assert [r["lm_loss"] for r in resumed[0]] == [r["lm_loss"] for r in resumed[1]]
