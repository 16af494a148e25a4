"""Fused gated activation and the expert GEMM paths against unfused / naive references."""

import pytest
import torch
import torch.nn.functional as F

from megamoe.model.init import init_model_weights
from megamoe.model.layers import GatedMLP
from megamoe.moe.experts import GroupedExperts, grouped_mm
from megamoe.moe.group_gemm import grouped_mm_supported
from megamoe.ops import gated_act, gated_mul

H, FFN, E = 16, 24, 4


def reference_gated_mul(h_gate, h_up):
    x1, x2 = h_gate.chunk(2, dim=-1)
    return x1 * F.silu(x2) * h_up


def test_gated_mul_gradcheck_float64():
    torch.manual_seed(0)
    h_gate = torch.randn(5, 3, 2 * 6, dtype=torch.float64, requires_grad=True)
    h_up = torch.randn(5, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gated_mul, (h_gate, h_up))


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_gated_mul_matches_unfused_bit_for_bit(needs, torch_ops_only):
    torch.manual_seed(1)
    g0, u0 = torch.randn(37, 2 * FFN) * 3, torch.randn(37, FFN)
    dy = torch.randn(37, FFN)
    results = []
    for fn in (reference_gated_mul, lambda g, u: gated_act(g) * u, gated_mul):
        g, u = g0.clone().requires_grad_(needs[0]), u0.clone().requires_grad_(needs[1])
        y = fn(g, u)
        y.backward(dy)
        results.append((y.detach(), g.grad, u.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            if a is None:
                assert b is None
            else:
                assert torch.equal(a, b)


@pytest.mark.parametrize("c_kernels", [False, True], ids=["torch-ops", "c-kernels"])
def test_gated_mul_non_contiguous_inputs_and_retain_graph(c_kernels, monkeypatch):
    """Strided inputs (the C kernels run on contiguous copies) and a second backward that must see
    unmutated saved tensors; bit for bit the unfused graph with PyTorch ops, a rounding with C."""
    from megamoe import cpu_kernels

    if c_kernels and cpu_kernels.library() is None:
        pytest.skip(cpu_kernels.status)
    monkeypatch.setattr(cpu_kernels, "ENABLED", c_kernels)
    tolerance = dict(rtol=2e-6, atol=1e-6) if c_kernels else dict(rtol=0, atol=0)
    torch.manual_seed(2)
    hgu = torch.randn(9, 3 * FFN, requires_grad=True)  # gate and up as column slices of one tensor
    y = gated_mul(hgu[:, :2 * FFN], hgu[:, 2 * FFN:])
    dy = torch.randn_like(y)
    (g1,) = torch.autograd.grad(y, hgu, dy, retain_graph=True)
    (g2,) = torch.autograd.grad(y, hgu, dy)  # backward must not have mutated what it saved
    ref = hgu.detach().clone().requires_grad_()
    reference_gated_mul(ref[:, :2 * FFN], ref[:, 2 * FFN:]).backward(dy)
    torch.testing.assert_close(g1, ref.grad, **tolerance)
    torch.testing.assert_close(g2, g1, rtol=0, atol=0)


def test_gated_mul_rejects_mismatched_widths():
    with pytest.raises(ValueError):
        gated_mul(torch.randn(3, 10), torch.randn(3, 4))


def test_gated_mlp_uses_fused_op_and_matches_reference():
    torch.manual_seed(3)
    mlp = GatedMLP(H, FFN, std=0.1, out_std=0.1)
    init_model_weights(mlp, seed=4)
    x = torch.randn(2, 5, H, requires_grad=True)
    mlp(x).sum().backward()
    ws = [p.detach().clone().requires_grad_() for p in (mlp.gate_proj.weight, mlp.up_proj.weight,
                                                         mlp.down_proj.weight)]
    xr = x.detach().clone().requires_grad_()
    y = reference_gated_mul(xr @ ws[0].t(), xr @ ws[1].t()) @ ws[2].t()
    y.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    for p, r in zip((mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight), ws):
        torch.testing.assert_close(p.grad, r.grad)


def naive_experts(x, counts, wg, wu, wo):
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start:start + n]
        outs.append(reference_gated_mul(xe @ wg[e], xe @ wu[e]) @ wo[e])
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [0, 0, 7, 0], [3, 3, 3, 3], [0, 6, 0, 1]])
def test_experts_match_naive_reference_and_empty_expert_gets_zero_grad(grouped, counts):
    torch.manual_seed(4)
    counts = torch.tensor(counts)
    ex = GroupedExperts(H, FFN, list(range(E)), std=0.1, out_std=0.1, grouped=grouped)
    init_model_weights(ex, seed=5)
    x = torch.randn(int(counts.sum()), H)
    dy = torch.randn(len(x), H)
    xa = x.clone().requires_grad_()
    y = ex(xa, counts)
    y.backward(dy)
    ws = [p.detach().clone().requires_grad_() for p in (ex.wi_gate, ex.wi_up, ex.wo)]
    xb = x.clone().requires_grad_()
    yb = naive_experts(xb, counts, *ws)
    yb.backward(dy)
    torch.testing.assert_close(y, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for p, ref in zip((ex.wi_gate, ex.wi_up, ex.wo), ws):
        assert p.grad.shape == p.shape and p.grad.is_contiguous()
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-6)
        for e in (counts == 0).nonzero().flatten().tolist():
            assert torch.count_nonzero(p.grad[e]) == 0  # exact zeros, not garbage from torch.empty


