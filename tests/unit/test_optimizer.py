"""The optimizer on one process: masters are the fp32 parameters themselves (no second copy), bf16
parameters get fp32 copies, and a resumed optimizer's state lives on its master's device (fused AdamW
on CUDA takes one step after --load)."""

import pytest
import torch

from megamoe.arguments import parse_args
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.optimizer import build_optimizer
from megamoe.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from megamoe.training.run import build_model
from tests.harness import TINY_ARGS

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def _model_and_optimizer(device: str, extra: list[str]):
    cfg = parse_args(TINY_ARGS + extra)
    mesh = ParallelMesh.from_config(cfg.parallel, 1, 0)
    mesh.build_groups()
    model = build_model(cfg, mesh, torch.device(device))
    return cfg, mesh, model, build_optimizer(model, cfg, mesh)


def _one_step(model, optimizer) -> None:
    tokens = torch.randint(0, 1000, (2, 32), device=next(model.parameters()).device)
    optimizer.start_step(1)
    model.chunks[0].loss(tokens, tokens).backward()
    optimizer.finish_grad_sync()
    optimizer.step(1e-3, optimizer.grad_norm())
    optimizer.zero_grad()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extra", [[], ["--bf16"], ["--use-distributed-optimizer"]],
                         ids=["fp32", "bf16", "zero"])
def test_resumed_optimizer_state_lives_with_its_master(tmp_path, device, extra):
    cfg, mesh, model, optimizer = _model_and_optimizer(device, extra)
    _one_step(model, optimizer)
    save_checkpoint(str(tmp_path), TrainState(1, 8), model, optimizer, cfg, mesh)
    cfg, mesh, model, optimizer = _model_and_optimizer(device, extra)
    load_checkpoint(str(tmp_path), model, optimizer, mesh, cfg)
    fused = bool(optimizer.inner.defaults.get("fused"))
    for piece in optimizer.pieces:
        state = optimizer.inner.state[piece.master]
        assert piece.master.device == piece.param.device
        assert state["exp_avg"].device == state["exp_avg_sq"].device == piece.master.device
        assert state["step"].device == (piece.master.device if fused else torch.device("cpu"))
        assert float(state["step"]) == 1.0
    _one_step(model, optimizer)  # fused AdamW raises here if any state sits on another device


def test_fp32_masters_are_the_parameters_bf16_masters_are_copies():
    _, _, _, fp32 = _model_and_optimizer("cpu", [])
    for piece in fp32.pieces:  # a view into the parameter's own storage
        first = piece.param_range().start
        assert piece.master.data_ptr() == piece.param.data_ptr() + 4 * first
    assert fp32.memory_bytes()["master"] == 0
    _, _, model, bf16 = _model_and_optimizer("cpu", ["--bf16"])
    n_bf16 = sum(p.numel() for p in model.parameters() if p.dtype == torch.bfloat16)
    assert bf16.memory_bytes()["master"] == 4 * n_bf16  # the fp32 router gates need no copy
