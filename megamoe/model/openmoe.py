"""The OpenMoE decoder (docs/ARCHITECTURE.md, "The OpenMoE model"), and the Mixtral family beside it
(``--model-family mixtral``: every block is an MoE block without the extra MLP, GQA, 1/sqrt(d)).

Dense block:  y = x + Attn(norm1(x));  z = y + MLP(norm2(y)).
MoE block:    y = x + Attn(norm1(x));  m = y + MoE(norm2(y));  z = m + ExtraMLP(norm3(m)).
Pre-norm RMSNorm (eps 1e-6), RoPE, no attention scaling, no biases, untied LM head.
Layers live in a ModuleDict keyed by their GLOBAL index, so parameter names (which seed the
initialisation and key checkpoints) are the same whichever pipeline stage holds a layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from megamoe.config import Config
from megamoe.model.init import InitStds, init_model_weights
from megamoe.model.layers import Attention, GatedMLP, RMSNorm
from megamoe.moe.dispatcher import EPTopology, ExpertPlacement
from megamoe.moe.layer import MoELayer, MoEParallel, MoEStats, attach_loss
from megamoe.parallel.tensor import (
    ColumnParallelLinear,
    TPContext,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config, layer: int, stats: MoEStats, tp: TPContext, moe_par: MoEParallel,
                 placement: ExpertPlacement | None = None) -> None:
        """``placement``: where this layer's experts live (None: contiguous blocks)."""
        super().__init__()
        m, stds = cfg.model, InitStds.for_model(cfg.model)
        mixtral = m.model_family == "mixtral"
        self.is_moe = cfg.moe.is_moe_layer(layer)
        self.has_extra_mlp = self.is_moe and not mixtral  # OpenMoE's dense MLP after each MoE
        self.input_layernorm = RMSNorm(m.hidden_size, m.norm_epsilon)
        self.self_attn = Attention(m.hidden_size, m.num_attention_heads, m.kv_channels, stds.key_value,
                                   stds.attention_out, m.rotary_base, tp, query_std=stds.query,
                                   kv_heads=m.kv_heads, scale=m.kv_channels ** -0.5 if mixtral else 1.0)
        self.post_attention_layernorm = RMSNorm(m.hidden_size, m.norm_epsilon)
        if self.is_moe:
            num_moe_layers = sum(cfg.moe.is_moe_layer(i) for i in range(m.num_layers))
            self.mlp: nn.Module = MoELayer(layer, m.hidden_size, m.ffn_hidden_size, cfg.moe, stds.mlp_in,
                                           stds.mlp_out, stats, placement=placement, par=moe_par,
                                           num_moe_layers=num_moe_layers, truncated_init=stds.truncated,
                                           activation="swiglu" if mixtral else "openmoe",
                                           renormalize=mixtral)
        else:
            self.mlp = GatedMLP(m.hidden_size, m.ffn_hidden_size, stds.mlp_in, stds.mlp_out, tp,
                                truncated=stds.truncated)
        if self.has_extra_mlp:
            self.pre_extra_mlp_layernorm = RMSNorm(m.hidden_size, m.norm_epsilon)
            self.extra_mlp = GatedMLP(m.hidden_size, m.ffn_hidden_size, stds.mlp_in, stds.mlp_out, tp,
                                      truncated=stds.truncated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b, s, h] -> [b, s, h]
        x = x + self.self_attn(self.input_layernorm(x))
        x = x + self.mlp(self.post_attention_layernorm(x))
        if self.has_extra_mlp:
            x = x + self.extra_mlp(self.pre_extra_mlp_layernorm(x))
        return x


