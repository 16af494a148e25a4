#!/usr/bin/env bash
# Pretrain OpenMoE-8B (24 layers, d 2048, 32 experts top-2 every 6th layer) on 8-GPU nodes with torchrun.
#
# One node:   DATA_PATH=/data/corpus_text_document TOKENIZER=/data/umt5.model bash examples/pretrain_openmoe_8b.sh
# N nodes:    run on every node with NNODES=N NODE_RANK=<0..N-1> MASTER_ADDR=<node 0> MASTER_PORT=6000
# Dry run:    DRY_RUN=1 bash examples/pretrain_openmoe_8b.sh   (prints the arguments, one a line)
# Overrides:  EXTRA_ARGS="--train-iters 100 --lr 1e-4" bash examples/pretrain_openmoe_8b.sh
#             EXTRA_ARGS (split on whitespace, no quoting) is appended to the pretrain arguments and the
#             later flag wins: argparse keeps the last value of a repeated value flag (int, float, str,
#             --data-path's list, --model-preset). A switch already given (--sequence-parallel, ...)
#             cannot be turned off there, and --bf16 / --fp32 exclude each other: use PRECISION=--fp32.
#             --save / --load / --metrics-file follow CKPT; override CKPT rather than --save alone.
#
# Default layout, 8 GPUs per node, world W = 8 x NNODES, PP 1 (rank = tp + 2 dp on the dense mesh,
# ep + 8 edp on the expert mesh):
#   TP 2 (+SP)    pairs {2k, 2k+1}: inside a node (NVLink).
#   EP 8          ranks 8n..8n+7: exactly one node, so the token all-to-all never leaves the node.
#   DP = W / 2    ranks with the same TP position, 4 per node: SPANS NODES when NNODES > 1 (dense
#                 gradient reduce-scatter, parameter all-gather and the ZeRO shards of dense state).
#   expert-DP     = W / 8 = NNODES: the same expert slot on every node, one rank per node: SPANS NODES
#                 (expert gradient reduce-scatter, expert parameter all-gather and the ZeRO shards of
#                 expert state all cross nodes).
#   checkpoint    written by DP rank 0 (dense) and expert-DP rank 0 (experts): ranks 0-7, the first node.
# Micro-batch (MBS): 2 on one node; on more nodes the largest of 8, 4, 2 that divides GBS / DP. The
# parallel planner (tools/plan_parallel.py, docs/PLANNER.md) predicts this layout's step on 8 nodes of
# H100s at 1.75 s with micro-batch 2 and 1.48 s (1.19x faster) with 8, on 32 nodes 0.93 s against
# 0.67 s (1.39x): megamoe starts a gradient bucket's reduction after the step's LAST micro-batch
# delivered it, so only that micro-batch's backward hides the cross-node DP / expert-DP reduction (and
# only the first micro-batch's forward hides the ZeRO parameter all-gather); fewer, larger
# micro-batches hide more. Activations then take ~34 of the planner's ~51 GiB per GPU. On one node the
# reduction stays on NVLink and micro-batch 8 would gain 1.4% at ~66 GiB, so one node keeps 2 (headroom).
# The planner predicts two more gains that change TP / EP, so they are knobs here, not defaults (the
# default keeps TP pairs and EP groups inside a node at every node count): one node, TP=1
# ZERO_STAGE=2 (no SP collectives; the reduce-scatter of every micro-batch hides behind its backward
# on NVLink) 10.98 s against 11.62 s; 32 nodes, TP=4 EP=32 (half the dense gradient bytes per GPU,
# expert-DP 8 instead of 32; the script then adds the hierarchical exchange) 0.50 s against 0.67 s.
# docs/PLANNER.md has the breakdowns.
# --sequence-parallel is added when TP > 1. --moe-hierarchical-alltoall is added only when an EP group
# spans nodes (EP > GPUS_PER_NODE): with EP 8 on 8-GPU nodes there is no inter-node exchange for it to
# organise. Relaunching the same command resumes from $CKPT/latest (auto-resume).
# Stopping: send SIGTERM or SIGUSR1 (or Ctrl-C) to this script's pid, on any one node. The script execs
# megamoe.launch (with PYTHON, default python on PATH): torchrun with those signals relayed to the
# workers. Every rank finishes its step, saves and exits 0, and so does the script (plain torchrun
# died of SIGUSR1, leaving the workers as orphans, and exited 1 on SIGTERM).
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
MBS="${MBS:-}"                  # empty: 2 on one node, else the largest of 8, 4, 2 dividing GBS / DP
ZERO_STAGE="${ZERO_STAGE:-1}"   # 2 also shards fp32 gradients (more reduce traffic, less memory)
PRECISION="${PRECISION:---bf16}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

if [ -n "$DATA_PATH" ]; then
  # shellcheck disable=SC2206,SC2054  # a blend "0.7 A 0.3 B" is several words; 969,30,1 is one
  DATA_ARGS=(--data-path $DATA_PATH --tokenizer-model "$TOKENIZER" --split 969,30,1)
else
  echo "DATA_PATH not set: training on --mock-data" >&2
  DATA_ARGS=(--mock-data)
fi
if [ -z "$MBS" ]; then
  MBS=2
  PER_DP=$(( GBS * TP * PP / (GPUS_PER_NODE * NNODES) ))  # samples per step of each DP rank
  if [ "$NNODES" -gt 1 ]; then
    for m in 8 4; do [ $(( PER_DP % m )) -eq 0 ] && { MBS=$m; break; }; done
  fi
fi
SP=()
[ "$TP" -gt 1 ] && SP=(--sequence-parallel)
HIER=()
[ "$EP" -gt "$GPUS_PER_NODE" ] && HIER=(--moe-hierarchical-alltoall)

ARGS=(
  --model-preset openmoe-8b "${DATA_ARGS[@]}"
  --tensor-model-parallel-size "$TP" ${SP[@]+"${SP[@]}"}
  --pipeline-model-parallel-size "$PP"
  --expert-model-parallel-size "$EP" ${HIER[@]+"${HIER[@]}"} --moe-alltoall-chunks 2
  --moe-capacity-factor 1.25 --moe-eval-capacity-factor 2.0 --moe-min-capacity 4
  --moe-router-group-size 4096
  --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 1e-4
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --seq-length 2048  # T5X routing groups of 4096 tokens
  --train-iters "$TRAIN_ITERS" --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
  "$PRECISION" --use-distributed-optimizer --zero-stage "$ZERO_STAGE"
  --overlap-grad-reduce --overlap-param-gather
  --save "$CKPT" --load "$CKPT" --save-interval 1000
  --log-interval 10 --eval-interval 1000 --eval-iters 10
  --metrics-file "$CKPT/metrics.jsonl" --tensorboard-dir "$CKPT/tensorboard"
  --distributed-timeout-minutes 15
  ${EXTRA[@]+"${EXTRA[@]}"}
)

CMD=("${PYTHON:-python}" -m megamoe.launch --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES"
     --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" pretrain_openmoe.py "${ARGS[@]}")
if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%s\n' "${ARGS[@]}"
  exit 0
fi
exec "${CMD[@]}"
