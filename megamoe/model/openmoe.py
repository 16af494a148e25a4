"""The OpenMoE decoder (DESIGN.md section 4).

Dense block:  y = x + Attn(norm1(x));  z = y + MLP(norm2(y)).
MoE block:    y = x + Attn(norm1(x));  m = y + MoE(norm2(y));  z = m + ExtraMLP(norm3(m)).
Pre-norm RMSNorm (eps 1e-6), RoPE, no attention scaling, no biases, untied LM head.
Layers live in a ModuleDict keyed by their GLOBAL index, so parameter names (which seed the
initialisation and key checkpoints) are the same whichever pipeline stage holds a layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config import Config
from megamoe.model.init import init_model_weights, tag
from megamoe.model.layers import Attention, GatedMLP, RMSNorm, output_std
from megamoe.moe.layer import MoELayer, MoEStats


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, layer: int, stats: MoEStats) -> None:
        super().__init__()
        m = cfg.model
        std, out_std = m.init_method_std, output_std(m.init_method_std, m.num_layers)
        self.is_moe = cfg.moe.is_moe_layer(layer)
        self.input_layernorm = RMSNorm(m.hidden_size, m.norm_epsilon)
        self.self_attn = Attention(m.hidden_size, m.num_attention_heads, m.kv_channels, std,
                                   out_std, m.rotary_base)
        self.post_attention_layernorm = RMSNorm(m.hidden_size, m.norm_epsilon)
        if self.is_moe:
            self.mlp: nn.Module = MoELayer(layer, m.hidden_size, m.ffn_hidden_size, cfg.moe, std,
                                           out_std, stats)
            self.pre_extra_mlp_layernorm = RMSNorm(m.hidden_size, m.norm_epsilon)
            self.extra_mlp = GatedMLP(m.hidden_size, m.ffn_hidden_size, std, out_std)
        else:
            self.mlp = GatedMLP(m.hidden_size, m.ffn_hidden_size, std, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h] -> [b, s, h]
        x = x + self.self_attn(self.input_layernorm(x))
        x = x + self.mlp(self.post_attention_layernorm(x))
        if self.is_moe:
            x = x + self.extra_mlp(self.pre_extra_mlp_layernorm(x))
        return x


class OpenMoEModel(nn.Module):
    """Decoder-only OpenMoE. ``layers`` selects the global layer range this model holds."""

    def __init__(self, cfg: Config, layers: range | None = None) -> None:
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.vocab_size = m.padded_vocab_size(cfg.parallel.tensor_model_parallel_size)
        self.layer_range = layers if layers is not None else range(m.num_layers)
        self.moe_stats = MoEStats()
        self.embed_tokens = nn.Embedding(self.vocab_size, m.hidden_size)
        tag(self.embed_tokens.weight, std=m.init_method_std)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, self.moe_stats)
                                     for i in self.layer_range})
        self.norm = RMSNorm(m.hidden_size, m.norm_epsilon)
        self.lm_head = nn.Linear(m.hidden_size, self.vocab_size, bias=False)  # untied
        tag(self.lm_head.weight, std=m.init_method_std)

    def init_weights(self, seed: int) -> None:
        init_model_weights(self, seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [b, s] int64 -> logits [b, s, V_padded]."""
        x = self.embed_tokens(tokens)
        for layer in self.layers.values():
            x = layer(x)
        return self.lm_head(self.norm(x))

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor,
             loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the (unmasked) tokens of this micro-batch, fp32."""
        logits = self(tokens).float()
        per_token = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1),
                                    reduction="none")
        if loss_mask is None:
            return per_token.mean()
        mask = loss_mask.reshape(-1).float()
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def count_parameters(cfg: Config) -> dict[str, int]:
    """Parameter counts from the config alone (no allocation), for presets and FLOP estimates.

    total: all parameters; active: parameters a token touches (top-k experts); embedding: input
    embedding + LM head (padded vocab).
    """
    m, moe = cfg.model, cfg.moe
    h, i, inner = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads * m.kv_channels
    v = m.padded_vocab_size(1)
    attn = 4 * h * inner
    ffn = 4 * h * i
    total = active = 0
    for layer in range(m.num_layers):
        base = attn + 2 * h  # attention + two norms
        if moe.is_moe_layer(layer):
            extra = ffn + h + moe.num_experts * h  # extra MLP + its norm + router
            total += base + extra + moe.num_experts * ffn
            active += base + extra + moe.router_topk * ffn
        else:
            total += base + ffn
            active += base + ffn
    embedding = 2 * v * h
    return dict(total=total + embedding + h, active=active + embedding + h, embedding=embedding)
