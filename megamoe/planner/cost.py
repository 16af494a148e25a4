"""Step-time model of a megamoe layout on a cluster (issue 19): a typed breakdown per term.

    step = compute + fixed costs + TP comm + exposed expert exchange + PP p2p + pipeline bubble
           + exposed DP / expert-DP gradient reduction + exposed ZeRO parameter all-gather + optimizer

- compute: model FLOPs (:func:`megamoe.training.metrics.model_flops_per_token`, the MFU count) of the
  busiest rank over ``peak x efficiency``. The dense part splits evenly over TP x DP x PP, except the
  LM head, which only the last stage runs; the expert part splits over the world x the EP-rank load
  max/mean of the measured expert load (1 when uniform), x TP when TP > 1 without SP or TP-dedup
  (every TP rank runs every token's experts). Recomputation adds the recomputed forward: full = the
  decoder layers' forward again (1/3 of their training FLOPs), selective = the attention core's.
  Ranks that outnumber the cores (CPU) share them: the rate is divided by world_size / cores.
- fixed: per micro-batch and decoder layer forward + backward (Python, autograd, launches), measured by
  calibration; 0 on a GPU cluster unless given.
- communication: bytes and messages each rank sends, from :mod:`megamoe.planner.step_traffic`, over the
  cluster's intra- or inter-node bandwidth plus a latency per message. TP collectives and the
  gradient reduction use the all-reduce fit, the expert exchange the all-to-all fit.
- overlap (only when every rank has a core or device of its own, ``Cluster.overlap``): K > 1 chunks of
  the flat exchange hide min(exchange, expert compute) x (K - 1) / K; --overlap-grad-reduce hides the
  gradient reduction behind the last micro-batch's backward (ZeRO-2: every micro-batch's);
  --overlap-param-gather hides the parameter all-gather behind the first micro-batch's forward.
- bubble: 1F1B idles (PP - 1) micro-batch times per step, interleaving divides that by the virtual
  stages: (PP - 1) / VP x (busiest stage's compute + comm) / micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from megamoe.config import Config, ConfigError
from megamoe.planner.calibrate import Calibration, LinkFit
from megamoe.planner.layouts import Layout, SearchSpace, enumerate_layouts
from megamoe.planner.memory import MemoryEstimate, memory_per_rank
from megamoe.planner.step_traffic import StepTraffic, step_traffic
from megamoe.planner.traffic import Traffic
from megamoe.training.metrics import model_flops_per_token

GB = 1e9


@dataclass(frozen=True)
class Cluster:
    """Per-rank hardware. Bandwidths in GB/s per rank and direction; peak in TFLOP/s per rank."""

    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    peak_tflops: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    efficiency: float = 0.5  # achieved share of the peak on the model's GEMMs
    intra_latency_s: float = 5e-6
    inter_latency_s: float = 1e-5
    # all-reduce style collectives (TP, gradients) when measured apart from all-to-all (calibration)
    intra_allreduce: LinkFit | None = None
    layer_overhead_s: float = 0.0
    microbatch_overhead_s: float = 0.0
    # memory a layout must leave free (allocator fragmentation, NCCL buffers, the model's error)
    memory_headroom_gib: float = 0.0
    cores: int | None = None  # CPU: ranks share this many cores; None: a device per rank
    optimizer_bytes_per_s: float = 1.5e12  # AdamW streams its state at about half of HBM bandwidth

    @property
    def usable_memory_gib(self) -> float:
        """What a layout may use per rank: the memory less the headroom."""
        return self.gpu_memory_gib - self.memory_headroom_gib

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def share(self) -> float:
        """Fraction of a core each rank gets (1 with a device or core per rank)."""
        return 1.0 if self.cores is None else min(1.0, self.cores / self.world_size)

    @property
    def overlap(self) -> bool:
        """Communication overlaps compute only when nothing else needs the rank's core/device time."""
        return self.share >= 1.0

    def intra(self) -> LinkFit:
        return LinkFit(self.intra_latency_s, self.intra_node_bandwidth)

    def inter(self) -> LinkFit:
        return LinkFit(self.inter_latency_s, self.inter_node_bandwidth)

    @staticmethod
    def from_calibration(cal: Calibration, nodes: int, gpus_per_node: int, memory_gib: float,
                         memory_headroom_gib: float = 0.0) -> Cluster:
        """This machine as measured, for nodes x gpus_per_node ranks (the fits of the nearest world
        size measured: collectives between W forked ranks on shared cores cost what W's fit says)."""
        world = nodes * gpus_per_node
        near = min(cal.alltoall, key=lambda w: (abs(w - world), -w))
        a2a, ar = cal.alltoall[near], cal.allreduce[near]
        rate = cal.model_tflops or cal.gemm_tflops
        return Cluster(nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gib=memory_gib, peak_tflops=rate,
                       intra_node_bandwidth=a2a.bandwidth_gbs, inter_node_bandwidth=a2a.bandwidth_gbs,
                       efficiency=1.0, intra_latency_s=a2a.latency_s, inter_latency_s=a2a.latency_s,
                       intra_allreduce=ar, layer_overhead_s=cal.layer_overhead_s,
                       microbatch_overhead_s=cal.microbatch_overhead_s, cores=cal.cores,
                       optimizer_bytes_per_s=cal.optimizer_bytes_per_s,
                       memory_headroom_gib=memory_headroom_gib)


