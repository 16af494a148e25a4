"""Activation recomputation (--recompute-granularity full|selective): the same losses and gradients
as storing activations, in every layout; fewer saved activation bytes; MoE statistics and all-to-all
counters counted once; bad combinations rejected in one line."""

import pytest

from megamoe.arguments import parse_args
from tests.conftest import BIG, EP, PP, TP, Z, assert_one_line_config_error, assert_same_losses
from tests.harness import TINY_ARGS, run_ranks, train_losses

FULL = ["--recompute-granularity", "full"]


@pytest.mark.parametrize("extra", [
    FULL,
    FULL + ["--recompute-num-layers", "2"],
    FULL + ["--recompute-method", "block", "--recompute-num-layers", "1"],
    ["--recompute-granularity", "selective"],
], ids=["full-uniform1", "full-uniform2", "full-block1", "selective"])
def test_recompute_single_process_matches(single, extra):
    assert_same_losses(single, train_losses(1, extra), rel=1e-6)


def test_recompute_world8_tp_sp_pp_ep_zero2(single_big):
    layout = FULL + [TP, "2", "--sequence-parallel", PP, "2", EP, "2", Z, "--zero-stage", "2"]
    assert_same_losses(single_big, train_losses(8, BIG + layout), rel=1e-5)


def test_recompute_counts_all_to_all_once():
    plain = train_losses(2, [EP, "2", "--train-iters", "2"])
    again = train_losses(2, [EP, "2", "--train-iters", "2"] + FULL)
    for a, b in zip(plain, again):
        assert a["a2a_bytes_intra"] > 0
        for key in ("a2a_bytes_intra", "a2a_msgs_intra", "aux_loss", "z_loss", "load_imbalance"):
            assert b[key] == a[key], key


def _saved_bytes(rank, world, extra):
    import torch

    from megamoe.parallel.mesh import ParallelMesh
    from megamoe.parallel.schedules import ActivationMeter
    from megamoe.training.recompute import apply_recompute
    from megamoe.training.run import build_stage_model

    cfg = parse_args(TINY_ARGS + ["--seq-length", "128"] + extra)
    mesh = ParallelMesh.from_config(cfg.parallel, world, rank)
    mesh.build_groups()
    model = apply_recompute(build_stage_model(cfg, mesh), cfg.train).chunks[0]
    model.init_weights(1)
    model.train()
    tokens = torch.randint(0, 1000, (2, 128))
    with ActivationMeter() as meter:
        loss = model.loss(tokens, tokens)
    peak = meter.peak
    loss.backward()
    return peak


def test_full_recompute_saves_far_fewer_activation_bytes():
    plain, full, selective = (run_ranks(1, _saved_bytes, extra)[0]
                              for extra in ([], FULL, ["--recompute-granularity", "selective"]))
    # full keeps each layer's input ([2, 128, 64] fp32 = 64 KiB) and the head's activations
    assert full < 0.4 * plain
    assert selective <= plain


@pytest.mark.parametrize("argv, message", [
    (FULL + [EP, "2", "--moe-alltoall-chunks", "2"], "does not combine with --moe-alltoall-chunks"),
    (FULL + ["--recompute-num-layers", "0"], "--recompute-num-layers must be >= 1"),
    (["--recompute-granularity", "everything"], "--recompute-granularity"),
])
def test_recompute_bad_input(argv, message):
    assert_one_line_config_error(argv, 2, message)


def _build(extra):
    from megamoe.parallel.mesh import ParallelMesh
    from megamoe.training.recompute import apply_recompute
    from megamoe.training.run import build_stage_model

    cfg = parse_args(TINY_ARGS + extra)
    mesh = ParallelMesh.from_config(cfg.parallel, 1, 0)
    mesh.build_groups()
    model = apply_recompute(build_stage_model(cfg, mesh), cfg.train)
    model.init_weights(1)
    return model


@pytest.mark.parametrize("extra", [
    FULL + ["--recompute-num-layers", "2"],
    FULL + ["--recompute-method", "block", "--recompute-num-layers", "1"],
    ["--recompute-granularity", "selective"],
], ids=["full-uniform2", "full-block1", "selective"])
def test_recompute_keeps_names_and_runs_plain_outside_training(extra, monkeypatch):
    import torch

    from megamoe.training import recompute

    plain, wrapped = _build([]), _build(extra)
    # parameter names seed the initialisation and key checkpoints: wrapping must not rename any
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    for a, b in zip(plain.parameters(), wrapped.parameters()):
        assert torch.equal(a, b)
    tokens = torch.randint(0, 1000, (2, 32))
    calls = []
    real = recompute.checkpoint
    monkeypatch.setattr(recompute, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped.chunks[0](tokens), plain.chunks[0](tokens))
    wrapped.train()
    with torch.no_grad():
        wrapped.chunks[0](tokens)
    assert not calls  # eval, or no grad: nothing is checkpointed
    wrapped.chunks[0].loss(tokens, tokens).backward()
    assert calls
