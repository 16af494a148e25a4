"""Dense building blocks of the OpenMoE decoder: RMSNorm, rotary embedding, attention, gated MLP.

Shapes use b = micro-batch, s = sequence, h = hidden, n = heads, d = kv_channels, i = ffn size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamoe.model.init import tag
from megamoe.parallel.tensor import (
    ColumnParallelLinear,
    RowParallelLinear,
    TPContext,
    mark_sequence_replicated,
)


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


class RMSNorm(nn.Module):
    """T5-style RMSNorm (no mean subtraction, no bias), statistics in fp32."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        # Every TP rank holds it; under SP it sees a sequence shard, so its grad is summed over TP.
        self.weight = mark_sequence_replicated(tag(nn.Parameter(torch.empty(hidden)), std=None, ones=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rotary_tables(seq: int, dim: int, base: float, device: torch.device | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [s, d] for rotate-half RoPE."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv)  # [s, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [s, d]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, n, s, d]; rotate-half convention (GPT-NeoX / HF Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _core_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax(q k^T) v with NO 1/sqrt(d) scaling: [b, n, s, d] each -> [b, n, s, d]."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)


class Attention(nn.Module):
    """Causal multi-head attention with RoPE and NO 1/sqrt(d) score scaling (OpenMoE/T5 style).

    Heads are split across TP: q/k/v are column-parallel (n/tp local heads), o is row-parallel.
    Input and output are residual-stream tensors ([b, s/tp, h] under SP, else [b, s, h]).
    """

    def __init__(self, hidden: int, heads: int, kv_channels: int, std: float, out_std: float,
                 rotary_base: float, tp: TPContext | None = None, recompute_core: bool = False) -> None:
        super().__init__()
        tp = tp or TPContext()
        self.recompute_core = recompute_core  # --recompute-granularity selective
        if heads % tp.size:
            raise ValueError(f"{heads} attention heads are not divisible by TP {tp.size}")
        self.tp, self.local_heads, self.d, self.rotary_base = tp, heads // tp.size, kv_channels, rotary_base
        inner = heads * kv_channels
        self.q_proj = ColumnParallelLinear(hidden, inner, tp, std)
        self.k_proj = ColumnParallelLinear(hidden, inner, tp, std)
        self.v_proj = ColumnParallelLinear(hidden, inner, tp, std)
        self.o_proj = RowParallelLinear(inner, hidden, tp, out_std)
        self._rope: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _tables(self, s: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0] < s or self._rope[1].device != device:
            cos, sin = rotary_tables(s, self.d, self.rotary_base, device)
            self._rope = (s, cos, sin)
        return self._rope[1][:s], self._rope[2][:s]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tp.enter(x)  # [b, s, h]
        b, s, _ = x.shape
        n = self.local_heads

        def heads(t: torch.Tensor) -> torch.Tensor:  # [b, s, n*d] -> [b, n, s, d]
            return t.view(b, s, n, self.d).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        cos, sin = self._tables(s, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.recompute_core and self.training and torch.is_grad_enabled():
            out = checkpoint(_core_attention, q, k, v, use_reentrant=False)
        else:
            out = _core_attention(q, k, v)  # [b, n, s, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, n * self.d))


class GatedMLP(nn.Module):
    """OpenMoE FFN: gate H->2I (x1*silu(x2)) times up H->I, then down I->H; 4*H*I parameters.

    TP: gate/up column-parallel (gate keeps matching x1/x2 halves per rank), down row-parallel.
    """

    def __init__(self, hidden: int, ffn: int, std: float, out_std: float, tp: TPContext | None = None,
                 ) -> None:
        super().__init__()
        tp = tp or TPContext()
        self.tp = tp
        self.gate_proj = ColumnParallelLinear(hidden, 2 * ffn, tp, std, blocks=2)  # [2I/tp, H]
        self.up_proj = ColumnParallelLinear(hidden, ffn, tp, std)  # [I/tp, H]
        self.down_proj = RowParallelLinear(ffn, hidden, tp, out_std)  # [H, I/tp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tp.enter(x)
        return self.down_proj(gated_mul(self.gate_proj(x), self.up_proj(x)))


def output_std(std: float, num_layers: int) -> float:
    """Megatron's scaled init for projections that write into the residual stream."""
    return std / math.sqrt(2.0 * num_layers)
