"""Gradient buffers: the one gradient path of every run (docs/ARCHITECTURE.md, "One step").

Megatron's param_and_grad_buffer at picotron's size. The parameters of one *group* (dense ones,
replicated over data parallelism; expert ones, replicated over expert-data parallelism) get one flat
fp32 buffer. A post-accumulate-grad hook adds each parameter's gradient into its view and drops
``param.grad``, so micro-batches accumulate in fp32 whatever the compute dtype. The buffer is cut into
buckets (about ``--ddp-bucket-size`` elements, one dtype each, padded to a multiple of the group size
so that every replica owns 1/N of every bucket). Each bucket is reduced with one collective:

    not sharded (no ZeRO)   all-reduce: every replica holds the whole summed gradient
    sharded (ZeRO-1)        reduce-scatter: each replica keeps its summed 1/N ("owned") part
    sharded, stage 2        :class:`ShardedGradBuffer`: only the owned part persists; a bucket's
                            gradients land in a transient buffer reduce-scattered every micro-batch

With ``--overlap-grad-reduce`` a bucket's reduction starts (async) as soon as its last gradient of the
step has arrived, strictly in bucket order (the same order on every replica). A hook must fire once
per parameter and micro-batch; the chunked expert exchange makes sure of that (moe/dispatcher.py).
``--grad-reduce-in-bf16`` reduces a bf16 copy of the bucket. After :meth:`GradBuffer.finish`, the
owned part holds the mean gradient: under sequence parallelism the ``sp_partial`` parameters (which
saw only a sequence shard) are summed over TP, and the sum over replicas is divided by ``divisor``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megamoe.parallel.comm import _reduce_scatter_single
from megamoe.params import is_sp_partial


@dataclass
class Bucket:
    """Flat positions [start, end) of its group's buffer (end - start divisible by the group size)."""

    start: int
    end: int
    params: list[nn.Parameter]
    delivered: int = 0  # gradients received this step (stage 1) / this round (stage 2)
    work: object | None = None  # reduction in flight (async handle) or True once done synchronously
    reduced: torch.Tensor | None = None  # the reduction's output, until copied into the buffer
    transient: torch.Tensor | None = None  # stage 2: [end - start] gradients of the current round

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype


@dataclass
class _Round:
    """Stage 2: one bucket's reduce-scatter of one micro-batch's gradients, in flight."""

    buffer: ShardedGradBuffer
    bucket: Bucket
    work: object | None
    reduced: torch.Tensor  # [bucket / N] this rank's summed part once ``work`` is done
    held_bytes: int  # transient buffers kept alive until then


@dataclass
class GradMemory:
    """Shared by the buffers of one optimizer: live gradient bytes (persistent + transient) and their
    peak, and (stage 2) the reductions in flight, at most two whichever group they belong to."""

    live: int = 0
    peak: int = 0
    in_flight: list[_Round] = field(default_factory=list)

    def add(self, delta_bytes: int) -> None:
        self.live += delta_bytes
        self.peak = max(self.peak, self.live)

    def complete_oldest(self) -> None:
        done = self.in_flight.pop(0)  # dropping it frees the transient buffers
        if done.work is not None:
            done.work.wait()
        lo, hi = done.buffer.layout.owned(done.bucket)
        done.buffer.view(done.bucket, lo, hi).add_(done.reduced)
        self.add(-done.held_bytes)


@dataclass
class GroupLayout:
    """Where each parameter of a group lives in the flat numbering, and who shares it."""

    name: str  # "dense" or "expert"
    params: list[nn.Parameter]
    group: dist.ProcessGroup | None  # the replicas (None: a group of one)
    size: int  # ranks the buffer is sharded over: the replicas with ZeRO, 1 without
    rank: int  # this rank's index among them (0 without ZeRO)
    offsets: dict[int, int] = field(default_factory=dict)  # id(param) -> start in the flat numbering
    buckets: list[Bucket] = field(default_factory=list)
    numel: int = 0

    @staticmethod
    def build(name: str, params: list[nn.Parameter], group: dist.ProcessGroup | None, size: int, rank: int,
              bucket_numel: int) -> GroupLayout:
        """Buckets in reverse parameter order (roughly the order backward produces gradients), each
        holding one dtype, closed once it reaches ``bucket_numel`` and padded to a multiple of size."""
        layout = GroupLayout(name, params, group, size, rank)
        offset, bucket_start, bucket_params = 0, 0, []

        def close_bucket() -> None:
            nonlocal offset, bucket_start, bucket_params
            offset += (-(offset - bucket_start)) % size
            layout.buckets.append(Bucket(bucket_start, offset, bucket_params))
            bucket_start, bucket_params = offset, []

        for p in reversed(params):
            if bucket_params and p.dtype != bucket_params[0].dtype:
                close_bucket()
            layout.offsets[id(p)] = offset
            offset += p.numel()
            bucket_params.append(p)
            if offset - bucket_start >= bucket_numel:
                close_bucket()
        if bucket_params:
            close_bucket()
        layout.numel = offset
        return layout

    def owned(self, bucket: Bucket, rank: int | None = None) -> tuple[int, int]:
        """Flat range [lo, hi) of ``bucket`` this rank (or member ``rank``) owns (all of it without
        sharding)."""
        per_rank = (bucket.end - bucket.start) // self.size
        lo = bucket.start + (self.rank if rank is None else rank) * per_rank
        return lo, lo + per_rank

    def owner(self, position: int) -> tuple[Bucket, int]:
        """The bucket holding flat ``position`` and the member that owns it."""
        bucket = next(b for b in self.buckets if b.start <= position < b.end)
        return bucket, (position - bucket.start) * self.size // (bucket.end - bucket.start)


