"""MFU arithmetic: the causal attention FLOP count and the per-device peak (issue 20 item 7, issue 18:
an MFU that means something); the metrics file survives a full disk and a crash (issue 17)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from megamoe.arguments import parse_args
from megamoe.config import ConfigError
from megamoe.training import metrics
from megamoe.training.metrics import (
    cpu_peak_tflops,
    known_peak,
    measure_peak_tflops,
    model_flops_per_token,
    robust_peak_tflops,
)
from tests.harness import TINY_ARGS, train_losses


def test_flops_per_token_by_hand_for_openmoe_tiny():
    """openmoe-tiny at s = 32: h = 64, 4 heads x d 16 (q = g = 64), I = 64, 8 experts top-2, layers 2
    and 4 MoE (with OpenMoE's extra dense MLP), V = 1024. Forward FLOPs per token, by hand:"""
    attention = 2 * 64 * (64 + 2 * 64) + 2 * 64 * 64  # q, k, v and o projections: 32768
    causal = 2 * 64 * 32  # QK^T and AV over the causal half of the 32 x 32 scores: 4096
    dense_mlp = 2 * 4 * 64 * 64  # gate 2I + up I + down I: 32768
    moe_mlp = 2 * 2 * (4 * 64 * 64) + 2 * 64 * 8 + dense_mlp  # top-2 experts, router, extra MLP: 99328
    head = 2 * 64 * 1024  # LM head: 131072
    forward = 4 * (attention + causal) + 2 * dense_mlp + 2 * moe_mlp + head
    assert forward == 542720
    cfg = parse_args(TINY_ARGS)  # --seq-length 32
    assert model_flops_per_token(cfg) == 3 * 542720  # + backward (input and weight gradients)


def test_attention_flops_count_the_causal_half():
    """Per token and layer, QK^T and AV under the causal mask: 2 * s * heads * d forward (Megatron's
    ``query_projection_size * seq_length / 2 * 2``); nothing else depends on s."""
    short, long = (parse_args(TINY_ARGS + ["--seq-length", s]) for s in ("32", "64"))
    m = short.model
    per_position = 3 * 2 * m.num_attention_heads * m.kv_channels * m.num_layers  # fwd + bwd
    assert model_flops_per_token(long) - model_flops_per_token(short) == per_position * 32


def test_mixtral_flops_count_swiglu_experts_gqa_and_no_extra_mlp():
    """mixtral-tiny: every layer MoE with SwiGLU experts (3hI), no extra MLP, GQA keys/values over 2
    query groups (g = 32)."""
    cfg = parse_args(["--model-preset", "mixtral-tiny", "--mock-data", "--seq-length", "32"])
    attention = 2 * 64 * (64 + 2 * 32) + 2 * 64 * 64 + 2 * 64 * 32
    moe = 2 * 2 * (3 * 64 * 64) + 2 * 64 * 8
    assert model_flops_per_token(cfg) == 3 * (4 * (attention + moe) + 2 * 64 * 1024)


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


def test_peak_tflops_overrides_the_measurement(monkeypatch):
    """--peak-tflops: nothing is measured and MFU is the achieved rate over it."""
    from megamoe.training import run

    def no_measurement(*args, **kwargs):
        raise AssertionError("measured although --peak-tflops was given")

    monkeypatch.setattr(run, "measure_peak_tflops", no_measurement)
    records = train_losses(1, ["--train-iters", "2", "--peak-tflops", "0.5"])
    assert len(records) == 2 and all(r["mfu"] == pytest.approx(r["tflops"] / 0.5) for r in records)
    for bad in ("0", "-1", "nan"):
        with pytest.raises(ConfigError, match="--peak-tflops must be a positive number"):
            parse_args(TINY_ARGS + ["--peak-tflops", bad])


def test_robust_peak_is_the_largest_of_its_repetitions():
    """Five timed GEMMs after an untimed warm-up; the fastest one sets the peak (interference only
    slows a GEMM down), so 2 n^3 / the shortest time, per thread on CPU seconds."""
    now = [0.0]
    gemms = []

    def fake(durations: list[float]):
        steps = iter(durations)

        def gemm() -> None:
            gemms.append(torch.get_num_threads())
            now[0] += next(steps)

        return gemm

    n, threads_before = 1000, torch.get_num_threads()
    warm_up = 100.0  # not timed: its length does not matter
    peak = robust_peak_tflops(n=n, reps=5, threads=1, gemm=fake([warm_up, 4.0, 1.0, 2.0, 8.0, 2.0]),
                              timer=lambda: now[0])
    assert gemms == [1] * 6 and peak == 2 * n**3 / 1.0 / 1e12
    gemms.clear()  # 2 threads: 2 CPU seconds for one GEMM is one second with a core per thread
    peak = robust_peak_tflops(n=n, reps=3, threads=2, gemm=fake([0.5, 2.0, 3.0, 2.5]), timer=lambda: now[0])
    assert gemms == [2] * 4 and peak == 2 * 2 * n**3 / 2.0 / 1e12
    assert torch.get_num_threads() == threads_before  # put back


def test_cpu_peak_is_stored_settles_and_is_remeasured(tmp_path, monkeypatch):
    """Start-ups measure and add to the stored figure (the largest rate) until it rests on enough
    GEMMs, then read it without measuring; re-measuring keeps the larger figure unless told to
    replace it; a hand-broken file is measured again; with storing off a process keeps its own."""
    path = tmp_path / "peaks.json"
    monkeypatch.setenv(metrics.PEAK_CACHE_ENV, str(path))
    monkeypatch.setattr(metrics, "_MEASURED", {})
    monkeypatch.setattr(metrics, "CPU_PEAK_SETTLED_GEMMS", 10)
    rates = iter([0.05, 0.08, 0.06, 0.04, 0.07, 0.09])
    calls = []

    def measure(n, reps, dtype):
        calls.append((n, reps, dtype))
        return next(rates)

    said: list[str] = []

    def peak(**kwargs) -> float:
        return cpu_peak_tflops(torch.float32, log=said.append, measure=measure, **kwargs)

    assert peak() == 0.05 and calls == [(2048, 5, torch.float32)] and "50.0 in the 5 measured now" in said[-1]
    assert peak() == 0.08 and len(calls) == 2 and "largest rate of 10" in said[-1]  # a busy first start-up
    assert peak() == 0.08 and len(calls) == 2 and "stored" in said[-1]  # settled: nothing measured
    assert peak(remeasure=True) == 0.08 and "largest rate of 15" in said[-1]  # 0.06: a busy machine
    assert peak(replace=True) == 0.04 and "largest rate of 5 " in said[-1]
    key, = json.loads(path.read_text())
    assert "float32" in key and "1 thread" in key and "2048^3" in key
    path.write_text(json.dumps({key: {"tflops": "fast", "gemms": 100}}))
    monkeypatch.setattr(metrics, "_MEASURED", {})  # another process
    assert peak() == 0.07 and len(calls) == 5  # a hand-broken entry: measured again
    stored = path.read_text()
    monkeypatch.setenv(metrics.PEAK_CACHE_ENV, "")  # storing off: this process's own entry
    assert peak() == 0.09 and len(calls) == 6 and "stored in" not in said[-1] and "of 10" in said[-1]
    assert peak() == 0.09 and len(calls) == 6 and path.read_text() == stored


def test_cpu_peak_is_measured():
    assert robust_peak_tflops(n=64, reps=3) > 0


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
