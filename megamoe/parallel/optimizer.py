"""One optimizer for every run: fp32 masters and AdamW over what this rank owns of each gradient buffer.

Heterogeneous ZeRO (EZ-MoE style) when ``--use-distributed-optimizer`` is on: dense parameters are
sharded over the data-parallel group, expert parameters over the (smaller) expert-data-parallel group,
so expert optimizer state and parameter syncs never leave their group. Without it nothing is sharded:
every replica owns all of its parameters, and the same code runs with groups of one owner.

Per group (see :mod:`megamoe.parallel.grad_buffer` for the gradients):
  master   fp32, cut per parameter so weight decay follows Megatron's groups (none on 1-D weights); a
           view of the parameter itself when the parameter is fp32 (no second copy), a copy when it is
           bf16 (Megatron's mixed-precision optimizer); AdamW state exists for the owned part only
  step     global grad norm -> clip -> AdamW on the masters -> write back into the parameters and,
           when sharded, all-gather every bucket (async with ``--overlap-param-gather``: each module
           waits for its buckets just before its forward)

The trainer calls three things per step: :meth:`finish_grad_sync`, :meth:`grad_norm`, :meth:`step`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megamoe.config import Config, TrainConfig
from megamoe.parallel.comm import _all_gather_single
from megamoe.parallel.grad_buffer import Bucket, GradBuffer, GradMemory, GroupLayout, ShardedGradBuffer
from megamoe.parallel.mesh import ParallelMesh
from megamoe.params import is_expert, is_tp_split


@dataclass
class MasterPiece:
    """The owned flat positions [lo, hi) of ``param`` (in its group's numbering) and their master."""

    param: nn.Parameter
    buffer: GradBuffer
    bucket: Bucket
    lo: int
    hi: int
    master: torch.Tensor  # fp32 [hi - lo]; .grad is the buffer's reduced view of the same positions

    @property
    def is_view(self) -> bool:
        """The master IS the parameter's storage (fp32 parameters): nothing to write back."""
        return self.param.dtype == torch.float32

    def param_range(self) -> slice:
        start = self.buffer.layout.offsets[id(self.param)]
        return slice(self.lo - start, self.hi - start)


@dataclass(frozen=True)
class StateShard:
    """Optimizer state ``kind`` of flat positions [lo, lo + len(values)) of ``layout``'s numbering."""

    layout: GroupLayout
    bucket: Bucket
    kind: str
    lo: int
    values: torch.Tensor  # fp32 [n]


class DistributedOptimizer:
    """AdamW over fp32 masters of the owned parts of the gradient buffers; see the module docstring."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, mesh: ParallelMesh, expert_divisor: float,
                 shard: bool = True, overlap_grad_reduce: bool = False, bucket_numel: int = 1 << 22,
                 grad_reduce_dtype: torch.dtype = torch.float32, stage: int = 1,
                 overlap_param_gather: bool = False) -> None:
        if stage == 2 and not shard:
            raise ValueError("ZeRO stage 2 needs sharding (--use-distributed-optimizer)")
        self.cfg, self.mesh = cfg, mesh
        self.overlap_param_gather = overlap_param_gather and shard
        params = [p for p in model.parameters() if p.requires_grad]
        sp_group = mesh.groups.get("tp") if mesh.sequence_parallel and mesh.tp > 1 else None
        buffer_class = ShardedGradBuffer if stage == 2 else GradBuffer
        self.buffers: list[GradBuffer] = []
        self.grad_memory = GradMemory()
        for name, members, group_name, replicas, divisor in (
                ("dense", [p for p in params if not is_expert(p)], "dp", mesh.dp, float(mesh.dp)),
                ("expert", [p for p in params if is_expert(p)], "edp", mesh.edp, expert_divisor)):
            if not members:
                continue
            layout = GroupLayout.build(
                name, members, mesh.groups.get(group_name) if replicas > 1 else None,
                size=replicas if shard else 1, rank=mesh.coord(group_name) if shard else 0,
                bucket_numel=bucket_numel)
            self.buffers.append(buffer_class(layout, divisor, sp_group if name == "dense" else None,
                                             overlap_grad_reduce, grad_reduce_dtype, self.grad_memory))
        self._managed = {id(p) for p in params}
        self._gathers: dict[int, object] = {}  # id(bucket) -> its all-gather in flight
        self._storage: dict[int, torch.Tensor] = {}  # id(bucket) -> [end - start] its parameters' data
        for buffer in self.buffers:
            if buffer.sharded:
                self._gather_in_place(buffer)
        self._build_masters()
        if self.overlap_param_gather:
            self._install_gather_hooks(model)

    def _gather_in_place(self, buffer: GradBuffer) -> None:
        """Megatron's param buffer: the parameters of each bucket become views of one contiguous
        tensor laid out like the gradient bucket, so the all-gather after a step writes the other
        owners' parts straight into the parameters (no gathered copy, no copy back)."""
        for bucket in buffer.layout.buckets:
            storage = torch.zeros(bucket.end - bucket.start, dtype=bucket.dtype, device=buffer.data.device)
            for p in bucket.params:
                start = buffer.layout.offsets[id(p)] - bucket.start
                view = storage[start:start + p.numel()].view_as(p)
                view.copy_(p.detach())
                p.data = view
            self._storage[id(bucket)] = storage

    def _build_masters(self) -> None:
        self.pieces: list[MasterPiece] = []
        decay, no_decay = [], []
        for buffer in self.buffers:
            layout = buffer.layout
            for bucket in layout.buckets:
                lo, hi = layout.owned(bucket)
                for p in bucket.params:
                    start = layout.offsets[id(p)]
                    first, last = max(lo, start), min(hi, start + p.numel())
                    if first >= last:
                        continue
                    flat = p.detach().reshape(-1)[first - start:last - start]  # a view of p
                    master = flat if p.dtype == torch.float32 else flat.float().clone()
                    master.grad = buffer.view(bucket, first, last)
                    self.pieces.append(MasterPiece(p, buffer, bucket, first, last, master))
                    (no_decay if p.ndim == 1 else decay).append(master)
        groups = [dict(params=decay, weight_decay=self.cfg.weight_decay),
                  dict(params=no_decay, weight_decay=0.0)]
        hyper = dict(lr=self.cfg.lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2), eps=self.cfg.adam_eps)
        try:  # fused AdamW: one pass per tensor (CPU: ~7x the foreach step at 64M parameters; bench/README)
            self.inner = torch.optim.AdamW(groups, fused=True, **hyper)
        except RuntimeError:  # a device or torch without the fused kernel
            self.inner = torch.optim.AdamW(groups, **hyper)

    # -- gradients --------------------------------------------------------------------------------
    def start_step(self, micro_batches: int) -> None:
        """Before the step's backwards: each parameter will deliver this many gradients."""
        for buffer in self.buffers:
            buffer.start_step(micro_batches)

    def finish_grad_sync(self) -> None:
        """Wait for (or run) every reduction; the masters' .grad then hold the mean gradients."""
        for buffer in self.buffers:
            buffer.finish()

    def zero_grad(self) -> None:
        for buffer in self.buffers:
            buffer.zero()

    def grad_norm(self) -> float:
        """Global L2 norm counting each logical gradient once, with ONE all-reduce over the world.

        Every rank sits in one cell of the dense grid (TP x DP x PP) and one of the expert grid (EP x
        EDP x PP), so summing a contribution over the world sums it over every cell: each rank adds
        its TP-split dense gradients, its TP-replicated ones only on TP rank 0, and its experts; a
        group that is not sharded (all replicas hold the whole gradient) contributes from its first
        replica only. Squares are summed in fp64 so the value does not depend on the sharding."""
        mesh = self.mesh
        kinds: dict[str, list[torch.Tensor]] = {"tp_split": [], "replicated": [], "expert": []}
        for piece in self.pieces:
            param = piece.param
            kind = "expert" if is_expert(param) else "tp_split" if is_tp_split(param) else "replicated"
            kinds[kind].append(piece.master.grad)
        counted = {"dense": True, "expert": True}
        for buffer in self.buffers:
            replica = mesh.coord("edp" if buffer.layout.name == "expert" else "dp")
            counted[buffer.layout.name] = buffer.sharded or replica == 0
        weights = {"tp_split": counted["dense"], "replicated": counted["dense"] and mesh.tp_rank == 0,
                   "expert": counted["expert"]}
        device = next((g.device for grads in kinds.values() for g in grads), torch.device("cpu"))
        total = sum(_sum_of_squares(grads, device) for kind, grads in kinds.items() if weights[kind])
        total = torch.as_tensor(total, dtype=torch.float64).cpu()  # the one device-to-host copy
        if mesh.world_size > 1:
            dist.all_reduce(total)
        return float(total.sqrt())

    # -- update -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float, grad_norm: float) -> None:
        """Clip to --clip-grad by ``grad_norm``, AdamW on the masters, then write the parameters back
        (and all-gather their buckets when sharded)."""
        coefficient = clip_coefficient(grad_norm, self.cfg.clip_grad)
        if coefficient < 1.0:
            torch._foreach_mul_([piece.master.grad for piece in self.pieces], coefficient)
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        for piece in self.pieces:
            if not piece.is_view:
                piece.param.detach().view(-1)[piece.param_range()].copy_(piece.master)
        for buffer in self.buffers:
            if buffer.sharded:
                for bucket in buffer.layout.buckets:
                    self._start_gather(buffer, bucket)

    def _start_gather(self, buffer: GradBuffer, bucket: Bucket) -> None:
        """forward: all-gather, in place, the owned parts of ``bucket``'s parameters (already written
        back by the step) from every owner."""
        storage = self._storage[id(bucket)]
        lo, hi = buffer.layout.owned(bucket)
        own = storage[lo - bucket.start:hi - bucket.start]
        work = _all_gather_single(storage, own, group=buffer.layout.group, async_op=self.overlap_param_gather)
        if self.overlap_param_gather:
            self._gathers[id(bucket)] = work

    def _finish_gather(self, buffer: GradBuffer, bucket: Bucket) -> None:
        self._gathers.pop(id(bucket)).wait()

    def finish_param_sync(self) -> None:
        """Complete every pending parameter all-gather (before reading weights outside a forward:
        checkpoints, the end of training)."""
        for buffer in self.buffers:
            for bucket in buffer.layout.buckets:
                if id(bucket) in self._gathers:
                    self._finish_gather(buffer, bucket)

    def _install_gather_hooks(self, model: nn.Module) -> None:
        """Megatron-style: every module with parameters of its own waits, just before its forward,
        for the all-gathers of the buckets holding them; the other buckets keep gathering meanwhile."""
        where = {id(p): (buffer, bucket) for buffer in self.buffers for bucket in buffer.layout.buckets
                 for p in bucket.params}
        for module in model.modules():
            needed = {id(where[id(p)][1]): where[id(p)] for p in module.parameters(recurse=False)
                      if id(p) in where}
            if needed:
                module.register_forward_pre_hook(self._make_gather_hook(list(needed.values())))

    def _make_gather_hook(self, needed: list[tuple[GradBuffer, Bucket]]):
        def hook(_module: nn.Module, _args: object) -> None:
            for buffer, bucket in needed:
                if id(bucket) in self._gathers:
                    self._finish_gather(buffer, bucket)

        return hook

    # -- accounting and state ---------------------------------------------------------------------
    @property
    def peak_grad_bytes(self) -> int:
        """High-water mark of gradient memory (ZeRO-2: owned parts plus transient buckets)."""
        return self.grad_memory.peak

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: parameters, gradient buffers, fp32 master copies, AdamW moments."""
        owned = sum(piece.hi - piece.lo for piece in self.pieces)
        out = dict(params=sum(p.numel() * p.element_size() for b in self.buffers for p in b.layout.params),
                   grads=sum(b.data.numel() * 4 for b in self.buffers),
                   master=sum((piece.hi - piece.lo) * 4 for piece in self.pieces if not piece.is_view),
                   optimizer=2 * owned * 4)
        if any(isinstance(b, ShardedGradBuffer) for b in self.buffers):  # two reducing, one filling
            full = sum(b.layout.numel for b in self.buffers)
            biggest = max(bucket.end - bucket.start for b in self.buffers for bucket in b.layout.buckets)
            out["grad_buckets"] = 4 * min(full, 3 * biggest)
        return out

    def state_kinds(self, param: nn.Parameter) -> tuple[str, ...]:
        """What a checkpoint keeps of ``param`` besides its weight: the AdamW moments once a step has
        run, and the fp32 master when the parameter is not itself fp32 (the same on every rank)."""
        if id(param) not in self._managed:  # not trained (e.g. the FP8 amax history): no state
            return ()
        moments = ("exp_avg", "exp_avg_sq") if self.adam_step() > 0 else ()
        return (("master",) if param.dtype != torch.float32 else ()) + moments

    def adam_step(self) -> float:
        state = next((self.inner.state[piece.master] for piece in self.pieces
                      if piece.master in self.inner.state), {})
        return float(state["step"]) if "step" in state else 0.0

    def iter_state_shards(self) -> Iterator[StateShard]:
        """The :meth:`state_kinds` of every local parameter as flat pieces of its group's numbering, one
        owner's part of one bucket and kind at a time, so a save holds at most two such parts beyond
        the steady state. In a sharded group the owners send their parts to the group's first rank (the
        checkpoint writer), which gets them all; the other ranks get nothing."""
        for buffer in self.buffers:
            layout = buffer.layout
            for bucket in layout.buckets:
                lo, hi = layout.owned(bucket)
                owned = [piece for piece in self.pieces if piece.bucket is bucket]
                for kind in self.state_kinds(bucket.params[0]):
                    mine = torch.zeros(hi - lo, dtype=torch.float32, device=buffer.data.device)
                    for piece in owned:
                        source = piece.master if kind == "master" else self.inner.state[piece.master][kind]
                        mine[piece.lo - lo:piece.hi - lo].copy_(source)
                    yield from self._collect(buffer, bucket, kind, mine)
                    del mine  # before the next kind's is allocated

    def _collect(self, buffer: GradBuffer, bucket: Bucket, kind: str, mine: torch.Tensor,
                 ) -> Iterator[StateShard]:
        """forward: every owner's part of ``bucket`` to the group's first rank, one at a time."""
        layout = buffer.layout
        if not buffer.sharded or layout.group is None:
            yield StateShard(layout, bucket, kind, layout.owned(bucket)[0], mine)
            return
        writer = dist.get_global_rank(layout.group, 0)
        if layout.rank != 0:
            dist.send(mine, dst=writer, group=layout.group)
            return
        per_rank = mine.numel()
        yield StateShard(layout, bucket, kind, bucket.start, mine)
        for owner in range(1, layout.size):
            part = torch.empty_like(mine)
            dist.recv(part, src=dist.get_global_rank(layout.group, owner), group=layout.group)
            yield StateShard(layout, bucket, kind, bucket.start + owner * per_rank, part)
            del part  # before the next owner's is received

    def load_full_param_states(self, states: dict[int, dict[str, torch.Tensor]], step: float) -> None:
        """Keep this rank's owned part of each parameter's saved state ({kind: tensor shaped like the
        parameter}), placed on the master's device (fused AdamW wants the step there too)."""
        with torch.no_grad():
            for piece in self.pieces:
                saved = states[id(piece.param)]
                device, part = piece.master.device, piece.param_range()
                piece.master.copy_(saved["master"].reshape(-1)[part])
                if "exp_avg" in saved:
                    fused = bool(self.inner.defaults.get("fused"))
                    self.inner.state[piece.master] = {
                        "step": torch.tensor(step, dtype=torch.float32, device=device if fused else "cpu"),
                        "exp_avg": saved["exp_avg"].reshape(-1)[part].to(device, copy=True),
                        "exp_avg_sq": saved["exp_avg_sq"].reshape(-1)[part].to(device, copy=True)}


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squared entries of ``grads``, a [] fp64 tensor on ``device`` (0 for none); left on the
    device so that the caller copies all kinds to the host at once."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    # fp64: the same whatever the sharding (fp32 squares are exact in fp64). A norm in fp64 copies its
    # input to fp64 first; in blocks of NORM_BLOCK elements that copy stays a small reused buffer
    # instead of a fresh page-faulting one as large as the gradient (~10% of a small model's CPU step)
    norms = [torch.linalg.vector_norm(block, dtype=torch.float64)
             for grad in grads for block in grad.reshape(-1).split(NORM_BLOCK)]
    return torch.stack(norms).pow(2).sum()


