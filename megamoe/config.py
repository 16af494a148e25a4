"""Typed, frozen configuration for megamoe.

Each dataclass validates its own fields (``validate``) and the cross-field rules live in
``validate_all``. Every error is a :class:`ConfigError` whose one-line message names the offending
command-line flag and says how to fix it, so a bad launch fails before any collective starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the flag."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Decoder shape. ``kv_channels`` may differ from hidden/heads (OpenMoE-8B: 24 x 128 vs 2048)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    seq_length: int
    make_vocab_size_divisible_by: int = 128
    norm_epsilon: float = 1e-6
    rotary_base: float = 10000.0
    init_method_std: float = 0.02

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "kv_channels",
                     "ffn_hidden_size", "vocab_size", "seq_length", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            _check(value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")
        _check(self.kv_channels % 2 == 0,
               f"--kv-channels must be even for rotary embeddings, got {self.kv_channels}")

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocab padded to a multiple of make_vocab_size_divisible_by * TP, as Megatron does."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass(frozen=True)
class MoEConfig:
    """Router and expert settings. ``capacity_factor=None`` means dropless routing."""

    num_experts: int
    router_topk: int = 2
    layer_freq: int = 1
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 4
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 1e-4
    router_init_std: float = 0.02
    grouped_gemm: bool = True

    def validate(self, num_layers: int) -> None:
        _check(self.num_experts > 0, f"--num-experts must be positive, got {self.num_experts}")
        _check(1 <= self.router_topk <= self.num_experts,
               f"--moe-router-topk {self.router_topk} must be between 1 and --num-experts "
               f"{self.num_experts}")
        _check(1 <= self.layer_freq <= num_layers,
               f"--moe-layer-freq {self.layer_freq} must be between 1 and --num-layers {num_layers} "
               "(otherwise no layer is an MoE layer)")
        for flag, cf in (("--moe-capacity-factor", self.capacity_factor),
                         ("--moe-eval-capacity-factor", self.eval_capacity_factor)):
            _check(cf is None or cf > 0, f"{flag} must be positive, got {cf}")
        _check(self.min_capacity >= 0, f"--moe-min-capacity must be >= 0, got {self.min_capacity}")
        _check(self.aux_loss_coeff >= 0 and self.z_loss_coeff >= 0,
               "--moe-aux-loss-coeff and --moe-z-loss-coeff must be >= 0")

    def is_moe_layer(self, layer: int) -> bool:
        """OpenMoE rule: layer i (0-indexed) is MoE when (i + 1) % interval == 0."""
        return (layer + 1) % self.layer_freq == 0


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    sequence_parallel: bool = False
    moe_hierarchical_alltoall: bool = False
    moe_alltoall_chunks: int = 1
    moe_tp_dedup: bool = True  # TP>1 without SP: each TP rank dispatches only its 1/TP of tokens
    moe_ranks_per_node: int = 0  # 0: from the launcher (LOCAL_WORLD_SIZE) or MEGAMOE_RANKS_PER_NODE
    num_layers_per_virtual_pipeline_stage: int | None = None
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None
    distributed_backend: str | None = None  # None: nccl with CUDA, gloo otherwise
    distributed_timeout_minutes: float = 10.0

    def virtual_stages(self, num_layers: int) -> int:
        """Model chunks per pipeline rank (1 without interleaving)."""
        per = self.num_layers_per_virtual_pipeline_stage
        if per is None:
            return 1
        pp = self.pipeline_model_parallel_size
        _check(per > 0 and num_layers % (per * pp) == 0,
               f"--num-layers-per-virtual-pipeline-stage {per} x --pipeline-model-parallel-size {pp} "
               f"does not divide --num-layers {num_layers}")
        return num_layers // (per * pp)

    def validate(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size", "expert_tensor_parallel_size"):
            value = getattr(self, name)
            _check(value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
        _check(not (self.sequence_parallel and self.tensor_model_parallel_size == 1),
               "--sequence-parallel needs --tensor-model-parallel-size > 1")
        _check(self.moe_alltoall_chunks >= 1,
               f"--moe-alltoall-chunks must be >= 1, got {self.moe_alltoall_chunks}")
        _check(self.moe_ranks_per_node >= 0, "--moe-ranks-per-node must be >= 0")
        _check(self.num_layers_per_virtual_pipeline_stage is None or self.pipeline_model_parallel_size > 1,
               "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        _check(self.expert_tensor_parallel_size == 1,
               "--expert-tensor-parallel-size > 1 is not supported yet; experts are whole on each rank")
        _check(self.distributed_backend in (None, "gloo", "nccl"),
               f"--distributed-backend must be gloo or nccl, got {self.distributed_backend}")


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 100
    lr: float = 3e-4
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None  # None: train_iters
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    bf16: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    grad_reduce_in_bf16: bool = False
    zero_stage: int = 1  # 2: gradients too are kept only as this rank's shard (distributed optimizer)
    ddp_bucket_size: int = 1 << 22  # gradient bucket size in elements (one reduce-scatter each)
    overlap_param_gather: bool = False  # all-gather updated params async, wait per module in forward
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 10
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    recompute_granularity: str | None = None  # "full": whole layers, "selective": attention core
    recompute_method: str = "uniform"  # full: "uniform" groups of N layers, "block" first N layers
    recompute_num_layers: int = 1
    exit_interval: int | None = None
    exit_duration_in_mins: float | None = None
    metrics_file: str | None = None
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    tensorboard_dir: str | None = None
    peak_tflops: float | None = None  # None: measured at start-up

    def validate(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval",
                     "eval_interval"):
            value = getattr(self, name)
            _check(value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")
        _check(self.global_batch_size % self.micro_batch_size == 0,
               f"--global-batch-size {self.global_batch_size} must be divisible by "
               f"--micro-batch-size {self.micro_batch_size}")
        _check(self.lr_decay_style in ("constant", "linear", "cosine", "inverse-square-root"),
               f"--lr-decay-style must be constant, linear, cosine or inverse-square-root, got "
               f"{self.lr_decay_style}")
        _check(0 <= self.min_lr <= self.lr, f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        _check(self.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0")
        _check(self.eval_iters >= 0, "--eval-iters must be >= 0")
        _check(self.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping)")
        _check(self.save_interval is None or self.save_interval > 0,
               "--save-interval must be positive")
        _check(self.save_interval is None or self.save is not None,
               "--save-interval needs --save DIR")
        _check(self.recompute_granularity in (None, "full", "selective"),
               f"--recompute-granularity must be full or selective, got {self.recompute_granularity}")
        _check(self.recompute_method in ("uniform", "block"),
               f"--recompute-method must be uniform or block, got {self.recompute_method}")
        _check(self.recompute_num_layers >= 1,
               f"--recompute-num-layers must be >= 1, got {self.recompute_num_layers}")
        _check(self.zero_stage in (1, 2), f"--zero-stage must be 1 or 2, got {self.zero_stage}")
        _check(self.zero_stage == 1 or self.use_distributed_optimizer,
               "--zero-stage 2 needs --use-distributed-optimizer")
        _check(not self.overlap_param_gather or self.use_distributed_optimizer,
               "--overlap-param-gather needs --use-distributed-optimizer")
        _check(self.ddp_bucket_size > 0, f"--ddp-bucket-size must be positive, got {self.ddp_bucket_size}")


@dataclass(frozen=True)
class DataConfig:
    mock_data: bool = False
    data_path: tuple[str, ...] = ()
    split: str = "969,30,1"
    tokenizer_type: str = "SentencePieceTokenizer"
    tokenizer_model: str | None = None
    data_cache_path: str | None = None

    def validate(self) -> None:
        _check(self.mock_data or len(self.data_path) > 0,
               "no training data: pass --data-path PREFIX (with --tokenizer-model) or --mock-data")
        _check(not (self.mock_data and self.data_path),
               "--mock-data and --data-path are exclusive: pass one of them")


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    moe: MoEConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(mock_data=True))

    def validate(self, world_size: int = 1) -> Config:
        """Check every field and every cross-field rule; return self for chaining."""
        self.model.validate()
        self.moe.validate(self.model.num_layers)
        self.parallel.validate()
        self.train.validate()
        self.data.validate()
        # The chunked exchange runs each chunk's backward as its own autograd call, and each would
        # re-run the whole recomputed layer: (1 + K) forwards of every MoE layer per backward.
        _check(self.train.recompute_granularity != "full" or self.parallel.moe_alltoall_chunks == 1,
               "--recompute-granularity full does not combine with --moe-alltoall-chunks > 1 (every "
               "chunk's backward would re-run the layer); use one of them, or selective recompute")
        validate_layout(self, world_size)
        return self

    def replace(self, **sections: object) -> Config:
        return dataclasses.replace(self, **sections)


def validate_layout(cfg: Config, world_size: int) -> None:
    """Rules that tie the model shape to the parallel layout and the batch to data parallelism."""
    p, m = cfg.parallel, cfg.model
    tp, pp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                  p.expert_model_parallel_size)
    _check(world_size % (tp * pp) == 0,
           f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
           f"--pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} ranks")
    expert_block = p.expert_tensor_parallel_size * ep * pp
    _check(world_size % expert_block == 0,
           f"world size {world_size} is not divisible by --expert-tensor-parallel-size x "
           f"--expert-model-parallel-size x --pipeline-model-parallel-size = {expert_block}")
    _check(cfg.moe.num_experts % ep == 0,
           f"--num-experts {cfg.moe.num_experts} is not divisible by "
           f"--expert-model-parallel-size {ep}")
    _check(m.num_attention_heads % tp == 0,
           f"--num-attention-heads {m.num_attention_heads} is not divisible by "
           f"--tensor-model-parallel-size {tp}")
    dedup = tp > 1 and not p.sequence_parallel and p.moe_tp_dedup
    _check(not dedup or (m.seq_length * cfg.train.micro_batch_size) % tp == 0,
           f"--seq-length x --micro-batch-size must be divisible by --tensor-model-parallel-size {tp} "
           "for the TP-deduplicated all-to-all; pass --no-moe-tp-dedup or change the sizes")
    _check(m.ffn_hidden_size % tp == 0,
           f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by "
           f"--tensor-model-parallel-size {tp}")
    _check(not p.sequence_parallel or m.seq_length % tp == 0,
           f"--seq-length {m.seq_length} is not divisible by --tensor-model-parallel-size {tp}, "
           "which --sequence-parallel needs")
    from megamoe.parallel.pipeline import stage_layer_ranges  # raises ConfigError on a bad split

    vp = p.virtual_stages(m.num_layers)
    stage_layer_ranges(m.num_layers, pp, vp, p.decoder_first_pipeline_num_layers,
                       p.decoder_last_pipeline_num_layers)
    dp = world_size // (tp * pp)
    t = cfg.train
    _check(t.global_batch_size % (t.micro_batch_size * dp) == 0,
           f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
           f"{t.micro_batch_size} x data-parallel size {dp}")
    n_mb = t.global_batch_size // (t.micro_batch_size * dp)
    _check(vp == 1 or (n_mb >= pp and n_mb % pp == 0),
           f"interleaved pipelining needs the micro-batches per step ({n_mb} = --global-batch-size / "
           f"(--micro-batch-size x DP)) to be a multiple of --pipeline-model-parallel-size {pp}")
