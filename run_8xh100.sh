#!/usr/bin/env bash
# One training per seed in SEEDS, one after another, each launched as
#   ${TORCHRUN:-torchrun} --standalone --nproc_per_node=${NPROC:-8} train_gpt.py
# with the compliance audit on (EVAL_AUDIT=1); then tools/harness.py submit checks the seeds'
# logs/<RUN_ID>.json, prints mean/std and the Welch test, and assembles the record folder.
# Every other environment variable passes through to train_gpt.py (and to the harness:
# RECORD_DIR, REFERENCE_BPB, SUBMISSION_NAME, AUTHOR, GITHUB_ID); NLL_DUMP=x.npz becomes
# x_seed<SEED>.npz for each seed, since a run never overwrites an existing dump.
#
#   SEEDS="1337 42 2025" bash run_8xh100.sh          # on an 8xH100 box with the FineWeb CaseOps shards (README)
#   PRESET=sp8192 bash run_8xh100.sh                  # the same stack on plain sp8192 shards
#   bash run_8xh100.sh                                # anywhere: see "demo" below
#
# Demo: when DATA_PATH is unset and the preset's default data folder (./data/datasets/fineweb10B_sp8192_caseops
# for the default PRESET=frontier) holds no shards, a small real-text set is built from the Python
# standard library's docstrings in the default data's form (tools/harness.py demo-data, no network: CaseOps
# text, a tokenizer with the four operators, shards and the byte sidecar, in ./data/demo_caseops) and a small
# CPU-sized configuration of the same stack is used, each knob only where you did not set it yourself.
# Without a GPU this is automatic and NPROC defaults to 2 (CPU, gloo); on a GPU only with DEMO=1
# (without it, missing shards are an error: exit 2). A demo sweep is a practice sweep: never a record.
#
# Before the first seed trains, logs/<prefix>.sweep.json records the sweep (seeds, run ids, the code's
# sha256, the settings): the harness submits every run it lists or none. Where the record goes is
# decided by the harness from what the runs recorded: a record (3+ seeds on 8xH100, the whole
# validation split of a known FineWeb data pair, significant) goes to records/track_10min_16mb/
# and may update ./submission.json; an on-track run that misses the significance bar goes to
# records/track_non_record_16mb/; any other run (the demo, a CPU or 1-GPU run) goes to
# logs/<prefix>_record/. RECORD_DIR overrides the folder; an existing folder is never overwritten.
set -euo pipefail
cd "$(dirname "$0")"

TORCHRUN=${TORCHRUN:-torchrun}
case ${DEMO:-0} in 0|1) ;; *) echo "run_8xh100.sh: DEMO must be 0 or 1, got '$DEMO'" >&2; exit 2 ;; esac
cuda=0
if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  cuda=1
  NPROC=${NPROC:-8}
