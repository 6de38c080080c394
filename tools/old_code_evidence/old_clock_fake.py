"""The old clock (commit 6c039fc) on a fake time source only this script moves, CPU.

Drives the OLD train_gpt.py, checked out at $OLD_CODE (default /tmp/old). From the repository root:
    git worktree add /tmp/old 6c039fc        # or: mkdir /tmp/old && git archive 6c039fc | tar -x -C /tmp/old
    python3 tools/old_code_evidence/old_clock_fake.py > logs/old_code_evidence/old_clock_fake.out
"""
import os, sys
OLD = os.environ.get("OLD_CODE", "/tmp/old")
sys.path[:0] = [OLD, os.path.join(OLD, "tests")]
import torch, train_gpt as t
from _helpers import tiny_hp, random_gpt, cpu_runtime
class Fake:
    now = 1000.0
    def perf_counter(self): return self.now
for step_s in (0.05, 0.047, 0.11):
    fake = Fake(); t.time = fake
    hp = tiny_hp(ITERATIONS=10000, MAX_WALLCLOCK_SECONDS=1.5, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=10000, COMPILE_WARMUP_STEPS=0)
    class L:
        grad_accum, local_tokens = 1, 2 * hp.train_seq_len
        start = None
        def batch(self, step, micro):
            if self.start is None: self.start = fake.now
            slow = 1500 - 1e3 * (fake.now - self.start) < 2 * 1e3 * step_s
            fake.now += step_s * (2 if slow else 1)
            x = torch.randint(0, hp.vocab_size, (self.local_tokens + 1,))
            return x[:-1].view(-1, hp.train_seq_len), x[1:].view(-1, hp.train_seq_len)
    m = random_gpt(hp)
    r = t.train(hp, cpu_runtime(), m, m, L(), lambda *a, **k: None, lambda *a: None)
    print(f"old clock, fake time, {1e3*step_s:.0f} ms steps: train_time_ms {r.train_time_ms:.0f} of a 1500 ms cap -> over: {r.train_time_ms > 1500}")
