"""Layout-independent parameter initialisation (docs/ARCHITECTURE.md, "Layout invariance").

Every parameter is initialised from a seed derived from its *global identity* (its logical name such as
``layers.3.mlp.experts.5.wi_gate``), by drawing the full logical tensor and keeping the slice this rank
holds. Whatever the TP / PP / EP layout, a given logical weight therefore gets the same values.

How to draw each parameter is its role's :class:`megamoe.params.InitSpec`; :func:`init_model_weights`
walks the model once.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from megamoe.params import role


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a parameter's global name (stable across processes)."""
    return (zlib.crc32(name.encode()) * 1_000_003 + seed * 0x9E3779B1) % (1 << 63)


def _draw(name: str, seed: int, shape: tuple[int, ...], std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(param_seed(seed, name))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_param(param: torch.Tensor, name: str, seed: int) -> None:
    spec = role(param)
    init = spec.init
    if init.ones:
        param.fill_(1.0)
        return
    if spec.expert_ids is not None:
        # [E_local, *expert_shape]: name "...experts.wi_gate" -> "...experts.<gid>.wi_gate".
        head, _, leaf = name.rpartition(".")
        full = init.full_shape or tuple(param.shape[1:])
        for slot, gid in enumerate(spec.expert_ids):
            w = _draw(f"{head}.{gid}.{leaf}", seed, full, init.std)
            param[slot].copy_(w[init.shard] if init.shard else w)
        return
    w = _draw(name, seed, init.full_shape or tuple(param.shape), init.std)
    param.copy_(w[init.shard] if init.shard else w)


def init_model_weights(model: nn.Module, seed: int) -> None:
    """Initialise every parameter of ``model`` from its global name and role."""
    for name, param in model.named_parameters():
        init_param(param, name, seed)
