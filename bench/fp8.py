"""FP8 expert GEMMs against fp32 (and bf16 on GPU): time, memory and quantisation error of
GroupedExperts forward + backward (issue 15; method: bench/README.md, "FP8 experts").

ON CPU FP8 IS EMULATED AND SLOWER THAN FP32: every operand is quantised to float8 with a power-of-two
scale, dequantised back to fp32 and multiplied by the same fp32 GEMM (megamoe/moe/fp8.py), so FP8 adds
elementwise passes and saves nothing. The CPU numbers measure the emulation's overhead and the FP8
numerics; FP8 speed is a GPU matter (Transformer Engine, or ``torch._scaled_mm`` below).

Candidates, all on the same weights, rows and routing (``counts``: rows per expert, multiples of 16 so
that every FP8 kernel takes them), timed round-robin within every repetition so that machine noise
hits them all alike:

- ``fp32``: GroupedExperts without FP8 (the reference for every SQNR);
- ``bf16`` (GPU, or ``--bf16``): the same module and inputs in bfloat16;
- ``fp8-delayed`` / ``fp8-tensorwise`` / ``fp8-blockwise``: GroupedExperts(fp8=FP8Recipe(...)), the
  training path; delayed scaling finishes its step (amax history push) inside the timed step, as
  training does, and is measured after warm-up steps have filled its history;
- ``scaled_mm-tensorwise`` (where ``torch._scaled_mm`` runs on the device): the same MLP with one
  real FP8 GEMM per expert (per-expert power-of-two scales, operands saved for backward in FP8). It
  computes what ``fp8-tensorwise`` emulates, up to the order of the sums (checked: SQNR between them).

Memory: CUDA, ``torch.cuda.max_memory_allocated`` over one step minus what was allocated before it.
CPU, the peak RSS of one step in a fresh process (VmHWM after a reset through /proc/self/clear_refs,
minus VmRSS before the step), with glibc's mmap threshold pinned so that freed tensors go back to the
OS (otherwise a second step reuses retained heap and shows no growth). ``saved`` is the bytes autograd
keeps for backward, parameters and the input not counted (deterministic, any device).

    PYTHONPATH=. python bench/fp8.py [--device auto|cpu|cuda] [--shapes 4096x512x1024,4096x1024x2048]
        [--experts 8] [--reps 5] [--format hybrid] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megamoe.model.init import init_model_weights
from megamoe.moe.experts import GroupedExperts
from megamoe.moe.fp8 import FP8_MAX, FP8Recipe, finish_fp8_step, group_amax, pow2_scale
from megamoe.training.metrics import write_json_aside  # noqa: E402

RECIPES = ("delayed", "tensorwise", "blockwise")
ROWS_MULTIPLE = 16  # FP8 GEMM kernels (cuBLASLt, TE) want every dimension a multiple of 16


@dataclass
class Shape:
    rows: int  # T * k routed rows
    hidden: int
    ffn: int

    @staticmethod
    def parse(text: str) -> Shape:
        rows, hidden, ffn = (int(v) for v in text.lower().split("x"))
        return Shape(rows, hidden, ffn)

    def __str__(self) -> str:
        return f"{self.rows}x{self.hidden}x{self.ffn}"


@dataclass
class Inputs:
    x: torch.Tensor  # [N, H] rows sorted by expert, fp32
    counts: torch.Tensor  # [E]
    sizes: list[int]
    gy: torch.Tensor  # [N, H] upstream gradient, fp32


@dataclass
class Candidate:
    name: str
    step: Callable[[], tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]]  # -> (y, dx, weight grads)
    leaves: list[torch.Tensor]  # the input and the weights: not activation memory
    times_ms: list[float] = field(default_factory=list)

    def clear_grads(self) -> None:
        """Drop the last step's gradients (a memory measurement must not start with them alive)."""
        for t in self.leaves:
            t.grad = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--shapes", default="4096x512x1024,4096x1024x2048",
                   help="comma-separated ROWSxHIDDENxFFN, rows = tokens * top-k")
    p.add_argument("--experts", type=int, default=8, help="local experts")
    p.add_argument("--format", default="hybrid", choices=("e4m3", "hybrid"))
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--bf16", action="store_true", help="also bf16 on CPU (always on GPU)")
    p.add_argument("--no-scaled-mm", action="store_true", help="leave out scaled_mm-tensorwise")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", metavar="OUT", help="write the results as JSON (aside, then renamed)")
    p.add_argument("--memory-probe", metavar="NAME", help=argparse.SUPPRESS)  # internal: one CPU probe
    return p.parse_args(argv)