@pytest.mark.parametrize("grouped", [True, False])
def test_grouped_mm_weight_only_and_input_only_grads(grouped):
    torch.manual_seed(5)
    counts = torch.tensor([4, 0, 3])
    w = torch.randn(3, 8, 16)
    x = torch.randn(7, 8)
    for need_x, need_w in ((True, False), (False, True)):
        xa, wa = x.clone().requires_grad_(need_x), w.clone().requires_grad_(need_w)
        grouped_mm(xa, wa, counts, grouped).sum().backward()
        xr, wr = x.clone().requires_grad_(need_x), w.clone().requires_grad_(need_w)
        torch.cat([xr[:4] @ wr[0], xr[4:] @ wr[2]]).sum().backward()
        for a, b in ((xa, xr), (wa, wr)):
            if b.requires_grad:
                torch.testing.assert_close(a.grad, b.grad)
            else:
                assert a.grad is None


def test_loop_path_rejects_counts_not_covering_rows():
    with pytest.raises(ValueError):
        grouped_mm(torch.randn(5, 8), torch.randn(2, 8, 4), torch.tensor([2, 2]), grouped=False)


def test_grouped_path_is_available_on_cpu_fp32():
    # the benchmark and training rely on it; fail loudly if a torch upgrade drops it
    assert grouped_mm_supported(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("grouped", [True, False])
def test_experts_follow_autocast_on_both_paths(grouped):
    torch.manual_seed(6)
    counts = torch.tensor([3, 0, 4, 1])
    ex = GroupedExperts(H, FFN, list(range(E)), std=0.1, out_std=0.1, grouped=grouped)
    init_model_weights(ex, seed=7)
    x = torch.randn(8, H, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ex(x, counts)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and ex.wi_gate.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), naive_experts(x.detach(), counts, ex.wi_gate.detach(),
                                                        ex.wi_up.detach(), ex.wo.detach()),
                               rtol=5e-2, atol=5e-2)


def test_experts_backward_with_no_tokens_at_all():
    ex = GroupedExperts(H, FFN, list(range(E)), std=0.1, out_std=0.1)
    init_model_weights(ex, seed=8)
    x = torch.zeros(0, H, requires_grad=True)
    y = ex(x, torch.zeros(E, dtype=torch.int64))
    y.sum().backward()
    assert y.shape == (0, H) and x.grad.shape == (0, H)
    for p in ex.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def _owned_inputs(gate_width: int, seed: int) -> tuple[torch.Tensor, ...]:
    """h_gate / h_up as GEMM outputs (non-leaves owned by the op, as in the expert MLP) of two leaves."""
    torch.manual_seed(seed)
    g0 = (torch.randn(37, gate_width * FFN) * 3).requires_grad_()
    u0 = torch.randn(37, FFN).requires_grad_()
    return g0, u0, g0 * 1.0, u0 * 1.0


@pytest.mark.parametrize("name", ["openmoe", "swiglu"])
def test_reuse_buffers_writes_gradients_over_the_inputs_and_matches(name, torch_ops_only):
    """reuse_buffers: the gradients land in h_gate's and the upstream gradient's buffers (no new
    [N, 2I] / [N, I] tensors) and equal the allocating path's: d_gate bit for bit, d_up bit for bit for
    SwiGLU and within one rounding for OpenMoE ((grad * x1) * s instead of grad * (x1 * s))."""
    from megamoe.ops import EXPERT_ACTIVATIONS, GATE_WIDTH

    fn = EXPERT_ACTIVATIONS[name]
    results, pointers = [], {}
    for reuse in (False, True):
        g0, u0, h_gate, h_up = _owned_inputs(GATE_WIDTH[name], seed=3)
        seen: dict[str, tuple[int, torch.Tensor]] = {}

        def record(key: str, seen: dict = seen):
            return lambda g: seen.__setitem__(key, (g.data_ptr(), g.clone()))

        h_gate.register_hook(record("gate"))
        h_up.register_hook(record("up"))
        y = fn(h_gate, h_up, reuse_buffers=reuse)
        dy = torch.randn(37, FFN, generator=torch.Generator().manual_seed(4))
        gate_ptr, dy_ptr = h_gate.data_ptr(), dy.data_ptr()
        y.backward(dy)
        pointers[reuse] = (seen["gate"][0] == gate_ptr, seen["up"][0] == dy_ptr)
        results.append((y.detach(), seen["gate"][1], seen["up"][1], g0.grad, u0.grad))
    assert pointers[False] == (False, False)
    assert pointers[True] == (True, True)
    plain, reused = results
    assert torch.equal(plain[0], reused[0]) and torch.equal(plain[1], reused[1])
    assert torch.equal(plain[3], reused[3])
    if name == "swiglu":
        assert torch.equal(plain[2], reused[2])
    else:
        torch.testing.assert_close(reused[2], plain[2], rtol=2.5e-7, atol=0)
    torch.testing.assert_close(reused[4], plain[4], rtol=2.5e-7, atol=0)


