"""GPU-only: the FP8 expert MLP on CUDA, through torch float8 and (where it imports) Transformer
Engine, against fp32 on the same device. Skipped without CUDA; scripts/gpu_smoke.sh runs these."""

import pytest
import torch

from megamoe.moe.experts import GroupedExperts
from megamoe.moe.fp8 import FP8Recipe, finish_fp8_step, te_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _sqnr(reference, test):
    error = (reference.float() - test.float()).pow(2).sum()
    return (10 * torch.log10(reference.float().pow(2).sum() / error)).item()


def _mlp(recipe, backend):
    torch.manual_seed(0)
    fp8 = None if recipe is None else FP8Recipe(format="hybrid", recipe=recipe, amax_history_len=8,
                                                pad_rows_to=16, backend=backend)
    module = GroupedExperts(256, 256, list(range(4)), 0.05, 0.05, fp8=fp8).cuda()
    with torch.no_grad():
        for p in (module.wi_gate, module.wi_up, module.wo):
            p.normal_(0, 0.05)
    return module


def _run(module, x, counts):
    x = x.clone().requires_grad_(True)
    y = module(x, counts)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad


@pytest.mark.parametrize("backend", ["torch", "te"])
@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_fp8_expert_mlp_on_cuda(recipe, backend):
    if backend == "te" and not te_available():
        pytest.skip("Transformer Engine does not import here")
    counts = torch.tensor([300, 100, 0, 112], device="cuda")
    x = torch.randn(512, 256, device="cuda")
    exact, fp8 = _mlp(None, "torch"), _mlp(recipe, backend)
    if fp8.fp8.keeps_history:
        _run(fp8, x, counts)
        finish_fp8_step([fp8], None)
        fp8.zero_grad()
    (y, dx), (yq, dxq) = _run(exact, x, counts), _run(fp8, x, counts)
    assert 19 <= _sqnr(y, yq) < 40 and _sqnr(dx, dxq) >= 17
