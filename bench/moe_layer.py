"""Forward+backward of one MoE layer, side by side in one process (method: bench/README.md).

Candidates, interleaved round-robin per repetition so machine noise hits them all alike:

- ours-grouped / ours-loop: ``megamoe.moe.layer.MoELayer`` with ``grouped_gemm`` True / False;
- hf-eager / hf-grouped_mm: transformers' ``MixtralSparseMoeBlock`` with the two experts
  implementations (``config._experts_implementation``). Mixtral's SwiGLU expert has 3*H*I_m
  parameters against OpenMoE's 4*H*I, so it gets I_m = 4*I/3 rounded to a multiple of 8 (about
  the same FLOPs; GFLOP/s uses each implementation's own count);
- deepspeed: DeepSpeed's ``deepspeed.moe.layer.MoE`` (GShard-style TopKGate + MOELayer, one rank, gloo
  process group of size 1, ep_size 1) with an OpenMoE-shaped expert (x1 * silu(x2) * up, 4*H*I
  parameters, plain torch ops), the same router weights, k=2, ``drop_tokens=False`` (dropless like
  ours: capacity = the busiest expert's count, every expert's buffer padded to it) and
  ``top2_2nd_expert_sampling=False`` (the 2nd expert is the 2nd-largest probability, as ours; the
  default samples it with Gumbel noise). DeepSpeed renormalises the top-2 weights (OpenMoE does not);
  checked against ours built with ``renormalize=True`` and the same weights. Bench-only dependency,
  imported here only when the candidate runs (``pip install deepspeed``; skipped if missing);
- dense-ceiling: the same expert FLOPs as three plain GEMMs with autograd (x[T*k, H] @ [H, 2I],
  x @ [H, I], [T*k, I] @ [I, H]) and nothing else: what the layer would cost with free routing.

FLOPs are routing-independent: 6 (fwd+bwd) * T*k * (params per expert); the router's
6*T*H*E is < 1% and not counted. Run: ``PYTHONPATH=. python bench/moe_layer.py [--json out.json]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from megamoe.config import MoEConfig
from megamoe.model.init import init_model_weights
from megamoe.moe.layer import MoELayer, MoEStats
from megamoe.training.metrics import write_json_aside  # noqa: E402

Step = Callable[[], None]


@dataclass
class Result:
    name: str
    flops: float  # per fwd+bwd
    times_ms: list[float]
    cpu_ms: list[float] = field(default_factory=list)  # process CPU time (one thread: the step's own)

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else float("nan")

    def quantile(self, q: float) -> float:
        ts = sorted(self.times_ms)
        return ts[min(len(ts) - 1, max(0, round(q * (len(ts) - 1))))]

    @property
    def gflops(self) -> float:
        return self.flops / (self.median * 1e-3) / 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--skip", default="", help="comma-separated candidate names to leave out")
    p.add_argument("--profile", action="store_true",
                   help="after timing, break ours-grouped down by phase and by op")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    return p.parse_args(argv)


def backward_step(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> Step:
    """One fwd+bwd of ``module`` on a leaf ``x`` with a fixed upstream gradient."""
    params = list(module.parameters())

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(gy)

    return step


def make_ours(args: argparse.Namespace, grouped: bool) -> MoELayer:
    cfg = MoEConfig(num_experts=args.experts, router_topk=args.topk, grouped_gemm=grouped)
    layer = MoELayer(1, args.hidden, args.ffn, cfg, 0.02, 0.01, MoEStats())
    init_model_weights(layer, args.seed)
    return layer.train()


def mixtral_ffn(ffn: int) -> int:
    """Mixtral intermediate size with ~the FLOPs of an OpenMoE expert of width ``ffn``: 4*I/3 rounded
    to a multiple of 8 (torch._grouped_mm on CPU needs 16-byte strides; GFLOP/s absorbs the <1%)."""
    return 8 * round(4 * ffn / 24)


def make_mixtral(args: argparse.Namespace, impl: str, gate_weight: torch.Tensor) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=args.hidden, intermediate_size=mixtral_ffn(args.ffn),
                        num_local_experts=args.experts, num_experts_per_tok=args.topk,
                        router_jitter_noise=0.0)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        block.gate.weight.copy_(gate_weight)  # same routing decisions as ours
        block.experts.gate_up_proj.normal_(0.0, 0.02, generator=gen)
        block.experts.down_proj.normal_(0.0, 0.01, generator=gen)
    return block.train()


class OpenMoEExpert(nn.Module):
    """One OpenMoE gated FFN as a DeepSpeed user would write it: x1 * silu(x2) * up, then down."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.wi_gate = nn.Linear(hidden, 2 * ffn, bias=False)
        self.wi_up = nn.Linear(hidden, ffn, bias=False)
        self.wo = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.wi_gate(x).chunk(2, dim=-1)
        return self.wo(x1 * torch.nn.functional.silu(x2) * self.wi_up(x))


