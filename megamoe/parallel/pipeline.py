"""Pipeline parallelism: stage partition by layer ranges, p2p exchange of activations and gradients,
and output deallocation (Megatron's ``deallocate_output_tensor``).

Virtual stages: with V model chunks per rank, virtual stage v = chunk * PP + rank holds the v-th
layer range; activations flow 0 -> 1 -> ... -> V*PP-1, wrapping from the last rank to rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.variable import Variable

from megamoe.config import ConfigError


def stage_layer_ranges(num_layers: int, pp: int, vp: int = 1, first: int | None = None,
                       last: int | None = None) -> list[range]:
    """Layer range of every virtual stage (index v = chunk * pp + rank), contiguous and in order.

    first/last: layers of the first/last stage (lighter stages for the embedding / LM head, as
    Megatron's --decoder-first/last-pipeline-num-layers); the rest split evenly.
    """
    stages = pp * vp
    counts: list[int]
    if first is None and last is None:
        if num_layers % stages:
            raise ConfigError(f"--num-layers {num_layers} is not divisible into {stages} pipeline stages"
                              + (f" ({pp} ranks x {vp} virtual)" if vp > 1 else "")
                              + "; change the layer count or the pipeline sizes")
        counts = [num_layers // stages] * stages
    else:
        if vp > 1:
            raise ConfigError("--decoder-first/last-pipeline-num-layers cannot be combined with "
                              "--num-layers-per-virtual-pipeline-stage")
        head = [first] if first is not None else []
        tail = [last] if last is not None else []
        middle_stages = stages - len(head) - len(tail)
        rest = num_layers - sum(head) - sum(tail)
        if middle_stages < 0 or rest < 0 or (middle_stages == 0 and rest) or \
                (middle_stages and rest % middle_stages):
            raise ConfigError(f"--num-layers {num_layers} minus the first/last stage layers "
                              f"({first}, {last}) does not split evenly over the other "
                              f"{max(middle_stages, 0)} stages")
        counts = head + [rest // middle_stages] * middle_stages + tail if middle_stages else head + tail
    if any(c <= 0 for c in counts):
        raise ConfigError(f"a pipeline stage would hold no layers ({counts}); use fewer stages")
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges


@dataclass
class P2P:
    """Send/receive activations (forward) and gradients (backward) between pipeline neighbours.

    next/prev: global ranks of the following/preceding stage (wrapping, for virtual stages).
    shape: the activation shape [b, s(/tp), h]; dtype of the residual stream.
    All ops of one exchange go into a single batch_isend_irecv, activations before gradients on
    both sides of every pair (so matching is unambiguous even when next == prev), with tags to tell
    the two kinds apart on gloo.
    """

    next: int
    prev: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    group: dist.ProcessGroup | None = None
    busy_wait_s: float = 0.0  # time blocked in exchanges this step (pipeline bubble measurement)

    def exchange(self, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                 recv_prev: bool = False, recv_next: bool = False,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One batched exchange; returns (tensor from prev, tensor from next)."""
        import time

        ops, from_prev, from_next = [], None, None
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.contiguous(), self.next, self.group, tag=0))
        if recv_prev:
            from_prev = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev, self.group, tag=0))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.contiguous(), self.prev, self.group, tag=1))
        if recv_next:
            from_next = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_next, self.next, self.group, tag=1))
        if ops:
            t0 = time.perf_counter()
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            self.busy_wait_s += time.perf_counter() - t0
        if from_prev is not None:
            from_prev.requires_grad_()
        return from_prev, from_next


def deallocate_output(out: torch.Tensor | None) -> None:
    """Free a sent stage output's data but keep its autograd graph (Megatron's trick): the next
    stage owns the activation now; backward only needs ``out.grad_fn``."""
    if out is not None and out.grad_fn is not None:
        out.data = torch.empty((1,), device=out.device, dtype=out.dtype)


def backward_through(out: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Backward from a (possibly deallocated) output: the engine call skips the shape check that
    ``torch.autograd.backward`` would make against the freed placeholder."""
    if grad is None:  # the loss: a scalar
        grad = torch.ones_like(out, memory_format=torch.preserve_format)
    Variable._execution_engine.run_backward(
        tensors=(out,), grad_tensors=(grad,), keep_graph=False, create_graph=False, inputs=(),
        allow_unreachable=True, accumulate_grad=True)
