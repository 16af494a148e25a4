"""The expert MLP as ONE autograd function (docs/ARCHITECTURE.md, "Expert MLP buffers"):
y = act(x wi_gate[g], x wi_up[g]) wo[g] for the rows of each local expert g.

Being one function, it knows when every intermediate dies: the three [N, *] GEMM outputs it keeps for
backward and its two backward temporaries come from a buffer pool (megamoe/buffer_pool.py: on the CPU a
fresh buffer of >= 32 MiB page-faults on first touch) and go back to it at the end of backward;
backward writes d_gate over h_gate and d_up over d_hidden, and the two input-gradient GEMMs add into
one output inside the GEMM. Only y, dx and the weight gradients, which leave the function, are new
tensors. FP8 projections keep the per-projection path (moe/experts.py)."""

from __future__ import annotations

import torch

from megamoe import cpu_kernels
from megamoe.buffer_pool import EXPERT_BUFFERS, BufferPool
from megamoe.moe.group_gemm import GroupGemm, group_gemm
from megamoe.ops import HIDDEN_KERNELS, HiddenKernels


def _mm_into(gemm: GroupGemm, a: torch.Tensor, w: torch.Tensor, pool: BufferPool) -> torch.Tensor:
    """a [N, K] @ w[g] [K, M] per group into a pooled [N, M] buffer (a grouped kernel returns its own)."""
    if gemm.offs is not None:
        return gemm.mm(a, w)
    return gemm.mm(a, w, out=pool.take((a.shape[0], w.shape[-1]), a.dtype, a.device))


class _ExpertMLP(torch.autograd.Function):
    """forward: y = act(x wi_gate_g, x wi_up_g) wo_g per group; backward: dx = d_gate wi_gate_g^T +
    d_up wi_up_g^T (one accumulating GEMM pass), d wi_* = x_g^T d_*, d wo = hidden_g^T dy.

    x [N, H] sorted by group, wi_gate [G, H, W*I] (W: the activation's gate width), wi_up [G, H, I],
    wo [G, I, H] -> y [N, H]. Saves x, the weights and h_gate [N, W*I], h_up [N, I], hidden [N, I]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, wi_gate: torch.Tensor, wi_up: torch.Tensor, wo: torch.Tensor,
                gemm: GroupGemm, kernels: HiddenKernels, pool: BufferPool, keep: bool) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # operands arrive cast
            h_gate = _mm_into(gemm, x, wi_gate, pool)
            h_up = _mm_into(gemm, x, wi_up, pool)
            hidden = kernels.forward_into(pool.take(h_up.shape, x.dtype, x.device), h_gate, h_up)
            y = gemm.mm(hidden, wo)  # leaves the function: a tensor of its own
        ctx.gemm, ctx.kernels, ctx.pool, ctx.done = gemm, kernels, pool, False
        if keep:
            ctx.save_for_backward(x, wi_gate, wi_up, wo, h_gate, h_up, hidden)
        else:  # no backward will come (no_grad, or nothing requires grad)
            pool.give(h_gate, h_up, hidden)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.done:
            raise RuntimeError("backward through the expert MLP ran twice (retain_graph=True): its saved "
                               "buffers were overwritten by the first; recompute the forward instead")
        ctx.done = True
        x, wi_gate, wi_up, wo, h_gate, h_up, hidden = ctx.saved_tensors
        need_x, need_gate, need_up, need_wo = ctx.needs_input_grad[:4]
        gemm, pool = ctx.gemm, ctx.pool
        with torch.autocast(x.device.type, enabled=False):
            dy = dy.contiguous()
            d_wo = gemm.wgrad(hidden, dy) if need_wo else None
            pool.give(hidden)
            dx = d_wi_gate = d_wi_up = None
            if need_x or need_gate or need_up:
                d_hidden = _mm_into(gemm, dy, wo.transpose(1, 2), pool)  # [N, I]
                # the C kernels (cpu_kernels.py) need no buffer for the recomputed silu
                silu_out = None if cpu_kernels.usable(h_gate, h_up, d_hidden) else pool.take(
                    d_hidden.shape, d_hidden.dtype, d_hidden.device)
                d_gate, d_up = ctx.kernels.backward_in_place(h_gate, h_up, d_hidden, silu_out)
                if silu_out is not None:
                    pool.give(silu_out)
                if need_x:
                    dx = gemm.mm(d_gate, wi_gate.transpose(1, 2))
                    gemm.mm(d_up, wi_up.transpose(1, 2), out=dx, accumulate=True)
                d_wi_gate = gemm.wgrad(x, d_gate) if need_gate else None
                d_wi_up = gemm.wgrad(x, d_up) if need_up else None
                pool.give(d_hidden)
            pool.give(h_gate, h_up)
        return dx, d_wi_gate, d_wi_up, d_wo, None, None, None, None


def expert_mlp(x: torch.Tensor, wi_gate: torch.Tensor, wi_up: torch.Tensor, wo: torch.Tensor,
               counts: torch.Tensor, sizes: list[int] | None, grouped: bool, activation: str,
               pool: BufferPool = EXPERT_BUFFERS) -> torch.Tensor:
    """x [N, H] sorted by local expert, ``counts`` [G] rows per expert (``sizes``: the same on the host,
    or None) -> [N, H]. ``grouped``: one torch._grouped_mm per product where it runs; on the CPU the
    per-expert loop always (CPU's grouped kernel is itself a loop of GEMMs, and the loop writes into
    pooled buffers). Under autocast the operands are cast to its dtype, as F.linear's would be."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    gemm = group_gemm(x, counts, grouped and dev != "cpu", dtype, sizes)
    operands = [t.to(dtype) for t in (x, wi_gate, wi_up, wo)]
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in operands)
    return _ExpertMLP.apply(*operands, gemm, HIDDEN_KERNELS[activation], pool, keep)
