"""Grouped expert MLP and the MoE layer against naive per-expert / per-token references."""

import torch
import torch.nn.functional as F

from megamoe.config import MoEConfig
from megamoe.model.init import init_model_weights
from megamoe.moe.dispatcher import ExpertPlacement, permute, unpermute
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.layer import MoELayer, MoEStats
from megamoe.moe.router import route

H, FFN, E = 16, 24, 4


def naive_expert(x, wg, wu, wo):
    h = x @ wg
    x1, x2 = h.chunk(2, dim=-1)
    return ((x1 * F.silu(x2)) * (x @ wu)) @ wo


def make_experts(grouped: bool) -> GroupedExperts:
    ex = GroupedExperts(H, FFN, list(range(E)), std=0.1, out_std=0.1, grouped=grouped)
    init_model_weights(ex, seed=3)
    return ex


def test_grouped_matches_per_expert_loop_forward_and_backward():
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 9, 2])  # includes an expert with no tokens
    x = torch.randn(int(counts.sum()), H)
    for grouped in (True, False):
        ex = make_experts(grouped)
        xa = x.clone().requires_grad_()
        ya = ex(xa, counts)
        dy = torch.randn_like(ya)
        ya.backward(dy)
        # reference: explicit loop over experts with fresh leaf copies of the weights
        ws = [p.detach().clone().requires_grad_() for p in (ex.wi_gate, ex.wi_up, ex.wo)]
        xb = x.clone().requires_grad_()
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            outs.append(naive_expert(xb[start:start + n], ws[0][e], ws[1][e], ws[2][e]))
            start += n
        yb = torch.cat(outs)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
        for p, ref in zip((ex.wi_gate, ex.wi_up, ex.wo), ws):
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-6)
        assert ex.wi_gate.grad[1].abs().max() == 0  # the empty expert gets an exact zero gradient


def test_zero_tokens_at_all():
    ex = make_experts(True)
    y = ex(torch.zeros(0, H), torch.zeros(E, dtype=torch.int64))
    assert y.shape == (0, H)


def test_permute_unpermute_identity_experts_is_combine_weighted_input():
    torch.manual_seed(1)
    x = torch.randn(10, H)
    r = route(torch.randn(10, E), topk=2, capacity=3)
    rows, perm = permute(x, r, ExpertPlacement.contiguous(E))
    assert perm.counts.tolist() == [int(((r.expert_ids == e) & r.keep).sum()) for e in range(E)]
    out = unpermute(rows, perm, 10)
    torch.testing.assert_close(out, x * r.combine.sum(-1, keepdim=True))


def test_moe_layer_matches_per_token_reference():
    torch.manual_seed(2)
    cfg = MoEConfig(num_experts=E, router_topk=2)
    layer = MoELayer(1, H, FFN, cfg, std=0.1, out_std=0.1, stats=MoEStats())
    init_model_weights(layer, seed=5)
    x = torch.randn(2, 5, H)
    out = layer(x)
    xt = x.reshape(-1, H)
    probs = torch.softmax(xt @ layer.gate_weight.t(), -1)
    ref = torch.zeros_like(xt)
    ex = layer.experts
    for t in range(xt.shape[0]):
        p, ids = probs[t].topk(2)
        for w, e in zip(p.tolist(), ids.tolist()):
            ref[t] += w * naive_expert(xt[t:t + 1], ex.wi_gate[e], ex.wi_up[e], ex.wo[e])[0]
    torch.testing.assert_close(out.reshape(-1, H), ref, rtol=1e-5, atol=1e-6)
    assert layer.stats.calls == 1 and int(layer.stats.tokens_per_expert[1].sum()) == 20


def test_router_loss_gradient_reaches_gate_with_scale():
    """The aux/z losses contribute coeff * grad_scale * d(loss)/d(gate) without being returned."""
    torch.manual_seed(3)
    cfg = MoEConfig(num_experts=E, router_topk=2, aux_loss_coeff=0.5, z_loss_coeff=0.25)
    stats = MoEStats()
    layer = MoELayer(1, H, FFN, cfg, std=0.1, out_std=0.1, stats=stats)
    init_model_weights(layer, seed=5)
    stats.reset(grad_scale=0.5)
    x = torch.randn(1, 6, H)
    layer(x).sum().backward()
    g_total = layer.gate_weight.grad.clone()
    layer.zero_grad()
    # Reference: the output path alone plus the explicit router losses.
    stats.reset(grad_scale=0.0)
    out = layer(x)
    r = route(x.reshape(-1, H) @ layer.gate_weight.t(), 2, None)
    (out.sum() + 0.5 * (0.5 * r.aux_loss + 0.25 * r.z_loss)).backward()
    torch.testing.assert_close(layer.gate_weight.grad, g_total, rtol=1e-5, atol=1e-7)
