"""OpenMoE fidelity (issue 13): a padded vocabulary does not change the function, and T5X's
initialisation gives OpenMoE's attention-logit scale at init."""

import json
import struct

import pytest
import torch

from megamoe.arguments import parse_args
from megamoe.model.openmoe import OpenMoEModel
from tests.conftest import TP, assert_same_losses
from tests.harness import train_losses

V520 = ["--vocab-size", "520"]  # not a multiple of 128 x TP: padded to 640 (TP1), 768 (TP2), 1024 (TP4)


@pytest.fixture(scope="module")
def single_v520():
    return train_losses(1, V520)


@pytest.mark.parametrize("tp", ["2", "4"])
def test_padded_vocabulary_does_not_change_the_losses(single_v520, tp):
    # before: the padded LM-head rows entered the softmax, 2.9e-2 (relative) away at TP2
    assert_same_losses(single_v520, train_losses(int(tp), V520 + [TP, tp]))


def _header(path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size))


def test_checkpoint_does_not_depend_on_the_padding(tmp_path, single_v520):
    common = V520 + ["--lr-decay-iters", "6"]
    train_losses(2, common + [TP, "2", "--train-iters", "3", "--save", str(tmp_path)])
    rows = {"weight/embed_tokens.weight": 0, "weight/lm_head.weight": 0}  # saved rows, over the ranks
    for r in range(2):
        for name, entry in _header(tmp_path / "iter_0000003" / f"rank_{r:05d}.safetensors").items():
            if name.split("@")[0] in rows:
                rows[name.split("@")[0]] += entry["shape"][0]
    assert rows == {"weight/embed_tokens.weight": 520, "weight/lm_head.weight": 520}  # no padding rows
    resumed = train_losses(1, common + ["--train-iters", "6", "--load", str(tmp_path)])
    straight = train_losses(2, common + [TP, "2", "--train-iters", "6"])
    assert_same_losses(straight[3:], resumed, n=3)


def _attention_logit_std(preset: str, init: str) -> float:
    """Std of the first layer's attention logits q.k (after RoPE, before softmax) at initialisation,
    measured in a forward pass over random tokens; the preset's attention shape, a small vocabulary
    and FFN (they do not enter these logits)."""
    cfg = parse_args(["--model-preset", preset, "--mock-data", "--num-layers", "1", "--moe-layer-freq", "1",
                      "--num-experts", "2", "--ffn-hidden-size", "64", "--vocab-size", "1000",
                      "--seq-length", "128", "--init-method", init])
    model = OpenMoEModel(cfg)
    model.init_weights(1234)
    seen = []
    attention = model.layers["0"].self_attn
    def capture(_module, args):  # args: q, k, v [b, n, s, d]
        seen.append(args[0] @ args[1].transpose(-1, -2))

    attention.core_attention.register_forward_pre_hook(capture)
    with torch.no_grad():
        model(torch.randint(0, 1000, (2, 128)))
    return float(seen[0].std())


@pytest.mark.parametrize("preset", ["openmoe-base", "openmoe-8b"])
def test_t5x_init_gives_openmoe_attention_logit_scale(preset):
    # T5X folds 1/sqrt(head width) into the query init (variance scaling, scale 0.1): logits ~ 0.1
    assert _attention_logit_std(preset, "t5x") == pytest.approx(0.1, rel=0.2)
    # Megatron's N(0, 0.02) without attention scaling: ~2.5 (base), ~9 (8B)
    assert _attention_logit_std(preset, "normal") > (2.0 if preset == "openmoe-base" else 7.0)
