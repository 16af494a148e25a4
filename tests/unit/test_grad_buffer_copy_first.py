"""GradBuffer without a zeroing pass: the first gradient of a step is copied in, later ones added, and a
parameter that got none this step reads zero after finish (not last step's gradient)."""

import torch
from torch import nn

from megamoe.parallel.grad_buffer import GradBuffer, GradMemory, GroupLayout


def _buffer(params: list[nn.Parameter], divisor: float = 1.0) -> GradBuffer:
    layout = GroupLayout.build("dense", params, None, 1, 0, bucket_numel=5)
    return GradBuffer(layout, divisor, None, overlap=False, reduce_dtype=torch.float32, memory=GradMemory())


def _grad(buffer: GradBuffer, p: nn.Parameter) -> torch.Tensor:
    start = buffer.layout.offsets[id(p)]
    return buffer.data[start:start + p.numel()].view_as(p)


def test_copy_first_add_later_and_a_missing_gradient_reads_zero():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, 2))
    buffer = _buffer([a, b], divisor=2.0)
    buffer.start_step(2)
    for scale in (1.0, 3.0):  # two micro-batches
        ((a * scale).sum() + (b * 2 * scale).sum()).backward()
    buffer.finish()
    torch.testing.assert_close(_grad(buffer, a), torch.full((3,), 2.0))  # (1 + 3) / 2
    torch.testing.assert_close(_grad(buffer, b), torch.full((2, 2), 4.0))
    assert a.grad is None and b.grad is None
    buffer.zero()  # no pass over the data: the old gradients are still there ...
    assert _grad(buffer, a).sum() != 0
    buffer.start_step(1)
    (b * 5).sum().backward()  # ... a gets none this step
    buffer.finish()
    torch.testing.assert_close(_grad(buffer, a), torch.zeros(3))
    torch.testing.assert_close(_grad(buffer, b), torch.full((2, 2), 2.5))
