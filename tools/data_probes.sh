#!/usr/bin/env bash
# The review's data probes (issue 25, item 2) on CPU: one seed trained on the demo set and on each probe's copy of it,
# each checked by `tools/harness.py check`. The probes: val_in_train, a training shard made of the validation
# documents (repeated); val_in_train_without_bos, the same with every BOS dropped; train_as_val, the validation shard
# made of training tokens, repeated to the split's token count.
#   bash tools/data_probes.sh OUT_DIR DEMO_DIR [CODE_TREE]
# DEMO_DIR: a `harness.py demo-data DIR --vocab-size 512 --max-chars 300000` folder; CODE_TREE (default: this
# repository) holds the train_gpt.py and tools/ to run, e.g. an older commit's `git archive` to show what it accepted.
# Writes OUT_DIR/probes.txt: each run's headline, audit verdict and the check's output.
set -euo pipefail
out=$1; demo=$(cd "$2" && pwd); tree=$(cd "${3:-$(dirname "$0")/..}" && pwd)
mkdir -p "$out" && cd "$out"
cp "$tree/train_gpt.py" . && rm -rf tools && cp -r "$tree/tools" .
for kind in val_in_train val_in_train_without_bos train_as_val; do
  python3 - "$kind" "$demo" <<'PY'
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, ".")
from tools import harness
kind, demo = sys.argv[1], Path(sys.argv[2])
read = lambda p: np.fromfile(p, dtype="<u2", offset=1024, count=int(np.fromfile(p, dtype="<i4", count=3)[2]))
val, train = read(demo / "fineweb_val_000000.bin"), read(demo / "fineweb_train_000000.bin")
forged = {"val_in_train": (val, np.tile(val, 6)),
          "val_in_train_without_bos": (val, np.concatenate([[1], np.tile(val[val != 1], 6)])),
          "train_as_val": (np.resize(train[:4000], val.size), train)}[kind]
for split, tokens in zip(("val", "train"), forged):
    harness.write_shard(Path("data") / kind / f"fineweb_{split}_000000.bin", tokens)
PY
done
mkdir -p data/honest && cp "$demo"/fineweb_*.bin data/honest/
: > probes.txt
for kind in honest val_in_train val_in_train_without_bos train_as_val; do
  OMP_NUM_THREADS=1 NUM_LAYERS=2 RECUR_LAYERS=0-0 PARALLEL_LAST_N=1 MODEL_DIM=64 NUM_HEADS=4 NUM_KV_HEADS=2 \
    TRAIN_SEQ_LEN=64 TRAIN_BATCH_TOKENS=4096 ITERATIONS=60 MAX_WALLCLOCK_SECONDS=0 VAL_LOSS_EVERY=0 EVAL_STRIDE=32 \
    VAL_BATCH_SIZE=8192 LZMA_PRESET=6 GPTQ_CALIB_SEQS=2 GPTQ_CALIB_LEN=32 TTT_ENABLED=0 EVAL_AUDIT=1 SEED=1 \
    DATA_PATH="data/$kind" TOKENIZER_PATH="$(ls "$demo"/tokenizer/*.model)" VOCAB_SIZE=512 RUN_ID="$kind" \
    python3 train_gpt.py > "run_$kind.out" 2>&1
  { echo "== $kind: $(grep -o 'roundtrip_exact val_loss:[0-9.]* val_bpb:[0-9.]*' "logs/$kind.txt") audit $(grep -o '"all_ok": [a-z]*' "logs/$kind.txt" | tail -1)"
    python3 tools/harness.py check "$kind" 2>&1 && echo "check exit 0" || echo "check exit $?"; } | tee -a probes.txt
done
