"""Fused element-wise kernels shared by the dense MLP and the experts (no megamoe imports)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gated_act(h: torch.Tensor) -> torch.Tensor:
    """OpenMoE's gate activation: the 2I-wide gate projection splits into halves x1, x2 -> x1*silu(x2)."""
    x1, x2 = h.chunk(2, dim=-1)
    return x1 * F.silu(x2)


class _GatedMul(torch.autograd.Function):
    """``gated_act(h_gate) * h_up`` = x1 * silu(x2) * up, fused.

    Saves only its two inputs (the unfused graph also keeps silu(x2) and x1*silu(x2)); forward allocates
    one tensor, backward two: the [..., 2I] gate gradient, whose halves are written in place (no cat),
    and the up gradient, built in the buffer of the recomputed silu(x2). Every product is the one the
    unfused autograd graph forms, so the results match it bit for bit.
    """

    @staticmethod
    def forward(ctx, h_gate: torch.Tensor, h_up: torch.Tensor) -> torch.Tensor:
        x1, x2 = h_gate.chunk(2, dim=-1)
        ctx.save_for_backward(h_gate, h_up)
        return F.silu(x2).mul_(x1).mul_(h_up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        h_gate, h_up = ctx.saved_tensors
        x1, x2 = h_gate.chunk(2, dim=-1)
        s = F.silu(x2)  # recomputed (not saved); becomes d_up's buffer
        d_gate = d_up = None
        if ctx.needs_input_grad[0]:
            d_gate = torch.empty(h_gate.shape, dtype=h_gate.dtype, device=h_gate.device)
            d1, d2 = d_gate.chunk(2, dim=-1)
            torch.mul(grad, h_up, out=d1)  # d(x1 * silu(x2))
            torch.mul(d1, x1, out=d2)  # d silu(x2)
            torch.ops.aten.silu_backward.grad_input(d2, x2, grad_input=d2)  # d x2, in place
            d1.mul_(s)  # d x1
        if ctx.needs_input_grad[1]:
            d_up = s.mul_(x1).mul_(grad)
        return d_gate, d_up


def gated_mul(h_gate: torch.Tensor, h_up: torch.Tensor) -> torch.Tensor:
    """OpenMoE FFN hidden: ``gated_act(h_gate) * h_up`` (h_gate [..., 2I], h_up [..., I]) as one fused op."""
    if h_gate.shape[-1] != 2 * h_up.shape[-1]:
        raise ValueError(f"gate width {h_gate.shape[-1]} != 2 x up width {h_up.shape[-1]}")
    return _GatedMul.apply(h_gate, h_up)


def swiglu_mul(h_gate: torch.Tensor, h_up: torch.Tensor) -> torch.Tensor:
    """Mixtral's expert hidden: silu(w1 x) * (w3 x), h_gate and h_up both [..., I] (HF's
    ``act_fn(gate) * up``, the same two products)."""
    if h_gate.shape[-1] != h_up.shape[-1]:
        raise ValueError(f"gate width {h_gate.shape[-1]} != up width {h_up.shape[-1]}")
    return F.silu(h_gate) * h_up


# Expert activation by name: the gate projection is GATE_WIDTH[name] x the FFN width.
EXPERT_ACTIVATIONS = {"openmoe": gated_mul, "swiglu": swiglu_mul}
GATE_WIDTH = {"openmoe": 2, "swiglu": 1}
