"""Forward/backward schedules: no pipeline, 1F1B, interleaved 1F1B (after Megatron-LM).

Every schedule runs the micro-batches of one step through this rank's model chunks and
leaves the gradients accumulated; the last stage records the LM loss of each micro-batch.
Router aux/z losses need no plumbing: each MoE layer attaches their gradient to its output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from megamoe.parallel.pipeline import P2P, backward_through, deallocate_output


class ComputeClock:
    """Forward/backward compute time and the schedule's span, for the pipeline idle share.

    On CPU the host clock is right: kernels and gloo block the host. On CUDA kernels run
    asynchronously and NCCL waits are stream waits, so the host time of a forward says nothing:
    CUDA events on the current stream bracket each compute region and the whole schedule, and are
    read once, after the step (one host sync, when the step is over anyway).
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.host_s = 0.0
        self.regions: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.span: list = [None, None]  # schedule start / end: perf_counter seconds or CUDA events

    def mark(self) -> float | torch.cuda.Event:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, start: float | torch.cuda.Event) -> None:
        """Close a compute region opened by ``mark()``."""
        end = self.mark()
        if self.cuda:
            self.regions.append((start, end))
        else:
            self.host_s += end - start

    def compute_s(self) -> float:
        if not self.cuda:
            return self.host_s
        if self.regions:
            self.regions[-1][1].synchronize()
        return sum(start.elapsed_time(end) for start, end in self.regions) / 1e3

    def span_s(self) -> float:
        start, end = self.span
        if start is None or end is None:
            return 0.0
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


@dataclass
class StepContext:
    """What a schedule needs: the model chunks of this rank (chunk c = virtual stage c*pp + rank),
    the micro-batches, the p2p channel, and where to put the results.

    The last stage's per-micro-batch LM losses stay on the device (``float(loss)`` per micro-batch
    would block the host before the next forward could be queued); :attr:`losses` reads them all at
    once. Compute time: :class:`ComputeClock` (CUDA events on a GPU)."""

    chunks: list[nn.Module]
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    pp: int = 1
    rank: int = 0
    p2p: P2P | None = None
    loss_scale: float = 1.0
    max_in_flight: int = 0  # most micro-batches whose activations were alive at once
    _loss_values: list[torch.Tensor] = field(default_factory=list)  # [] each, on the device
    _clock: ComputeClock | None = None
    _fwd_count: list[int] = field(default_factory=list)
    _in_flight: int = 0

    @property
    def losses(self) -> list[float]:
        """LM loss of each micro-batch this rank ran the last stage of (one device-to-host copy)."""
        return torch.stack(self._loss_values).tolist() if self._loss_values else []

    @property
    def clock(self) -> ComputeClock:
        if self._clock is None:
            device = self.batches[0][0].device if self.batches else torch.device("cpu")
            self._clock = ComputeClock(cuda=device.type == "cuda")
        return self._clock

    def start_schedule(self) -> None:
        self.clock.span[0] = self.clock.mark()

    def end_schedule(self) -> None:
        self.clock.span[1] = self.clock.mark()

    @property
    def compute_s(self) -> float:
        """Seconds of forward/backward compute so far (device time on CUDA; reading it syncs)."""
        return self.clock.compute_s()

    def idle_fraction(self) -> float:
        """Share of the schedule's span (start_schedule .. end_schedule) outside forward/backward
        compute: the pipeline bubble plus p2p waits, as the device saw it on CUDA."""
        span = self.clock.span_s()
        return 1.0 - self.compute_s / span if span > 0 else 0.0

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
        micro_batch = self._fwd_count[chunk]
        self._fwd_count[chunk] += 1
        tokens, labels = self.batches[micro_batch]
        start = self.clock.mark()
        out = self.chunks[chunk].stage_forward(tokens, x, labels)
        self.clock.add(start)
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        if self.is_last(chunk):
            self._loss_values.append(out.detach().reshape(()))
            return out * self.loss_scale
        return out

    def backward(self, x: torch.Tensor | None, out: torch.Tensor, grad: torch.Tensor | None,
                 ) -> torch.Tensor | None:
        start = self.clock.mark()
        backward_through(out, grad)
        self.clock.add(start)
        self._in_flight -= 1
        return None if x is None else x.grad


