"""Activation recomputation, applied to a built model from outside it (Megatron's
--recompute-granularity / --recompute-method / --recompute-num-layers; the approach of torchtitan's
distributed/activation_checkpoint.py).

The model code knows nothing of it. :func:`apply_recompute` swaps modules of the built model for
subclasses that run the same submodules under non-reentrant ``torch.utils.checkpoint``:

- full: each chunk's :class:`LayerStack` becomes a :class:`RecomputedLayerStack` whose segments of
  layers keep only their input for backward and run their forward again there (uniform: every group
  of N consecutive layers; block: the first N layers of the chunk, one by one).
- selective: every attention's :class:`CoreAttention` (softmax(q k^T) v, the largest activation per
  FLOP) becomes a :class:`RecomputedCoreAttention`.

The swapped modules hold the same children under the same keys, so every parameter name (which seeds
the initialisation and keys checkpoints, e.g. ``chunks.0.layers.3.self_attn.q_proj.weight``) is
unchanged. Recomputation happens only in training with grad enabled; eval and no-grad runs are plain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megamoe.config import TrainConfig
from megamoe.model.layers import Attention, CoreAttention
from megamoe.model.openmoe import LayerStack, StageModel

ContextFn = Callable[[], tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]]


def _recomputing(module: nn.Module) -> bool:
    # Outside training, or under no_grad, nothing is saved for backward: checkpointing would only
    # add overhead.
    return module.training and torch.is_grad_enabled()


def _run_layers(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class RecomputedLayerStack(LayerStack):
    """The same layers as ``stack``, run as ``segments``: (layer keys, recompute?) in order.

    context_fn: ``torch.utils.checkpoint``'s (forward context, recompute context) factory; the MoE
    statistics' one marks the re-run so aux/z losses, token counts and all-to-all counters are not
    counted a second time.
    """

    def __init__(self, stack: LayerStack, segments: list[tuple[list[str], bool]],
                 context_fn: ContextFn | None = None) -> None:
        super().__init__(stack)  # same modules under the same keys: parameter names unchanged
        self.training = stack.training
        self.segments = segments
        self.context_fn = context_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _recomputing(self):
            return super().forward(x)
        kwargs = {} if self.context_fn is None else {"context_fn": self.context_fn}
        for keys, recompute in self.segments:
            seg = [self[k] for k in keys]
            if recompute:
                # non-reentrant: collectives inside (TP, SP, the EP all-to-all) simply run again, in
                # the same order on every rank
                x = checkpoint(partial(_run_layers, seg), x, use_reentrant=False, **kwargs)
            else:
                x = _run_layers(seg, x)
        return x


class RecomputedCoreAttention(CoreAttention):
    """Core attention whose [b, n, s, s] intermediates are recomputed in backward, not saved."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not _recomputing(self):
            return super().forward(q, k, v)
        # no MoE statistics inside, so no context_fn is needed
        return checkpoint(super().forward, q, k, v, use_reentrant=False)


def full_recompute_segments(keys: list[str], method: str, num_layers: int) -> list[tuple[list[str], bool]]:
    """Split one chunk's layer keys into (keys, recompute?) segments, in order.

    uniform: every group of ``num_layers`` consecutive layers is recomputed as one segment;
    block: the first ``num_layers`` layers are recomputed one by one, the rest keep activations.
    """
    if num_layers < 1:
        raise ValueError(f"recompute num_layers must be >= 1, got {num_layers}")
    if method == "uniform":
        return [(keys[i:i + num_layers], True) for i in range(0, len(keys), num_layers)]
    if method == "block":
        return [([k], i < num_layers) for i, k in enumerate(keys)]
    raise ValueError(f"recompute method must be uniform or block, got {method}")


def apply_recompute(model: StageModel, train_cfg: TrainConfig) -> StageModel:
    """Apply ``train_cfg.recompute_granularity`` (None, "full" or "selective") to ``model`` in place
    (before the optimizer is built or weights are loaded; parameters stay the same objects and
    names); returns it."""
    granularity = train_cfg.recompute_granularity
    if granularity is None:
        return model
    if granularity == "full":
        for chunk in model.chunks:
            keys = list(chunk.layers.keys())
            segments = full_recompute_segments(keys, train_cfg.recompute_method,
                                               train_cfg.recompute_num_layers)
            chunk.layers = RecomputedLayerStack(chunk.layers, segments, model.moe_stats.recompute_contexts)
    elif granularity == "selective":
        for module in model.modules():
            if isinstance(module, Attention) and type(module.core_attention) is CoreAttention:
                recomputed = RecomputedCoreAttention(module.core_attention.scale)
                recomputed.training = module.core_attention.training
                module.core_attention = recomputed
    else:
        raise ValueError(f"recompute granularity must be full or selective, got {granularity}")
    return model
