"""Checkpoints: exact resume, resharding across layouts and expert placements, clear errors."""

import pytest

from megamoe.moe.dispatcher import ExpertPlacement
from megamoe.training.checkpoint import CheckpointError
from tests.conftest import BIG, EP, PP, TP, Z, assert_bitwise, assert_same_losses
from tests.harness import TINY_ARGS, run_ranks, train_losses


def test_exact_resume_20_steps_single_process(tmp_path):
    common = ["--lr-decay-iters", "20"]
    full = train_losses(1, common + ["--train-iters", "20"])
    train_losses(1, common + ["--train-iters", "10", "--save", str(tmp_path)])
    assert_bitwise(full[10:], train_losses(1, common + ["--train-iters", "20", "--load", str(tmp_path)]))


def test_exact_resume_tp2_ep2_pp2_world8(tmp_path):
    layout = BIG + ["--lr-decay-iters", "8", TP, "2", EP, "2", PP, "2", Z]
    full = train_losses(8, layout + ["--train-iters", "8"])
    train_losses(8, layout + ["--train-iters", "4", "--save", str(tmp_path)])
    assert_bitwise(full[4:], train_losses(8, layout + ["--train-iters", "8", "--load", str(tmp_path)]))


@pytest.fixture(scope="module")
def resharding_source(tmp_path_factory):
    """A checkpoint at step 3 saved under TP2+SP x EP2 x PP2 with ZeRO (world 8), and the
    uninterrupted single-process run it should continue."""
    d = tmp_path_factory.mktemp("reshard")
    big = BIG + ["--lr-decay-iters", "6"]
    train_losses(8, big + ["--train-iters", "3", "--save", str(d), TP, "2", "--sequence-parallel", EP, "2",
                           PP, "2", Z])
    return d, big, train_losses(1, big + ["--train-iters", "6"])


@pytest.mark.parametrize("world, extra", [
    (1, []),
    (8, [EP, "4"]),  # EP4 x DP2, plain optimizer
    (8, [EP, "4", Z]),
    (4, [PP, "4"]),
], ids=["single", "ep4-dp2", "ep4-dp2-zero", "pp4"])
def test_reshard_to_another_layout(resharding_source, world, extra):
    d, big, full = resharding_source
    resumed = train_losses(world, big + ["--train-iters", "6", "--load", str(d)] + extra)
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    assert_same_losses(full[3:], resumed, rel=1e-5, n=3, keys=("lm_loss", "grad_norm"))


def test_load_under_another_expert_placement(tmp_path):
    common = ["--lr-decay-iters", "6", EP, "2"]
    full = train_losses(2, common + ["--train-iters", "6"])
    train_losses(2, common + ["--train-iters", "3", "--save", str(tmp_path)])
    swapped = ExpertPlacement.from_ranks([1, 0, 1, 0, 1, 0, 1, 0], 2)  # odd experts on EP rank 0
    resumed = train_losses(2, common + ["--train-iters", "6", "--load", str(tmp_path)], placement=swapped)
    assert [r["lm_loss"] for r in resumed] == pytest.approx([r["lm_loss"] for r in full[3:]], rel=1e-5)


def test_missing_and_mismatched_checkpoints(tmp_path):
    train_losses(1, ["--train-iters", "2", "--save", str(tmp_path)])
    with pytest.raises(CheckpointError, match="--hidden-size|hidden-size 64"):
        train_losses(1, ["--train-iters", "3", "--load", str(tmp_path), "--hidden-size", "32",
                         "--kv-channels", "8"])
    (tmp_path / "latest").write_text("iter_0000099\n")
    with pytest.raises(CheckpointError, match="iter_0000099 named by .* is missing"):
        train_losses(1, ["--train-iters", "3", "--load", str(tmp_path)])
    assert train_losses(1, ["--train-iters", "2", "--load", str(tmp_path / "empty")])  # none yet: fresh


def test_resume_restores_the_saved_expert_placement(tmp_path, monkeypatch):
    from megamoe.training import checkpoint, run

    common = ["--lr-decay-iters", "6", EP, "2"]
    swapped = ExpertPlacement.from_ranks([1, 0, 1, 0, 1, 0, 1, 0], 2)
    full = train_losses(2, common + ["--train-iters", "6"], placement=swapped)
    train_losses(2, common + ["--train-iters", "3", "--save", str(tmp_path)], placement=swapped)
    assert checkpoint.saved_placement(str(tmp_path), 2) == {1: swapped, 3: swapped}  # the MoE layers
    assert checkpoint.saved_placement(str(tmp_path), 4) is None  # another EP size: default placement
    built = run.build_stage_model

    def must_be_swapped(cfg, mesh, placement=None):  # runs inside the forked ranks
        assert placement == {1: swapped, 3: swapped}, placement
        return built(cfg, mesh, placement)

    monkeypatch.setattr(run, "build_stage_model", must_be_swapped)
    resumed = train_losses(2, common + ["--train-iters", "6", "--load", str(tmp_path)])
    assert [r["lm_loss"] for r in resumed] == [r["lm_loss"] for r in full[3:]]


