"""MFU arithmetic: the causal attention FLOP count and the per-device peak (issue 20 item 7)."""

from __future__ import annotations

import pytest
import torch

from megamoe.arguments import parse_args
from megamoe.model.openmoe import count_parameters
from megamoe.training import metrics
from megamoe.training.metrics import known_peak, measure_peak_tflops, model_flops_per_token
from tests.harness import TINY_ARGS


def test_attention_flops_count_the_causal_half():
    """Per token and layer, QK^T and AV under the causal mask: 2 * s * heads * d forward (Megatron's
    seq_length / hidden_size / 2 term); the rest of the count does not depend on s."""
    short, long = (parse_args(TINY_ARGS + ["--seq-length", s]) for s in ("32", "64"))
    assert count_parameters(short) == count_parameters(long)
    m = short.model
    per_position = 3 * 2 * m.num_attention_heads * m.kv_channels * m.num_layers  # fwd + bwd
    assert model_flops_per_token(long) - model_flops_per_token(short) == per_position * 32
    matmuls = count_parameters(short)["active"] - count_parameters(short)["embedding"] // 2
    assert model_flops_per_token(short) == 3 * (2 * matmuls + 2 * 32 * m.num_attention_heads
                                                * m.kv_channels * m.num_layers)


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"), ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"),
    ("NVIDIA L4", "L4"), ("NVIDIA B200", "B200"), ("NVIDIA GeForce RTX 3090", None),
])
def test_device_names_match_the_datasheet_table(name, expected):
    peak = known_peak(name)
    assert (peak.name if peak else None) == expected


def test_known_gpu_takes_the_datasheet_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    said: list[str] = []
    cuda = torch.device("cuda", 0)
    assert measure_peak_tflops(cuda, torch.bfloat16, log=said.append) == 989.4
    assert measure_peak_tflops(cuda, torch.float32, log=said.append) == 989.4  # MFU yardstick: BF16
    assert measure_peak_tflops(cuda, torch.float8_e4m3fn, log=said.append) == 1978.9
    assert "datasheet" in said[0] and "BF16" in said[0] and "FP8" in said[2]


def test_unknown_gpu_is_measured_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU 9000")
    sizes = []

    def fake_gemm(device, dtype, n, reps):
        sizes.append(n)
        return 123.0

    monkeypatch.setattr(metrics, "_gemm_tflops_cuda", fake_gemm)
    said: list[str] = []
    assert measure_peak_tflops(torch.device("cuda", 0), torch.bfloat16, log=said.append) == 123.0
    assert sizes == [8192] and "MEASURED" in said[0] and "--peak-tflops" in said[0]


def test_cpu_peak_is_measured():
    assert measure_peak_tflops(torch.device("cpu"), torch.float32, n=64, reps=3) > 0
