"""Self-audit (EVAL_AUDIT=1): each check passes on the real model and evaluator, and FAILS on one broken
the way the check guards against: C1 causality (a non-causal attention, a one-step leak, a model that
reads its own target through the next input), C2 normalization (scores that are not -log softmax over
the whole vocabulary), C3 score before update (train-then-score TTT, re-scoring, weights changed while
scoring), C4 one pass (targets dropped or scored twice), and the training-data deadline."""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train_gpt
from _helpers import cpu_runtime, random_gpt, tiny_hp, train_then_score

VOCAB = 64
WINDOW = 16
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 200).astype(np.int64)
TABLES = (np.ones(VOCAB, dtype=np.int64), np.zeros(VOCAB, dtype=bool), np.zeros(VOCAB, dtype=bool))


@pytest.fixture(scope="module")
def hp():
    return tiny_hp()


@pytest.fixture(scope="module")
def model(hp):
    return random_gpt(hp, seed=1)


def per_token_nll(logits, target_ids):
    return F.cross_entropy(logits.flatten(0, 1), target_ids.reshape(-1), reduction="none").view_as(target_ids)


def copy_of(cls, hp, model):
    broken = cls(hp)
    broken.load_state_dict(model.state_dict())
    return broken.eval()


# --- C1 causality -----------------------------------------------------------------------------

def test_causality_passes_on_the_real_model(model):
    r = train_gpt.audit_causality(cpu_runtime(), model, TOKENS, WINDOW, seed=0)
    assert r["causality_ok"] is True and r["causality_max_abs_dnll"] <= train_gpt.CAUSALITY_TOLERANCE
    assert model.training                                   # handed back in training mode


def leaky_attention(diagonal):
    """causal_attention with a mask that lets position i see positions up to i + diagonal."""
    def attention(q, k, v, backend):
        T = q.size(1)
        mask = torch.ones(T, T, dtype=torch.bool).tril(diagonal=diagonal)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=k.size(2) != q.size(2))
        return y.transpose(1, 2)
    return attention


class PeeksAtItsTarget(train_gpt.GPT):
    """Position t's logits get a bonus for input t + 1: in a real stream, its own target."""

    def forward(self, input_ids, target_ids):
        logits = self.logits(input_ids)
        bonus = torch.zeros_like(logits)
        bonus[:, :-1] = 3.0 * F.one_hot(input_ids[:, 1:], logits.size(-1)).float()
        return per_token_nll(logits + bonus, target_ids)


class ReadsALaterTarget(train_gpt.GPT):
    """Position t's logits get a bonus for the target of position t + 1 (a normalized distribution)."""

    def forward(self, input_ids, target_ids):
        logits = self.logits(input_ids)
        bonus = torch.zeros_like(logits)
        bonus[:, :-1] = 3.0 * F.one_hot(target_ids[:, 1:], logits.size(-1)).float()
        return per_token_nll(logits + bonus, target_ids)


@pytest.mark.parametrize("leak", ["no_mask", "one_step_mask_one_layer", "peeks_at_its_target",
                                  "reads_a_later_target"])
def test_causality_fails_on_a_leaky_model(monkeypatch, hp, model, leak):
    if leak == "no_mask":
        monkeypatch.setattr(train_gpt, "causal_attention", leaky_attention(WINDOW))
        broken = model
    elif leak == "one_step_mask_one_layer":
        # one layer, one step: position t sees input t + 1 (its own target) and nothing further
        monkeypatch.setattr(train_gpt, "causal_attention", leaky_attention(1))
        broken = random_gpt(tiny_hp(NUM_LAYERS=1, RECUR_LAYERS=""), seed=3)
    elif leak == "peeks_at_its_target":
        broken = copy_of(PeeksAtItsTarget, hp, model)
    else:
        broken = copy_of(ReadsALaterTarget, hp, model)
    r = train_gpt.audit_causality(cpu_runtime(), broken, TOKENS, WINDOW, seed=0)
    assert r["causality_ok"] is False and r["causality_max_abs_dnll"] > 100 * train_gpt.CAUSALITY_TOLERANCE


