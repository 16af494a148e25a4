"""Grouped expert MLP over rows sorted by local expert (``counts[e]`` rows for expert e): the module
and its parameters. The MLP runs as one autograd function (moe/expert_mlp.py); FP8 projections and
the plain ``grouped_mm`` run one function per projection here. Every GEMM is one torch._grouped_mm
over all experts or one GEMM per expert's contiguous slice (moe/group_gemm.py); none gathers with
masks."""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate

import torch
from torch import nn

from megamoe.moe.expert_mlp import expert_mlp
from megamoe.moe.fp8 import FP8GroupMM, FP8Recipe, ProjectionFP8, scales_from_history
from megamoe.moe.fp8_te import TEProjection, te_expert_mlp
from megamoe.moe.group_gemm import GroupGemm, group_gemm
from megamoe.ops import EXPERT_ACTIVATIONS, GATE_WIDTH
from megamoe.params import expert, expert_state, relabel_experts


class _GroupMM(torch.autograd.Function):
    """forward: y[rows of group g] = x[rows of g] @ w[g]; backward: dx = dy @ w[g]^T, dw[g] = x_g^T dy_g.

    x: [N, K], w: [G, K, M] -> y: [N, M]. Written out because the built-in backward rejects
    non-contiguous upstream gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, gemm: GroupGemm) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.gemm = gemm
        return gemm.mm(x, w)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w = ctx.saved_tensors
        dy = dy.contiguous()
        dx = ctx.gemm.mm(dy, w.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        dw = ctx.gemm.wgrad(x, dy) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool = True,
               ) -> torch.Tensor:
    """x: [N, K] rows sorted by group, w: [G, K, M], counts: [G] rows per group -> [N, M]."""
    return _grouped_mm_fn(x, counts, grouped)(x, w)


def _grouped_mm_fn(x: torch.Tensor, counts: torch.Tensor, grouped: bool, sizes: list[int] | None = None,
                   fp8: ProjectionFP8 | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(a, w) -> a @ w per group, for rows laid out like ``x`` with ``counts``; the group bounds are
    computed once for all projections of a layer. Under autocast both operands are cast to its dtype,
    as F.linear would be (neither custom GEMM is on autocast's op lists). ``sizes``: ``counts`` on the
    host, when the caller has them. ``fp8``: quantise the operands (FP8 runs its GEMM in fp32)."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    if fp8 is not None:
        gemm = group_gemm(x, counts, grouped, torch.float32, sizes)
        return lambda a, w: FP8GroupMM.apply(a, w, gemm, fp8)
    gemm = group_gemm(x, counts, grouped, dtype, sizes)
    return lambda a, w: _GroupMM.apply(a.to(dtype), w.to(dtype), gemm)


class GroupedExperts(nn.Module):
    """E_local experts, each an OpenMoE gated FFN, weights HF-style: wi_gate [E_local, H, 2I], wi_up
    [E_local, H, I], wo [E_local, I, H]. ``expert_ids``: the global ids of the local slots, which seed
    their initialisation (docs/ARCHITECTURE.md, "Layout invariance"). ``fp8``: run the three
    projections as FP8 GEMMs (megamoe/moe/fp8.py); delayed scaling keeps an amax history per logical
    expert, projection and operand, fp8_amax_history [E_local, 3, 3, L], newest first.
    ``activation="swiglu"`` (Mixtral): wi_gate is [E_local, H, I] (HF's w1 transposed) and the hidden
    silu(x wi_gate) * (x wi_up)."""

    def __init__(self, hidden: int, ffn: int, expert_ids: list[int], std: float, out_std: float,
                 grouped: bool = True, truncated: bool = False, fp8: FP8Recipe | None = None,
                 activation: str = "openmoe") -> None:
        super().__init__()
        n = len(expert_ids)
        self.grouped, self.fp8, self.activation = grouped, fp8, activation
        self.act = EXPERT_ACTIVATIONS[activation]  # (h_gate, h_up) -> [N, I] (the FP8 path's)
        # reduced over expert-DP, norms summed over EP; each slot drawn as its logical expert
        init = dict(expert_ids=expert_ids, truncated=truncated)
        self.wi_gate = expert(nn.Parameter(torch.empty(n, hidden, GATE_WIDTH[activation] * ffn)), std=std,
                              **init)
        self.wi_up = expert(nn.Parameter(torch.empty(n, hidden, ffn)), std=std, **init)
        self.wo = expert(nn.Parameter(torch.empty(n, ffn, hidden)), std=out_std, **init)
        self.fp8_grad_divisor = 1.0  # set by the trainer: megamoe.parallel.optimizer.expert_grad_divisor
        if fp8 is not None and fp8.backend == "te":  # TE modules over our weights (not registered)
            dims = [(hidden, self.wi_gate.shape[-1]), (hidden, ffn), (ffn, hidden)]
            self._te_projections = [TEProjection(lambda name=name: getattr(self, name), n, k, m)
                                    for name, (k, m) in zip(("wi_gate", "wi_up", "wo"), dims)]
        if fp8 is not None and fp8.keeps_history:
            self.fp8_amax_history = expert_state(
                nn.Parameter(torch.zeros(n, 3, 3, fp8.amax_history_len)), expert_ids=expert_ids)
            self.register_buffer("fp8_step_amax", torch.zeros(n, 3, 3), persistent=False)
            self.fp8_scales: torch.Tensor | None = None  # [E_local, 3, 3] for the current step

    def relabel(self, expert_ids: list[int]) -> None:
        """The slots now hold these logical experts (their weights were moved in by the rebalancer)."""
        for param in self.parameters(recurse=False):
            relabel_experts(param, expert_ids)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, sizes: list[int] | None = None,
                ) -> torch.Tensor:
        """x: [N, H] sorted by local expert, counts: [E_local] (sizes: the same on the host) -> [N, H]."""
        if self.fp8 is not None:
            return self._forward_fp8(x, counts, sizes)
        return expert_mlp(x, self.wi_gate, self.wi_up, self.wo, counts, sizes, self.grouped,
                          self.activation)

    def _forward_fp8(self, x: torch.Tensor, counts: torch.Tensor, sizes: list[int] | None) -> torch.Tensor:
        """The same MLP with FP8 projections; rows padded per expert to --moe-router-padding-for-fp8's
        multiple with zero rows (which change no output, amax or gradient) when asked."""
        real_rows = None
        if self.fp8.pad_rows_to:
            x, counts, sizes, real_rows = pad_groups(x, counts, sizes, self.fp8.pad_rows_to)
        if self.fp8.backend == "te":
            sizes = counts.tolist() if sizes is None else sizes
            y = te_expert_mlp(self._te_projections, self.act, x, sizes, self.fp8)
            return y if real_rows is None else y[real_rows]
        groups = counts.shape[0]
        gemm = group_gemm(x, counts, self.grouped, torch.float32, sizes)
        group_of_row = torch.repeat_interleave(torch.arange(groups, device=x.device), counts,
                                               output_size=x.shape[0])  # [N]
        projections = [ProjectionFP8(self.fp8, group_of_row, groups, grad_divisor=self.fp8_grad_divisor)
                       for _ in range(3)]
        if self.fp8.keeps_history:
            if self.fp8_scales is None:
                self.fp8_scales = scales_from_history(self.fp8_amax_history.detach(), self.fp8)
            for index, projection in enumerate(projections):
                projection.scales = self.fp8_scales[:, index]
                projection.step_amax = self.fp8_step_amax[:, index] if self.training else None

        def mm(a: torch.Tensor, w: torch.Tensor, index: int) -> torch.Tensor:
            return FP8GroupMM.apply(a, w, gemm, projections[index])

        hidden = self.act(mm(x, self.wi_gate, 0), mm(x, self.wi_up, 1), reuse_buffers=True)
        y = mm(hidden, self.wo, 2)  # [N(padded), H]
        return y if real_rows is None else y[real_rows]


def pad_groups(x: torch.Tensor, counts: torch.Tensor, sizes: list[int] | None, multiple: int,
               ) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
    """Rows [N, H] grouped by ``counts`` -> (rows with each group padded by zero rows to a multiple of
    ``multiple``, padded counts, padded sizes on the host, [N] position of each real row)."""
    sizes = counts.tolist() if sizes is None else sizes
    padded = [-(-size // multiple) * multiple for size in sizes]
    starts = [0, *accumulate(padded)][:-1]
    real = [start + i for start, size in zip(starts, sizes) for i in range(size)]
    real_rows = torch.tensor(real, dtype=torch.int64).to(x.device, non_blocking=True)
    out = x.new_zeros(sum(padded), x.shape[1]).index_copy(0, real_rows, x)
    return out, torch.tensor(padded, dtype=counts.dtype).to(counts.device), padded, real_rows
