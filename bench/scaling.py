"""How cost grows: tokens/s and memory of a whole training step against experts, top-k, sequence length
and EP size, one variable at a time from a base config; JSON + one PNG per variable.

    PYTHONPATH=. python bench/scaling.py [--only experts topk seq ep] [--warmup 2] [--reps 5] \
        [--out bench/results] [--plots-only]

Model: OpenMoE (openmoe-tiny's code path) at hidden 256, 4 heads x 64, ffn 512, 2 layers, both MoE
(each with OpenMoE's extra dense MLP), vocab 1024, fp32, mock data, dropless routing, one thread per
rank, AdamW. Base point: 8 experts, top-2, seq 256, EP 1, 1024 tokens per rank and step (micro-batch
= 1024 / seq, one micro-batch per step). Sweeps (one variable changed, the rest at the base):
experts 8..256, top-k 1..8, seq 128..1024 (tokens per step held at 1024, so sequences per step fall as
seq grows), EP 1/2/4 (EP = ranks = DP for the dense layers; fork-started gloo ranks as tests/harness.py
starts them, 1024 tokens PER RANK, so the world's tokens per step grow with EP).

Every point runs in a fresh process (clean RSS), --passes times (all points in turn, then again); a
point keeps the pass with the fastest median step, the one least disturbed by other jobs on a shared
machine. Per point and pass, --warmup steps are dropped and the next --reps give medians of
- step: Trainer's step_time (wall), the slowest rank per iteration -> tokens/s (whole world);
- CPU: time.process_time around Trainer.train_step, summed over ranks -> tokens per CPU-second (the
  work, whoever else shares the cores; a rank waiting in gloo burns no CPU); of it, the optimizer's
  share (finish_grad_sync + grad_norm + step + zero_grad: reduction, norm, AdamW, zeroing);
and per rank (the largest over ranks is reported):
- peak RSS growth (MiB): VmHWM at the end minus VmRSS just before the model is built (HWM reset then
  through /proc/self/clear_refs): everything training needs in host memory, weights, gradient buffers,
  AdamW moments, activations, temporaries and what glibc keeps of freed blocks;
- state (MiB): DistributedOptimizer.memory_bytes(): parameters + fp32 gradient buffers + masters + AdamW
  moments, exact bytes;
- saved activations (MiB): bytes of the distinct tensor storages autograd saves for backward during a
  step (torch.autograd.graph.saved_tensors_hooks), parameters excluded, the largest step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASE = dict(experts=8, topk=2, seq=256, ep=1)
SWEEPS: dict[str, list[int]] = {"experts": [8, 16, 32, 64, 128, 256], "topk": [1, 2, 4, 8],
                                "seq": [128, 256, 512, 1024], "ep": [1, 2, 4]}
LABELS = {"experts": "experts per MoE layer", "topk": "top-k (experts per token)",
          "seq": "sequence length (1024 tokens per step)", "ep": "EP size = ranks (1024 tokens per rank)"}
TOKENS_PER_RANK = 1024
MODEL = ["--model-preset", "openmoe-tiny", "--num-layers", "2", "--hidden-size", "256",
         "--num-attention-heads", "4", "--kv-channels", "64", "--ffn-hidden-size", "512",
         "--moe-layer-freq", "1", "--vocab-size", "1024"]
COMMON = ["--mock-data", "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1000000",
          "--eval-interval", "1000000", "--peak-tflops", "1"]


def point_argv(p: dict[str, int], iters: int) -> list[str]:
    mb = TOKENS_PER_RANK // p["seq"]
    return MODEL + COMMON + ["--num-experts", str(p["experts"]), "--moe-router-topk", str(p["topk"]),
                             "--seq-length", str(p["seq"]), "--micro-batch-size", str(mb),
                             "--global-batch-size", str(mb * p["ep"]),
                             "--expert-model-parallel-size", str(p["ep"]), "--train-iters", str(iters)]


def _vm_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{name} not in /proc/self/status")


def _rank(rank: int, world: int, argv: list[str]) -> dict[str, Any]:
    """One rank of one point (in a fresh process, or a fork-started rank of one)."""
    import torch

    from megamoe.training import loop
    from tests.harness import _train_rank

    torch.set_num_threads(1)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the peak is this run's
    except OSError:
        pass
    rss0 = _vm_kib("VmRSS")
    cpu, opt_cpu, saved, state = [], [], [], {}
    train_step = loop.Trainer.train_step
    spent = [0.0]

    def timed(fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += time.process_time() - t0
        return wrapper

    def measured_step(self: loop.Trainer) -> dict[str, Any]:
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        if not getattr(self.optimizer, "_scaling_timed", False):  # the optimizer's share of the step
            for name in ("finish_grad_sync", "grad_norm", "step", "zero_grad"):
                setattr(self.optimizer, name, timed(getattr(self.optimizer, name)))
            self.optimizer._scaling_timed = True
        spent[0] = 0.0
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                s = t.untyped_storage()
                ptr = s.data_ptr()
                if ptr not in params and ptr not in seen:
                    seen[ptr] = s.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            t0 = time.process_time()
            rec = train_step(self)
            cpu.append(time.process_time() - t0)
        opt_cpu.append(spent[0])
        saved.append(sum(seen.values()))
        state.update(self.optimizer.memory_bytes())
        return rec

    loop.Trainer.train_step = measured_step  # type: ignore[method-assign]
    records = _train_rank(rank, world, argv)
    return dict(step_s=[r["step_time"] for r in records], cpu_s=cpu, opt_cpu_s=opt_cpu, saved_bytes=saved,
                state_bytes=state, peak_rss_kib=_vm_kib("VmHWM") - rss0)


def run_point(p: dict[str, int], warmup: int, reps: int) -> dict[str, Any]:
    """(In a fresh process) train the point, return its medians."""
    from megamoe.arguments import parse_args
    from megamoe.training.metrics import model_flops_per_token

    argv = point_argv(p, warmup + reps)
    if p["ep"] == 1:
        ranks = [_rank(0, 1, argv)]
    else:
        from tests.harness import run_ranks
        ranks = run_ranks(p["ep"], _rank, argv, timeout=300.0)
    n = len(ranks[0]["step_s"])
    keep = range(warmup, n)
    tokens = TOKENS_PER_RANK * p["ep"]
    step = statistics.median(max(r["step_s"][i] for r in ranks) for i in keep)
    cpu_sum = statistics.median(sum(r["cpu_s"][i] for r in ranks) for i in keep)
    cpu_max = statistics.median(max(r["cpu_s"][i] for r in ranks) for i in keep)
    opt_sum = statistics.median(sum(r["opt_cpu_s"][i] for r in ranks) for i in keep)
    mib = 2.0 ** 20
    state = max(ranks, key=lambda r: sum(r["state_bytes"].values()))["state_bytes"]
    return dict(**p, tokens_per_step=tokens, micro_batch=TOKENS_PER_RANK // p["seq"],
                mflop_per_token=model_flops_per_token(parse_args(argv)) / 1e6,
                step_s=step, cpu_s_sum=cpu_sum, cpu_s_busiest=cpu_max, optimizer_cpu_s_sum=opt_sum,
                tokens_per_s=tokens / step, tokens_per_cpu_s=tokens / cpu_sum,
                peak_rss_mib=max(r["peak_rss_kib"] for r in ranks) / 1024,
                state_mib=sum(state.values()) / mib,
                state_breakdown_mib={k: v / mib for k, v in state.items()},
                saved_mib=max(max(r["saved_bytes"]) for r in ranks) / mib,
                step_s_all=[[r["step_s"][i] for i in keep] for r in ranks],
                loadavg_1min=os.getloadavg()[0])


def points(only: list[str]) -> list[tuple[str, dict[str, int]]]:
    out = []
    for var in only:
        for v in SWEEPS[var]:
            out.append((var, dict(BASE, **{var: v})))
    return out


def plot(results: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for var, rows in results.items():
        if not rows:
            continue
        rows = sorted(rows, key=lambda r: r[var])
        x = [r[var] for r in rows]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        a.plot(x, [r["tokens_per_s"] for r in rows], "o-", label="tokens/s (wall, whole world)")
        a.plot(x, [r["tokens_per_cpu_s"] for r in rows], "s--", label="tokens per CPU-second (all ranks)")
        a.set_ylabel("tokens / s")
        a.set_ylim(bottom=0)
        for key, style, label in (("peak_rss_mib", "o-", "peak RSS growth"),
                                  ("state_mib", "s--", "params+grads+AdamW"),
                                  ("saved_mib", "^:", "saved activations")):
            b.plot(x, [r[key] for r in rows], style, label=label)
        b.set_ylabel("MiB per rank (largest rank)")
        if var != "ep":
            for ax in (a, b):
                ax.set_xscale("log", base=2)
        if var == "experts":
            b.set_yscale("log", base=2)
        else:
            b.set_ylim(bottom=0)
        for ax in (a, b):
            ax.set_xticks(x)
            ax.set_xticklabels([str(v) for v in x])
            ax.set_xlabel(LABELS[var])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        base = {k: v for k, v in BASE.items() if k != var}
        fig.suptitle(f"{var} sweep (" + ", ".join(f"{k} {v}" for k, v in base.items()) +
                     "; hidden 256, ffn 512, 2 MoE layers, fp32, 1 thread/rank)", fontsize=9)
        fig.tight_layout()
        path = out / f"scaling_{var}.png"
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| sweep | E | k | seq | EP | tokens/step | MFLOP/token | step ms | CPU ms (optimizer) | "
             "tokens/s | tokens/CPU-s | peak RSS MiB | state MiB | saved act. MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for var, rows in results.items():
        for r in sorted(rows, key=lambda r: r[var]):
            lines.append(f"| {var} | {r['experts']} | {r['topk']} | {r['seq']} | {r['ep']} | "
                         f"{r['tokens_per_step']} | {r['mflop_per_token']:.1f} | {r['step_s'] * 1e3:.0f} | "
                         f"{r['cpu_s_sum'] * 1e3:.0f} ({r['optimizer_cpu_s_sum'] * 1e3:.0f}) | "
                         f"{r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | {r['peak_rss_mib']:.0f} | "
                         f"{r['state_mib']:.1f} | {r['saved_mib']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=tuple(SWEEPS), default=list(SWEEPS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--passes", type=int, default=2,
                    help="run every point this many times (in turn); keep the pass with the fastest median")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--plots-only", action="store_true", help="redraw the PNGs from the JSON")
    ap.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: one point, JSON out
    args = ap.parse_args()
    if args.point:
        print(json.dumps(run_point(json.loads(args.point), args.warmup, args.reps)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "scaling.json"
    if args.plots_only:
        data = json.loads(json_path.read_text())
        print("\n".join(str(p) for p in plot(data["results"], out)))
        print(table(data["results"]))
        return 0

    t_start = time.time()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    unique: dict[tuple, dict[str, int]] = {}  # the base point is shared by the sweeps: measured once a pass
    for _, p in points(args.only):
        unique.setdefault(tuple(sorted(p.items())), p)
    runs: dict[tuple, list[dict[str, Any]]] = {key: [] for key in unique}
    results: dict[str, list[dict[str, Any]]] = {}
    for pass_ in range(args.passes):
        for key, p in unique.items():
            t0 = time.time()
            proc = subprocess.run([sys.executable, __file__, "--point", json.dumps(p), "--warmup",
                                   str(args.warmup), "--reps", str(args.reps)],
                                  env=env, capture_output=True, text=True, timeout=420)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
                raise SystemExit(f"point {p} failed (exit {proc.returncode})")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[key].append(r)
            print(f"[{time.time() - t_start:6.0f} s] pass {pass_ + 1} {p}: {r['step_s'] * 1e3:.0f} ms/step, "
                  f"{r['tokens_per_s']:.0f} tok/s, {r['tokens_per_cpu_s']:.0f} tok/CPU-s (optimizer "
                  f"{r['optimizer_cpu_s_sum'] * 1e3:.0f} of {r['cpu_s_sum'] * 1e3:.0f} ms CPU), peak RSS "
                  f"{r['peak_rss_mib']:.0f} MiB, state {r['state_mib']:.0f} MiB, saved "
                  f"{r['saved_mib']:.0f} MiB, load {r['loadavg_1min']:.1f} ({time.time() - t0:.0f} s)",
                  flush=True)
            # each point: the pass with the fastest median step (the least disturbed by other jobs)
            results = {var: [] for var in args.only}
            for var, q in points(args.only):
                measured = runs[tuple(sorted(q.items()))]
                if measured:
                    best = min(measured, key=lambda m: m["step_s"])
                    results[var].append(dict(best, passes_step_s=[m["step_s"] for m in measured]))
            write_json(json_path, dict(base=BASE, sweeps={v: SWEEPS[v] for v in args.only},
                                       tokens_per_rank=TOKENS_PER_RANK, model=MODEL, warmup=args.warmup,
                                       reps=args.reps, passes=args.passes, cpus=os.cpu_count(),
                                       torch_threads_per_rank=1,
                                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                       results=results))
    for p in plot(results, out):
        print(p)
    print(table(results))
    print(f"total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