else
  NPROC=${NPROC:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# the preset's default data folder (train_gpt.py's settings, read the way the run will read them)
official_data=$(python3 -c 'import os, train_gpt; print(train_gpt.read_settings(dict(os.environ))[0].data_path)' 2>/dev/null \
  || echo ./data/datasets/fineweb10B_sp8192_caseops)
practice=()
if [ -z "${DATA_PATH:-}" ] && ! ls "$official_data"/fineweb_train_*.bin >/dev/null 2>&1; then
  if [ "$cuda" = 1 ] && [ "${DEMO:-0}" != 1 ]; then
    echo "run_8xh100.sh: no shards in $official_data/fineweb_train_*.bin and DATA_PATH is unset: build the FineWeb CaseOps data (README; PRESET=sp8192 for plain sp8192 shards) or set DATA_PATH; DEMO=1 runs the demo set instead (never a record)" >&2
    exit 2
  fi
  practice=(--practice)
  demo=./data/demo_caseops
  if ! ls "$demo"/fineweb_train_*.bin >/dev/null 2>&1; then
    echo "run_8xh100.sh: no shards in $official_data; building the demo set in $demo"
    python3 tools/harness.py demo-data "$demo"
  fi
  export DATA_PATH=$demo
  export TOKENIZER_PATH=${TOKENIZER_PATH:-$demo/tokenizer/demo_1024_bpe_caseops.model} VOCAB_SIZE=${VOCAB_SIZE:-1024}
  export NUM_LAYERS=${NUM_LAYERS:-4} MODEL_DIM=${MODEL_DIM:-128} NUM_HEADS=${NUM_HEADS:-4} NUM_KV_HEADS=${NUM_KV_HEADS:-2}
  export RECUR_LAYERS=${RECUR_LAYERS-1-2} PARALLEL_LAST_N=${PARALLEL_LAST_N:-1}
  export TRAIN_SEQ_LEN=${TRAIN_SEQ_LEN:-256} TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-16384} VAL_BATCH_SIZE=${VAL_BATCH_SIZE:-65536}
  export MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-120} VAL_LOSS_EVERY=${VAL_LOSS_EVERY:-0}
  export TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-25} GPTQ_CALIB_SEQS=${GPTQ_CALIB_SEQS:-8} GPTQ_CALIB_LEN=${GPTQ_CALIB_LEN:-256}
  # the demo's ~36k validation tokens make two 32,768-token TTT chunks: TTT would train on the first only
  export TTT_CHUNK_TOKENS=${TTT_CHUNK_TOKENS:-4096}
  SEEDS=${SEEDS:-1337}
fi
SEEDS=${SEEDS:-1337 42 2025}
if [ -z "${SEEDS// /}" ]; then
  echo "run_8xh100.sh: SEEDS is empty" >&2
  exit 2
fi
if [ -n "${RECORD_DIR:-}" ] && [ -e "$RECORD_DIR" ]; then   # fail now, not after the training
  echo "run_8xh100.sh: RECORD_DIR=$RECORD_DIR already exists; a record is never overwritten" >&2
  exit 1
fi
run_prefix=${RUN_ID:-pg_$(date -u +%Y%m%d_%H%M%S)}
# the sweep's manifest, before any seed trains: submit takes every run it lists, or none
# shellcheck disable=SC2086  # SEEDS is a list of words
python3 tools/harness.py sweep "$run_prefix" $SEEDS ${practice[@]+"${practice[@]}"}

run_ids=()
for seed in $SEEDS; do
  run_id="${run_prefix}_seed${seed}"
  nll_dump=${NLL_DUMP:+${NLL_DUMP%.npz}_seed${seed}.npz}   # NLL_DUMP=x.npz -> x_seed<SEED>.npz per seed
  echo "run_8xh100.sh: seed $seed -> logs/$run_id.txt ($NPROC processes)"
  if ! SEED=$seed RUN_ID=$run_id EVAL_AUDIT=1 NLL_DUMP=$nll_dump \
      $TORCHRUN --standalone --nproc_per_node="$NPROC" train_gpt.py; then
    echo "run_8xh100.sh: seed $seed failed; last lines of logs/$run_id.txt:" >&2
    tail -n 20 "logs/$run_id.txt" >&2 2>/dev/null || echo "(no log was written)" >&2
    echo "run_8xh100.sh: sweep logs/$run_prefix.sweep.json is incomplete: submit refuses it without seed $seed" >&2
    exit 1
  fi
  if ! python3 tools/harness.py check "$run_id"; then   # e.g. evaluation past 600 s: every seed would be
    echo "run_8xh100.sh: submit would refuse seed $seed (reasons above): the sweep stops before the next seed" >&2
    exit 1
  fi
  run_ids+=("$run_id")
done
echo "run_8xh100.sh: all seeds done; summaries in logs/${run_prefix}_seed*.json"
python3 tools/harness.py submit --sweep "logs/$run_prefix.sweep.json" ${practice[@]+"${practice[@]}"} "${run_ids[@]}"
