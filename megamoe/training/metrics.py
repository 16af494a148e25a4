"""Throughput arithmetic and the loggers: console (Megatron-style line), JSONL metrics file, wandb
(offline unless WANDB_API_KEY is set) and tensorboard. Only the last pipeline stage's DP rank 0
(``enabled=True``) writes."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from megamoe.config import Config
from megamoe.model.openmoe import count_parameters


def model_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), Megatron-style accounting:
    2 FLOPs per active matmul weight (top-k experts, router, LM head; not the embedding lookup)
    plus attention scores and values, 4 * s * heads * d per layer, counted non-causally."""
    m = cfg.model
    counts = count_parameters(cfg)
    matmul_params = counts["active"] - counts["embedding"] // 2  # LM head stays, lookup does not
    attn = 4 * m.seq_length * m.num_attention_heads * m.kv_channels * m.num_layers
    return 3.0 * (2.0 * matmul_params + attn)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 1024,
                        reps: int = 5) -> float:
    """Measured dense GEMM rate of this device/thread (TFLOP/s): the MFU ceiling on CPU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / sorted(times)[len(times) // 2] / 1e12


class MetricsLogger:
    def __init__(self, cfg: Config, enabled: bool) -> None:
        self.cfg, self.enabled = cfg, enabled
        self._file = self._wandb = self._tb = None
        if not enabled:
            return
        t = cfg.train
        if t.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(t.metrics_file)), exist_ok=True)
            self._file = open(t.metrics_file, "a")
        if t.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(t.tensorboard_dir)
        if t.wandb_project:
            import wandb

            if not os.environ.get("WANDB_API_KEY"):
                os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb.init(project=t.wandb_project, name=t.wandb_exp_name,
                                     config=_flat_config(cfg))

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)

    def log_iteration(self, rec: dict[str, Any]) -> None:
        """Every iteration goes to the metrics file; the console every --log-interval."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
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
        if self._file is not None:
            self._file.write(json.dumps({"iteration": iteration, "eval_lm_loss": loss}) + "\n")
            self._file.flush()
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
