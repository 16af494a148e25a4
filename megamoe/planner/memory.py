"""Memory model of a megamoe layout: bytes per rank, from a :class:`megamoe.config.Config` and the world
size alone (pure python and numpy; no model, no process group).

Three parts, each re-derived from what megamoe allocates (tests/distributed/test_planner_memory.py
checks them against real runs):

1. Model state (:func:`state_bytes`): the parameters this rank holds, listed in ``model.parameters()``
   order (:func:`stage_params`), cut into gradient buckets exactly as
   ``megamoe.parallel.grad_buffer.GroupLayout.build`` cuts them (reverse order, one dtype per bucket,
   closed at ``--ddp-bucket-size`` elements, padded to a multiple of the group size), then counted as
   ``DistributedOptimizer.memory_bytes`` counts them: weights in their dtype, fp32 gradient buffers
   (ZeRO-2: the owned 1/N, plus transient buckets), fp32 masters of the owned part of non-fp32
   weights, two fp32 AdamW moments of the owned part. Dense parameters are sharded over DP, expert
   parameters over expert-DP (EDP = world / (EP x PP)); without ``--use-distributed-optimizer`` a rank
   owns everything ("ZeRO-0").
2. Activations (:func:`layer_activations`, :func:`chunk_activation_bytes`): the bytes autograd saves
   for backward per micro-batch (each storage once), op by op as megamoe's modules save them (RMSNorm
   in fp32, q/k/v/out/logsumexp of SDPA, the fused gated MLP's two inputs, router softmax/logits/top-k,
   the permutation indices, expert GEMM inputs, the combine), under TP/SP, recompute and capacity;
   times the micro-batches in flight of the pipeline schedule (:func:`pipeline_peak`, simulated from
   megamoe/parallel/schedules.py's order of forwards and backwards).
3. Exchange buffers (:func:`exchange_buffer_bytes`): the all-to-all send and receive rows of one MoE
   layer call, transient (alive for one layer at a time).

Token counts come from :func:`megamoe.planner.traffic.expected_counts` (uniform or a per-expert load,
dropless or with a capacity factor), the same counts the traffic model uses. Not modelled: FP8 expert
state and scales, gradient temporaries of backward, allocator fragmentation, CUDA workspaces.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from megamoe.config import Config, ConfigError, stage_layer_ranges, validate_layout
from megamoe.planner.traffic import expected_counts

ExpertLoad = Sequence[float] | Mapping[int, Sequence[float]] | None  # one [E] load, or per MoE layer


# -- 1. model state ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a rank: ``numel`` elements of ``nbytes_per`` bytes; ``expert``: stacked expert
    weights (reduced and sharded over expert-DP), else dense (over DP)."""

    name: str
    numel: int
    nbytes_per: int
    expert: bool = False


@dataclass(frozen=True)
class BucketSpec:
    """Flat positions [start, end) of a gradient bucket; [start, real_end) are parameters, the rest
    padding to a multiple of the group size."""

    start: int
    end: int
    real_end: int
    nbytes_per: int


@dataclass(frozen=True)
class StateBytes:
    """Bytes one rank holds for the model state, keyed as ``DistributedOptimizer.memory_bytes``:
    params (weights in their dtype), grads (fp32 gradient buffers), master (fp32 copies of the owned
    part of non-fp32 weights), optimizer (AdamW exp_avg + exp_avg_sq, fp32, owned part), grad_buckets
    (ZeRO-2 only: transient fp32 buckets, two reducing and one filling; 0 otherwise)."""

    params: int
    grads: int
    master: int
    optimizer: int
    grad_buckets: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.master + self.optimizer + self.grad_buckets


def _tp(cfg: Config) -> int:
    return cfg.parallel.tensor_model_parallel_size


def _pp(cfg: Config) -> int:
    return cfg.parallel.pipeline_model_parallel_size


