"""Dense building blocks of the OpenMoE decoder: RMSNorm, rotary embedding, attention, gated MLP.

Shapes use b = micro-batch, s = sequence, h = hidden, n = heads, d = kv_channels, i = ffn size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.ops import gated_mul
from megamoe.parallel.tensor import ColumnParallelLinear, RowParallelLinear, TPContext
from megamoe.params import replicated


class RMSNorm(nn.Module):
    """T5-style RMSNorm (no mean subtraction, no bias), statistics in fp32."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        # Every TP rank holds it; under SP it sees a sequence shard, so its grad is summed over TP.
        self.weight = replicated(nn.Parameter(torch.empty(hidden)), ones=True, sp_partial=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _RMSNormFunction(torch.autograd.Function):
    """y = x * r * w with r = rsqrt(mean(x^2) + eps) per row, in fp32 (the unfused formula's forward,
    bit for bit); saves x (fp32) and r [..., 1]. backward: dx = r * (g w) - x * r^3 * <g w, x> / H,
    dw = sum over rows of g * x * r (a GEMV): 7 passes where autograd's graph of the same formula
    made ~10, most into fresh tensors."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics (fp64 stays fp64)
        # the same reductions as the unfused formula: with vector_norm / vecdot instead, a row's value
        # depended on the rows beside it enough to fail the world-8 layout test (rtol 1e-5)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(xf, r, weight)
        ctx.dtype = x.dtype
        return (xf * r).mul_(weight.to(xf.dtype)).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        xf, r, weight = ctx.saved_tensors
        g = grad.to(xf.dtype)
        width = xf.shape[-1]
        gw = g * weight.to(xf.dtype)  # [..., H]
        dot = (gw * xf).sum(-1, keepdim=True)  # <g w, x> per row, [..., 1]
        coefficient = r.pow(3).mul_(dot).div_(width)
        dx = torch.addcmul(gw.mul_(r), xf, coefficient, value=-1)
        dw = (g * xf).reshape(-1, width).t().mv(r.reshape(-1))  # [H]
        return dx.to(ctx.dtype), dw.to(weight.dtype), None


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


class CoreAttention(nn.Module):
    """Causal softmax(scale * q k^T) v: q [b, n, s, d], k and v [b, g, s, d] (g key/value heads, each
    shared by n/g consecutive query heads, as HF's repeat_kv) -> [b, n, s, d]. ``scale`` 1.0 is OpenMoE
    (no 1/sqrt(d) scaling), 1/sqrt(d) Mixtral.

    A parameterless module of its own so that the training code can swap it for a subclass that runs
    it differently (activation checkpointing) without touching Attention.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gqa = k.shape[1] != q.shape[1]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)


class Attention(nn.Module):
    """Causal attention with RoPE; score scale ``scale`` (1.0: OpenMoE/T5 style, no 1/sqrt(d)) and
    ``kv_heads`` key/value heads (grouped-query attention when fewer than ``heads``).

    Heads are split across TP: q/k/v are column-parallel (n/tp query heads, g/tp key/value heads: TP
    must divide both), o is row-parallel.
    Input and output are residual-stream tensors ([b, s/tp, h] under SP, else [b, s, h]).
    """

    def __init__(self, hidden: int, heads: int, kv_channels: int, std: float, out_std: float,
                 rotary_base: float, tp: TPContext | None = None, query_std: float | None = None,
                 kv_heads: int | None = None, scale: float = 1.0) -> None:
        super().__init__()
        tp = tp or TPContext()
        kv_heads = kv_heads or heads
        if heads % tp.size or kv_heads % tp.size:
            raise ValueError(f"{heads} attention heads / {kv_heads} key/value heads are not divisible by "
                             f"TP {tp.size}")
        self.tp, self.local_heads, self.d, self.rotary_base = tp, heads // tp.size, kv_channels, rotary_base
        self.local_kv_heads = kv_heads // tp.size
        inner = heads * kv_channels
        self.q_proj = ColumnParallelLinear(hidden, inner, tp, std if query_std is None else query_std)
        self.k_proj = ColumnParallelLinear(hidden, kv_heads * kv_channels, tp, std)
        self.v_proj = ColumnParallelLinear(hidden, kv_heads * kv_channels, tp, std)
        self.o_proj = RowParallelLinear(inner, hidden, tp, out_std)
        self.core_attention = CoreAttention(scale)
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

        def heads(t: torch.Tensor) -> torch.Tensor:  # [b, s, n*d] -> [b, n, s, d] (n: q or kv heads)
            return t.view(b, s, -1, self.d).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        cos, sin = self._tables(s, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.core_attention(q, k, v)  # [b, n, s, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, n * self.d))


class GatedMLP(nn.Module):
    """OpenMoE FFN: gate H->2I (x1*silu(x2)) times up H->I, then down I->H; 4*H*I parameters.

    TP: gate/up column-parallel (gate keeps matching x1/x2 halves per rank), down row-parallel.
    """

    def __init__(self, hidden: int, ffn: int, std: float, out_std: float, tp: TPContext | None = None,
                 truncated: bool = False) -> None:
        super().__init__()
        tp = tp or TPContext()
        self.tp = tp
        # gate [2I/tp, H], up [I/tp, H], down [H, I/tp]
        self.gate_proj = ColumnParallelLinear(hidden, 2 * ffn, tp, std, blocks=2, truncated=truncated)
        self.up_proj = ColumnParallelLinear(hidden, ffn, tp, std, truncated=truncated)
        self.down_proj = RowParallelLinear(ffn, hidden, tp, out_std, truncated=truncated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tp.enter(x)
        # both projections' outputs and the hidden's gradient are this MLP's own: backward reuses them
        return self.down_proj(gated_mul(self.gate_proj(x), self.up_proj(x), reuse_buffers=True))

