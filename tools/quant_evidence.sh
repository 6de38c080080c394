#!/usr/bin/env bash
# CPU-scale compression evidence (issue 4): the same small model trained for the same number of
# steps on real text, exported each way, scored after the round trip. Equal steps (not equal
# wallclock) so that the comparison does not depend on how busy the machine is; tokens/s is in
# the table. One line per run in $OUT/table.md; summaries in $OUT/logs/. CPU-scale figures only.
#
#   DATA_PATH=../shared/data/sp1024_dev TOKENIZER_PATH=../shared/tokenizers/fineweb_1024_bpe.model \
#     bash tools/quant_evidence.sh [name ...]        # default: every configuration below
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-quant_evidence}
STEPS=${STEPS:-300}
TORCHRUN=${TORCHRUN:-torchrun}
export OMP_NUM_THREADS=1
shape="NUM_LAYERS=2 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=8192"
common="ITERATIONS=$STEPS MAX_WALLCLOCK_SECONDS=0 VAL_MAX_TOKENS=100000 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50
        GPTQ_CALIB_SEQS=16 GPTQ_CALIB_LEN=256"

declare -A CONFIGS=(
  [int8_rtn]="QUANT_MATRIX_BITS=8 LATE_QAT_THRESHOLD=0 GPTQ_CALIBRATION=none"
  [int6_rtn]="LATE_QAT_THRESHOLD=0 GPTQ_CALIBRATION=none"
  [int6_gptq]="LATE_QAT_THRESHOLD=0"
  [int6_qat_rtn]="GPTQ_CALIBRATION=none"
  [int6_qat_gptq]=""
  [ternary_mlp_late]="TERNARY_PATTERNS=.mlp."
  [ternary_mlp_start]="TERNARY_PATTERNS=.mlp. TERNARY_FROM_STEP=0"
  [ternary_mlp8_start]="TERNARY_PATTERNS=.mlp. TERNARY_FROM_STEP=0 MLP_MULT=8"
  [ternary_mlp10_start]="TERNARY_PATTERNS=.mlp. TERNARY_FROM_STEP=0 MLP_MULT=10"
  [ternary_mlp10_start_hadamard]="TERNARY_PATTERNS=.mlp. TERNARY_FROM_STEP=0 MLP_MULT=10 TERNARY_HADAMARD=1"
)
ORDER="int8_rtn int6_rtn int6_gptq int6_qat_rtn int6_qat_gptq ternary_mlp_late ternary_mlp_start ternary_mlp8_start
       ternary_mlp10_start ternary_mlp10_start_hadamard"
mkdir -p "$OUT"
train=$(pwd)/train_gpt.py
for name in ${*:-$ORDER}; do
  [ -n "${CONFIGS[$name]+x}" ] || { echo "quant_evidence.sh: unknown configuration $name" >&2; exit 2; }
  run_id="qe_${name}_$(date -u +%H%M%S)"
  echo "quant_evidence.sh: $name (${CONFIGS[$name]:-defaults})"
  (cd "$OUT" && env $shape $common ${CONFIGS[$name]} RUN_ID="$run_id" \
     $TORCHRUN --standalone --nproc_per_node=2 "$train" > "$run_id.out" 2>&1) \
     || { echo "quant_evidence.sh: $name failed; see $OUT/$run_id.out" >&2; exit 1; }
  python3 - "$OUT/logs/$run_id.json" "$name" "${CONFIGS[$name]}" >> "$OUT/table.md" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
q = s["quant"]
mlp = [g for g in q["groups"] if g["name"] == "mlp"]
print(f"| {sys.argv[2]} | `{sys.argv[3] or '(defaults)'}` | {s['steps']} | {s['tokens_per_s']:.0f} | "
      f"{s['pre_quant_val_bpb']:.4f} | {s['roundtrip_val_bpb']:.4f} | {s['roundtrip_val_bpb'] - s['pre_quant_val_bpb']:+.4f} | "
      f"{s['bytes_model']} | {q['predicted_bytes_model']} | {8 * mlp[0]['bytes'] / mlp[0]['params']:.2f} | {q['bits_per_param']:.2f} |")
PY
  tail -n 1 "$OUT/table.md"
done
