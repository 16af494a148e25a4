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
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megamoe.config import Config, ConfigError


def model_flops_per_token(cfg: Config) -> float:
    """Model FLOPs per trained token (forward + backward), counted as current Megatron-LM counts them
    (``num_floating_point_operations`` in megatron/training/training.py) for the GEMMs megamoe runs.

    Every GEMM costs 2 FLOPs per multiply-add in the forward pass and twice that again in the
    backward pass (input and weight gradients), so training is 3x forward. Per token, forward, with
    h hidden, s sequence, q = heads * d (query width), g = kv_heads * d (key/value width, GQA),
    I ffn width, k top-k, E experts, V padded vocab:

    - attention, every layer: projections 2 * h * (q + 2g) + 2 * q * h; core 2 * q * s -- QK^T and
      softmax(.)V are 2 * q * s each over the full s x s matrix, and the causal mask leaves half of
      it ("causal mask (only half of the mask is non-zero)"), so 2 * 2 * q * s / 2;
    - a dense layer's MLP: 2 * 4hI (OpenMoE's gate H->2I, up H->I, down I->H);
    - an MoE layer: the k routed experts 2 * k * 4hI (Mixtral's SwiGLU experts: 2 * k * 3hI), the
      router 2 * h * E, and OpenMoE's extra dense MLP after the experts 2 * 4hI (Mixtral has none);
    - the LM head 2 * h * V (the embedding lookup is no GEMM).

    As in Megatron, norms, softmax, activations and the loss are not counted, nor is recomputation
    (model FLOPs, not hardware FLOPs: ``--recompute-*`` lowers MFU); unlike Megatron the router GEMM
    is (it is real work, < 1% of the total at any preset)."""
    m, moe = cfg.model, cfg.moe
    h, ffn, s = m.hidden_size, m.ffn_hidden_size, m.seq_length
    q, g = m.num_attention_heads * m.kv_channels, m.kv_heads * m.kv_channels
    mixtral = m.model_family == "mixtral"
    dense_mlp = 2 * 4 * h * ffn
    expert_mlp = 2 * (3 if mixtral else 4) * h * ffn
    attention = 2 * h * (q + 2 * g) + 2 * q * h + 2 * q * s  # the last term: the causal half
    forward = 2 * h * m.padded_vocab_size(1)  # LM head
    for layer in range(m.num_layers):
        forward += attention
        if moe.is_moe_layer(layer):
            forward += moe.router_topk * expert_mlp + 2 * h * moe.num_experts + (0 if mixtral else dense_mlp)
        else:
            forward += dense_mlp
    return 3.0 * forward


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
    dtypes, otherwise BF16 -- MFU's usual yardstick (Megatron, PaLM), so fp32 runs, and runs with
    FP8 experts (``--fp8-format``; attention, the dense MLPs and the LM head stay BF16), are
    measured against the BF16 ceiling. An unknown GPU gets a measured rate: the largest of ``reps``
    n^3 GEMMs (n = 8192, large enough not to be launch-bound) timed with CUDA events, which the log
    says. CPU: :func:`cpu_peak_tflops` (the largest of repeated 2048^3 GEMMs on this rank's threads,
    stored per machine). ``log``: where to say which (default: stdout on rank 0)."""
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
            f"table: largest of {reps} {n}^3 {dtype} GEMMs; pass --peak-tflops to set it)")
        return value
    return cpu_peak_tflops(dtype, n or CPU_PEAK_N, reps, log=log)


# The CPU peak. A rate measured once at start-up on a shared machine is whatever the neighbours left
# (five 1024^3 GEMMs swung 39-87 GFLOP/s between calls; a whole loaded minute gave 18). Two things make
# it robust: each GEMM is timed on the process's CPU clock, which stops while the scheduler runs
# someone else on the core, so time-sharing does not slow it down; and interference that the clock
# does count (a busy SMT sibling, a shared cache) only ever slows a GEMM down, so the largest of many
# repetitions, and over many start-ups, converges to what the core can do. 2048^3 (17 GFLOP, ~0.2 s a
# GEMM on one core) is far from overhead-bound. The result is stored per machine (CPU model, torch
# build, dtype, threads, size) so start-ups cost nothing once it has settled and every run divides by
# the same figure; ``tools/measure_peak.py`` re-measures it.
CPU_PEAK_N = 2048
PEAK_CACHE_ENV = "MEGAMOE_PEAK_CACHE"  # a JSON file; set to "" to neither read nor store


def robust_peak_tflops(n: int = CPU_PEAK_N, reps: int = 5, dtype: torch.dtype = torch.float32,
                       threads: int | None = None, gemm: Callable[[], object] | None = None,
                       timer: Callable[[], float] = time.process_time) -> float:
    """The largest rate (TFLOP/s) of ``reps`` n^3 GEMMs on ``threads`` torch threads (default: the
    current count), after one untimed warm-up (page faults, packing buffers). Each is timed on
    ``timer``, by default the process's CPU seconds (every thread's, so a BLAS that used a thread of
    its own is counted too), and its rate is threads * 2 n^3 / CPU seconds: the rate with a core per
    thread, whoever else shares them. ``gemm`` and ``timer`` are injectable so a test can check the
    arithmetic without timing anything."""
    threads = threads or torch.get_num_threads()
    if gemm is None:
        rng = torch.Generator().manual_seed(0)  # not the global generator the run's RNG state is
        a, b = torch.randn(n, n, dtype=dtype, generator=rng), torch.randn(n, n, dtype=dtype, generator=rng)
        out = torch.empty(n, n, dtype=dtype)

        def gemm() -> object:
            return torch.mm(a, b, out=out)  # out=: no fresh 16 MiB result to page-fault every rep

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gemm()  # warm-up
        best = float("inf")
        for _ in range(reps):
            t0 = timer()
            gemm()
            best = min(best, timer() - t0)
    finally:
        torch.set_num_threads(previous)
    return threads * 2.0 * n**3 / best / 1e12


def peak_cache_path() -> str | None:
    """Where the measured CPU peaks are stored: ``$MEGAMOE_PEAK_CACHE``, else
    ``$XDG_CACHE_HOME/megamoe/peak_tflops.json`` (``~/.cache`` by default); None when disabled."""
    path = os.environ.get(PEAK_CACHE_ENV)
    if path is not None:
        return path or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megamoe", "peak_tflops.json")


def cpu_peak_key(dtype: torch.dtype, n: int, threads: int) -> str:
    """What a stored CPU peak is valid for: another CPU (model name and its widest vector unit: a VM
    may name different generations alike), torch (BLAS) build, dtype, thread count or GEMM size is
    another key."""
    model, isa = platform.machine(), "?"
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(1 << 16)  # the first processor's block is enough
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
        flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), [])
        model = names[0] if names else model
        isa = next((f for f in ("amx_tile", "avx512f", "avx2", "avx") if f in flags), "-")
    except OSError:
        pass  # not Linux: the architecture name has to do
    return (f"{model} ({isa}) | torch {torch.__version__} | {_dtype_name(dtype)} | {_threads(threads)} | "
            f"{n}^3")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _threads(count: int) -> str:
    return f"{count} thread{'s' if count != 1 else ''}"


def read_peaks(path: str | None) -> dict[str, Any]:
    """The stored CPU peaks, by :func:`cpu_peak_key`."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            peaks = json.load(f)
        return peaks if isinstance(peaks, dict) else {}
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: measure (and try to write a good one)


