"""Flags, presets and bad-input errors (one line, naming the flag, before any collective)."""

import dataclasses
import subprocess
import sys
import typing

import pytest

from megamoe.arguments import PRESETS, build_parser, parse_args
from megamoe.config import Config, ConfigError
from megamoe.model.openmoe import OpenMoEModel, count_parameters
from megamoe.training.run import main
from tests.conftest import assert_one_line_config_error

TINY = ["--model-preset", "openmoe-tiny", "--mock-data"]


def ffn_params(h: int, i: int) -> int:
    return 4 * h * i


@pytest.mark.parametrize("preset", [name for name in PRESETS if name.startswith("openmoe")])
def test_preset_parameter_counts_follow_4HI_arithmetic(preset):
    cfg = parse_args(["--model-preset", preset, "--mock-data"])
    m, moe = cfg.model, cfg.moe
    h, i, v = m.hidden_size, m.ffn_hidden_size, m.padded_vocab_size()
    n_moe = sum(moe.is_moe_layer(layer) for layer in range(m.num_layers))
    n_dense = m.num_layers - n_moe
    attn = 4 * h * m.num_attention_heads * m.kv_channels
    expected = (m.num_layers * (attn + 2 * h) + n_dense * ffn_params(h, i)
                + n_moe * (moe.num_experts * ffn_params(h, i) + ffn_params(h, i) + h + moe.num_experts * h)
                + 2 * v * h + h)
    assert count_parameters(cfg)["total"] == expected


def test_preset_values_match_design():
    assert PRESETS["openmoe-8b"]["num_layers"] == 24 and PRESETS["openmoe-8b"]["moe_layer_freq"] == 6
    cfg = parse_args(["--model-preset", "openmoe-8b", "--mock-data"])
    assert [layer for layer in range(24) if cfg.moe.is_moe_layer(layer)] == [5, 11, 17, 23]
    assert cfg.model.padded_vocab_size() == 256384
    assert 11.7e9 < count_parameters(cfg)["total"] < 11.9e9  # ~11.8B with the untied head
    c34 = parse_args(["--model-preset", "openmoe-34b", "--mock-data"])
    assert c34.moe.z_loss_coeff == 1e-3 and c34.model.ffn_hidden_size == 12288


