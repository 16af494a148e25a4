"""Measure the constants of the planner's cost model on this machine (``plan_parallel.py --calibrate``).

What is measured, and why each is needed by :mod:`megamoe.planner.cost`:

- ``gemm_tflops``: the per-rank GEMM rate on one thread, megamoe's robust CPU peak
  (:func:`megamoe.training.metrics.cpu_peak_tflops`: the largest rate of 2048^3 GEMMs on the process
  CPU clock, stored per machine) -- the compute term's peak.
- ``model_gemm_tflops``: with a model, the rate of one of its GEMMs ([mbs x seq, hidden] x
  [hidden, ffn]) on one thread, timed the same way; its ratio to the peak is the compute efficiency.
- ``layer_overhead_s`` / ``microbatch_overhead_s``: the fixed cost of one decoder layer's forward +
  backward (and of one micro-batch's embedding, head and loss) that does not scale with FLOPs (Python,
  autograd, kernel launches), from megamoe's own model at a negligible width (hidden 16, 8 tokens): the
  slope and intercept of step time against layer count.
- ``alltoall`` / ``allreduce``: latency and bandwidth fits t = latency + bytes / bandwidth of gloo
  all-to-all (bytes each rank sends to the others) and all-reduce (bytes each rank sends in a ring,
  2 (W-1)/W x buffer) between W fork-started ranks, for every W asked: on a machine with fewer cores
  than ranks the ranks share cores, and the fit of that W says what a collective costs then.
- ``optimizer_bytes_per_s``: AdamW state bytes (fp32 moments, 8 per parameter) a fused AdamW step
  updates per second on one thread, 2M parameters.
- ``cores``: os.cpu_count(); the cost model divides the compute rate by world_size / cores when ranks
  outnumber cores.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megamoe.config import Config

SIZES_BYTES = (1 << 14, 1 << 18, 1 << 20, 1 << 22)  # per-rank buffers: 16 KiB .. 4 MiB of fp32
REPS = 7


@dataclass(frozen=True)
class LinkFit:
    """t = latency_s + bytes / (bandwidth_gbs x 1e9), least squares over the measured sizes."""

    latency_s: float
    bandwidth_gbs: float

    def seconds(self, nbytes: float, messages: float = 1.0) -> float:
        return messages * self.latency_s + nbytes / (self.bandwidth_gbs * 1e9)


@dataclass(frozen=True)
class Calibration:
    """Constants measured on one machine; :func:`megamoe.planner.cost.Cluster.from_calibration` turns
    them into a cluster for a world size."""

    gemm_tflops: float
    model_gemm_tflops: float | None
    layer_overhead_s: float
    microbatch_overhead_s: float
    optimizer_bytes_per_s: float
    cores: int
    alltoall: dict[int, LinkFit]  # by world size
    allreduce: dict[int, LinkFit]
    measured: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(obj: dict[str, Any]) -> Calibration:
        fits = {k: {int(w): LinkFit(**f) for w, f in obj[k].items()} for k in ("alltoall", "allreduce")}
        return Calibration(**{**obj, **fits})

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1, sort_keys=True)

    @staticmethod
    def load(path: str) -> Calibration:
        with open(path) as f:
            return Calibration.from_json(json.load(f))


def fit_link(points: Sequence[tuple[float, float]]) -> LinkFit:
    """Least-squares line through (bytes, seconds); latency clamped at >= 0, bandwidth > 0."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    slope = max(slope, 1e-15)  # a flat line (noise) would be infinite bandwidth
    return LinkFit(latency_s=max(my - slope * mx, 0.0), bandwidth_gbs=1.0 / slope / 1e9)


