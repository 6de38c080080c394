#!/usr/bin/env bash
# CPU-scale ablation of the stack (issue 3): every configuration trains for the same wallclock at
# the same small shape on real text, then is exported and scored (round trip). One line per run in
# $OUT/table.md; summaries in $OUT/logs/. Figures from this are CPU-scale, not 8xH100 predictions.
#
#   DATA_PATH=../shared/data/sp1024_dev TOKENIZER_PATH=../shared/tokenizers/fineweb_1024_bpe.model \
#     bash tools/ablation.sh [name ...]        # default: every configuration below
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-ablation}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-100}
TORCHRUN=${TORCHRUN:-torchrun}
export OMP_NUM_THREADS=1
shape="NUM_LAYERS=2 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192 RECUR_LAYERS=1-1"
common="MAX_WALLCLOCK_SECONDS=$SECONDS_PER_RUN VAL_MAX_TOKENS=100000 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=100 LZMA_PRESET=6"

declare -A CONFIGS=(
  [baseline]="PRESET=baseline RECUR_LAYERS="
  [stack]=""
  [no_leaky]="MLP_ACT=relu2"
  [mlp2x]="MLP_MULT=2"
  [no_partial_rope]="ROPE_DIMS=0"
  [no_xsa]="XSA_LAST_N=0"
  [no_bigram]="BIGRAM_VOCAB=0"
  [no_smear]="SMEAR_GATE=0"
  [no_ln_scale]="LN_SCALE=0"
  [no_recurrence]="RECUR_LAYERS="
  [no_row_norm]="MUON_ROW_NORM=0"
  [no_weight_decay]="MUON_WD=0 ADAM_WD=0"
  [no_ema]="EMA_HORIZON_FRAC=0"
  [no_lr_floor]="LR_FLOOR=0"
  [no_grad_clip]="GRAD_CLIP_NORM=0"
  [with_attn_gate]="ATTN_GATE=1"
  [with_parallel_lane]="PARALLEL_LAST_N=1"
)
ORDER="baseline stack no_leaky mlp2x no_partial_rope no_xsa no_bigram no_smear no_ln_scale no_recurrence no_row_norm no_weight_decay no_ema no_lr_floor no_grad_clip with_attn_gate with_parallel_lane"
mkdir -p "$OUT"
train=$(pwd)/train_gpt.py
for name in ${*:-$ORDER}; do
  [ -n "${CONFIGS[$name]+x}" ] || { echo "ablation.sh: unknown configuration $name" >&2; exit 2; }
  run_id="abl_${name}_$(date -u +%H%M%S)"
  echo "ablation.sh: $name (${CONFIGS[$name]:-defaults})"
  (cd "$OUT" && env $shape $common ${CONFIGS[$name]} RUN_ID="$run_id" \
     $TORCHRUN --standalone --nproc_per_node=2 "$train" > "$run_id.out" 2>&1) \
     || { echo "ablation.sh: $name failed; see $OUT/$run_id.out" >&2; exit 1; }
  python3 - "$OUT/logs/$run_id.json" "$name" "${CONFIGS[$name]}" >> "$OUT/table.md" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | `{sys.argv[3] or '(defaults)'}` | {s['steps']} | {s['tokens_per_s']:.0f} | "
      f"{s['pre_quant_val_bpb']:.4f} | {s['val_bpb']:.4f} | {s['bytes_total']} |")
PY
  tail -n 1 "$OUT/table.md"
done
