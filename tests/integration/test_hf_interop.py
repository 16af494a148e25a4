"""Hugging Face interop for Mixtral: a tiny random transformers MixtralForCausalLM (built here, nothing
downloaded) converted to megamoe gives transformers' logits (fp32, max abs diff <= 1e-4) in one process
and under TP2+EP2+PP2 through tools/forward.py; exported back it loads with from_pretrained, gives the
same logits, and every tensor round-trips bit for bit; training from it starts at transformers' loss."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megamoe.data.mock import MockGPTDataset
from megamoe.training.hf_interop import hf_to_megamoe, iter_hf_tensors, megamoe_to_hf
from tests.harness import run_ranks, train_losses

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, SEQ = 1000, 24
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
             num_experts_per_tok=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=1e6,
             tie_word_embeddings=False)


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


forward_tool = _tool("forward")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(transformers model, its save_pretrained dir in shards, the converted megamoe checkpoint,
    token ids [2, SEQ] saved as .npy, transformers' fp32 logits for them)."""
    d = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**SHAPE)).float().eval()
    model.save_pretrained(d / "hf", max_shard_size="300KB")  # ~3 MB: a dozen shards
    hf_to_megamoe(str(d / "hf"), str(d / "ckpt"))
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    np.save(d / "tokens.npy", tokens.numpy())
    with torch.no_grad():
        reference = model(tokens).logits.float().numpy()
    return model, d, tokens, reference


def _forward(rank: int, world: int, argv: list[str]) -> np.ndarray | None:
    return forward_tool.run(rank, world, argv)


def test_converted_logits_equal_transformers_single_process(mixtral):
    _, d, _, reference = mixtral
    assert len(list((d / "hf").glob("*.safetensors"))) > 5  # really streamed shard by shard
    argv = ["--load", str(d / "ckpt"), "--tokens", str(d / "tokens.npy"), "--output", str(d / "one.npy")]
    assert forward_tool.main(argv) == 0
    ours = np.load(d / "one.npy")
    assert ours.shape == (2, SEQ, VOCAB) and ours.dtype == np.float32  # true vocabulary, no padding
    assert np.abs(ours - reference).max() <= 1e-4


def test_converted_logits_equal_transformers_tp2_ep2_pp2(mixtral):
    _, d, _, reference = mixtral
    argv = ["--load", str(d / "ckpt"), "--tokens", str(d / "tokens.npy"), "--output", str(d / "eight.npy"),
            "--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2",
            "--pipeline-model-parallel-size", "2", "--sequence-parallel"]
    results = run_ranks(8, _forward, argv)
    last_stage = [r for r in results if r is not None]
    assert len(last_stage) == 4  # TP2 x DP2 ranks of the last stage
    assert np.abs(np.load(d / "eight.npy") - reference).max() <= 1e-4
    assert all(np.array_equal(r, last_stage[0]) for r in last_stage)


def test_export_round_trip_is_bitwise_and_loads_in_transformers(mixtral, tmp_path):
    model, d, tokens, reference = mixtral
    megamoe_to_hf(str(d / "ckpt"), str(tmp_path / "hf"), max_shard_bytes=400_000)
    source, exported = dict(iter_hf_tensors(str(d / "hf"))), dict(iter_hf_tensors(str(tmp_path / "hf")))
    assert source.keys() == exported.keys()
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    again = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "hf")).float().eval()
    with torch.no_grad():
        assert np.abs(again(tokens).logits.float().numpy() - reference).max() <= 1e-4


MODEL_FLAGS = ["--model-family", "mixtral", "--num-layers", "4", "--hidden-size", "64",
               "--num-attention-heads", "4", "--kv-channels", "16", "--group-query-attention",
               "--num-query-groups", "2", "--ffn-hidden-size", "96", "--num-experts", "8",
               "--moe-router-topk", "2", "--vocab-size", str(VOCAB), "--norm-epsilon", "1e-5",
               "--rotary-base", "1e6", "--moe-z-loss-coeff", "0", "--moe-aux-loss-coeff", "0.02"]


def test_first_training_step_loss_equals_transformers(mixtral, tmp_path):
    """--finetune from the converted checkpoint: iteration 1's LM loss is transformers' loss on the same
    batch (the first global batch of --mock-data), and training goes on from there."""
    model, d, _, _ = mixtral
    argv = MODEL_FLAGS + ["--mock-data", "--seq-length", str(SEQ), "--global-batch-size", "4",
                          "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3", "--log-interval",
                          "1000", "--eval-interval", "100000", "--load", str(d / "ckpt"), "--finetune"]
    records = train_losses(1, base_args=argv)
    assert [r["iteration"] for r in records] == [1, 2]
    data = MockGPTDataset(SEQ, VOCAB, seed=1234, size=8)
    batch = torch.from_numpy(np.stack([data[i] for i in range(4)]))
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits.float()
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).item()
    assert records[0]["lm_loss"] == pytest.approx(expected, rel=1e-5)
    two_ranks = train_losses(2, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
                             base_args=argv)
    assert two_ranks[0]["lm_loss"] == pytest.approx(expected, rel=1e-5)
