"""Autograd-aware collectives over a process group (Megatron's f / g and the sequence-parallel ops).

Every function is an identity when the group has one rank. Sequence-parallel ops split / gather
along ``dim`` (the sequence dimension, 1 for our [b, s, h] activations); collectives run on a
contiguous copy with that dim moved to the front, since gloo and NCCL gather along dim 0.
Works on gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def all_reduce_sum(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """In-place sum over the group (no autograd); returns x."""
    if group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


# torch >= 2.10 renamed the tensor-form collectives; keep both spellings working.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    n = dist.get_world_size(group)
    front = x.movedim(dim, 0).contiguous()  # [s_local, ...]
    out = front.new_empty((n * front.shape[0],) + tuple(front.shape[1:]))
    _all_gather_single(out, front, group=group)
    # contiguous: every consumer (q/k/v, gate/up, the LM head) would otherwise save its own copy
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    n = dist.get_world_size(group)
    front = x.movedim(dim, 0).contiguous()  # [s, ...]
    if front.shape[0] % n:
        raise ValueError(f"sequence length {front.shape[0]} is not divisible by TP size {n}")
    out = front.new_empty((front.shape[0] // n,) + tuple(front.shape[1:]))
    _reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim)


def _split(x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % n:
        raise ValueError(f"sequence length {x.shape[dim]} is not divisible by TP size {n}")
    return x.chunk(n, dim=dim)[r].contiguous()


class _CopyToGroup(torch.autograd.Function):
    """forward: identity; backward: all-reduce (sum) the gradient. Megatron's f."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """forward: all-reduce (sum); backward: identity. Megatron's g."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToSequence(torch.autograd.Function):
    """forward: keep this rank's sequence chunk; backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromSequence(torch.autograd.Function):
    """forward: all-gather the sequence; backward: reduce-scatter (the consumer is TP-parallel, so
    each rank holds a partial gradient of the full sequence) or, if ``reduce_grad`` is False, split."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: ProcessGroup, reduce_grad: bool) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.reduce_grad = dim, group, reduce_grad
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.reduce_grad:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """forward: reduce-scatter partial sums along the sequence; backward: all-gather."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: ProcessGroup) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _gather(grad, ctx.dim, ctx.group), None, None


def copy_to_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromGroup.apply(x, group)


def scatter_to_sequence(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, dim, group)


def gather_from_sequence(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1,
                         reduce_grad: bool = True) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromSequence.apply(x, dim, group, reduce_grad)


def reduce_scatter_to_sequence(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterToSequence.apply(x, dim, group)


def all_to_all_single_raw(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                          group: ProcessGroup) -> torch.Tensor:
    """Uneven all-to-all of rows (no autograd). x: [sum(in_splits), ...] -> [sum(out_splits), ...]."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits,
                           group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """forward: rows travel by (in_splits -> out_splits); backward: gradients travel back by the
    swapped splits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: ProcessGroup) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return all_to_all_single_raw(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return all_to_all_single_raw(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: ProcessGroup | None) -> torch.Tensor:
    """Differentiable uneven all-to-all over ``group`` (identity for a one-rank group)."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, out_splits, in_splits, group)


def all_gather_rows(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Stack equal-shaped tensors of every rank (no autograd): [n, *x.shape]."""
    n = group_size(group)
    if n == 1:
        return x.unsqueeze(0)
    x = x.contiguous().view(1, *x.shape)
    out = x.new_empty((n,) + tuple(x.shape[1:]))  # gathered along dim 0
    _all_gather_single(out, x, group=group)
    return out


def merge_dicts(local: dict, group: ProcessGroup | None) -> dict:
    """Every group member's (small, picklable) dict merged into one, the same on every member: e.g.
    each pipeline stage's {layer: value}. A collective over ``group`` (None: a group of one)."""
    if group_size(group) == 1:
        return dict(local)
    every: list[dict] = [{} for _ in range(group_size(group))]
    dist.all_gather_object(every, local, group=group)
    return {key: value for part in every for key, value in part.items()}


def all_to_all_async(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                     group: ProcessGroup) -> tuple[torch.Tensor, dist.Work]:
    """Start an uneven all-to-all (no autograd); returns (output buffer, work handle to wait on)."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                  group=group, async_op=True)
    return out, work
