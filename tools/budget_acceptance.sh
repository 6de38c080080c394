#!/usr/bin/env bash
# The evaluation budget kept under load (issue 24's acceptance, docs/evaluation.md "The budget under load"):
#   1. a trained artifact scored by the default evaluation (LoRA TTT, its phase) on 2 CPU ranks without a limit;
#   2. the same with EVAL_TIME_LIMIT_SECONDS at FRACTION (0.6) of that run's eval_time_ms while another process
#      keeps one core busy for the whole run; it must end within the limit with every target scored.
# Each run's summary and output land in logs/budget_cpu/ (the folder must not exist yet); the last line says whether
# both held.
#
#   ARTIFACT=artifacts/la_default.pgolf.xz DATA_PATH=<its shards> TOKENIZER_PATH=<its tokenizer> \
#     PRESET=sp8192 VAL_MAX_TOKENS=16384 TTT_LORA_BATCH_TOKENS=20480 bash tools/budget_acceptance.sh
#
# On a 24 GB CPU machine the default LoRA batch (32 rows of 2,560 with an 8,192-token head, fp32, eager) took ~21 GB
# per rank and the kernel killed one of the two ranks; 8 rows (TTT_LORA_BATCH_TOKENS=20480) fit.
set -euo pipefail
: "${ARTIFACT:?a trained artifact}" "${DATA_PATH:?its shards}" "${TOKENIZER_PATH:?its tokenizer}"
cd "$(dirname "$0")/.."
out=${OUT:-logs/budget_cpu}
mkdir "$out"
export OMP_NUM_THREADS=1 EVAL_ONLY=$ARTIFACT VAL_MAX_TOKENS=${VAL_MAX_TOKENS:-49152} EVAL_AUDIT=0
run() {   # run NAME [SETTING=VALUE ...]
  local name=$1
  shift
  echo "budget_acceptance: $name $(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg)"
  env "$@" RUN_ID="ba_$name" torchrun --standalone --nproc_per_node=2 train_gpt.py > "$out/ba_$name.out" 2>&1
  mv "logs/ba_$name.json" "logs/ba_$name.txt" "$out/"
}
run unlimited EVAL_TIME_LIMIT_SECONDS=0
limit=$(python3 -c "import json; print(round(${FRACTION:-0.6} * json.load(open('$out/ba_unlimited.json'))['eval_time_ms'] / 1e3, 1))")
python3 -c "while True: pass" &
load=$!
trap 'kill $load 2>/dev/null || true' EXIT
run limited EVAL_TIME_LIMIT_SECONDS="$limit"
kill $load
python3 - "$out" "$limit" <<'PY'
import json, sys
out, limit = sys.argv[1], float(sys.argv[2])
u, l = (json.load(open(f"{out}/ba_{n}.json")) for n in ("unlimited", "limited"))
ok = l["eval_time_ms"] / 1e3 <= limit and l["val_tokens"] == u["val_tokens"] and l["val_bytes"] == u["val_bytes"]
for n, s in (("unlimited", u), ("limited", l)):
    t = s["ttt_summary"]
    print(f"{n}: eval_time {s['eval_time_ms'] / 1e3:.1f} s, val_bpb {s['val_bpb']:.6f}, val_tokens {s['val_tokens']}, "
          f"documents adapted {t['documents_adapted']} of {t['documents']}, phases {t['phases_done']}/{t['phases_planned']}, cut {t['cut']}")
print(f"limit {limit:.1f} s: {'held' if ok else 'NOT held'} (within the limit, every target scored)")
sys.exit(0 if ok else 1)
PY