def init_gloo_single() -> None:
    """A one-rank gloo process group through deepspeed.comm (its MoE builds its expert groups there)."""
    import os

    import deepspeed

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(29500 + os.getpid() % 20000)),
                       ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)


class DeepSpeedMoE(nn.Module):
    """deepspeed.moe.layer.MoE returning only the output (its l_aux / counts are dropped, as the other
    candidates' router losses are not in the timed gradient either)."""

    def __init__(self, args: argparse.Namespace, ours: MoELayer) -> None:
        super().__init__()
        from deepspeed.moe.layer import MoE

        init_gloo_single()
        self.moe = MoE(args.hidden, OpenMoEExpert(args.hidden, args.ffn), num_experts=args.experts,
                       ep_size=1, k=args.topk, drop_tokens=False, use_rts=False,
                       top2_2nd_expert_sampling=False)
        self.moe.set_deepspeed_parallelism()
        with torch.no_grad():  # same router and expert weights as ours (nn.Linear stores [out, in])
            self.moe.deepspeed_moe.gate.wg.weight.copy_(ours.gate_weight)
            for e, mod in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                mod.wi_gate.weight.copy_(ours.experts.wi_gate[e].t())
                mod.wi_up.weight.copy_(ours.experts.wi_up[e].t())
                mod.wo.weight.copy_(ours.experts.wo[e].t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)[0]


def make_deepspeed(args: argparse.Namespace, ours: MoELayer, x: torch.Tensor) -> nn.Module | None:
    """DeepSpeed's layer with ours' weights, checked against ours with renormalised top-k weights
    (DeepSpeed's top-2 combine); None (with a note) when deepspeed is not installed."""
    try:
        import deepspeed.moe.layer  # noqa: F401
    except Exception as exc:  # ImportError, or an accelerator probe failing
        print(f"deepspeed candidate skipped: {type(exc).__name__}: {exc}")
        return None
    block = DeepSpeedMoE(args, ours).train()
    cfg = MoEConfig(num_experts=args.experts, router_topk=args.topk)
    ref = MoELayer(1, args.hidden, args.ffn, cfg, 0.02, 0.01, MoEStats(), renormalize=True)
    ref.load_state_dict(ours.state_dict())
    xs = x[:, :512].detach()
    with torch.no_grad():
        torch.testing.assert_close(block(xs), ref(xs), rtol=1e-4, atol=1e-5)
        counts = block.moe(x)[2]
    print(f"deepspeed: dropless capacity = busiest expert's {int(counts.max())} rows, so its experts run "
          f"{args.experts * int(counts.max())} rows for {args.tokens * args.topk} assignments "
          f"({args.experts * int(counts.max()) / (args.tokens * args.topk):.2f}x; GFLOP/s counts the "
          "assignments)")
    return block


def dense_ceiling_step(args: argparse.Namespace) -> Step:
    """Three GEMMs of the expert FLOPs, fwd+bwd by autograd on plain tensors."""
    gen = torch.Generator().manual_seed(args.seed)
    rows, h, i = args.tokens * args.topk, args.hidden, args.ffn

    def leaf(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).requires_grad_()

    x, w_gate, w_up, w_out = leaf(rows, h), leaf(h, 2 * i), leaf(h, i), leaf(i, h)
    g_gate, g_out = torch.randn(rows, 2 * i, generator=gen), torch.randn(rows, h, generator=gen)

    def step() -> None:
        for t in (x, w_gate, w_up, w_out):
            t.grad = None
        gate, up = x @ w_gate, x @ w_up
        torch.autograd.backward([gate, up @ w_out], [g_gate, g_out])

    return step


def expert_flops(args: argparse.Namespace, params_per_expert: int) -> float:
    return 6.0 * args.tokens * args.topk * params_per_expert


