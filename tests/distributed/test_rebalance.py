"""The expert rebalancer is function preserving: runs that move experts (with their fp32 masters and
AdamW moments) every 2 steps train to the single-process losses, under every layout that shards or
splits what moves; a checkpoint saved right after a rebalance resumes exactly under another EP size."""

import json

import pytest

from tests.conftest import BIG, EP, PP, TP, Z, assert_one_line_config_error, assert_same_losses
from tests.harness import train_losses

REBALANCE = ["--moe-rebalance-interval", "2", "--moe-rebalance-min-gain", "0"]  # every plan that helps


def _moved(records):
    return sum(r.get("moe_experts_moved", 0) for r in records)


def test_rebalance_ep4_matches_single_process(single):
    records = train_losses(4, [EP, "4", *REBALANCE])
    assert_same_losses(single, records, rel=1e-5)
    assert _moved(records) > 0
    rebalances = [r for r in records if "moe_experts_moved" in r]
    assert [r["iteration"] for r in rebalances] == [2, 4, 6, 8, 10]
    moved = [r for r in rebalances if r["moe_experts_moved"]]
    # bytes: each moved expert is 3 fp32 projections of 64 x 128, 64 x 64, 64 x 64 (H=64, I=64):
    # weight + exp_avg + exp_avg_sq
    per_expert = (64 * 128 + 64 * 64 + 64 * 64) * 4 * 3
    assert all(r["moe_rebalance_bytes"] == r["moe_experts_moved"] * per_expert for r in moved)
    for r in moved:  # the planner only adopts placements that lower the predicted max/mean
        pairs = zip(r["moe_rank_load_before"], r["moe_rank_load_after"])
        assert all(after <= before for before, after in pairs)
        assert r["moe_rank_imbalance_after"] <= r["moe_rank_imbalance_before"]


@pytest.mark.parametrize("extra", [
    [EP, "4", Z, "--zero-stage", "2", "--ddp-bucket-size", "3000"],  # expert state sharded over EDP 2
    [EP, "2", TP, "2", "--sequence-parallel", PP, "2", Z, "--moe-alltoall-chunks", "2"],
    [EP, "8", "--num-experts", "16", "--moe-hierarchical-alltoall", "--moe-ranks-per-node", "4"],
], ids=["ep4-zero2-edp2", "ep2-tp2-sp-pp2-zero1-chunks2", "hierarchical-2x4-16-experts"])
def test_rebalance_world8_matches_single_process(extra, single_big):
    records = train_losses(8, BIG + extra + REBALANCE)
    reference = single_big if "--num-experts" not in extra else train_losses(1, BIG + ["--num-experts", "16"])
    assert_same_losses(reference, records, rel=1e-5)
    assert _moved(records) > 0


def _saved(directory):
    """Every tensor of the checkpoint in ``directory`` by entry name (keyed by logical expert)."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(directory.glob("iter_*/rank_*.safetensors")):
        tensors.update({k: v for k, v in load_file(file).items() if not k.startswith("rng/")})
    return tensors


def test_bf16_masters_and_moments_move_exactly(tmp_path):
    """bf16 weights, ZeRO over expert-DP 2: right after a rebalance every logical expert's weight,
    fp32 master and moments equal those of the run that moved nothing, bit for bit (nothing is
    rebuilt from the bf16 copy)."""
    args = ["--bf16", "--train-iters", "2", EP, "2", Z, "--ddp-bucket-size", "3000"]
    plain = train_losses(4, args + ["--save", str(tmp_path / "plain")])
    moved = train_losses(4, args + ["--save", str(tmp_path / "moved"), *REBALANCE])
    assert moved[-1]["moe_experts_moved"] > 0
    assert [r["lm_loss"] for r in plain] == [r["lm_loss"] for r in moved]
    a, b = _saved(tmp_path / "plain"), _saved(tmp_path / "moved")
    assert a.keys() == b.keys() and any("master" in k for k in a) and any("exp_avg" in k for k in a)
    assert all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def test_resume_right_after_a_rebalance_under_another_ep_size(tmp_path):
    common = ["--lr-decay-iters", "8"]
    full = train_losses(4, common + [EP, "4", "--train-iters", "8", *REBALANCE])
    saved = train_losses(4, common + [EP, "4", "--train-iters", "4", "--save", str(tmp_path), *REBALANCE])
    assert saved[-1]["moe_experts_moved"] > 0  # iteration 4 rebalanced, then saved
    meta = json.loads((tmp_path / "iter_0000004" / "meta.json").read_text())
    moved_layers = {layer: table["rank_of"] for layer, table in meta["placement"]["layers"].items()}
    assert any(ranks != [0, 0, 1, 1, 2, 2, 3, 3] for ranks in moved_layers.values())
    resumed = train_losses(2, common + [EP, "2", "--train-iters", "8", "--load", str(tmp_path)])
    assert [r["iteration"] for r in resumed] == [5, 6, 7, 8]
    assert_same_losses(full[4:], resumed, rel=1e-5, n=4, keys=("lm_loss", "grad_norm"))


def test_expert_load_is_logged_per_layer_at_log_intervals():
    records = train_losses(2, ["--train-iters", "4", "--log-interval", "2", EP, "2"])
    logged = [r for r in records if "moe_expert_load" in r]
    assert [r["iteration"] for r in logged] == [2, 4]
    for r in logged:
        assert r["moe_expert_load_layers"] == [1, 3]
        # 2 steps x 8 samples x 32 tokens x top-2, every assignment counted before capacity drops
        assert [sum(layer) for layer in r["moe_expert_load"]] == [2 * 8 * 32 * 2] * 2
        assert r["moe_expert_rank"] == [[0, 0, 0, 0, 1, 1, 1, 1]] * 2


@pytest.mark.parametrize("argv, message", [
    (["--moe-rebalance-interval", "10"], "--moe-rebalance-interval needs --expert-model-parallel-size > 1"),
    ([EP, "2", "--moe-rebalance-interval", "10", "--moe-rebalance-window", "0"],
     "--moe-rebalance-window must be >= 1"),
    ([EP, "2", "--moe-rebalance-min-gain", "1.5"], "--moe-rebalance-min-gain must be in [0, 1)"),
])
def test_bad_rebalance_flags_are_one_line_errors(argv, message):
    assert_one_line_config_error(argv, 2, message)
