#!/usr/bin/env bash
# One-GPU rehearsal of the 8xH100 run. By default the probe (tools/gpu_probe.py): each part of the run measured in
# isolation at the default shape, with its peak memory (attention at a rank's micro-batch, compile and micro-step
# with recurrence off and on, the optimizer step, LoRA TTT steps on 97,114-token documents, a scoring forward), one
# table and the 8xH100 projection built from it beside the CPU-side projections, and a JSON (logs/gpu_probe_*.json or
# --json PATH). Estimated 4-6 min on one H100, compiles being the unknown (docs/cuda_hazards.md); capped at
# REHEARSAL_CAP_SECONDS (default 520) by `timeout`, the probe keeping its own cap 30 s inside it: with the checks
# before it, under 9 minutes.
#
#   bash tools/gpu_rehearsal.sh [--json PATH]          # the probe
#   bash tools/gpu_rehearsal.sh --pipeline             # the whole pipeline (opt-in): train for REHEARSAL_TRAIN_SECONDS
#                                                      # (default 120), calibrate, export, load, audit, evaluate
#
# Both need a CUDA GPU with flash-attn (each refuses in one line, exit 2, naming the install line); no network. Any
# setting passes through to train_gpt.py. REHEARSAL_ALLOW_CPU=1 runs them without a GPU (the plumbing tests, at a
# tiny shape). The pipeline runs on the shards in DATA_PATH, else on the demo set it builds itself (whole or not at
# all), whose short documents do not exercise the long-document TTT the probe measures; its time was never measured
# (the compiles of every training state and evaluation graph, then 120 s of training and the rest: give it 20 min).
set -euo pipefail
cd "$(dirname "$0")/.."

# what the run needs, checked first: one line naming what is missing and how to install it (exit 2)
python3 - <<'EOF' || exit 2
import sys
missing = []
for name in ("torch", "numpy", "sentencepiece"):
    try:
        __import__(name)
    except ImportError:
        missing.append(name)
if missing:
    sys.exit(f"gpu_rehearsal.sh: missing Python package(s) {', '.join(missing)}: pip install {' '.join(missing)}")
EOF
# a CUDA GPU with flash-attn (or REHEARSAL_ALLOW_CPU=1), and settings a run accepts
python3 tools/gpu_probe.py --check || exit 2

if [ "${1:-}" != "--pipeline" ]; then
  cap=${REHEARSAL_CAP_SECONDS:-520}
  exec timeout -k 10 "$cap" python3 tools/gpu_probe.py --cap-seconds "$((cap - 30))" "$@"
fi

if [ -z "${DATA_PATH:-}" ]; then
  demo=./data/rehearsal_caseops     # the demo set in the default data's form (CaseOps, byte sidecar)
  if ! ls "$demo"/fineweb_train_*.bin >/dev/null 2>&1; then
    python3 tools/harness.py demo-data "$demo"
  fi
  # the demo tokenizer has 1024 pieces; VOCAB_SIZE keeps the default (8192) rows: the full shape
  export DATA_PATH=$demo TOKENIZER_PATH=${TOKENIZER_PATH:-$demo/tokenizer/demo_1024_bpe_caseops.model}
  # its ~36k validation tokens make two 32,768-token TTT chunks: TTT would train on the first only
  export TTT_CHUNK_TOKENS=${TTT_CHUNK_TOKENS:-8192}
fi
run_id=${RUN_ID:-rehearsal_$(date -u +%Y%m%d_%H%M%S)}
MAX_WALLCLOCK_SECONDS=${REHEARSAL_TRAIN_SECONDS:-120} VAL_MAX_TOKENS=${VAL_MAX_TOKENS:-1048576} \
  VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-0} EVAL_AUDIT=1 RUN_ID=$run_id \
  timeout -k 10 "${REHEARSAL_CAP_SECONDS:-1200}" ${TORCHRUN:-torchrun} --standalone --nproc_per_node=1 train_gpt.py >&2
python3 tools/harness.py rehearsal-report "logs/$run_id.json"
