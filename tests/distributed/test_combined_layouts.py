"""Layout invariance with many features at once on 8 ranks: every combination here must train to the
single-process losses (docs/ARCHITECTURE.md, "Layout invariance"), so interactions between features
are covered too."""

import pytest

from tests.conftest import BIG, EP, PP, TP, Z, assert_same_losses
from tests.harness import train_losses


@pytest.mark.parametrize("extra", [
    [TP, "2", "--sequence-parallel", PP, "2", "--num-layers-per-virtual-pipeline-stage", "1", EP, "2",
     Z, "--zero-stage", "2", "--overlap-param-gather", "--moe-alltoall-chunks", "4",
     "--ddp-bucket-size", "3000"],
    [PP, "2", EP, "4", "--moe-hierarchical-alltoall", "--moe-ranks-per-node", "2", Z,
     "--overlap-grad-reduce"],
    [TP, "2", EP, "4", Z, "--zero-stage", "2", "--moe-alltoall-chunks", "2"],
    [PP, "2", "--num-layers-per-virtual-pipeline-stage", "1", EP, "4", "--moe-hierarchical-alltoall",
     "--moe-ranks-per-node", "2", "--recompute-granularity", "full", "--recompute-method", "block"],
], ids=["tp2-sp-pp2-interleaved-ep2-zero2-opg-chunks4", "pp2-ep4-hier-2x2-zero-overlap",
        "tp2-dedup-ep4-zero2-chunks2", "pp2-interleaved-ep4-hier-2x2-recompute"])
def test_everything_at_once_world8(single_big, extra):
    assert_same_losses(single_big, train_losses(8, BIG + extra), rel=1e-5)
    assert single_big[-1]["lm_loss"] < single_big[0]["lm_loss"]  # it trained
