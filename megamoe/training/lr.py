"""Learning-rate schedules with Megatron's names: linear warmup, then constant / linear / cosine /
inverse-square-root decay to min_lr over lr_decay_iters (default: train_iters)."""

from __future__ import annotations

import math

from megamoe.config import TrainConfig


def learning_rate(cfg: TrainConfig, iteration: int) -> float:
    """LR used by the optimizer step of ``iteration`` (1-based)."""
    warmup, peak, floor = cfg.lr_warmup_iters, cfg.lr, cfg.min_lr
    if warmup > 0 and iteration <= warmup:
        return peak * iteration / warmup
    style = cfg.lr_decay_style
    if style == "constant":
        return peak
    if style == "inverse-square-root":
        return max(floor, peak * math.sqrt(max(warmup, 1)) / math.sqrt(max(iteration, 1)))
    decay_iters = cfg.lr_decay_iters or cfg.train_iters
    if decay_iters <= warmup:
        return floor
    ratio = min(max((iteration - warmup) / (decay_iters - warmup), 0.0), 1.0)
    if style == "linear":
        coeff = 1.0 - ratio
    else:  # cosine
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return floor + (peak - floor) * coeff
