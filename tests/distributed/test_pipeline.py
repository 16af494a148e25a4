"""Pipeline parallelism: stage partition, layout invariance of 1F1B / interleaved / uneven stages
combined with TP, SP, EP and DP, activation memory of 1F1B vs all-forward-all-backward, bad input."""

import pytest

from megamoe.arguments import parse_args
from megamoe.config import stage_layer_ranges
from tests.conftest import BIG, EP, PP, TP, assert_one_line_config_error, assert_same_losses
from tests.harness import TINY_ARGS, run_ranks, train_losses

V = "--num-layers-per-virtual-pipeline-stage"


def test_stage_ranges():
    assert stage_layer_ranges(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # virtual stage v = chunk * pp + rank: rank 0 holds layers 0 and 4 when pp=2, vp=4? (8 layers)
    assert stage_layer_ranges(8, 2, 4)[4] == range(4, 5)
    assert stage_layer_ranges(24, 4, first=3, last=5) == [range(0, 3), range(3, 11), range(11, 19),
                                                          range(19, 24)]
    assert stage_layer_ranges(4, 2, first=1) == [range(0, 1), range(1, 4)]


@pytest.mark.parametrize("argv, world, flag", [
    ([PP, "3"], 3, "--num-layers 4 is not divisible into 3 pipeline stages"),
    ([PP, "2", V, "3"], 2, "--num-layers-per-virtual-pipeline-stage 3"),
    ([PP, "2", V, "1", "--global-batch-size", "2", "--micro-batch-size", "2"], 2,
     "interleaved pipelining needs the micro-batches"),
    ([PP, "2", "--decoder-first-pipeline-num-layers", "5"], 2, "does not split evenly"),
    ([V, "1"], 1, "needs --pipeline-model-parallel-size > 1"),
])
def test_bad_input_is_one_line_before_launch(argv, world, flag):
    assert_one_line_config_error(argv, world, flag)


@pytest.mark.parametrize("world, extra", [
    (2, [PP, "2"]),
    (4, [PP, "4"]),
    (2, [PP, "2", V, "1"]),  # 2 virtual stages per rank, micro-batches = 2 x stages
    (4, [PP, "2", TP, "2", "--sequence-parallel"]),
    (2, [PP, "2", "--decoder-first-pipeline-num-layers", "1"]),
    (2, [PP, "2", "--decoder-last-pipeline-num-layers", "3"]),
], ids=["pp2", "pp4", "pp2-interleaved", "pp2-tp2-sp", "pp2-first1", "pp2-last3"])
def test_pp_layout_invariance(single, world, extra):
    assert_same_losses(single, train_losses(world, extra), rel=1e-5)


def test_pp2_ep2_dp2_world8(single_big):
    assert_same_losses(single_big, train_losses(8, BIG + [PP, "2", EP, "2"]), rel=1e-5)


def test_interleaved_with_micro_batches_equal_to_stages():
    deep = ["--num-layers", "8"]  # 4 ranks x 2 chunks; 4 micro-batches = all-warmup path
    assert_same_losses(train_losses(1, deep), train_losses(4, deep + [PP, "4", V, "1"]), rel=1e-5)


def _activation_peak(rank, world, schedule_name, gbs):
    import torch

    from megamoe.data.mock import MockGPTDataset
    from megamoe.data.sampler import micro_batches
    from megamoe.parallel import schedules
    from megamoe.parallel.mesh import ParallelMesh
    from megamoe.parallel.pipeline import P2P
    from megamoe.training.run import build_stage_model

    cfg = parse_args(TINY_ARGS + [PP, str(world), "--global-batch-size", str(gbs), "--micro-batch-size", "1"])
    mesh = ParallelMesh.from_config(cfg.parallel, world, rank)
    mesh.build_groups()
    model = build_stage_model(cfg, mesh)
    model.init_weights(1)
    data = MockGPTDataset(cfg.model.seq_length, cfg.model.vocab_size, 1, gbs)
    ring = mesh.members["pp"]
    p2p = P2P(ring[(rank + 1) % world], ring[(rank - 1) % world], (1, cfg.model.seq_length, 64),
              torch.float32, torch.device("cpu"))
    ctx = schedules.StepContext(chunks=list(model.chunks), batches=list(micro_batches(data, 0, gbs, 1, 0, 1)),
                                pp=world, rank=rank, p2p=p2p, loss_scale=1.0 / gbs)
    with schedules.ActivationMeter() as meter:
        getattr(schedules, schedule_name)(ctx)
    return meter.peak, ctx.max_in_flight


def test_1f1b_activation_memory_bounded_by_stages_not_micro_batches():
    one4 = run_ranks(2, _activation_peak, "one_f_one_b", 4)
    one8 = run_ranks(2, _activation_peak, "one_f_one_b", 8)
    gp4 = run_ranks(2, _activation_peak, "all_forward_all_backward", 4)
    gp8 = run_ranks(2, _activation_peak, "all_forward_all_backward", 8)
    # rank 0 of 1F1B keeps at most pp = 2 micro-batches alive; GPipe keeps all m
    assert one4[0][1] == one8[0][1] == 2 and gp4[0][1] == 4 and gp8[0][1] == 8
    assert one8[0][0] == one4[0][0]  # bytes do not grow with micro-batches
    assert gp8[0][0] > 1.9 * gp4[0][0] and gp8[0][0] > 3 * one8[0][0]
