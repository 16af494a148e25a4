#!/usr/bin/env bash
# Quickstart on CPU, from a fresh clone: set up, build a real corpus from this machine's Python
# standard library, train a SentencePiece tokenizer, preprocess into Megatron's mmap format, and
# pretrain openmoe-tiny on it on 2 ranks (torchrun, gloo): dense layers data-parallel, the 8 experts of
# each MoE layer split 4 + 4 across the ranks (expert parallelism), rebalanced by measured load every
# 100 steps. ~3 minutes on 2 cores. Ctrl-C
# stops it cleanly: the ranks finish the step, save to $OUT/checkpoints and exit 0; the next run
# starts afresh.
#
#   bash examples/quickstart.sh            # everything below
#   MOCK=1 bash examples/quickstart.sh     # skip the data pipeline, train on --mock-data
#   NPROC=4 ITERS=300 EP=4 bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
export OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# glibc gives blocks >= 32 MiB back to the OS, so every fresh activation page-faults; keeping them
# (bench/README.md) cut this run's CPU time by 6% (farm-bench, 4 paired runs: sys 2.8 -> 1.9 s)
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-2147483647}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-4294967295}"
export MALLOC_TOP_PAD_="${MALLOC_TOP_PAD_:-1073741824}"

OUT="${OUT:-runs/quickstart}"
NPROC="${NPROC:-2}"
ITERS="${ITERS:-600}"
EP="${EP:-$NPROC}"
VOCAB="${VOCAB:-2048}"
mkdir -p "$OUT"

if [ "${MOCK:-0}" = "1" ]; then
  DATA_ARGS=(--mock-data)
else
  DATA="$OUT/data"
  mkdir -p "$DATA"
  if [ ! -f "$DATA/stdlib_text_document.idx" ]; then
    echo "== 1/3 corpus from the Python standard library"
    python tools/make_corpus.py --source python-stdlib --output "$DATA/corpus.jsonl" --max-bytes 4000000 \
      --overwrite  # a run cut before step 3
    echo "== 2/3 SentencePiece tokenizer (vocab $VOCAB)"
    python tools/train_tokenizer.py --input "$DATA/corpus.jsonl" --json-keys text \
      --vocab-size "$VOCAB" --model-prefix "$DATA/tokenizer" --overwrite  # a run cut before step 3
    echo "== 3/3 preprocess into Megatron's .bin/.idx"
    python tools/preprocess_data.py --input "$DATA/corpus.jsonl" --json-keys text \
      --output-prefix "$DATA/stdlib" --tokenizer-type SentencePieceTokenizer \
      --tokenizer-model "$DATA/tokenizer.model" --workers 2 --append-eod
  fi
  DATA_ARGS=(--data-path "$DATA/stdlib_text_document" --tokenizer-model "$DATA/tokenizer.model"
             --split 98,2,0)
fi

# the expert rebalancer (EP > 1): every 100 steps, move experts between ranks by measured load
REBALANCE=()
[ "$EP" -gt 1 ] && REBALANCE=(--moe-rebalance-interval 100 --moe-rebalance-window 100)

echo "== pretraining openmoe-tiny on $NPROC CPU ranks for $ITERS iterations"
# a fresh run every time (--save refuses a directory holding another run's checkpoints)
rm -rf "$OUT/metrics.jsonl" "$OUT/checkpoints"
# megamoe.launch: torchrun that relays Ctrl-C / SIGTERM / SIGUSR1 to the ranks (they save, exit 0)
python -m megamoe.launch --standalone --nproc-per-node "$NPROC" pretrain_openmoe.py \
  --model-preset openmoe-tiny "${DATA_ARGS[@]}" --expert-model-parallel-size "$EP" \
  --seq-length 128 --micro-batch-size 4 --global-batch-size 16 \
  ${REBALANCE[@]+"${REBALANCE[@]}"} --train-iters "$ITERS" --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 20 --lr-decay-style cosine \
  --weight-decay 0.01 --clip-grad 1.0 --log-interval 10 --eval-interval 200 --eval-iters 5 \
  --metrics-file "$OUT/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard" --save "$OUT/checkpoints" \
  --save-interval 200

python - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"lm_loss"' in l]
first, last = rows[0]["lm_loss"], sum(r["lm_loss"] for r in rows[-10:]) / min(10, len(rows))
print(f"== lm loss {first:.3f} -> {last:.3f} over {len(rows)} iterations")
moves = [r for r in rows if r.get("moe_experts_moved")]
if moves:
    print(f"== expert rebalancer: {sum(r['moe_experts_moved'] for r in moves)} experts moved in "
          f"{len(moves)} rebalances; EP-rank load max/mean (worst layer) "
          f"{moves[0]['moe_rank_imbalance_before']:.2f} -> {moves[0]['moe_rank_imbalance_after']:.2f} at "
          f"iteration {moves[0]['iteration']} (plot: python tools/plot_expert_load.py {sys.argv[1]} -o load.png)")
sys.exit(0 if last < first else 1)
PY
