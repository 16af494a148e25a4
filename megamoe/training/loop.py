"""The training loop: micro-batch gradient accumulation, data-parallel gradient reduction, clipping,
AdamW, LR schedule, evaluation, checkpoints and metrics.

One step:
  Forward/backward  this DP rank's micro-batches under the schedule (no pipeline / 1F1B /
                    interleaved), loss / micro-batches (router losses ride along through
                    MoELayer's autograd hook with the same 1 / micro-batches scale)
  Reduce            the optimizer's gradient buffers finish their (bucketed, maybe overlapped)
                    reductions: dense grads averaged over DP, expert grads over expert-DP
  Update            global grad norm -> skip if non-finite, clip, lr(iteration), optimizer step
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from megamoe.config import Config
from megamoe.data.sampler import SampleDataset, micro_batches
from megamoe.model.openmoe import StageModel
from megamoe.moe.fp8 import finish_fp8_step
from megamoe.parallel.mesh import ParallelMesh
from megamoe.parallel.optimizer import DistributedOptimizer, expert_grad_divisor
from megamoe.parallel.pipeline import P2P
from megamoe.parallel.schedules import (
    StepContext,
    forward_only,
    interleaved_one_f_one_b,
    no_pipeline,
    one_f_one_b,
)
from megamoe.training.checkpoint import TrainState, save_checkpoint
from megamoe.training.lr import learning_rate
from megamoe.training.metrics import MetricsLogger, model_flops_per_token
from megamoe.training.rebalance import ExpertRebalancer


class TrainingError(RuntimeError):
    """Training cannot go on (one-line message), e.g. every step skipped for non-finite gradients."""


@dataclass
class Trainer:
    cfg: Config
    mesh: ParallelMesh
    model: StageModel
    optimizer: DistributedOptimizer
    train_data: SampleDataset
    valid_data: SampleDataset | None
    logger: MetricsLogger
    device: torch.device
    peak_tflops: float
    p2p: P2P | None = None
    state: TrainState = field(default_factory=TrainState)
    replace_saved: bool = True  # False: --save holds another run's iterations, never replace one
    _skipped_in_a_row: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    rebalancer: ExpertRebalancer | None = None  # expert loads (logged) and --moe-rebalance-interval

    def __post_init__(self) -> None:
        self._fp8_experts = []  # delayed-scaling expert modules, whose history finish_fp8_step pushes
        for module in self.model.modules():
            if hasattr(module, "fp8_grad_divisor"):  # FP8 gradients are scaled as the global loss's
                module.fp8_grad_divisor = float(expert_grad_divisor(self.mesh, self.cfg))
            if hasattr(module, "fp8_amax_history"):
                self._fp8_experts.append(module)
        m = self.cfg.model
        if any(self.cfg.moe.is_moe_layer(layer) for layer in range(m.num_layers)):  # on every stage:
            self.rebalancer = ExpertRebalancer(self.cfg, self.model, self.optimizer, self.mesh)  # collectives

    @property
    def num_micro_batches(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.mesh.dp)

    def _batches(self, dataset: SampleDataset, consumed: int):
        t = self.cfg.train
        for tokens, labels in micro_batches(dataset, consumed, t.global_batch_size,
                                            t.micro_batch_size, self.mesh.dp_rank, self.mesh.dp):
            yield tokens.to(self.device), labels.to(self.device)

    def _dp_mean(self, values: list[float]) -> list[float]:
        """Average scalars over the data-parallel group (logged losses are global ones)."""
        if self.mesh.dp == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.mesh.groups["dp"])
        return (t / self.mesh.dp).tolist()

    def _step_context(self, dataset: SampleDataset, consumed: int, loss_scale: float) -> StepContext:
        return StepContext(chunks=list(self.model.chunks), batches=list(self._batches(dataset, consumed)),
                           pp=self.mesh.pp, rank=self.mesh.pp_rank, p2p=self.p2p, loss_scale=loss_scale)

    def _schedule(self):
        if self.mesh.pp == 1:
            return no_pipeline
        return interleaved_one_f_one_b if len(self.model.chunks) > 1 else one_f_one_b

    def _sum_over(self, group_name: str, values: list[float], size: int) -> list[float]:
        if size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.mesh.groups[group_name])
        return t.tolist()

    def _global_losses(self, lm_sum: float, n_mb: int) -> tuple[float, float, float, float, float]:
        """LM loss from the last stage, router losses per MoE layer from every stage, as global
        means over DP; and the expert load imbalance (max over stages). The MoE statistics stayed on
        the device all step: this is their one read."""
        mesh, stats = self.mesh, self.model.moe_stats
        aux, z, local_imbalance, output_z = stats.step_values()
        if mesh.sequence_parallel and mesh.tp > 1:  # per-rank shares -> the layers' losses
            aux, z = self._sum_over("tp", [aux, z], mesh.tp)
        lm_sum, aux, z, calls, output_z = self._sum_over("pp", [lm_sum, aux, z, float(stats.calls), output_z],
                                                         mesh.pp)  # the LM loss and output z: last stage
        calls = max(calls, 1.0)
        lm, aux, z, output_z = self._dp_mean([lm_sum / n_mb, aux / calls, z / calls, output_z / n_mb])
        imbalance = torch.tensor([local_imbalance])
        if mesh.pp > 1:
            dist.all_reduce(imbalance, op=dist.ReduceOp.MAX, group=mesh.groups["pp"])
        return lm, aux, z, float(imbalance), output_z

    def train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        iteration = self.state.iteration + 1
        t0 = time.perf_counter()
        model.train()
        n_mb = self.num_micro_batches
        model.moe_stats.reset(grad_scale=1.0 / n_mb)
        if self.p2p is not None:
            self.p2p.busy_wait_s = 0.0
        # Forward/backward of this rank's micro-batches under the pipeline schedule.
        ctx = self._step_context(self.train_data, self.state.consumed_samples, 1.0 / n_mb)
        self.optimizer.start_step(n_mb)
        ctx.start_schedule()
        self._schedule()(ctx)
        ctx.end_schedule()
        # Reduce, then update.
        self.optimizer.finish_grad_sync()
        grad_norm = self.optimizer.grad_norm()
        lr = learning_rate(cfg.train, iteration)
        skipped = not math.isfinite(grad_norm)
        self._skipped_in_a_row = self._skipped_in_a_row + 1 if skipped else 0
        if self._skipped_in_a_row >= cfg.train.max_consecutive_skipped_steps:  # the same on every rank
            raise TrainingError(f"{self._skipped_in_a_row} steps in a row had a non-finite gradient norm "
                                f"(up to iteration {iteration}); the weights are those of the last good step "
                                "(check --lr, the data and the model flags; --max-consecutive-skipped-steps)")
        if not skipped:
            self.optimizer.step(lr, grad_norm)
        self.optimizer.zero_grad()
        # FP8 delayed scaling: the step's amaxes join the history (not those of a skipped step)
        finish_fp8_step(self._fp8_experts, self.mesh.groups.get("edp"), update=not skipped)
        if self.rebalancer is not None:
            self.rebalancer.load.observe(model.moe_stats)
        self.state = TrainState(iteration, self.state.consumed_samples + cfg.train.global_batch_size)
        lm, aux, z, imbalance, output_z = self._global_losses(sum(ctx.losses), n_mb)  # ctx.losses: one read
        step_time = time.perf_counter() - t0
        tokens = cfg.train.global_batch_size * cfg.model.seq_length
        tflops = model_flops_per_token(cfg) * tokens / step_time / self.mesh.world_size / 1e12
        rec = dict(iteration=iteration, consumed_samples=self.state.consumed_samples, lm_loss=lm,
                   aux_loss=aux, z_loss=z, output_z_loss=output_z, grad_norm=grad_norm, lr=lr,
                   step_time=step_time,
                   tokens_per_sec=tokens / step_time, tflops=tflops,
                   mfu=tflops / self.peak_tflops if self.peak_tflops > 0 else 0.0,
                   load_imbalance=imbalance, skipped=skipped, **model.moe_stats.comm.as_dict())
        if self.mesh.pp > 1:
            # pipeline bubble: share of the schedule this rank spent outside forward/backward compute
            # (on CUDA timed with events on the compute stream: host time means nothing there)
            idle = self._sum_over("pp", [ctx.idle_fraction()], self.mesh.pp)[0] / self.mesh.pp
            rec.update(pp_idle_frac=idle, pp_max_in_flight=ctx.max_in_flight)
        if self.rebalancer is not None:  # outside step_time: a rebalance reports its own seconds
            if self.rebalancer.due(iteration):
                rec.update(self.rebalancer.rebalance())
            if iteration % cfg.train.log_interval == 0:
                rec.update(self.rebalancer.load_record(cfg.train.log_interval))
        return rec

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean LM loss over --eval-iters global batches of the validation set."""
        if self.valid_data is None or self.cfg.train.eval_iters == 0:
            return None
        self.model.eval()
        gbs, n_mb, total = self.cfg.train.global_batch_size, self.num_micro_batches, 0.0
        for i in range(self.cfg.train.eval_iters):
            ctx = self._step_context(self.valid_data, i * gbs, 1.0)
            forward_only(ctx)
            total += sum(ctx.losses)
        self.model.train()
        total = self._sum_over("pp", [total], self.mesh.pp)[0]
        return self._dp_mean([total / (n_mb * self.cfg.train.eval_iters)])[0]

    def save(self) -> None:
        if self.cfg.train.save:
            save_checkpoint(self.cfg.train.save, self.state, self.model, self.optimizer, self.cfg, self.mesh,
                            replace_existing=self.replace_saved)
            self.logger.info(f" saved checkpoint at iteration {self.state.iteration} to "
                             f"{self.cfg.train.save}")

    def _install_signal_handlers(self) -> None:
        """SIGTERM (preemption) and SIGUSR1 (Slurm's warning before the time limit, sbatch --signal)
        ask for a clean stop: finish the step, save, exit 0."""
        def request_stop(signum: int, _frame: object) -> None:
            self._stop_signal = signal.Signals(signum).name

        self._stop_signal: str | None = None
        self._previous_handlers: dict[int, Any] = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous_handlers[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread (e.g. embedded use): no signal-driven stop
            pass

    def _restore_signal_handlers(self) -> None:
        """Put the previous handlers back. Our handler's closure holds the trainer and through it the
        process groups; left installed, it frees them only during interpreter shutdown, when gloo's
        worker threads can no longer take the GIL to release their last tensors (std::terminate,
        exit code -6, seen here in ~15% of 2-rank runs)."""
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _exit_reason(self, iteration: int) -> str | None:
        """Why to stop after this step, agreed by every rank (a signal may reach only some)."""
        t = self.cfg.train
        minutes = (time.time() - self._start_time) / 60
        flags = torch.tensor([self._stop_signal is not None,
                              bool(t.exit_interval) and iteration % t.exit_interval == 0,
                              bool(t.exit_duration_in_mins) and minutes >= t.exit_duration_in_mins],
                             dtype=torch.float32)
        if self.mesh.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        names = (f"signal {self._stop_signal or 'on another rank'}", f"--exit-interval {t.exit_interval}",
                 f"--exit-duration-in-mins {t.exit_duration_in_mins}")
        return next((n for n, f in zip(names, flags.tolist()) if f), None)

    def train(self) -> list[dict[str, Any]]:
        t = self.cfg.train
        self._start_time = time.time()
        self._install_signal_handlers()
        try:
            saved_at = self.state.iteration or None  # resumed: that iteration is saved already
            while self.state.iteration < t.train_iters:
                rec = self.train_step()
                self.history.append(rec)
                self.logger.log_iteration(rec)
                it = rec["iteration"]
                if rec.get("moe_experts_moved"):
                    self.logger.info(_rebalance_line(rec))
                if it % t.eval_interval == 0:
                    loss = self.evaluate()
                    if loss is not None:
                        self.logger.log_eval(it, loss)
                if t.save_interval and it % t.save_interval == 0:
                    self.save()
                    saved_at = it
                reason = self._exit_reason(it)
                if reason is not None:
                    self.logger.info(f" > exiting after iteration {it}: {reason}")
                    break
            if t.save and saved_at != self.state.iteration:
                self.save()
            self.optimizer.finish_param_sync()  # the returned model holds the final weights
        finally:
            self._restore_signal_handlers()
        return self.history


def _rebalance_line(rec: dict[str, Any]) -> str:
    """The console line of an iteration whose rebalance moved experts."""
    return (f" > rebalanced experts after iteration {rec['iteration']}: {rec['moe_experts_moved']} moved "
            f"({rec['moe_rebalance_bytes'] / 2**20:.2f} MiB, {rec['moe_rebalance_seconds']:.3f} s); EP-rank "
            f"load max/mean {rec['moe_rank_imbalance_before']:.3f} -> {rec['moe_rank_imbalance_after']:.3f} "
            "(worst layer)")
