#!/bin/bash
# A refactor keeps behaviour bit for bit: a fixed-step default-stack CPU run (the demo's shape, 2 gloo ranks,
# 30 steps, no wallclock cap, no evaluation budget, so nothing depends on time) of each checkout given, on
# the same demo set, prints its artifact sha256 and scores; equal lines mean the same artifact and score.
#   bash tools/same_artifact.sh DEMO_DIR CHECKOUT [CHECKOUT ...]
# DEMO_DIR: a demo set (python3 tools/harness.py demo-data DEMO_DIR, CaseOps or --plain); each CHECKOUT: a worktree of this
# repository (git worktree add --detach /tmp/old <commit>). Its run writes logs/ and artifacts/ there.
set -euo pipefail
demo=$(realpath "$1"); shift
for checkout in "$@"; do
  run_id=same_artifact_$(date -u +%Y%m%d_%H%M%S)
  (cd "$checkout" &&
   DATA_PATH=$demo TOKENIZER_PATH=$(echo "$demo"/tokenizer/demo_1024_bpe*.model) VOCAB_SIZE=1024 \
   NUM_LAYERS=4 MODEL_DIM=128 NUM_HEADS=4 NUM_KV_HEADS=2 RECUR_LAYERS=1-2 PARALLEL_LAST_N=1 \
   TRAIN_SEQ_LEN=256 TRAIN_BATCH_TOKENS=16384 VAL_BATCH_SIZE=65536 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=10 \
   GPTQ_CALIB_SEQS=8 GPTQ_CALIB_LEN=256 TTT_CHUNK_TOKENS=4096 ITERATIONS=30 MAX_WALLCLOCK_SECONDS=0 \
   EVAL_TIME_LIMIT_SECONDS=0 EVAL_AUDIT=1 SEED=1337 RUN_ID=$run_id \
   python3 -m torch.distributed.run --standalone --nproc_per_node=2 train_gpt.py > /dev/null &&
   python3 -c "import json, sys; s = json.load(open(sys.argv[1])); print(sys.argv[2], s['artifact_sha256'], \
'val_bpb', repr(s['val_bpb']), 'val_loss', repr(s['val_loss']), 'bytes_model', s['bytes_model'], 'audit', \
s['compliance']['all_ok'])" "logs/$run_id.json" "$(git rev-parse --short HEAD)")
done
