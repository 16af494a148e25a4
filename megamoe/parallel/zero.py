"""Heterogeneous ZeRO (EZ-MoE style): dense parameters sharded over the data-parallel group, expert
parameters over the (smaller, node-local) expert-data-parallel group, so expert optimizer state and
parameter syncs never leave their group.

Per group ("dense" over DP, "expert" over expert-DP):
  grad buffer   one contiguous fp32 buffer for all its parameters, padded to a multiple of the group
                size; each backward adds a parameter's gradient into its view (post-accumulate hook),
                so micro-batches accumulate in fp32 whatever the compute dtype
  reduce        reduce-scatter over the group (each rank keeps the summed 1/N shard), bucketed;
                with --overlap-grad-reduce a bucket starts as soon as its last gradient arrived
  master        fp32 copies of this rank's shard only, cut per parameter so weight decay follows
                Megatron's groups; AdamW state exists for the shard only
  update        AdamW on the shard, then the parameter shard is written back and all-gathered

ZeRO stage 1 (default) keeps the full fp32 grad buffer for accumulation over micro-batches and
reduces once per step. Stage 2 (``--zero-stage 2``) keeps only this rank's 1/N shard of the gradients:
a bucket's gradients land in a transient buffer that is reduce-scattered (async) and freed as soon as
every parameter of the bucket has delivered its gradient, i.e. once per micro-batch, trading m times
the reduction traffic for gradient memory of shard + a couple of in-flight buckets.
The buffer layout depends only on the parameters this rank holds, i.e. on the placement table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from megamoe.config import TrainConfig
from megamoe.parallel.comm import _all_gather_single, _reduce_scatter_single
from megamoe.parallel.mesh import ParallelMesh
from megamoe.params import is_expert, is_sp_partial, is_tp_split


@dataclass
class _Bucket:
    """A slice [start, end) of the group's flat buffer, padded to a multiple of the group size, so
    every rank owns 1/N of every bucket and a bucket reduces with one reduce-scatter."""

    start: int
    end: int
    params: list[nn.Parameter]
    pending: int = 0
    work: object | None = None
    out: torch.Tensor | None = None
    shard_offset: int = 0  # stage 2: where this bucket's owned shard starts in the group's shard buffer
    buf: torch.Tensor | None = None  # stage 2: transient [end - start] gradients of the current round
    fired: set[int] = field(default_factory=set)  # stage 2: id(param) delivered since the last reduce
    gather: tuple | None = None  # (async work or None, gathered bucket, own shard) until copied in

    def shard(self, rank: int, size: int) -> tuple[int, int]:
        per = (self.end - self.start) // size
        return self.start + rank * per, self.start + (rank + 1) * per


@dataclass
class _Group:
    """Flat buffers of one parameter group (dense or expert) and its reduction group."""

    name: str
    params: list[nn.Parameter]
    group: dist.ProcessGroup | None
    replicas: int  # ranks holding a copy (gradients are reduced over them)
    size: int  # ranks the state is sharded over (replicas with ZeRO, 1 without)
    rank: int
    divisor: float  # gradient sum -> mean
    offsets: dict[int, int] = field(default_factory=dict)  # id(param) -> start in the flat buffer
    numel: int = 0  # flat (padded) length of all its buckets
    grad: torch.Tensor | None = None  # stage 1: [numel] fp32; stage 2: [numel / size], owned shards only
    buckets: list[_Bucket] = field(default_factory=list)

    def shards(self) -> list[tuple[_Bucket, int, int]]:
        return [(b, *b.shard(self.rank, self.size)) for b in self.buckets]


class DistributedOptimizer:
    """AdamW over fp32 master shards with sharded reduction; see the module docstring.

    shard=False keeps full masters and all-reduces instead (mixed-precision optimizer without ZeRO).
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, mesh: ParallelMesh, expert_divisor: float,
                 shard: bool = True, overlap_grad_reduce: bool = False, bucket_numel: int = 1 << 22,
                 grad_reduce_dtype: torch.dtype = torch.float32, stage: int = 1,
                 overlap_param_gather: bool = False) -> None:
        if stage not in (1, 2) or (stage == 2 and not shard):
            raise ValueError(f"ZeRO stage {stage} is not supported here (1, or 2 with sharding)")
        self.cfg, self.mesh, self.shard_enabled, self.stage = cfg, mesh, shard, stage
        self.overlap_param_gather = overlap_param_gather
        # stage 2 reductions in flight: (group, bucket, async work, reduced shard, transient buffer)
        self._in_flight: list[tuple[_Group, _Bucket, object, torch.Tensor, torch.Tensor]] = []
        self.peak_grad_bytes = 0  # high-water mark of gradient buffers (stage 2: shards + buckets)
        self._live_grad_bytes = 0
        self._sp_tp_group = mesh.groups.get("tp") if mesh.sequence_parallel and mesh.tp > 1 else None
        self.overlap, self.reduce_dtype = overlap_grad_reduce, grad_reduce_dtype
        params = [p for p in model.parameters() if p.requires_grad]
        dense = [p for p in params if not is_expert(p)]
        experts = [p for p in params if is_expert(p)]
        self._expected = 1
        self.groups = [g for g in (
            self._make_group("dense", dense, "dp", mesh.dp, mesh.coord("dp"), float(mesh.dp), bucket_numel),
            self._make_group("expert", experts, "edp", mesh.edp, mesh.coord("edp"), expert_divisor,
                             bucket_numel)) if g.params]
        self._build_masters()
        self._count_grad_bytes(sum(_nbytes(g.grad) for g in self.groups))
        for g in self.groups:
            for b in g.buckets:
                for p in b.params:
                    p.register_post_accumulate_grad_hook(self._make_hook(g, b, p))
        if overlap_param_gather:
            self._install_gather_hooks(model)

    # -- layout -----------------------------------------------------------------------------------
    def _make_group(self, name: str, params: list[nn.Parameter], group_name: str, replicas: int, rank: int,
                    divisor: float, bucket_numel: int) -> _Group:
        size = replicas if self.shard_enabled else 1
        g = _Group(name, params, self.mesh.groups.get(group_name) if replicas > 1 else None, replicas, size,
                   rank if self.shard_enabled else 0, divisor)
        offset, bucket_start, bucket_params = 0, 0, []

        def close_bucket() -> None:
            nonlocal offset, bucket_start, bucket_params
            offset += (-(offset - bucket_start)) % size  # pad the bucket to a multiple of size
            g.buckets.append(_Bucket(bucket_start, offset, bucket_params))
            bucket_start, bucket_params = offset, []

        # Reverse order: roughly the order backward produces gradients, so buckets fill in turn.
        for p in reversed(params):
            g.offsets[id(p)] = offset
            offset += p.numel()
            bucket_params.append(p)
            if offset - bucket_start >= bucket_numel:
                close_bucket()
        if bucket_params:
            close_bucket()
        device = params[0].device if params else torch.device("cpu")
        g.numel = offset
        if self.stage == 2:
            for b in g.buckets:
                b.shard_offset = b.start // size
            g.grad = torch.zeros(offset // size, dtype=torch.float32, device=device)
        else:
            g.grad = torch.zeros(offset, dtype=torch.float32, device=device)
        return g

    def _grad_view(self, g: _Group, bucket: _Bucket, a: int, b: int) -> torch.Tensor:
        """This rank's reduced gradient for flat positions [a, b) of its owned shard of ``bucket``."""
        if self.stage == 1:
            return g.grad[a:b]
        lo, _ = bucket.shard(g.rank, g.size)
        return g.grad[bucket.shard_offset + a - lo:bucket.shard_offset + b - lo]

    def _build_masters(self) -> None:
        """fp32 master pieces for every (param, owned shard) overlap, in decay / no-decay groups."""
        self.pieces: list[tuple[nn.Parameter, _Group, int, int, torch.Tensor]] = []
        decay, no_decay = [], []
        for g in self.groups:
            for bucket, lo, hi in g.shards():
                for p in bucket.params:
                    start = g.offsets[id(p)]
                    a, b = max(lo, start), min(hi, start + p.numel())
                    if a >= b:
                        continue
                    master = p.detach().reshape(-1)[a - start:b - start].float().clone()
                    master.grad = self._grad_view(g, bucket, a, b)  # view: the reduced shard lands here
                    self.pieces.append((p, g, a, b, master))
                    (no_decay if p.ndim == 1 else decay).append(master)
        on_gpu = any(m.is_cuda for *_, m in self.pieces)
        self.inner = torch.optim.AdamW(
            [dict(params=decay, weight_decay=self.cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)],
            lr=self.cfg.lr, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2), eps=self.cfg.adam_eps,
            fused=True if on_gpu else None)

    # -- gradients --------------------------------------------------------------------------------
    def _make_hook(self, g: _Group, bucket: _Bucket, p: nn.Parameter):
        if self.stage == 2:
            return self._make_stage2_hook(g, bucket, p)
        start = g.offsets[id(p)]

        def hook(param: torch.Tensor) -> None:
            g.grad[start:start + param.numel()].add_(param.grad.reshape(-1))
            param.grad = None  # the buffer holds it now: no second full-size gradient
            bucket.pending += 1
            if self.overlap and bucket.pending == self._expected * len(bucket.params):
                self._launch_ready(g)

        return hook

    # -- stage 2: per-bucket transient buffers, reduce-scattered into the owned shard --------------
    def _make_stage2_hook(self, g: _Group, bucket: _Bucket, p: nn.Parameter):
        start = g.offsets[id(p)] - bucket.start

        def hook(param: torch.Tensor) -> None:
            if bucket.buf is None:
                bucket.buf = torch.zeros(bucket.end - bucket.start, dtype=torch.float32, device=g.grad.device)
                self._count_grad_bytes(_nbytes(bucket.buf))
            bucket.buf[start:start + param.numel()].add_(param.grad.reshape(-1))
            param.grad = None
            bucket.fired.add(id(param))
            # Every parameter of the bucket delivered (the same moment on every rank of the group: the
            # backward graphs have the same structure): reduce this round's sum and free the buffer.
            if len(bucket.fired) == len(bucket.params):
                self._reduce_stage2(g, bucket)

        return hook

    def _reduce_stage2(self, g: _Group, b: _Bucket) -> None:
        """Start the reduce-scatter of ``b``'s transient buffer; keep at most two in flight."""
        filled, b.buf, b.fired = b.buf, None, set()
        if filled is None:
            return
        buf = self._in_reduce_dtype(filled)
        self._count_grad_bytes(_nbytes(buf) - _nbytes(filled) if buf is not filled else 0)
        work, out = None, buf  # a group of one (e.g. expert-DP 1): the buffer is the shard
        if g.group is not None:
            out, work = self._start_reduce_scatter(g, b, buf, async_op=True)
            self._count_grad_bytes(_nbytes(out))
        self._in_flight.append((g, b, work, out, buf))
        while len(self._in_flight) > 2:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        g, b, work, out, buf = self._in_flight.pop(0)  # dropping buf frees the transient buffer
        if work is not None:
            work.wait()
        g.grad[b.shard_offset:b.shard_offset + out.numel()].add_(out)
        self._count_grad_bytes(-_nbytes(out) - (_nbytes(buf) if buf is not out else 0))

    def _count_grad_bytes(self, delta: int) -> None:
        """Live gradient bytes (persistent shards + transient buckets) and their high-water mark."""
        self._live_grad_bytes += delta
        self.peak_grad_bytes = max(self.peak_grad_bytes, self._live_grad_bytes)

    def _finish_stage2(self) -> None:
        for g in self.groups:  # buckets some parameter of which got no gradient this round
            for b in g.buckets:
                if b.buf is not None:
                    self._reduce_stage2(g, b)
        while self._in_flight:
            self._complete_oldest()
        if self._sp_tp_group is not None:
            # SP: TP-replicated params saw only a sequence shard. Summing over TP commutes with the
            # DP reduction, and TP peers own the same shard positions, so sum the reduced shards.
            for p, _, _, _, master in self.pieces:
                if is_sp_partial(p):
                    dist.all_reduce(master.grad, group=self._sp_tp_group)
        for g in self.groups:
            g.grad.div_(g.divisor)

    def start_step(self, micro_batches: int) -> None:
        """Before the step's backwards: how many gradients each parameter will receive."""
        self._expected = micro_batches
        for g in self.groups:
            for b in g.buckets:
                b.pending, b.work, b.out = 0, None, None

    def _launch_ready(self, g: _Group) -> None:
        """Start reductions of complete buckets, strictly in bucket order (the same on every rank)."""
        for b in g.buckets:
            if b.work is not None:
                continue
            if b.pending < self._expected * len(b.params):
                return
            self._reduce(g, b, async_op=True)

    def _reduce(self, g: _Group, b: _Bucket, async_op: bool) -> None:
        if self._sp_tp_group is not None:
            # SP: TP-replicated params saw only a sequence shard; sum over TP before DP reduces
            for p in b.params:
                if is_sp_partial(p):
                    start = g.offsets[id(p)]
                    dist.all_reduce(g.grad[start:start + p.numel()], group=self._sp_tp_group)
        if g.group is None:
            b.work = True
            return
        buf = self._in_reduce_dtype(g.grad[b.start:b.end])
        if self.shard_enabled:  # each rank keeps the summed 1/N of the bucket
            b.out, work = self._start_reduce_scatter(g, b, buf, async_op)
        else:
            b.out = buf
            work = dist.all_reduce(buf, group=g.group, async_op=async_op)
        b.work = work if async_op else True

    def _in_reduce_dtype(self, grads: torch.Tensor) -> torch.Tensor:
        return grads if grads.dtype == self.reduce_dtype else grads.to(self.reduce_dtype)

    def _start_reduce_scatter(self, g: _Group, b: _Bucket, grads: torch.Tensor,
                              async_op: bool) -> tuple[torch.Tensor, object]:
        """Reduce-scatter bucket ``b``'s gradients [end - start] over g's group: (this rank's summed
        shard [(end - start) / size], the work handle, None when synchronous)."""
        shard = torch.empty((b.end - b.start) // g.size, dtype=grads.dtype, device=grads.device)
        return shard, _reduce_scatter_single(shard, grads, group=g.group, async_op=async_op)

    def finish_grad_sync(self) -> None:
        """Wait for (or run) every bucket's reduction and scale the owned shards to the mean."""
        if self.stage == 2:
            self._finish_stage2()
            return
        for g in self.groups:
            for b, lo, hi in g.shards():
                if b.work is None:
                    self._reduce(g, b, async_op=False)
                elif b.work is not True:
                    b.work.wait()
                if b.out is not None and b.out.data_ptr() != g.grad[lo:hi].data_ptr():
                    g.grad[lo:hi].copy_(b.out if self.shard_enabled else b.out[lo - b.start:hi - b.start])
                g.grad[lo:hi].div_(g.divisor)

    # -- norm, clip, step -------------------------------------------------------------------------
    def grad_norm_sq_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(TP-split dense, TP-replicated dense, expert) squared norms over this rank's shards, each
        summed over its sharding group."""
        parts = []
        for want in ("sharded", "replicated", "expert"):
            sq = torch.zeros((), dtype=torch.float64)
            for p, g, _, _, master in self.pieces:
                kind = "expert" if g.name == "expert" else (
                    "sharded" if is_tp_split(p) else "replicated")
                if kind == want:
                    sq += master.grad.double().pow(2).sum().cpu()
            group = next((g for g in self.groups if g.name == ("expert" if want == "expert" else "dense")),
                         None)
            if group is not None and group.group is not None and self.shard_enabled:  # shards -> whole
                dist.all_reduce(sq, group=group.group)
            parts.append(sq)
        return parts[0], parts[1], parts[2]

    def clip(self, coeff: float) -> None:
        if coeff < 1.0:
            for *_, master in self.pieces:
                master.grad.mul_(coeff)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """AdamW on the master shards, then write each updated shard back and all-gather its bucket
        (async with --overlap-param-gather: a bucket's copy-in waits for the first forward that
        needs it, see :meth:`_install_gather_hooks`)."""
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.step()
        for g in self.groups:
            dtype = g.params[0].dtype
            for bucket, lo, hi in g.shards():
                shard = torch.zeros(hi - lo, dtype=dtype, device=g.grad.device)
                for _, pg, a, b, master in self.pieces:
                    if pg is g and lo <= a < hi:
                        shard[a - lo:b - lo].copy_(master)
                work, full = None, shard
                if g.size > 1:
                    full = torch.empty(bucket.end - bucket.start, dtype=dtype, device=shard.device)
                    work = _all_gather_single(full, shard, group=g.group, async_op=self.overlap_param_gather)
                bucket.gather = (work, full, shard)  # the shard stays alive until the gather is done
                if not self.overlap_param_gather:
                    self._finish_gather(g, bucket)

    def _finish_gather(self, g: _Group, bucket: _Bucket) -> None:
        work, full, _shard = bucket.gather
        bucket.gather = None
        if work is not None:
            work.wait()
        for p in bucket.params:
            start = g.offsets[id(p)] - bucket.start
            p.data.copy_(full[start:start + p.numel()].view_as(p))

    def finish_param_sync(self) -> None:
        """Complete every pending parameter all-gather (before reading weights outside a forward:
        checkpoints, the end of training)."""
        for g in self.groups:
            for b in g.buckets:
                if b.gather is not None:
                    self._finish_gather(g, b)

    def _install_gather_hooks(self, model: nn.Module) -> None:
        """Megatron-style: every module with parameters of its own waits, just before its forward,
        for the all-gathers of the buckets holding them; the other buckets keep gathering meanwhile."""
        where = {id(p): (g, b) for g in self.groups for b in g.buckets for p in b.params}
        for module in model.modules():
            needed = {id(where[id(p)][1]): where[id(p)] for p in module.parameters(recurse=False)
                      if id(p) in where}
            if needed:
                module.register_forward_pre_hook(self._make_gather_hook(list(needed.values())))

    def _make_gather_hook(self, needed: list[tuple[_Group, _Bucket]]):
        def hook(_module: nn.Module, _args: object) -> None:
            for g, b in needed:
                if b.gather is not None:
                    self._finish_gather(g, b)

        return hook

    def zero_grad(self) -> None:
        for g in self.groups:
            g.grad.zero_()
            for b in g.buckets:
                b.buf, b.fired = None, set()

    # -- accounting and state ---------------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds: model parameters, gradient buffers, fp32 masters + AdamW state."""
        params = sum(p.numel() * p.element_size() for g in self.groups for p in g.params)
        grads = sum(g.grad.numel() * g.grad.element_size() for g in self.groups)
        masters = sum(m.numel() * 4 for *_, m in self.pieces)
        out = dict(params=params, grads=grads, master=masters, optimizer=2 * masters)
        if self.stage == 2:  # transient buckets, typically two reducing and one filling
            full = sum(g.numel for g in self.groups)
            biggest = max(b.end - b.start for g in self.groups for b in g.buckets)
            out["grad_buckets"] = 4 * min(full, 3 * biggest)
        return out

    # -- checkpoint interface (layout-independent: whole local parameters) ------------------------
    STATE_KINDS = ("master", "exp_avg", "exp_avg_sq")

    def full_param_states(self) -> tuple[dict[int, dict[str, torch.Tensor]], float]:
        """Every local parameter's fp32 master and AdamW moments, shaped like the parameter, rebuilt
        from the shards (a collective over each sharding group); and the AdamW step count."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        step = 0.0
        for g in self.groups:
            flats = {k: torch.zeros(g.numel, dtype=torch.float32, device=g.grad.device)
                     for k in self.STATE_KINDS}
            for _, pg, a, b, master in self.pieces:
                if pg is not g:
                    continue
                st = self.inner.state.get(master, {})
                flats["master"][a:b] = master.detach()
                for k in ("exp_avg", "exp_avg_sq"):
                    if k in st:
                        flats[k][a:b] = st[k]
                if "step" in st:
                    step = float(st["step"])
            if g.size > 1:
                for flat in flats.values():
                    dist.all_reduce(flat, group=g.group)  # disjoint shards: the sum is the whole
            for p in g.params:
                start = g.offsets[id(p)]
                out[id(p)] = {k: f[start:start + p.numel()].view(p.shape).clone() for k, f in flats.items()}
        return out, step

    def load_full_param_states(self, states: dict[int, dict[str, torch.Tensor]], step: float) -> None:
        """Inverse of :meth:`full_param_states`: keep this rank's shard of each parameter's state."""
        with torch.no_grad():
            for p, g, a, b, master in self.pieces:
                st = states[id(p)]
                start = g.offsets[id(p)]
                master.copy_(st["master"].reshape(-1)[a - start:b - start])
                if "exp_avg" in st:
                    self.inner.state[master] = {
                        "step": torch.tensor(step, dtype=torch.float32),
                        "exp_avg": st["exp_avg"].reshape(-1)[a - start:b - start].clone(),
                        "exp_avg_sq": st["exp_avg_sq"].reshape(-1)[a - start:b - start].clone()}



def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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