class GradBuffer:
    """The fp32 gradients of one group; see the module docstring. Stage 1, sharded or not."""

    def __init__(self, layout: GroupLayout, divisor: float, sp_group: dist.ProcessGroup | None,
                 overlap: bool, reduce_dtype: torch.dtype, memory: GradMemory) -> None:
        self.layout, self.divisor, self.sp_group = layout, divisor, sp_group
        self.overlap, self.reduce_dtype = overlap, reduce_dtype
        self.expected_per_param = 1  # gradients each parameter delivers per step (micro-batches)
        device = layout.params[0].device
        self.data = torch.zeros(self._persistent_numel(), dtype=torch.float32, device=device)
        self.memory = memory
        memory.add(self.data.numel() * 4)
        self.written: set[int] = set()  # ids of the parameters whose gradient this step is in data
        for bucket in layout.buckets:
            for p in bucket.params:
                p.register_post_accumulate_grad_hook(self._make_hook(bucket, p))

    @property
    def sharded(self) -> bool:
        return self.layout.size > 1

    def _persistent_numel(self) -> int:
        return self.layout.numel

    def view(self, bucket: Bucket, lo: int, hi: int) -> torch.Tensor:
        """The (after :meth:`finish`: reduced, mean) gradient of owned flat positions [lo, hi)."""
        return self.data[lo:hi]

    # -- per step ---------------------------------------------------------------------------------
    def start_step(self, micro_batches: int) -> None:
        self.expected_per_param = micro_batches
        for bucket in self.layout.buckets:
            bucket.delivered, bucket.work, bucket.reduced = 0, None, None

    def zero(self) -> None:
        """Start the next step's gradients without a pass over the buffer: each parameter's first
        gradient of a step is copied in, later ones added; a parameter that got none is zeroed before
        its bucket is reduced (:meth:`_zero_missing`). The padding between buckets' parameters is never
        written with anything but zeros (reductions of zeros)."""
        self.written.clear()

    def _zero_missing(self, bucket: Bucket) -> None:
        for p in bucket.params:
            if id(p) not in self.written:
                start = self.layout.offsets[id(p)]
                self.data[start:start + p.numel()].zero_()
                self.written.add(id(p))

    def _make_hook(self, bucket: Bucket, p: nn.Parameter):
        start = self.layout.offsets[id(p)]

        def hook(param: torch.Tensor) -> None:
            region, grad = self.data[start:start + param.numel()], param.grad.reshape(-1)
            if id(param) in self.written:
                region.add_(grad)
            else:  # one read and one write instead of zeroing and adding
                region.copy_(grad)
                self.written.add(id(param))
            param.grad = None  # the buffer holds it now: no second full-size gradient
            bucket.delivered += 1
            if self.overlap and bucket.delivered == self.expected_per_param * len(bucket.params):
                self._launch_ready_buckets()

        return hook

    def _launch_ready_buckets(self) -> None:
        """Start the reductions of complete buckets, strictly in bucket order."""
        for bucket in self.layout.buckets:
            if bucket.work is not None:
                continue
            if bucket.delivered < self.expected_per_param * len(bucket.params):
                return
            self._reduce(bucket, async_op=True)

    def _reduce(self, bucket: Bucket, async_op: bool) -> None:
        """forward: sum the bucket over the replicas (all-reduce, or reduce-scatter when sharded)."""
        self._zero_missing(bucket)
        if self.layout.group is None:
            bucket.work = True
            return
        grads = _in_dtype(self.data[bucket.start:bucket.end], self.reduce_dtype)
        if self.sharded:
            bucket.reduced, work = _reduce_scatter(grads, self.layout, async_op)
        else:
            bucket.reduced = grads
            work = dist.all_reduce(grads, group=self.layout.group, async_op=async_op)
        bucket.work = work if async_op else True

    def finish(self) -> None:
        """Complete every bucket's reduction; leave the mean gradient in the owned parts."""
        for bucket in self.layout.buckets:
            if bucket.work is None:
                self._reduce(bucket, async_op=False)
            elif bucket.work is not True:
                bucket.work.wait()
            lo, hi = self.layout.owned(bucket)
            own = self.data[lo:hi]
            if bucket.reduced is not None and bucket.reduced.data_ptr() != own.data_ptr():
                whole = not self.sharded  # all-reduced: the bucket's full range came back
                own.copy_(bucket.reduced[lo - bucket.start:hi - bucket.start] if whole else bucket.reduced)
            bucket.reduced = None
        self._sum_sequence_partials()
        if self.divisor != 1:  # one replica, one micro-batch: a pass over the buffer for nothing
            self.data.div_(self.divisor)

    def _sum_sequence_partials(self) -> None:
        """SP: parameters replicated over TP that saw only this rank's sequence shard sum their owned
        gradients over TP, in one all-reduce (TP peers own the same positions; summing over TP commutes
        with the reduction over replicas)."""
        if self.sp_group is None:
            return
        views = []
        for bucket in self.layout.buckets:
            lo, hi = self.layout.owned(bucket)
            for p in bucket.params:
                start = self.layout.offsets[id(p)]
                first, last = max(lo, start), min(hi, start + p.numel())
                if first < last and is_sp_partial(p):
                    views.append(self.view(bucket, first, last))
        if views:
            flat = torch.cat(views)
            dist.all_reduce(flat, group=self.sp_group)
            torch._foreach_copy_(views, list(flat.split([v.numel() for v in views])))


