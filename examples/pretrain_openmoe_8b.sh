#!/usr/bin/env bash
# Pretrain OpenMoE-8B (24 layers, d 2048, 32 experts top-2 every 6th layer) on 8-GPU nodes with torchrun.
#
# One node:   DATA_PATH=/data/corpus_text_document TOKENIZER=/data/umt5.model bash examples/pretrain_openmoe_8b.sh
# N nodes:    run on every node with NNODES=N NODE_RANK=<0..N-1> MASTER_ADDR=<node 0> MASTER_PORT=6000
# Dry run:    DRY_RUN=1 bash examples/pretrain_openmoe_8b.sh   (prints the command, launches nothing)
#
# Layout per 8-GPU node: TP 2 (+SP) inside NVLink pairs, experts EP 8 (4 of 32 per GPU), DP = world / 2;
# the ZeRO optimizer shards dense state over DP and expert state over expert-DP (= world / 8), so expert
# state never crosses nodes; hierarchical all-to-all when the job spans nodes. Relaunching the same
# command resumes from $CKPT/latest (auto-resume); SIGTERM / SIGUSR1 save and exit 0.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-localhost}"
MASTER_PORT="${MASTER_PORT:-6000}"
DATA_PATH="${DATA_PATH:-}"
TOKENIZER="${TOKENIZER:-}"
CKPT="${CKPT:-checkpoints/openmoe-8b}"
TP="${TP:-2}"
EP="${EP:-8}"
PP="${PP:-1}"
GBS="${GBS:-1024}"
TRAIN_ITERS="${TRAIN_ITERS:-500000}"
ZERO_STAGE="${ZERO_STAGE:-1}"   # 2 also shards fp32 gradients (more reduce traffic, less memory)

if [ -n "$DATA_PATH" ]; then
  DATA_ARGS=(--data-path $DATA_PATH --tokenizer-model "$TOKENIZER" --split 969,30,1)
else
  echo "DATA_PATH not set: training on --mock-data" >&2
  DATA_ARGS=(--mock-data)
fi
HIER=()
[ "$NNODES" -gt 1 ] && HIER=(--moe-hierarchical-alltoall)

ARGS=(
  --model-preset openmoe-8b "${DATA_ARGS[@]}"
  --tensor-model-parallel-size "$TP" --sequence-parallel
  --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP" "${HIER[@]}" --moe-alltoall-chunks 2
  --moe-capacity-factor 1.25 --moe-eval-capacity-factor 2.0 --moe-min-capacity 4
  --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 1e-4
  --micro-batch-size 1 --global-batch-size "$GBS" --seq-length 2048
  --train-iters "$TRAIN_ITERS" --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  --bf16 --use-distributed-optimizer --zero-stage "$ZERO_STAGE" --overlap-grad-reduce --overlap-param-gather
  --save "$CKPT" --load "$CKPT" --save-interval 1000
  --log-interval 10 --eval-interval 1000 --eval-iters 10
  --metrics-file "$CKPT/metrics.jsonl" --tensorboard-dir "$CKPT/tensorboard"
  --distributed-timeout-minutes 15
)

CMD=(torchrun --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
     --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" pretrain_openmoe.py "${ARGS[@]}")
if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
exec "${CMD[@]}"