@dataclass(frozen=True)
class StepBreakdown:
    """Seconds per training step of the busiest rank. ``*_hidden_s`` are the parts of the term before
    them that overlap with compute (already subtracted from ``total_s``)."""

    compute_s: float
    recompute_s: float  # included in compute_s
    fixed_s: float
    tp_comm_s: float
    exchange_intra_s: float
    exchange_inter_s: float
    exchange_hidden_s: float
    pp_p2p_s: float
    pp_bubble_s: float
    dp_reduce_s: float
    edp_reduce_s: float
    grad_reduce_hidden_s: float
    param_gather_s: float
    param_gather_hidden_s: float
    optimizer_s: float

    @property
    def total_s(self) -> float:
        return (self.compute_s + self.fixed_s + self.tp_comm_s + self.exchange_intra_s + self.exchange_inter_s
                - self.exchange_hidden_s + self.pp_p2p_s + self.pp_bubble_s + self.dp_reduce_s
                + self.edp_reduce_s - self.grad_reduce_hidden_s + self.param_gather_s
                - self.param_gather_hidden_s + self.optimizer_s)

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self) | {"total_s": self.total_s}


@dataclass(frozen=True)
class Flops:
    """Training FLOPs per step of the busiest rank: dense (attention, MLPs, router, head) and expert."""

    dense: float
    expert: float
    recompute: float


def _expert_flops_per_token(cfg: Config) -> float:
    """The routed experts' share of model_flops_per_token: the count with top-k 0 is everything else."""
    no_experts = cfg.replace(moe=dataclasses.replace(cfg.moe, router_topk=0))
    return model_flops_per_token(cfg) - model_flops_per_token(no_experts)


def load_imbalance(cfg: Config, ep: int, expert_load: Sequence[Sequence[float]] | None) -> float:
    """Sum over MoE layers of the busiest EP rank's load over the sum of the mean rank loads, with
    experts placed in contiguous blocks (megamoe's default placement); 1 for uniform loads or EP 1."""
    if expert_load is None or ep == 1:
        return 1.0
    per = cfg.moe.num_experts // ep
    busiest = sum(max(sum(layer[r * per:(r + 1) * per]) for r in range(ep)) for layer in expert_load)
    mean = sum(sum(layer) / ep for layer in expert_load)
    return busiest / mean if mean > 0 else 1.0


def step_flops(cfg: Config, layout: Layout, expert_load: Sequence[Sequence[float]] | None = None) -> Flops:
    """FLOPs of the busiest rank per step (see the module docstring)."""
    m = cfg.model
    tokens = cfg.train.global_batch_size * m.seq_length
    head = 3 * 2 * m.hidden_size * m.padded_vocab_size(1) * tokens  # LM head, forward + backward
    expert = _expert_flops_per_token(cfg) * tokens
    body = model_flops_per_token(cfg) * tokens - expert - head  # decoder layers without experts
    replicas = layout.dp * layout.tp
    dense = body / layout.pp / replicas + head / replicas  # the last stage: its layers and the head
    copies = layout.tp if layout.tp_copies else 1
    expert_rank = expert * copies / layout.world_size * load_imbalance(cfg, layout.ep, expert_load)
    recompute = 0.0
    if layout.recompute == "full":
        recompute = (body / layout.pp / replicas + expert_rank) / 3
    elif layout.recompute == "selective":  # QK^T and AV forward: 2 * q * s per token and layer
        q = m.num_attention_heads * m.kv_channels
        recompute = 2 * q * m.seq_length * m.num_layers * tokens / layout.pp / replicas
    return Flops(dense=dense, expert=expert_rank, recompute=recompute)


