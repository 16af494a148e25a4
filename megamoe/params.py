"""Typed parameter roles: how each parameter is laid out across ranks and how it is initialised.

Every parameter megamoe creates carries one :class:`ParamRole` (``param.role``), set once where the
parameter is made. The gradient buffer, the optimizer, the norm and the checkpoints read it through
the predicates below instead of loose attributes (docs/ARCHITECTURE.md, "Parameter roles").

    layout "tp_split"    a Megatron TP shard of a larger logical tensor (``init.full_shape``, ``shard``)
    layout "replicated"  the same tensor on every TP rank; ``sp_partial``: under sequence parallelism
                         it sees only this rank's sequence shard, so its gradient is summed over TP
    layout "expert"      stacked expert weights [E_local, ...]; ``expert_ids`` are the logical ids of
                         the local slots; gradients reduce over expert-DP, norms sum over EP

This module imports nothing from megamoe: it is the bottom layer every package may use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Layout = Literal["tp_split", "replicated", "expert"]


@dataclass(frozen=True)
class InitSpec:
    """How to draw a parameter: N(0, std) over the logical ``full_shape`` (None: the local shape),
    of which this rank keeps ``shard`` (an index tuple; None: all of it); ``ones``: fill with 1;
    ``truncated``: T5X's truncated normal (cut at 2 sigma, rescaled to keep ``std``).
    ``padding_rows``: trailing local rows that are padding, not part of the logical tensor (a vocabulary
    padded for TP): zero, never saved, never used."""

    std: float | None = None
    full_shape: tuple[int, ...] | None = None
    shard: tuple | None = None
    ones: bool = False
    truncated: bool = False
    padding_rows: int = 0
    zeros: bool = False  # state that starts empty (FP8 amax history)


@dataclass(frozen=True)
class ParamRole:
    layout: Layout
    init: InitSpec
    sp_partial: bool = False
    expert_ids: tuple[int, ...] | None = None
    keep_fp32: bool = False  # stays fp32 when the model computes in bf16 (the router gate)


def set_role(param: nn.Parameter, role: ParamRole) -> nn.Parameter:
    param.role = role  # type: ignore[attr-defined]
    return param


def tp_split(param: nn.Parameter, *, std: float, full_shape: tuple[int, ...], shard: tuple | None,
             truncated: bool = False, padding_rows: int = 0) -> nn.Parameter:
    """A TP shard (``shard`` None when TP is 1: then the parameter is the whole tensor)."""
    layout: Layout = "tp_split" if shard is not None else "replicated"
    return set_role(param, ParamRole(layout, InitSpec(std, full_shape, shard, truncated=truncated,
                                                      padding_rows=padding_rows)))


def replicated(param: nn.Parameter, *, std: float | None = None, ones: bool = False,
               sp_partial: bool = False, keep_fp32: bool = False) -> nn.Parameter:
    """Held whole by every TP rank; ``sp_partial``: its input is sequence-sharded under SP."""
    return set_role(param, ParamRole("replicated", InitSpec(std, ones=ones), sp_partial=sp_partial,
                                     keep_fp32=keep_fp32))


def expert(param: nn.Parameter, *, std: float, expert_ids: list[int], truncated: bool = False,
           ) -> nn.Parameter:
    """Stacked weights [E_local, ...] of the logical experts ``expert_ids`` (slot order)."""
    init = InitSpec(std, truncated=truncated)
    return set_role(param, ParamRole("expert", init, expert_ids=tuple(expert_ids)))


def expert_state(param: nn.Parameter, *, expert_ids: list[int]) -> nn.Parameter:
    """Per-expert state that is not trained ([E_local, ...], e.g. the FP8 amax history): zero at
    start, kept fp32, never optimised (requires_grad False), but keyed by logical expert like the
    expert weights, so checkpoints, resharding and the rebalancer carry it with its expert."""
    param.requires_grad_(False)
    return set_role(param, ParamRole("expert", InitSpec(zeros=True), expert_ids=tuple(expert_ids),
                                     keep_fp32=True))


def relabel_experts(param: nn.Parameter, expert_ids: list[int]) -> None:
    """The slots of an expert parameter now hold the logical experts ``expert_ids`` (after the
    rebalancer moved their weights): checkpoints key the slots by these ids."""
    set_role(param, dataclasses.replace(role(param), expert_ids=tuple(expert_ids)))


def role(param: torch.Tensor) -> ParamRole:
    found = getattr(param, "role", None)
    if not isinstance(found, ParamRole):
        raise RuntimeError(f"parameter of shape {tuple(param.shape)} has no role; create it with "
                           "megamoe.params.tp_split / replicated / expert")
    return found


def is_expert(param: torch.Tensor) -> bool:
    return role(param).layout == "expert"


def is_tp_split(param: torch.Tensor) -> bool:
    return role(param).layout == "tp_split"


def is_sp_partial(param: torch.Tensor) -> bool:
    return role(param).sp_partial


@torch.no_grad()
def cast_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Compute weights in ``dtype``, except parameters whose role keeps them fp32 (the router gate:
    routing decisions are precision-sensitive). The optimizer keeps fp32 masters of the rest."""
    for param in model.parameters():
        param.data = param.data.to(torch.float32 if role(param).keep_fp32 else dtype)
