"""Pipeline parallelism: p2p exchange of activations and gradients, and output deallocation
(Megatron's ``deallocate_output_tensor``). The stage partition, ``stage_layer_ranges``, lives in
:mod:`megamoe.config`, which validates it without importing this module.

Virtual stages: with V model chunks per rank, virtual stage v = chunk * PP + rank holds the v-th
layer range; activations flow 0 -> 1 -> ... -> V*PP-1, wrapping from the last rank to rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd.variable import Variable


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
