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


CAPACITY = ["--moe-capacity-factor", "1.0", "--moe-min-capacity", "1"]  # 64-token micro-batches: drops


@pytest.mark.parametrize("group", [[], ["--moe-router-group-size", "32"]], ids=["micro-batch", "group32"])
def test_capacity_routing_is_the_same_in_every_layout(group):
    # Capacity, positions and drops belong to the routing group (the micro-batch, or T5X's fixed
    # groups of consecutive tokens), whichever rank holds its tokens; before, each TP rank under SP
    # dropped within its own sequence shard (2.8e-5 away at seq 32).
    single = train_losses(1, CAPACITY + group)
    assert [r["lm_loss"] for r in single] != [r["lm_loss"] for r in train_losses(1, group)]  # tokens dropped
    layouts = ((2, [TP, "2", "--sequence-parallel"]), (4, [TP, "4", "--sequence-parallel"]),
               (2, ["--expert-model-parallel-size", "2"]), (2, ["--pipeline-model-parallel-size", "2"]))
    for world, layout in layouts:
        assert_same_losses(single, train_losses(world, CAPACITY + group + layout))


def test_router_group_size_must_divide_the_micro_batch():
    from tests.conftest import assert_one_line_config_error

    assert_one_line_config_error(["--moe-router-group-size", "48"], 1,
                                 "--moe-router-group-size 48 must divide the tokens of a micro-batch (64")


def _router_gate_grads(extra: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """openmoe-tiny (MoE layers 1 and 3) with only the router losses in backward: the last MoE layer's
    gate gradient, and the same computed by hand from its input with the router's pure functions."""
    from megamoe.moe.router import route

    cfg = parse_args(["--model-preset", "openmoe-tiny", "--mock-data", "--seq-length", "16",
                      "--moe-aux-loss-coeff", "0.3", "--moe-z-loss-coeff", "0.05"] + extra)
    model = OpenMoEModel(cfg)
    model.init_weights(5)
    layer = model.layers["3"].mlp
    inputs = []
    layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    tokens = torch.randint(0, 1000, (2, 16))
    (model.loss(tokens, tokens) * 0.0).backward()  # the LM loss contributes nothing
    gate = layer.gate_weight.detach().clone().requires_grad_()
    routing = route(inputs[0].reshape(-1, 64) @ gate.t(), 2, None)
    weight = 1.0 if "--no-moe-router-loss-average" in extra else 0.5  # 2 MoE layers
    (weight * (0.3 * routing.aux_loss + 0.05 * routing.z_loss)).backward()
    return layer.gate_weight.grad, gate.grad


@pytest.mark.parametrize("extra", [[], ["--no-moe-router-loss-average"]], ids=["average", "sum"])
def test_router_losses_are_averaged_over_moe_layers(extra):
    model_grad, hand_grad = _router_gate_grads(extra)
    assert hand_grad.abs().sum() > 0
    torch.testing.assert_close(model_grad, hand_grad, rtol=1e-5, atol=1e-8)


def test_output_z_loss_by_hand_and_vocab_parallel():
    cfg = parse_args(["--model-preset", "openmoe-tiny", "--mock-data", "--seq-length", "16"] + V520)
    model = OpenMoEModel(cfg)
    model.init_weights(3)
    tokens = torch.randint(0, 520, (2, 16))
    model.moe_stats.reset()
    with torch.no_grad():
        logits = model(tokens)  # [2, 16, 640]: 520 real columns, padding after
        model.lm_loss(logits, tokens)
    by_hand = torch.logsumexp(logits[..., :520].double(), dim=-1).pow(2).mean()
    assert float(model.moe_stats.output_z) == pytest.approx(float(by_hand), rel=1e-6)
    # in training it enters backward with the presets' coefficient (1e-4), TP2 as one process
    single = train_losses(1, V520)
    assert all(r["output_z_loss"] > 0 for r in single)
    assert_same_losses(single, train_losses(2, V520 + [TP, "2"]), keys=("lm_loss", "output_z_loss"))
    plain = train_losses(1, V520 + ["--output-z-loss-coeff", "0"])
    assert [r["lm_loss"] for r in plain][1:] != [r["lm_loss"] for r in single][1:]
