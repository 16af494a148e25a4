"""The expert MLP's one autograd function and its buffer pool: values against a naive reference with
pooled buffers reused across layers, buffers handed back exactly when nothing reads them again."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megamoe import cpu_kernels
from megamoe.buffer_pool import BufferPool
from megamoe.moe.expert_mlp import expert_mlp

H, FFN = 16, 24
COUNTS = torch.tensor([5, 0, 9, 2])


def _weights(activation: str, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    width = 2 if activation == "openmoe" else 1
    shapes = [(4, H, width * FFN), (4, H, FFN), (4, FFN, H)]
    return [(torch.randn(s) * 0.3).requires_grad_() for s in shapes]


def _naive(x: torch.Tensor, counts: torch.Tensor, weights: list[torch.Tensor], activation: str):
    wg, wu, wo = weights
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start:start + n]
        g, u = xe @ wg[e], xe @ wu[e]
        if activation == "openmoe":
            x1, x2 = g.chunk(2, dim=-1)
            hidden = x1 * F.silu(x2) * u
        else:
            hidden = F.silu(g) * u
        outs.append(hidden @ wo[e])
        start += n
    return torch.cat(outs)


def _clone(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in ts]


@pytest.mark.parametrize("c_kernels", [False, True], ids=["torch-ops", "c-kernels"])
@pytest.mark.parametrize("activation", ["openmoe", "swiglu"])
def test_two_layers_share_the_pool_and_match_the_reference(activation, c_kernels, monkeypatch):
    """Layer 2's forward must not take layer 1's saved buffers; backward hands them back, and a second
    step reuses them (no new buffer) with the same results."""
    if c_kernels and cpu_kernels.library() is None:
        pytest.skip(cpu_kernels.status)
    monkeypatch.setattr(cpu_kernels, "ENABLED", c_kernels)
    pool = BufferPool()
    w1, w2 = _weights(activation, 1), _weights(activation, 2)
    x = torch.randn(int(COUNTS.sum()), H)
    dy = torch.randn(len(x), H)
    ref_w1, ref_w2 = _clone(w1), _clone(w2)
    xr = x.clone().requires_grad_()
    yr = _naive(_naive(xr, COUNTS, ref_w1, activation), COUNTS, ref_w2, activation)
    yr.backward(dy)
    pointers = []
    for step in range(2):
        for w in (*w1, *w2):
            w.grad = None
        xa = x.clone().requires_grad_()
        y = expert_mlp(expert_mlp(xa, *w1, COUNTS, None, True, activation, pool),
                       *w2, COUNTS, None, True, activation, pool)
        # 3 saved buffers per layer in use; after a step the pool holds those 6 and (PyTorch ops only)
        # the buffer of the silu recomputed in backward
        spare = 0 if c_kernels else 1
        assert len(pool._free) == (0 if step == 0 else spare)
        y.backward(dy)
        # two layers of differently ordered products (and glibc's expf for the C kernels): a few
        # roundings apart
        torch.testing.assert_close(y, yr, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-4, atol=1e-5)
        for w, ref in zip((*w1, *w2), (*ref_w1, *ref_w2)):
            torch.testing.assert_close(w.grad, ref.grad, rtol=1e-4, atol=1e-5)
        pointers.append(sorted(buf.data_ptr() for buf in pool._free))
    assert len(pointers[0]) == 6 + spare
    assert pointers[0] == pointers[1]  # the second step allocated nothing new


def test_forward_output_matches_reference_bit_for_bit_in_the_pooled_path(torch_ops_only):
    w = _weights("openmoe", 3)
    x = torch.randn(int(COUNTS.sum()), H)
    with torch.no_grad():
        y = expert_mlp(x, *w, COUNTS, None, False, "openmoe", BufferPool())
        torch.testing.assert_close(y, _naive(x, COUNTS, w, "openmoe"), rtol=0, atol=0)


def test_no_grad_forward_gives_its_buffers_back_at_once():
    pool = BufferPool()
    w = _weights("openmoe", 4)
    x = torch.randn(int(COUNTS.sum()), H)
    with torch.no_grad():
        expert_mlp(x, *w, COUNTS, None, True, "openmoe", pool)
    assert len(pool._free) == 3
    frozen = [t.detach() for t in w]
    expert_mlp(x, *frozen, COUNTS, None, True, "openmoe", pool)  # nothing requires grad
    assert len(pool._free) == 3


def test_second_backward_raises_instead_of_reading_overwritten_buffers():
    w = _weights("openmoe", 5)
    x = torch.randn(int(COUNTS.sum()), H, requires_grad=True)
    y = expert_mlp(x, *w, COUNTS, None, True, "openmoe", BufferPool())
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        y.sum().backward()


def test_activation_checkpointing_recomputes_and_matches():
    pool = BufferPool()
    w = _weights("swiglu", 6)
    x = torch.randn(int(COUNTS.sum()), H)
    dy = torch.randn(len(x), H)
    grads = []
    for use_checkpoint in (False, True):
        for t in w:
            t.grad = None
        xa = x.clone().requires_grad_()
        fn = lambda a: expert_mlp(a, *w, COUNTS, None, True, "swiglu", pool)  # noqa: E731
        y = checkpoint(fn, xa, use_reentrant=False) if use_checkpoint else fn(xa)
        y.backward(dy)
        grads.append([xa.grad, *(t.grad for t in w)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pool_best_fit_reuse_and_bounded_count():
    pool = BufferPool(slack=0.0)
    a = pool.take((4, 8), torch.float32, torch.device("cpu"))
    b = pool.take((2, 8), torch.float32, torch.device("cpu"))
    pool.give(a, b)
    c = pool.take((1, 10), torch.float32, torch.device("cpu"))  # fits both: the smaller (16) one
    assert c.data_ptr() == b.data_ptr() and c.shape == (1, 10) and c.is_contiguous()
    d = pool.take((5, 8), torch.float32, torch.device("cpu"))  # fits neither: the 32 one is dropped
    assert len(pool._free) == 0 and d.numel() == 40
    pool.give(c, d)
    pool.give(d)  # twice: ignored
    pool.give(torch.empty(100))  # never lent: ignored
    assert len(pool._free) == 2 and pool.pooled_bytes == (16 + 40) * 4
    e = pool.take((3,), torch.float64, torch.device("cpu"))  # another dtype: a new buffer
    assert e.dtype == torch.float64 and len(pool._free) == 2
    pool.clear()
    assert pool.pooled_bytes == 0
