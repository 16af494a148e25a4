"""Layout invariance for data parallelism (docs/ARCHITECTURE.md, "Layout invariance"): DP=2 and DP=4
train openmoe-tiny to the same losses and grad norms as one process (fp32, dropless, rtol 1e-5)."""

import pytest

from tests.conftest import assert_same_losses
from tests.harness import train_losses


@pytest.mark.parametrize("world", [2, 4])
def test_dp_matches_single_process(single, world):
    assert_same_losses(single, train_losses(world), rel=1e-5)
    assert single[-1]["lm_loss"] < single[0]["lm_loss"]


def test_capacity_routing_matches_when_groups_match(single):
    # Capacity drops are per micro-batch; the sampler gives every layout the same micro-batches.
    cap = ["--moe-capacity-factor", "1.0", "--moe-min-capacity", "1"]
    a, b = train_losses(1, cap), train_losses(2, cap)
    assert [r["lm_loss"] for r in b] == pytest.approx([r["lm_loss"] for r in a], rel=1e-5)
    assert a[0]["lm_loss"] != single[0]["lm_loss"]  # tokens really were dropped
