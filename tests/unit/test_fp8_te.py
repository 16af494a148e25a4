"""GPU-only: the FP8 expert MLP on CUDA, through torch float8 and (where it imports) Transformer
Engine, against fp32 on the same device. Skipped without CUDA; scripts/gpu_smoke.sh runs these."""

import pytest
import torch

from megamoe.moe.fp8 import finish_fp8_step, te_available
from tests.conftest import fp8_experts, run_experts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _sqnr(reference, test):
    error = (reference.float() - test.float()).pow(2).sum()
    return (10 * torch.log10(reference.float().pow(2).sum() / error)).item()


def _mlp(recipe, backend):
    return fp8_experts(recipe, hidden=256, ffn=256, experts=4, pad=16, backend=backend, device="cuda")


def _run(module, x, counts):
    y, dx, _ = run_experts(module, x, counts)
    return y, dx


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
