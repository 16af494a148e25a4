"""Flags, presets and bad-input errors (one line, naming the flag, before any collective)."""

import subprocess
import sys

import pytest

from megamoe.arguments import PRESETS, parse_args
from megamoe.config import ConfigError
from megamoe.model.openmoe import OpenMoEModel, count_parameters
from megamoe.training.run import main

TINY = ["--model-preset", "openmoe-tiny", "--mock-data"]


def ffn_params(h: int, i: int) -> int:
    return 4 * h * i


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_parameter_counts_follow_4HI_arithmetic(preset):
    cfg = parse_args(["--model-preset", preset, "--mock-data"])
    m, moe = cfg.model, cfg.moe
    h, i, v = m.hidden_size, m.ffn_hidden_size, m.padded_vocab_size()
    n_moe = sum(moe.is_moe_layer(layer) for layer in range(m.num_layers))
    n_dense = m.num_layers - n_moe
    attn = 4 * h * m.num_attention_heads * m.kv_channels
    expected = (m.num_layers * (attn + 2 * h) + n_dense * ffn_params(h, i)
                + n_moe * (moe.num_experts * ffn_params(h, i) + ffn_params(h, i) + h + moe.num_experts * h)
                + 2 * v * h + h)
    assert count_parameters(cfg)["total"] == expected


def test_preset_values_match_design():
    assert PRESETS["openmoe-8b"]["num_layers"] == 24 and PRESETS["openmoe-8b"]["moe_layer_freq"] == 6
    cfg = parse_args(["--model-preset", "openmoe-8b", "--mock-data"])
    assert [layer for layer in range(24) if cfg.moe.is_moe_layer(layer)] == [5, 11, 17, 23]
    assert cfg.model.padded_vocab_size() == 256384
    assert 11.7e9 < count_parameters(cfg)["total"] < 11.9e9  # ~11.8B with the untied head
    c34 = parse_args(["--model-preset", "openmoe-34b", "--mock-data"])
    assert c34.moe.z_loss_coeff == 1e-3 and c34.model.ffn_hidden_size == 12288


def test_tiny_model_allocates_exactly_the_counted_parameters():
    cfg = parse_args(TINY)
    model = OpenMoEModel(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(cfg)["total"]
    assert 100_000 < n < 1_000_000  # "a few hundred K"


def test_overrides_and_kv_channels_may_differ_from_hidden():
    cfg = parse_args(TINY + ["--hidden-size", "48", "--num-attention-heads", "3", "--kv-channels", "32"])
    assert cfg.model.hidden_size == 48 and cfg.model.kv_channels == 32  # 3 x 32 != 48: allowed
    cfg.validate(1)


@pytest.mark.parametrize("argv, world, flag", [
    (TINY + ["--moe-router-topk", "9"], 1, "--moe-router-topk"),
    (TINY + ["--moe-layer-freq", "5"], 1, "--moe-layer-freq"),
    (["--model-preset", "openmoe-huge", "--mock-data"], 1, "--model-preset"),
    (TINY + ["--global-batch-size", "10", "--micro-batch-size", "4"], 1, "--global-batch-size"),
    (TINY + ["--global-batch-size", "8", "--micro-batch-size", "2"], 3, "--global-batch-size"),
    (TINY + ["--lr-decay-style", "step"], 1, "--lr-decay-style"),
    (["--model-preset", "openmoe-tiny"], 1, "--data-path"),
    (TINY + ["--sequence-parallel"], 1, "--sequence-parallel"),
    (TINY + ["--num-experts", "6", "--expert-model-parallel-size", "4"], 8, "--num-experts"),
    (TINY + ["--train-iters", "x"], 1, "--train-iters"),
    (TINY + ["--tensor-model-parallel-size", "3"], 3, "--num-attention-heads"),
    (TINY + ["--ffn-hidden-size", "66", "--tensor-model-parallel-size", "4"], 4, "--ffn-hidden-size"),
    (TINY + ["--tensor-model-parallel-size", "2"], 3, "--tensor-model-parallel-size"),
    (TINY + ["--seq-length", "30", "--tensor-model-parallel-size", "4", "--sequence-parallel"], 4,
     "--seq-length"),
])
def test_bad_input_raises_one_line_naming_the_flag(argv, world, flag):
    with pytest.raises(ConfigError) as err:
        parse_args(argv).validate(world)
    msg = str(err.value)
    assert flag in msg and "\n" not in msg


def test_vocab_is_padded_to_a_multiple_of_128_times_tp():
    cfg = parse_args(TINY + ["--vocab-size", "1000"])
    assert cfg.model.padded_vocab_size(1) == 1024 and cfg.model.padded_vocab_size(4) == 1024
    assert cfg.model.padded_vocab_size(3) == 1152


def test_cli_layout_error_before_any_collective(monkeypatch, capsys):
    # 3 ranks cannot split a global batch of 8 into micro-batches of 2: main() must refuse before it
    # initialises the process group (which would block waiting for the other "ranks").
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc = main(TINY + ["--global-batch-size", "8", "--micro-batch-size", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 2 and len(out) == 1 and "--global-batch-size" in out[0]


def test_cli_unknown_preset_exits_with_one_line():
    proc = subprocess.run([sys.executable, "pretrain_openmoe.py", "--model-preset", "nope", "--mock-data"],
                          capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--model-preset" in lines[0]
