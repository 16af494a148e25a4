"""Typed, frozen configuration for megamoe, declared once: every field is also a command-line flag.

Each field's help text and argparse details live in its metadata (:func:`flag`);
:mod:`megamoe.arguments` builds the parser from them. Each dataclass validates its own fields
(``validate``); :meth:`Config.validate` adds the cross-field and layout rules. Every error is a
:class:`ConfigError` whose one-line message names the offending flag and says how to fix it, so a bad
launch fails before any collective starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the flag."""


def _te_available() -> bool:
    from megamoe.moe.fp8 import te_available  # imports torch: only when --fp8-backend te asks

    return te_available()


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def flag(help: str, default: Any = dataclasses.MISSING, **argparse_kwargs: Any) -> Any:
    """A field that is also a flag. Metadata: ``help``; ``flag`` where the name is not --field-name
    (--no-field-name for a bool that defaults to True); ``negation``, an exclusive flag that sets a
    bool back to False; any other argparse keyword (choices, nargs)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass(frozen=True)
class ModelConfig:
    """Decoder shape; kv_channels may differ from hidden/heads (OpenMoE-8B: 24 x 128 vs 2048)."""

    # The shape has no defaults: it comes from --model-preset or from explicit flags.
    num_layers: int = flag("decoder layers")
    hidden_size: int = flag("model width H")
    num_attention_heads: int = flag("attention heads")
    kv_channels: int = flag("width of each attention head (default: hidden size / heads)")
    ffn_hidden_size: int = flag("width I of every dense and expert MLP")
    vocab_size: int = flag("tokenizer vocabulary, padded (see --make-vocab-size-divisible-by)")
    seq_length: int = flag("tokens per sample")
    make_vocab_size_divisible_by: int = flag("pad the vocabulary to a multiple of this x TP", 128)
    norm_epsilon: float = flag("RMSNorm epsilon", 1e-6)
    rotary_base: float = flag("rotary embedding base (theta)", 10000.0)
    init_method_std: float = flag("standard deviation of the normal weight init", 0.02)
    output_z_loss_coeff: float = flag("T5X's output z-loss: this x mean logsumexp(logits)^2 per token is "
                                      "added to the objective (logged apart from the LM loss)", 0.0)
    init_method: str = flag("weight initialisation: normal = N(0, --init-method-std) with Megatron's "
                            "1/sqrt(2 x layers) on residual outputs; t5x = OpenMoE's T5X variance scaling "
                            "(fan-in, scale 0.1, query / sqrt(head width), embedding std 1)", "normal",
                            choices=("normal", "t5x"))
    model_family: str = flag(
        "decoder family: openmoe (no attention scaling, an MoE layer every --moe-layer-freq layers with an "
        "extra dense MLP after it, top-k weights not renormalised) or mixtral (1/sqrt(d) attention "
        "scaling, SwiGLU experts w1/w3/w2, softmax then top-k renormalised, every layer MoE)", "openmoe",
        choices=("openmoe", "mixtral"))
    group_query_attention: bool = flag("grouped-query attention: --num-query-groups key/value heads, each "
                                       "shared by heads / groups query heads", False)
    num_query_groups: int | None = flag("key/value heads under --group-query-attention", None)

    @property
    def kv_heads(self) -> int:
        """Key/value heads: the query groups under GQA, else one per attention head."""
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    def validate(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "kv_channels",
                     "ffn_hidden_size", "vocab_size", "seq_length", "make_vocab_size_divisible_by"):
            value = getattr(self, name)
            _check(value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("norm_epsilon", "rotary_base", "init_method_std"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0,
                   f"--{name.replace('_', '-')} must be positive, got {value}")
        _check(self.init_method_std <= 1.0,
               f"--init-method-std {self.init_method_std} is too large (at most 1; Megatron uses 0.02)")
        _check(math.isfinite(self.output_z_loss_coeff) and self.output_z_loss_coeff >= 0,
               f"--output-z-loss-coeff must be >= 0, got {self.output_z_loss_coeff}")
        _check(self.kv_channels % 2 == 0,
               f"--kv-channels must be even for rotary embeddings, got {self.kv_channels}")
        groups = self.num_query_groups
        _check(groups is None or self.group_query_attention,
               "--num-query-groups needs --group-query-attention")
        _check(not self.group_query_attention or groups is not None,
               "--group-query-attention needs --num-query-groups N (the key/value heads)")
        _check(groups is None or (groups > 0 and self.num_attention_heads % groups == 0),
               f"--num-query-groups {groups} must be positive and divide --num-attention-heads "
               f"{self.num_attention_heads}")

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Vocab padded to a multiple of make_vocab_size_divisible_by * TP, as Megatron does."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass(frozen=True)
class MoEConfig:
    """Router and expert settings; no capacity factor means dropless routing."""

    num_experts: int = flag("experts per MoE layer")
    router_topk: int = flag("experts per token", 2, flag="--moe-router-topk")
    layer_freq: int = flag("every N-th layer is an MoE layer", 1, flag="--moe-layer-freq")
    capacity_factor: float | None = flag(
        "tokens per expert = round(cf * tokens / experts); absent = dropless", None,
        flag="--moe-capacity-factor")
    eval_capacity_factor: float | None = flag("capacity factor in evaluation (default: as in training)",
                                              None, flag="--moe-eval-capacity-factor")
    min_capacity: int = flag("fewest tokens an expert can take", 4, flag="--moe-min-capacity")
    router_group_size: int | None = flag(
        "tokens per routing group (T5X): capacity and drop order are per group of this many consecutive "
        "tokens of the micro-batch, the same tokens in every layout; default: the whole micro-batch",
        None, flag="--moe-router-group-size")
    router_loss_average: bool = flag(
        "sum the router losses over MoE layers (Megatron) instead of averaging them (T5X, OpenMoE)", True,
        flag="--no-moe-router-loss-average")
    aux_loss_coeff: float = flag("load-balancing loss coefficient", 0.01, flag="--moe-aux-loss-coeff")
    z_loss_coeff: float = flag("router z-loss coefficient (default: the preset's, 1e-4)", 1e-4,
                               flag="--moe-z-loss-coeff")
    router_init_std: float = flag("standard deviation of the router weight init", 0.02,
                                  flag="--moe-router-init-std")
    grouped_gemm: bool = flag("run experts as a loop of GEMMs over contiguous slices (reference path)",
                              True, flag="--no-moe-grouped-gemm")

    # FP8 expert GEMMs (docs/ARCHITECTURE.md, "FP8 experts"): Megatron's flag names
    fp8_format: str | None = flag(
        "FP8 expert GEMMs: e4m3 everywhere, or hybrid (E4M3 forward, E5M2 gradients); absent: off", None,
        flag="--fp8-format", choices=("e4m3", "hybrid"))
    fp8_recipe: str = flag(
        "FP8 scaling: delayed (amax history of earlier steps), tensorwise (current amax per expert "
        "GEMM), blockwise (1x128 activation/gradient tiles, 128x128 weight blocks)", "delayed",
        flag="--fp8-recipe", choices=("delayed", "tensorwise", "blockwise"))
    fp8_margin: int = flag("delayed/tensorwise scaling: scale down by 2^margin", 0, flag="--fp8-margin")
    fp8_amax_history_len: int = flag("delayed scaling: steps of amax history", 1024,
                                     flag="--fp8-amax-history-len")
    fp8_amax_compute_algo: str = flag("delayed scaling: amax from the history's max or most recent",
                                      "max", flag="--fp8-amax-compute-algo", choices=("max", "most_recent"))
    fp8_backend: str | None = flag(
        "FP8 GEMMs by Transformer Engine (te) or torch float8 (torch); default: te when it imports on "
        "CUDA, torch otherwise", None, flag="--fp8-backend", choices=("te", "torch"))
    router_padding_for_fp8: bool = flag(
        "pad each expert's rows to a multiple of 16 with zero rows (FP8 kernels need it)", False,
        flag="--moe-router-padding-for-fp8")

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
        _check(self.fp8_margin >= 0, f"--fp8-margin must be >= 0, got {self.fp8_margin}")
        _check(self.fp8_amax_history_len >= 1,
               f"--fp8-amax-history-len must be >= 1, got {self.fp8_amax_history_len}")
        _check(self.fp8_format is not None or self.fp8_backend is None,
               "--fp8-backend needs --fp8-format e4m3 or hybrid (FP8 is off without it)")
        _check(self.fp8_backend != "te" or _te_available(),
               "--fp8-backend te: Transformer Engine does not import here or there is no CUDA device; "
               "use --fp8-backend torch (torch float8, runs everywhere)")

    def is_moe_layer(self, layer: int) -> bool:
        """OpenMoE rule: layer i (0-indexed) is MoE when (i + 1) % interval == 0."""
        return (layer + 1) % self.layer_freq == 0


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor, pipeline, expert and sequence parallelism, and the expert exchange."""

    tensor_model_parallel_size: int = flag("tensor-parallel size TP", 1)
    pipeline_model_parallel_size: int = flag("pipeline-parallel size PP", 1)
    expert_model_parallel_size: int = flag("expert-parallel size EP", 1)
    expert_tensor_parallel_size: int = flag("tensor-parallel size inside experts (only 1 so far)", 1)
    sequence_parallel: bool = flag("split the sequence over TP outside attention and MLP", False)
    moe_hierarchical_alltoall: bool = flag(
        "intra-node exchange, then one inter-node all-to-all per local rank", False)
    moe_alltoall_chunks: int = flag(
        "split dispatched tokens into K chunks, overlapping all-to-all with experts", 1)
    moe_tp_dedup: bool = flag(
        "TP>1 without SP: send every TP rank's (identical) tokens instead of 1/TP each", True)
    moe_ranks_per_node: int = flag(
        "node size for hierarchical all-to-all (0: LOCAL_WORLD_SIZE or MEGAMOE_RANKS_PER_NODE)", 0)
    moe_rebalance_interval: int = flag(
        "every N steps, move experts between EP ranks to even out their measured load (0: never)", 0)
    moe_rebalance_window: int = flag(
        "steps of routed-token counts the rebalancer plans from (a moving window)", 100)
    moe_rebalance_min_gain: float = flag(
        "rebalance a layer only when the plan lowers its EP-rank load max/mean by this fraction", 0.05)
    num_layers_per_virtual_pipeline_stage: int | None = flag(
        "interleaved 1F1B: layers per model chunk (virtual stage)", None)
    decoder_first_pipeline_num_layers: int | None = flag(
        "layers of the first pipeline stage (the others split the rest evenly)", None)
    decoder_last_pipeline_num_layers: int | None = flag("layers of the last pipeline stage", None)
    distributed_backend: str | None = flag("default: nccl with CUDA, gloo otherwise", None,
                                           choices=("gloo", "nccl"))
    distributed_timeout_minutes: float = flag("timeout of every collective", 10.0)

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
        _check(self.moe_rebalance_interval >= 0,
               f"--moe-rebalance-interval must be >= 0 (0: never), got {self.moe_rebalance_interval}")
        _check(self.moe_rebalance_interval == 0 or self.expert_model_parallel_size > 1,
               "--moe-rebalance-interval needs --expert-model-parallel-size > 1 (with one EP rank there "
               "is nothing to balance)")
        _check(self.moe_rebalance_window >= 1,
               f"--moe-rebalance-window must be >= 1 step, got {self.moe_rebalance_window}")
        _check(0.0 <= self.moe_rebalance_min_gain < 1.0,
               f"--moe-rebalance-min-gain must be in [0, 1), got {self.moe_rebalance_min_gain}")
        _check(self.num_layers_per_virtual_pipeline_stage is None or self.pipeline_model_parallel_size > 1,
               "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        _check(self.expert_tensor_parallel_size == 1,
               "--expert-tensor-parallel-size > 1 is not supported yet; experts are whole on each rank")
        _check(self.distributed_timeout_minutes > 0,
               f"--distributed-timeout-minutes must be positive, got {self.distributed_timeout_minutes}")
        _check(self.distributed_backend in (None, "gloo", "nccl"),
               f"--distributed-backend must be gloo or nccl, got {self.distributed_backend}")