def _rng_round_trip(rank, world, directory, load_world):
    import torch

    from megamoe.arguments import parse_args
    from megamoe.parallel.mesh import ParallelMesh
    from megamoe.parallel.optimizer import build_optimizer
    from megamoe.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from megamoe.training.run import build_stage_model

    cfg = parse_args(TINY_ARGS)
    mesh = ParallelMesh.from_config(cfg.parallel, world, rank)
    mesh.build_groups()
    model = build_stage_model(cfg, mesh)
    model.init_weights(1)
    opt = build_optimizer(model, cfg, mesh)
    if world == load_world:  # save, remember what comes next, scramble, load
        torch.manual_seed(100 + rank)
        save_checkpoint(directory, TrainState(1, 8), model, opt, cfg, mesh)
        expected = torch.rand(4).tolist()  # lists: tensors through the queue race with exit
    else:
        expected = None
    torch.manual_seed(7)
    load_checkpoint(directory, model, opt, mesh, cfg)
    return expected, torch.rand(4).tolist()


def test_rng_state_per_rank_round_trip(tmp_path):
    res = run_ranks(2, _rng_round_trip, str(tmp_path), 2)
    for expected, got in res:
        assert got == expected
    assert res[0][1] != res[1][1]  # each rank got its own stream back
    # under another world size every rank takes rank 0's stream
    (_, alone), = run_ranks(1, _rng_round_trip, str(tmp_path), 2)
    assert alone == res[0][0]


SAVE_MEMORY_ARGS = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4",
                    "--ffn-hidden-size", "512", "--num-experts", "8", Z, "--ddp-bucket-size", "1000000"]


def _save_peak_memory(rank, world, directory):
    """Peak resident memory of a save above the steady state (KiB, from the kernel's VmHWM, reset just
    before the save), with the sizes it is to be compared with."""
    import gc
    import re

    import torch

    from megamoe.arguments import parse_args
    from megamoe.parallel.mesh import ParallelMesh
    from megamoe.parallel.optimizer import build_optimizer
    from megamoe.training.checkpoint import TrainState, save_checkpoint
    from megamoe.training.run import build_model

    def status(field):
        return 1024 * int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))

    # glibc raises its mmap threshold after big frees and then keeps freed blocks resident; fix it at
    # 128 KiB so the resident size follows what the save holds (the CUDA allocator has no such drift)
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD

    cfg = parse_args(TINY_ARGS + SAVE_MEMORY_ARGS)
    mesh = ParallelMesh.from_config(cfg.parallel, world, rank)
    mesh.build_groups()
    model = build_model(cfg, mesh, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg, mesh)
    optimizer.start_step(1)
    tokens = torch.randint(0, 1000, (2, 32))
    model.chunks[0].loss(tokens, tokens).backward()
    optimizer.finish_grad_sync()
    optimizer.step(1e-3, optimizer.grad_norm())  # AdamW moments exist from here on
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident size
    steady = status("VmRSS")
    save_checkpoint(directory, TrainState(1, 8), model, optimizer, cfg, mesh)
    extra = status("VmHWM") - steady
    bucket = max(b.end - b.start for buf in optimizer.buffers for b in buf.layout.buckets) * 4
    largest = max(p[0].numel() * 4 if p.ndim == 3 else p.numel() * 4 for p in model.parameters())
    states = sum(p.numel() for p in model.parameters()) * 4 * 2  # the rank's two moments, whole
    return extra, bucket, largest, states


def test_save_streams_optimizer_state_bucket_by_bucket(tmp_path):
    # A save used to rebuild every parameter's master and moments in full on every rank (3 flat
    # buffers plus clones: ~1.5x this rank's state, 6x its parameters); now it gathers one bucket and
    # kind at a time to the writer and streams each piece into the file.
    for extra, bucket, largest, states in run_ranks(2, _save_peak_memory, str(tmp_path)):
        assert extra < bucket + largest + (4 << 20), (extra, bucket, largest)  # 4 MiB: interpreter noise
        assert extra < states / 4
