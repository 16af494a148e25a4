"""Tensor-parallel layers (Megatron-style) and the vocab-parallel cross-entropy.

A block enters the TP region once (:meth:`TPContext.enter`: copy, or all-gather the sequence under
SP), runs its ColumnParallelLinear shards on the shared input, and leaves through a
RowParallelLinear (all-reduce, or reduce-scatter back to sequence shards under SP). Entering once
per block lets q/k/v (or gate/up) share one gather.

Parameter layouts are typed roles (:mod:`megamoe.params`): the split weights here are ``tp_split``;
norms and the router gate, which every TP rank holds whole, are ``replicated`` with ``sp_partial``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed import ProcessGroup

from megamoe.parallel import comm
from megamoe.params import tp_split


@dataclass(frozen=True)
class TPContext:
    size: int = 1
    rank: int = 0
    group: ProcessGroup | None = None
    sequence_parallel: bool = False

    @staticmethod
    def from_mesh(mesh) -> TPContext:  # mesh: megamoe.parallel.mesh.ParallelMesh
        return TPContext(mesh.tp, mesh.tp_rank, mesh.groups.get("tp"), mesh.sequence_parallel)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Residual stream -> input of column-parallel layers. [b, s/tp or s, h] -> [b, s, h]."""
        if self.sequence_parallel:
            return comm.gather_from_sequence(x, self.group)
        return comm.copy_to_tp(x, self.group)

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        """Partial sums of row-parallel layers -> residual stream. [b, s, h] -> [b, s/tp or s, h]."""
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence(x, self.group)
        return comm.reduce_from_tp(x, self.group)

    def shard_range(self, n: int) -> slice:
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def _block_rows(n: int, blocks: int, tp: TPContext) -> torch.Tensor:
    """Rows of an [n, ...] weight made of ``blocks`` equal blocks, this rank's 1/tp of each block
    (so a fused gate projection [x1; x2] keeps matching halves on every rank)."""
    per_block = n // blocks
    part = tp.shard_range(per_block)
    return torch.cat([torch.arange(b * per_block + part.start, b * per_block + part.stop)
                      for b in range(blocks)])


