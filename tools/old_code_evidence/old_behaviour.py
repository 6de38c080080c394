"""Each hazard/hole, shown on the code before the change (commit 6c039fc), CPU.

Drives the OLD train_gpt.py, checked out at $OLD_CODE (default /tmp/old). From the repository root:
    git worktree add /tmp/old 6c039fc        # or: mkdir /tmp/old && git archive 6c039fc | tar -x -C /tmp/old
    python3 tools/old_code_evidence/old_behaviour.py > logs/old_code_evidence/old_behaviour.out
"""
import os, sys, time, math
OLD = os.environ.get("OLD_CODE", "/tmp/old")
sys.path[:0] = [OLD, os.path.join(OLD, "tests")]
import numpy as np, torch
import train_gpt as t
from _helpers import tiny_hp, random_gpt, cpu_runtime

# hazard 4: the clock with a slow last step
hp = tiny_hp(ITERATIONS=10000, MAX_WALLCLOCK_SECONDS=1.5, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=10000, COMPILE_WARMUP_STEPS=0)
class Loader:
    grad_accum, local_tokens = 1, 2 * hp.train_seq_len
    def __init__(self): self.t0 = None; self.last = None; self.interval = 1e9; self.slowed = 0
    def batch(self, step, micro):
        now = time.perf_counter()
        if self.t0 is None: self.t0 = now
        if self.last is not None: self.interval = now - self.last
        self.last = now
        slow = self.interval < 1e9 and 1.5 - (now - self.t0) < 4 * self.interval
        self.slowed += slow
        time.sleep(0.05 + (self.interval if slow else 0.0))
        x = torch.randint(0, hp.vocab_size, (self.local_tokens + 1,))
        return x[:-1].view(-1, hp.train_seq_len), x[1:].view(-1, hp.train_seq_len)
for trial in range(5):
    m = random_gpt(hp); L = Loader()
    r = t.train(hp, cpu_runtime(), m, m, L, lambda *a, **k: None, lambda *a: None)
    print(f"hazard4 old clock trial {trial}: cap 1500 ms, train_time_ms {r.train_time_ms:.0f} (slow steps {L.slowed}) -> over the cap: {r.train_time_ms > 1500}")

# hazard 5: Hessians under bf16 autocast
hp = tiny_hp(MODEL_DIM=64)
m = random_gpt(hp, seed=2)
rt = cpu_runtime(autocast_dtype=torch.bfloat16)
batches = [torch.randint(0, hp.vocab_size, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
inputs = []
hk = m.blocks[1].mlp.proj.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach().clone()))
H = t.collect_hessians(m, rt, batches)
hk.remove()
x = torch.cat([i.reshape(-1, i.size(-1)) for i in inputs]).double()
want = x.T @ x / x.shape[0]
got = H["blocks.1.mlp.proj.weight"]
print(f"hazard5 old Hessian dtype {got.dtype}; max rel error vs fp64 {((got.double() - want).abs().max() / want.abs().max()).item():.2e}")

# hazard 5: calibration recomputes the prefix
m = random_gpt(tiny_hp())
lengths = []
real = m.logits
m.logits = lambda ids: lengths.append(ids.size(1)) or real(ids)
t.generate_calibration(m, cpu_runtime(), 2, 12, 1.0, seed=0)
print(f"hazard5 old self-generation forward lengths: {lengths} (whole prefix every token)")