# -- inputs and candidates ------------------------------------------------------------------------

def make_inputs(shape: Shape, experts: int, device: torch.device, seed: int) -> Inputs:
    """Skewed but non-empty routing (a Dirichlet draw), every expert's rows a multiple of 16."""
    gen = torch.Generator().manual_seed(seed)
    blocks = shape.rows // ROWS_MULTIPLE
    share = torch.distributions.Dirichlet(torch.full((experts,), 2.0)).sample()  # uses the global seed
    sizes = [1 + int(b) for b in torch.floor(share * (blocks - experts))]
    sizes[int(share.argmax())] += blocks - sum(sizes)
    sizes = [s * ROWS_MULTIPLE for s in sizes]
    x = torch.randn(shape.rows, shape.hidden, generator=gen)
    gy = torch.randn(shape.rows, shape.hidden, generator=gen)
    return Inputs(x.to(device), torch.tensor(sizes, device=device), sizes, gy.to(device))


def make_experts(shape: Shape, experts: int, seed: int, fp8: FP8Recipe | None,
                 reference: GroupedExperts | None) -> GroupedExperts:
    module = GroupedExperts(shape.hidden, shape.ffn, list(range(experts)), std=0.02, out_std=0.01, fp8=fp8)
    if reference is None:
        init_model_weights(module, seed)
    else:  # the same weights as the reference (an FP8 module also holds its amax history)
        with torch.no_grad():
            for name in ("wi_gate", "wi_up", "wo"):
                getattr(module, name).copy_(getattr(reference, name))
    return module.train()


def module_step(name: str, module: GroupedExperts, inputs: Inputs, dtype: torch.dtype) -> Candidate:
    """One fwd+bwd as training runs it (delayed scaling: the step's amaxes pushed into the history)."""
    x = inputs.x.to(dtype).detach().requires_grad_()
    gy = inputs.gy.to(dtype)
    weights = [module.wi_gate, module.wi_up, module.wo]
    delayed = module.fp8 is not None and module.fp8.recipe == "delayed"

    def step() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x.grad = None
        for w in weights:
            w.grad = None
        y = module(x, inputs.counts, inputs.sizes)
        y.backward(gy)
        if delayed:
            finish_fp8_step([module], None)
        return y, x.grad, [w.grad for w in weights]

    return Candidate(name, step, [x, *weights])


def scaled_mm_runs(device: torch.device) -> bool:
    """Whether torch._scaled_mm multiplies E5M2 x E4M3 here (the hybrid input gradient) - probed."""
    if not hasattr(torch, "_scaled_mm"):
        return False
    try:
        a = torch.zeros(16, 32, device=device).to(torch.float8_e5m2)
        b = torch.zeros(16, 32, device=device).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _to_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x * scale (broadcast) saturated and cast: the FP8 payload; dequantised it is q / scale."""
    m = FP8_MAX[dtype]
    return (x.float() * scale).clamp(-m, m).to(dtype)


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same [.., K, N] values laid out column-major (what _scaled_mm wants of its second operand)."""
    return t.transpose(-2, -1).contiguous().transpose(-2, -1)


