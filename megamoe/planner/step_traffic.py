"""Communication model of a whole megamoe training step: every collective and send one rank runs
(:func:`step_collectives`) and what it sends, per category and phase (:func:`step_traffic`), in bytes
and messages, intra / inter node.

The expert all-to-alls come from the per-layer model (``megamoe/planner/traffic.py``, checked against
megamoe's own byte counters); the other categories (TP, pipeline p2p, DP / expert-DP gradient
reduction, ZeRO parameter all-gather) are not counted by megamoe: they are derived here from tensor
shapes and megamoe's own bucket layout, and tests/distributed/test_planner_traffic.py checks them
against the collectives of real runs. Collectives are rings over the group's members in rank order
(see traffic.py's :class:`~megamoe.planner.traffic.Collective`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megamoe.config import Config, ConfigError, stage_layer_ranges
from megamoe.parallel.mesh import ParallelMesh
from megamoe.planner.traffic import (
    Collective,
    Sends,
    Summable,
    Traffic,
    chunk_sizes,
    dispatch_row_bytes,
    dispatched_tokens,
    exchange_collectives,
    expected_exchange_traffic,
    layout_mesh,
    rank_nodes,
)

__all__ = ["CategoryTraffic", "Plan", "StepTraffic", "step_collectives", "step_traffic"]


@dataclass(frozen=True)
class CategoryTraffic(Summable):
    """One category's traffic of one rank per step. forward / backward: sent during the forward and
    backward passes (gradient reductions count as backward: they run during it with
    --overlap-grad-reduce, right after it otherwise); recompute: forward collectives run again by
    --recompute-granularity full (during backward; megamoe's counters do not count them);
    optimizer: after backward, the ZeRO parameter all-gather (overlapping the next forward with
    --overlap-param-gather)."""

    forward: Traffic = Traffic()
    backward: Traffic = Traffic()
    recompute: Traffic = Traffic()
    optimizer: Traffic = Traffic()

    @property
    def total(self) -> Traffic:
        return sum(self._values(), Traffic())


@dataclass(frozen=True)
class StepTraffic(Summable):
    """Everything one rank sends in one training step (``global_batch / (micro_batch x DP)``
    micro-batches), by category; bytes and messages, intra / inter node.

    expert_exchange: the MoE all-to-alls (forward = megamoe's a2a counters; backward mirrors them).
    expert_tp_gather: TP-dedup's all-gathers over TP of each MoE layer's output / input gradient.
    expert_metadata: all-gathers of the per-expert row counts over EP and, under SP, of the routing
      choices over TP (int64; small).
    tensor_parallel: TP all-reduces (no SP) or all-gathers / reduce-scatters (SP) of the [b, s, h]
      activations entering and leaving attention and dense MLPs, the embedding and LM head, and the
      vocab-parallel cross-entropy's two fp32 all-reduces ([N] max, [2, N] target logit and sum).
    pipeline: point-to-point activations forward, their gradients backward, [b, s(/TP under SP), h].
    dense_grad / expert_grad: gradient buckets summed over DP / expert-DP: all-reduce, or with
      --use-distributed-optimizer reduce-scatter (ZeRO-2: every micro-batch) + the parameter
      all-gather after the step (in ``optimizer``).
    sp_grad: under SP, the all-reduce over TP of the owned gradients of norms and router gates.
    Not modelled: scalar reductions (losses, grad norm, stop flags), a few bytes per step.
    """

    expert_exchange: CategoryTraffic = CategoryTraffic()
    expert_tp_gather: CategoryTraffic = CategoryTraffic()
    expert_metadata: CategoryTraffic = CategoryTraffic()
    tensor_parallel: CategoryTraffic = CategoryTraffic()
    pipeline: CategoryTraffic = CategoryTraffic()
    dense_grad: CategoryTraffic = CategoryTraffic()
    expert_grad: CategoryTraffic = CategoryTraffic()
    sp_grad: CategoryTraffic = CategoryTraffic()

    @property
    def total(self) -> Traffic:
        return sum((category.total for category in self._values()), Traffic())


# Collectives by category and phase: {category: {phase: [Collective]}}
Plan = dict[str, dict[str, list[Collective]]]


def _act_bytes(cfg: Config) -> int:
    """Bytes of one micro-batch's full-sequence activation [b, s, h] in the compute dtype."""
    return cfg.train.micro_batch_size * cfg.model.seq_length * dispatch_row_bytes(cfg)


def _tp_region(cfg: Config) -> tuple[list[Collective], list[Collective]]:
    """(forward, backward) collectives of one TP region (enter, column-parallel, row-parallel, exit:
    megamoe.parallel.tensor.TPContext) per micro-batch. Without SP, enter = copy (backward all-reduce)
    and exit = all-reduce (forward); with SP, enter all-gathers the sequence (backward
    reduce-scatter) and exit reduce-scatters it (backward all-gather)."""
    act = _act_bytes(cfg)
    if cfg.parallel.sequence_parallel:
        return ([Collective("all_gather", "tp", act), Collective("reduce_scatter", "tp", act)],
                [Collective("reduce_scatter", "tp", act), Collective("all_gather", "tp", act)])
    return [Collective("all_reduce", "tp", act)], [Collective("all_reduce", "tp", act)]


def _stage_chunks(cfg: Config, mesh: ParallelMesh, pp_rank: int) -> tuple[list[int], list[range]]:
    """(virtual stages v = chunk x PP + pp_rank held by this pipeline rank, every stage's layers)."""
    p = cfg.parallel
    vp = p.virtual_stages(cfg.model.num_layers)
    ranges = stage_layer_ranges(cfg.model.num_layers, mesh.pp, vp, p.decoder_first_pipeline_num_layers,
                                p.decoder_last_pipeline_num_layers)
    return [c * mesh.pp + pp_rank for c in range(vp)], ranges


def _recomputed(cfg: Config, layers: range) -> tuple[set[int], set[int]]:
    """(layers of one chunk whose forward --recompute-granularity full runs again in backward, the last
    layer of each recomputed segment). torch's non-reentrant checkpoint stops a recomputation once
    the last tensor saved for backward is back, so a segment's final collectives, whose results
    nothing saves (a TP exit, TP-dedup's output gather), do not run again."""
    t = cfg.train
    if t.recompute_granularity != "full":
        return set(), set()
    from megamoe.training.recompute import full_recompute_segments

    segments = [[int(k) for k in keys] for keys, again in full_recompute_segments(
        [str(i) for i in layers], t.recompute_method, t.recompute_num_layers) if again]
    return {i for seg in segments for i in seg}, {seg[-1] for seg in segments}


def _layer_plan(cfg: Config, layer: int, n_mb: int, again: bool, last: bool, plan: Plan) -> None:
    """TP collectives of one decoder layer over the step (n_mb micro-batches): attention and dense
    MLPs each one TP region; an MoE layer's own (TP-dedup gather, SP routing gather) are added with
    the exchange. ``again``: the forward runs a second time (full recompute), ``last``: the final one
    of its recomputed segment (the last region's exit is not re-run)."""
    if cfg.parallel.tensor_model_parallel_size == 1:
        return
    is_moe = cfg.moe.is_moe_layer(layer)
    ends_dense = not is_moe or cfg.model.model_family != "mixtral"  # a dense MLP closes the layer
    regions = 1 + ends_dense  # attention; the MLP or OpenMoE's extra MLP
    fwd, bwd = _tp_region(cfg)
    tp = plan["tensor_parallel"]
    tp["forward"] += [dataclasses.replace(c, count=regions * n_mb) for c in fwd]
    tp["backward"] += [dataclasses.replace(c, count=regions * n_mb) for c in bwd]
    if again:
        skipped = int(last and ends_dense)
        tp["recompute"] += [dataclasses.replace(c, count=(regions - skipped * (c is fwd[-1])) * n_mb)
                            for c in fwd]


def _ends_plan(cfg: Config, first: bool, last: bool, n_mb: int, plan: Plan) -> None:
    """TP collectives of the embedding (exit of a vocab-parallel lookup) and of the LM head (enter)
    with the vocab-parallel cross-entropy (fp32 all-reduces of [N] maxima and [2, N] target logits
    and sums, N = b x s) per step."""
    if cfg.parallel.tensor_model_parallel_size == 1:
        return
    fwd, bwd = _tp_region(cfg)
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    tp = plan["tensor_parallel"]
    if first:  # exit only: forward all-reduce (SP: reduce-scatter; backward all-gather)
        tp["forward"].append(dataclasses.replace(fwd[-1], count=n_mb))
        if cfg.parallel.sequence_parallel:
            tp["backward"].append(dataclasses.replace(bwd[-1], count=n_mb))
    if last:  # enter only: backward all-reduce (SP: forward all-gather, backward reduce-scatter)
        if cfg.parallel.sequence_parallel:
            tp["forward"].append(dataclasses.replace(fwd[0], count=n_mb))
        tp["backward"].append(dataclasses.replace(bwd[0], count=n_mb))
        tp["forward"] += [Collective("all_reduce", "tp", 4 * tokens, n_mb),
                          Collective("all_reduce", "tp", 8 * tokens, n_mb)]


def _pipeline_plan(cfg: Config, stages: list[int], num_stages: int, n_mb: int, plan: Plan) -> None:
    """Per micro-batch and chunk: the output to the next virtual stage (unless last) and the input
    gradient to the previous one (unless first), [b, s(/TP under SP), h] in the compute dtype."""
    shard = cfg.parallel.tensor_model_parallel_size if cfg.parallel.sequence_parallel else 1
    nbytes = _act_bytes(cfg) // shard
    for v in stages:
        if v < num_stages - 1:
            plan["pipeline"]["forward"].append(Collective("send", "pp", nbytes, n_mb, peer=1))
        if v > 0:
            plan["pipeline"]["backward"].append(Collective("send", "pp", nbytes, n_mb, peer=-1))


@dataclass(frozen=True)
class _Bucket:
    """A gradient bucket as megamoe.parallel.grad_buffer.GroupLayout builds it: numel (padded to a
    multiple of the replicas under ZeRO), the parameters' element size, and the [start, end) spans of
    its SP-partial parameters (norms, router gates), relative to the bucket."""

    numel: int
    param_bytes: int
    sp_spans: tuple[tuple[int, int], ...]


def _stage_buckets(cfg: Config, world_size: int, pp_rank: int) -> dict[str, tuple[_Bucket, ...]]:
    """:func:`_built_buckets`, cached over the flags that do not change parameters or buckets."""
    p, t = cfg.parallel, cfg.train
    key = cfg.replace(parallel=dataclasses.replace(p, moe_hierarchical_alltoall=False, moe_alltoall_chunks=1,
                                                   moe_ranks_per_node=0),
                      train=dataclasses.replace(t, zero_stage=1, overlap_grad_reduce=False,
                                                overlap_param_gather=False, recompute_granularity=None))
    return _built_buckets(key, world_size, pp_rank)


@functools.lru_cache(maxsize=64)
def _built_buckets(cfg: Config, world_size: int, pp_rank: int) -> dict[str, tuple[_Bucket, ...]]:
    """The dense and expert gradient buckets of pipeline rank ``pp_rank`` (the same on each of its TP
    and EP ranks), from megamoe's own model and bucket layout built on the meta device (no memory)."""
    import torch
    import torch.fx.experimental._config as fx_config

    from megamoe.parallel.grad_buffer import GroupLayout
    from megamoe.params import cast_params, is_expert, is_sp_partial
    from megamoe.training.run import build_stage_model

    mesh = layout_mesh(cfg, world_size, world_size)
    rank = pp_rank * mesh.tp * mesh.dp  # a rank of that stage
    mesh.rank = rank
    mesh.members.update({name: next(g for g in groups if rank in g) for name, groups in mesh.grids().items()})
    # the vocab-padding index of a lookup table asks for nonzero() on meta tensors: only its role
    # metadata (not any shape) depends on the answer
    with torch.device("meta"), fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        model = build_stage_model(cfg, mesh)
    if cfg.train.bf16:
        cast_params(model, torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    t, out = cfg.train, {}
    shard = t.use_distributed_optimizer
    for name, replicas in (("dense", mesh.dp), ("expert", mesh.edp)):
        members = [p for p in params if is_expert(p) == (name == "expert")]
        if not members:
            continue
        layout = GroupLayout.build(name, members, None, replicas if shard else 1, 0, t.ddp_bucket_size)
        out[name] = tuple(_Bucket(b.end - b.start, b.params[0].element_size(), tuple(
            (layout.offsets[id(p)] - b.start, layout.offsets[id(p)] - b.start + p.numel())
            for p in b.params if is_sp_partial(p))) for b in layout.buckets)
    return out


def _grad_plan(cfg: Config, mesh: ParallelMesh, dp_index: int, pp_rank: int, n_mb: int, plan: Plan) -> None:
    """Gradient reduction of one step (megamoe.parallel.grad_buffer / optimizer): per bucket an
    all-reduce over the replicas (DP for dense, expert-DP for experts), or with ZeRO a reduce-scatter
    (stage 2: every micro-batch) and, after the step, an all-gather of the updated parameters; in fp32
    (bf16 with --grad-reduce-in-bf16). Under SP, one fp32 all-reduce over TP of the owned gradient of
    the SP-partial parameters."""
    t = cfg.train
    reduce_bytes = 2 if t.grad_reduce_in_bf16 else 4
    shard = t.use_distributed_optimizer
    for name, group, replicas in (("dense", "dp", mesh.dp), ("expert", "edp", mesh.edp)):
        for bucket in _stage_buckets(cfg, mesh.world_size, pp_rank).get(name, ()):
            if replicas > 1:
                grads = bucket.numel * reduce_bytes
                op = "reduce_scatter" if shard else "all_reduce"
                count = n_mb if shard and t.zero_stage == 2 else 1
                plan[f"{name}_grad"]["backward"].append(Collective(op, group, grads, count))
                if shard:
                    plan[f"{name}_grad"]["optimizer"].append(
                        Collective("all_gather", group, bucket.numel * bucket.param_bytes))
    if cfg.parallel.sequence_parallel:
        owned = 0
        sharded = shard and mesh.dp > 1
        for bucket in _stage_buckets(cfg, mesh.world_size, pp_rank).get("dense", ()):
            per = bucket.numel // mesh.dp if sharded else bucket.numel
            lo = dp_index * per if sharded else 0
            owned += sum(max(0, min(hi, lo + per) - max(start, lo)) for start, hi in bucket.sp_spans)
        if owned:
            plan["sp_grad"]["backward"].append(Collective("all_reduce", "tp", owned * 4))


def step_collectives(cfg: Config, world_size: int, rank: int) -> Plan:
    """Every collective and send ``rank`` runs in one training step except the expert all-to-alls,
    by category (StepTraffic's fields) and phase (CategoryTraffic's). Derived from tensor shapes;
    tests/distributed/test_planner_traffic.py checks them against the calls a real run makes."""
    mesh = layout_mesh(cfg, world_size, world_size)
    return _plan(cfg, world_size, rank // (mesh.tp * mesh.dp), (rank // mesh.tp) % mesh.dp)


@functools.lru_cache(maxsize=256)
def _plan(cfg: Config, world_size: int, pp_rank: int, dp_index: int) -> Plan:
    """step_collectives of the ranks at (pipeline rank, DP index): the same for all of them (cached:
    callers must not modify it)."""
    mesh, t = layout_mesh(cfg, world_size, world_size), cfg.train
    n_mb = t.global_batch_size // (t.micro_batch_size * mesh.dp)
    stages, ranges = _stage_chunks(cfg, mesh, pp_rank)
    plan: Plan = {f.name: {g.name: [] for g in dataclasses.fields(CategoryTraffic)}
                  for f in dataclasses.fields(StepTraffic)}
    chunks = len(chunk_sizes(cfg, dispatched_tokens(cfg, t.micro_batch_size * cfg.model.seq_length)))
    extras = exchange_collectives(cfg, chunks)
    for v in stages:
        again, last = _recomputed(cfg, ranges[v])
        for layer in ranges[v]:
            _layer_plan(cfg, layer, n_mb, layer in again, layer in last, plan)
            if not cfg.moe.is_moe_layer(layer):
                continue
            closes = layer in last and cfg.model.model_family == "mixtral"  # its output gather: no rerun
            for name, (fwd, bwd) in extras.items():
                rerun = fwd if layer in again and not (closes and name == "tp_gather") else []
                for phase, colls in (("forward", fwd), ("backward", bwd), ("recompute", rerun)):
                    plan[f"expert_{name}"][phase] += [dataclasses.replace(c, count=n_mb) for c in colls]
        _ends_plan(cfg, v == 0, v == len(ranges) - 1, n_mb, plan)
    _pipeline_plan(cfg, stages, len(ranges), n_mb, plan)
    _grad_plan(cfg, mesh, dp_index, pp_rank, n_mb, plan)
    return plan


def step_traffic(cfg: Config, world_size: int, ranks_per_node: int,
                 expert_load: Sequence[float] | Sequence[Sequence[float]] | None = None,
                 ) -> list[StepTraffic]:
    """Expected traffic of one training step of ``cfg`` on ``world_size`` ranks, ``ranks_per_node``
    per node, per global rank (bytes and messages sent, intra / inter node; see StepTraffic).

    expert_load: routing of the MoE layers, as the rebalancer's load file: one list of per-expert
    loads (every MoE layer), one per MoE layer (in layer order), or None (uniform)."""
    mesh = layout_mesh(cfg, world_size, ranks_per_node)
    nodes, t = rank_nodes(mesh), cfg.train
    group_of = {name: {r: g for g in groups for r in g} for name, groups in mesh.grids().items()}
    n_mb = t.global_batch_size // (t.micro_batch_size * mesh.dp)
    loads = _layer_loads(cfg, expert_load)
    calls = {key: expected_exchange_traffic(cfg, world_size, ranks_per_node, None, key)
             for key in set(loads.values())}  # per distinct load: every rank's one-call traffic
    out = []
    for rank in range(world_size):
        pp_rank = rank // (mesh.tp * mesh.dp)
        fields = {}
        for category, phases in _plan(cfg, world_size, pp_rank, (rank // mesh.tp) % mesh.dp).items():
            sends = {phase: Sends(nodes) for phase in phases}
            for phase, colls in phases.items():
                for coll in colls:
                    sends[phase].collective(group_of[coll.group][rank], coll, only=rank)
            fields[category] = CategoryTraffic(**{phase: s.traffic(rank) for phase, s in sends.items()})
        a2a = again = Traffic()
        stages, ranges = _stage_chunks(cfg, mesh, pp_rank)
        for v in stages:
            recomputed = _recomputed(cfg, ranges[v])[0]
            for layer in (i for i in ranges[v] if i in loads):
                call = calls[loads[layer]][rank].all_to_all.scaled(n_mb)
                a2a, again = a2a + call, again + call.scaled(layer in recomputed)
        fields["expert_exchange"] = CategoryTraffic(a2a, a2a, again)  # backward mirrors forward
        out.append(StepTraffic(**fields))
    return out


def _layer_loads(cfg: Config, expert_load) -> dict[int, tuple[float, ...] | None]:
    """MoE layer index -> its per-expert loads (None: uniform)."""
    layers = [i for i in range(cfg.model.num_layers) if cfg.moe.is_moe_layer(i)]
    if expert_load is None or not isinstance(expert_load[0], Sequence | np.ndarray):
        return dict.fromkeys(layers, None if expert_load is None else tuple(expert_load))
    if len(expert_load) != len(layers):
        raise ConfigError(f"expert load lists {len(expert_load)} MoE layers, the model has {len(layers)}; "
                          "give one list per MoE layer, or one for all")
    return {layer: tuple(load) for layer, load in zip(layers, expert_load)}