def no_pipeline(ctx: StepContext) -> None:
    """Gradient accumulation over micro-batches on one stage."""
    for _ in ctx.batches:
        ctx.backward(None, ctx.forward(0, None), None)


def one_f_one_b(ctx: StepContext) -> None:
    """1F1B: warmup forwards, steady one-forward-one-backward, cooldown backwards. At most
    pp - rank micro-batches are alive at once, whatever the number of micro-batches."""
    p2p, num_micro_batches = ctx.p2p, len(ctx.batches)
    first, last = ctx.is_first(0), ctx.is_last(0)
    num_warmup_microbatches = min(ctx.pp - ctx.rank - 1, num_micro_batches)
    num_steady_microbatches = num_micro_batches - num_warmup_microbatches
    inputs: list[torch.Tensor | None] = []
    outputs: list[torch.Tensor] = []

    # Warmup: forward only.
    for _ in range(num_warmup_microbatches):
        x, _ = p2p.exchange(recv_prev=not first)
        y = ctx.forward(0, x)
        p2p.exchange(send_next=None if last else y)
        deallocate_output(None if last else y)
        inputs.append(x)
        outputs.append(y)
    # Steady: forward of micro-batch i + warmup, backward of micro-batch i.
    x = p2p.exchange(recv_prev=not first)[0] if num_steady_microbatches else None
    for i in range(num_steady_microbatches):
        y = ctx.forward(0, x)
        _, grad_output = p2p.exchange(send_next=None if last else y, recv_next=not last)
        deallocate_output(None if last else y)
        inputs.append(x)
        outputs.append(y)
        grad_input = ctx.backward(inputs.pop(0), outputs.pop(0), grad_output)
        more = i < num_steady_microbatches - 1
        x, _ = p2p.exchange(send_prev=None if first else grad_input, recv_prev=not first and more)
    # Cooldown: backward only.
    for _ in range(num_warmup_microbatches):
        _, grad_output = p2p.exchange(recv_next=not last)
        grad_input = ctx.backward(inputs.pop(0), outputs.pop(0), grad_output)
        p2p.exchange(send_prev=None if first else grad_input)


