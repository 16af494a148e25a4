"""Layout invariance of the Mixtral family (docs/ARCHITECTURE.md, "Layout invariance"): mixtral-tiny
(GQA with 2 query groups, SwiGLU experts, renormalised top-2, every layer MoE) trains to the
single-process losses under TP+SP, EP with ZeRO, PP with TP and EP, and resumes under another layout."""

import pytest

from tests.conftest import EP, PP, TP, Z, assert_same_losses
from tests.harness import TINY_ARGS, train_losses

MIXTRAL_ARGS = ["--model-preset", "mixtral-tiny"] + TINY_ARGS[2:]


@pytest.fixture(scope="module")
def mixtral_single():
    return train_losses(1, base_args=MIXTRAL_ARGS)


@pytest.mark.parametrize("world, extra", [
    (2, [TP, "2", "--sequence-parallel"]),  # one key/value head per TP rank
    (4, [EP, "4", Z, "--zero-stage", "2"]),
    (4, [PP, "2", TP, "2", EP, "2", "--recompute-granularity", "selective"]),
], ids=["tp2-sp", "ep4-zero2", "pp2-tp2-ep2-selective-recompute"])
def test_mixtral_layout_invariance(mixtral_single, world, extra):
    assert_same_losses(mixtral_single, train_losses(world, extra, base_args=MIXTRAL_ARGS), rel=1e-5)
    assert mixtral_single[-1]["lm_loss"] < mixtral_single[0]["lm_loss"]  # it trained


def test_mixtral_reshard_resume(mixtral_single, tmp_path):
    """Saved at step 5 under TP2+SP x EP2 with ZeRO (world 4), resumed in one process: the same losses."""
    train_losses(4, [TP, "2", "--sequence-parallel", EP, "2", Z, "--train-iters", "5",
                     "--lr-decay-iters", "10", "--save", str(tmp_path)], base_args=MIXTRAL_ARGS)
    resumed = train_losses(1, ["--load", str(tmp_path)], base_args=MIXTRAL_ARGS)
    assert [r["iteration"] for r in resumed] == list(range(6, 11))
    assert_same_losses(mixtral_single[5:], resumed, rel=1e-5, n=5, keys=("lm_loss", "grad_norm"))