def test_a_target_peeking_model_is_normalized_and_scores_better(hp, model):
    """Why C1 must catch the peek: it is a proper distribution (C2 passes) and it lowers the score."""
    broken = copy_of(PeeksAtItsTarget, hp, model)
    assert train_gpt.audit_normalization(cpu_runtime(), broken, TOKENS, VOCAB)["normalization_ok"] is True
    honest = train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, 8).val_loss
    assert train_gpt.evaluate(hp, cpu_runtime(), broken, TOKENS, TABLES, WINDOW, 8).val_loss < honest - 0.5


# --- C2 normalization -------------------------------------------------------------------------

def test_normalization_passes_on_the_real_model(model):
    r = train_gpt.audit_normalization(cpu_runtime(), model, TOKENS, VOCAB)
    assert r["normalization_ok"] is True and r["normalization_max_abs_dev"] <= 1e-5
    assert model.training


class Unnormalized(train_gpt.GPT):
    kind = ""

    def forward(self, input_ids, target_ids):
        logits = self.logits(input_ids)
        nll = per_token_nll(logits, target_ids)
        if self.kind == "plus_0.1":
            return nll + 0.1
        if self.kind == "scaled":
            return 0.9 * nll
        if self.kind == "raw_logit":                            # -logit[target]: no normalizer at all
            return -logits.gather(-1, target_ids[..., None])[..., 0]
        if self.kind == "target_temperature":                  # the target's logit sharpened, the rest not
            return torch.logsumexp(logits, -1) - 1.5 * logits.gather(-1, target_ids[..., None])[..., 0]
        raise ValueError(self.kind)


@pytest.mark.parametrize("kind", ["plus_0.1", "scaled", "raw_logit", "target_temperature"])
def test_normalization_fails_on_an_unnormalized_score(hp, model, kind):
    broken = copy_of(type(kind, (Unnormalized,), {"kind": kind}), hp, model)
    r = train_gpt.audit_normalization(cpu_runtime(), broken, TOKENS, VOCAB)
    assert r["normalization_ok"] is False and r["normalization_max_abs_dev"] > 100 * train_gpt.NORMALIZATION_TOLERANCE
    # the causality check does not see it (it is causal): C2 is the check that must
    assert train_gpt.audit_causality(cpu_runtime(), broken, TOKENS, WINDOW, seed=0)["causality_ok"] is True


class ExtraMassPastIdx512(train_gpt.GPT):
    """Normalized over ids < 512; ids >= 512 get more probability than the softmax gives them."""

    def forward(self, input_ids, target_ids):
        nll = per_token_nll(self.logits(input_ids), target_ids)
        return torch.where(target_ids >= 512, nll - 1.0, nll)


def test_normalization_covers_the_whole_vocabulary():
    """Vocab 600 is scored in blocks of 512 candidates: the second block counts too."""
    hp = tiny_hp(VOCAB_SIZE=600)
    model = random_gpt(hp, seed=4)
    tokens = np.random.default_rng(1).integers(0, 600, 100).astype(np.int64)
    assert train_gpt.audit_normalization(cpu_runtime(), model, tokens, 600)["normalization_ok"] is True
    broken = copy_of(ExtraMassPastIdx512, hp, model)
    assert train_gpt.audit_normalization(cpu_runtime(), broken, tokens, 600)["normalization_ok"] is False


# --- C3 score before update ---------------------------------------------------------------------

def ttt_setup(**overrides):
    settings = dict(TTT_ENABLED=1, TTT_CHUNK_TOKENS=40, TTT_EPOCHS=1, TTT_LR=0.05, TTT_LAST_N=1)
    settings.update(overrides)
    hp = tiny_hp(**settings)
    model = random_gpt(hp, seed=1)
    return hp, model, train_gpt.TestTimeTrainer(hp, cpu_runtime(), model, model, WINDOW)


