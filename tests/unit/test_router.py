"""Router math on hand-made examples: capacity and drop order, aux and z loss values."""

import math

import torch

from megamoe.moe.router import capacity_keep_mask, expert_capacity, route

# Rows are the routing probabilities of 4 tokens over 3 experts (hand-chosen).
PROBS = torch.tensor([[0.5, 0.3, 0.2],   # top-2: e0, e1
                      [0.6, 0.1, 0.3],   # e0, e2
                      [0.2, 0.7, 0.1],   # e1, e0
                      [0.1, 0.2, 0.7]])  # e2, e1
SHIFT = torch.tensor([1.0, 2.0, 0.0, -1.0])  # per-token logit shift: softmax unchanged, lse = shift


def logits() -> torch.Tensor:
    return PROBS.log() + SHIFT[:, None]


def test_capacity_formula_openmoe():
    # round(cf * tokens / E), no factor k, at least min_capacity
    assert expert_capacity(1.25, 4, 3, 0) == 2  # round(1.667)
    assert expert_capacity(1.25, 4096, 32, 4) == 160
    assert expert_capacity(1.25, 8, 32, 4) == 4  # min capacity wins
    assert expert_capacity(2.0, 10, 4, 0) == 5


def test_top1_choices_fill_buffers_before_top2():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    keep = capacity_keep_mask(ids, num_experts=3, capacity=2)
    # Round 1 (top-1, token order): e0 <- t0, t1; t2 overflows e0; e1 <- t3.
    # Round 2 (top-2): e1 <- t0 (2nd slot); e2 <- t1; t2's e1 overflows; t3's e0 is full.
    expected = torch.tensor([[True, True], [True, True], [False, False], [True, False]])
    assert torch.equal(keep, expected)


def test_route_dropless_and_capacity():
    r = route(logits(), topk=2, capacity=None)
    assert torch.equal(r.expert_ids, torch.tensor([[0, 1], [0, 2], [1, 0], [2, 1]]))
    # combine weights are the un-renormalised probabilities
    torch.testing.assert_close(r.combine, torch.tensor([[0.5, 0.3], [0.6, 0.3], [0.7, 0.2], [0.7, 0.2]]))
    assert torch.equal(r.tokens_per_expert, torch.tensor([3, 3, 2]))
    capped = route(logits(), topk=2, capacity=1)
    # capacity 1: the top-1 round fills e0 <- t0, e1 <- t2, e2 <- t3 (t1's e0 overflows), so every
    # top-2 choice finds its expert full: t1 loses both assignments.
    assert torch.equal(capped.keep, torch.tensor([[True, False], [False, False], [True, False],
                                                  [True, False]]))
    torch.testing.assert_close(capped.combine[1], torch.zeros(2))


def test_aux_and_z_loss_hand_values():
    r = route(logits(), topk=2, capacity=None)
    # fraction of tokens choosing each expert (any of top-2): e0 3/4, e1 3/4, e2 2/4
    # mean probability: e0 1.4/4, e1 1.3/4, e2 1.3/4
    expected_aux = 9 * (0.75 * 0.35 + 0.75 * 0.325 + 0.5 * 0.325) / 3
    assert math.isclose(float(r.aux_loss), expected_aux, rel_tol=1e-6)
    assert math.isclose(expected_aux, 2.00625, rel_tol=1e-12)
    # logsumexp of each row is its shift -> z = mean(shift^2) = (1 + 4 + 0 + 1) / 4
    assert math.isclose(float(r.z_loss), 1.5, rel_tol=1e-5)


def test_aux_loss_equals_k_when_balanced():
    e, k = 4, 2
    lg = torch.zeros(8, e)
    lg[torch.arange(8), torch.arange(8) % e] = 1.0  # every expert top-1 for 2 tokens
    lg[torch.arange(8), (torch.arange(8) + 1) % e] = 0.5
    r = route(lg, topk=k, capacity=None)
    assert math.isclose(float(r.aux_loss), k, rel_tol=1e-6)


def test_aux_loss_gradient_flows_to_logits_only_through_probs():
    lg = logits().requires_grad_()
    r = route(lg, topk=2, capacity=None)
    (r.aux_loss + r.z_loss).backward()
    assert lg.grad is not None and torch.isfinite(lg.grad).all() and lg.grad.abs().sum() > 0
