"""The evaluation budget and the VarLen cu_seqlens of the code before the bounded capacity (commit 33164c4), CPU.

Drives the OLD train_gpt.py, checked out at $OLD_CODE (default /tmp/old33). From the repository root:
    mkdir /tmp/old33 && git archive 33164c4 | tar -x -C /tmp/old33
    python3 tools/old_code_evidence/old_budget_varlen.py > logs/old_code_evidence/old_budget_varlen.out
1. cu_seqlens at the run's shape (48 x 2,048 tokens per rank): its entries, and what FA3's backward would allocate
   for them (the model of tests/test_varlen.py).
2. The scenario of tests/test_lora_ttt.py::test_a_machine_that_slows_down_after_ttt_is_admitted_keeps_the_limit on
   the old LoRA evaluation: a 400-input document among short ones, every chunk step slowed by 0.3 s (the old chunk
   loop runs inside score_documents: its forwards with gradients are slowed), a 16 s budget, the plain rate
   measured as run_pipeline measures it.
"""
import os, sys, time
OLD = os.environ.get("OLD_CODE", "/tmp/old33")
sys.path[:0] = [OLD, os.path.join(OLD, "tests")]
import numpy as np, torch
import train_gpt as t
from _helpers import tiny_hp, random_gpt, cpu_runtime
print(f"old code: {t.__file__}")

# 1. cu_seqlens entries at 48 x 2,048, and FA3's accumulators for them (heads 8/4, dim 64)
rows, T = 48, 2048
x = torch.randint(2, 8192, (rows, T))
x[:, ::811] = t.BOS_ID                       # about FineWeb's document length
cu = t.varlen_cu_seqlens(t.document_ids(x))
padded = -(-(rows * T + (cu.numel() - 1) * 128) // 128) * 128
fa3 = 4 * (2 * 8 * padded + 8 * padded * 64 + 2 * 4 * padded * 64)
print(f"cu_seqlens entries at {rows}x{T}: {cu.numel()} (segments in the batch: {int((cu.diff() > 0).sum())}); "
      f"FA3 backward accumulators for them: {fa3 / 2**30:.1f} GiB per attention call")

# 2. the budget under a slowdown after TTT is admitted
VOCAB, WINDOW, STRIDE = 64, 16, 4
TABLES = (np.ones(VOCAB, dtype=np.int64), np.zeros(VOCAB, dtype=bool), np.zeros(VOCAB, dtype=bool))
rng = np.random.default_rng(8)
short = rng.integers(2, VOCAB, 200).astype(np.int64)
p = 0
while p < 200:
    short[p] = t.BOS_ID
    p += int(rng.integers(3, 31))
tokens = np.concatenate([[t.BOS_ID], np.arange(399) % (VOCAB - 2) + 2, short]).astype(np.int64)
hp = tiny_hp(TTT_ENABLED=1, TTT_METHOD="lora", TTT_LORA_RANK=4, TTT_LORA_LR=0.01, TTT_LORA_CHUNK=5, TTT_LORA_DOCS=2,
             TTT_PHASES=0, TTT_CHUNK_TOKENS=32, VAL_BATCH_SIZE=64, EVAL_TIME_LIMIT_SECONDS=16)
model = random_gpt(hp, seed=1)
rt = cpu_runtime()
for _ in range(2):
    plain = t.evaluate(hp, rt, model, tokens, TABLES, hp.train_seq_len, hp.train_seq_len)
real = model.forward


def slowed(*args, **kwargs):
    if torch.is_grad_enabled():
        time.sleep(0.3)
    return real(*args, **kwargs)


model.forward = slowed
trainer = t.LoRATestTimeTrainer(hp, rt, model, model, WINDOW)
t0 = time.perf_counter()
budget = t.EvalBudget(hp, rt, t0, plain.eval_time_ms / 1e3 / plain.val_tokens)
r = t.evaluate_lora_ttt(hp, rt, trainer, tokens, TABLES, WINDOW, STRIDE, budget, audit=True)
took = time.perf_counter() - t0
c4 = t.audit_one_pass(r.evidence)
print(f"old LoRA evaluation, 16 s budget, chunk steps slowed by 0.3 s: eval_time {r.eval_time_ms / 1e3:.2f} s "
      f"(wall {took:.2f} s), cut={trainer.cut!r}, documents adapted {trainer.docs_adapted}, "
      f"every target once: {c4['one_pass_ok']}")
