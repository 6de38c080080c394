#!/bin/bash
# CPU evidence for the default evaluation (docs/evaluation.md): document isolation, per-document scoring,
# whole-model and per-document LoRA TTT, on the challenge's sp8192 dev shards (not FineWeb; bpb not comparable
# to the leaderboard), 2Lx64, seq 128. From the repository root:
#
#   DEV_DATA=<folder of the sp8192 dev shards> DEV_TOKENIZER=<fineweb_8192_bpe.model> SEEDS="1 2" bash tools/eval_evidence.sh
#
# The runs happen in OUT (default /tmp/eval_evidence; logs/, artifacts/ and one .out per run land there);
# TRAIN_GPT picks the code (default this repository's train_gpt.py). The summaries in logs/eval_cpu_lora/
# came from this script's earlier form, run in /tmp/ev17 with the code of commit 23bcc1c (branch issue17,
# merged into main) checked out elsewhere, SEEDS="1 2" (docs/evaluation.md names each run's commit).
set -euo pipefail
T=${TRAIN_GPT:-$(cd "$(dirname "$0")/.." && pwd)/train_gpt.py}
OUT=${OUT:-/tmp/eval_evidence}
mkdir -p "$OUT"
cd "$OUT"
export DATA_PATH=${DEV_DATA:?the sp8192 dev shards folder} TOKENIZER_PATH=${DEV_TOKENIZER:?fineweb_8192_bpe.model} VOCAB_SIZE=8192 \
  NUM_LAYERS=2 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 RECUR_LAYERS= PARALLEL_LAST_N=1 XSA_LAST_N=2 \
  TRAIN_SEQ_LEN=128 TRAIN_BATCH_TOKENS=1024 GRAD_ACCUM_STEPS=1 ITERATIONS=60 MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 \
  VAL_MAX_TOKENS=16384 GPTQ_CALIBRATION=none LZMA_PRESET=6 TTT_ENABLED=0 EVAL_STRIDE=32 OMP_NUM_THREADS=2 \
  TTT_LORA_RANK=8 TTT_LORA_DOCS=8 TTT_LORA_LR=0.003 TTT_CHUNK_TOKENS=2048
for seed in ${SEEDS:-1 2}; do
  RUN_ID=iso1_s$seed SEED=$seed python3 "$T" > iso1_s$seed.out 2>&1
  RUN_ID=iso0_s$seed SEED=$seed ATTN_DOC_ISOLATION=0 EVAL_MODE=sliding TTT_METHOD=whole python3 "$T" > iso0_s$seed.out 2>&1
  A=artifacts/iso1_s$seed.pgolf.xz
  RUN_ID=none_s$seed EVAL_ONLY=$A python3 "$T" > none_s$seed.out 2>&1
  RUN_ID=slide_s$seed EVAL_ONLY=$A EVAL_MODE=sliding python3 "$T" > slide_s$seed.out 2>&1
  RUN_ID=whole_s$seed EVAL_ONLY=$A TTT_ENABLED=1 TTT_METHOD=whole TTT_EPOCHS=1 python3 "$T" > whole_s$seed.out 2>&1
  RUN_ID=lora_s$seed EVAL_ONLY=$A TTT_ENABLED=1 TTT_PHASES=0 python3 "$T" > lora_s$seed.out 2>&1
  RUN_ID=lorap_s$seed EVAL_ONLY=$A TTT_ENABLED=1 TTT_PHASES=3 TTT_PHASE_DOCS_FRAC=0.5 python3 "$T" > lorap_s$seed.out 2>&1
done
echo "finished: summaries in $OUT/logs/"