def write_json_aside(path: str | os.PathLike, value: Any, **dump_kwargs: Any) -> None:
    """``value`` as JSON at ``path`` (its directory created), written under a temporary name beside it
    and renamed into place: a reader or a crash never sees half a file. For results, calibrations and
    caches (benchmarks, the planner, the CPU peak)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, **dump_kwargs)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _store_peak(path: str | None, key: str, entry: dict[str, Any]) -> None:
    """Write-then-rename, so a concurrent reader (another rank starting) sees the old file or the new
    one, never half of one; a store that fails only costs the next start-up a measurement."""
    if path is None:
        return
    try:
        write_json_aside(path, read_peaks(path) | {key: entry}, indent=1, sort_keys=True)
    except OSError:
        pass


# Start-ups keep adding their GEMMs to a stored figure until it rests on this many: one start-up on a
# busy machine then cannot fix a low figure for good, and later start-ups measure nothing.
CPU_PEAK_SETTLED_GEMMS = 25
_MEASURED: dict[str, dict[str, Any]] = {}  # this process's entries, for when nothing can be stored


def _valid_entry(entry: object) -> bool:
    rate = entry.get("tflops") if isinstance(entry, dict) else None
    return isinstance(rate, int | float) and 0 < rate < float("inf")


def cpu_peak_tflops(dtype: torch.dtype = torch.float32, n: int = CPU_PEAK_N, reps: int = 5,
                    remeasure: bool = False, replace: bool = False,
                    log: Callable[[str], None] | None = None,
                    measure: Callable[[int, int, torch.dtype], float] | None = None) -> float:
    """This rank's CPU peak (TFLOP/s) on its current torch thread count (one per rank as training
    runs): the largest rate of all the n^3 GEMMs measured on this machine (:func:`robust_peak_tflops`,
    ``reps`` per call), stored per :func:`cpu_peak_key`. A call measures while the stored figure
    rests on fewer than :data:`CPU_PEAK_SETTLED_GEMMS` GEMMs, or when told: ``remeasure`` keeps the
    larger of the new and the stored figure (a busy machine does not lower it), ``replace`` the new
    one (another BLAS, a wrong figure). ``measure(n, reps, dtype)`` is injectable for tests."""
    log = log or _log_rank0
    threads = torch.get_num_threads()
    measure = measure or (lambda n_, reps_, dtype_: robust_peak_tflops(n_, reps_, dtype_, threads))
    key, path = cpu_peak_key(dtype, n, threads), peak_cache_path()
    stored = read_peaks(path).get(key)
    if not _valid_entry(stored):  # none, or a hand-broken one
        stored = _MEASURED.get(key)
    gemms = int(stored.get("gemms", 0)) if stored else 0
    how = f"{n}^3 {_dtype_name(dtype)} GEMMs on {_threads(threads)}, timed on the CPU clock"
    if stored and gemms >= CPU_PEAK_SETTLED_GEMMS and not remeasure and not replace:
        value = float(stored["tflops"])
        log(f" > MFU peak: {value * 1e3:.1f} GFLOP/s per rank (CPU: the largest rate of {gemms} {how}, "
            f"stored {stored.get('measured', '?')}; re-measure: python tools/measure_peak.py)")
        return value
    new = measure(n, reps, dtype)
    if stored and not replace:
        value, gemms = max(new, float(stored["tflops"])), gemms + reps
    else:
        value, gemms = new, reps
    entry = {"tflops": value, "gemms": gemms, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    _MEASURED[key] = entry
    _store_peak(path, key, entry)
    log(f" > MFU peak: {value * 1e3:.1f} GFLOP/s per rank (CPU: the largest rate of {gemms} {how}; "
        f"{new * 1e3:.1f} in the {reps} measured now{f', stored in {path}' if path else ''})")
    return value


def _gemm_tflops_cuda(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """Largest rate of ``reps`` n^3 GEMMs, each timed with CUDA events (device time, not host)."""
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
    return 2.0 * n**3 / min(times) / 1e12


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
