"""MFU arithmetic: the causal attention FLOP count and the per-device peak (issue 20 item 7); the
metrics file survives a full disk and a crash (issue 17)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from megamoe.arguments import parse_args
from megamoe.model.openmoe import count_parameters
from megamoe.training import metrics
from megamoe.training.metrics import known_peak, measure_peak_tflops, model_flops_per_token
from tests.harness import TINY_ARGS, train_losses


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


# The metrics file (issue 17): whole lines only, a failed write leaves none half-written, a reopened
# file loses an incomplete last line, and a resumed run appends (readers take the last record).

def _logger(path) -> metrics.MetricsLogger:
    return metrics.MetricsLogger(parse_args(TINY_ARGS + ["--metrics-file", str(path)]), enabled=True)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class _FullDisk:
    """The metrics file on a disk that fills during the next write: a short write, or a partial
    write that then fails."""

    def __init__(self, file, how: str) -> None:
        self.file, self.how = file, how

    def tell(self) -> int:
        return self.file.tell()

    def write(self, data: bytes) -> int:
        if self.how == "short":
            return self.file.write(data[:len(data) // 2])
        self.file.write(data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def truncate(self, size: int) -> int:
        return self.file.truncate(size)

    def close(self) -> None:
        self.file.close()


@pytest.mark.parametrize("how", ["short", "raises"])
def test_a_full_disk_leaves_no_half_record(tmp_path, capsys, how):
    path = tmp_path / "m.jsonl"
    log = _logger(path)
    log.log_eval(1, 2.5)
    log._file = _FullDisk(log._file, how)
    log.log_eval(2, 2.4)
    log.log_eval(3, 2.3)  # no more writes once one failed
    log.close()
    assert _lines(path) == [{"iteration": 1, "eval_lm_loss": 2.5}]  # whole lines only
    warnings = [line for line in capsys.readouterr().out.splitlines() if "--metrics-file" in line]
    assert len(warnings) == 1 and "write failed (No space left on device)" in warnings[0]


def test_reopening_drops_an_incomplete_last_line_in_place(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    good = '{"iteration": 1, "lm_loss": 7.0}\n{"iteration": 2, "lm_loss": 6.5}\n'
    path.write_text(good + '{"iteration": 3, "lm_lo')  # a crash (a power loss) mid-record
    inode = path.stat().st_ino
    log = _logger(path)
    assert path.read_text() == good and path.stat().st_ino == inode  # cut in place: tail -f follows
    assert "dropped an incomplete last record (23 bytes)" in capsys.readouterr().out
    log.log_eval(3, 6.0)
    log.close()
    assert [r["iteration"] for r in _lines(path)] == [1, 2, 3]
    _logger(path).close()  # a file that ends with a whole line is left as it is, without a word
    assert [r["iteration"] for r in _lines(path)] == [1, 2, 3] and "dropped" not in capsys.readouterr().out
    path.write_bytes(good.encode() + b'{"text": "' + b"x" * 200_000)  # longer than one read back
    _logger(path).close()
    assert path.read_text() == good
    path.write_text('{"iteration": 1, "lm"')  # nothing whole at all
    assert metrics.drop_incomplete_last_line(str(path)) == 21 and path.read_text() == ""
    assert metrics.drop_incomplete_last_line(str(tmp_path / "none.jsonl")) == 0


def test_a_resumed_run_appends_and_readers_take_the_last_record(tmp_path, capsys):
    """The interrupted run got past its checkpoint (iteration 2) to iteration 4 and was cut mid-record;
    the resumed run drops the broken line, appends 3 and 4 again, and the last record of each
    iteration is the uninterrupted run's."""
    from tools.loss_compare import load

    ckpt, path, ref = tmp_path / "ckpt", tmp_path / "m.jsonl", tmp_path / "ref.jsonl"
    common = ["--lr-decay-iters", "8", "--seed", "5"]
    train_losses(1, common + ["--train-iters", "2", "--save", str(ckpt), "--metrics-file", str(path)])
    lost = '{"iteration": 3, "lm_loss": 1.0}\n{"iteration": 4, "lm_loss": 1.0}\n{"iteration": 5, "lm'
    with path.open("a") as f:
        f.write(lost)
    train_losses(1, common + ["--train-iters", "4", "--load", str(ckpt), "--save", str(ckpt),
                              "--metrics-file", str(path)])
    train_losses(1, common + ["--train-iters", "4", "--metrics-file", str(ref)])
    assert [r["iteration"] for r in _lines(path)] == [1, 2, 3, 4, 3, 4]  # nothing deleted
    last, uninterrupted = load(str(path), ["lm_loss", "grad_norm"]), load(str(ref), ["lm_loss", "grad_norm"])
    assert last == uninterrupted and sorted(last) == [1, 2, 3, 4]
    assert "dropped an incomplete last record" in capsys.readouterr().out


def test_an_unwritable_metrics_file_is_one_line_before_step_one(capsys):
    from megamoe.training.run import main

    rc = main(TINY_ARGS + ["--metrics-file", "/proc/megamoe/m.jsonl"])  # /proc takes no new entries
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1
    assert "--metrics-file /proc/megamoe/m.jsonl: cannot write it" in errors[0]
