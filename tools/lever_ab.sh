#!/usr/bin/env bash
# CPU-scale A/B of the score levers taken after record #1855 (docs/levers.md), every run the real pipeline:
#   - evaluation levers: one trained artifact re-scored (EVAL_ONLY) with each lever set back to its old value, and
#     the default re-scored under a second SEED (the LoRA A draw): the evaluation's own noise;
#   - the training lever QK gain 5.25 against 5.0, trained both ways on two seeds each, seed-matched.
# The shape is frontier_evidence.sh's (4 layers x 128, sequences of 256); the evaluation window's lever keeps #2019's
# ratio to training (2,560 / 2,048 = 1.25: 320 here), every LoRA batch holds 8 rows whatever the window, and LoRA rank 8
# keeps #1767's output scale alpha/rank = 1.8 (alpha 14.4; the lever's old value, scale 1, is alpha 8).
# Summaries land in logs/lever_cpu/ (the folder must not exist yet).
#
#   SP8192=<sp8192 shards> TOK8192=<fineweb_8192_bpe.model> [ARTIFACT=...] bash tools/lever_ab.sh
set -euo pipefail
: "${SP8192:?a folder of sp8192 shards}" "${TOK8192:?the sp8192 tokenizer}"
cd "$(dirname "$0")/.."
out=${OUT:-logs/lever_cpu}
mkdir "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
shape=(PRESET=sp8192 DATA_PATH="$SP8192" TOKENIZER_PATH="$TOK8192" NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4
       NUM_KV_HEADS=2 RECUR_LAYERS=1-1 PARALLEL_LAST_N=1 TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=4096
       ITERATIONS=${STEPS:-150} MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50 VAL_MAX_TOKENS=${VAL_TOKENS:-24576}
       VAL_BATCH_SIZE=4096 EVAL_STRIDE=128 GPTQ_CALIB_SEQS=8 GPTQ_CALIB_LEN=256 GRAD_ACCUM_STEPS=1
       EVAL_SEQ_LEN=320 TTT_LORA_BATCH_TOKENS=2560 TTT_LORA_RANK=8 TTT_LORA_ALPHA=14.4 EVAL_TIME_LIMIT_SECONDS=0 EVAL_AUDIT=0)

run() {   # run NAME [SETTING=VALUE ...]
  local name=$1
  shift
  echo "lever_ab: $name $(date -u +%H:%M:%S)"
  env "${shape[@]}" "$@" RUN_ID="la_$name" python3 train_gpt.py > "$out/la_$name.out" 2>&1
  mv "logs/la_$name.json" "logs/la_$name.txt" "$out/"
}

# the default trained once; its own evaluation is skipped (every evaluation below re-scores its artifact alike)
# (ARTIFACT=<a default run's artifact at this shape> skips the training)
if [ -z "${ARTIFACT:-}" ]; then
  run default TTT_ENABLED=0
fi
artifact=${ARTIFACT:-artifacts/la_default.pgolf.xz}
ev=(EVAL_ONLY=$artifact VAL_MAX_TOKENS=${EVAL_TOKENS:-8192})
run eval_default "${ev[@]}"
run eval_seed42 "${ev[@]}" SEED=42
run eval_qv_lora "${ev[@]}" TTT_LORA_TARGETS=q,k,v,o,mlp,head
run eval_scale_1 "${ev[@]}" TTT_LORA_ALPHA=8
run eval_redraw_a "${ev[@]}" TTT_LORA_KEEP_A=0
run eval_lr_1e-4 "${ev[@]}" TTT_LORA_LR=1e-4
run eval_old_adamw "${ev[@]}" TTT_LORA_BETA2=0.999 TTT_LORA_WEIGHT_DECAY=1.0
run eval_window_256 "${ev[@]}" EVAL_SEQ_LEN=0 TTT_LORA_BATCH_TOKENS=2048
run eval_3_phases "${ev[@]}" TTT_PHASES=3 TTT_PHASE_DOCS_FRAC=0.05
run eval_no_ttt "${ev[@]}" TTT_ENABLED=0
# training levers, scored without TTT (the asymmetric softcap equals one cap until TTT learns it: its effect is an
# evaluation's, and an artifact trained with it cannot be re-scored without it; tests/test_lora_ttt.py shows it)
run default_seed42 TTT_ENABLED=0 SEED=42
run qk_5_0 TTT_ENABLED=0 QK_GAIN_INIT=5.0
run qk_5_0_seed42 TTT_ENABLED=0 QK_GAIN_INIT=5.0 SEED=42
