"""Whole training step: megamoe's Mixtral family against transformers' MixtralForCausalLM, same config.

    PYTHONPATH=. python bench/model_step.py [--hidden 256 --layers 4 --heads 8 --kv-heads 2 --ffn 512
        --experts 8 --topk 2 --vocab 1024 --seq 256 --batch 4] [--steps 7 --warmup 2]
        [--json bench/results/model_step.json] [--skip NAME,...]

One process, one thread, fp32, the default allocator. Candidates, stepped round-robin (one step each
per round, so machine noise hits them alike; the first --warmup rounds are dropped, medians of the rest):

- megamoe-mixtral: ``--model-preset mixtral-tiny --model-family mixtral`` with the sizes above, one rank,
  mock data; the step is megamoe's own ``Trainer.train_step`` (forward + backward of the micro-batch,
  gradient norm, clipping to 1.0, AdamW, zero_grad), as ``pretrain`` runs it;
- hf-mixtral-eager / hf-mixtral-grouped_mm: ``MixtralForCausalLM`` of the same config (hidden, layers,
  heads, KV heads, head dim, experts, top-k, intermediate size, vocab, RoPE base, RMSNorm eps, untied
  LM head, sdpa attention, the two experts implementations), fed the same batches as megamoe (step i of
  either model sees megamoe's mock batch i); its own random init, so routing differs; its step:
  forward, CE + 0.02 x its load-balancing loss (megamoe's Mixtral aux coefficient), backward,
  ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` (lr 1e-3, betas 0.9/0.95, eps 1e-8, wd 0.01, as
  megamoe's defaults), zero_grad;
- megamoe-openmoe (reference, not the same model): ``--model-preset openmoe-tiny`` at the same hidden,
  layers, heads, vocab, seq and batch with ffn = 3/4 of Mixtral's (OpenMoE's gated expert has 4*H*I
  parameters against SwiGLU's 3*H*I: the same expert FLOPs), experts in every 2nd layer and OpenMoE's
  extra dense MLP, so its FLOPs per token differ; compare it per FLOP.

FLOPs per token: ``megamoe.training.metrics.model_flops_per_token`` (Megatron's count, causal attention
half, top-k experts), the same number for megamoe-mixtral and transformers' Mixtral by construction.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megamoe.arguments import parse_args as megamoe_args  # noqa: E402
from megamoe.parallel.mesh import ParallelMesh  # noqa: E402
from megamoe.parallel.optimizer import build_optimizer  # noqa: E402
from megamoe.training.loop import Trainer  # noqa: E402
from megamoe.training.metrics import (  # noqa: E402
    MetricsLogger,
    model_flops_per_token,
    write_json_aside,  # noqa: E402
)
from megamoe.training.run import build_datasets, build_model  # noqa: E402

Step = Callable[[], float]  # runs one step, returns its loss
LR = 1e-3


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=512, help="Mixtral expert intermediate size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=7, help="timed steps per candidate")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--skip", default="", help="comma-separated candidates to leave out")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def common_flags(a: argparse.Namespace) -> list[str]:
    return ["--hidden-size", str(a.hidden), "--num-layers", str(a.layers), "--num-attention-heads",
            str(a.heads), "--kv-channels", str(a.hidden // a.heads), "--num-experts", str(a.experts),
            "--moe-router-topk", str(a.topk), "--vocab-size", str(a.vocab), "--seq-length", str(a.seq),
            "--micro-batch-size", str(a.batch), "--global-batch-size", str(a.batch), "--mock-data",
            "--lr", str(LR), "--min-lr", str(LR), "--lr-warmup-iters", "0", "--train-iters", "1000000",
            "--log-interval", "1000000", "--eval-interval", "1000000", "--eval-iters", "0",
            "--peak-tflops", "1", "--seed", str(a.seed)]


def mixtral_flags(a: argparse.Namespace) -> list[str]:
    return ["--model-preset", "mixtral-tiny", "--model-family", "mixtral", "--num-query-groups",
            str(a.kv_heads), "--ffn-hidden-size", str(a.ffn)] + common_flags(a)


def openmoe_flags(a: argparse.Namespace) -> list[str]:
    return ["--model-preset", "openmoe-tiny", "--ffn-hidden-size", str(8 * round(a.ffn * 3 / 32))] \
        + common_flags(a)


def megamoe_trainer(argv: list[str]) -> Trainer:
    """What ``pretrain`` builds before ``Trainer.train``: one rank, CPU, mock data."""
    cfg = megamoe_args(argv)
    mesh = ParallelMesh.from_config(cfg.parallel, 1, 0)
    mesh.build_groups()
    device = torch.device("cpu")
    cfg, train_data, valid_data = build_datasets(cfg, mesh)
    cfg.validate(mesh.world_size)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, mesh, device)
    optimizer = build_optimizer(model, cfg, mesh)
    logger = MetricsLogger(cfg, enabled=False)
    return Trainer(cfg, mesh, model, optimizer, train_data, valid_data, logger, device, 1.0)


def megamoe_step(trainer: Trainer) -> Step:
    return lambda: float(trainer.train_step()["lm_loss"])


def hf_step(a: argparse.Namespace, cfg: Any, impl: str,
            batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Step:
    from transformers import MixtralConfig, MixtralForCausalLM

    m = cfg.model
    hf_cfg = MixtralConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                           num_hidden_layers=a.layers, num_attention_heads=a.heads,
                           num_key_value_heads=a.kv_heads, head_dim=a.hidden // a.heads,
                           max_position_embeddings=a.seq, rms_norm_eps=m.norm_epsilon,
                           rope_theta=m.rotary_base, num_local_experts=a.experts,
                           num_experts_per_tok=a.topk, router_jitter_noise=0.0, tie_word_embeddings=False,
                           output_router_logits=True, router_aux_loss_coef=cfg.moe.aux_loss_coeff,
                           attn_implementation="sdpa")
    hf_cfg._experts_implementation = impl
    torch.manual_seed(a.seed)
    model = MixtralForCausalLM(hf_cfg).train()
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                            weight_decay=t.weight_decay)
    params = list(model.parameters())
    it = iter(batches)

    def step() -> float:
        tokens, labels = next(it)
        out = model(input_ids=tokens)
        lm = F.cross_entropy(out.logits.view(-1, a.vocab).float(), labels.reshape(-1))
        (lm + hf_cfg.router_aux_loss_coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, t.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(lm.detach())

    return step


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    torch.set_num_threads(1)
    skip = set(filter(None, a.skip.split(",")))
    mix = megamoe_trainer(mixtral_flags(a))
    # megamoe's batches (train_step reads batch i at consumed samples i * batch), for HF too
    batches = [next(iter(mix._batches(mix.train_data, i * a.batch))) for i in range(a.warmup + a.steps)]
    cands: dict[str, tuple[Step, float, Any]] = {"megamoe-mixtral": (megamoe_step(mix),
                                                                     model_flops_per_token(mix.cfg), mix.cfg)}
    for impl in ("eager", "grouped_mm"):
        if f"hf-mixtral-{impl}" not in skip:
            cands[f"hf-mixtral-{impl}"] = (hf_step(a, mix.cfg, impl, batches),
                                           model_flops_per_token(mix.cfg), mix.cfg)
    if "megamoe-openmoe" not in skip:
        omo = megamoe_trainer(openmoe_flags(a))
        cands["megamoe-openmoe"] = (megamoe_step(omo), model_flops_per_token(omo.cfg), omo.cfg)
    cands = {k: v for k, v in cands.items() if k not in skip}

    times: dict[str, list[float]] = {k: [] for k in cands}
    cpu: dict[str, list[float]] = {k: [] for k in cands}  # process CPU seconds (1 thread: this step's)
    losses: dict[str, list[float]] = {k: [] for k in cands}
    for rnd in range(a.warmup + a.steps):
        for name, (step, _, _) in cands.items():
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            losses[name].append(loss)
            if rnd >= a.warmup:
                times[name].append(dt)
                cpu[name].append(dc)
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {times[k][-1] * 1e3:.0f} ms" if times[k] else k
                                                for k in cands), flush=True)

    tok = a.batch * a.seq
    rows = []
    for name, (_, flops, cfg) in cands.items():
        med, med_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        rows.append(dict(name=name, ms_per_step=med * 1e3, cpu_ms_per_step=med_cpu * 1e3,
                         tokens_per_s=tok / med,
                         tokens_per_cpu_s=tok / med_cpu, cpu_times_ms=[t * 1e3 for t in cpu[name]],
                         mflop_per_token=flops / 1e6, gflops=flops * tok / med / 1e9,
                         p10_ms=sorted(times[name])[max(0, round(0.1 * (len(times[name]) - 1)))] * 1e3,
                         p90_ms=sorted(times[name])[round(0.9 * (len(times[name]) - 1))] * 1e3,
                         times_ms=[t * 1e3 for t in times[name]], first_loss=losses[name][0],
                         last_loss=losses[name][-1],
                         ffn=cfg.model.ffn_hidden_size, family=cfg.model.model_family))
    by = {r["name"]: r for r in rows}
    hf = [r for r in rows if r["name"].startswith("hf-")]
    best_hf = min(hf, key=lambda r: r["ms_per_step"]) if hf else None
    print(f"\nWhole step, fp32, 1 thread: hidden {a.hidden}, {a.layers} layers, {a.heads} heads / "
          f"{a.kv_heads} KV, "
          f"{a.experts} experts top-{a.topk}, Mixtral I={a.ffn}, vocab {a.vocab}, seq {a.seq} x {a.batch}; "
          f"medians of {a.steps} interleaved steps (+{a.warmup} warm-up)\n")
    print("| candidate | ms/step | p10 .. p90 ms | CPU ms/step | tokens/s | tokens/CPU-s | MFLOP/token "
          "| GFLOP/s | time / megamoe-mixtral | CPU / megamoe-mixtral | loss step 1 -> last |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    ref = by.get("megamoe-mixtral")
    for r in rows:
        ratio = f"{r['ms_per_step'] / ref['ms_per_step']:.2f}x" if ref else "-"
        cratio = f"{r['cpu_ms_per_step'] / ref['cpu_ms_per_step']:.2f}x" if ref else "-"
        print(f"| {r['name']} | {r['ms_per_step']:.0f} | {r['p10_ms']:.0f} .. {r['p90_ms']:.0f} | "
              f"{r['cpu_ms_per_step']:.0f} | {r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | "
              f"{r['mflop_per_token']:.2f} | {r['gflops']:.1f} | {ratio} | {cratio} | "
              f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
    summary: dict[str, float] = {}
    if ref and best_hf:
        summary = dict(best_hf=best_hf["name"],
                       tokens_per_s_ratio_vs_best_hf=ref["tokens_per_s"] / best_hf["tokens_per_s"])
        for r in hf:
            summary[f"tokens_per_s_ratio_vs_{r['name']}"] = ref["tokens_per_s"] / r["tokens_per_s"]
            summary[f"tokens_per_cpu_s_ratio_vs_{r['name']}"] = (ref["tokens_per_cpu_s"]
                                                                 / r["tokens_per_cpu_s"])
        best = best_hf["name"]
        summary["tokens_per_cpu_s_ratio_vs_best_hf"] = summary[f"tokens_per_cpu_s_ratio_vs_{best}"]
        print(f"\nmegamoe-mixtral / {best} tokens/s (same FLOPs per token): "
              f"{summary['tokens_per_s_ratio_vs_best_hf']:.2f}x (CPU clock: "
              f"{summary['tokens_per_cpu_s_ratio_vs_best_hf']:.2f}x)")
    if a.json:
        write_json_aside(a.json, dict(args=vars(a), tokens_per_step=tok, summary=summary, results=rows,
                                      torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                                      load_avg=os.getloadavg()), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
