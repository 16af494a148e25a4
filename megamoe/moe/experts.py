"""Grouped expert MLP: all local experts in one computation over tokens sorted by expert.

Input rows arrive sorted by local expert with ``counts[e]`` rows for expert e. The grouped path runs
each projection as ONE ``torch._grouped_mm`` over all experts (CPU fp32, CUDA bf16 on sm90+); the
loop path runs one GEMM per expert over its contiguous slice (reference and fallback). Neither
gathers with masks.
"""

from __future__ import annotations

import torch
from torch import nn

from megamoe.model.init import tag
from megamoe.model.layers import gated_act


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs for these operands (checked, not assumed)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return False


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
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, w.transpose(1, 2), offs=offs)
        dw = torch._grouped_mm(x.t(), dy, offs=offs)  # [G, K, M]
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool = True,
               ) -> torch.Tensor:
    """x: [N, K] rows sorted by group, w: [G, K, M], counts: [G] rows per group -> [N, M]."""
    if grouped and grouped_mm_supported(x.device, x.dtype):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        return _GroupedMM.apply(x, w, offs)
    chunks = torch.split(x, counts.tolist())
    outs = [chunk @ w[g] for g, chunk in enumerate(chunks)]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


class GroupedExperts(nn.Module):
    """E_local experts, each an OpenMoE gated FFN; weights stored HF-style.

    wi_gate [E_local, H, 2I], wi_up [E_local, H, I], wo [E_local, I, H]. ``expert_ids`` are the global
    ids of the local slots, which seed their initialisation (DESIGN.md section 2).
    """

    def __init__(self, hidden: int, ffn: int, expert_ids: list[int], std: float, out_std: float,
                 grouped: bool = True) -> None:
        super().__init__()
        n = len(expert_ids)
        self.grouped = grouped
        self.wi_gate = tag(nn.Parameter(torch.empty(n, hidden, 2 * ffn)), std=std,
                           expert_ids=expert_ids)
        self.wi_up = tag(nn.Parameter(torch.empty(n, hidden, ffn)), std=std, expert_ids=expert_ids)
        self.wo = tag(nn.Parameter(torch.empty(n, ffn, hidden)), std=out_std, expert_ids=expert_ids)
        for p in (self.wi_gate, self.wi_up, self.wo):
            p._mm_expert = True  # reduced over expert-DP, its norm summed over EP

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [N, H] sorted by local expert, counts: [E_local] -> [N, H]."""
        g = self.grouped
        act = gated_act(grouped_mm(x, self.wi_gate, counts, g))  # [N, I]
        return grouped_mm(act * grouped_mm(x, self.wi_up, counts, g), self.wo, counts, g)