def _seconds(t: Traffic, intra: LinkFit, inter: LinkFit) -> tuple[float, float]:
    """(intra, inter) seconds of a :class:`megamoe.planner.traffic.Traffic`."""
    return (intra.seconds(t.bytes_intra, t.msgs_intra), inter.seconds(t.bytes_inter, t.msgs_inter))


def _rate(cluster: Cluster) -> float:
    """FLOP/s one rank achieves on the model's GEMMs."""
    return cluster.peak_tflops * 1e12 * cluster.efficiency * cluster.share


def _bubble(layout: Layout, micro_batches: int, busy_s: float) -> float:
    """1F1B idles (PP - 1) micro-batch slots; interleaving with VP chunks cuts each slot VP-fold."""
    if layout.pp == 1:
        return 0.0
    return (layout.pp - 1) / layout.vp * busy_s / micro_batches


def bubble_fraction(pp: int, micro_batches: int, vp: int = 1) -> float:
    """Idle share of the schedule: (PP - 1) / (VP x m + PP - 1) (Narayanan et al. 2021)."""
    return (pp - 1) / (vp * micro_batches + pp - 1)


def estimate(cfg: Config, layout: Layout, cluster: Cluster, traffic: StepTraffic,
             expert_load: Sequence[Sequence[float]] | None = None,
             optimizer_bytes: float = 0.0) -> StepBreakdown:
    """The breakdown of ``layout`` (applied to ``cfg``) given its step traffic (the busiest rank's
    :class:`megamoe.planner.step_traffic.StepTraffic`) and the optimizer state it updates per rank."""
    flops = step_flops(cfg, layout, expert_load)
    rate = _rate(cluster)
    compute = (flops.dense + flops.expert + flops.recompute) / rate
    expert_s = flops.expert / rate
    m = layout.micro_batches(cfg.train.global_batch_size)
    # full recompute runs each layer's forward again: about a third more of its forward + backward
    layers = cfg.model.num_layers / layout.pp * (4 / 3 if layout.recompute == "full" else 1.0)
    fixed = m * (layers * cluster.layer_overhead_s + cluster.microbatch_overhead_s) / cluster.share
    intra, inter = cluster.intra(), cluster.inter()
    collective = cluster.intra_allreduce or intra

    def secs(category: object, link: LinkFit, part: str = "total") -> tuple[float, float]:
        return _seconds(getattr(category, part), link, inter)

    # TP: the layers' all-reduces / SP gathers, TP-dedup's gathers, routing metadata, SP norm grads;
    # every category includes what --recompute-granularity full runs again
    tp_s = sum(sum(secs(c, collective)) for c in (traffic.tensor_parallel, traffic.expert_tp_gather,
                                                    traffic.expert_metadata, traffic.sp_grad))
    ex_intra, ex_inter = secs(traffic.expert_exchange, intra)
    hidden_ex = 0.0
    if cluster.overlap and layout.chunks > 1 and layout.exchange != "hierarchical":
        hidden_ex = min(ex_intra + ex_inter, expert_s) * (layout.chunks - 1) / layout.chunks
    p2p = sum(secs(traffic.pipeline, intra))
    busy = compute + fixed + tp_s + ex_intra + ex_inter - hidden_ex + p2p
    dp_s = sum(secs(traffic.dense_grad, collective, "backward"))
    edp_s = sum(secs(traffic.expert_grad, collective, "backward"))
    gather_s = sum(sum(secs(c, collective, "optimizer")) for c in (traffic.dense_grad, traffic.expert_grad))
    hidden_grad = hidden_gather = 0.0
    if cluster.overlap and cfg.train.overlap_grad_reduce:
        backward = compute * 2 / 3 / (1 if layout.zero == 2 else m)
        hidden_grad = min(dp_s + edp_s, backward)
    if cluster.overlap and cfg.train.overlap_param_gather:
        hidden_gather = min(gather_s, compute / 3 / m)
    return StepBreakdown(
        compute_s=compute, recompute_s=flops.recompute / rate, fixed_s=fixed, tp_comm_s=tp_s,
        exchange_intra_s=ex_intra, exchange_inter_s=ex_inter, exchange_hidden_s=hidden_ex, pp_p2p_s=p2p,
        pp_bubble_s=_bubble(layout, m, busy), dp_reduce_s=dp_s, edp_reduce_s=edp_s,
        grad_reduce_hidden_s=hidden_grad, param_gather_s=gather_s, param_gather_hidden_s=hidden_gather,
        optimizer_s=optimizer_bytes / cluster.optimizer_bytes_per_s / cluster.share)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: Sequence[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        out = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else 0.0


# -- ranking -------------------------------------------------------------------------------------------
GIB = 2**30


class NoLayoutFits(ValueError):
    """No layout fits the cluster's memory; the message is one line saying by how much."""


@dataclass(frozen=True)
class PlannedLayout:
    """One ranked layout: its predicted step and memory per rank (bytes, the worst stage)."""

    layout: Layout
    breakdown: StepBreakdown
    memory: MemoryEstimate

    @property
    def step_time_s(self) -> float:
        return self.breakdown.total_s

    @property
    def memory_gib(self) -> float:
        return self.memory.total / GIB


LayerLoads = dict[int, list[float]]  # global MoE layer index -> per-expert loads


def expert_load_by_layer(cfg: Config, expert_load: Sequence[Sequence[float]] | None) -> LayerLoads | None:
    """The rebalancer's load format (a list, one per MoE layer in order, of per-expert loads) keyed
    by global layer index; ConfigError (one line) when it does not match the model."""
    if expert_load is None:
        return None
    moe_layers = [i for i in range(cfg.model.num_layers) if cfg.moe.is_moe_layer(i)]
    if len(expert_load) != len(moe_layers):
        raise ConfigError(f"--expert-load has {len(expert_load)} MoE layer(s), the model {len(moe_layers)}; "
                          "give one list of per-expert loads per MoE layer")
    bad = [i for i, loads in enumerate(expert_load) if len(loads) != cfg.moe.num_experts]
    if bad:
        raise ConfigError(f"--expert-load MoE layer {bad[0]} has {len(expert_load[bad[0]])} loads, the model "
                          f"{cfg.moe.num_experts} experts")
    return {layer: list(map(float, loads)) for layer, loads in zip(moe_layers, expert_load)}


def _fitting(base: Config, layouts: Sequence[Layout], limit: float,
             load: LayerLoads | None) -> tuple[list[tuple[Layout, Config, MemoryEstimate]], tuple]:
    """The layouts whose memory fits ``limit`` bytes, and (bytes, layout, estimate) of the leanest.
    Recomputation only adds time here, so of the layouts that differ only in it the first that fits
    in the order none, selective, full is kept (the others need no estimate)."""
    groups: dict[Layout, list[Layout]] = {}
    for layout in layouts:
        groups.setdefault(dataclasses.replace(layout, recompute=None), []).append(layout)
    order = {None: 0, "selective": 1, "full": 2}
    fits, leanest = [], (math.inf, None, None)
    for members in groups.values():
        for layout in sorted(members, key=lambda x: order[x.recompute]):
            cfg = layout.apply(base)
            mem = memory_per_rank(cfg, layout.world_size, load)
            if mem.total < leanest[0]:
                leanest = (mem.total, layout, mem)
            if mem.total <= limit:
                fits.append((layout, cfg, mem))
                break
    return fits, leanest


def _too_small(base: Config, cluster: Cluster, leanest: tuple, model_name: str) -> NoLayoutFits:
    need, layout, mem = leanest
    state = (mem.weights + mem.grads + mem.optimizer) / GIB
    return NoLayoutFits(
        f"{model_name} needs at least {need / GIB:.1f} GiB per rank (weights+grads+optimizer {state:.1f}, "
        f"activations+exchange buffers {(mem.activations + mem.exchange_buffers) / GIB:.1f}) at its leanest "
        f"layout on {cluster.nodes}x{cluster.gpus_per_node} ranks ({layout.label()}); --gpu-memory-gib "
        f"{cluster.gpu_memory_gib:g}{_headroom_note(cluster)} is "
        f"{need / GIB - cluster.usable_memory_gib:.1f} GiB short: add nodes or memory, or shorten "
        "--seq-length / the model")


def _headroom_note(cluster: Cluster) -> str:
    headroom = cluster.memory_headroom_gib
    return f" less --memory-headroom-gib {headroom:g}" if headroom else ""


def busiest(cfg: Config, layout: Layout, cluster: Cluster, expert_load: Sequence[Sequence[float]] | None,
            optimizer_bytes: float) -> StepBreakdown:
    """The breakdown of the rank with the longest predicted step. Collectives are synchronous, so the
    step is as long as its slowest rank's (the ring hop that crosses nodes, the last stage's head)."""
    per_rank = step_traffic(cfg, layout.world_size, cluster.gpus_per_node, expert_load)
    distinct = {dataclasses.astuple(t): t for t in per_rank}.values()
    return max((estimate(cfg, layout, cluster, t, expert_load, optimizer_bytes) for t in distinct),
               key=lambda b: b.total_s)


def lower_bound(cfg: Config, layout: Layout, cluster: Cluster, expert_load: Sequence[Sequence[float]] | None,
                optimizer_bytes: float) -> float:
    """A step no shorter than :func:`estimate`'s for any traffic: the terms without communication."""
    return estimate(cfg, layout, cluster, StepTraffic(), expert_load, optimizer_bytes).total_s


@dataclass(frozen=True)
class Ranking:
    """The ``top`` fastest layouts under the model, to ``tolerance``: no layout left unevaluated can be
    more than that fraction faster than the slowest of them (its lower bound says so), unless
    ``exhausted``: the evaluation budget ran out first."""

    plans: list[PlannedLayout]
    fitting: int  # layouts that fit in memory
    evaluated: int  # of them, with their full traffic
    exhausted: bool
    tolerance: float


def rank_layouts(base: Config, cluster: Cluster, expert_load: Sequence[Sequence[float]] | None = None,
                 space: SearchSpace | None = None, model_name: str = "the model", top: int = 5,
                 max_evaluations: int = 2000, tolerance: float = 0.01) -> Ranking:
    """The ``top`` valid layouts of the cluster that fit its memory, fastest predicted step first.

    Branch and bound: layouts are visited in order of :func:`lower_bound` (compute, fixed costs, the
    bubble of those and the optimizer step) and the full traffic model (the costly part) runs until
    the next lower bound cannot beat the ``top``-th step found by more than ``tolerance`` (many layouts
    share a compute bound: proving ties apart costs their traffic for nothing), or
    ``max_evaluations`` have run.
    NoLayoutFits (one line) when none fits; ConfigError when the model admits no layout at all."""
    load = expert_load_by_layer(base, expert_load)
    layouts = enumerate_layouts(base, cluster.world_size, cluster.gpus_per_node, space or SearchSpace())
    if not layouts:
        raise ConfigError(f"no parallel layout of {cluster.world_size} ranks divides this model and batch "
                          f"(heads {base.model.num_attention_heads}, layers {base.model.num_layers}, experts "
                          f"{base.moe.num_experts}, --global-batch-size {base.train.global_batch_size}); "
                          "change the cluster size or the batch")
    fits, leanest = _fitting(base, layouts, cluster.usable_memory_gib * GIB, load)
    if not fits:
        raise _too_small(base, cluster, leanest, model_name)
    bounded = sorted(((lower_bound(cfg, lay, cluster, expert_load, mem.optimizer), i)
                      for i, (lay, cfg, mem) in enumerate(fits)))
    planned: list[PlannedLayout] = []
    for evaluated, (bound, i) in enumerate(bounded):
        if len(planned) >= top and bound * (1 + tolerance) >= planned[top - 1].step_time_s:
            return Ranking(planned[:top], len(fits), evaluated, False, tolerance)
        if evaluated >= max_evaluations:
            return Ranking(planned[:top], len(fits), evaluated, True, tolerance)
        layout, cfg, mem = fits[i]
        planned.append(PlannedLayout(layout, busiest(cfg, layout, cluster, expert_load, mem.optimizer), mem))
        planned.sort(key=lambda p: p.step_time_s)
    return Ranking(planned[:top], len(fits), len(bounded), False, tolerance)
