"""Layout-independent parameter initialisation (docs/ARCHITECTURE.md, "Layout invariance").

Every parameter is initialised from a seed derived from its *global identity* (its logical name such as
``layers.3.mlp.experts.5.wi_gate``), by drawing the full logical tensor and keeping the slice this rank
holds. Whatever the TP / PP / EP layout, a given logical weight therefore gets the same values.

How to draw each parameter is its role's :class:`megamoe.params.InitSpec`; :func:`init_model_weights`
walks the model once.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from megamoe.config import ModelConfig
from megamoe.params import role

T5X_MOE_INIT_SCALE = 0.1  # ST-MoE / OpenMoE: variance scaling with scale 0.1 (dense T5 uses 1.0)


@dataclass(frozen=True)
class InitStds:
    """Standard deviation of each kind of weight, and whether MLP-like kernels (dense, experts, LM
    head) are drawn from T5X's truncated normal."""

    embedding: float
    query: float
    key_value: float
    attention_out: float
    mlp_in: float  # gate / up projections, dense and experts: fan-in H
    mlp_out: float  # down projections: fan-in I
    lm_head: float
    truncated: bool = False

    @staticmethod
    def for_model(m: ModelConfig) -> InitStds:
        if m.init_method == "t5x":
            # T5X folds attention's 1/sqrt(d) into the query init; at init the attention logits then
            # have std ~ T5X_MOE_INIT_SCALE whatever the width (docs/ARCHITECTURE.md, "The OpenMoE model")
            def fan_in(n: int) -> float:
                return math.sqrt(T5X_MOE_INIT_SCALE / n)

            h = m.hidden_size
            return InitStds(embedding=1.0, query=fan_in(h) / math.sqrt(m.kv_channels), key_value=fan_in(h),
                            attention_out=fan_in(m.num_attention_heads * m.kv_channels), mlp_in=fan_in(h),
                            mlp_out=fan_in(m.ffn_hidden_size), lm_head=fan_in(h), truncated=True)
        std = m.init_method_std
        out = std / math.sqrt(2.0 * m.num_layers)  # Megatron's scaled init of residual outputs
        return InitStds(embedding=std, query=std, key_value=std, attention_out=out, mlp_in=std, mlp_out=out,
                        lm_head=std)


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a parameter's global name (stable across processes)."""
    return (zlib.crc32(name.encode()) * 1_000_003 + seed * 0x9E3779B1) % (1 << 63)


def _draw(name: str, seed: int, shape: tuple[int, ...], std: float, truncated: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(param_seed(seed, name))
    out = torch.empty(shape, dtype=torch.float32)
    if not truncated:
        return out.normal_(0.0, std, generator=gen)
    # flax's variance_scaling "truncated_normal": cut at 2 sigma, sigma raised so the std stays std
    sigma = std / 0.87962566103423978
    return nn.init.trunc_normal_(out, 0.0, sigma, -2 * sigma, 2 * sigma, generator=gen)


@torch.no_grad()
def init_param(param: torch.Tensor, name: str, seed: int) -> None:
    spec = role(param)
    init = spec.init
    if init.ones or init.zeros:
        param.fill_(1.0 if init.ones else 0.0)
        return
    if spec.expert_ids is not None:
        # [E_local, *expert_shape]: name "...experts.wi_gate" -> "...experts.<gid>.wi_gate".
        head, _, leaf = name.rpartition(".")
        full = init.full_shape or tuple(param.shape[1:])
        for slot, gid in enumerate(spec.expert_ids):
            w = _draw(f"{head}.{gid}.{leaf}", seed, full, init.std, init.truncated)
            param[slot].copy_(w[init.shard] if init.shard else w)
        return
    w = _draw(name, seed, init.full_shape or tuple(param.shape), init.std, init.truncated)
    real = param.shape[0] - init.padding_rows
    param[:real].copy_(w[init.shard] if init.shard else w)
    param[real:].zero_()  # vocabulary padding: never looked up, masked out of the loss


def init_model_weights(model: nn.Module, seed: int) -> None:
    """Initialise every parameter of ``model`` from its global name and role."""
    for name, param in model.named_parameters():
        init_param(param, name, seed)