def check_ours(grouped: MoELayer, loop: MoELayer, x: torch.Tensor, gy: torch.Tensor) -> None:
    """Grouped and loop paths agree on outputs and gradients (cheap: a slice of the tokens)."""
    xs = x[:, :512].detach()
    outs, grads = [], []
    for layer in (grouped, loop):
        xi = xs.clone().requires_grad_()
        y = layer(xi)
        y.backward(gy[:, :512])
        outs.append(y.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in layer.parameters()])
        layer.zero_grad(set_to_none=True)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def check_mixtral(blocks: list[nn.Module], x: torch.Tensor) -> None:
    """Both transformers implementations compute the same function (same weights)."""
    if len(blocks) < 2:
        return
    xs = x[:, :512].detach()
    blocks[1].load_state_dict(blocks[0].state_dict())
    with torch.no_grad():
        torch.testing.assert_close(blocks[0](xs), blocks[1](xs), rtol=1e-4, atol=1e-5)


def build(args: argparse.Namespace) -> tuple[dict[str, tuple[Step, float]], MoELayer, torch.Tensor]:
    """name -> (fwd+bwd step, FLOPs); also ours-grouped and its input for profiling."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(1, args.tokens, args.hidden, generator=gen).requires_grad_()
    gy = torch.randn(1, args.tokens, args.hidden, generator=gen)
    skip = set(filter(None, args.skip.split(",")))
    ours_flops = expert_flops(args, 4 * args.hidden * args.ffn)
    hf_flops = expert_flops(args, 3 * args.hidden * mixtral_ffn(args.ffn))
    grouped, loop = make_ours(args, True), make_ours(args, False)
    check_ours(grouped, loop, x, gy)
    hf = {impl: make_mixtral(args, impl, grouped.gate_weight.detach()) for impl in ("eager", "grouped_mm")}
    check_mixtral(list(hf.values()), x)
    ds = None if "deepspeed" in skip else make_deepspeed(args, grouped, x)
    steps: dict[str, tuple[Step, float]] = {
        "ours-grouped": (backward_step(grouped, x, gy), ours_flops),
        "ours-loop": (backward_step(loop, x, gy), ours_flops),
        "hf-mixtral-eager": (backward_step(hf["eager"], x, gy), hf_flops),
        "hf-mixtral-grouped_mm": (backward_step(hf["grouped_mm"], x, gy), hf_flops),
        "dense-ceiling": (dense_ceiling_step(args), ours_flops),
    }
    if ds is not None:
        steps["deepspeed"] = (backward_step(ds, x, gy), ours_flops)
    return {k: v for k, v in steps.items() if k not in skip}, grouped, x


def time_round_robin(steps: dict[str, tuple[Step, float]], reps: int, warmup: int) -> list[Result]:
    results = {name: Result(name, flops, []) for name, (_, flops) in steps.items()}
    for rep in range(warmup + reps):
        for name, (step, _) in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            dt, dc = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
            if rep >= warmup:
                results[name].times_ms.append(dt)
                results[name].cpu_ms.append(dc)
    return list(results.values())


def print_table(results: list[Result], args: argparse.Namespace) -> dict[str, float]:
    by = {r.name: r for r in results}
    ref = by.get("ours-grouped")
    print(f"\nMoE layer fwd+bwd, fp32, 1 thread: T={args.tokens} H={args.hidden} I={args.ffn} "
          f"E={args.experts} k={args.topk}; {args.reps} reps (+{args.warmup} warmup), round-robin")
    print(f"Mixtral intermediate = 4*I/3 rounded to a multiple of 8 = {mixtral_ffn(args.ffn)} (~same FLOPs "
          "as OpenMoE's 4*H*I expert);\nGFLOP/s = each impl's own expert FLOPs (6*T*k*params per expert) / "
          "median time; router FLOPs (<1%) not counted\n")
    print("| implementation | median ms fwd+bwd | p10 .. p90 ms | GFLOP/s | time / ours-grouped "
          "| median CPU ms | CPU / ours-grouped |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = f"{r.median / ref.median:.2f}x" if ref else "-"
        cratio = f"{r.median_cpu / ref.median_cpu:.2f}x" if ref else "-"
        print(f"| {r.name} | {r.median:.1f} | {r.quantile(0.1):.1f} .. {r.quantile(0.9):.1f} "
              f"| {r.gflops:.1f} | {ratio} | {r.median_cpu:.1f} | {cratio} |")
    return summary(by)


def summary(by: dict[str, Result]) -> dict[str, float]:
    ours = by.get("ours-grouped")
    hf = [r for name, r in by.items() if name.startswith("hf-")]
    out: dict[str, float] = {}
    if ours is None:
        return out
    parts = []
    if hf:
        best = max(hf, key=lambda r: r.gflops)
        out["speedup_vs_fastest_hf"] = ours.gflops / best.gflops  # FLOP-normalised
        parts.append(f"ours vs fastest transformers: {out['speedup_vs_fastest_hf']:.2f}x faster "
                     f"({best.name}, FLOP-normalised)")
    if "deepspeed" in by:
        out["speedup_vs_deepspeed"] = ours.gflops / by["deepspeed"].gflops
        parts.append(f"ours vs deepspeed: {out['speedup_vs_deepspeed']:.2f}x faster")
    if "dense-ceiling" in by:
        out["time_vs_dense_ceiling"] = ours.median / by["dense-ceiling"].median
        parts.append(f"ours vs dense-GEMM ceiling: {out['time_vs_dense_ceiling']:.2f}x")
    print("\n" + "; ".join(parts))
    return out


def profile_phases(layer: MoELayer, x: torch.Tensor, reps: int) -> None:
    """Median forward time of router / dispatch / experts / combine and of the whole backward."""
    from megamoe.moe.router import route

    names = ["router", "dispatch", "experts", "combine", "backward"]
    times: dict[str, list[float]] = {n: [] for n in names}
    b, s, h = x.shape
    gy = torch.randn_like(x)
    for _ in range(reps):
        marks = [time.perf_counter()]
        xt = x.reshape(b * s, h)
        routing = route(xt @ layer.gate_weight.t(), layer.cfg.router_topk, layer.capacity(b * s))
        marks.append(time.perf_counter())
        rows, counts, state = layer.dispatcher.dispatch(xt, routing)
        marks.append(time.perf_counter())
        y = layer.experts(rows, counts)
        marks.append(time.perf_counter())
        out = layer.dispatcher.combine(y, state).view(b, s, h)
        marks.append(time.perf_counter())
        out.backward(gy)
        marks.append(time.perf_counter())
        layer.zero_grad(set_to_none=True)
        for n, t0, t1 in zip(names, marks, marks[1:]):
            times[n].append((t1 - t0) * 1e3)
    meds = {n: statistics.median(v) for n, v in times.items()}
    total = sum(meds.values())
    print("\nours-grouped phases (median ms): " + ", ".join(
        f"{n} {v:.1f} ({100 * v / total:.0f}%)" for n, v in meds.items()))


def profile_ops(layer: MoELayer, x: torch.Tensor) -> None:
    from torch.profiler import ProfilerActivity, profile

    step = backward_step(layer, x, torch.randn_like(x))
    step()
    shares = []  # (non-GEMM ms, GEMM ms) of single profiled steps: self CPU time of every op
    for _ in range(5):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        ops = prof.key_averages()
        gemm = sum(op.self_cpu_time_total for op in ops if op.key in GEMM_OPS) / 1e3
        shares.append((sum(op.self_cpu_time_total for op in ops) / 1e3 - gemm, gemm))
    non_gemm, gemm = sorted(shares)[len(shares) // 2]
    print(f"\nours-grouped outside the GEMMs (median of {len(shares)} profiled steps): {non_gemm:.1f} ms "
          f"against {gemm:.1f} ms of GEMMs ({100 * non_gemm / gemm:.1f}%)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


GEMM_OPS = ("aten::mm", "aten::_grouped_mm", "aten::bmm", "aten::addmm", "aten::addmm_")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    steps, grouped, x = build(args)
    print("correctness: ours grouped == ours loop (outputs, grads); hf eager == hf grouped_mm: OK"
          + ("; deepspeed == ours with renormalised top-k (outputs): OK" if "deepspeed" in steps else ""))
    results = time_round_robin(steps, args.reps, args.warmup)
    summ = print_table(results, args)
    if args.profile:
        profile_phases(grouped, x, args.reps)
        profile_ops(grouped, x)
    if args.json:
        payload = {"args": vars(args), "summary": summ,
                   "results": [asdict(r) | {"median_ms": r.median, "median_cpu_ms": r.median_cpu,
                                                "gflops": r.gflops} for r in results]}
        write_json_aside(args.json, payload, indent=2)


if __name__ == "__main__":
    main()
