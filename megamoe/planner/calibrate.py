"""Measure the constants of the planner's cost model on this machine (``plan_parallel.py --calibrate``).

What is measured, and why each is needed by :mod:`megamoe.planner.cost`:

- ``gemm_tflops``: the per-rank GEMM rate on one thread, megamoe's robust CPU peak
  (:func:`megamoe.training.metrics.cpu_peak_tflops`: the largest rate of 2048^3 GEMMs on the process
  CPU clock, stored per machine) -- the compute term's peak.
- ``model_tflops`` / ``layer_overhead_s``: with a model small enough to run here (< 50M parameters),
  its own forward + backward on one rank at micro-batch 1 and 4 (megamoe's model, CPU clock, the
  least of a few repetitions): the slope gives the rate it reaches on its model FLOPs (GEMMs, and
  everything the FLOP count leaves out: norms, softmax, routing, permutations), the intercept the fixed
  cost per micro-batch (Python, autograd, launches), per decoder layer. Without a model: the GEMM peak
  and the fixed cost of megamoe's decoder at a negligible width (hidden 16, 8 tokens; slope over 2
  and 6 layers).
- ``alltoall`` / ``allreduce``: latency and bandwidth fits t = latency + bytes / bandwidth of gloo
  all-to-all (bytes each rank sends to the others) and all-reduce (bytes each rank sends in a ring,
  2 (W-1)/W x buffer) between W fork-started ranks, for every W asked. The latency is per message
  as megamoe/planner/traffic.py counts them (a call's fitted intercept over its W-1 all-to-all or
  2 (W-1) ring messages), since the cost model multiplies it by the traffic's message count. On a
  machine with fewer cores than ranks the ranks share cores, and the fit of that W says what a
  collective costs then.
- ``optimizer_bytes_per_s``: AdamW state bytes (fp32 moments, 8 per parameter) a fused AdamW step
  updates per second on one thread, 2M parameters.
- ``cores``: os.cpu_count(); the cost model divides the compute rate by world_size / cores when ranks
  outnumber cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megamoe.config import Config
from megamoe.parallel.forked import run_ranks

SIZES_BYTES = (1 << 16, 1 << 20, 1 << 22, 1 << 24)  # per-rank buffers: 64 KiB .. 16 MiB of fp32
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
    model_tflops: float | None  # None: no model measured, use gemm_tflops
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
        from megamoe.training.metrics import write_json_aside

        write_json_aside(path, self.to_json(), indent=1, sort_keys=True)

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


def measure_links(world: int, sizes: Sequence[int] = SIZES_BYTES,
                  reps: int = REPS) -> tuple[LinkFit, LinkFit]:
    """(all-to-all fit, all-reduce fit) between ``world`` forked ranks; the slowest rank per size."""
    per_rank = run_ranks(world, _collective_times, list(sizes), reps)
    fits = []
    for name in ("alltoall", "allreduce"):
        slowest = [max(r[name][i] for r in per_rank) for i in range(len(sizes))]
        if name == "alltoall":  # bytes each rank sends to the W-1 others, in W-1 messages
            sent, msgs = [(s // 4 // world) * 4 * (world - 1) for s in sizes], world - 1
        else:  # a ring all-reduce sends 2 (W-1)/W of the buffer in 2 (W-1) messages
            sent = [2 * (world - 1) / world * (s // 4 // world) * 4 * world for s in sizes]
            msgs = 2 * (world - 1)
        fit = fit_link(list(zip(sent, slowest)))
        fits.append(LinkFit(fit.latency_s / msgs, fit.bandwidth_gbs))
    return fits[0], fits[1]


def _step_seconds(model: torch.nn.Module, tokens: torch.Tensor, reps: int) -> float:
    """Least CPU seconds of forward + backward of ``model`` on ``tokens`` (after one warm-up)."""
    best = float("inf")
    for i in range(reps + 1):
        t0 = time.process_time()
        model.loss(tokens, tokens).backward()
        if i:
            best = min(best, time.process_time() - t0)
    return best


def measure_model(cfg: Config, reps: int = 3) -> tuple[float, float]:
    """(TFLOP/s on model FLOPs, fixed seconds per decoder layer and micro-batch) of ``cfg``'s model on
    one rank: the slope and intercept of forward + backward time over micro-batch 1 and 4."""
    from megamoe.model.openmoe import OpenMoEModel
    from megamoe.training.metrics import model_flops_per_token

    model = OpenMoEModel(cfg)
    model.init_weights(0)
    seq = cfg.model.seq_length
    small, large = (_step_seconds(model, torch.zeros(b, seq, dtype=torch.long), reps) for b in (1, 4))
    per_sample = max((large - small) / 3, 1e-9)
    fixed = max(small - per_sample, 0.0)
    return model_flops_per_token(cfg) * seq / per_sample / 1e12, fixed / cfg.model.num_layers


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
        times[layers] = _step_seconds(model, torch.zeros(1, 8, dtype=torch.long), reps)
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


MODEL_LIMIT = 50_000_000  # parameters: a larger model is not run here (memory, minutes)


def _parameters(cfg: Config) -> int:
    from megamoe.model.openmoe import count_parameters

    return count_parameters(cfg)["total"]


def calibrate(world_sizes: Sequence[int] = (2, 4, 8), cfg: Config | None = None,
              log: Callable[[str], None] = print) -> Calibration:
    """Measure everything on this machine (one thread per rank, as training runs)."""
    from megamoe.training.metrics import cpu_peak_tflops

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = cpu_peak_tflops(torch.float32, log=log)
        model_rate = None
        if cfg is not None and _parameters(cfg) < MODEL_LIMIT:
            model_rate, layer_s = measure_model(cfg)
            mb_s = 0.0
            log(f" > the model's forward+backward on one rank: {model_rate * 1e3:.1f} GFLOP/s of model "
                "FLOPs, "
                f"fixed {layer_s * 1e3:.2f} ms per layer and micro-batch")
        else:
            layer_s, mb_s = measure_overheads()
            log(f" > fixed cost per layer forward+backward {layer_s * 1e3:.2f} ms, per micro-batch "
                f"{mb_s * 1e3:.2f} ms")
        adam = measure_optimizer()
        log(f" > AdamW {adam / 1e9:.2f} GB of moments per second")
    finally:
        torch.set_num_threads(previous)
    a2a, ar = {}, {}
    for world in world_sizes:
        a2a[world], ar[world] = measure_links(world)
        log(f" > gloo, {world} forked ranks: all-to-all {a2a[world].latency_s * 1e6:.0f} us + "
            f"{a2a[world].bandwidth_gbs:.2f} GB/s, all-reduce {ar[world].latency_s * 1e6:.0f} us + "
            f"{ar[world].bandwidth_gbs:.2f} GB/s per rank")
    return Calibration(gemm_tflops=peak, model_tflops=model_rate, layer_overhead_s=layer_s,
                       microbatch_overhead_s=mb_s, optimizer_bytes_per_s=adam, cores=os.cpu_count() or 1,
                       alltoall=a2a, allreduce=ar,
                       measured=time.strftime("%Y-%m-%d %H:%M:%S"))
