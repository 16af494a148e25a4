"""Grouped expert MLP over rows sorted by local expert (``counts[e]`` rows for expert e): each
projection is ONE ``torch._grouped_mm`` over all experts (CPU fp32, CUDA bf16 on sm90+), or one GEMM
per expert's contiguous slice (reference and fallback); neither gathers with masks."""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch
from torch import nn

from megamoe.ops import gated_mul
from megamoe.params import expert, relabel_experts


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs for these operands (checked, not assumed)."""
    if not hasattr(torch, "_grouped_mm") or device.type not in ("cpu", "cuda"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


class _GroupedMM(torch.autograd.Function):
    """forward: y[rows of group g] = x[rows of g] @ w[g]; backward: dx = dy @ w[g]^T, dw[g] = x_g^T dy_g.

    x: [N, K], w: [G, K, M], offs: [G] int32 cumulative row ends -> y: [N, M].
    Written out because the built-in backward rejects non-contiguous upstream gradients.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, w.transpose(1, 2), offs=offs) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = torch._grouped_mm(x.t(), dy, offs=offs)  # [G, K, M]
            if dw.device.type != "cpu":  # some GPU kernels leave an empty group's gradient unwritten
                empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
                dw.masked_fill_(empty[:, None, None], 0)  # no host sync
        return dx, dw, None


class _LoopMM(torch.autograd.Function):
    """The same contract as _GroupedMM but for the groups' row ranges ``bounds`` [(lo, hi)] on the host:
    one GEMM per group, each written straight into its rows of one output (no cat, and an empty
    group's weight gradient is its only zero fill)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.bounds = bounds
        y = x.new_empty(x.shape[0], w.shape[-1])
        for g, (lo, hi) in enumerate(bounds):
            if hi > lo:
                torch.mm(x[lo:hi], w[g], out=y[lo:hi])
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
        dw = torch.empty_like(w, memory_format=torch.contiguous_format) if need_w else None
        for g, (lo, hi) in enumerate(ctx.bounds):
            if hi == lo:
                if need_w:
                    dw[g].zero_()
                continue
            if need_x:
                torch.mm(dy[lo:hi], w[g].t(), out=dx[lo:hi])
            if need_w:
                torch.mm(x[lo:hi].t(), dy[lo:hi], out=dw[g])
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool = True,
               ) -> torch.Tensor:
    """x: [N, K] rows sorted by group, w: [G, K, M], counts: [G] rows per group -> [N, M]."""
    return _grouped_mm_fn(x, counts, grouped)(x, w)


def _grouped_mm_fn(x: torch.Tensor, counts: torch.Tensor, grouped: bool, sizes: list[int] | None = None,
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(a, w) -> a @ w per group, for rows laid out like ``x`` with ``counts``; the group bounds are
    computed once for all projections of a layer. Under autocast both operands are cast to its dtype,
    as F.linear would be (neither custom GEMM is on autocast's op lists). ``sizes``: ``counts`` on the
    host, when the caller has them (the loop path would otherwise read them back: a host sync)."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if grouped and x.shape[0] > 0 and grouped_mm_supported(x.device, dtype):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return lambda a, w: _GroupedMM.apply(a.to(dtype), w.to(dtype), offs)
    sizes = counts.tolist() if sizes is None else sizes
    if sum(sizes) != x.shape[0]:
        raise ValueError(f"counts sum to {sum(sizes)}, x has {x.shape[0]} rows")
    ends = list(accumulate(sizes))
    bounds = list(zip([0, *ends[:-1]], ends))
    return lambda a, w: _LoopMM.apply(a.to(dtype), w.to(dtype), bounds)


class GroupedExperts(nn.Module):
    """E_local experts, each an OpenMoE gated FFN, weights HF-style: wi_gate [E_local, H, 2I], wi_up
    [E_local, H, I], wo [E_local, I, H]. ``expert_ids``: the global ids of the local slots, which seed
    their initialisation (docs/ARCHITECTURE.md, "Layout invariance")."""

    def __init__(self, hidden: int, ffn: int, expert_ids: list[int], std: float, out_std: float,
                 grouped: bool = True, truncated: bool = False) -> None:
        super().__init__()
        n = len(expert_ids)
        self.grouped = grouped
        # reduced over expert-DP, norms summed over EP; each slot drawn as its logical expert
        init = dict(expert_ids=expert_ids, truncated=truncated)
        self.wi_gate = expert(nn.Parameter(torch.empty(n, hidden, 2 * ffn)), std=std, **init)
        self.wi_up = expert(nn.Parameter(torch.empty(n, hidden, ffn)), std=std, **init)
        self.wo = expert(nn.Parameter(torch.empty(n, ffn, hidden)), std=out_std, **init)

    def relabel(self, expert_ids: list[int]) -> None:
        """The slots now hold these logical experts (their weights were moved in by the rebalancer)."""
        for param in self.parameters(recurse=False):
            relabel_experts(param, expert_ids)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, sizes: list[int] | None = None,
                ) -> torch.Tensor:
        """x: [N, H] sorted by local expert, counts: [E_local] (sizes: the same on the host) -> [N, H]."""
        mm = _grouped_mm_fn(x, counts, self.grouped, sizes)
        return mm(gated_mul(mm(x, self.wi_gate), mm(x, self.wi_up)), self.wo)  # gated_mul: [N, I]
