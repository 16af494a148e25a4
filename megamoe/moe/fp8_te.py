"""Transformer Engine FP8 expert GEMMs (``--fp8-backend te``): the GPU fast path.

NOT YET RUN ON A GPU (no CUDA machine was available when it was written): tests/unit/test_fp8_te.py
(marked ``gpu``) and scripts/gpu_smoke.sh are what prove it on the first machine that has one.

Each projection is a ``te.pytorch.GroupedLinear`` with E_local GEMMs whose weights are OUR stacked
expert parameters (w[g]^T, [M, K] per expert), so checkpoints, ZeRO and the rebalancer see the same
parameters whichever backend runs. TE keeps its own scaling state per GEMM slot and reduces amaxes
over its own groups, so this path is NOT covered by the layout-invariance contract and its scaling
state is neither checkpointed nor moved with experts (docs/ARCHITECTURE.md, "FP8 experts"): use the
torch backend where bit-level reproducibility across layouts matters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from megamoe.moe.fp8 import FP8Recipe, te_available

__all__ = ["TEProjection", "te_available", "te_expert_mlp", "te_recipe"]


def te_recipe(recipe: FP8Recipe) -> object:
    """The Transformer Engine recipe object matching ``recipe``."""
    from transformer_engine.common import recipe as te

    fmt = te.Format.HYBRID if recipe.format == "hybrid" else te.Format.E4M3
    if recipe.recipe == "delayed":
        return te.DelayedScaling(fp8_format=fmt, margin=recipe.margin,
                                 amax_history_len=recipe.amax_history_len,
                                 amax_compute_algo=recipe.amax_compute_algo)
    if recipe.recipe == "tensorwise":
        return te.Float8CurrentScaling(fp8_format=fmt)
    return te.Float8BlockScaling(fp8_format=fmt)


class TEProjection(nn.Module):
    """One expert projection over E_local GEMMs; ``weight()`` returns the [E_local, K, M] stack."""

    def __init__(self, weight: Callable[[], nn.Parameter], num_experts: int, in_features: int,
                 out_features: int) -> None:
        super().__init__()
        import transformer_engine.pytorch as te

        self.weight = weight
        self.linear = te.GroupedLinear(num_experts, in_features, out_features, bias=False,
                                       params_dtype=torch.bfloat16, device="cuda")
        for i in range(num_experts):  # the weights are ours: drop TE's own parameters
            del self.linear._parameters[f"weight{i}"]

    def forward(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """x: [N, K] rows grouped by expert (``sizes`` on the host) -> [N, M]."""
        w = self.weight()
        for i in range(w.shape[0]):  # [M, K] per expert, autograd flows back into the stack
            setattr(self.linear, f"weight{i}", w[i].t().contiguous())
        return self.linear(x, sizes)


def te_expert_mlp(projections: list[TEProjection], activation: Callable, x: torch.Tensor,
                  sizes: list[int], recipe: FP8Recipe) -> torch.Tensor:
    """The expert MLP under TE's FP8 autocast: x [N, H] -> [N, H]."""
    import transformer_engine.pytorch as te

    gate, up, down = projections
    with te.fp8_autocast(enabled=True, fp8_recipe=te_recipe(recipe)):
        return down(activation(gate(x, sizes), up(x, sizes)), sizes)