def _collective_times(rank: int, world: int, sizes: Sequence[int], reps: int) -> dict[str, list[float]]:
    """Median seconds of all-to-all and all-reduce of each per-rank buffer size (fp32)."""
    out: dict[str, list[float]] = {"alltoall": [], "allreduce": []}
    for nbytes in sizes:
        x = torch.ones(max(nbytes // 4 // world, 1) * world)
        y = torch.empty_like(x)
        ops = {"alltoall": lambda x=x, y=y: dist.all_to_all_single(y, x),
               "allreduce": lambda x=x: dist.all_reduce(x)}
        for name, op in ops.items():
            op()  # warm-up: gloo's pairs and buffers
            times = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                op()
                times.append(time.perf_counter() - t0)
            out[name].append(statistics.median(times))
    return out


def _rank_main(rank: int, world: int, init: str, fn: Callable, args: tuple, queue: mp.Queue) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        queue.put((rank, fn(rank, world, *args)))
    except BaseException as error:  # noqa: BLE001 - the parent reports it
        queue.put((rank, error))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def on_forked_ranks(world: int, fn: Callable, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` fork-started gloo ranks (one thread each), by rank."""
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "rdzv"), fn, args, queue),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        try:
            results = dict(queue.get(timeout=timeout) for _ in range(world))
        finally:
            for p in procs:
                p.join(timeout=5)
                if p.is_alive():
                    p.kill()
    errors = [f"rank {r}: {e!r}" for r, e in results.items() if isinstance(e, BaseException)]
    if errors:
        raise RuntimeError("calibration failed on " + "; ".join(errors))
    return [results[r] for r in range(world)]


def measure_links(world: int, sizes: Sequence[int] = SIZES_BYTES,
                  reps: int = REPS) -> tuple[LinkFit, LinkFit]:
    """(all-to-all fit, all-reduce fit) between ``world`` forked ranks; the slowest rank per size."""
    per_rank = on_forked_ranks(world, _collective_times, list(sizes), reps)
    fits = []
    for name in ("alltoall", "allreduce"):
        slowest = [max(r[name][i] for r in per_rank) for i in range(len(sizes))]
        if name == "alltoall":  # bytes each rank sends to the W-1 others
            sent = [(s // 4 // world) * 4 * (world - 1) for s in sizes]
        else:  # a ring all-reduce sends 2 (W-1)/W of the buffer
            sent = [2 * (world - 1) / world * (s // 4 // world) * 4 * world for s in sizes]
        fits.append(fit_link(list(zip(sent, slowest))))
    return fits[0], fits[1]


def _cpu_rate(m: int, k: int, n: int, reps: int = 5) -> float:
    """TFLOP/s of the largest-rate [m, k] x [k, n] GEMM on one thread, on the process CPU clock."""
    rng = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=rng), torch.randn(k, n, generator=rng)
    inner = max(1, int(2e8 // (2 * m * k * n)))  # ~0.2 GFLOP per timing: above the clock's tick
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        for _ in range(inner):
            torch.mm(a, b)
        best = min(best, (time.process_time() - t0) / inner)
    return 2.0 * m * k * n / max(best, 1e-9) / 1e12


def measure_overheads(reps: int = 5) -> tuple[float, float]:
    """(seconds per decoder layer, seconds per micro-batch besides its layers) of forward + backward
    at a width where the FLOPs are negligible: the slope and intercept over 2 and 6 layers."""
    from megamoe.arguments import parse_args
    from megamoe.model.openmoe import OpenMoEModel

    times = {}
    for layers in (2, 6):
        cfg = parse_args(["--model-preset", "openmoe-tiny", "--mock-data", "--num-layers", str(layers),
                          "--hidden-size", "16", "--num-attention-heads", "2", "--kv-channels", "8",
                          "--ffn-hidden-size", "16", "--seq-length", "8", "--vocab-size", "128"])
        model = OpenMoEModel(cfg)
        model.init_weights(0)
        tokens = torch.zeros(1, 8, dtype=torch.long)
        best = float("inf")
        for _ in range(reps + 1):
            t0 = time.process_time()
            model.loss(tokens, tokens).backward()
            best = min(best, time.process_time() - t0)
        times[layers] = best
    per_layer = max((times[6] - times[2]) / 4, 0.0)
    return per_layer, max(times[2] - 2 * per_layer, 0.0)


def measure_optimizer(params: int = 1 << 21, reps: int = 5) -> float:
    """Bytes of AdamW moments (8 per parameter) a fused AdamW step updates per CPU second."""
    w = torch.nn.Parameter(torch.randn(params))
    w.grad = torch.randn(params)
    opt = torch.optim.AdamW([w], lr=1e-3, fused=True)
    opt.step()  # allocates the moments
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        opt.step()
        best = min(best, time.process_time() - t0)
    return 8 * params / max(best, 1e-9)


def calibrate(world_sizes: Sequence[int] = (2, 4, 8), cfg: Config | None = None,
              log: Callable[[str], None] = print) -> Calibration:
    """Measure everything on this machine (one thread per rank, as training runs)."""
    from megamoe.training.metrics import cpu_peak_tflops

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = cpu_peak_tflops(torch.float32, log=log)
        model_rate = None
        if cfg is not None:
            m = cfg.model
            rows = cfg.train.micro_batch_size * m.seq_length
            model_rate = _cpu_rate(rows, m.hidden_size, m.ffn_hidden_size)
            log(f" > model GEMM [{rows}, {m.hidden_size}] x "
                f"[{m.hidden_size}, {m.ffn_hidden_size}]: {model_rate * 1e3:.1f} GFLOP/s per rank")
        layer_s, mb_s = measure_overheads()
        adam = measure_optimizer()
        log(f" > fixed cost per layer forward+backward {layer_s * 1e3:.2f} ms, per micro-batch "
            f"{mb_s * 1e3:.2f} ms; AdamW {adam / 1e9:.2f} GB of moments per second")
    finally:
        torch.set_num_threads(previous)
    a2a, ar = {}, {}
    for world in world_sizes:
        a2a[world], ar[world] = measure_links(world)
        log(f" > gloo, {world} forked ranks: all-to-all {a2a[world].latency_s * 1e6:.0f} us + "
            f"{a2a[world].bandwidth_gbs:.2f} GB/s, all-reduce {ar[world].latency_s * 1e6:.0f} us + "
            f"{ar[world].bandwidth_gbs:.2f} GB/s per rank")
    return Calibration(gemm_tflops=peak, model_gemm_tflops=model_rate, layer_overhead_s=layer_s,
                       microbatch_overhead_s=mb_s, optimizer_bytes_per_s=adam, cores=os.cpu_count() or 1,
                       alltoall=a2a, allreduce=ar,
                       measured=time.strftime("%Y-%m-%d %H:%M:%S"))