def test_tiny_model_allocates_exactly_the_counted_parameters():
    cfg = parse_args(TINY)
    model = OpenMoEModel(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters(cfg)["total"]
    assert 100_000 < n < 1_000_000  # "a few hundred K"


def test_overrides_and_kv_channels_may_differ_from_hidden():
    cfg = parse_args(TINY + ["--hidden-size", "48", "--num-attention-heads", "3", "--kv-channels", "32"])
    assert cfg.model.hidden_size == 48 and cfg.model.kv_channels == 32  # 3 x 32 != 48: allowed
    cfg.validate(1)


@pytest.mark.parametrize("argv, world, flag", [
    (TINY + ["--moe-router-topk", "9"], 1, "--moe-router-topk"),
    (TINY + ["--moe-layer-freq", "5"], 1, "--moe-layer-freq"),
    (["--model-preset", "openmoe-huge", "--mock-data"], 1, "--model-preset"),
    (TINY + ["--global-batch-size", "10", "--micro-batch-size", "4"], 1, "--global-batch-size"),
    (TINY + ["--global-batch-size", "8", "--micro-batch-size", "2"], 3, "--global-batch-size"),
    (TINY + ["--lr-decay-style", "step"], 1, "--lr-decay-style"),
    (["--model-preset", "openmoe-tiny"], 1, "--data-path"),
    (TINY + ["--sequence-parallel"], 1, "--sequence-parallel"),
    (TINY + ["--num-experts", "6", "--expert-model-parallel-size", "4"], 8, "--num-experts"),
    (TINY + ["--train-iters", "x"], 1, "--train-iters"),
    (TINY + ["--tensor-model-parallel-size", "3"], 3, "--num-attention-heads"),
    (TINY + ["--ffn-hidden-size", "66", "--tensor-model-parallel-size", "4"], 4, "--ffn-hidden-size"),
    (TINY + ["--tensor-model-parallel-size", "2"], 3, "--tensor-model-parallel-size"),
    (TINY + ["--seq-length", "30", "--tensor-model-parallel-size", "4", "--sequence-parallel"], 4,
     "--seq-length"),
    # issue 17: values that used to train into NaN or nonsense, or die with a traceback
    (TINY + ["--norm-epsilon", "-1"], 1, "--norm-epsilon"),
    (TINY + ["--rotary-base", "0"], 1, "--rotary-base"),
    (TINY + ["--init-method-std", "-1"], 1, "--init-method-std"),
    (TINY + ["--init-method-std", "1e30"], 1, "--init-method-std"),
    (TINY + ["--weight-decay", "-1"], 1, "--weight-decay"),
    (TINY + ["--lr-decay-iters", "-5"], 1, "--lr-decay-iters"),
    (TINY + ["--exit-interval", "-1"], 1, "--exit-interval"),
    (TINY + ["--exit-duration-in-mins", "-1"], 1, "--exit-duration-in-mins"),
    (TINY + ["--adam-beta1", "1.5"], 1, "--adam-beta1"),
    (TINY + ["--adam-eps", "-1"], 1, "--adam-eps"),
    (TINY + ["--lr", "0"], 1, "--lr"),
    (TINY + ["--distributed-timeout-minutes", "0"], 1, "--distributed-timeout-minutes"),
    (TINY + ["--distributed-timeout-minutes", "-1"], 1, "--distributed-timeout-minutes must be positive"),
    (TINY + ["--output-z-loss-coeff", "-1"], 1, "--output-z-loss-coeff"),
])
def test_bad_input_raises_one_line_naming_the_flag(argv, world, flag):
    assert_one_line_config_error(argv, world, flag, base_args=())


def test_vocab_is_padded_to_a_multiple_of_128_times_tp():
    cfg = parse_args(TINY + ["--vocab-size", "1000"])
    assert cfg.model.padded_vocab_size(1) == 1024 and cfg.model.padded_vocab_size(4) == 1024
    assert cfg.model.padded_vocab_size(3) == 1152


def test_cli_layout_error_before_any_collective(monkeypatch, capsys):
    # 3 ranks cannot split a global batch of 8 into micro-batches of 2: main() must refuse before it
    # initialises the process group (which would block waiting for the other "ranks").
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    rc = main(TINY + ["--global-batch-size", "8", "--micro-batch-size", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 2 and len(out) == 1 and "--global-batch-size" in out[0]


def test_cli_unknown_preset_exits_with_one_line():
    proc = subprocess.run([sys.executable, "pretrain_openmoe.py", "--model-preset", "nope", "--mock-data"],
                          capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--model-preset" in lines[0]


# Captured with the hand-written parser (before the flags were generated from the dataclasses): every
# flag must keep its name, default, type and meaning.
OLD_FLAGS = """
--adam-beta1 --adam-beta2 --adam-eps --bf16 --clip-grad --data-cache-path --data-path --ddp-bucket-size
--decoder-first-pipeline-num-layers --decoder-last-pipeline-num-layers --distributed-backend
--distributed-timeout-minutes --eval-interval --eval-iters --exit-duration-in-mins --exit-interval
--expert-model-parallel-size --expert-tensor-parallel-size --ffn-hidden-size --fp32 --global-batch-size
--grad-reduce-in-bf16 --hidden-size --init-method-std --kv-channels --load --log-interval --lr
--lr-decay-iters --lr-decay-style --lr-warmup-iters --make-vocab-size-divisible-by --metrics-file
--micro-batch-size --min-lr --mock-data --model-preset --moe-alltoall-chunks --moe-aux-loss-coeff
--moe-capacity-factor --moe-eval-capacity-factor --moe-hierarchical-alltoall --moe-layer-freq
--moe-min-capacity --moe-ranks-per-node --moe-router-init-std --moe-router-topk --moe-z-loss-coeff
--no-moe-grouped-gemm --no-moe-tp-dedup --norm-epsilon --num-attention-heads --num-experts --num-layers
--num-layers-per-virtual-pipeline-stage --overlap-grad-reduce --overlap-param-gather --peak-tflops
--pipeline-model-parallel-size --recompute-granularity --recompute-method --recompute-num-layers
--rotary-base --save --save-interval --seed --seq-length --sequence-parallel --split
--tensor-model-parallel-size --tensorboard-dir --tokenizer-model --tokenizer-type --train-iters
--use-distributed-optimizer --vocab-size --wandb-exp-name --wandb-project --weight-decay --zero-stage
""".split()

OLD_TINY_CONFIG = {  # parse_args(TINY)
    "model": dict(num_layers=4, hidden_size=64, num_attention_heads=4, kv_channels=16, ffn_hidden_size=64,
                  vocab_size=1024, seq_length=128, make_vocab_size_divisible_by=128, norm_epsilon=1e-06,
                  rotary_base=10000.0, init_method_std=0.02, output_z_loss_coeff=1e-4, init_method="normal",
                  model_family="openmoe", group_query_attention=False, num_query_groups=None),
    "moe": dict(num_experts=8, router_topk=2, layer_freq=2, capacity_factor=None, eval_capacity_factor=None,
                min_capacity=4, aux_loss_coeff=0.01, z_loss_coeff=0.0001, router_init_std=0.02,
                grouped_gemm=True, router_group_size=None, router_loss_average=True, fp8_format=None,
                fp8_recipe="delayed", fp8_margin=0, fp8_amax_history_len=1024, fp8_amax_compute_algo="max",
                fp8_backend=None, router_padding_for_fp8=False),
    "parallel": dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                     expert_model_parallel_size=1, expert_tensor_parallel_size=1, sequence_parallel=False,
                     moe_hierarchical_alltoall=False, moe_alltoall_chunks=1, moe_tp_dedup=True,
                     moe_ranks_per_node=0, moe_rebalance_interval=0, moe_rebalance_window=100,
                     moe_rebalance_min_gain=0.05, num_layers_per_virtual_pipeline_stage=None,
                     decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
                     distributed_backend=None, distributed_timeout_minutes=10.0),
    "train": dict(micro_batch_size=1, global_batch_size=8, train_iters=100, lr=0.0003, min_lr=0.0,
                  lr_warmup_iters=0, lr_decay_iters=None, lr_decay_style="cosine", weight_decay=0.01,
                  adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-08, clip_grad=1.0, seed=1234, bf16=False,
                  use_distributed_optimizer=False, overlap_grad_reduce=False, grad_reduce_in_bf16=False,
                  zero_stage=1, ddp_bucket_size=4194304, overlap_param_gather=False, log_interval=10,
                  eval_interval=1000, eval_iters=10, save=None, load=None, finetune=False, load_optim=True,
                  save_interval=None,
                  allow_nonfinite_load=False, max_consecutive_skipped_steps=5, allow_existing_save_dir=False,
                  recompute_granularity=None, recompute_method="uniform", recompute_num_layers=1,
                  exit_interval=None, exit_duration_in_mins=None, metrics_file=None, wandb_project=None,
                  wandb_exp_name=None, tensorboard_dir=None, peak_tflops=None),
    "data": dict(mock_data=True, data_path=(), split="969,30,1", tokenizer_type="SentencePieceTokenizer",
                 tokenizer_model=None, data_cache_path=None),
}

EVERY_FLAG = """
--model-preset openmoe-base --num-layers 8 --hidden-size 96 --num-attention-heads 6 --kv-channels 24
--ffn-hidden-size 160 --seq-length 64 --vocab-size 2000 --make-vocab-size-divisible-by 64
--init-method-std 0.01 --norm-epsilon 1e-5 --rotary-base 500000
--num-experts 4 --moe-router-topk 1 --moe-layer-freq 2 --moe-capacity-factor 1.25
--moe-eval-capacity-factor 2.0 --moe-min-capacity 2 --moe-aux-loss-coeff 0.02 --moe-z-loss-coeff 0.001
--moe-router-init-std 0.01 --no-moe-grouped-gemm
--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --expert-model-parallel-size 2
--expert-tensor-parallel-size 1 --sequence-parallel --num-layers-per-virtual-pipeline-stage 2
--decoder-first-pipeline-num-layers 3 --decoder-last-pipeline-num-layers 5 --moe-hierarchical-alltoall
--moe-alltoall-chunks 2 --no-moe-tp-dedup --moe-ranks-per-node 4 --distributed-backend gloo
--distributed-timeout-minutes 2.5
--micro-batch-size 2 --global-batch-size 16 --train-iters 50 --lr 1e-3 --min-lr 1e-5 --lr-warmup-iters 5
--lr-decay-iters 40 --lr-decay-style linear --weight-decay 0.1 --adam-beta1 0.8 --adam-beta2 0.99
--adam-eps 1e-6 --clip-grad 0.5 --seed 7 --use-distributed-optimizer --overlap-grad-reduce
--grad-reduce-in-bf16 --zero-stage 2 --overlap-param-gather --ddp-bucket-size 1024 --bf16
--log-interval 3 --eval-interval 20 --eval-iters 0 --save ckpt --load old --save-interval 10
--recompute-granularity selective --recompute-method block --recompute-num-layers 2 --exit-interval 30
--exit-duration-in-mins 90.5 --metrics-file m.jsonl --wandb-project proj --wandb-exp-name exp
--tensorboard-dir tb --peak-tflops 312
--data-path 0.7 a 0.3 b --split 98,1,1 --tokenizer-type HFTokenizer --tokenizer-model tok.model
--data-cache-path cache
""".split()

# Flags added since the hand-written parser (issue 13); the OpenMoE presets (not tiny) set
# --init-method t5x, and all of them --output-z-loss-coeff 1e-4.
NEW_FLAGS = {"--init-method", "--output-z-loss-coeff", "--moe-router-group-size",
             "--no-moe-router-loss-average", "--allow-existing-save-dir", "--allow-nonfinite-load",
             "--max-consecutive-skipped-steps", "--moe-rebalance-interval",
             "--moe-rebalance-window", "--moe-rebalance-min-gain",
             # issue 15: FP8 experts
             "--fp8-format", "--fp8-recipe", "--fp8-margin", "--fp8-amax-history-len",
             "--fp8-amax-compute-algo", "--fp8-backend", "--moe-router-padding-for-fp8",
             # issue 16: the Mixtral family and starting from converted checkpoints
             "--model-family", "--group-query-attention", "--num-query-groups", "--finetune",
             "--no-load-optim"}

# argv -> the fields that differ from OLD_TINY_CONFIG, as the hand-written parser produced them (plus
# init_method, which is new).
OLD_CONFIGS = [
    (TINY, {}),
    (EVERY_FLAG, {
        "model": dict(num_layers=8, hidden_size=96, num_attention_heads=6, kv_channels=24,
                      ffn_hidden_size=160, vocab_size=2000, seq_length=64, make_vocab_size_divisible_by=64,
                      norm_epsilon=1e-05, rotary_base=500000.0, init_method_std=0.01, init_method="t5x"),
        "moe": dict(num_experts=4, router_topk=1, capacity_factor=1.25, eval_capacity_factor=2.0,
                    min_capacity=2, aux_loss_coeff=0.02, z_loss_coeff=0.001, router_init_std=0.01,
                    grouped_gemm=False),
        "parallel": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                         expert_model_parallel_size=2, sequence_parallel=True, moe_hierarchical_alltoall=True,
                         moe_alltoall_chunks=2, moe_tp_dedup=False, moe_ranks_per_node=4,
                         num_layers_per_virtual_pipeline_stage=2, decoder_first_pipeline_num_layers=3,
                         decoder_last_pipeline_num_layers=5, distributed_backend="gloo",
                         distributed_timeout_minutes=2.5),
        "train": dict(micro_batch_size=2, global_batch_size=16, train_iters=50, lr=0.001, min_lr=1e-05,
                      lr_warmup_iters=5, lr_decay_iters=40, lr_decay_style="linear", weight_decay=0.1,
                      adam_beta1=0.8, adam_beta2=0.99, adam_eps=1e-06, clip_grad=0.5, seed=7, bf16=True,
                      use_distributed_optimizer=True, overlap_grad_reduce=True, grad_reduce_in_bf16=True,
                      zero_stage=2, ddp_bucket_size=1024, overlap_param_gather=True, log_interval=3,
                      eval_interval=20, eval_iters=0, save="ckpt", load="old", save_interval=10,
                      recompute_granularity="selective", recompute_method="block", recompute_num_layers=2,
                      exit_interval=30, exit_duration_in_mins=90.5, metrics_file="m.jsonl",
                      wandb_project="proj", wandb_exp_name="exp", tensorboard_dir="tb", peak_tflops=312.0),
        "data": dict(mock_data=False, data_path=("0.7", "a", "0.3", "b"), split="98,1,1",
                     tokenizer_type="HFTokenizer", tokenizer_model="tok.model", data_cache_path="cache"),
    }),
    # No preset: every shape flag explicit, kv_channels = hidden / heads, MoE defaults, --fp32.
    ("--num-layers 2 --hidden-size 48 --num-attention-heads 2 --ffn-hidden-size 40 --num-experts 4 "
     "--seq-length 16 --vocab-size 300 --fp32 --mock-data".split(), {
        "model": dict(num_layers=2, hidden_size=48, num_attention_heads=2, kv_channels=24, ffn_hidden_size=40,
                      vocab_size=300, seq_length=16, output_z_loss_coeff=0.0),
        "moe": dict(num_experts=4, layer_freq=1),
    }),
    # A preset with one shape flag overridden keeps the preset's kv_channels and z-loss.
    ("--model-preset openmoe-34b --hidden-size 1536 --data-path prefix --tokenizer-model t".split(), {
        "model": dict(num_layers=32, hidden_size=1536, num_attention_heads=24, kv_channels=128,
                      ffn_hidden_size=12288, vocab_size=256384, seq_length=2048, init_method="t5x"),
        "moe": dict(num_experts=32, layer_freq=4, z_loss_coeff=0.001),
        "data": dict(mock_data=False, data_path=("prefix",), tokenizer_model="t"),
    }),
]


@pytest.mark.parametrize("argv, changed", OLD_CONFIGS)
def test_every_old_flag_parses_to_the_same_config(argv, changed):
    expected = {section: {**values, **changed.get(section, {})}
                for section, values in OLD_TINY_CONFIG.items()}
    assert dataclasses.asdict(parse_args(argv)) == expected


def test_every_old_flag_is_declared_and_covered():
    options = {o for action in build_parser()._actions for o in action.option_strings} - {"-h", "--help"}
    assert options == set(OLD_FLAGS) | NEW_FLAGS
    assert set(OLD_FLAGS) - set(EVERY_FLAG) == {"--mock-data", "--fp32"}  # exclusive with flags used there


def test_every_field_has_help_and_every_flag_a_field():
    sections = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(sections[section.name]):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help"
    for action in build_parser()._actions:
        if action.dest in ("help", "model_preset"):
            continue
        section, _, name = action.dest.partition(".")
        assert name in {f.name for f in dataclasses.fields(sections[section])}, action.option_strings


def test_help_lists_every_flag():
    text = build_parser().format_help()
    assert all(flag in text for flag in OLD_FLAGS)


@pytest.mark.parametrize("argv, message", [
    (["--mock-data"], "model shape incomplete: pass --model-preset or --num-layers"),
    (["--hidden-size", "8", "--num-layers", "2", "--mock-data"],
     "model shape incomplete: pass --model-preset or --num-attention-heads"),
    (["--model-preset", "nope", "--mock-data"],
     "--model-preset 'nope' is unknown; choose one of openmoe-tiny, openmoe-base, openmoe-8b, openmoe-34b, "
     "mixtral-tiny, mixtral-8x7b"),
    (TINY + ["--bf16", "--fp32"], "argument --fp32: not allowed with argument --bf16"),
    (TINY + ["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (TINY + ["--bogus"], "unrecognized arguments: --bogus"),
    (TINY + ["--recompute-method", "all"],
     "argument --recompute-method: invalid choice: 'all' (choose from 'uniform', 'block')"),
    (TINY + ["--recompute-granularity", "some"],
     "argument --recompute-granularity: invalid choice: 'some' (choose from 'full', 'selective')"),
    (TINY + ["--distributed-backend", "mpi"],
     "argument --distributed-backend: invalid choice: 'mpi' (choose from 'gloo', 'nccl')"),
    (TINY + ["--data-path"], "argument --data-path: expected at least one argument"),
    (TINY + ["--lr-decay-style", "step"],
     "--lr-decay-style must be constant, linear, cosine or inverse-square-root, got step"),
    (TINY + ["--zero-stage", "2"], "--zero-stage 2 needs --use-distributed-optimizer"),
    (TINY + ["--moe-capacity-factor", "0"], "--moe-capacity-factor must be positive, got 0.0"),
    (TINY + ["--num-experts", "0"], "--num-experts must be positive, got 0"),
    (TINY + ["--data-path", "x"], "--mock-data and --data-path are exclusive: pass one of them"),
    (["--model-preset", "openmoe-tiny"],
     "no training data: pass --data-path PREFIX (with --tokenizer-model) or --mock-data"),
])
def test_parse_args_error_messages(argv, message):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert str(err.value) == message
