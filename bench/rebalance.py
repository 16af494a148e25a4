"""The expert rebalancer's gain, measured in one run: EP-rank load max/mean, MoE layer time and whole step
time before and after one rebalance, on routing skewed on purpose.

    PYTHONPATH=. python bench/rebalance.py [--world 4 2] [--skew 1.0] [--steps 12] [--repeat 3]
        [--micro-batch 8] [--output out.json]

Per world size W (EP = W, one micro-batch per rank, fork-started gloo ranks, one thread each, fp32, mock
data): an openmoe-tiny-shaped model made expert-heavy (hidden 256, ffn 512, 2 layers, both MoE, 16
experts top-2, seq 128) trains 2 * steps - 1 iterations with --moe-rebalance-interval steps,
--moe-rebalance-window steps and --moe-rebalance-min-gain 0, so the only rebalance runs right after
iteration `steps` (the next would be at 2 * steps). Medians are over iterations 3..steps ("before") and
steps + 3..2 * steps - 1 ("after"): the first two iterations of each phase are warm-up (allocator,
first shapes; after the move every rank's expert GEMMs have new sizes). Each ratio compares the two
phases of one run; with --repeat R the tables give the median over R runs of every value and ratio
(the world sizes alternate, so a burst of other processes' load hits both alike).

The skew (bench-only; nothing in megamoe/ changes): megamoe.moe.layer.route is replaced, before the ranks
fork, by a wrapper adding -skew * log(1 + e) * std_e(logits[t]) to token t's logit of expert e, a
Zipf-like preference (weight ~ 1/(1 + e)^skew at unit router noise) for the low expert ids, which the
default contiguous placement puts on EP rank 0. Scaling by each token's own logit spread keeps the skew
the same as the router weights grow. The bias is a constant (no gradient of its own); the router's
aux and z losses see the skewed logits.

What is timed, per rank and step (summed over MoE layers and micro-batches), on two clocks: wall
(time.perf_counter) and CPU (time.thread_time of the rank's main thread, where CPU autograd runs too;
for the whole step time.process_time, gloo's threads included). Waiting for a peer in gloo costs no CPU
(measured: a light rank's MoE layer span is 0.03 s CPU in 0.7 s wall), so a rank's CPU seconds are its
own work, whatever else shares the cores.
- MoE layer: MoELayer.forward (forward pre-hook -> forward hook) plus its backward, from the moment the
  gradient reaches the layer output to the moment the gradient of its input is complete (identity
  autograd nodes stamped on the output and the input; CPU autograd runs the nodes created in between,
  the layer's, between them). It includes router, permutation, both all-to-alls (so, in wall time,
  the wait for the slowest EP rank) and the expert weights' gradient-buffer hooks.
- experts: the same for the layer's GroupedExperts module alone (its GEMMs and activation, no
  communication): the per-rank compute that the placement moves around.
- rows: token rows the rank's experts processed (the measured per-rank load; its max/mean over ranks).
- step: Trainer's step_time (forward, backward, gradient reduction, optimizer step; the rebalance runs
  after it and reports its own seconds), the slowest rank's; and the step's CPU seconds without the
  rebalance, of the busiest rank (what the step would take with a free core per rank, waits aside: the
  same rank is the busiest in every layer) and summed over ranks (the total work, what the step takes
  when the ranks share fewer cores than they are).
The planner's own view, the window's EP-rank load max/mean before and after (worst MoE layer), and the
experts / bytes / seconds moved come from the rebalance record; the window's per-expert loads (logged
at iteration `steps`) give the best max/mean any placement could reach (placement_plan.slot_lower_bound).

On fewer cores than ranks the ranks time-share the cores: see bench/README.md, "Expert rebalancer:
measured gain", for what that does to the step-time ratio.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import megamoe.moe.layer as moe_layer  # noqa: E402
from megamoe.moe.placement_plan import slot_lower_bound  # noqa: E402
from megamoe.moe.router import Routing  # noqa: E402
from megamoe.training import loop  # noqa: E402
from megamoe.training.metrics import write_json_aside  # noqa: E402
from tests.harness import TINY_ARGS, _train_rank, run_ranks  # noqa: E402

WARMUP = 2  # iterations skipped at the start of each phase


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, nargs="+", default=[4, 2],
                   help="ranks per run (EP = world); one run per value")
    p.add_argument("--skew", type=float, default=1.0,
                   help="Zipf exponent of the routing bias towards low expert ids (0: unskewed)")
    p.add_argument("--steps", type=int, default=12,
                   help="iterations before the rebalance (and the rebalance interval); steps - 1 follow it")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per world size; the tables give medians over runs (other load comes and goes)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--layers", type=int, default=2, help="decoder layers, every one an MoE layer")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences of 128 tokens per rank and step")
    p.add_argument("--output", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.steps < WARMUP + 2:
        p.error(f"--steps must be >= {WARMUP + 2} (two warm-up iterations per phase, then some to time)")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if any(w < 2 or args.experts % w for w in args.world):
        p.error(f"every --world must be >= 2 and divide --experts {args.experts}")
    return args


# --- the bench-only routing skew -------------------------------------------------------------------

def install_skew(skew: float) -> None:
    """Replace the router MoELayer.forward calls (megamoe.moe.layer.route) by one with skewed logits;
    done in the parent before the ranks fork, so every rank routes through it."""
    plain = moe_layer.route

    def skewed_route(logits: torch.Tensor, *args: Any, **kwargs: Any) -> Routing:
        # only the logits change; the rest passes through whatever route() takes
        ranks = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
        spread = logits.detach().std(dim=-1, keepdim=True)  # [T, 1]: this token's router noise
        return plain(logits - skew * spread * torch.log1p(ranks), *args, **kwargs)

    moe_layer.route = skewed_route


# --- timing of a module's forward + backward ------------------------------------------------------

class _Stamp(torch.autograd.Function):
    """Identity whose backward notes when the gradient got here, as (wall, this thread's CPU) seconds.
    CPU autograd runs every node on the thread that called backward, so both clocks are the span's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, box: list[tuple[float, float]]) -> torch.Tensor:
        ctx.box = box
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.box.append((time.perf_counter(), time.thread_time()))
        return grad, None


class SpanTimer:
    """Forward + backward time of one module, summed over its calls since reset(): wall seconds, and
    this thread's CPU seconds (what the rank computed, whether or not it had a core all along)."""

    def __init__(self, module: nn.Module) -> None:
        self.forward_s = self.forward_cpu_s = 0.0
        self.calls: list[tuple[list, list]] = []  # ([output reached], [input done]) per call
        self.rows = 0
        self._start, self._start_cpu, self._timed = 0.0, 0.0, False
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def reset(self) -> None:
        self.forward_s = self.forward_cpu_s = 0.0
        self.calls, self.rows = [], 0

    def _pre(self, _module: nn.Module, args: tuple) -> tuple:
        self._start, self._start_cpu = time.perf_counter(), time.thread_time()
        x, *rest = args
        self.rows += x.shape[0]  # MoELayer: [b, s, H] (unused); GroupedExperts: [N_local, H] rows
        self._timed = torch.is_grad_enabled() and x.requires_grad
        if not self._timed:
            return args
        self.calls.append(([], []))
        # the backward of this node runs once the input's gradient is complete: the span's end
        return (_Stamp.apply(x, self.calls[-1][1]), *rest)

    def _post(self, _module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        self.forward_s += time.perf_counter() - self._start
        self.forward_cpu_s += time.thread_time() - self._start_cpu
        if not (self._timed and out.requires_grad):
            return out
        return _Stamp.apply(out, self.calls[-1][0])  # its backward: the span's start

    def seconds(self) -> tuple[float, float]:
        """(wall, CPU) forward + backward seconds of every call since reset (a call whose backward
        never ran adds its forward only)."""
        spans = [(done[0], reached[0]) for reached, done in self.calls if reached and done]
        return (self.forward_s + sum(d[0] - r[0] for d, r in spans),
                self.forward_cpu_s + sum(d[1] - r[1] for d, r in spans))


def install_probes() -> None:
    """Wrap Trainer.train_step (before the fork): per step, add this rank's MoE layer and expert
    seconds and expert rows to the record (keys bench_*)."""
    plain = loop.Trainer.train_step

    def timed_step(self: loop.Trainer) -> dict[str, Any]:
        if not hasattr(self, "_bench_timers"):
            layers = self.model.moe_layers().values()
            self._bench_timers = ([SpanTimer(m) for m in layers], [SpanTimer(m.experts) for m in layers])
            self._bench_rebalance_cpu = [0.0, 0.0]
            if self.rebalancer is not None:  # its CPU time is not the step's: subtracted below
                rebalance, spent = self.rebalancer.rebalance, self._bench_rebalance_cpu

                def timed_rebalance() -> dict[str, Any]:
                    thread, process = time.thread_time(), time.process_time()
                    out = rebalance()
                    spent[0] += time.thread_time() - thread
                    spent[1] += time.process_time() - process
                    return out

                self.rebalancer.rebalance = timed_rebalance  # type: ignore[method-assign]
        layer_timers, expert_timers = self._bench_timers
        for timer in (*layer_timers, *expert_timers):
            timer.reset()
        self._bench_rebalance_cpu[:] = [0.0, 0.0]
        thread, process = time.thread_time(), time.process_time()
        rec = plain(self)
        thread, process = time.thread_time() - thread, time.process_time() - process
        rec.update(bench_moe_s=sum(t.seconds()[0] for t in layer_timers),
                   bench_moe_cpu_s=sum(t.seconds()[1] for t in layer_timers),
                   bench_experts_s=sum(t.seconds()[0] for t in expert_timers),
                   bench_experts_cpu_s=sum(t.seconds()[1] for t in expert_timers),
                   bench_step_thread_cpu_s=thread - self._bench_rebalance_cpu[0],
                   bench_step_process_cpu_s=process - self._bench_rebalance_cpu[1],
                   bench_rows=sum(t.rows for t in expert_timers))
        return rec

    loop.Trainer.train_step = timed_step  # type: ignore[method-assign]


# --- one run ---------------------------------------------------------------------------------------

def train_argv(world: int, args: argparse.Namespace) -> list[str]:
    return [*TINY_ARGS,
            "--num-layers", str(args.layers), "--moe-layer-freq", "1", "--hidden-size", str(args.hidden),
            "--num-attention-heads", "4", "--kv-channels", str(args.hidden // 4),
            "--ffn-hidden-size", str(args.ffn), "--num-experts", str(args.experts), "--seq-length", "128",
            "--micro-batch-size", str(args.micro_batch), "--global-batch-size", str(args.micro_batch * world),
            "--train-iters", str(2 * args.steps - 1), "--lr", "1e-3", "--lr-warmup-iters", "1",
            "--peak-tflops", "1",  # no peak GEMM measurement at start-up (MFU is not reported here)
            "--expert-model-parallel-size", str(world),
            "--moe-rebalance-interval", str(args.steps), "--moe-rebalance-window", str(args.steps),
            "--moe-rebalance-min-gain", "0",
            "--log-interval", str(args.steps)]  # iteration `steps` logs the window the planner saw


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def measure(world: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run: its per-step values, medians per phase and their ratios."""
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    per_rank = run_ranks(world, _train_rank, train_argv(world, args), None, timeout=240.0)
    wall = time.perf_counter() - start
    steps = len(per_rank[0])
    rebalance = [r for r in per_rank[0] if "moe_experts_moved" in r]
    assert [r["iteration"] for r in rebalance] == [args.steps], "expected exactly one rebalance"
    rec = rebalance[0]

    def per_step(i: int) -> dict[str, float]:
        ranks = [records[i] for records in per_rank]

        def over_ranks(key: str) -> list[float]:
            return [r[key] for r in ranks]

        rows, expert_cpu = over_ranks("bench_rows"), over_ranks("bench_experts_cpu_s")
        return dict(rank_rows_max_over_mean=max(rows) / statistics.mean(rows),
                    experts_cpu_busiest_s=max(expert_cpu),
                    experts_cpu_max_over_mean=max(expert_cpu) / statistics.mean(expert_cpu),
                    experts_slowest_s=max(over_ranks("bench_experts_s")),
                    moe_cpu_busiest_s=max(over_ranks("bench_moe_cpu_s")),
                    moe_s=max(over_ranks("bench_moe_s")),
                    step_cpu_busiest_s=max(over_ranks("bench_step_process_cpu_s")),
                    step_cpu_total_s=sum(over_ranks("bench_step_process_cpu_s")),
                    step_s=max(over_ranks("step_time")))

    steps_data = [per_step(i) for i in range(steps)]
    raw = {key: [[records[i][key] for records in per_rank] for i in range(steps)]  # [step][rank]
           for key in ("step_time", "bench_moe_s", "bench_moe_cpu_s", "bench_experts_s",
                       "bench_experts_cpu_s", "bench_step_thread_cpu_s", "bench_step_process_cpu_s",
                       "bench_rows")}
    phases = {"before": steps_data[WARMUP:args.steps], "after": steps_data[args.steps + WARMUP:]}
    summary = {name: {key: _median([s[key] for s in data]) for key in steps_data[0]}
               for name, data in phases.items()}
    summary["before"]["planner_rank_load_max_over_mean"] = rec["moe_rank_imbalance_before"]
    summary["after"]["planner_rank_load_max_over_mean"] = rec["moe_rank_imbalance_after"]
    ratios = {key: summary["after"][key] / summary["before"][key] for key in summary["before"]}
    return dict(world=world, ep=world, steps_timed={k: len(v) for k, v in phases.items()},
                before=summary["before"], after=summary["after"], after_over_before=ratios,
                rebalance=dict(experts_moved=rec["moe_experts_moved"], bytes=rec["moe_rebalance_bytes"],
                               seconds=rec["moe_rebalance_seconds"],
                               rank_load_before_per_layer=rec["moe_rank_load_before"],
                               rank_load_after_per_layer=rec["moe_rank_load_after"],
                               # the best any placement of whole experts could do on those loads
                               slot_lower_bound_per_layer=[slot_lower_bound(loads, world)
                                                           for loads in rec["moe_expert_load"]]),
                per_step=steps_data, per_rank=raw, wall_s=wall,
                load_average=[load_start, os.getloadavg()[0]])  # other processes' share of the cores


ROWS = [  # (key, label, format)
    ("planner_rank_load_max_over_mean", "EP-rank load max/mean, planner window (worst layer)", "{:.3f}"),
    ("rank_rows_max_over_mean", "EP-rank load max/mean, measured (expert rows per rank)", "{:.3f}"),
    ("experts_cpu_max_over_mean", "expert fwd+bwd CPU time, max/mean over ranks", "{:.3f}"),
    ("experts_cpu_busiest_s", "expert fwd+bwd CPU s/step, busiest rank", "{:.4f}"),
    ("moe_cpu_busiest_s", "MoE layer fwd+bwd CPU s/step, busiest rank", "{:.4f}"),
    ("moe_s", "MoE layer fwd+bwd wall s/step, slowest rank", "{:.4f}"),
    ("step_cpu_busiest_s", "step CPU s, busiest rank (~ step on a core per rank)", "{:.4f}"),
    ("step_cpu_total_s", "step CPU s, sum over ranks (total work)", "{:.4f}"),
    ("step_s", "whole step wall s (step_time)", "{:.4f}"),
]


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs of one world size: per metric the median over runs of the phase medians and of
    the per-run ratios (each ratio compares two phases of the same run)."""
    def over_runs(part: str) -> dict[str, float]:
        return {key: statistics.median(run[part][key] for run in runs) for key in runs[0][part]}

    reb = runs[0]["rebalance"]
    return dict(world=runs[0]["world"], runs=len(runs), steps_timed=runs[0]["steps_timed"],
                before=over_runs("before"), after=over_runs("after"),
                after_over_before=over_runs("after_over_before"),
                experts_moved=reb["experts_moved"], bytes=reb["bytes"],  # the same in every run
                planned_per_layer=reb["rank_load_after_per_layer"],
                bound_per_layer=reb["slot_lower_bound_per_layer"],
                rebalance_seconds=statistics.median(run["rebalance"]["seconds"] for run in runs),
                load_average=[min(min(run["load_average"]) for run in runs),
                              max(max(run["load_average"]) for run in runs)])


def table(result: dict[str, Any]) -> str:
    w, load = result["world"], result["load_average"]
    lines = [f"**{w} ranks, EP{w}**, {os.cpu_count()} cores, median of {result['runs']} runs "
             f"({result['steps_timed']['before']} steps before, {result['steps_timed']['after']} after in "
             f"each; 1-min load average {load[0]:.1f}-{load[1]:.1f}); the rebalance moved "
             f"{result['experts_moved']} experts, {result['bytes'] / 2**20:.1f} MiB in "
             f"{result['rebalance_seconds']:.3f} s; planned max/mean per layer "
             f"{', '.join(f'{x:.3f}' for x in result['planned_per_layer'])}, slot-aware lower bound "
             f"{', '.join(f'{x:.3f}' for x in result['bound_per_layer'])}", "",
             "| metric | before | after | after/before |", "|---|---:|---:|---:|"]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | {fmt.format(result['before'][key])} | {fmt.format(result['after'][key])} "
                     f"| {result['after_over_before'][key]:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    install_skew(args.skew)
    install_probes()
    runs: dict[int, list[dict[str, Any]]] = {world: [] for world in args.world}
    for _ in range(args.repeat):  # world sizes alternate: a burst of other load hits both alike
        for world in args.world:
            runs[world].append(measure(world, args))
    results = [dict(combine(world_runs), each_run=world_runs) for world_runs in runs.values()]
    for result in results:
        print(table(result) + "\n", flush=True)
    if args.output:
        write_json_aside(args.output, dict(config=vars(args), cpu_count=os.cpu_count(), results=results),
                         indent=1)


if __name__ == "__main__":
    main()