@dataclass(frozen=True)
class TrainConfig:
    """Batch, optimizer, precision, recomputation, logging and checkpoints."""

    micro_batch_size: int = flag("samples per micro-batch on each data-parallel rank", 1)
    global_batch_size: int = flag("samples per optimizer step", 8)
    train_iters: int = flag("optimizer steps", 100)
    lr: float = flag("peak learning rate", 3e-4)
    min_lr: float = flag("learning rate at the end of the decay", 0.0)
    lr_warmup_iters: int = flag("linear warm-up steps", 0)
    lr_decay_iters: int | None = flag("steps to decay over (default: --train-iters)", None)
    lr_decay_style: str = flag("constant, linear, cosine or inverse-square-root", "cosine")
    weight_decay: float = flag("AdamW weight decay", 0.01)
    adam_beta1: float = flag("AdamW beta1", 0.9)
    adam_beta2: float = flag("AdamW beta2", 0.95)
    adam_eps: float = flag("AdamW epsilon", 1e-8)
    clip_grad: float = flag("clip the global gradient norm to this (0: no clipping)", 1.0)
    seed: int = flag("random seed", 1234)
    bf16: bool = flag("bf16 mixed precision (fp32 master weights)", False, negation="--fp32")
    use_distributed_optimizer: bool = flag(
        "ZeRO: shard fp32 masters and AdamW state over DP (dense) and expert-DP (experts)", False)
    overlap_grad_reduce: bool = flag(
        "start each gradient bucket's reduction as soon as it is complete", False)
    grad_reduce_in_bf16: bool = flag("reduce gradients in bf16", False)
    zero_stage: int = flag("with --use-distributed-optimizer: 1 shards optimizer state (default), 2 also "
                           "gradients (reduce-scatter per bucket as backward produces it, every "
                           "micro-batch)", 1)
    ddp_bucket_size: int = flag(
        "gradient bucket size in elements for the distributed optimizer's reductions", 1 << 22)
    overlap_param_gather: bool = flag("all-gather updated parameters asynchronously; each module waits "
                                      "for its own buckets just before its forward", False)
    log_interval: int = flag("log every N iterations", 10)
    eval_interval: int = flag("evaluate every N iterations", 1000)
    eval_iters: int = flag("validation batches per evaluation", 10)
    save: str | None = flag("checkpoint directory to save to", None)
    load: str | None = flag("checkpoint directory to resume from", None)
    finetune: bool = flag("--load only the weights: start at iteration 0 with a fresh optimizer and data "
                          "order (a converted or pretrained checkpoint)", False)
    load_optim: bool = flag("--load without the optimizer state (fresh AdamW moments and step count)", True,
                            flag="--no-load-optim")
    save_interval: int | None = flag("save every N iterations (needs --save)", None)
    allow_nonfinite_load: bool = flag("continue from a checkpoint whose weights hold NaN or Inf", False)
    max_consecutive_skipped_steps: int = flag(
        "stop with an error after this many steps in a row were skipped for a non-finite gradient norm", 5)
    allow_existing_save_dir: bool = flag(
        "let a run that did not resume from --save write into a directory holding another run's "
        "checkpoints (it still never replaces one of their iterations)", False)
    recompute_granularity: str | None = flag(
        "activation recomputation: full = whole decoder layers (see --recompute-method), selective = "
        "the attention core only", None, choices=("full", "selective"))
    recompute_method: str = flag(
        "full recompute: uniform = every group of --recompute-num-layers layers, block = only the first "
        "--recompute-num-layers layers of each stage chunk", "uniform", choices=("uniform", "block"))
    recompute_num_layers: int = flag("layers per group for --recompute-method", 1)
    exit_interval: int | None = flag("save and exit 0 after every N-th iteration", None)
    exit_duration_in_mins: float | None = flag(
        "save and exit 0 once the run has lasted this long (Slurm time limits)", None)
    metrics_file: str | None = flag("one JSON object per iteration", None)
    wandb_project: str | None = flag("Weights & Biases project (no logging there when absent)", None)
    wandb_exp_name: str | None = flag("Weights & Biases run name", None)
    tensorboard_dir: str | None = flag("TensorBoard log directory", None)
    peak_tflops: float | None = flag(
        "per-device peak TFLOP/s that MFU divides by; default: a known GPU's dense BF16 datasheet peak, "
        "else the largest measured GEMM rate (CPU: stored per machine, tools/measure_peak.py re-measures)",
        None)

    def validate(self) -> None:
        for name in ("micro_batch_size", "global_batch_size", "train_iters", "log_interval",
                     "eval_interval"):
            value = getattr(self, name)
            _check(value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")
        _check(self.peak_tflops is None or 0 < self.peak_tflops < float("inf"),
               f"--peak-tflops must be a positive number, got {self.peak_tflops}")
        _check(self.global_batch_size % self.micro_batch_size == 0,
               f"--global-batch-size {self.global_batch_size} must be divisible by "
               f"--micro-batch-size {self.micro_batch_size}")
        _check(self.lr_decay_style in ("constant", "linear", "cosine", "inverse-square-root"),
               f"--lr-decay-style must be constant, linear, cosine or inverse-square-root, got "
               f"{self.lr_decay_style}")
        _check(0 <= self.min_lr <= self.lr, f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        _check(self.lr_warmup_iters >= 0, "--lr-warmup-iters must be >= 0")
        _check(self.lr_decay_iters is None or self.lr_decay_iters > 0,
               f"--lr-decay-iters must be positive, got {self.lr_decay_iters}")
        _check(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        _check(self.adam_eps > 0, f"--adam-eps must be positive, got {self.adam_eps}")
        _check(self.lr > 0 and math.isfinite(self.lr), f"--lr must be positive, got {self.lr}")
        _check(self.exit_interval is None or self.exit_interval > 0,
               f"--exit-interval must be positive, got {self.exit_interval}")
        _check(self.exit_duration_in_mins is None or self.exit_duration_in_mins > 0,
               f"--exit-duration-in-mins must be positive, got {self.exit_duration_in_mins}")
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
        _check(self.max_consecutive_skipped_steps > 0, "--max-consecutive-skipped-steps must be positive")
        _check(self.ddp_bucket_size > 0, f"--ddp-bucket-size must be positive, got {self.ddp_bucket_size}")


@dataclass(frozen=True)
class DataConfig:
    """Training data and tokenizer."""

    mock_data: bool = flag("synthetic random tokens instead of --data-path", False)
    data_path: tuple[str, ...] = flag("PREFIX, or blend weights and prefixes: 0.7 PREFIX_A 0.3 PREFIX_B",
                                      (), nargs="+")
    split: str = flag("train,valid,test weights of the documents", "969,30,1")
    tokenizer_type: str = flag("SentencePieceTokenizer, GPTSentencePieceTokenizer or HuggingFaceTokenizer",
                               "SentencePieceTokenizer")
    tokenizer_model: str | None = flag("the tokenizer's .model file, or a Hugging Face tokenizer's local "
                                       "directory (HuggingFaceTokenizer)", None)
    data_cache_path: str | None = flag("directory of the index caches (default: PREFIX's dir/cache)",
                                       None)

    def validate(self) -> None:
        _check(self.mock_data or len(self.data_path) > 0,
               "no training data: pass --data-path PREFIX (with --tokenizer-model) or --mock-data")
        _check(not (self.mock_data and self.data_path),
               "--mock-data and --data-path are exclusive: pass one of them")


@dataclass(frozen=True)
class Config:
    """The whole run; each section is one argument group on the command line."""

    model: ModelConfig
    moe: MoEConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(mock_data=True))

    def validate(self, world_size: int | None = 1) -> Config:
        """Check every field and every cross-field rule; return self for chaining.

        world_size=None (parsing, before the launch is known) skips the layout rules."""
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
        m = self.model
        _check(self.moe.fp8_format is None or self.moe.fp8_recipe != "blockwise"
               or (m.hidden_size % 128 == 0 and m.ffn_hidden_size % 128 == 0),
               f"--fp8-recipe blockwise needs --hidden-size ({m.hidden_size}) and --ffn-hidden-size "
               f"({m.ffn_hidden_size}) divisible by 128 (its tiles and blocks); use another recipe or sizes")
        _check(self.model.model_family != "mixtral" or self.moe.layer_freq == 1,
               f"--model-family mixtral makes every layer an MoE layer; drop --moe-layer-freq "
               f"{self.moe.layer_freq} (or pass 1)")
        group, tokens = self.moe.router_group_size, self.train.micro_batch_size * self.model.seq_length
        _check(group is None or (group > 0 and tokens % group == 0),
               f"--moe-router-group-size {group} must divide the tokens of a micro-batch ({tokens} = "
               "--micro-batch-size x --seq-length)")
        if world_size is not None:
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
    _check(m.kv_heads % tp == 0,
           f"--num-query-groups {m.kv_heads} is not divisible by --tensor-model-parallel-size {tp} "
           "(each TP rank holds whole key/value heads); use a TP size that divides it")
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
    vp = p.virtual_stages(m.num_layers)
    stage_layer_ranges(m.num_layers, pp, vp, p.decoder_first_pipeline_num_layers,
                       p.decoder_last_pipeline_num_layers)  # raises ConfigError on a bad split
    dp = world_size // (tp * pp)
    t = cfg.train
    _check(t.global_batch_size % (t.micro_batch_size * dp) == 0,
           f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size "
           f"{t.micro_batch_size} x data-parallel size {dp}")
    n_mb = t.global_batch_size // (t.micro_batch_size * dp)
    _check(vp == 1 or (n_mb >= pp and n_mb % pp == 0),
           f"interleaved pipelining needs the micro-batches per step ({n_mb} = --global-batch-size / "
           f"(--micro-batch-size x DP)) to be a multiple of --pipeline-model-parallel-size {pp}")


def stage_layer_ranges(num_layers: int, pp: int, vp: int = 1, first: int | None = None,
                       last: int | None = None) -> list[range]:
    """Layer range of every virtual stage (index v = chunk * pp + rank), contiguous and in order.

    first/last: layers of the first/last stage (lighter stages for the embedding / LM head, as
    Megatron's --decoder-first/last-pipeline-num-layers); the rest split evenly.
    """
    stages = pp * vp
    counts: list[int]
    if first is None and last is None:
        if num_layers % stages:
            raise ConfigError(f"--num-layers {num_layers} is not divisible into {stages} pipeline stages"
                              + (f" ({pp} ranks x {vp} virtual)" if vp > 1 else "")
                              + "; change the layer count or the pipeline sizes")
        counts = [num_layers // stages] * stages
    else:
        if vp > 1:
            raise ConfigError("--decoder-first/last-pipeline-num-layers cannot be combined with "
                              "--num-layers-per-virtual-pipeline-stage")
        head = [first] if first is not None else []
        tail = [last] if last is not None else []
        middle_stages = stages - len(head) - len(tail)
        rest = num_layers - sum(head) - sum(tail)
        if middle_stages < 0 or rest < 0 or (middle_stages == 0 and rest) or \
                (middle_stages and rest % middle_stages):
            raise ConfigError(f"--num-layers {num_layers} minus the first/last stage layers "
                              f"({first}, {last}) does not split evenly over the other "
                              f"{max(middle_stages, 0)} stages")
        counts = head + [rest // middle_stages] * middle_stages + tail if middle_stages else head + tail
    if any(c <= 0 for c in counts):
        raise ConfigError(f"a pipeline stage would hold no layers ({counts}); use fewer stages")
    ranges, start = [], 0
    for c in counts:
        ranges.append(range(start, start + c))
        start += c
    return ranges
