"""Layout-independent parameter initialisation (DESIGN.md section 2).

Every parameter is initialised from a seed derived from its *global identity* (its logical name such as
``layers.3.mlp.experts.5.wi_gate``), by drawing the full logical tensor and keeping the slice this rank
holds. Whatever the TP / PP / EP layout, a given logical weight therefore gets the same values.

Modules tag their parameters with :func:`tag`; :func:`init_model_weights` walks the model once.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn


def tag(param: nn.Parameter, *, std: float | None, full_shape: tuple[int, ...] | None = None,
        shard: tuple[slice, ...] | None = None, expert_ids: list[int] | None = None,
        ones: bool = False) -> nn.Parameter:
    """Record how to initialise ``param``.

    std: normal std (ignored when ``ones``). full_shape/shard: the logical tensor and the slice of it
    this rank holds (tensor parallelism). expert_ids: for stacked expert weights [E_local, ...], the
    global expert id of each leading slot; each expert is then drawn as its own logical tensor.
    """
    param._mm_init = dict(std=std, full_shape=full_shape, shard=shard, expert_ids=expert_ids,
                          ones=ones)
    return param


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed from the run seed and a parameter's global name (stable across processes)."""
    return (zlib.crc32(name.encode()) * 1_000_003 + seed * 0x9E3779B1) % (1 << 63)


def _draw(name: str, seed: int, shape: tuple[int, ...], std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(param_seed(seed, name))
    return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)


@torch.no_grad()
def init_param(param: torch.Tensor, name: str, seed: int) -> None:
    spec = param._mm_init  # type: ignore[attr-defined]
    if spec["ones"]:
        param.fill_(1.0)
        return
    std = spec["std"]
    if spec["expert_ids"] is not None:
        # [E_local, *expert_shape]: name "...experts.wi_gate" -> "...experts.<gid>.wi_gate".
        head, _, leaf = name.rpartition(".")
        full = spec["full_shape"] or tuple(param.shape[1:])
        for slot, gid in enumerate(spec["expert_ids"]):
            w = _draw(f"{head}.{gid}.{leaf}", seed, full, std)
            param[slot].copy_(w[spec["shard"]] if spec["shard"] else w)
        return
    full = spec["full_shape"] or tuple(param.shape)
    w = _draw(name, seed, full, std)
    param.copy_(w[spec["shard"]] if spec["shard"] else w)


def init_model_weights(model: nn.Module, seed: int) -> None:
    """Initialise every tagged parameter of ``model`` from its global name; untagged is an error."""
    for name, param in model.named_parameters():
        if not hasattr(param, "_mm_init"):
            raise RuntimeError(f"parameter {name} has no init tag; call megamoe.model.init.tag on it")
        init_param(param, name, seed)
