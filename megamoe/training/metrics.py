"""Throughput arithmetic and the loggers: console (Megatron-style line), JSONL metrics file, wandb
(offline unless WANDB_API_KEY is set) and tensorboard. Only the last pipeline stage's DP rank 0
(``enabled=True``) writes.

The metrics file (``--metrics-file``) is an append-only log, one JSON record per line. A crash or a
full disk never leaves a broken file where a good one was:

- Each record is one complete line handed to the kernel in one ``write()`` (the file is unbuffered),
  so a killed process leaves whole records behind.
- A write that fails (a full disk; a short write counts as failed) is cut off again with a truncate
  back to the size before it, which needs no free space. The run then says so once and stops writing
  the file; training, checkpoints and the console go on.
- Opening an existing file (a resumed run) first drops an incomplete last line, the one thing a power
  loss or an older writer can leave, with one truncate after the last newline. Truncating in place
  is used instead of writing the good part aside and renaming it: it needs no free space (a repair
  is most likely right after the disk filled), it either happens or does not, and it keeps the inode
  that a ``tail -f`` follows.
- A resumed run appends after what is there. If the interrupted run got past its last checkpoint,
  those iterations appear twice, the interrupted run's records first, so a reader takes the last
  record of each iteration (``tools/loss_compare.py`` does). Nothing is deleted: a metrics file
  shared by mistake with another run keeps that run's records.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megamoe.config import Config, ConfigError
from megamoe.model.openmoe import count_parameters


def model_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), Megatron-style accounting:
    2 FLOPs per active matmul weight (top-k experts, router, LM head; not the embedding lookup)
    plus attention scores and values, counted causally as current Megatron-LM does
    (``num_floating_point_operations``: "only half of the attention matrix is non-zero"): per layer
    and token, QK^T and AV are 2 * s * heads * d each non-causally, half of that under the causal
    mask, so 2 * s * heads * d together (it was 4 * s * heads * d, the full matrix, before)."""
    m = cfg.model
    counts = count_parameters(cfg)
    matmul_params = counts["active"] - counts["embedding"] // 2  # LM head stays, lookup does not
    attn = 2 * m.seq_length * m.num_attention_heads * m.kv_channels * m.num_layers  # causal half
    return 3.0 * (2.0 * matmul_params + attn)


@dataclass(frozen=True)
class DevicePeak:
    """Dense tensor-core peak of a GPU in TFLOP/s (no 2:4 sparsity), from the vendor datasheet."""

    pattern: str  # regex searched in torch.cuda.get_device_name(), lower case
    name: str
    bf16: float
    fp8: float | None  # None: no FP8 tensor cores


# NVIDIA datasheets quote tensor-core rates "with sparsity" (marked *); the dense rate is half of
# that. Sources: H100 (SXM, NVL) and H200 (SXM, NVL) product pages nvidia.com/en-us/data-center/h100
# and /h200; the H100 PCIe product brief PB-11133; the GH200 Grace Hopper datasheet; the A100
# datasheet (Ampere: no FP8); L40S, L40 and L4 datasheets; HGX B200 (per GPU). Most specific
# pattern first: "gh200" before "h200", the NVL / PCIe variants before plain "h100", "l40s" before
# "l40" before "l4".
DEVICE_PEAKS: tuple[DevicePeak, ...] = (
    DevicePeak(r"gh200", "GH200", 989.4, 1978.9),
    DevicePeak(r"h200.*nvl", "H200 NVL", 835.5, 1670.5),
    DevicePeak(r"h200", "H200 SXM", 989.4, 1978.9),
    DevicePeak(r"h100.*nvl", "H100 NVL", 835.5, 1670.5),
    DevicePeak(r"h100.*pcie", "H100 PCIe", 756.5, 1513.0),
    DevicePeak(r"h100", "H100 SXM", 989.4, 1978.9),
    DevicePeak(r"b200", "B200", 2250.0, 4500.0),
    DevicePeak(r"a100", "A100", 312.0, None),
    DevicePeak(r"l40s", "L40S", 362.05, 733.0),
    DevicePeak(r"l40\b", "L40", 181.05, 362.0),
    DevicePeak(r"\bl4\b", "L4", 121.0, 242.5),
)

_FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


def known_peak(device_name: str) -> DevicePeak | None:
    """The datasheet entry matching a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
    lower = device_name.lower()
    return next((peak for peak in DEVICE_PEAKS if re.search(peak.pattern, lower)), None)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5,
                        log: Callable[[str], None] | None = None) -> float:
    """Per-device peak for MFU (TFLOP/s); ``--peak-tflops`` overrides it (the caller's business).

    CUDA: the datasheet's dense tensor-core peak of a known GPU (:data:`DEVICE_PEAKS`): FP8 for FP8
    dtypes, otherwise BF16 -- MFU's usual yardstick (Megatron, PaLM), so fp32 runs are measured
    against the same ceiling. An unknown GPU gets a measured rate: n^3 GEMMs (n = 8192, large enough
    not to be launch-bound) timed with CUDA events, which the log says. CPU: a measured n = 1024
    dense GEMM rate of this thread. ``log``: where to say which (default: stdout on rank 0)."""
    log = log or _log_rank0
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = known_peak(name)
        if peak is not None:
            fp8 = dtype in _FP8 and peak.fp8 is not None
            value = peak.fp8 if fp8 else peak.bf16
            log(f" > MFU peak: {value:g} TFLOP/s per device ({name}: {peak.name} dense "
                f"{'FP8' if fp8 else 'BF16'}, datasheet)")
            return value
        n = n or 8192
        dtype = torch.bfloat16 if dtype in _FP8 else dtype  # a plain matmul takes no FP8 operands
        value = _gemm_tflops_cuda(device, dtype, n, reps)
        log(f" > MFU peak: {value:.1f} TFLOP/s per device MEASURED ({name} is not in the datasheet "
            f"table: median of {reps} {n}^3 {dtype} GEMMs; pass --peak-tflops to set it)")
        return value
    n = n or 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / sorted(times)[len(times) // 2] / 1e12


def _gemm_tflops_cuda(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Median rate of ``reps`` n^3 GEMMs, each timed with CUDA events (device time, not host)."""
    with torch.cuda.device(device):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        for _ in range(2):  # warm-up: kernel selection, clocks
            torch.mm(a, b, out=out)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return 2.0 * n**3 / sorted(times)[len(times) // 2] / 1e12


def _log_rank0(msg: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


class MetricsLogger:
    def __init__(self, cfg: Config, enabled: bool) -> None:
        self.cfg, self.enabled = cfg, enabled
        self._file = self._wandb = self._tb = None
        if not enabled:
            return
        t = cfg.train
        if t.metrics_file:
            self._file = _open_metrics_file(t.metrics_file)
        if t.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(t.tensorboard_dir)
        if t.wandb_project:
            import wandb

            if not os.environ.get("WANDB_API_KEY"):
                os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb.init(project=t.wandb_project, name=t.wandb_exp_name,
                                     config=_flat_config(cfg))

    def _write_record(self, record: dict[str, Any]) -> None:
        """One JSON line in one write. A failed write (a full disk) must not kill hours of training,
        nor leave half a record: cut the file back to where it was, say so once and stop writing it."""
        if self._file is None:
            return
        line = (json.dumps(record) + "\n").encode()
        end = None
        try:
            end = self._file.tell()  # the end of the file: only this process appends to it
            written = self._file.write(line)
            if written is not None and written < len(line):  # the disk filled mid-record
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            if end is not None:
                try:
                    self._file.truncate(end)
                except (OSError, ValueError):
                    pass  # the next open drops the incomplete line
            print(f" > WARNING: --metrics-file {self.cfg.train.metrics_file}: write failed "
                  f"({e.strerror or e}); no more metrics go there, training goes on", flush=True)
            self._file = None

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def log_iteration(self, rec: dict[str, Any]) -> None:
        """Every iteration goes to the metrics file; the console every --log-interval."""
        if not self.enabled:
            return
        self._write_record(rec)
        it = rec["iteration"]
        if self._tb is not None:
            for k, v in rec.items():
                if k != "iteration" and isinstance(v, int | float):
                    self._tb.add_scalar(f"train/{k}", v, it)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in rec.items()}, step=it)
        if it % self.cfg.train.log_interval == 0 or it == 1:
            print(format_line(rec, self.cfg.train.train_iters), flush=True)

    def log_eval(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        import math

        ppl = math.exp(min(loss, 20.0))
        print(f" validation loss at iteration {iteration} | lm loss: {loss:.6E} | "
              f"lm loss PPL: {ppl:.6E}", flush=True)
        self._write_record({"iteration": iteration, "eval_lm_loss": loss})
        if self._tb is not None:
            self._tb.add_scalar("valid/lm_loss", loss, iteration)
        if self._wandb is not None:
            self._wandb.log({"valid/lm_loss": loss}, step=iteration)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def drop_incomplete_last_line(path: str) -> int:
    """Cut whatever follows the last newline of ``path`` (a record that a crash cut short) with one
    truncate; returns the bytes dropped (0 when the file ends with a whole line or does not exist)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    try:
        size = end = os.fstat(fd).st_size
        keep = 0
        while end > 0:  # read backwards from the end until a newline
            start = max(0, end - (64 << 10))
            chunk = os.pread(fd, end - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        if keep < size:
            os.ftruncate(fd, keep)
        return size - keep
    finally:
        os.close(fd)


def _open_metrics_file(path: str) -> Any:
    """The metrics file opened for appending, unbuffered (one write() per record), after dropping an
    incomplete last line; an unusable path is a one-line ConfigError before step 1."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        dropped = drop_incomplete_last_line(path)
        handle = open(path, "ab", buffering=0)
    except OSError as e:
        raise ConfigError(f"--metrics-file {path}: cannot write it ({e.strerror or e}); pass a writable "
                          "path") from None
    if dropped:
        print(f" > note: --metrics-file {path}: dropped an incomplete last record ({dropped} bytes) left by "
              "an interrupted run", flush=True)
    return handle


def format_line(rec: dict[str, Any], train_iters: int) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    skipped = " | skipped (non-finite grad)" if rec.get("skipped") else ""
    return (f" [{stamp}] iteration {rec['iteration']:>8d}/{train_iters:>8d} | "
            f"consumed samples: {rec['consumed_samples']:>10d} | "
            f"elapsed time per iteration (ms): {rec['step_time'] * 1e3:.1f} | "
            f"learning rate: {rec['lr']:.3E} | lm loss: {rec['lm_loss']:.6E} | "
            f"aux loss: {rec['aux_loss']:.4E} | z loss: {rec['z_loss']:.4E} | "
            f"grad norm: {rec['grad_norm']:.4f} | tokens/s: {rec['tokens_per_sec']:.0f} | "
            f"TFLOP/s/device: {rec['tflops']:.4f} | MFU: {rec['mfu'] * 100:.1f}% | "
            f"expert load max/mean: {rec['load_imbalance']:.2f}{_a2a(rec)}{_bubble(rec)}{skipped}")


def _bubble(rec: dict[str, Any]) -> str:
    if "pp_idle_frac" not in rec:
        return ""
    return f" | pipeline idle: {rec['pp_idle_frac'] * 100:.1f}%"


def _a2a(rec: dict[str, Any]) -> str:
    intra, inter = rec.get("a2a_bytes_intra", 0), rec.get("a2a_bytes_inter", 0)
    if not intra and not inter:
        return ""
    return (f" | a2a sent intra/inter: {intra / 2**20:.2f}/{inter / 2**20:.2f} MiB in "
            f"{rec['a2a_msgs_intra']}/{rec['a2a_msgs_inter']} msgs")


def _flat_config(cfg: Config) -> dict[str, Any]:
    import dataclasses

    out: dict[str, Any] = {}
    for section, values in dataclasses.asdict(cfg).items():
        for k, v in values.items():
            out[f"{section}.{k}"] = v
    return out


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