class ShardedGradBuffer(GradBuffer):
    """ZeRO-2: only the owned 1/N of the gradients persists. A bucket's gradients of one round (a
    micro-batch) go to a transient buffer, reduce-scattered (async) into the owned part as soon as
    every parameter of the bucket has delivered; at most two reductions are in flight."""

    def _persistent_numel(self) -> int:
        return self.layout.numel // self.layout.size

    def view(self, bucket: Bucket, lo: int, hi: int) -> torch.Tensor:
        shard_start = bucket.start // self.layout.size
        owned_lo, _ = self.layout.owned(bucket)
        return self.data[shard_start + lo - owned_lo:shard_start + hi - owned_lo]

    def _make_hook(self, bucket: Bucket, p: nn.Parameter):
        start = self.layout.offsets[id(p)] - bucket.start

        def hook(param: torch.Tensor) -> None:
            if bucket.transient is None:
                bucket.transient = torch.zeros(bucket.end - bucket.start, dtype=torch.float32,
                                               device=self.data.device)
                self.memory.add(bucket.transient.numel() * 4)
            bucket.transient[start:start + param.numel()].add_(param.grad.reshape(-1))
            param.grad = None
            bucket.delivered += 1
            # the same moment on every replica: their backward graphs have the same structure
            if bucket.delivered == len(bucket.params):
                self._reduce_round(bucket)

        return hook

    def _reduce_round(self, bucket: Bucket) -> None:
        filled, bucket.transient, bucket.delivered = bucket.transient, None, 0
        if filled is None:
            return
        grads = _in_dtype(filled, self.reduce_dtype)
        extra = _nbytes(grads) if grads is not filled else 0
        reduced, work = grads, None  # a group of one: the buffer is the shard
        if self.layout.group is not None:
            reduced, work = _reduce_scatter(grads, self.layout, async_op=True)
            extra += _nbytes(reduced)
        self.memory.add(extra)
        self.memory.in_flight.append(_Round(self, bucket, work, reduced, _nbytes(filled) + extra))
        while len(self.memory.in_flight) > 2:
            self.memory.complete_oldest()

    def start_step(self, micro_batches: int) -> None:
        self.expected_per_param = micro_batches

    def zero(self) -> None:
        self.data.zero_()
        for bucket in self.layout.buckets:
            bucket.transient, bucket.delivered = None, 0

    def finish(self) -> None:
        for bucket in self.layout.buckets:  # buckets some parameter of which got no gradient
            if bucket.transient is not None:
                self._reduce_round(bucket)
        while self.memory.in_flight:  # (the other group's too: they were started first)
            self.memory.complete_oldest()
        self._sum_sequence_partials()
        if self.divisor != 1:  # one replica, one micro-batch: a pass over the buffer for nothing
            self.data.div_(self.divisor)


def _reduce_scatter(grads: torch.Tensor, layout: GroupLayout, async_op: bool) -> tuple[torch.Tensor, object]:
    """forward: this rank's summed 1/N of ``grads`` [bucket] -> ([bucket / N], work or None)."""
    shard = torch.empty(grads.numel() // layout.size, dtype=grads.dtype, device=grads.device)
    return shard, _reduce_scatter_single(shard, grads, group=layout.group, async_op=async_op)


def _in_dtype(grads: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return grads if grads.dtype == dtype else grads.to(dtype)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
