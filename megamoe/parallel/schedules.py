"""Forward/backward schedules: no pipeline, 1F1B, interleaved 1F1B (after Megatron-LM).

Every schedule runs the ``m`` micro-batches of one step through this rank's model chunks and
leaves the gradients accumulated; the last stage records the LM loss of each micro-batch.
Router aux/z losses need no plumbing: each MoE layer attaches their gradient to its output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from megamoe.parallel.pipeline import P2P, backward_through, deallocate_output


@dataclass
class StepContext:
    """What a schedule needs: the model chunks of this rank (chunk c = virtual stage c*pp + rank),
    the micro-batches, the p2p channel, and where to put the results."""

    chunks: list[nn.Module]
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    pp: int = 1
    rank: int = 0
    p2p: P2P | None = None
    loss_scale: float = 1.0
    losses: list[float] = field(default_factory=list)
    compute_s: float = 0.0
    max_in_flight: int = 0  # most micro-batches whose activations were alive at once
    _fwd_count: list[int] = field(default_factory=list)
    _in_flight: int = 0

    @property
    def vp(self) -> int:
        return len(self.chunks)

    def is_first(self, chunk: int) -> bool:
        return self.rank == 0 and chunk == 0

    def is_last(self, chunk: int) -> bool:
        return self.rank == self.pp - 1 and chunk == self.vp - 1

    def forward(self, chunk: int, x: torch.Tensor | None) -> torch.Tensor:
        """Run chunk on its next micro-batch: hidden out, or the scaled loss on the last stage."""
        if not self._fwd_count:
            self._fwd_count = [0] * self.vp
        mb = self._fwd_count[chunk]
        self._fwd_count[chunk] += 1
        tokens, labels = self.batches[mb]
        t0 = time.perf_counter()
        out = self.chunks[chunk].stage_forward(tokens, x, labels)
        self.compute_s += time.perf_counter() - t0
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        if self.is_last(chunk):
            self.losses.append(float(out.detach()))
            return out * self.loss_scale
        return out

    def backward(self, x: torch.Tensor | None, out: torch.Tensor, grad: torch.Tensor | None,
                 ) -> torch.Tensor | None:
        t0 = time.perf_counter()
        backward_through(out, grad)
        self.compute_s += time.perf_counter() - t0
        self._in_flight -= 1
        return None if x is None else x.grad


def no_pipeline(ctx: StepContext) -> None:
    """Gradient accumulation over micro-batches on one stage."""
    for _ in ctx.batches:
        ctx.backward(None, ctx.forward(0, None), None)


def one_f_one_b(ctx: StepContext) -> None:
    """1F1B: warmup forwards, steady one-forward-one-backward, cooldown backwards. At most
    pp - rank micro-batches are alive at once, whatever the number of micro-batches."""
    p2p, m = ctx.p2p, len(ctx.batches)
    first, last = ctx.is_first(0), ctx.is_last(0)
    warmup = min(ctx.pp - ctx.rank - 1, m)
    steady = m - warmup
    inputs: list[torch.Tensor | None] = []
    outputs: list[torch.Tensor] = []

    # Warmup: forward only.
    for _ in range(warmup):
        x, _ = p2p.exchange(recv_prev=not first)
        y = ctx.forward(0, x)
        p2p.exchange(send_next=None if last else y)
        deallocate_output(None if last else y)
        inputs.append(x)
        outputs.append(y)
    # Steady: forward of micro-batch i + warmup, backward of micro-batch i.
    x = p2p.exchange(recv_prev=not first)[0] if steady else None
    for i in range(steady):
        y = ctx.forward(0, x)
        _, g = p2p.exchange(send_next=None if last else y, recv_next=not last)
        deallocate_output(None if last else y)
        inputs.append(x)
        outputs.append(y)
        gx = ctx.backward(inputs.pop(0), outputs.pop(0), g)
        x, _ = p2p.exchange(send_prev=None if first else gx, recv_prev=not first and i < steady - 1)
    # Cooldown: backward only.
    for _ in range(warmup):
        _, g = p2p.exchange(recv_next=not last)
        gx = ctx.backward(inputs.pop(0), outputs.pop(0), g)
        p2p.exchange(send_prev=None if first else gx)


def interleaved_one_f_one_b(ctx: StepContext) -> None:
    """Interleaved 1F1B (Narayanan et al. 2021; Megatron's schedule) over vp chunks per rank.

    Forward k runs chunk (k mod pp*vp) // pp; backwards visit chunks in reverse. Needs the number of
    micro-batches to be a multiple of pp (checked at start-up)."""
    p2p, pp, r, vp, m = ctx.p2p, ctx.pp, ctx.rank, ctx.vp, len(ctx.batches)
    total = m * vp
    inputs: list[list] = [[] for _ in range(vp)]
    outputs: list[list] = [[] for _ in range(vp)]
    grads: list[list] = [[] for _ in range(vp)]

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (pp * vp)) // pp
        return c if forward else vp - 1 - c

    def fwd(k: int) -> torch.Tensor:
        c = chunk_of(k, True)
        if ctx.is_first(c) and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)
        y = ctx.forward(c, inputs[c][-1])
        outputs[c].append(y)
        return y

    def bwd(k: int) -> torch.Tensor | None:
        c = chunk_of(k, False)
        if ctx.is_last(c) and not grads[c]:
            grads[c].append(None)
        return ctx.backward(inputs[c].pop(0), outputs[c].pop(0), grads[c].pop(0))

    all_warmup = m == pp
    warmup = total if all_warmup else min((pp - r - 1) * 2 + (vp - 1) * pp, total)
    remaining = total - warmup

    # Warmup: forwards only; the last one also receives the first backward's gradient.
    inputs[0].append(p2p.exchange(recv_prev=not ctx.is_first(0))[0])
    for k in range(warmup):
        y = fwd(k)
        send = None if ctx.is_last(chunk_of(k, True)) else y
        nxt = chunk_of(k + 1, True)
        recv_prev = not (r == 0 and nxt == 0) and k != total - 1
        if k == warmup - 1 and not all_warmup:
            x, g = p2p.exchange(send_next=send, recv_prev=recv_prev, recv_next=r != pp - 1)
            grads[vp - 1].append(g)
        else:
            x, _ = p2p.exchange(send_next=send, recv_prev=recv_prev)
        deallocate_output(send)
        inputs[nxt].append(x)

    # Steady: one forward and one backward per iteration, exchanged in one batch.
    for k in range(remaining):
        fk = k + warmup
        y, gx = fwd(fk), bwd(k)
        send_y = None if ctx.is_last(chunk_of(fk, True)) else y
        send_g = None if ctx.is_first(chunk_of(k, False)) else gx
        if r == 0:  # the first rank runs pp - 1 forwards ahead of the last
            nf = chunk_of(fk - (pp - 1), True)
            recv_prev, nf = nf != vp - 1, nf + 1
        else:
            recv_prev, nf = True, chunk_of(fk + 1, True)
        if r == pp - 1:
            nb = chunk_of(k - (pp - 1), False)
            recv_next, nb = nb != 0, nb - 1
        else:
            recv_next, nb = True, chunk_of(k + 1, False)
        recv_prev = recv_prev and k != remaining - 1
        x, g = p2p.exchange(send_next=send_y, send_prev=send_g, recv_prev=recv_prev, recv_next=recv_next)
        deallocate_output(send_y)
        if recv_prev:
            inputs[nf].append(x)
        if recv_next:
            grads[nb].append(g)

    # Cooldown: the remaining backwards.
    if all_warmup:
        grads[vp - 1].append(p2p.exchange(recv_next=r != pp - 1)[1])
    for k in range(remaining, total):
        gx = bwd(k)
        nb = chunk_of(k + 1, False)
        recv_next = not (r == pp - 1 and nb == vp - 1) and k != total - 1
        send_g = None if ctx.is_first(chunk_of(k, False)) else gx
        _, g = p2p.exchange(send_prev=send_g, recv_next=recv_next)
        if recv_next:
            grads[nb].append(g)


def all_forward_all_backward(ctx: StepContext) -> None:
    """GPipe-style reference (not used for training): every forward, then every backward, so all
    micro-batches' activations are alive at once. Kept to measure what 1F1B saves."""
    p2p, first, last = ctx.p2p, ctx.is_first(0), ctx.is_last(0)
    inputs, outputs = [], []
    for _ in ctx.batches:
        x, _ = p2p.exchange(recv_prev=not first)
        y = ctx.forward(0, x)
        p2p.exchange(send_next=None if last else y)
        deallocate_output(None if last else y)
        inputs.append(x)
        outputs.append(y)
    for x, y in zip(inputs, outputs):
        _, g = p2p.exchange(recv_next=not last)
        gx = ctx.backward(x, y, g)
        p2p.exchange(send_prev=None if first else gx)


class ActivationMeter:
    """Peak bytes of tensors saved for backward (activations), via saved-tensor hooks: a saved
    tensor counts from when autograd packs it until its graph is freed."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def __enter__(self) -> ActivationMeter:
        meter = self

        class _Held:
            __slots__ = ("t", "n")

            def __init__(self, t: torch.Tensor) -> None:
                self.t, self.n = t, t.numel() * t.element_size()
                meter.live += self.n
                meter.peak = max(meter.peak, meter.live)

            def __del__(self) -> None:
                meter.live -= self.n

        self._hooks = torch.autograd.graph.saved_tensors_hooks(_Held, lambda held: held.t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def forward_only(ctx: StepContext) -> None:
    """Evaluation: every micro-batch through every virtual stage in order, no backward."""
    p2p = ctx.p2p
    with torch.no_grad():
        for _ in ctx.batches:
            for c in range(ctx.vp):
                x = None
                if not ctx.is_first(c) and p2p is not None:
                    x = p2p.exchange(recv_prev=True)[0]
                y = ctx.forward(c, x)
                ctx._in_flight -= 1
                if not ctx.is_last(c) and p2p is not None:
                    p2p.exchange(send_next=y)
