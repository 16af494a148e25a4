"""Communication model of a megamoe layout, per MoE layer: the expert exchange's bytes and messages
each rank SENDS, split by whether the receiver is on the sender's node (intra) or not (inter), and
the primitives the whole-step model (``megamoe/planner/step_traffic.py``) builds on (:class:`Traffic`,
:class:`Collective`, :class:`Sends`, :func:`layout_mesh`).

Pure functions of a :class:`megamoe.config.Config`, the world size and the node size (numpy and
python; no process group). The parallel planner's step-time model (``megamoe/planner/cost.py``)
turns these bytes into seconds with the cluster's bandwidths.

Expert exchange (:func:`exchange_traffic`, exact; :func:`expected_exchange_traffic`, expected):
counted as ``megamoe.moe.exchange.CommCounters`` counts it -- every (peer, step) pair of a dispatch
plan with rows > 0 and peer != self is one message of rows x hidden x element-size bytes; the combine
sends back, step by step, what the dispatch received. The plan's arithmetic is re-derived here from
the send matrix (not by calling ``exchange_plan``), so tests/distributed/test_planner_traffic.py
checks the model against megamoe's counters rather than against itself.

Collectives (:class:`Collective`; the exchange's routing-metadata and TP-dedup gathers here, every
other category in step_traffic.py) are modelled as rings over the group's members in rank order
(NCCL's and gloo's default for large messages): a rank sends every message to its ring successor, so
its bytes are intra-node when that successor shares its node. For a group of n ranks and a tensor of
S bytes per rank: all-reduce sends 2(n-1)/n x S in 2(n-1) messages (reduce-scatter then all-gather),
all-gather and reduce-scatter (n-1)/n x S_total in n-1 messages, where S_total is the gathered size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megamoe.config import Config, ConfigError
from megamoe.moe.router import expert_capacity
from megamoe.parallel.mesh import ParallelMesh

__all__ = ["Collective", "ExchangeTraffic", "Sends", "Summable", "Traffic", "chunk_sizes",
           "dispatch_row_bytes", "dispatched_tokens", "exchange_collectives", "exchange_traffic",
           "expected_counts", "expected_exchange_traffic", "layout_mesh", "rank_nodes"]


class Summable:
    """Field-wise ``+`` and ``scaled`` for the frozen traffic dataclasses (here and in step_traffic.py;
    fields: numbers or Summable)."""

    def __add__(self, other):
        return type(self)(*(a + b for a, b in zip(self._values(), other._values())))

    def scaled(self, factor: float):
        """Every field times ``factor`` (e.g. per call -> per step)."""
        return type(self)(*(v.scaled(factor) if isinstance(v, Summable) else v * factor
                            for v in self._values()))

    def _values(self) -> list:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


@dataclass(frozen=True)
class Traffic(Summable):
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
class ExchangeTraffic(Summable):
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


def rank_nodes(mesh: ParallelMesh) -> np.ndarray:
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


class Sends:
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


def dispatch_row_bytes(cfg: Config) -> int:
    """Bytes of one dispatched row [H]: the residual stream's dtype (bf16 with --bf16, else fp32)."""
    return cfg.model.hidden_size * (2 if cfg.train.bf16 else 4)


# -- expert exchange ---------------------------------------------------------------------------------
def _add_exchange(dispatch: Sends, combine: Sends, members: Sequence[int], blocks: np.ndarray,
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
    ep, nodes = mesh.ep, rank_nodes(mesh)
    dispatch, combine = Sends(nodes), Sends(nodes)
    row_bytes = dispatch_row_bytes(cfg)
    to_rank = np.eye(ep)[rank_of]  # [E, EP] one-hot: expert -> its EP index
    for members in mesh.grids()["ep"] if ep > 1 else []:
        n_nodes = len({mesh.node_of(r) for r in members}) if cfg.parallel.moe_hierarchical_alltoall else 1
        for chunk in range(counts.shape[1]):
            blocks = counts[members, chunk] @ to_rank  # [EP source, EP destination]
            _add_exchange(dispatch, combine, members, blocks, n_nodes, row_bytes)
    extras = {}
    for name, (colls, _) in exchange_collectives(cfg, counts.shape[1]).items():
        extras[name] = Sends(nodes)
        for coll in colls:
            for members in mesh.grids()[coll.group]:
                extras[name].collective(members, coll)
    return [ExchangeTraffic(dispatch.traffic(r), combine.traffic(r), extras["tp_gather"].traffic(r),
                            extras["metadata"].traffic(r)) for r in range(world_size)]


def exchange_collectives(cfg: Config, chunks: int) -> dict[str, tuple[list[Collective], list[Collective]]]:
    """(forward, backward) collectives of one MoE layer call besides its all-to-alls: ``tp_gather``,
    under TP-dedup the all-gather over TP of the [T, H] output (T = micro-batch tokens) and, in
    backward, of the input gradient [T, H] and of the fp32 combine weights' gradient [T, k];
    ``metadata``, the all-gather over EP of each rank's [K, E] int64 row counts and, under SP, the
    all-gather over TP of the [b, s/TP, k] int64 routing choices."""
    p, moe = cfg.parallel, cfg.moe
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    out: dict[str, tuple[list[Collective], list[Collective]]] = {"tp_gather": ([], []), "metadata": ([], [])}
    if _dedup_active(cfg):
        rows = Collective("all_gather", "tp", tokens * dispatch_row_bytes(cfg))
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


def dispatched_tokens(cfg: Config, tokens: int) -> int:
    """Tokens one rank's MoE layer dispatches per micro-batch: its 1/TP under SP or TP-dedup."""
    share = cfg.parallel.sequence_parallel or _dedup_active(cfg)
    return tokens // cfg.parallel.tensor_model_parallel_size if share else tokens


def chunk_sizes(cfg: Config, tokens: int) -> list[int]:
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
    sizes = chunk_sizes(cfg, dispatched_tokens(cfg, tokens))
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
