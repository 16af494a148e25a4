"""Fused element-wise kernels shared by the dense MLP and the experts. fp32 contiguous operands on the
CPU run the C kernels of megamoe/cpu_kernels.py where they built; everything else (and the fallback)
runs the PyTorch ops below."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megamoe import cpu_kernels


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

    ``reuse_buffers``: the caller owns h_gate, h_up and the output's gradient (nothing else reads them
    after this backward; the expert MLP's GEMM outputs): backward then writes the gradients into those
    three buffers and allocates only the recomputed silu(x2) (docs/ARCHITECTURE.md, "Expert MLP
    buffers"). d_up is then (grad * x1) * silu(x2) instead of grad * (x1 * silu(x2)): one rounding apart.
    """

    @staticmethod
    def forward(ctx, h_gate: torch.Tensor, h_up: torch.Tensor, reuse_buffers: bool) -> torch.Tensor:
        x1, x2 = h_gate.chunk(2, dim=-1)
        ctx.save_for_backward(h_gate, h_up)
        ctx.reuse_buffers = reuse_buffers
        if cpu_kernels.usable(h_gate, h_up):
            return _gated_mul_into(h_up.new_empty(h_up.shape), h_gate, h_up)
        return F.silu(x2).mul_(x1).mul_(h_up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        h_gate, h_up = ctx.saved_tensors
        if ctx.reuse_buffers and all(ctx.needs_input_grad[:2]) and _owned(grad, h_up):
            return (*_gated_mul_backward_in_place(h_gate, h_up, grad), None)
        if cpu_kernels.usable(h_gate, h_up, grad):  # the same C kernel on copies
            return (*_needed(ctx, _gated_mul_backward_in_place(_copy(h_gate), h_up, _copy(grad))), None)
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
        return d_gate, d_up, None


def _owned(grad: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether an upstream gradient can be overwritten: a plain dense tensor of the output's shape (not
    an expanded or strided view of something else)."""
    return grad.shape == like.shape and grad.is_contiguous() and grad.dtype == like.dtype


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy the C kernels may overwrite."""
    return t.clone(memory_format=torch.contiguous_format)


def _needed(ctx, grads: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))


