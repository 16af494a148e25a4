"""Megatron-style command-line flags -> the frozen dataclasses of :mod:`megamoe.config`.

Flag names follow Megatron-LM so existing launch scripts carry over. A ``--model-preset`` fills the
model shape; any explicit shape flag overrides the preset.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from megamoe.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
)

# DESIGN.md section 4. Each FFN (dense or expert) has 4*H*I parameters; vocab padded to 256384.
PRESETS: dict[str, dict[str, float | int]] = {
    # A few hundred K parameters, for CPU tests and the quickstart.
    "openmoe-tiny": dict(num_layers=4, hidden_size=64, num_attention_heads=4, kv_channels=16,
                         ffn_hidden_size=64, num_experts=8, moe_router_topk=2, moe_layer_freq=2,
                         seq_length=128, vocab_size=1024, moe_z_loss_coeff=1e-4),
    "openmoe-base": dict(num_layers=12, hidden_size=768, num_attention_heads=12, kv_channels=64,
                         ffn_hidden_size=2048, num_experts=16, moe_router_topk=2, moe_layer_freq=4,
                         seq_length=2048, vocab_size=256384, moe_z_loss_coeff=1e-4),
    "openmoe-8b": dict(num_layers=24, hidden_size=2048, num_attention_heads=24, kv_channels=128,
                       ffn_hidden_size=8192, num_experts=32, moe_router_topk=2, moe_layer_freq=6,
                       seq_length=2048, vocab_size=256384, moe_z_loss_coeff=1e-4),
    "openmoe-34b": dict(num_layers=32, hidden_size=3072, num_attention_heads=24, kv_channels=128,
                        ffn_hidden_size=12288, num_experts=32, moe_router_topk=2, moe_layer_freq=4,
                        seq_length=2048, vocab_size=256384, moe_z_loss_coeff=1e-3),
}

_SHAPE_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "kv_channels", "ffn_hidden_size",
                "num_experts", "moe_router_topk", "moe_layer_freq", "seq_length", "vocab_size",
                "moe_z_loss_coeff")


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line) instead of printing usage and exiting 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", default=None,
                   help=f"one of {', '.join(PRESETS)}; explicit shape flags override it")
    for name, typ in (("num_layers", int), ("hidden_size", int), ("num_attention_heads", int),
                      ("kv_channels", int), ("ffn_hidden_size", int), ("seq_length", int),
                      ("vocab_size", int)):
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--norm-epsilon", type=float, default=1e-6)
    g.add_argument("--rotary-base", type=float, default=10000.0)


def _add_moe_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=None)
    g.add_argument("--moe-router-topk", type=int, default=None)
    g.add_argument("--moe-layer-freq", type=int, default=None)
    g.add_argument("--moe-capacity-factor", type=float, default=None,
                   help="tokens per expert = round(cf * tokens / experts); absent = dropless")
    g.add_argument("--moe-eval-capacity-factor", type=float, default=None)
    g.add_argument("--moe-min-capacity", type=int, default=4)
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.01)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None, help="default: preset's, 1e-4")
    g.add_argument("--moe-router-init-std", type=float, default=0.02)
    g.add_argument("--no-moe-grouped-gemm", dest="moe_grouped_gemm", action="store_false",
                   help="run experts as a loop of GEMMs over contiguous slices (reference path)")


def _add_parallel_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B: layers per model chunk (virtual stage)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--moe-hierarchical-alltoall", action="store_true",
                   help="intra-node exchange, then one inter-node all-to-all per local rank")
    g.add_argument("--moe-alltoall-chunks", type=int, default=1,
                   help="split dispatched tokens into K chunks, overlapping all-to-all with experts")
    g.add_argument("--no-moe-tp-dedup", dest="moe_tp_dedup", action="store_false",
                   help="TP>1 without SP: send every TP rank's (identical) tokens instead of 1/TP each")
    g.add_argument("--moe-ranks-per-node", type=int, default=0,
                   help="node size for hierarchical all-to-all (default: LOCAL_WORLD_SIZE)")
    g.add_argument("--distributed-backend", choices=("gloo", "nccl"), default=None)
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0)


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-style", default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="ZeRO: shard fp32 masters and AdamW state over DP (dense) and expert-DP (experts)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="start each gradient bucket's reduction as soon as it is complete")
    g.add_argument("--grad-reduce-in-bf16", action="store_true")
    g.add_argument("--zero-stage", type=int, default=1,
                   help="with --use-distributed-optimizer: 1 shards optimizer state (default), 2 also "
                        "gradients (reduce-scatter per bucket as backward produces it, every micro-batch)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="all-gather updated parameters asynchronously; each module waits for its own "
                        "buckets just before its forward")
    g.add_argument("--ddp-bucket-size", type=int, default=1 << 22,
                   help="gradient bucket size in elements for the distributed optimizer's reductions")
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true")
    prec.add_argument("--fp32", action="store_true")


def _add_logging_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None,
                   help="activation recomputation: full = whole decoder layers (see --recompute-method), "
                        "selective = the attention core only")
    g.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform",
                   help="full recompute: uniform = every group of --recompute-num-layers layers, "
                        "block = only the first --recompute-num-layers layers of each stage chunk")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save and exit 0 after every N-th iteration")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and exit 0 once the run has lasted this long (Slurm time limits)")
    g.add_argument("--metrics-file", default=None, help="one JSON object per iteration")
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU; default: measured GEMM rate at start-up")


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--data-path", nargs="+", default=[],
                   help="PREFIX, or blend weights and prefixes: 0.7 PREFIX_A 0.3 PREFIX_B")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer-type", default="SentencePieceTokenizer")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--data-cache-path", default=None)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Pretrain an OpenMoE model (Megatron-style flags).")
    for add in (_add_model_flags, _add_moe_flags, _add_parallel_flags, _add_training_flags,
                _add_logging_flags, _add_data_flags):
        add(p)  # one argument group each, in --help order
    return p


def _shape(args: argparse.Namespace) -> dict[str, float | int]:
    shape: dict[str, float | int] = {}
    if args.model_preset is not None:
        if args.model_preset not in PRESETS:
            raise ConfigError(f"--model-preset {args.model_preset!r} is unknown; choose one of "
                              f"{', '.join(PRESETS)}")
        shape.update(PRESETS[args.model_preset])
    for name in _SHAPE_FLAGS:
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    shape.setdefault("moe_z_loss_coeff", 1e-4)
    shape.setdefault("moe_router_topk", 2)
    shape.setdefault("moe_layer_freq", 1)
    if "kv_channels" not in shape and "hidden_size" in shape and "num_attention_heads" in shape:
        shape["kv_channels"] = int(shape["hidden_size"]) // int(shape["num_attention_heads"])
    missing = [n for n in _SHAPE_FLAGS if n not in shape]
    if missing:
        raise ConfigError(f"model shape incomplete: pass --model-preset or --"
                          f"{missing[0].replace('_', '-')}")
    return shape


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the (not yet layout-validated) Config from parsed flags."""
    s = _shape(args)
    model = ModelConfig(
        num_layers=int(s["num_layers"]), hidden_size=int(s["hidden_size"]),
        num_attention_heads=int(s["num_attention_heads"]), kv_channels=int(s["kv_channels"]),
        ffn_hidden_size=int(s["ffn_hidden_size"]), vocab_size=int(s["vocab_size"]),
        seq_length=int(s["seq_length"]),
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        norm_epsilon=args.norm_epsilon, rotary_base=args.rotary_base,
        init_method_std=args.init_method_std)
    moe = MoEConfig(
        num_experts=int(s["num_experts"]), router_topk=int(s["moe_router_topk"]),
        layer_freq=int(s["moe_layer_freq"]), capacity_factor=args.moe_capacity_factor,
        eval_capacity_factor=args.moe_eval_capacity_factor, min_capacity=args.moe_min_capacity,
        aux_loss_coeff=args.moe_aux_loss_coeff, z_loss_coeff=float(s["moe_z_loss_coeff"]),
        router_init_std=args.moe_router_init_std, grouped_gemm=args.moe_grouped_gemm)
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel, distributed_backend=args.distributed_backend,
        moe_hierarchical_alltoall=args.moe_hierarchical_alltoall,
        moe_alltoall_chunks=args.moe_alltoall_chunks, moe_tp_dedup=args.moe_tp_dedup,
        moe_ranks_per_node=args.moe_ranks_per_node,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
        distributed_timeout_minutes=args.distributed_timeout_minutes)
    train = TrainConfig(
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        train_iters=args.train_iters, lr=args.lr, min_lr=args.min_lr,
        lr_warmup_iters=args.lr_warmup_iters, lr_decay_iters=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, seed=args.seed, bf16=args.bf16, log_interval=args.log_interval,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce, grad_reduce_in_bf16=args.grad_reduce_in_bf16,
        zero_stage=args.zero_stage, ddp_bucket_size=args.ddp_bucket_size,
        overlap_param_gather=args.overlap_param_gather,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, save=args.save,
        load=args.load, save_interval=args.save_interval, metrics_file=args.metrics_file,
        exit_interval=args.exit_interval, exit_duration_in_mins=args.exit_duration_in_mins,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        wandb_project=args.wandb_project, wandb_exp_name=args.wandb_exp_name,
        tensorboard_dir=args.tensorboard_dir, peak_tflops=args.peak_tflops)
    data = DataConfig(
        mock_data=args.mock_data, data_path=tuple(args.data_path), split=args.split,
        tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
        data_cache_path=args.data_cache_path)
    return Config(model=model, moe=moe, parallel=parallel, train=train, data=data)


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse flags into a Config; field-level validation runs here, layout rules need world size."""
    cfg = config_from_args(build_parser().parse_args(argv))
    cfg.model.validate()
    cfg.moe.validate(cfg.model.num_layers)
    cfg.parallel.validate()
    cfg.train.validate()
    cfg.data.validate()
    return cfg