NORM_BLOCK = 1 << 18  # elements: a 2 MiB fp64 copy per block


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """Factor that brings the global norm to at most max_norm (1.0: no clipping; 0 disables)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def expert_grad_divisor(mesh: ParallelMesh, cfg: Config) -> int:
    """Expert grads are SUMMED over expert-DP (every token reached one expert copy) and divided by
    this: DP (the loss is a mean over DP replicas), times TP when TP ranks dispatched identical
    tokens (TP > 1 without SP and without the TP-deduplicated exchange)."""
    duplicated = mesh.tp > 1 and not mesh.sequence_parallel and not cfg.parallel.moe_tp_dedup
    return mesh.dp * (mesh.tp if duplicated else 1)


def build_optimizer(model: nn.Module, cfg: Config, mesh: ParallelMesh) -> DistributedOptimizer:
    """The optimizer the flags ask for: sharded with --use-distributed-optimizer, whole otherwise;
    bucketing, overlap and bf16 reduction apply either way."""
    t = cfg.train
    return DistributedOptimizer(
        model, t, mesh, expert_grad_divisor(mesh, cfg), shard=t.use_distributed_optimizer,
        overlap_grad_reduce=t.overlap_grad_reduce, bucket_numel=t.ddp_bucket_size,
        grad_reduce_dtype=torch.bfloat16 if t.grad_reduce_in_bf16 else torch.float32,
        stage=t.zero_stage, overlap_param_gather=t.overlap_param_gather)


def optimizer_memory_estimate(dense_params: int, expert_params: int, tp: int, pp: int, ep: int, dp: int,
                              edp: int, zero: bool, weight_bytes: int = 2, zero_stage: int = 1
                              ) -> dict[str, float]:
    """Formula-based bytes per rank (the planner's model): weights in compute precision, fp32 gradient
    buffers, fp32 masters + two AdamW moments; the last two sharded over DP (dense) / expert-DP
    (experts) when ``zero``, and the gradients too with ``zero_stage`` 2 (transient buckets not
    counted). Dense weights are split over TP x PP, experts over EP x PP."""
    dense_local = dense_params / (tp * pp)
    expert_local = expert_params / (ep * pp)
    state = 12.0  # fp32 master + exp_avg + exp_avg_sq
    dense_div, expert_div = (dp, edp) if zero else (1, 1)
    grad_div = (dense_div, expert_div) if zero and zero_stage == 2 else (1, 1)
    return dict(weights=(dense_local + expert_local) * weight_bytes,
                grads=dense_local * 4 / grad_div[0] + expert_local * 4 / grad_div[1],
                optimizer=dense_local * state / dense_div + expert_local * state / expert_div)
