"""A pool of CPU buffers for intermediates whose whole life one autograd function controls (the expert
MLP's GEMM outputs: taken in forward, handed back at the end of backward).

Why: glibc serves every allocation of 32 MiB or more with a fresh mmap and unmaps it on free, so each
such tensor page-faults on first touch (~12 ms per 32 MiB on the development machine; an [N, I] fp32
expert hidden is that size at N = 8192, I = 1024). CUDA's caching allocator already reuses blocks, so on
other devices ``take`` is plain ``torch.empty`` and ``give`` does nothing. The pool holds at most the
buffers that were once in use at the same time (like a caching allocator); ``clear`` drops them
(docs/ARCHITECTURE.md, "Expert MLP buffers")."""

from __future__ import annotations

import math
import weakref

import torch


class BufferPool:
    """Flat buffers handed out as views; best fit by element count, per dtype. Not thread-safe (one
    pool per process, used from the thread that runs forward and backward)."""

    def __init__(self, slack: float = 0.125) -> None:
        self.slack = slack  # a new buffer is this much larger than asked, so routing's jitter in N fits
        self._free: list[torch.Tensor] = []  # flat, 1-D, CPU
        # handed out and not given back, by id; a weak reference, so a buffer its taker dropped (a
        # checkpointed forward's) is freed, not kept, and a reused id is told apart
        self._lent: dict[int, weakref.ref[torch.Tensor]] = {}

    def take(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device,
             ) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (contiguous). Give it back with :meth:`give` only once
        nothing will read it again."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        numel = math.prod(shape)
        fits = [i for i, buf in enumerate(self._free) if buf.dtype == dtype and buf.numel() >= numel]
        if fits:
            buf = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        else:
            # a free buffer too small for this request is dropped, so the pool never holds more
            # buffers than were in use at once
            small = [i for i, buf in enumerate(self._free) if buf.dtype == dtype]
            if small:
                self._free.pop(max(small, key=lambda i: self._free[i].numel()))
            buf = torch.empty(numel + int(numel * self.slack), dtype=dtype)
        self._lent = {key: ref for key, ref in self._lent.items() if ref() is not None}
        self._lent[id(buf)] = weakref.ref(buf)
        return buf[:numel].view(shape)

    def give(self, *tensors: torch.Tensor) -> None:
        """Return buffers from :meth:`take` (any view of one); the caller reads none of them again.
        Anything else (another device's tensor, one given back already) is ignored."""
        for tensor in tensors:
            flat = tensor._base if tensor._base is not None else tensor
            ref = self._lent.pop(id(flat), None)
            if ref is not None and ref() is flat:
                self._free.append(flat)

    def clear(self) -> None:
        """Free every pooled buffer."""
        self._free.clear()

    @property
    def pooled_bytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for buf in self._free)


# One pool per process, as the allocator it stands in front of is one per process: the expert MLPs of
# all layers share it, so a layer's backward temporaries reuse what the layer before handed back.
EXPERT_BUFFERS = BufferPool()