class LayerStack(nn.ModuleDict):
    """A chunk's decoder layers keyed by global index, run in that order: [b, s(/tp), h] -> same.

    A ModuleDict with a forward, so that the training code can swap it for a subclass that runs the
    same layers differently (activation checkpointing) without renaming any parameter.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = layer(x)
        return x


class OpenMoEModel(nn.Module):
    """Decoder-only OpenMoE, or one pipeline chunk of it.

    layers: the global layer range held; pre_process: holds the embedding (first stage);
    post_process: holds the final norm and LM head (last stage). Under TP the embedding and LM head
    split the (padded) vocabulary and the loss is a vocab-parallel cross-entropy; under SP the
    residual stream is [b, s/tp, h] between them.
    """

    def __init__(self, cfg: Config, layers: range | None = None, tp: TPContext | None = None,
                 ep: EPTopology | None = None, pre_process: bool = True, post_process: bool = True,
                 stats: MoEStats | None = None, placements: Mapping[int, ExpertPlacement] | None = None,
                 ) -> None:
        super().__init__()
        m = cfg.model
        placements = placements or {}
        self.cfg, self.tp = cfg, tp or TPContext()
        self.pre_process, self.post_process = pre_process, post_process
        moe_par = MoEParallel(tp=self.tp, ep=ep or EPTopology.single(),
                              tp_dedup=cfg.parallel.moe_tp_dedup, chunks=cfg.parallel.moe_alltoall_chunks)
        self.vocab_size = m.padded_vocab_size(self.tp.size)  # rows past m.vocab_size are padding
        stds = InitStds.for_model(m)
        self.layer_range = layers if layers is not None else range(m.num_layers)
        self.moe_stats = stats or MoEStats()
        if pre_process:
            self.embed_tokens = VocabParallelEmbedding(self.vocab_size, m.hidden_size, self.tp,
                                                       stds.embedding, logical_vocab=m.vocab_size)
        self.layers = LayerStack({str(i): DecoderLayer(cfg, i, self.moe_stats, self.tp, moe_par,
                                                           placements.get(i))
                                  for i in self.layer_range})
        if post_process:
            self.norm = RMSNorm(m.hidden_size, m.norm_epsilon)
            # untied LM head, split by vocabulary rows: logits stay [b, s, V/tp]
            self.lm_head = ColumnParallelLinear(m.hidden_size, self.vocab_size, self.tp, stds.lm_head,
                                                truncated=stds.truncated, logical_out=m.vocab_size)

    def init_weights(self, seed: int) -> None:
        init_model_weights(self, seed)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s(/tp), h] through this chunk's layers."""
        return self.layers(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[b, s(/tp), h] -> logits [b, s, V_padded / tp]."""
        return self.lm_head(self.tp.enter(self.norm(hidden)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [b, s] int64 (full sequence on every TP rank) -> logits [b, s, V_padded / tp]."""
        return self.logits(self.decode(self.embed_tokens(tokens)))

    def lm_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the (unmasked) tokens of this micro-batch, fp32. T5X's
        output z-loss (coeff x mean logsumexp^2, vocab-parallel under TP) enters backward beside it
        (attach_loss) so that the returned value stays the LM loss alone; its value is recorded."""
        per_token, lse = vocab_parallel_cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), self.tp,
            self.tp.shard_range(self.vocab_size).start, self.cfg.model.vocab_size)  # [N], [N]
        mask = None if loss_mask is None else loss_mask.reshape(-1).float()

        def mean(values: torch.Tensor) -> torch.Tensor:
            return values.mean() if mask is None else (values * mask).sum() / mask.sum().clamp(min=1.0)

        loss, output_z = mean(per_token), mean(lse.pow(2))
        self.moe_stats.record_output_z(output_z.detach())
        coeff = self.cfg.model.output_z_loss_coeff
        if coeff and self.training and torch.is_grad_enabled():
            loss = attach_loss(loss, coeff * output_z, self.moe_stats.grad_scale)
        return loss

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor,
             loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_loss(self(tokens), labels, loss_mask)

    def stage_forward(self, tokens: torch.Tensor, hidden: torch.Tensor | None,
                      labels: torch.Tensor) -> torch.Tensor:
        """One pipeline chunk: (tokens on the first stage | received hidden) -> hidden, or the LM
        loss on the last stage."""
        x = self.embed_tokens(tokens) if self.pre_process else hidden
        x = self.decode(x)
        return self.lm_loss(self.logits(x), labels) if self.post_process else x


class StageModel(nn.Module):
    """This rank's model chunks (one per virtual pipeline stage), sharing one MoEStats."""

    def __init__(self, chunks: list[OpenMoEModel]) -> None:
        super().__init__()
        self.chunks = nn.ModuleList(chunks)
        self.moe_stats = chunks[0].moe_stats

    def moe_layers(self) -> dict[int, MoELayer]:
        """This stage's MoE layers by global layer index."""
        return {module.layer: module for module in self.modules() if isinstance(module, MoELayer)}

    def placements(self) -> dict[int, ExpertPlacement]:
        """Where each of this stage's MoE layers keeps its experts now (the rebalancer moves them)."""
        return {layer: moe.placement for layer, moe in sorted(self.moe_layers().items())}

    def init_weights(self, seed: int) -> None:
        for chunk in self.chunks:
            chunk.init_weights(seed)


def count_parameters(cfg: Config) -> dict[str, int]:
    """Parameter counts from the config alone (no allocation), for presets and FLOP estimates.

    total: all parameters; active: parameters a token touches (top-k experts); embedding: input
    embedding + LM head (padded vocab).
    """
    m, moe = cfg.model, cfg.moe
    h, i, inner = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads * m.kv_channels
    v = m.padded_vocab_size(1)
    mixtral = m.model_family == "mixtral"
    attn = 2 * h * inner + 2 * h * m.kv_heads * m.kv_channels  # q, o; k, v over the query groups
    ffn = 4 * h * i
    expert_ffn = 3 * h * i if mixtral else ffn  # SwiGLU w1, w3, w2 / OpenMoE's 2I-wide gate
    total = active = 0
    for layer in range(m.num_layers):
        base = attn + 2 * h  # attention + two norms
        if moe.is_moe_layer(layer):
            extra = moe.num_experts * h + (0 if mixtral else ffn + h)  # router (+ extra MLP and its norm)
            total += base + extra + moe.num_experts * expert_ffn
            active += base + extra + moe.router_topk * expert_ffn
        else:
            total += base + ffn
            active += base + ffn
    embedding = 2 * v * h
    return dict(total=total + embedding + h, active=active + embedding + h, embedding=embedding)
