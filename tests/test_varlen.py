"""Document-isolated attention on CUDA (flash_attn_varlen_func) must fit: FA3's backward sizes its accumulators by
the number of cu_seqlens entries (hopper/flash_api.cpp, mha_bwd), so a cu_seqlens padded to one entry per token
(B*T + 1, the code before the bounded capacity) asks ~49 GiB per attention backward at 48 x 2,048 on top of the
run's ~41 GiB. A strict stand-in for the kernel models that sizing and refuses such a call; every varlen forward
of training, evaluation and TTT (whole-model and per-document LoRA with its phases) runs through it here, at a
2,048-token row where the bounded capacity and the old one differ as they do at full scale."""

import numpy as np
import pytest
import torch

import train_gpt
from _helpers import cpu_runtime, random_gpt, tiny_hp
from test_model import cuda_autocast_rms_norm, strict_flash_attn_func, strict_varlen_func

FA3_ALLOWANCE = 4.0      # the stand-in refuses accumulators above 4x those of one segment per row
fa3_backward_accumulator_bytes = train_gpt.fa3_backward_bytes     # FA3's sizing, as the memory projection models it


class FA3StandIn:
    """strict_varlen_func (dtype, layout, cu_seqlens checks; attention segment by segment) that also models FA3's
    backward buffers for every call and refuses one whose accumulators pass FA3_ALLOWANCE x those of the same
    tokens cut into one segment per row (max_seqlen rows). Records each call's entries."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        total, heads, head_dim = q.shape
        rows = -(-total // max_seqlen_q)
        asked = fa3_backward_accumulator_bytes(total, cu_seqlens_q.numel(), heads, k.shape[1], head_dim)
        dense = fa3_backward_accumulator_bytes(total, rows + 1, heads, k.shape[1], head_dim)
        self.calls.append(cu_seqlens_q.numel())
        if asked > FA3_ALLOWANCE * dense:
            raise RuntimeError(f"FA3 stand-in: cu_seqlens of {cu_seqlens_q.numel()} entries for {total} tokens asks "
                               f"{asked / 2**20:.1f} MiB of backward accumulators, {asked / dense:.0f}x one segment "
                               f"per row ({rows} rows)")
        return strict_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)


def test_the_accumulators_at_the_run_shape():
    """At 48 x 2,048 tokens per rank (786,432 a step on 8 GPUs), heads 8/4 of 64 dims: the base capacity costs
    under 1 GiB per attention backward; one entry per token (98,305) ~49 GiB. The bound stays with data: a batch of
    FineWeb's average documents (~3.5 segments per row) fits the base capacity, a batch of 40-token documents
    takes a larger, rare one (counted, never silent)."""
    rows, T = 48, 2048
    base = train_gpt.varlen_capacity(rows, T, rows * 4)
    assert base == rows * train_gpt.VARLEN_SEGMENTS_PER_ROW + 1 == 769
    ours = fa3_backward_accumulator_bytes(rows * T, base, 8, 4, 64)
    old = fa3_backward_accumulator_bytes(rows * T, rows * T + 1, 8, 4, 64)
    assert ours < 2**30 and old > 48 * 2**30, (ours / 2**30, old / 2**30)
    train_gpt.VARLEN_OVERFLOWS.clear()
    assert train_gpt.varlen_capacity(rows, T, rows * T // 40) == 2 * (rows * 16) * 2 + 1 == 3073
    assert train_gpt.VARLEN_OVERFLOWS == {(rows, T, 3073): 1}
    assert train_gpt.varlen_capacity(1, 8, 8) == 9                  # never past one segment per token
    train_gpt.VARLEN_OVERFLOWS.clear()


def test_a_capacity_below_the_segments_poisons_the_output(monkeypatch):
    """A caller that counted wrong (capacity below the batch's segments) must not get attention across documents:
    the output is NaN, never silently wrong."""
    hp = tiny_hp(BIGRAM_VOCAB=0)
    model = random_gpt(hp, seed=2)
    x = torch.randint(2, hp.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    x[0, [0, 5, 9]] = train_gpt.BOS_ID
    cuda_autocast_rms_norm(monkeypatch)
    monkeypatch.setattr(train_gpt, "FLASH_VARLEN_FUNC", strict_varlen_func)
    model.set_attention_backend("flash")
    with torch.no_grad(), train_gpt.autocast(cpu_runtime(autocast_dtype=torch.bfloat16)):
        assert torch.isfinite(model.logits(x, None, train_gpt.capacity_of(x))).all()
        assert torch.isnan(model.logits(x, None, 3)).all()
        with pytest.raises(RuntimeError, match="cu_seqlens capacity"):
            model.logits(x)


# --- every call site through the stand-in, at rows of 2,048 --------------------------------------------------

T = 2048
VOCAB = 64


def documents(n: int, seed: int, longest: int = 3000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, VOCAB, n).astype(np.int64)
    p = 0
    while p < n:
        tokens[p] = train_gpt.BOS_ID
        p += int(rng.integers(40, longest))
    return tokens


def flash_setup(monkeypatch, old_capacity: bool):
    """The flash path on the CPU through the FA3 stand-in; with old_capacity, cu_seqlens of one entry per token (as
    before the bounded capacity)."""
    stand_in = FA3StandIn()
    cuda_autocast_rms_norm(monkeypatch)
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", strict_flash_attn_func)
    monkeypatch.setattr(train_gpt, "FLASH_VARLEN_FUNC", stand_in)
    if old_capacity:
        monkeypatch.setattr(train_gpt, "varlen_capacity", lambda rows, seq_len, segments=0: rows * seq_len + 1)
    return stand_in


def tiny_long_hp(**overrides):
    return tiny_hp(TRAIN_SEQ_LEN=T, EVAL_STRIDE=512, TRAIN_BATCH_TOKENS=2 * T, VAL_BATCH_SIZE=2 * T, BIGRAM_VOCAB=0,
                   TTT_LORA_CHUNK=512, TTT_LORA_BATCH_TOKENS=2 * T, TTT_CHUNK_TOKENS=2 * T, TTT_LORA_RANK=4,
                   **overrides)


class Batches:
    grad_accum, local_tokens = 1, 2 * T

    def __init__(self, tokens):
        self.tokens = tokens

    def batch(self, step, micro):
        span = self.tokens[step * self.local_tokens:(step + 1) * self.local_tokens + 1]
        x = torch.from_numpy(span[:-1]).view(-1, T)
        return x, torch.from_numpy(span[1:]).view(-1, T), train_gpt.varlen_capacity(2, T, train_gpt.count_segments(x.numpy()))


def run_site(site: str, monkeypatch, old_capacity: bool) -> FA3StandIn:
    stand_in = flash_setup(monkeypatch, old_capacity)
    rt = cpu_runtime(autocast_dtype=torch.bfloat16)
    tables = (np.ones(VOCAB, dtype=np.int64), np.zeros(VOCAB, dtype=bool), np.zeros(VOCAB, dtype=bool))
    if site == "training":
        hp = tiny_long_hp(ITERATIONS=2, MAX_WALLCLOCK_SECONDS=0, COMPILE_WARMUP_STEPS=0)
        model = random_gpt(hp, seed=1).train()
        model.set_attention_backend("flash")
        train_gpt.train(hp, rt, model, model, Batches(documents(4 * T + 1, 1)), lambda *a, **k: None,
                        lambda *a: None)
        return stand_in
    tokens = documents(3 * T, 2)
    if site == "evaluation":
        hp = tiny_long_hp(TTT_ENABLED=0)
        model = random_gpt(hp, seed=1)
        model.set_attention_backend("flash")
        train_gpt.evaluate(hp, rt, model, tokens, tables, T, hp.eval_stride, mode="documents")
    elif site == "whole-model TTT":
        hp = tiny_long_hp(TTT_METHOD="whole", TTT_EPOCHS=1)
        model = random_gpt(hp, seed=1)
        model.set_attention_backend("flash")
        ttt = train_gpt.TestTimeTrainer(hp, rt, model, model, T)
        train_gpt.evaluate(hp, rt, model, tokens, tables, T, hp.eval_stride, ttt=ttt, mode="documents")
    else:                                                  # LoRA TTT with a global phase
        hp = tiny_long_hp(TTT_PHASES=1, TTT_PHASE_DOCS_FRAC=0.5)
        model = random_gpt(hp, seed=1)
        model.set_attention_backend("flash")
        ttt = train_gpt.LoRATestTimeTrainer(hp, rt, model, model, T)
        train_gpt.evaluate_lora_ttt(hp, rt, ttt, tokens, tables, T, hp.eval_stride)
        assert ttt.phases_done == 1 and ttt.steps > 0
    return stand_in


SITES = ["training", "evaluation", "whole-model TTT", "LoRA TTT"]


@pytest.mark.parametrize("site", SITES)
def test_every_varlen_forward_keeps_fa3_bounded(site, monkeypatch):
    """Training steps, the documents evaluation, whole-model TTT and LoRA TTT with a phase: every call passes the
    stand-in, with a bounded capacity (at most 16 segments a row here, as in the run)."""
    stand_in = run_site(site, monkeypatch, old_capacity=False)
    assert stand_in.calls and max(stand_in.calls) <= 2 * train_gpt.VARLEN_SEGMENTS_PER_ROW + 1


@pytest.mark.parametrize("site", SITES)
def test_one_entry_per_token_is_refused_everywhere(site, monkeypatch):
    """The same calls with cu_seqlens of one entry per token (the sizing before): the stand-in refuses each."""
    with pytest.raises(RuntimeError, match="FA3 stand-in"):
        run_site(site, monkeypatch, old_capacity=True)
