"""Communication model of a megamoe layout: bytes and messages each rank SENDS per training step,
split by whether the receiver is on the sender's node (intra) or not (inter).

Pure functions of a :class:`megamoe.config.Config`, the world size and the node size (numpy and
python; no process group). The parallel planner's step-time model (``megamoe/planner/cost.py``)
turns these bytes into seconds with the cluster's bandwidths.

Expert exchange (:func:`exchange_traffic`, exact; :func:`expected_exchange_traffic`, expected):
counted as ``megamoe.moe.exchange.CommCounters`` counts it -- every (peer, step) pair of a dispatch
plan with rows > 0 and peer != self is one message of rows x hidden x element-size bytes; the combine
sends back, step by step, what the dispatch received. The plan's arithmetic is re-derived here from
the send matrix (not by calling ``exchange_plan``), so tests/distributed/test_planner_traffic.py
checks the model against megamoe's counters rather than against itself.

The other categories (TP, pipeline p2p, DP / expert-DP gradient reduction, ZeRO parameter all-gather)
are not counted by megamoe: they are derived from tensor shapes (see :func:`step_traffic`).
Collectives are modelled as rings over the group's members in rank order (NCCL's and gloo's default
for large messages): a rank sends every message to its ring successor, so its bytes are intra-node
when that successor shares its node. For a group of n ranks and a tensor of S bytes per rank:
all-reduce sends 2(n-1)/n x S in 2(n-1) messages (reduce-scatter then all-gather), all-gather and
reduce-scatter (n-1)/n x S_total in n-1 messages, where S_total is the gathered size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megamoe.config import Config, ConfigError, stage_layer_ranges
from megamoe.moe.router import expert_capacity
from megamoe.parallel.mesh import ParallelMesh

__all__ = ["CategoryTraffic", "Collective", "ExchangeTraffic", "StepTraffic", "Traffic", "exchange_traffic",
           "expected_counts", "expected_exchange_traffic", "layout_mesh", "step_collectives", "step_traffic"]


class _Summable:
    """Field-wise ``+`` and ``scaled`` for the frozen dataclasses below (fields: numbers or _Summable)."""

    def __add__(self, other):
        return type(self)(*(a + b for a, b in zip(self._values(), other._values())))

    def scaled(self, factor: float):
        """Every field times ``factor`` (e.g. per call -> per step)."""
        return type(self)(*(v.scaled(factor) if isinstance(v, _Summable) else v * factor
                            for v in self._values()))

    def _values(self) -> list:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


@dataclass(frozen=True)
class Traffic(_Summable):
    """What one rank sends: bytes and messages to ranks on its node (intra) and on other nodes (inter).
    Exact counts are integers; expected ones (from a routing distribution) may be fractional."""

    bytes_intra: float = 0
    bytes_inter: float = 0
    msgs_intra: float = 0
    msgs_inter: float = 0

    @property
    def bytes(self) -> float:
        return self.bytes_intra + self.bytes_inter

    @property
    def msgs(self) -> float:
        return self.msgs_intra + self.msgs_inter


@dataclass(frozen=True)
class ExchangeTraffic(_Summable):
    """One rank's expert-exchange traffic (one MoE layer call, or summed over several with ``+``).

    dispatch / combine: the forward all-to-all(s) out to the experts and back; backward mirrors them
    (each rank sends back the gradients of what it received), so it sends as much again.
    tp_gather: under TP-dedup, the forward all-gather over TP of the [T, H] outputs (each TP rank
    dispatched 1/TP of the tokens). counts_gather: the forward all-gathers of routing metadata (every
    rank's [K, E] int64 row counts over EP; the routing choices over TP under SP). Their backward
    collectives are in :func:`step_collectives`.
    """

    dispatch: Traffic = Traffic()
    combine: Traffic = Traffic()
    tp_gather: Traffic = Traffic()
    counts_gather: Traffic = Traffic()

    @property
    def all_to_all(self) -> Traffic:
        """Forward dispatch + combine: what megamoe's ``a2a_*`` counters (MoEStats.comm) report."""
        return self.dispatch + self.combine

    def counters(self) -> dict[str, float]:
        """:attr:`all_to_all` under the keys of ``CommCounters.as_dict`` (the training records')."""
        t = self.all_to_all
        return dict(a2a_bytes_intra=t.bytes_intra, a2a_bytes_inter=t.bytes_inter,
                    a2a_msgs_intra=t.msgs_intra, a2a_msgs_inter=t.msgs_inter)


# -- layout ------------------------------------------------------------------------------------------
def layout_mesh(cfg: Config, world_size: int, ranks_per_node: int) -> ParallelMesh:
    """The rank grid megamoe builds for ``cfg`` on ``world_size`` ranks (groups not created: only
    :meth:`ParallelMesh.grids` and ``node_of`` are used). ``--moe-ranks-per-node`` overrides
    ``ranks_per_node`` as in a real launch (``ParallelMesh.from_config``); a node as large as the world
    is one node. ConfigError (one line) for a layout megamoe would refuse."""
    if ranks_per_node < 1:
        raise ConfigError(f"ranks per node must be >= 1, got {ranks_per_node}")
    p = cfg.parallel
    rpn = p.moe_ranks_per_node or ranks_per_node
    cfg.validate(world_size)
    return ParallelMesh(world_size=world_size, rank=0, tp=p.tensor_model_parallel_size,
                        pp=p.pipeline_model_parallel_size, ep=p.expert_model_parallel_size,
                        etp=p.expert_tensor_parallel_size, sequence_parallel=p.sequence_parallel,
                        ranks_per_node=rpn if rpn < world_size else 0)


def _nodes(mesh: ParallelMesh) -> np.ndarray:
    """[world] node index of every global rank."""
    return np.array([mesh.node_of(r) for r in range(mesh.world_size)])


@dataclass(frozen=True)
class Collective:
    """One collective (or point-to-point send) as a rank runs it. op: all_reduce, all_gather,
    reduce_scatter or send; group: the mesh group it runs over (tp, dp, edp, ep, pp); nbytes: the
    tensor each rank passes (all_reduce, send) or the gathered tensor (all_gather, reduce_scatter);
    peer: +1 / -1 for a send to the next / previous pipeline rank; count: times per step."""

    op: str
    group: str
    nbytes: float
    count: float = 1
    peer: int = 0

    def ring_bytes(self, n: int) -> float:
        """Bytes one rank sends per call in a ring over n ranks (n - 1 steps each way):
        all-reduce 2(n-1)/n x S (reduce-scatter then all-gather), all-gather / reduce-scatter
        (n-1)/n x S of the gathered S, send S."""
        if self.op == "send":
            return self.nbytes
        if n < 2:
            return 0.0
        return (2 if self.op == "all_reduce" else 1) * (n - 1) / n * self.nbytes

    def ring_msgs(self, n: int) -> int:
        if self.op == "send":
            return 1
        return 0 if n < 2 else (2 if self.op == "all_reduce" else 1) * (n - 1)


class _Sends:
    """Per-rank accumulator of point-to-point sends: [world, 4] = bytes intra/inter, msgs intra/inter."""

    def __init__(self, nodes: np.ndarray) -> None:
        self.nodes = nodes
        self.acc = np.zeros((len(nodes), 4))

    def add(self, members: Sequence[int], rows: np.ndarray, row_bytes: int) -> None:
        """rows[i, j]: rows members[i] sends to members[j]. A pair with no rows, or a rank sending to
        itself, is no message (CommCounters.add_exchange skips both)."""
        m = np.asarray(members)
        sent = (rows > 0) & ~np.eye(len(m), dtype=bool)
        same = self.nodes[m][:, None] == self.nodes[m][None, :]
        for col, mask in enumerate((sent & same, sent & ~same)):  # intra, inter
            np.add.at(self.acc[:, col], m, (rows * mask).sum(1) * row_bytes)
            np.add.at(self.acc[:, col + 2], m, mask.sum(1))

    def collective(self, members: Sequence[int], coll: Collective, only: int | None = None) -> None:
        """Every member (or only rank ``only``) runs ``coll``: a ring over ``members`` in order, each
        sending to its successor; a send goes to the member ``coll.peer`` places away."""
        n = len(members)
        nbytes, msgs = coll.ring_bytes(n) * coll.count, coll.ring_msgs(n) * coll.count
        if n < 2 or msgs == 0:
            return
        for i, rank in enumerate(members):
            if only is None or rank == only:
                inter = int(self.nodes[members[(i + (coll.peer or 1)) % n]] != self.nodes[rank])
                self.acc[rank, inter] += nbytes
                self.acc[rank, 2 + inter] += msgs

    def traffic(self, rank: int) -> Traffic:
        row = self.acc[rank]
        return Traffic(*(int(v) if float(v).is_integer() else float(v) for v in row))


def _row_bytes(cfg: Config) -> int:
    """Bytes of one dispatched row [H]: the residual stream's dtype (bf16 with --bf16, else fp32)."""
    return cfg.model.hidden_size * (2 if cfg.train.bf16 else 4)


# -- expert exchange ---------------------------------------------------------------------------------
def _add_exchange(dispatch: _Sends, combine: _Sends, members: Sequence[int], blocks: np.ndarray,
                  hierarchical_nodes: int, row_bytes: int) -> None:
    """One exchange of ``blocks`` [EP, EP] rows (source EP index, destination EP index) in one EP
    group. Flat: one all-to-all, i sends blocks[i, j] to j, combine sends blocks[j, i] back.
    Hierarchical over N nodes x L ranks (EP indices node-major, B = blocks as [N, L, N, L]):
      step 1 (intra): (a, p) sends sum_n B[a, p, n, q] to (a, q) -- everything bound for position q;
      step 2 (inter): (a, p) sends sum_s B[a, s, n, p] to (n, p) -- its node's rows for (n, p).
    The combine sends back per step what that step received (the transposed send matrices)."""
    if hierarchical_nodes <= 1:
        dispatch.add(members, blocks, row_bytes)
        combine.add(members, blocks.T, row_bytes)
        return
    n = hierarchical_nodes
    per = len(members) // n
    b = blocks.reshape(n, per, n, per)
    intra = b.sum(axis=2)  # [a, p, q]: (a, p) -> (a, q)
    inter = b.sum(axis=1).transpose(2, 0, 1)  # [p, a, n]: (a, p) -> (n, p)
    grid = np.asarray(members).reshape(n, per)
    for node in range(n):
        dispatch.add(grid[node], intra[node], row_bytes)
        combine.add(grid[node], intra[node].T, row_bytes)
    for pos in range(per):
        dispatch.add(grid[:, pos], inter[pos], row_bytes)
        combine.add(grid[:, pos], inter[pos].T, row_bytes)


def _check_counts(cfg: Config, world_size: int, counts: np.ndarray) -> np.ndarray:
    """counts as [world, K, E] floats; ConfigError (one line) for a shape or value that cannot be."""
    num_experts = cfg.moe.num_experts
    if counts.ndim == 2:
        chunks = cfg.parallel.moe_alltoall_chunks
        if chunks > 1 and cfg.parallel.expert_model_parallel_size > 1:
            raise ConfigError(f"--moe-alltoall-chunks {chunks}: give the counts per chunk, shape "
                              f"[world, chunks, experts], not {list(counts.shape)}")
        counts = counts[:, None, :]
    if counts.ndim != 3 or counts.shape[0] != world_size or counts.shape[2] != num_experts:
        raise ConfigError(f"token counts of shape {list(counts.shape)} do not match [world {world_size}, "
                          f"(chunks,) experts {num_experts}]")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ConfigError("token counts must be finite and >= 0 (rows routed to each expert)")
    return counts.astype(np.float64)


def _placement(cfg: Config, placement: Sequence[int] | None) -> np.ndarray:
    """[E] EP index of each logical expert (the rebalancer's format); default contiguous blocks."""
    num_experts, ep = cfg.moe.num_experts, cfg.parallel.expert_model_parallel_size
    if placement is None:
        return np.arange(num_experts) // (num_experts // ep)
    rank_of = np.asarray(placement)
    in_range = rank_of.shape == (num_experts,) and np.all((rank_of >= 0) & (rank_of < ep))
    if not in_range or list(np.bincount(rank_of, minlength=ep)) != [num_experts // ep] * ep:
        raise ConfigError(f"placement {list(placement)} must give each of the {ep} EP ranks "
                          f"{num_experts // ep} of the {num_experts} experts")
    return rank_of


def exchange_traffic(cfg: Config, world_size: int, ranks_per_node: int, counts: np.ndarray,
                     placement: Sequence[int] | None = None) -> list[ExchangeTraffic]:
    """Exact expert-exchange traffic of ONE MoE layer call (one micro-batch), per global rank.

    counts: rows each rank dispatches to each logical expert, [world, E], or [world, K, E] per chunk
    under --moe-alltoall-chunks K (kept (token, choice) assignments, after capacity drops, of the
    tokens that rank dispatches: its 1/TP share under TP-dedup or SP). Rows of ranks whose pipeline
    stage does not hold the layer are zeros. placement: EP index of each logical expert (default
    contiguous). -> [world] ExchangeTraffic, in bytes and messages; ``.counters()`` equals the
    ``a2a_*`` counters megamoe adds for this call. Sum calls with ``+``.
    """
    mesh = layout_mesh(cfg, world_size, ranks_per_node)
    counts = _check_counts(cfg, world_size, np.asarray(counts))
    rank_of = _placement(cfg, placement)
    ep, nodes = mesh.ep, _nodes(mesh)
    dispatch, combine = _Sends(nodes), _Sends(nodes)
    row_bytes = _row_bytes(cfg)
    to_rank = np.eye(ep)[rank_of]  # [E, EP] one-hot: expert -> its EP index
    for members in mesh.grids()["ep"] if ep > 1 else []:
        n_nodes = len({mesh.node_of(r) for r in members}) if cfg.parallel.moe_hierarchical_alltoall else 1
        for chunk in range(counts.shape[1]):
            blocks = counts[members, chunk] @ to_rank  # [EP source, EP destination]
            _add_exchange(dispatch, combine, members, blocks, n_nodes, row_bytes)
    extras = {}
    for name, (colls, _) in _exchange_collectives(cfg, counts.shape[1]).items():
        extras[name] = _Sends(nodes)
        for coll in colls:
            for members in mesh.grids()[coll.group]:
                extras[name].collective(members, coll)
    return [ExchangeTraffic(dispatch.traffic(r), combine.traffic(r), extras["tp_gather"].traffic(r),
                            extras["metadata"].traffic(r)) for r in range(world_size)]


def _exchange_collectives(cfg: Config, chunks: int) -> dict[str, tuple[list[Collective], list[Collective]]]:
    """(forward, backward) collectives of one MoE layer call besides its all-to-alls: ``tp_gather``,
    under TP-dedup the all-gather over TP of the [T, H] output (T = micro-batch tokens) and, in
    backward, of the input gradient [T, H] and of the fp32 combine weights' gradient [T, k];
    ``metadata``, the all-gather over EP of each rank's [K, E] int64 row counts and, under SP, the
    all-gather over TP of the [b, s/TP, k] int64 routing choices."""
    p, moe = cfg.parallel, cfg.moe
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    out: dict[str, tuple[list[Collective], list[Collective]]] = {"tp_gather": ([], []), "metadata": ([], [])}
    if _dedup_active(cfg):
        rows = Collective("all_gather", "tp", tokens * _row_bytes(cfg))
        out["tp_gather"] = ([rows], [rows, Collective("all_gather", "tp", tokens * moe.router_topk * 4)])
    if p.expert_model_parallel_size > 1:
        ep = p.expert_model_parallel_size
        out["metadata"][0].append(Collective("all_gather", "ep", ep * chunks * moe.num_experts * 8))
    if p.sequence_parallel:
        out["metadata"][0].append(Collective("all_gather", "tp", tokens * moe.router_topk * 8))
    return out


def _dedup_active(cfg: Config) -> bool:
    p = cfg.parallel
    return p.tensor_model_parallel_size > 1 and not p.sequence_parallel and p.moe_tp_dedup


def _dispatched_tokens(cfg: Config, tokens: int) -> int:
    """Tokens one rank's MoE layer dispatches per micro-batch: its 1/TP under SP or TP-dedup."""
    share = cfg.parallel.sequence_parallel or _dedup_active(cfg)
    return tokens // cfg.parallel.tensor_model_parallel_size if share else tokens


def _chunk_sizes(cfg: Config, tokens: int) -> list[int]:
    """Tokens of each chunk, as TokenDispatcher._plan splits them (ceil-sized, chunks only with EP)."""
    chunks = cfg.parallel.moe_alltoall_chunks if cfg.parallel.expert_model_parallel_size > 1 else 1
    size = max(-(-tokens // chunks), 1)
    return [min(lo + size, tokens) - lo for lo in range(0, max(tokens, 1), size)]


def _load_fractions(cfg: Config, expert_load: Sequence[float] | None) -> np.ndarray:
    """[E] share of the routed assignments each expert gets (uniform without a load)."""
    num_experts = cfg.moe.num_experts
    if expert_load is None:
        return np.full(num_experts, 1.0 / num_experts)
    load = np.asarray(expert_load, dtype=np.float64)
    if load.shape != (num_experts,) or not np.all(np.isfinite(load)) or np.any(load < 0) or load.sum() <= 0:
        raise ConfigError(f"expert load must list {num_experts} finite loads >= 0, not all zero (one MoE "
                          "layer of the rebalancer's load file)")
    return load / load.sum()


def expected_counts(cfg: Config, world_size: int, tokens_per_rank: int | None = None,
                    expert_load: Sequence[float] | None = None) -> np.ndarray:
    """Expected rows [world, K, E] each rank dispatches to each expert in one MoE layer call.

    tokens_per_rank: tokens of one micro-batch of one DP replica (default --micro-batch-size x
    --seq-length); each rank dispatches its 1/TP share under SP or TP-dedup, split in K chunks.
    expert_load: per-expert loads of this layer (the rebalancer's format, any scale), default uniform.
    Each token makes top-k assignments, to expert e with probability load_e; with a capacity factor an
    expert keeps at most its capacity per routing group (expected, not per-token, drops)."""
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length if tokens_per_rank is None else tokens_per_rank
    frac, moe = _load_fractions(cfg, expert_load), cfg.moe
    keep = np.ones_like(frac)
    if moe.capacity_factor is not None:
        group = moe.router_group_size or tokens
        cap = expert_capacity(moe.capacity_factor, group, moe.num_experts, moe.min_capacity)
        demand = group * moe.router_topk * frac
        keep = np.minimum(1.0, cap / np.maximum(demand, 1e-30))
    sizes = _chunk_sizes(cfg, _dispatched_tokens(cfg, tokens))
    per_chunk = np.array(sizes, dtype=np.float64)[:, None] * moe.router_topk * frac * keep  # [K, E]
    return np.broadcast_to(per_chunk, (world_size, *per_chunk.shape)).copy()


def expected_exchange_traffic(cfg: Config, world_size: int, ranks_per_node: int,
                              tokens_per_rank: int | None = None, expert_load: Sequence[float] | None = None,
                              placement: Sequence[int] | None = None) -> list[ExchangeTraffic]:
    """Expected expert-exchange traffic of one MoE layer call per rank (bytes, messages): the exact
    model on :func:`expected_counts`. A pair with expected rows > 0 counts as one message (with few
    tokens per expert some pairs may in fact send nothing: an upper bound on messages)."""
    counts = expected_counts(cfg, world_size, tokens_per_rank, expert_load)
    return exchange_traffic(cfg, world_size, ranks_per_node, counts, placement)


# -- the whole step ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CategoryTraffic(_Summable):
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
class StepTraffic(_Summable):
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
    return cfg.train.micro_batch_size * cfg.model.seq_length * _row_bytes(cfg)


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
    chunks = len(_chunk_sizes(cfg, _dispatched_tokens(cfg, t.micro_batch_size * cfg.model.seq_length)))
    extras = _exchange_collectives(cfg, chunks)
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
    nodes, t = _nodes(mesh), cfg.train
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
            sends = {phase: _Sends(nodes) for phase in phases}
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
