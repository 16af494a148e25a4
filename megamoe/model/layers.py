"""Dense building blocks of the OpenMoE decoder: RMSNorm, rotary embedding, attention, gated MLP.

Shapes use b = micro-batch, s = sequence, h = hidden, n = heads, d = kv_channels, i = ffn size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.model.init import tag


def gated_act(h: torch.Tensor) -> torch.Tensor:
    """OpenMoE's gate activation: the 2I-wide gate projection splits into halves x1, x2 -> x1*silu(x2)."""
    x1, x2 = h.chunk(2, dim=-1)
    return x1 * F.silu(x2)


class RMSNorm(nn.Module):
    """T5-style RMSNorm (no mean subtraction, no bias), statistics in fp32."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = tag(nn.Parameter(torch.empty(hidden)), std=None, ones=True)

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


def _linear_weight(out_f: int, in_f: int, std: float) -> nn.Parameter:
    return tag(nn.Parameter(torch.empty(out_f, in_f)), std=std)


class Attention(nn.Module):
    """Causal multi-head attention with RoPE and NO 1/sqrt(d) score scaling (OpenMoE/T5 style)."""

    def __init__(self, hidden: int, heads: int, kv_channels: int, std: float, out_std: float,
                 rotary_base: float) -> None:
        super().__init__()
        self.heads, self.d, self.rotary_base = heads, kv_channels, rotary_base
        inner = heads * kv_channels
        self.q_proj = nn.Linear(hidden, inner, bias=False)
        self.k_proj = nn.Linear(hidden, inner, bias=False)
        self.v_proj = nn.Linear(hidden, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden, bias=False)
        for lin, s in ((self.q_proj, std), (self.k_proj, std), (self.v_proj, std),
                       (self.o_proj, out_std)):
            tag(lin.weight, std=s)
        self._rope: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _tables(self, s: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0] < s or self._rope[1].device != device:
            cos, sin = rotary_tables(s, self.d, self.rotary_base, device)
            self._rope = (s, cos, sin)
        return self._rope[1][:s], self._rope[2][:s]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape  # [b, s, h]

        def heads(t: torch.Tensor) -> torch.Tensor:  # [b, s, n*d] -> [b, n, s, d]
            return t.view(b, s, self.heads, self.d).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        cos, sin = self._tables(s, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)  # [b, n, s, d]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.d))


class GatedMLP(nn.Module):
    """OpenMoE FFN: gate H->2I (x1*silu(x2)) times up H->I, then down I->H; 4*H*I parameters."""

    def __init__(self, hidden: int, ffn: int, std: float, out_std: float) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, 2 * ffn, bias=False)  # weight [2I, H]
        self.up_proj = nn.Linear(hidden, ffn, bias=False)  # weight [I, H]
        self.down_proj = nn.Linear(ffn, hidden, bias=False)  # weight [H, I]
        tag(self.gate_proj.weight, std=std)
        tag(self.up_proj.weight, std=std)
        tag(self.down_proj.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_act(self.gate_proj(x)) * self.up_proj(x))


def output_std(std: float, num_layers: int) -> float:
    """Megatron's scaled init for projections that write into the residual stream."""
    return std / math.sqrt(2.0 * num_layers)
