"""Per-group GEMMs for rows sorted by group (each local expert's contiguous rows): ONE
``torch._grouped_mm`` per product (CPU fp32 / bf16, CUDA bf16 on sm90+) or one GEMM per group's
slice, written straight into its rows of one output. No autograd here (moe/experts.py,
moe/expert_mlp.py)."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs for these operands (checked, not assumed)."""
    if not hasattr(torch, "_grouped_mm") or device.type not in ("cpu", "cuda"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


@dataclass(frozen=True)
class GroupGemm:
    """Per-group GEMMs (no autograd) for rows sorted by group: ``offs`` [G] int32 cumulative row
    ends for ONE torch._grouped_mm per product, or ``bounds`` [(lo, hi)] on the host for one GEMM per
    group written straight into its rows of one output (no cat)."""

    offs: torch.Tensor | None = None
    bounds: list[tuple[int, int]] | None = None

    def mm(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
           accumulate: bool = False) -> torch.Tensor:
        """x: [N, K], w: [G, K, M] -> [N, M], rows of group g times w[g]; written into ``out`` when
        given, or added to it (``accumulate``: inside each GEMM on the loop path, no extra pass)."""
        if self.offs is not None:
            y = torch._grouped_mm(x, w, offs=self.offs)
            if out is None:
                return y
            return out.add_(y) if accumulate else out.copy_(y)
        if out is None:
            if accumulate:
                raise ValueError("accumulate needs out")
            out = x.new_empty(x.shape[0], w.shape[-1])
        for g, (lo, hi) in enumerate(self.bounds):
            if hi > lo:
                if accumulate:
                    out[lo:hi].addmm_(x[lo:hi], w[g])
                else:
                    torch.mm(x[lo:hi], w[g], out=out[lo:hi])
        return out

    def wgrad(self, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """x: [N, K], dy: [N, M] -> [G, K, M], x_g^T dy_g (zero for an empty group)."""
        if self.offs is not None:
            dw = torch._grouped_mm(x.t(), dy, offs=self.offs)
            if dw.device.type != "cpu":  # some GPU kernels leave an empty group's gradient unwritten
                empty = torch.diff(self.offs, prepend=self.offs.new_zeros(1)) == 0
                dw.masked_fill_(empty[:, None, None], 0)  # no host sync
            return dw
        dw = x.new_empty(len(self.bounds), x.shape[1], dy.shape[1])
        for g, (lo, hi) in enumerate(self.bounds):
            if hi > lo:
                torch.mm(x[lo:hi].t(), dy[lo:hi], out=dw[g])
            else:
                dw[g].zero_()
        return dw


def group_gemm(x: torch.Tensor, counts: torch.Tensor, grouped: bool, dtype: torch.dtype,
               sizes: list[int] | None = None) -> GroupGemm:
    """The kernels for rows laid out like ``x`` with ``counts``: grouped when torch._grouped_mm runs
    for ``dtype`` here, else a loop over the host ``sizes`` (read from ``counts`` when not given:
    a host sync)."""
    if grouped and x.shape[0] > 0 and grouped_mm_supported(x.device, dtype):
        return GroupGemm(offs=torch.cumsum(counts, 0).to(torch.int32))
    sizes = counts.tolist() if sizes is None else sizes
    if sum(sizes) != x.shape[0]:
        raise ValueError(f"counts sum to {sum(sizes)}, x has {x.shape[0]} rows")
    ends = list(accumulate(sizes))
    return GroupGemm(bounds=list(zip([0, *ends[:-1]], ends)))