def _padded_rows_role(param: nn.Parameter, rows: torch.Tensor, logical_rows: int, width: int, std: float,
                      truncated: bool = False) -> nn.Parameter:
    """Role of a weight holding ``rows`` of a [padded, width] tensor whose first ``logical_rows`` rows
    are the real ones (a vocabulary padded for TP): the rows past them are padding, kept out of
    initialisation draws and checkpoints so neither depends on the padding, i.e. on TP."""
    valid = rows[rows < logical_rows]
    return tp_split(param, std=std, full_shape=(logical_rows, width), shard=(valid,),
                    truncated=truncated, padding_rows=len(rows) - len(valid))


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W [out, in] split by output rows. Input must already be entered (TPContext.enter);
    output [.., out/tp] stays split. ``blocks``: number of fused equal output blocks; ``logical_out``:
    the real output size when ``out_f`` is padded (the LM head over a padded vocabulary)."""

    def __init__(self, in_f: int, out_f: int, tp: TPContext, std: float, blocks: int = 1,
                 truncated: bool = False, logical_out: int | None = None) -> None:
        super().__init__()
        if out_f % (tp.size * blocks):
            raise ValueError(f"output size {out_f} is not divisible by TP {tp.size} x {blocks} blocks")
        rows = _block_rows(out_f, blocks, tp)
        weight = nn.Parameter(torch.empty(len(rows), in_f))
        if logical_out is not None and logical_out < out_f:
            self.weight = _padded_rows_role(weight, rows, logical_out, in_f, std, truncated)
        else:
            self.weight = tp_split(weight, std=std, full_shape=(out_f, in_f), truncated=truncated,
                                   shard=(rows,) if tp.size > 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class RowParallelLinear(nn.Module):
    """y = exit(x_local W_local^T) with W [out, in] split by input columns; x [.., in/tp]."""

    def __init__(self, in_f: int, out_f: int, tp: TPContext, std: float, truncated: bool = False) -> None:
        super().__init__()
        if in_f % tp.size:
            raise ValueError(f"input size {in_f} is not divisible by TP {tp.size}")
        self.tp = tp
        cols = tp.shard_range(in_f)
        self.weight = tp_split(nn.Parameter(torch.empty(out_f, cols.stop - cols.start)), std=std,
                               full_shape=(out_f, in_f), shard=(slice(None), cols) if tp.size > 1 else None,
                               truncated=truncated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.exit(x @ self.weight.t())


class VocabParallelEmbedding(nn.Module):
    """Embedding with the (padded) vocabulary split across TP; out-of-shard tokens contribute 0 and
    the partial embeddings are summed (or reduce-scattered along the sequence under SP)."""

    def __init__(self, vocab: int, hidden: int, tp: TPContext, std: float, logical_vocab: int | None = None,
                 ) -> None:
        super().__init__()
        self.tp = tp
        rows = tp.shard_range(vocab)
        self.vocab_start, self.vocab_end = rows.start, rows.stop
        weight = nn.Parameter(torch.empty(rows.stop - rows.start, hidden))
        if logical_vocab is not None and logical_vocab < vocab:  # padded rows: never looked up
            self.weight = _padded_rows_role(weight, torch.arange(rows.start, rows.stop), logical_vocab,
                                            hidden, std)
        else:
            self.weight = tp_split(weight, std=std, full_shape=(vocab, hidden),
                                   shard=(rows,) if tp.size > 1 else None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [b, s] -> [b, s(/tp), h]
        if self.tp.size == 1:
            return nn.functional.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        emb = nn.functional.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.exit(emb)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy over vocab-split logits without materialising full-vocab logits on one rank.

    forward: logits [N, V/tp] fp32 (only the first ``valid`` columns are real vocabulary; padding never
    enters the softmax), target [N] -> per-token loss [N] and logsumexp [N] (for the output z-loss),
    with 3 all-reduces of [N] vectors; backward: softmax * (g_loss + g_lse) - onehot * g_loss on the
    local shard, zero on padding columns.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, valid: int,
                group: ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor]:
        import torch.distributed as dist

        n, n_local = logits.shape
        real = logits[:, :valid]  # [N, valid]
        logits_max = real.max(dim=-1).values if valid else real.new_full((n,), float("-inf"))
        if group is not None:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = real - logits_max.unsqueeze(-1)
        outside = (target < vocab_start) | (target >= vocab_start + valid)
        local_t = (target - vocab_start).masked_fill(outside, 0)
        rows = torch.arange(n, device=logits.device)
        target_logit = shifted[rows, local_t] if valid else shifted.new_zeros(n)
        target_logit = target_logit.masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            stacked = torch.stack([target_logit, sum_exp])  # one all-reduce for both
            dist.all_reduce(stacked, group=group)
            target_logit, sum_exp = stacked[0], stacked[1]
        log_sum = sum_exp.log()
        ctx.n_local = n_local
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, outside)
        return log_sum - target_logit, log_sum + logits_max

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_lse: torch.Tensor,
                 ) -> tuple[torch.Tensor, None, None, None, None]:
        softmax, local_t, outside = ctx.saved_tensors
        n, valid = softmax.shape
        grad = softmax.mul_((grad_loss + grad_lse).unsqueeze(-1))
        if valid:
            rows = torch.arange(n, device=softmax.device)
            grad[rows, local_t] -= (~outside).to(grad.dtype) * grad_loss
        if valid < ctx.n_local:  # padding columns: no gradient
            grad = torch.cat([grad, grad.new_zeros(n, ctx.n_local - valid)], dim=-1)
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp: TPContext, vocab_start: int,
                                 vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V_padded/tp] (any float dtype, computed in fp32), target [N] -> per-token loss [N] and
    logsumexp [N] over the ``vocab_size`` real columns (padding never enters the softmax)."""
    valid = max(0, min(logits.shape[-1], vocab_size - vocab_start))
    # TP 1 too: the softmax kept from forward makes backward one pass (autograd's logsumexp recomputes
    # exp(x - lse) into fresh [N, V] tensors)
    return _VocabParallelCrossEntropy.apply(logits.float(), target, vocab_start, valid,
                                            tp.group if tp.size > 1 else None)
