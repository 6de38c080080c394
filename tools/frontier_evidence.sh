#!/usr/bin/env bash
# CPU-scale evidence for the frontier stack (the April records' pieces), every run the real pipeline at equal steps:
#   - each April piece off against the default, on sp8192 text;
#   - the default against PRESET=stack1024 (sp1024) on the same documents (SP8192_SAME_DOCS is the
#     sp1024 set re-tokenized with tools/retokenize.py, so the two tokenizers see the same text);
#   - score-first TTT on and off, re-scoring the default's artifact (EVAL_ONLY), full evaluation time.
# Summaries land in logs/frontier_cpu/ (the folder must not exist yet).
#
#   SP8192=<sp8192 shards> SP1024=<sp1024 shards> SP8192_SAME_DOCS=data/sp8192_from_sp1024_dev \
#   TOK8192=<fineweb_8192_bpe.model> TOK1024=<fineweb_1024_bpe.model> bash tools/frontier_evidence.sh
#
# SP8192 and SP1024 are folders of shards of real text in the challenge's format (fineweb_train_*.bin,
# fineweb_val_*.bin; logs/frontier_cpu/ used the challenge's sp8192 and sp1024 dev shards), TOK8192 and
# TOK1024 the challenge's tokenizers they were made with.
set -euo pipefail
: "${SP8192:?a folder of sp8192 shards}" "${TOK8192:?the sp8192 tokenizer}" "${SP1024:?a folder of sp1024 shards}" \
  "${TOK1024:?the sp1024 tokenizer}" "${SP8192_SAME_DOCS:?the SP1024 documents re-tokenized to sp8192}"
cd "$(dirname "$0")/.."
out=logs/frontier_cpu
mkdir "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# the default stack at a CPU shape: 4 layers x 128, layer 1 run 3x from 35% of the run, layer 3 two-lane
shape=(NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 RECUR_LAYERS=1-1 PARALLEL_LAST_N=1 TRAIN_SEQ_LEN=256
       TRAIN_BATCH_TOKENS=4096 ITERATIONS=${STEPS:-100} MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=50
       VAL_MAX_TOKENS=40000 VAL_BATCH_SIZE=4096 EVAL_STRIDE=128 GPTQ_CALIB_SEQS=8 GPTQ_CALIB_LEN=128 TTT_ENABLED=0
       TTT_CHUNK_TOKENS=4096 GRAD_ACCUM_STEPS=1)

run() {   # run NAME DATA TOKENIZER VOCAB [SETTING=VALUE ...]
  local name=$1 data=$2 tok=$3 vocab=$4
  shift 4
  echo "frontier_evidence: $name"
  env "${shape[@]}" DATA_PATH="$data" TOKENIZER_PATH="$tok" VOCAB_SIZE="$vocab" "$@" RUN_ID="fe_$name" \
    python3 train_gpt.py > "$out/fe_$name.out" 2>&1
  mv "logs/fe_$name.json" "logs/fe_$name.txt" "$out/"
}

s8=("$SP8192" "$TOK8192" 8192)
run default "${s8[@]}"
run default_seed42 "${s8[@]}" SEED=42
run no_recurrence "${s8[@]}" RECUR_LAYERS=
run one_lane "${s8[@]}" PARALLEL_LANES=1
run no_parallel "${s8[@]}" PARALLEL_LAST_N=0
run dense_attn_gate "${s8[@]}" ATTN_GATE_DIMS=0
run no_attn_gate "${s8[@]}" ATTN_GATE=0
run constant_smear_gate "${s8[@]}" SMEAR_GATE_DIMS=0
run qk_gain_1_5 "${s8[@]}" QK_GAIN_INIT=1.5
run quintic_newton_schulz "${s8[@]}" MUON_NS_COEFFS=quintic
run march_optimizer "${s8[@]}" MUON_MOMENTUM=0.99 MUON_MOMENTUM_WARMUP_FRAC=0.22 MUON_WD=0.04 EMBED_WD=0.04 \
  ADAM_WD=0.04 MATRIX_LR=0.025 SCALAR_LR=0.025 TIED_EMBED_LR=0.035 BETA2=0.95 WARMDOWN_FRAC=0.5 EMA_HORIZON_FRAC=0.048
run mlp_3x "${s8[@]}" MLP_MULT=3
run no_late_qat "${s8[@]}" LATE_QAT_THRESHOLD=0
# the same documents under both tokenizers: the default (sp8192) against the March stack (sp1024)
run default_same_docs "$SP8192_SAME_DOCS" "$TOK8192" 8192
run stack1024_same_docs "$SP1024" "$TOK1024" 1024 PRESET=stack1024 RECUR_LAYERS= PARALLEL_LAST_N=0   # the shape above sets both
# score-first TTT: the default's artifact re-scored with TTT on, every pass counted in eval_time_ms
artifact=artifacts/fe_default.pgolf.xz
run ttt_on "${s8[@]}" EVAL_ONLY=$artifact TTT_ENABLED=1 EVAL_AUDIT=1
# (the audit's C2 sums 8,192 candidates at every position of 3 windows: ~1,000 s on 2 CPU cores; the TTT-free
# re-score, which updates nothing, skips it)
run ttt_off "${s8[@]}" EVAL_ONLY=$artifact TTT_ENABLED=0 EVAL_AUDIT=0
python3 - "$out" <<'EOF'
import glob, json, sys
rows = []
for path in sorted(glob.glob(f"{sys.argv[1]}/fe_*.json")):
    s = json.load(open(path))
    rows.append((s["run_id"], s["steps"], s.get("train_loss"), s.get("pre_quant_val_bpb"), s.get("roundtrip_plain_val_bpb"),
                 s["val_bpb"], s["bytes_model"], s["eval_time_ms"] / 1e3, s["tokens_per_s"]))
print("| run | steps | last train loss | pre-quant bpb (plain) | round trip bpb (plain) | final bpb (sliding) | model bytes "
      "| eval s | tok/s |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join("n/a" if v is None else (f"{v:.4f}" if isinstance(v, float) and v < 10 else
                                                      f"{v:,.0f}" if isinstance(v, float) else str(v)) for v in r) + " |")
EOF