class ScaledMMGroup(torch.autograd.Function):
    """y = x @ w per expert with torch._scaled_mm, tensorwise per-expert power-of-two scales
    (what fp8-tensorwise emulates). Saves the FP8 payloads and scales, not fp32 copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, sizes: list[int], recipe: FP8Recipe) -> torch.Tensor:
        groups = torch.repeat_interleave(torch.arange(len(sizes), device=x.device),
                                         torch.tensor(sizes, device=x.device), output_size=x.shape[0])
        fx, fw, fg = recipe.dtype(0), recipe.dtype(1), recipe.dtype(2)
        sx = pow2_scale(group_amax(x, groups, len(sizes)), FP8_MAX[fx], recipe.margin)  # [G]
        sw = pow2_scale(w.detach().abs().amax(dim=(1, 2)).float(), FP8_MAX[fw], recipe.margin)
        if not bool((sx > 0).all() and (sw > 0).all()):
            raise ValueError("scaled_mm bench: an all-zero operand (scale 0) is not handled")
        xq, wq = _to_fp8(x, sx[groups, None], fx), _to_fp8(w, sw[:, None, None], fw)
        wq_col = _col_major(wq)
        y = x.new_empty(x.shape[0], w.shape[2])
        lo = 0
        for g, n in enumerate(sizes):
            if n:
                y[lo:lo + n] = torch._scaled_mm(xq[lo:lo + n], wq_col[g], scale_a=1 / sx[g],
                                                scale_b=1 / sw[g], out_dtype=x.dtype)
            lo += n
        ctx.save_for_backward(xq, wq, sx, sw, groups)
        ctx.sizes, ctx.grad_dtype, ctx.margin, ctx.w_dtype = sizes, fg, recipe.margin, w.dtype
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        xq, wq, sx, sw, groups = ctx.saved_tensors
        sizes, fg = ctx.sizes, ctx.grad_dtype
        sg = pow2_scale(group_amax(dy, groups, len(sizes)), FP8_MAX[fg], ctx.margin)
        sg = torch.where(sg > 0, sg, torch.ones_like(sg))  # an all-zero gradient: any scale is exact
        gq = _to_fp8(dy.contiguous(), sg[groups, None], fg)
        dx = dy.new_empty(dy.shape[0], wq.shape[1])
        dw = torch.empty(wq.shape, dtype=ctx.w_dtype, device=dy.device)
        lo = 0
        for g, n in enumerate(sizes):
            rows = slice(lo, lo + n)
            if n:
                # dx = dy @ w^T: w[g] row-major [K, M], so w[g].t() is already column-major [M, K]
                dx[rows] = torch._scaled_mm(gq[rows], wq[g].t(), scale_a=1 / sg[g], scale_b=1 / sw[g],
                                            out_dtype=dy.dtype)
                # dw = x^T dy: x^T as a row-major copy, dy column-major
                dw[g] = torch._scaled_mm(xq[rows].t().contiguous(), _col_major(gq[rows]), scale_a=1 / sx[g],
                                         scale_b=1 / sg[g], out_dtype=ctx.w_dtype)
            else:
                dw[g].zero_()
            lo += n
        return dx, dw, None, None


def scaled_mm_step(name: str, module: GroupedExperts, inputs: Inputs, recipe: FP8Recipe,
                   dtype: torch.dtype) -> Candidate:
    """GroupedExperts' MLP (same weights, same activation) with ScaledMMGroup projections."""
    x = inputs.x.to(dtype).detach().requires_grad_()
    gy = inputs.gy.to(dtype)
    weights = [module.wi_gate, module.wi_up, module.wo]

    def step() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x.grad = None
        for w in weights:
            w.grad = None

        def mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return ScaledMMGroup.apply(a, w, inputs.sizes, recipe)

        y = mm(module.act(mm(x, module.wi_gate), mm(x, module.wi_up)), module.wo)
        y.backward(gy)
        return y, x.grad, [w.grad for w in weights]

    return Candidate(name, step, [x, *weights])


def build(args: argparse.Namespace, shape: Shape, device: torch.device,
          only: str | None = None) -> tuple[list[Candidate], Inputs]:
    """The candidates (``only``: just that one, for a memory probe) on shared weights and inputs."""
    torch.manual_seed(args.seed)
    inputs = make_inputs(shape, args.experts, device, args.seed)
    reference = make_experts(shape, args.experts, args.seed, None, None).to(device)
    wanted = names(args, device)
    candidates = []
    for name in wanted if only is None else [only]:
        if name == "fp32":
            candidates.append(module_step(name, reference, inputs, torch.float32))
        elif name == "bf16":
            module = make_experts(shape, args.experts, args.seed, None, reference).to(device, torch.bfloat16)
            candidates.append(module_step(name, module, inputs, torch.bfloat16))
        elif name.startswith("fp8-"):
            recipe = FP8Recipe(format=args.format, recipe=name.removeprefix("fp8-"))
            module = make_experts(shape, args.experts, args.seed, recipe, reference).to(device)
            candidates.append(module_step(name, module, inputs, torch.float32))
        else:  # scaled_mm-tensorwise; bf16 activations on GPU (its fast path), fp32 on CPU
            recipe = FP8Recipe(format=args.format, recipe="tensorwise")
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            module = make_experts(shape, args.experts, args.seed, None, reference).to(device, dtype)
            candidates.append(scaled_mm_step(name, module, inputs, recipe, dtype))
    return candidates, inputs