# hazard 6: residual stream dtype under bf16 autocast
m = random_gpt(tiny_hp())
seen = []
m.blocks[0].register_forward_hook(lambda mod, a, out: seen.append(a[0].dtype))
with t.autocast(cpu_runtime(autocast_dtype=torch.bfloat16)):
    m(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
print(f"hazard6 old residual stream dtype under bf16 autocast: {seen[0]}")

# a budget above the challenge's cap
hp, _ = t.read_settings({"ARTIFACT_BUDGET_BYTES": "16000001"})
print(f"hole7 old: ARTIFACT_BUDGET_BYTES=16000001 accepted: {hp.artifact_budget_bytes}")

# holes 4 and 9: C3 from labels; fingerprints without the audit
VOCAB, WINDOW = 64, 16
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 200).astype(np.int64)
TABLES = (np.ones(VOCAB, dtype=np.int64), np.zeros(VOCAB, dtype=bool), np.zeros(VOCAB, dtype=bool))
hp = tiny_hp(TTT_ENABLED=1, TTT_CHUNK_TOKENS=40, TTT_EPOCHS=1, TTT_LR=0.05, TTT_LAST_N=1)
m = random_gpt(hp, seed=1)
class NextChunk(t.TestTimeTrainer):
    k = 0
    def adapt(self, chunk):
        a = (self.k + 1) * 40; self.k += 1
        super().adapt(torch.from_numpy(TOKENS)[a:a + chunk.numel()])
ttt = NextChunk(hp, cpu_runtime(), m, m, WINDOW)
calls = []
real_fp = t.weights_fingerprint
t.weights_fingerprint = lambda mod: calls.append(1) or real_fp(mod)
r = t.evaluate(hp, cpu_runtime(), m, TOKENS, TABLES, WINDOW, 8, ttt=ttt)
print(f"hole4 old C3 on a trainer that trains on chunk k+1 after scoring chunk k: {t.audit_score_before_update(r.ttt_events)}")
print(f"hole9 old: weight fingerprints taken without the audit: {len(calls)}")
t.weights_fingerprint = real_fp

# hole 5: C4 from a count; a swap keeps it right
real_sw = t.sliding_windows
def swapped(*a, **k):
    s, f, e = real_sw(*a, **k); f = f.copy(); e = e.copy(); f[-1] -= 1; e[-1] -= 1; return s, f, e
t.sliding_windows = swapped
hp = tiny_hp()
r = t.evaluate(hp, cpu_runtime(), random_gpt(hp, seed=1), TOKENS, TABLES, WINDOW, 8)
t.sliding_windows = real_sw
print(f"hole5 old: one target scored twice and another dropped: targets_scored {r.val_tokens} == expected {TOKENS.size - 1} -> one_pass_ok {r.val_tokens == TOKENS.size - 1}")

# hole 6: C1/C2 at one place
import torch.nn.functional as F
class TailPeek(t.GPT):
    def forward(self, x, y):
        logits = self.logits(x); bonus = torch.zeros_like(logits)
        bonus[:, :-1] = 3.0 * F.one_hot(x[:, 1:], logits.size(-1)).float()
        keep = torch.zeros(logits.size(1), dtype=torch.bool); keep[8:14] = True
        return F.cross_entropy((logits + bonus * keep[None, :, None]).flatten(0, 1), y.reshape(-1), reduction="none").view_as(y)
hp = tiny_hp(); base = random_gpt(hp, seed=1); tp = TailPeek(hp); tp.load_state_dict(base.state_dict()); tp.eval()
print(f"hole6 old C1 on a model that peeks in the scored tail: {t.audit_causality(cpu_runtime(), tp, TOKENS, WINDOW, seed=0)}")
class TailUnnormalized(t.GPT):
    def forward(self, x, y):
        nll = F.cross_entropy(self.logits(x).flatten(0, 1), y.reshape(-1), reduction="none").view_as(y)
        keep = torch.zeros(nll.size(1), dtype=torch.bool); keep[32:] = True
        return torch.where(keep[None, :], nll + 0.1, nll)
tu = TailUnnormalized(hp); tu.load_state_dict(base.state_dict()); tu.eval()
print(f"hole6 old C2 on a model unnormalized past position 32 of a 64-token window (the old check: the stream's first "
      f"16 positions): {t.audit_normalization(cpu_runtime(), tu, TOKENS, VOCAB)}")