def _contiguous_in_place(kernel: str, h_gate: torch.Tensor, h_up: torch.Tensor, grad: torch.Tensor,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The C backward over h_gate and grad (their contiguous copies where strided), up only read."""
    gate_buf = h_gate if h_gate.is_contiguous() else h_gate.contiguous()
    grad_buf = grad if grad.is_contiguous() else grad.contiguous()
    cpu_kernels.run(kernel, gate_buf, h_up.contiguous(), grad_buf, h_up.shape[-1])
    return gate_buf, grad_buf


def _gated_mul_backward_in_place(h_gate: torch.Tensor, h_up: torch.Tensor, grad: torch.Tensor,
                                 silu_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """d_gate into h_gate's buffer, d_up into grad's; one new [N, I] buffer (silu(x2)), or
    ``silu_out``'s. On the CPU every buffer of >= 32 MiB is a fresh mmap that page-faults on first
    touch, so each one not allocated is ~12 ms per 32 MiB (bench/README.md, "Expert MLP kernels")."""
    if cpu_kernels.usable(h_gate, h_up, grad):  # one pass; silu_out unused
        return _contiguous_in_place("gated_backward", h_gate, h_up, grad)
    x1, x2 = h_gate.chunk(2, dim=-1)
    s = F.silu(x2) if silu_out is None else torch.ops.aten.silu.out(x2, out=silu_out)
    d_a = h_up.mul_(grad)  # d(x1 * silu(x2)) = grad * up; up is dead
    d_up = grad.mul_(x1)  # grad * x1, times s below; grad is dead
    d_s = x1.mul_(d_a)  # d silu(x2); x1 is dead
    torch.ops.aten.silu_backward.grad_input(d_s, x2, grad_input=x2)  # d x2, over x2
    torch.mul(d_a, s, out=x1)  # d x1, over d_s
    return h_gate, d_up.mul_(s)


def gated_mul(h_gate: torch.Tensor, h_up: torch.Tensor, reuse_buffers: bool = False) -> torch.Tensor:
    """OpenMoE FFN hidden: ``gated_act(h_gate) * h_up`` (h_gate [..., 2I], h_up [..., I]) as one fused op.
    ``reuse_buffers``: see :class:`_GatedMul` (only for inputs and a gradient nothing else reads)."""
    if h_gate.shape[-1] != 2 * h_up.shape[-1]:
        raise ValueError(f"gate width {h_gate.shape[-1]} != 2 x up width {h_up.shape[-1]}")
    return _GatedMul.apply(h_gate, h_up, reuse_buffers)


class _SwiGLU(torch.autograd.Function):
    """silu(h_gate) * h_up, saving only its two inputs (autograd's graph also keeps silu(h_gate)).
    ``reuse_buffers`` as for :class:`_GatedMul`: d_gate over h_gate, d_up over the gradient."""

    @staticmethod
    def forward(ctx, h_gate: torch.Tensor, h_up: torch.Tensor, reuse_buffers: bool) -> torch.Tensor:
        ctx.save_for_backward(h_gate, h_up)
        ctx.reuse_buffers = reuse_buffers
        if cpu_kernels.usable(h_gate, h_up):
            return _swiglu_into(h_up.new_empty(h_up.shape), h_gate, h_up)
        return F.silu(h_gate).mul_(h_up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        h_gate, h_up = ctx.saved_tensors
        if ctx.reuse_buffers and all(ctx.needs_input_grad[:2]) and _owned(grad, h_up):
            return (*_swiglu_backward_in_place(h_gate, h_up, grad), None)
        if cpu_kernels.usable(h_gate, h_up, grad):
            return (*_needed(ctx, _swiglu_backward_in_place(_copy(h_gate), h_up, _copy(grad))), None)
        s = F.silu(h_gate)  # recomputed
        d_gate = d_up = None
        if ctx.needs_input_grad[0]:
            d_gate = torch.ops.aten.silu_backward(grad * h_up, h_gate)
        if ctx.needs_input_grad[1]:
            d_up = s.mul_(grad)
        return d_gate, d_up, None


def _swiglu_backward_in_place(h_gate: torch.Tensor, h_up: torch.Tensor, grad: torch.Tensor,
                              silu_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_gated_mul_backward_in_place` for silu(h_gate) * h_up: d_gate over h_gate, d_up over
    grad, the recomputed silu in a new buffer or ``silu_out``."""
    if cpu_kernels.usable(h_gate, h_up, grad):  # one pass; silu_out unused
        return _contiguous_in_place("swiglu_backward", h_gate, h_up, grad)
    s = F.silu(h_gate) if silu_out is None else torch.ops.aten.silu.out(h_gate, out=silu_out)
    d_s = h_up.mul_(grad)  # grad * up; up is dead
    d_up = grad.mul_(s)
    torch.ops.aten.silu_backward.grad_input(d_s, h_gate, grad_input=h_gate)
    return h_gate, d_up


def swiglu_mul(h_gate: torch.Tensor, h_up: torch.Tensor, reuse_buffers: bool = False) -> torch.Tensor:
    """Mixtral's expert hidden: silu(w1 x) * (w3 x), h_gate and h_up both [..., I] (HF's
    ``act_fn(gate) * up``, the same two products)."""
    if h_gate.shape[-1] != h_up.shape[-1]:
        raise ValueError(f"gate width {h_gate.shape[-1]} != up width {h_up.shape[-1]}")
    return _SwiGLU.apply(h_gate, h_up, reuse_buffers)


def _gated_mul_into(out: torch.Tensor, h_gate: torch.Tensor, h_up: torch.Tensor) -> torch.Tensor:
    """x1 * silu(x2) * up written into ``out`` [..., I]: the products of :class:`_GatedMul`'s forward."""
    if cpu_kernels.usable(out, h_gate, h_up):
        target = out if out.is_contiguous() else out.new_empty(out.shape)
        cpu_kernels.run("gated_forward", h_gate.contiguous(), h_up.contiguous(), target, h_up.shape[-1])
        return target if target is out else out.copy_(target)
    x1, x2 = h_gate.chunk(2, dim=-1)
    return torch.ops.aten.silu.out(x2, out=out).mul_(x1).mul_(h_up)


def _swiglu_into(out: torch.Tensor, h_gate: torch.Tensor, h_up: torch.Tensor) -> torch.Tensor:
    """silu(h_gate) * h_up written into ``out``: the products of :class:`_SwiGLU`'s forward."""
    if cpu_kernels.usable(out, h_gate, h_up):
        target = out if out.is_contiguous() else out.new_empty(out.shape)
        cpu_kernels.run("swiglu_forward", h_gate.contiguous(), h_up.contiguous(), target, h_up.shape[-1])
        return target if target is out else out.copy_(target)
    return torch.ops.aten.silu.out(h_gate, out=out).mul_(h_up)


@dataclass(frozen=True)
class HiddenKernels:
    """The fused hidden as plain kernels for a caller that owns every buffer (the expert MLP's one
    autograd function): ``forward_into(out, h_gate, h_up)``; ``backward_in_place(h_gate, h_up, grad,
    silu_out)`` -> (d_gate over h_gate, d_up over grad), the recomputed silu written into silu_out."""

    forward_into: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    backward_in_place: Callable[..., tuple[torch.Tensor, torch.Tensor]]


# Expert activation by name: the gate projection is GATE_WIDTH[name] x the FFN width.
EXPERT_ACTIVATIONS = {"openmoe": gated_mul, "swiglu": swiglu_mul}
HIDDEN_KERNELS = {"openmoe": HiddenKernels(_gated_mul_into, _gated_mul_backward_in_place),
                  "swiglu": HiddenKernels(_swiglu_into, _swiglu_backward_in_place)}
GATE_WIDTH = {"openmoe": 2, "swiglu": 1}
