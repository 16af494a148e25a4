"""MFU of whole training steps against the robust CPU peak, for three model configs.

    PYTHONPATH=. python bench/mfu.py [--iters 8] [--warmup 2] [--peak-reps 5] [--only NAME ...]
        [--json out.json]

One process, one rank, one thread (as each rank trains), fp32, mock data. The peak is measured here,
fresh (the stored per-machine figure is neither read nor written): the largest rate of --peak-reps
2048^3 GEMMs timed on the CPU clock (megamoe.training.metrics.robust_peak_tflops) before the first
model and again after the last, the larger of the two, so every row divides by the same figure. Each
model trains --iters iterations in process (megamoe.training.run.pretrain); the first --warmup are
dropped (first shapes, allocator) and the rest give medians of
- step: Trainer's step_time (wall) -> tokens/s, TFLOP/s and MFU as the training log reports them;
- CPU: the step's CPU seconds (time.process_time around Trainer.train_step, the peak's clock) ->
  "MFU (CPU)", what the step reaches while it has the core: on a shared machine the wall MFU also
  counts the time other processes held the core, the CPU one does not.
FLOPs per token are model_flops_per_token (Megatron's count with the causal attention half; see
docs/ARCHITECTURE.md, "MFU").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megamoe.arguments import parse_args  # noqa: E402
from megamoe.parallel.mesh import ParallelMesh  # noqa: E402
from megamoe.training import loop  # noqa: E402
from megamoe.training.metrics import (  # noqa: E402
    model_flops_per_token,
    robust_peak_tflops,
    write_json_aside,  # noqa: E402
)
from megamoe.training.run import pretrain  # noqa: E402

COMMON = ["--mock-data", "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1000000",
          "--eval-interval", "1000000"]
MODELS: dict[str, list[str]] = {
    # as the unit tests train it (tests/harness.py TINY_ARGS)
    "openmoe-tiny": ["--model-preset", "openmoe-tiny", "--seq-length", "32", "--micro-batch-size", "2",
                     "--global-batch-size", "8"],
    # openmoe-tiny's layout (4 layers, every 2nd MoE, 8 experts top-2) at hidden 512, I = 1024, the
    # shapes of bench/moe_layer.py's MoE layer, seq 256 x 4
    "hidden-512": ["--model-preset", "openmoe-tiny", "--hidden-size", "512", "--num-attention-heads", "8",
                   "--kv-channels", "64", "--ffn-hidden-size", "1024", "--seq-length", "256",
                   "--micro-batch-size", "4", "--global-batch-size", "4"],
    # examples/quickstart.sh's model and batch (on 1 rank here, not 2 with EP 2)
    "quickstart": ["--model-preset", "openmoe-tiny", "--vocab-size", "2048", "--seq-length", "128",
                   "--micro-batch-size", "4", "--global-batch-size", "16"],
}


def old_peak() -> float:
    """The start-up figure this replaces: the median wall-clock rate of five 1024^3 GEMMs."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2.0 * 1024**3 / statistics.median(times) / 1e12


def run_model(argv: list[str]) -> list[dict[str, Any]]:
    cfg = parse_args(argv)
    mesh = ParallelMesh.from_config(cfg.parallel, 1, 0)
    mesh.build_groups()
    return pretrain(cfg, mesh)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first iterations left out of the medians")
    p.add_argument("--peak-reps", type=int, default=5)
    p.add_argument("--only", nargs="+", choices=tuple(MODELS), default=tuple(MODELS))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.iters <= args.warmup:
        p.error("--iters must exceed --warmup")
    torch.set_num_threads(1)
    torch.manual_seed(0)

    # CPU seconds of every train_step (one rank, one thread: nothing else in the process computes)
    cpu_seconds: list[float] = []
    train_step = loop.Trainer.train_step

    def timed_step(self: loop.Trainer) -> dict[str, Any]:
        t0 = time.process_time()
        rec = train_step(self)
        cpu_seconds.append(time.process_time() - t0)
        return rec

    loop.Trainer.train_step = timed_step  # type: ignore[method-assign]

    peaks, olds = [robust_peak_tflops(reps=args.peak_reps)], [old_peak()]
    results = []
    for name in args.only:
        cpu_seconds.clear()
        argv = MODELS[name] + COMMON + ["--train-iters", str(args.iters), "--peak-tflops", "1"]
        records = run_model(argv)
        cfg = parse_args(argv)
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        flops = model_flops_per_token(cfg)
        step = statistics.median(r["step_time"] for r in records[args.warmup:])
        cpu = statistics.median(cpu_seconds[args.warmup:])
        results.append(dict(model=name, tokens_per_step=tokens, gflop_per_token=flops / 1e9,
                            step_s=step, cpu_s=cpu, tokens_per_s=tokens / step,
                            tflops=flops * tokens / step / 1e12, tflops_cpu=flops * tokens / cpu / 1e12,
                            final_loss=records[-1]["lm_loss"]))
        print(f"{name}: {step * 1e3:.1f} ms/step ({cpu * 1e3:.1f} ms CPU)", flush=True)
    peaks.append(robust_peak_tflops(reps=args.peak_reps))
    olds.append(old_peak())
    peak = max(peaks)
    for r in results:
        r["mfu"], r["mfu_cpu"] = r["tflops"] / peak, r["tflops_cpu"] / peak

    print(f"\npeak: {peak * 1e3:.1f} GFLOP/s (largest of {args.peak_reps} 2048^3 fp32 GEMMs on 1 thread, CPU "
          f"clock, before the models: {peaks[0] * 1e3:.1f}, after: {peaks[1] * 1e3:.1f}); the old start-up "
          f"figure (median wall-clock rate of five 1024^3 GEMMs) before / after: {olds[0] * 1e3:.1f} / "
          f"{olds[1] * 1e3:.1f}")
    print(f"iterations {args.warmup + 1}..{args.iters}, medians\n")
    print("| model | tokens/step | MFLOP/token | step (ms) | CPU (ms) | tokens/s | GFLOP/s | MFU | "
          "MFU (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['tokens_per_step']} | {r['gflop_per_token'] * 1e3:.2f} | "
              f"{r['step_s'] * 1e3:.1f} | {r['cpu_s'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['tflops'] * 1e3:.1f} | {r['mfu'] * 100:.1f}% | {r['mfu_cpu'] * 100:.1f}% |")
    if args.json:
        write_json_aside(args.json, dict(peak_tflops=peak, peaks=peaks, old_peaks=olds, iters=args.iters,
                                         warmup=args.warmup, results=results), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
