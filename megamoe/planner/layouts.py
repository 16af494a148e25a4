"""Enumerate the parallel layouts megamoe can run a model on (issue 19, the planner's search space).

A :class:`Layout` is the part of a run the planner chooses: TP (with or without SP), PP (with virtual
stages), EP, the micro-batch size, the optimizer's sharding (none, ZeRO-1, ZeRO-2), the expert exchange
(flat, hierarchical, TP-deduplicated) with its chunk count K, and activation recomputation. DP and
expert-DP follow from the world size. :func:`enumerate_layouts` lists only layouts that
:meth:`megamoe.config.Config.validate` accepts for the world size: the planner never proposes a run that
megamoe would reject at start-up.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from megamoe.config import Config, ConfigError
from megamoe.parallel.mesh import ParallelMesh

EXCHANGE_MODES = ("flat", "hierarchical", "tp-dedup")
RECOMPUTE = (None, "selective", "full")
# The planner's own choices; a user passing one of these to the planner gets a one-line error.
LAYOUT_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                "--expert-model-parallel-size", "--sequence-parallel", "--micro-batch-size",
                "--num-layers-per-virtual-pipeline-stage", "--use-distributed-optimizer", "--zero-stage",
                "--moe-hierarchical-alltoall", "--moe-alltoall-chunks", "--no-moe-tp-dedup",
                "--moe-ranks-per-node", "--recompute-granularity", "--overlap-grad-reduce",
                "--overlap-param-gather")


@dataclass(frozen=True)
class Layout:
    """One parallel layout. ``zero``: 0 = replicated optimizer, 1/2 = --use-distributed-optimizer with
    that --zero-stage. ``exchange``: flat, hierarchical (two-level all-to-all over nodes of
    ``ranks_per_node``) or tp-dedup (TP > 1 without SP, each TP rank sends 1/TP of its tokens); flat
    with TP > 1 and no SP is --no-moe-tp-dedup (every TP rank sends every token)."""

    tp: int
    sp: bool
    pp: int
    vp: int  # virtual stages (model chunks) per pipeline rank; 1 = plain 1F1B
    ep: int
    micro_batch_size: int
    zero: int
    exchange: str
    chunks: int
    recompute: str | None
    world_size: int
    ranks_per_node: int

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: the ranks holding the same experts (ETP is 1)."""
        return self.world_size // (self.ep * self.pp)

    @property
    def tp_copies(self) -> bool:
        """TP > 1 without SP and without dedup: every TP rank dispatches (and its experts run) every
        token of the micro-batch (--no-moe-tp-dedup)."""
        return self.tp > 1 and not self.sp and self.exchange == "flat"

    def micro_batches(self, global_batch_size: int) -> int:
        """Micro-batches per step on every pipeline: global batch / (micro-batch x DP)."""
        return global_batch_size // (self.micro_batch_size * self.dp)

    def label(self) -> str:
        """Short human name, e.g. ``TP2+SP PP2x2 EP4 DP2 mbs1 ZeRO-1 flat K2``."""
        parts = [f"TP{self.tp}" + ("+SP" if self.sp else ""),
                 f"PP{self.pp}" + (f"x{self.vp}" if self.vp > 1 else ""), f"EP{self.ep}", f"DP{self.dp}",
                 f"mbs{self.micro_batch_size}", f"ZeRO-{self.zero}" if self.zero else "no-ZeRO",
                 self.exchange + (f" K{self.chunks}" if self.chunks > 1 else "")]
        if self.recompute:
            parts.append(f"recompute-{self.recompute}")
        return " ".join(parts)

    def flags(self, num_layers: int) -> list[str]:
        """The pretrain_openmoe.py arguments that select this layout (appended to the model's)."""
        out = ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp),
               "--expert-model-parallel-size", str(self.ep), "--micro-batch-size", str(self.micro_batch_size)]
        if self.sp:
            out.append("--sequence-parallel")
        if self.vp > 1:
            out += ["--num-layers-per-virtual-pipeline-stage", str(num_layers // (self.pp * self.vp))]
        if self.zero:
            out += ["--use-distributed-optimizer", "--zero-stage", str(self.zero)]
        if self.dp > 1 or self.edp > 1:
            out.append("--overlap-grad-reduce")
            if self.zero:
                out.append("--overlap-param-gather")
        if self.exchange == "hierarchical":
            out += ["--moe-hierarchical-alltoall", "--moe-ranks-per-node", str(self.ranks_per_node)]
        if self.tp_copies:
            out.append("--no-moe-tp-dedup")
        if self.chunks > 1:
            out += ["--moe-alltoall-chunks", str(self.chunks)]
        if self.recompute:
            out += ["--recompute-granularity", self.recompute]
        return out

    def apply(self, base: Config) -> Config:
        """``base`` (the model, batch and data) under this layout; not validated."""
        per_chunk = base.model.num_layers // (self.pp * self.vp) if self.vp > 1 else None
        parallel = dataclasses.replace(
            base.parallel, tensor_model_parallel_size=self.tp, sequence_parallel=self.sp,
            pipeline_model_parallel_size=self.pp, expert_model_parallel_size=self.ep,
            num_layers_per_virtual_pipeline_stage=per_chunk,
            moe_hierarchical_alltoall=self.exchange == "hierarchical",
            moe_ranks_per_node=self.ranks_per_node if self.exchange == "hierarchical" else 0,
            moe_tp_dedup=not self.tp_copies, moe_alltoall_chunks=self.chunks)
        overlap = self.dp > 1 or self.edp > 1
        train = dataclasses.replace(
            base.train, micro_batch_size=self.micro_batch_size, use_distributed_optimizer=self.zero > 0,
            zero_stage=max(self.zero, 1), overlap_grad_reduce=overlap,
            overlap_param_gather=overlap and self.zero > 0, recompute_granularity=self.recompute)
        return base.replace(parallel=parallel, train=train)


def layout_of(cfg: Config, world_size: int, ranks_per_node: int) -> Layout:
    """The Layout a parsed run uses (e.g. a launch script's flags), for the cost model to evaluate."""
    p, t = cfg.parallel, cfg.train
    vp = p.virtual_stages(cfg.model.num_layers)
    if p.moe_hierarchical_alltoall:
        exchange = "hierarchical"
    elif p.tensor_model_parallel_size > 1 and not p.sequence_parallel and not p.moe_tp_dedup:
        exchange = "flat"
    else:
        exchange = "tp-dedup" if p.tensor_model_parallel_size > 1 and not p.sequence_parallel else "flat"
    return Layout(tp=p.tensor_model_parallel_size, sp=p.sequence_parallel, pp=p.pipeline_model_parallel_size,
                  vp=vp, ep=p.expert_model_parallel_size, micro_batch_size=t.micro_batch_size,
                  zero=t.zero_stage if t.use_distributed_optimizer else 0, exchange=exchange,
                  chunks=p.moe_alltoall_chunks, recompute=t.recompute_granularity, world_size=world_size,
                  ranks_per_node=p.moe_ranks_per_node or ranks_per_node)


@dataclass(frozen=True)
class SearchSpace:
    """What :func:`enumerate_layouts` tries; the defaults are the planner's."""

    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    chunks: tuple[int, ...] = (1, 2, 4)
    zero_stages: tuple[int, ...] = (0, 1, 2)
    recompute: tuple[str | None, ...] = RECOMPUTE
    max_virtual_stages: int = 4
    sequence_parallel: tuple[bool, ...] = (False, True)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _virtual_stages(num_layers: int, pp: int, most: int) -> list[int]:
    """1, and every v in 2..most that splits the layers into pp x v equal chunks (pp > 1 only)."""
    if pp == 1:
        return [1]
    return [v for v in range(1, most + 1) if num_layers % (pp * v) == 0 and num_layers // (pp * v) >= 1]


def _exchanges(tp: int, sp: bool, ep: int, ranks_per_node: int) -> list[str]:
    """Exchange modes that differ for this grid. EP groups are ``ep`` consecutive ranks (the expert
    mesh is EP x EDP x PP, EP fastest), so one spans nodes exactly when ep > ranks per node: only then
    is the hierarchical exchange another plan. TP-dedup against flat copies only with TP > 1, no SP."""
    modes = ["tp-dedup", "flat"] if tp > 1 and not sp else ["flat"]
    if ep > ranks_per_node:
        modes.append("hierarchical")
    return modes


def _mesh_accepts(layout: Layout) -> bool:
    """ParallelMesh's own rule (checked at start-up, not by Config.validate): nodes of ranks_per_node
    must split the EP groups evenly. torchrun sets the node size on a real cluster, so it applies to
    every layout of a multi-node world."""
    rpn = layout.ranks_per_node if layout.ranks_per_node < layout.world_size else 0
    try:
        ParallelMesh(world_size=layout.world_size, rank=0, tp=layout.tp, pp=layout.pp, ep=layout.ep,
                     sequence_parallel=layout.sp, ranks_per_node=rpn)
    except ConfigError:
        return False
    return True


def _grids(base: Config, world: int, gpus_per_node: int, space: SearchSpace) -> Iterator[tuple]:
    """(tp, sp, pp, vp, ep, mbs) that divide the world, the model and the batch."""
    m, gbs = base.model, base.train.global_batch_size
    for tp in divisors(world):
        if tp > gpus_per_node:  # TP's per-layer collectives stay inside a node
            continue
        for pp, ep in itertools.product(divisors(world // tp), divisors(world)):
            if pp > m.num_layers or world % (ep * pp) or base.moe.num_experts % ep:
                continue
            dp = world // (tp * pp)
            for vp, sp, mbs in itertools.product(_virtual_stages(m.num_layers, pp, space.max_virtual_stages),
                                                 space.sequence_parallel if tp > 1 else (False,),
                                                 space.micro_batch_sizes):
                if gbs % (mbs * dp) == 0:
                    yield tp, sp, pp, vp, ep, mbs


def enumerate_layouts(base: Config, world_size: int, ranks_per_node: int,
                      space: SearchSpace = SearchSpace()) -> list[Layout]:
    """Every layout of ``world_size`` ranks (``ranks_per_node`` per node) that megamoe accepts for
    ``base`` (its model, global batch and sequence length; its own layout fields are replaced).

    Pruned, since the cost model would never prefer them: ZeRO when DP and expert-DP are both 1, K > 1
    without EP or with the hierarchical exchange (only the flat exchange pipelines chunks), K > 1 with
    full recompute (megamoe rejects it)."""
    out = []
    for tp, sp, pp, vp, ep, mbs in _grids(base, world_size, ranks_per_node, space):
        replicated = world_size // (tp * pp) == 1 and world_size // (ep * pp) == 1
        for zero, exchange, recompute in itertools.product(
                (0,) if replicated else space.zero_stages,
                _exchanges(tp, sp, ep, ranks_per_node), space.recompute):
            for chunks in (space.chunks if ep > 1 and exchange != "hierarchical" else (1,)):
                layout = Layout(tp, sp, pp, vp, ep, mbs, zero, exchange, chunks, recompute, world_size,
                                ranks_per_node)
                try:
                    layout.apply(base).validate(world_size)
                except ConfigError:
                    continue
                if _mesh_accepts(layout):
                    out.append(layout)
    return out