def _layer_params(cfg: Config, layer: int, wbytes: int) -> list[ParamSpec]:
    """A decoder layer's parameters in registration order (model/openmoe.py DecoderLayer)."""
    m, moe, tp = cfg.model, cfg.moe, _tp(cfg)
    h, ffn, d = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    p = f"layers.{layer}."
    attn = [ParamSpec(p + "input_layernorm", h, wbytes),
            ParamSpec(p + "q_proj", m.num_attention_heads * d // tp * h, wbytes),
            ParamSpec(p + "k_proj", m.kv_heads * d // tp * h, wbytes),
            ParamSpec(p + "v_proj", m.kv_heads * d // tp * h, wbytes),
            ParamSpec(p + "o_proj", h * (m.num_attention_heads * d // tp), wbytes),
            ParamSpec(p + "post_attention_layernorm", h, wbytes)]

    def mlp(prefix: str) -> list[ParamSpec]:  # gate [2I/tp, H], up [I/tp, H], down [H, I/tp]
        return [ParamSpec(prefix + "gate_proj", 2 * ffn // tp * h, wbytes),
                ParamSpec(prefix + "up_proj", ffn // tp * h, wbytes),
                ParamSpec(prefix + "down_proj", h * (ffn // tp), wbytes)]

    if not moe.is_moe_layer(layer):
        return attn + mlp(p + "mlp.")
    local = moe.num_experts // cfg.parallel.expert_model_parallel_size
    gate_width = 1 if m.model_family == "mixtral" else 2
    out = attn + [ParamSpec(p + "mlp.gate_weight", moe.num_experts * h, 4),  # router: kept fp32
                  ParamSpec(p + "mlp.experts.wi_gate", local * h * gate_width * ffn, wbytes, True),
                  ParamSpec(p + "mlp.experts.wi_up", local * h * ffn, wbytes, True),
                  ParamSpec(p + "mlp.experts.wo", local * ffn * h, wbytes, True)]
    if m.model_family != "mixtral":  # OpenMoE's extra dense MLP after every MoE
        out += [ParamSpec(p + "pre_extra_mlp_layernorm", h, wbytes)] + mlp(p + "extra_mlp.")
    return out


def stage_ranges(cfg: Config) -> list[range]:
    """Layer range of every virtual stage v = chunk x PP + pipeline rank."""
    p = cfg.parallel
    return stage_layer_ranges(cfg.model.num_layers, _pp(cfg), p.virtual_stages(cfg.model.num_layers),
                              p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers)


def stage_params(cfg: Config, pp_rank: int = 0) -> list[ParamSpec]:
    """The trainable parameters of pipeline rank ``pp_rank`` (all its model chunks) in
    ``model.parameters()`` order, with this rank's TP/EP shard sizes. The FP8 amax history is not
    trained (no gradient, no optimizer state) and is left out, as the optimizer leaves it out."""
    m, tp = cfg.model, _tp(cfg)
    wbytes = 2 if cfg.train.bf16 else 4
    ranges = stage_ranges(cfg)
    vocab_rows = m.padded_vocab_size(tp) // tp
    out: list[ParamSpec] = []
    for v in range(pp_rank, len(ranges), _pp(cfg)):
        if v == 0:
            out.append(ParamSpec("embed_tokens", vocab_rows * m.hidden_size, wbytes))
        for layer in ranges[v]:
            out += _layer_params(cfg, layer, wbytes)
        if v == len(ranges) - 1:
            out += [ParamSpec("norm", m.hidden_size, wbytes),
                    ParamSpec("lm_head", vocab_rows * m.hidden_size, wbytes)]
    return out


def bucket_layout(params: Sequence[ParamSpec], size: int, bucket_numel: int) -> list[BucketSpec]:
    """GroupLayout.build's buckets: parameters in reverse order, a new bucket at a dtype change or once
    it holds ``bucket_numel`` elements, each padded to a multiple of ``size`` (the sharding group)."""
    buckets: list[BucketSpec] = []
    offset = start = 0
    dtype: int | None = None

    def close() -> None:
        nonlocal offset, start
        real = offset
        offset += (-(offset - start)) % size
        buckets.append(BucketSpec(start, offset, real, dtype or 4))
        start = offset

    for p in reversed(params):
        if offset > start and p.nbytes_per != dtype:
            close()
        dtype = p.nbytes_per
        offset += p.numel
        if offset - start >= bucket_numel:
            close()
    if offset > start:
        close()
    return buckets


def owned_numel(buckets: Sequence[BucketSpec], size: int, rank: int) -> tuple[int, int]:
    """(parameter elements member ``rank`` of ``size`` owns, of which in non-fp32 buckets): each
    bucket's [start + rank x per, + per) without its padding."""
    owned = low_precision = 0
    for b in buckets:
        per = (b.end - b.start) // size
        lo = b.start + rank * per
        n = max(0, min(lo + per, b.real_end) - lo)
        owned += n
        low_precision += n if b.nbytes_per != 4 else 0
    return owned, low_precision


def data_parallel_sizes(cfg: Config, world_size: int) -> tuple[int, int]:
    """(DP, expert-DP): the replicas dense and expert parameters are reduced (and sharded) over."""
    p = cfg.parallel
    dense_cells, expert_cells = _tp(cfg) * _pp(cfg), p.expert_model_parallel_size * _pp(cfg)
    if world_size % dense_cells or world_size % expert_cells:
        raise ConfigError(f"world size {world_size} is not divisible by TP x PP = {dense_cells} and EP x PP "
                          f"= {expert_cells}; choose a world size that both divide")
    return world_size // dense_cells, world_size // expert_cells


def state_bytes(cfg: Config, world_size: int, pp_rank: int = 0, dp_rank: int = 0,
                edp_rank: int = 0) -> StateBytes:
    """Model-state bytes of the rank at (pipeline rank, DP index, expert-DP index); index 0 owns the
    most (padding sits at the end of each bucket), so the defaults give a stage's worst rank."""
    t = cfg.train
    dp, edp = data_parallel_sizes(cfg, world_size)
    stage2 = t.use_distributed_optimizer and t.zero_stage == 2
    params = stage_params(cfg, pp_rank)
    weights = grads = master = owned_all = 0
    buckets_all: list[BucketSpec] = []
    for is_expert, replicas, coord in ((False, dp, dp_rank), (True, edp, edp_rank)):
        members = [p for p in params if p.expert == is_expert]
        if not members:
            continue
        size = replicas if t.use_distributed_optimizer else 1
        rank = coord if t.use_distributed_optimizer else 0
        buckets = bucket_layout(members, size, t.ddp_bucket_size)
        numel = buckets[-1].end
        weights += sum(p.numel * p.nbytes_per for p in members)
        grads += 4 * (numel // size if stage2 else numel)
        owned, low = owned_numel(buckets, size, rank)
        owned_all += owned
        master += 4 * low
        buckets_all += buckets
    transient = 0
    if stage2 and buckets_all:
        full = sum(b.end - b.start for b in buckets_all)
        transient = 4 * min(full, 3 * max(b.end - b.start for b in buckets_all))
    return StateBytes(params=weights, grads=grads, master=master, optimizer=8 * owned_all,
                      grad_buckets=transient)


# -- 2. activations -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerActivations:
    """Bytes one decoder layer saves for backward per micro-batch on one rank, by part: norms (the
    RMSNorms' fp32 input, rsqrt and normalised copies), attention (q/k/v projection input, rotary
    tables, SDPA's q, k, v, output and logsumexp), mlp (dense MLPs: input, the gated MLP's gate and up
    outputs, its product), router (fp32 input, softmax, logits, top-k, masks, logsumexp), moe (the
    permutation indices, expert GEMM inputs and the combine). ``recomputed``: what the layer saves
    when full recompute re-runs it (its input only, when it starts a segment)."""

    norms: int = 0
    attention: int = 0
    mlp: int = 0
    router: int = 0
    moe: int = 0

    @property
    def total(self) -> int:
        return self.norms + self.attention + self.mlp + self.router + self.moe


@dataclass(frozen=True)
class _Shape:
    """Per micro-batch sizes on one rank: a = activation bytes, tokens T = b x s, residual tokens
    (T/TP under SP), heads and key/value heads of this TP rank."""

    a: int
    b: int
    s: int
    tokens: int
    residual: int
    heads: int
    kv_heads: int

    @staticmethod
    def of(cfg: Config) -> _Shape:
        m, tp = cfg.model, _tp(cfg)
        tokens = cfg.train.micro_batch_size * m.seq_length
        residual = tokens // tp if cfg.parallel.sequence_parallel else tokens
        return _Shape(2 if cfg.train.bf16 else 4, cfg.train.micro_batch_size, m.seq_length, tokens,
                      residual, m.num_attention_heads // tp, m.kv_heads // tp)


def _norm_bytes(cfg: Config, sh: _Shape) -> int:
    """RMSNorm (model/layers.py's fused function): x in fp32 (a copy under bf16) and rsqrt [T, 1]."""
    return 4 * sh.residual * cfg.model.hidden_size + 4 * sh.residual


def _entered_input(cfg: Config, sh: _Shape) -> int:
    """The [T, H] input the column-parallel projections of a block save: one tensor shared by the
    matmuls that read it (q, k, v; gate, up; the LM head). Under SP the sequence all-gather returns it
    contiguous (comm._gather), so no matmul makes a copy of its own."""
    return sh.a * sh.tokens * cfg.model.hidden_size


def _attention_bytes(cfg: Config, sh: _Shape) -> int:
    """Input of q/k/v [T, H] (gathered under SP), cos/sin tables [s, d] fp32, SDPA's rotated q [T, n d],
    k [T, g d], v [T, g d], output [T, n d] (o_proj's input, the same storage) and fp32 logsumexp
    [b, n, s]; selective recompute keeps q, k, v and the output but not the logsumexp."""
    m = cfg.model
    d, a, t = m.kv_channels, sh.a, sh.tokens
    qkv = a * t * (2 * sh.heads + 2 * sh.kv_heads) * d + _entered_input(cfg, sh)
    lse = 0 if cfg.train.recompute_granularity == "selective" else 4 * sh.b * sh.heads * sh.s
    return qkv + 8 * sh.s * d + lse


def _dense_mlp_bytes(cfg: Config, sh: _Shape) -> int:
    """Gated MLP under TP: input [T, H] (see :func:`_entered_input`), gate output [T, 2I/tp], up output
    and product [T, I/tp]."""
    m = cfg.model
    return _entered_input(cfg, sh) + sh.a * sh.tokens * 4 * m.ffn_hidden_size // _tp(cfg)


@dataclass(frozen=True)
class RoutedRows:
    """Rows of one MoE layer call per micro-batch: ``sent`` this rank dispatches (its kept
    assignments), ``received`` its experts compute (the worst EP rank's), ``groups`` routing groups."""

    sent: float
    received: float
    groups: int


def routed_rows(cfg: Config, world_size: int, load: Sequence[float] | None = None) -> RoutedRows:
    """Expected rows from the traffic model's counts (uniform or ``load``; capacity drops applied)."""
    counts = expected_counts(cfg, world_size, expert_load=load)[0].sum(axis=0)  # [E] sent per expert
    ep = cfg.parallel.expert_model_parallel_size
    per_rank = counts.reshape(ep, -1).sum(axis=1) * ep  # every EP source sends the same distribution
    tokens = cfg.train.micro_batch_size * cfg.model.seq_length
    groups = tokens // (cfg.moe.router_group_size or tokens)
    return RoutedRows(float(counts.sum()), float(per_rank.max()), groups)


def _router_bytes(cfg: Config, sh: _Shape, groups: int) -> int:
    """Router on this rank's T_r tokens: fp32 input [T_r, H], softmax and logits [T_r, E] fp32, top-k ids
    [T_r, k] int64, group ids [T_r] int64, group load fractions [G, E], keep mask [T_r, k] bool,
    logsumexp [T_r] fp32; Mixtral's renormalisation also the top-k probabilities and their sum."""
    m, moe, t = cfg.model, cfg.moe, sh.residual
    e, k = moe.num_experts, moe.router_topk
    out = 4 * t * m.hidden_size + 8 * t * e + 8 * t * k + 8 * t + 4 * groups * e + t * k + 4 * t
    if m.model_family == "mixtral":
        out += 4 * t * k + 4 * t
    return out


def _moe_bytes(cfg: Config, sh: _Shape, rows: RoutedRows) -> float:
    """Permutation indices (2 x int64 per sent row), with EP the grouping order and its inverse (2 x
    int64 per received row), expert GEMMs on received rows (input H, gate and up outputs, their
    product: OpenMoE 2I + I + I, Mixtral's fused SwiGLU I + I + I), the fused combine (expert outputs
    [N, H] and weights [N] in y's dtype). With K > 1 pipelined chunks the pipeline also keeps every
    chunk's received rows and expert outputs outside autograd."""
    m, p, a = cfg.model, cfg.parallel, sh.a
    h, ffn = m.hidden_size, m.ffn_hidden_size
    n, n_local = rows.sent, rows.received
    hidden = 3 * ffn if m.model_family == "mixtral" else 4 * ffn
    out = 16 * n + a * n_local * (h + hidden) + a * n * (h + 1)
    if p.expert_model_parallel_size > 1:
        out += 16 * n_local
        if p.moe_alltoall_chunks > 1 and not p.moe_hierarchical_alltoall:
            out += 2 * a * n_local * h
    return out


def layer_activations(cfg: Config, world_size: int, layer: int,
                      load: Sequence[float] | None = None) -> LayerActivations:
    """Saved bytes of decoder ``layer`` per micro-batch on the worst rank, without full recompute."""
    sh = _Shape.of(cfg)
    norms = 2 * _norm_bytes(cfg, sh)
    attention = _attention_bytes(cfg, sh)
    if not cfg.moe.is_moe_layer(layer):
        return LayerActivations(norms, attention, _dense_mlp_bytes(cfg, sh))
    rows = routed_rows(cfg, world_size, load)
    mixtral = cfg.model.model_family == "mixtral"
    return LayerActivations(norms + (0 if mixtral else _norm_bytes(cfg, sh)), attention,
                            0 if mixtral else _dense_mlp_bytes(cfg, sh),
                            _router_bytes(cfg, sh, rows.groups), math.ceil(_moe_bytes(cfg, sh, rows)))


def _layer_load(load: ExpertLoad, layer: int) -> Sequence[float] | None:
    if isinstance(load, Mapping):
        return load.get(layer)
    return load


def recompute_segments(cfg: Config, layers: range) -> list[tuple[list[int], bool]]:
    """megamoe.training.recompute.full_recompute_segments on layer indices: (layers, recomputed?)."""
    t = cfg.train
    keys, n = list(layers), t.recompute_num_layers
    if t.recompute_granularity != "full":
        return [([k], False) for k in keys]
    if t.recompute_method == "uniform":
        return [(keys[i:i + n], True) for i in range(0, len(keys), n)]
    return [([k], i < n) for i, k in enumerate(keys)]


@dataclass(frozen=True)
class ChunkActivations:
    """Bytes one model chunk (virtual stage) holds per micro-batch: ``saved`` between its forward and
    its backward; ``recompute_working``: the largest recomputed segment's activations, alive while
    backward re-runs it (full recompute only)."""

    saved: int
    recompute_working: int = 0
    layers: dict[int, LayerActivations] = field(default_factory=dict)


def _head_bytes(cfg: Config, sh: _Shape) -> int:
    """Final norm, LM-head input [T, H], and the loss: TP 1 keeps the fp32 logits [T, V_pad] (a copy of
    the real columns under bf16), the logsumexp and the labels; TP > 1 the vocab-parallel
    cross-entropy's fp32 softmax [T, V_local], local targets (int64), the outside mask and logsumexp."""
    m, tp, t = cfg.model, _tp(cfg), sh.tokens
    local = m.padded_vocab_size(tp) // tp
    head = _norm_bytes(cfg, sh) + _entered_input(cfg, sh)
    if tp == 1:
        logits = 4 * t * (m.vocab_size if cfg.train.bf16 else local)
        return head + logits + 4 * t + 8 * t
    return head + 4 * t * min(local, m.vocab_size) + 8 * t + t + 4 * t


def _embedding_bytes(cfg: Config, sh: _Shape) -> int:
    """The lookup's token ids [b, s] int64 (under TP: the local ids and the outside mask)."""
    return 8 * sh.tokens + (sh.tokens if _tp(cfg) > 1 else 0)


def chunk_activation_bytes(cfg: Config, world_size: int, v: int, load: ExpertLoad = None,
                           ) -> ChunkActivations:
    """Saved-for-backward bytes of virtual stage ``v`` for one micro-batch (worst rank of the stage)."""
    ranges, sh = stage_ranges(cfg), _Shape.of(cfg)
    layers = {i: layer_activations(cfg, world_size, i, _layer_load(load, i)) for i in ranges[v]}
    saved = working = 0
    stage_input = sh.a * sh.residual * cfg.model.hidden_size  # one segment input / a received hidden
    for seg, recomputed in recompute_segments(cfg, ranges[v]):
        full = sum(layers[i].total for i in seg)
        saved += stage_input if recomputed else full
        working = max(working, full if recomputed else 0)
    if v == 0:
        saved += _embedding_bytes(cfg, sh)
    elif cfg.train.bf16 and cfg.train.recompute_granularity != "full":
        saved += stage_input  # the received bf16 hidden: the first norm saves an fp32 copy of it
    if v == len(ranges) - 1:
        saved += _head_bytes(cfg, sh)
    return ChunkActivations(saved, working, layers)


def micro_batches(cfg: Config, world_size: int) -> int:
    """Micro-batches per step on each DP replica: global batch / (micro-batch x DP)."""
    dp, _ = data_parallel_sizes(cfg, world_size)
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def schedule_order(pp: int, vp: int, rank: int, num_micro_batches: int) -> list[tuple[str, int]]:
    """The ("F" | "B", chunk) sequence pipeline rank ``rank`` runs in megamoe/parallel/schedules.py:
    1F1B (vp 1), interleaved 1F1B (vp > 1), plain accumulation (pp 1)."""
    total = num_micro_batches * vp
    if pp == 1:
        return [op for _ in range(num_micro_batches) for op in (("F", 0), ("B", 0))]

    def chunk_of(k: int, forward: bool) -> int:
        chunk = (k % (pp * vp)) // pp
        return chunk if forward else vp - 1 - chunk

    if vp == 1:
        warmup = min(pp - rank - 1, num_micro_batches)
    else:
        warmup = total if num_micro_batches == pp else min((pp - rank - 1) * 2 + (vp - 1) * pp, total)
    order = [("F", chunk_of(k, True)) for k in range(warmup)]
    for k in range(total - warmup):
        order += [("F", chunk_of(k + warmup, True)), ("B", chunk_of(k, False))]
    order += [("B", chunk_of(k, False)) for k in range(total - warmup, total)]
    return order


@dataclass(frozen=True)
class PipelinePeak:
    """Peak saved activations of one pipeline rank over a step: ``bytes`` (including the recompute
    working set of one segment), ``saved_bytes`` (without it), and ``micro_batches``, the most
    chunk-forwards alive at once (the schedule's ``max_in_flight``)."""

    bytes: int
    micro_batches: int
    saved_bytes: int


def pipeline_peak(cfg: Config, world_size: int, pp_rank: int, load: ExpertLoad = None) -> PipelinePeak:
    """Simulate the schedule's order: a forward adds its chunk's saved bytes, a backward frees them."""
    pp, ranges = _pp(cfg), stage_ranges(cfg)
    vp = len(ranges) // pp
    chunks = [chunk_activation_bytes(cfg, world_size, c * pp + pp_rank, load) for c in range(vp)]
    live = count = peak = most = 0
    for op, c in schedule_order(pp, vp, pp_rank, micro_batches(cfg, world_size)):
        sign = 1 if op == "F" else -1
        live += sign * chunks[c].saved
        count += sign
        peak, most = max(peak, live), max(most, count)
    working = max(chunk.recompute_working for chunk in chunks)
    return PipelinePeak(peak + working, most, peak)


# -- 3. exchange buffers --------------------------------------------------------------------------
def exchange_buffer_bytes(cfg: Config, world_size: int, load: ExpertLoad = None) -> int:
    """Transient all-to-all buffers of one MoE layer call (the largest over layers): the permuted rows
    sent [N, H] and received [N_recv, H], then the expert outputs sent back and received; the
    hierarchical exchange also holds the relayed rows between its two steps. K pipelined chunks all
    start at once, so chunking does not shrink them. Zero without EP."""
    if cfg.parallel.expert_model_parallel_size == 1:
        return 0
    a = 2 if cfg.train.bf16 else 4
    worst = 0.0
    for layer in range(cfg.model.num_layers):
        if cfg.moe.is_moe_layer(layer):
            rows = routed_rows(cfg, world_size, _layer_load(load, layer))
            relay = rows.sent if cfg.parallel.moe_hierarchical_alltoall else 0.0
            worst = max(worst, a * cfg.model.hidden_size * (rows.sent + rows.received + relay))
    return math.ceil(worst)


# -- all of it ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageMemory:
    """Bytes per rank of one pipeline stage's worst rank (index 0 of its DP and expert-DP groups)."""

    pp_rank: int
    weights: int
    grads: int
    optimizer: int  # fp32 masters + AdamW moments
    activations: int
    exchange_buffers: int
    micro_batches_in_flight: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.exchange_buffers


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per rank: the fields are those of the worst stage (largest total); ``stages``
    gives every pipeline stage. grads include ZeRO-2's transient buckets."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    exchange_buffers: int
    total: int
    stages: tuple[StageMemory, ...]


def memory_per_rank(cfg: Config, world_size: int, expert_load: ExpertLoad = None) -> MemoryEstimate:
    """Memory per rank of ``cfg`` on ``world_size`` ranks. expert_load: per-expert loads (any scale)
    of every MoE layer, or {layer: loads}; None: uniform routing."""
    validate_layout(cfg, world_size)  # one-line ConfigError for a layout megamoe would refuse
    _check_load(cfg, expert_load)
    exchange = exchange_buffer_bytes(cfg, world_size, expert_load)
    stages = []
    for pp_rank in range(_pp(cfg)):
        state = state_bytes(cfg, world_size, pp_rank)
        act = pipeline_peak(cfg, world_size, pp_rank, expert_load)
        stages.append(StageMemory(pp_rank, state.params, state.grads + state.grad_buckets,
                                  state.master + state.optimizer, act.bytes, exchange, act.micro_batches))
    worst = max(stages, key=lambda s: s.total)
    return MemoryEstimate(worst.weights, worst.grads, worst.optimizer, worst.activations,
                          worst.exchange_buffers, worst.total, tuple(stages))


def _check_load(cfg: Config, load: ExpertLoad) -> None:
    """Loads keyed by a layer that is not an MoE layer are a mistake worth one line."""
    if isinstance(load, Mapping):
        bad = [k for k in load if not (0 <= k < cfg.model.num_layers and cfg.moe.is_moe_layer(k))]
        if bad:
            raise ConfigError(f"expert load given for layer(s) {bad} that are not MoE layers; key the "
                              "loads by MoE layer index")


__all__ = ["BucketSpec", "ChunkActivations", "LayerActivations", "MemoryEstimate", "ParamSpec",
           "PipelinePeak", "RoutedRows", "StageMemory", "StateBytes", "bucket_layout",
           "chunk_activation_bytes", "data_parallel_sizes", "exchange_buffer_bytes", "layer_activations",
           "memory_per_rank", "micro_batches", "owned_numel", "pipeline_peak", "recompute_segments",
           "routed_rows", "schedule_order", "stage_params", "stage_ranges", "state_bytes"]
