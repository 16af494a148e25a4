"""Tensor and sequence parallelism: each parallel layer equals the unsharded layer (forward and
backward, TP 2 and 4), and training is layout-invariant (TP, TP+SP vs one process, rtol 1e-5)."""

import pytest
import torch

from megamoe.model.init import init_model_weights
from megamoe.model.layers import Attention, GatedMLP
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.tensor import TPContext, VocabParallelEmbedding, vocab_parallel_cross_entropy
from megamoe.params import role
from tests.conftest import TP, assert_same_losses
from tests.harness import run_ranks, train_losses

H, HEADS, D, FFN, V = 16, 4, 8, 32, 64


def _tp(rank, world, sp):
    mesh = ParallelMesh(world_size=world, rank=rank, tp=world, sequence_parallel=sp)
    mesh.build_groups()
    return TPContext.from_mesh(mesh)


def _shard_of(param, full_grad):
    shard = role(param).init.shard
    return full_grad if shard is None else full_grad[shard]


def _check_module(rank, world, sp, make):
    torch.manual_seed(0)
    x = torch.randn(2, 8, H)  # [b, s, h], the same on every rank
    ref = make(TPContext())
    init_model_weights(ref, seed=7)
    x_ref = x.clone().requires_grad_()
    y_ref = ref(x_ref)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)

    tp = _tp(rank, world, sp)
    mod = make(tp)
    init_model_weights(mod, seed=7)
    chunk = (lambda t: t.chunk(world, dim=1)[rank]) if sp else (lambda t: t)
    x_tp = chunk(x).clone().requires_grad_()
    y_tp = mod(x_tp)
    y_tp.backward(chunk(dy).contiguous())
    torch.testing.assert_close(y_tp, chunk(y_ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_tp.grad, chunk(x_ref.grad), rtol=1e-5, atol=1e-6)
    for (name, p), (_, p_ref) in zip(mod.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, _shard_of(p, p_ref.grad), rtol=1e-5, atol=1e-6, msg=name)
    return True


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_attention_and_mlp_equal_unsharded(world, sp):
    def attn(tp):
        return Attention(H, HEADS, D, 0.2, 0.1, 10000.0, tp)

    def mlp(tp):
        return GatedMLP(H, FFN, 0.2, 0.1, tp)

    assert all(run_ranks(world, _check_module, sp, attn))
    assert all(run_ranks(world, _check_module, sp, mlp))


def _check_embedding_and_ce(rank, world, sp):
    torch.manual_seed(1)
    tokens = torch.randint(0, V, (2, 8))
    ref = VocabParallelEmbedding(V, H, TPContext(), 0.5)
    init_model_weights(ref, seed=3)
    emb_ref = ref(tokens)
    demb = torch.randn_like(emb_ref)
    emb_ref.backward(demb)

    tp = _tp(rank, world, sp)
    mod = VocabParallelEmbedding(V, H, tp, 0.5)
    init_model_weights(mod, seed=3)
    emb = mod(tokens)
    chunk = (lambda t: t.chunk(world, dim=1)[rank]) if sp else (lambda t: t)
    torch.testing.assert_close(emb, chunk(emb_ref))
    emb.backward(chunk(demb).contiguous())
    torch.testing.assert_close(mod.weight.grad, _shard_of(mod.weight, ref.weight.grad))

    # vocab-parallel cross-entropy against torch's on the full logits
    logits = torch.randn(10, V, dtype=torch.float32) * 3
    target = torch.randint(0, V, (10,))
    full = logits.clone().requires_grad_()
    loss_ref = torch.nn.functional.cross_entropy(full, target, reduction="none")
    w = torch.rand(10)
    (loss_ref * w).sum().backward()
    local = logits[:, mod.vocab_start:mod.vocab_end].clone().requires_grad_()
    loss, _ = vocab_parallel_cross_entropy(local, target, tp, mod.vocab_start, V)
    (loss * w).sum().backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(local.grad, full.grad[:, mod.vocab_start:mod.vocab_end])
    return True


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sp", [False, True])
def test_vocab_parallel_embedding_and_cross_entropy(world, sp):
    assert all(run_ranks(world, _check_embedding_and_ce, sp))


@pytest.mark.parametrize("world, extra", [
    (2, [TP, "2"]),
    (4, [TP, "4"]),
    (2, [TP, "2", "--sequence-parallel"]),
    (4, [TP, "4", "--sequence-parallel"]),
    (4, [TP, "2", "--sequence-parallel"]),  # TP=2+SP x DP=2
], ids=["tp2", "tp4", "tp2-sp", "tp4-sp", "tp2-sp-dp2"])
def test_tp_layout_invariance(single, world, extra):
    assert_same_losses(single, train_losses(world, extra), rel=1e-5)