@pytest.mark.parametrize("name", ["openmoe", "swiglu"])
def test_reuse_buffers_falls_back_for_a_borrowed_gradient(name):
    """An upstream gradient that is an expanded view (e.g. from .sum()) is not overwritten: the
    allocating path runs and the result is the plain one."""
    from megamoe.ops import EXPERT_ACTIVATIONS, GATE_WIDTH

    fn = EXPERT_ACTIVATIONS[name]
    grads = []
    for reuse in (False, True):
        g0, u0, h_gate, h_up = _owned_inputs(GATE_WIDTH[name], seed=5)
        fn(h_gate, h_up, reuse_buffers=reuse).sum().backward()  # grad: expanded ones, stride 0
        grads.append((g0.grad, u0.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_rmsnorm_function_matches_the_formula_and_gradcheck():
    """The fused RMSNorm (one-pass backward) equals autograd through x * rsqrt(mean(x^2) + eps) * w:
    float64 gradcheck, and fp32 values / gradients within a few roundings, bf16 input in bf16 out."""
    from megamoe.model.layers import RMSNorm, _RMSNormFunction

    torch.manual_seed(6)
    x64 = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    w64 = torch.rand(16, dtype=torch.float64).add_(0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-6), (x64, w64))

    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16, requires_grad=True)
    g = torch.randn(3, 5, 16)
    norm(x).backward(g)
    xr = x.detach().clone().requires_grad_()
    wr = norm.weight.detach().clone().requires_grad_()
    ref = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6) * wr
    ref.backward(g)
    torch.testing.assert_close(norm(x), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, wr.grad, rtol=1e-5, atol=1e-5)
    assert norm(x.detach().bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["openmoe", "swiglu"])
def test_c_kernels_match_the_torch_ops(name, monkeypatch):
    """megamoe/cpu_kernels.py's one-pass hidden against the PyTorch fallback, forward and in-place
    backward, with large, zero and infinite pre-activations: equal to a rounding, inf / nan alike."""
    from megamoe import cpu_kernels
    from megamoe.ops import HIDDEN_KERNELS

    if cpu_kernels.library() is None:
        pytest.skip(cpu_kernels.status)
    kernels, width = HIDDEN_KERNELS[name], 2 if name == "openmoe" else 1
    torch.manual_seed(11)
    h_gate, h_up, grad = torch.randn(37, width * FFN) * 4, torch.randn(37, FFN), torch.randn(37, FFN)
    h_gate[0, -4:] = torch.tensor([-1e4, 1e4, float("inf"), 0.0])
    results = []
    for enabled in (False, True):
        monkeypatch.setattr(cpu_kernels, "ENABLED", enabled)
        assert cpu_kernels.usable(h_gate) == enabled
        a, b, c = h_gate.clone(), h_up.clone(), grad.clone()
        y = kernels.forward_into(torch.empty_like(b), a, b)
        d_gate, d_up = kernels.backward_in_place(a, b, c, torch.empty_like(b))
        results.append((y, d_gate.clone(), d_up.clone()))
    for torch_result, c_result in zip(*results):
        torch.testing.assert_close(c_result, torch_result, rtol=2e-6, atol=1e-6, equal_nan=True)


def test_c_kernels_take_fp32_only_and_refuse_strided_pointers():
    from megamoe import cpu_kernels

    x = torch.randn(4, 6)
    assert not cpu_kernels.usable(x.bfloat16())
    if cpu_kernels.library() is not None:
        with pytest.raises(ValueError, match="contiguous"):
            cpu_kernels.run("swiglu_forward", x.t(), x.t(), x.t(), 4)


def test_c_kernels_unavailable_without_a_compiler_fall_back(monkeypatch, tmp_path):
    """No compiler: library() is None with a reason, and the fused hidden still runs (PyTorch ops)."""
    from megamoe import cpu_kernels

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MEGAMOE_CACHE_DIR", str(tmp_path))
    cpu_kernels._build.cache_clear()
    try:
        assert cpu_kernels.library() is None and "failed to run" in cpu_kernels.status
        h_gate, h_up = _owned_inputs(2, 12)[2:]
        gated_mul(h_gate, h_up, reuse_buffers=True).sum().backward()  # runs, through PyTorch ops
    finally:
        cpu_kernels._build.cache_clear()
