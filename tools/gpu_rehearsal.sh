#!/usr/bin/env bash
# One-GPU rehearsal of the 8xH100 run: the default configuration at full shape on one CUDA
# GPU (gradient accumulation keeps the global batch: 8 micro-batches per step), for a short training
# wallclock, then calibration, export, load, audit and evaluation of a validation slice, as the real
# run does them. Prints one JSON (tools/harness.py rehearsal-report): step time, tokens/s, MFU, peak
# memory, compile time, recompiles after warm-up, graph breaks, each stage's time, and the 8xH100 step
# time this implies. No network: on the shards in DATA_PATH, else on the demo set it builds itself
# (whole or not at all: an interrupted build leaves nothing that blocks the next try).
#
#   bash tools/gpu_rehearsal.sh                                  # on the demo set, 120 s of training
#   DATA_PATH=./data/datasets/fineweb10B_sp8192_caseops \
#     TOKENIZER_PATH=./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \
#     REHEARSAL_TRAIN_SECONDS=180 bash tools/gpu_rehearsal.sh
#
# Any setting passes through to train_gpt.py. REHEARSAL_ALLOW_CPU=1 runs it without a GPU (the plumbing
# test does, at a tiny shape).
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

if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  if [ "${REHEARSAL_ALLOW_CPU:-0}" != 1 ]; then
    echo "gpu_rehearsal.sh: no CUDA GPU here (REHEARSAL_ALLOW_CPU=1 runs it on the CPU)" >&2
    exit 2
  fi
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
# a rehearsal measures the box it has: without flash-attn it runs SDPA (the report names the kernel)
export ALLOW_SDPA=${ALLOW_SDPA:-1}
MAX_WALLCLOCK_SECONDS=${REHEARSAL_TRAIN_SECONDS:-120} VAL_MAX_TOKENS=${VAL_MAX_TOKENS:-1048576} \
  VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-0} EVAL_AUDIT=1 RUN_ID=$run_id \
  ${TORCHRUN:-torchrun} --standalone --nproc_per_node=1 train_gpt.py >&2
python3 tools/harness.py rehearsal-report "logs/$run_id.json"