def names(args: argparse.Namespace, device: torch.device) -> list[str]:
    out = ["fp32"]
    if device.type == "cuda" or args.bf16:
        out.append("bf16")
    out += [f"fp8-{r}" for r in args.recipes.split(",")]
    if not args.no_scaled_mm and scaled_mm_runs(device):
        out.append("scaled_mm-tensorwise")
    return out


# -- measurements ---------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(candidates: list[Candidate], reps: int, warmup: int, device: torch.device) -> None:
    for rep in range(warmup + reps):
        for c in candidates:
            sync(device)
            start = time.perf_counter()
            c.step()
            sync(device)
            if rep >= warmup:
                c.times_ms.append(1e3 * (time.perf_counter() - start))


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - test|^2) in fp64; inf when equal."""
    ref, test = ref.detach().double().flatten(), test.detach().double().flatten()
    noise = (ref - test).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def grads_cat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.detach().float().flatten() for g in grads])


def saved_bytes(c: Candidate) -> tuple[int, tuple[torch.Tensor, torch.Tensor, list]]:
    """Bytes of the distinct storages autograd saves for backward in one step (the input's and the
    weights' not counted: they exist anyway), and that step's result."""
    exclude = {t.untyped_storage().data_ptr() for t in c.leaves}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = c.step()
    return sum(seen.values()), result


def numerics(candidates: list[Candidate], inputs: Inputs) -> dict[str, dict]:
    """SQNR of output, input gradient and weight gradients against fp32, and saved bytes, from one
    step each (after timing: delayed scaling has history by then)."""
    out: dict[str, dict] = {}
    ref = None
    for c in candidates:
        nbytes, (y, dx, dw) = saved_bytes(c)
        result = (y.detach().float(), dx.detach().float(), grads_cat(dw))
        if ref is None:
            ref = result
        out[c.name] = {"saved_mib": nbytes / 2**20,
                       "sqnr_out_db": sqnr_db(ref[0], result[0]),
                       "sqnr_dgrad_db": sqnr_db(ref[1], result[1]),
                       "sqnr_wgrad_db": sqnr_db(ref[2], result[2]),
                       "y": result[0]}
    return out


def _vm_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def memory_probe(args: argparse.Namespace, shape: Shape) -> None:
    """(In a fresh CPU process) peak RSS growth of one fwd+bwd of args.memory_probe, printed as JSON."""
    (c,), _ = build(args, shape, torch.device("cpu"), only=args.memory_probe)
    for _ in range(max(1, args.warmup)):  # one-time allocations, and delayed scaling's history
        c.step()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        warm = True
    except OSError:  # cannot reset: the warm-up's high-water mark would hide the step's
        warm = False
    c.clear_grads()
    before = _vm_kib("VmRSS")
    c.step()
    peak = _vm_kib("VmHWM") - before
    print(json.dumps({"peak_mib": peak / 1024, "after_warmup": warm}))


def peak_memory_mib(args: argparse.Namespace, shape: Shape, c: Candidate, device: torch.device,
                    ) -> float | None:
    if args.no_memory:
        return None
    if device.type == "cuda":
        c.clear_grads()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        c.step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    # glibc: fixed mmap threshold, so that big tensors are mmapped and unmapped when freed
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               MALLOC_TOP_PAD_="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, __file__, "--device", "cpu", "--shapes", str(shape),
           "--experts", str(args.experts), "--format", args.format, "--recipes", args.recipes,
           "--seed", str(args.seed), "--warmup", str(args.warmup), "--memory-probe", c.name]
    cmd += ["--bf16"] if args.bf16 else []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def flops(shape: Shape) -> float:
    """fwd + bwd of the three projections: 6 * rows * (H*2I + H*I + I*H)."""
    return 6.0 * shape.rows * 4 * shape.hidden * shape.ffn


def run_shape(args: argparse.Namespace, shape: Shape, device: torch.device) -> list[dict]:
    candidates, inputs = build(args, shape, device)
    time_round_robin(candidates, args.reps, args.warmup, device)
    num = numerics(candidates, inputs)
    rows = []
    for c in candidates:
        med = statistics.median(c.times_ms)
        rows.append({"shape": str(shape), "experts": args.experts, "candidate": c.name, "median_ms": med,
                     "min_ms": min(c.times_ms), "max_ms": max(c.times_ms), "times_ms": c.times_ms,
                     "gflops": flops(shape) / (med * 1e-3) / 1e9,
                     "peak_mib": peak_memory_mib(args, shape, c, device),
                     **{k: v for k, v in num[c.name].items() if k != "y"}})
    if "scaled_mm-tensorwise" in num and "fp8-tensorwise" in num:
        # a real FP8 kernel against the emulation: the same numbers up to the order of the sums
        agree = sqnr_db(num["fp8-tensorwise"]["y"], num["scaled_mm-tensorwise"]["y"])
        for r in rows:
            if r["candidate"] == "scaled_mm-tensorwise":
                r["sqnr_out_vs_emulated_db"] = agree
    base = next(r["median_ms"] for r in rows if r["candidate"] == "fp32")
    for r in rows:
        r["vs_fp32"] = r["median_ms"] / base
    return rows


def finite(row: dict) -> dict:
    """The row with infinite SQNRs (the reference against itself) as null: strict JSON has no inf."""
    return {k: None if isinstance(v, float) and math.isinf(v) else v for k, v in row.items()}


def fmt_db(v: float) -> str:
    return "ref" if math.isinf(v) else f"{v:.1f}"


def print_table(rows: list[dict], device: torch.device) -> None:
    print("| shape NxHxI | candidate | median ms | min-max ms | x fp32 time | GFLOP/s | peak MiB | saved MiB "
          "| SQNR out dB | SQNR dgrad dB | SQNR wgrad dB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"| {r['shape']} | {r['candidate']} | {r['median_ms']:.1f} "
              f"| {r['min_ms']:.0f}-{r['max_ms']:.0f} | {r['vs_fp32']:.2f} | {r['gflops']:.1f} | {peak} "
              f"| {r['saved_mib']:.0f} "
              f"| {fmt_db(r['sqnr_out_db'])} | {fmt_db(r['sqnr_dgrad_db'])} | {fmt_db(r['sqnr_wgrad_db'])} |")
    for r in rows:
        if "sqnr_out_vs_emulated_db" in r:
            print(f"{r['shape']}: scaled_mm-tensorwise output vs emulated fp8-tensorwise: "
                  f"SQNR {fmt_db(r['sqnr_out_vs_emulated_db'])} dB")
    if device.type == "cpu":
        print("NOTE: on CPU the FP8 GEMMs are EMULATED (quantise, dequantise, fp32 GEMM): expected SLOWER "
              "than fp32 and no memory saving; only the SQNR columns say anything about FP8 itself.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    shapes = [Shape.parse(s) for s in args.shapes.split(",")]
    if args.memory_probe:
        memory_probe(args, shapes[0])
        return
    if "blockwise" in args.recipes.split(","):
        bad = [str(s) for s in shapes if s.hidden % 128 or s.ffn % 128]
        if bad:
            raise SystemExit(f"blockwise needs hidden and ffn divisible by 128: {bad}")
    rows = []
    for shape in shapes:
        rows += run_shape(args, shape, device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.experts} experts, "
          f"format {args.format}, median of {args.reps} round-robin reps after {args.warmup} warm-up")
    print_table(rows, device)
    if args.json:
        payload = {"args": vars(args), "device": str(device), "torch": torch.__version__,
                   "emulated": device.type != "cuda", "rows": [finite(r) for r in rows]}
        write_json_aside(args.json, payload, indent=1, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