def test_score_before_update_passes_on_real_ttt():
    hp, model, ttt = ttt_setup()
    r = train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, 8, ttt=ttt)
    audit = train_gpt.audit_score_before_update(r.ttt_events)
    assert audit == {"score_before_update_ok": True, "ttt_chunks": 5}          # 199 targets / 40
    assert any(before != after for event, _, before, after in r.ttt_events if event == "train")
    assert train_gpt.audit_score_before_update(None) == {"score_before_update_ok": True, "ttt_chunks": 0}


def test_score_before_update_fails_on_train_then_score_ttt(monkeypatch):
    monkeypatch.setattr(train_gpt, "ttt_schedule", train_then_score)
    hp, model, ttt = ttt_setup()
    r = train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, 8, ttt=ttt)
    assert r.val_tokens == TOKENS.size - 1                     # every target scored once: C4 cannot see it
    assert [e[:2] for e in r.ttt_events][:3] == [("train", 0), ("score", 0), ("train", 1)]
    assert train_gpt.audit_score_before_update(r.ttt_events)["score_before_update_ok"] is False


class NudgesWhileScoring(nn.Module):
    """A run_model that changes a weight whenever it scores (no grad): a cache updated by scoring."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, target_ids):
        if not torch.is_grad_enabled():
            with torch.no_grad():
                self.model.skip_weights.add_(1e-3)
        return self.model(input_ids, target_ids)


def test_score_before_update_fails_when_scoring_changes_the_weights():
    hp, model, _ = ttt_setup()
    wrapped = NudgesWhileScoring(model)
    ttt = train_gpt.TestTimeTrainer(hp, cpu_runtime(), model, wrapped, WINDOW)
    r = train_gpt.evaluate(hp, cpu_runtime(), wrapped, TOKENS, TABLES, WINDOW, 8, ttt=ttt)
    assert train_gpt.audit_score_before_update(r.ttt_events)["score_before_update_ok"] is False


@pytest.mark.parametrize("events,ok", [
    ([("score", 0, 1.0, 1.0), ("train", 0, 1.0, 2.0), ("score", 1, 2.0, 2.0)], True),
    ([("train", 0, 1.0, 2.0), ("score", 0, 2.0, 2.0)], False),                           # trained before scored
    ([("score", 0, 1.0, 1.0), ("train", 1, 1.0, 2.0), ("score", 1, 2.0, 2.0)], False),  # a later chunk first
    ([("score", 0, 1.0, 1.0), ("train", 0, 1.0, 2.0), ("score", 0, 2.0, 2.0)], False),  # re-scored after training
    ([("score", 0, 1.0, 1.0), ("score", 1, 1.0, 1.5)], False),                           # scoring moved the weights
    ([("score", 0, 1.0, 1.0), ("train", 1, 1.0, 2.0)], False),                           # a chunk never scored
])
def test_score_before_update_on_hand_made_event_lists(events, ok):
    assert train_gpt.audit_score_before_update(events)["score_before_update_ok"] is ok


# --- C4 one pass --------------------------------------------------------------------------------

def test_one_pass_holds_on_the_real_evaluator(hp, model):
    r = train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, 8, collect=True)
    assert r.val_tokens == TOKENS.size - 1 and r.nll.shape == (TOKENS.size - 1,)


@pytest.mark.parametrize("how", ["drop_the_tail", "drop_the_first", "score_one_twice"])
def test_one_pass_fails_when_targets_are_dropped_or_rescored(monkeypatch, hp, model, how):
    real = train_gpt.sliding_windows

    def broken(*args, **kwargs):
        starts, score_from, score_to = real(*args, **kwargs)
        if how == "drop_the_tail":
            return starts[:-1], score_from[:-1], score_to[:-1]
        if how == "drop_the_first":
            return starts[1:], score_from[1:], score_to[1:]
        return (np.append(starts, starts[-1]), np.append(score_from, score_from[-1]),
                np.append(score_to, score_to[-1]))

    monkeypatch.setattr(train_gpt, "sliding_windows", broken)
    with pytest.raises(RuntimeError, match=rf"scored \d+ targets, expected {TOKENS.size - 1}"):
        train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, 8)


# --- no training data after the deadline ----------------------------------------------------------

class SlowLoader:
    """A stand-in DistributedTokenLoader: random batches, each read taking `delay` seconds."""

    def __init__(self, hp, delay):
        self.grad_accum, self.local_tokens, self.delay = 1, 2 * hp.train_seq_len, delay
        self.hp, self.last_read_end = hp, None

    def batch(self, step, micro):
        time.sleep(self.delay)
        g = torch.Generator().manual_seed(step)
        t = torch.randint(0, self.hp.vocab_size, (self.local_tokens + 1,), generator=g)
        self.last_read_end = time.perf_counter()
        return t[:-1].view(-1, self.hp.train_seq_len), t[1:].view(-1, self.hp.train_seq_len)


def run_train(hp, delay):
    model = random_gpt(hp, seed=0)
    loader = SlowLoader(hp, delay)
    seen = {}

    def validate(step, train_ms):
        seen.update(at=time.perf_counter(), train_ms=train_ms)

    result = train_gpt.train(hp, cpu_runtime(), model, model, loader, lambda *a, **k: None, validate)
    return result, loader, seen


def test_last_training_read_is_timed():
    """train_data_last_read_ms is the training clock right after the last batch was read and used:
    no earlier than the last read, no later than the end of training."""
    hp = tiny_hp(ITERATIONS=4, MAX_WALLCLOCK_SECONDS=0, COMPILE_WARMUP_STEPS=0, VAL_LOSS_EVERY=0)
    result, loader, seen = run_train(hp, delay=0.05)
    assert result.steps == 4 and result.train_time_ms >= 4 * 50
    assert 0 < result.train_data_last_read_ms <= result.train_time_ms == seen["train_ms"]
    gap_ms = 1e3 * (seen["at"] - loader.last_read_end)        # last read .. final validation, wall clock
    assert result.train_time_ms - result.train_data_last_read_ms <= gap_ms + 1.0
    assert result.train_data_last_read_ms >= 4 * 50 - 1.0       # after all four 50 ms reads


def test_a_read_past_the_deadline_is_flagged(demo_data, tmp_path, monkeypatch):
    """A step whose read takes longer than the whole cap: the loop stops, and the summary keys say
    training data was read after the deadline; with a cap that is not reached they say it was not."""
    monkeypatch.chdir(tmp_path)
    vocab = demo_data["vocab"]
    common = dict(VOCAB_SIZE=vocab, DATA_PATH=demo_data["dir"], TOKENIZER_PATH=demo_data["tokenizer"],
                  TRAIN_BATCH_TOKENS=8 * 32, TRAIN_SEQ_LEN=32, EVAL_STRIDE=16, ITERATIONS=3, COMPILE_WARMUP_STEPS=0,
                  VAL_LOSS_EVERY=0, LZMA_PRESET=0, GPTQ_CALIB_SEQS=2, GPTQ_CALIB_LEN=16)
    val = train_gpt.load_validation_tokens(str(demo_data["dir"]), vocab, 300)
    tables = train_gpt.build_bpb_tables(str(demo_data["tokenizer"]), vocab)
    real_batch = train_gpt.DistributedTokenLoader.batch
    out = {}
    for name, cap, delay in (("late", 0.2, 0.5), ("in_time", 300.0, 0.0)):
        hp = tiny_hp(MAX_WALLCLOCK_SECONDS=cap, **common)

        def slow_batch(self, step, micro, delay=delay):
            time.sleep(delay)
            return real_batch(self, step, micro)

        monkeypatch.setattr(train_gpt.DistributedTokenLoader, "batch", slow_batch)
        model = random_gpt(hp, seed=0)
        out[name] = train_gpt.train_and_export(hp, cpu_runtime(), name, model, model, val, tables,
                                               lambda *a, **k: None)
    late, in_time = out["late"], out["in_time"]
    assert late["stopped_early"] and late["steps"] == 1
    assert late["train_deadline_ms"] == 200.0 and late["train_data_last_read_ms"] > 500.0
    assert late["train_data_read_after_deadline"] is True
    assert in_time["train_deadline_ms"] == 300e3 and in_time["steps"] == 3
    assert 0 < in_time["train_data_last_read_ms"] < 300e3 and in_time["train_data_read_after_deadline"] is False