def interleaved_one_f_one_b(ctx: StepContext) -> None:
    """Interleaved 1F1B (Narayanan et al. 2021; Megatron's schedule) over several chunks per rank.

    The k-th forward of this rank runs chunk (k mod pp*chunks) // pp; backwards visit chunks in
    reverse. Needs the number of micro-batches to be a multiple of pp (checked at start-up)."""
    p2p, pp, rank, num_chunks = ctx.p2p, ctx.pp, ctx.rank, ctx.vp
    num_micro_batches = len(ctx.batches)
    total = num_micro_batches * num_chunks  # forwards (and backwards) this rank runs
    inputs: list[list] = [[] for _ in range(num_chunks)]  # per chunk: received activations, FIFO
    outputs: list[list] = [[] for _ in range(num_chunks)]
    grads: list[list] = [[] for _ in range(num_chunks)]  # per chunk: received output gradients

    def chunk_of(k: int, forward: bool) -> int:
        chunk = (k % (pp * num_chunks)) // pp
        return chunk if forward else num_chunks - 1 - chunk

    def run_forward(k: int) -> torch.Tensor:
        chunk = chunk_of(k, True)
        if ctx.is_first(chunk) and len(inputs[chunk]) == len(outputs[chunk]):
            inputs[chunk].append(None)
        y = ctx.forward(chunk, inputs[chunk][-1])
        outputs[chunk].append(y)
        return y

    def run_backward(k: int) -> torch.Tensor | None:
        chunk = chunk_of(k, False)
        if ctx.is_last(chunk) and not grads[chunk]:
            grads[chunk].append(None)
        return ctx.backward(inputs[chunk].pop(0), outputs[chunk].pop(0), grads[chunk].pop(0))

    all_warmup = num_micro_batches == pp
    num_warmup = total if all_warmup else min((pp - rank - 1) * 2 + (num_chunks - 1) * pp, total)
    num_steady = total - num_warmup

    # Warmup: forwards only; the last one also receives the first backward's gradient.
    inputs[0].append(p2p.exchange(recv_prev=not ctx.is_first(0))[0])
    for k in range(num_warmup):
        y = run_forward(k)
        send = None if ctx.is_last(chunk_of(k, True)) else y
        next_chunk = chunk_of(k + 1, True)
        recv_prev = not (rank == 0 and next_chunk == 0) and k != total - 1
        if k == num_warmup - 1 and not all_warmup:
            x, grad_output = p2p.exchange(send_next=send, recv_prev=recv_prev, recv_next=rank != pp - 1)
            grads[num_chunks - 1].append(grad_output)
        else:
            x, _ = p2p.exchange(send_next=send, recv_prev=recv_prev)
        deallocate_output(send)
        inputs[next_chunk].append(x)

    # Steady: one forward and one backward per iteration, exchanged in one batch.
    for k in range(num_steady):
        forward_k = k + num_warmup
        y, grad_input = run_forward(forward_k), run_backward(k)
        send_y = None if ctx.is_last(chunk_of(forward_k, True)) else y
        send_grad = None if ctx.is_first(chunk_of(k, False)) else grad_input
        if rank == 0:  # the first rank runs pp - 1 forwards ahead of the last
            next_forward_chunk = chunk_of(forward_k - (pp - 1), True)
            recv_prev, next_forward_chunk = next_forward_chunk != num_chunks - 1, next_forward_chunk + 1
        else:
            recv_prev, next_forward_chunk = True, chunk_of(forward_k + 1, True)
        if rank == pp - 1:
            next_backward_chunk = chunk_of(k - (pp - 1), False)
            recv_next, next_backward_chunk = next_backward_chunk != 0, next_backward_chunk - 1
        else:
            recv_next, next_backward_chunk = True, chunk_of(k + 1, False)
        recv_prev = recv_prev and k != num_steady - 1
        x, grad_output = p2p.exchange(send_next=send_y, send_prev=send_grad, recv_prev=recv_prev,
                                      recv_next=recv_next)
        deallocate_output(send_y)
        if recv_prev:
            inputs[next_forward_chunk].append(x)
        if recv_next:
            grads[next_backward_chunk].append(grad_output)

    # Cooldown: the remaining backwards.
    if all_warmup:
        grads[num_chunks - 1].append(p2p.exchange(recv_next=rank != pp - 1)[1])
    for k in range(num_steady, total):
        grad_input = run_backward(k)
        next_backward_chunk = chunk_of(k + 1, False)
        recv_next = not (rank == pp - 1 and next_backward_chunk == num_chunks - 1) and k != total - 1
        send_grad = None if ctx.is_first(chunk_of(k, False)) else grad_input
        _, grad_output = p2p.exchange(send_prev=send_grad, recv_next=recv_next)
        if recv_next:
            grads[next_backward_chunk].append(grad_output)


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
        _, grad_output = p2p.exchange(recv_next=not last)
        grad_input = ctx.backward(x, y, grad_output)
        p2p.exchange(send_prev=None if first else grad_input)


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
            for chunk in range(ctx.vp):
                x = None
                if not ctx.is_first(chunk) and p2p is not None:
                    x = p2p.exchange(recv_prev=True)[0]
                y = ctx.forward(chunk, x)
                ctx._in_flight -= 1
                if not ctx.is_last(chunk) and p2p is not None:
                    p2p.exchange(send_next=y)
