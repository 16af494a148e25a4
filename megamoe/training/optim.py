"""AdamW with Megatron's parameter groups, and global-norm gradient clipping.

Gradient norms are computed in fp32 over local gradients; the distributed optimizer (ZeRO) replaces
the reduction with one over its shards and groups.
"""

from __future__ import annotations

import torch
from torch import nn

from megamoe.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on 1-D parameters (norm scales), as in Megatron; fused kernel on GPU."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay),
              dict(params=no_decay, weight_decay=0.0)]
    on_gpu = any(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, fused=True if on_gpu else None)


def local_grad_norm_sq(params: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squared gradient entries over ``params`` (fp32 scalar); missing grads count as 0."""
    sq = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
    return torch.stack(sq).sum() if sq else torch.zeros(())


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """Factor that brings the global norm to at most max_norm (1.0: no clipping; 0 disables)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def clip_grads(params: list[torch.Tensor], total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients so their global norm is at most max_norm (0 disables)."""
    coeff = clip_coefficient(float(total_norm), max_norm)
    if coeff < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coeff)
