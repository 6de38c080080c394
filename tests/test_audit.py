"""Self-audit (EVAL_AUDIT=1). C1 causality, rows independent and C2 normalization run inside the final evaluation
(ForwardAudit) on batches it has just scored, through the forward that scored them: every check passes on the real
model and evaluators in every mode (sliding or documents windows; TTT off, whole-model or per-document LoRA), the
probe changes nothing, and each check FAILS on a forward broken the way it guards against: C1 (a non-causal
attention, a one-step leak, a model that reads its own target through the next input, a leak only in the scored
tail or only past the stream's first window, a LoRA adapter that reads the next position, a model that reads other
documents), rows independent (a forward or a LoRA adapter that reads another row), C2 (scores that are not -log
softmax over the whole vocabulary, anywhere in a row; an unnormalized LoRA path), and the scoring forward (an audit
that checks another forward than the one that scored: without the adapters, with the adapters after their step, an
honest model while a peeking one scored). Then C3 score before update (from the positions TTT actually trained
on), C4 one pass (from a per-position count) and the training-data deadline."""

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import train_gpt
from _helpers import cpu_runtime, documents_stream, random_gpt, tiny_hp, train_then_score

VOCAB = 64
WINDOW = 16
STRIDE = 8
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 200).astype(np.int64)
TABLES = (np.ones(VOCAB, dtype=np.int64), np.zeros(VOCAB, dtype=bool), np.zeros(VOCAB, dtype=bool))   # 1 byte a token
FORWARD_CHECKS = ("scoring_forward_ok", "causality_ok", "rows_independent_ok", "normalization_ok")


DOCUMENTS = documents_stream()


def windows_hp(mode="sliding", ttt=False, **overrides):
    """Scoring by windows of `mode`, with whole-model TTT (5 chunks of 40 targets) or without."""
    settings = dict(VAL_BATCH_SIZE=64, EVAL_MODE=mode, TTT_METHOD="whole", TTT_ENABLED=int(ttt), TTT_CHUNK_TOKENS=40,
                    TTT_EPOCHS=1, TTT_LR=0.05, TTT_LAST_N=1)
    return tiny_hp(**dict(settings, **overrides))


def lora_hp(**overrides):
    """Per-document LoRA TTT: 3 rows of the 16-token window, chunks of 5 targets, one global phase halfway."""
    settings = dict(EVAL_MODE="documents", TTT_ENABLED=1, TTT_METHOD="lora", TTT_LORA_RANK=4, TTT_LORA_LR=0.01,
                    TTT_LORA_CHUNK=5, TTT_LORA_BATCH_TOKENS=48, TTT_PHASES=1, TTT_PHASE_DOCS_FRAC=0.5,
                    TTT_CHUNK_TOKENS=32, VAL_BATCH_SIZE=64)
    return tiny_hp(**dict(settings, **overrides))


@pytest.fixture(scope="module")
def hp():
    return windows_hp()


@pytest.fixture(scope="module")
def model(hp):
    return random_gpt(hp, seed=1)


def audited_windows(hp, run_model, tokens=TOKENS, ttt=None, probe_cls=train_gpt.ForwardAudit, collect=False):
    """evaluate() in hp's EVAL_MODE with the probe: (EvalResult, the probe's compliance keys)."""
    probe = probe_cls(hp, cpu_runtime())
    tables = tuple(np.resize(t, hp.vocab_size) for t in TABLES)
    r = train_gpt.evaluate(hp, cpu_runtime(), run_model, tokens, tables, WINDOW, STRIDE, ttt=ttt, audit=True,
                           mode=hp.eval_mode, probe=probe, collect=collect)
    return r, probe.result()


def audited_lora(hp, model, tokens=DOCUMENTS, probe_cls=train_gpt.ForwardAudit):
    """evaluate_lora_ttt() with the probe (None: without): (EvalResult, compliance keys or None, the trainer)."""
    trainer = train_gpt.LoRATestTimeTrainer(hp, cpu_runtime(), model, model, WINDOW)
    probe = probe_cls(hp, cpu_runtime()) if probe_cls else None
    r = train_gpt.evaluate_lora_ttt(hp, cpu_runtime(), trainer, tokens, TABLES, WINDOW, STRIDE, collect=True,
                                    audit=True, probe=probe)
    return r, probe.result() if probe else None, trainer


def points(c):
    """Batches the audit checked, by forward (windows, LoRA steps)."""
    return {k: c["audit_counts"][k] for k in ("windows", "lora")}


def per_token_nll(logits, target_ids):
    return F.cross_entropy(logits.flatten(0, 1), target_ids.reshape(-1), reduction="none").view_as(target_ids)


def copy_of(cls, hp, model):
    broken = cls(hp)
    broken.load_state_dict(model.state_dict())
    return broken.eval()


# --- every check passes on the real model and evaluators, and the probe changes nothing ---------------------------

EVALUATIONS = {"sliding": lambda: windows_hp("sliding"), "sliding, whole-model TTT": lambda: windows_hp("sliding", True),
               "documents": lambda: windows_hp("documents"),
               "documents, whole-model TTT": lambda: windows_hp("documents", True), "documents, LoRA TTT": lora_hp}


@pytest.mark.parametrize("evaluation", list(EVALUATIONS))
def test_every_check_passes_on_the_real_evaluators(evaluation):
    """On the CPU in fp32 the forward run twice, or in other rows, rounds alike: every difference is exactly 0 and
    the tolerances are the bare ones."""
    hp = EVALUATIONS[evaluation]()
    model = random_gpt(hp, seed=1)
    tokens = TOKENS if hp.eval_mode == "sliding" else DOCUMENTS
    if hp.ttt_method == "lora" and hp.ttt_enabled:
        r, c, trainer = audited_lora(hp, model, tokens)
        assert points(c) == {"windows": 0, "lora": 2}               # before the global phase, and after it
        assert c["audit_counts"]["lora_steps"] == trainer.steps and c["audit_counts"]["trained_rows"] >= 2   # B no longer 0
    else:
        ttt = train_gpt.TestTimeTrainer(hp, cpu_runtime(), model, model, WINDOW) if hp.ttt_enabled else None
        r, c = audited_windows(hp, model, tokens, ttt)
        assert points(c)["lora"] == c["audit_counts"]["lora_steps"] == 0
        assert points(c)["windows"] == 3 or hp.ttt_enabled and points(c)["windows"] >= 1   # the last chunk: 1-2 batches
        assert (c["audit_counts"]["other_documents"] > 0) == (hp.eval_mode == "documents")
    assert all(c[k] is True for k in FORWARD_CHECKS), c
    assert c["audit_max_abs"]["scoring_forward"] == c["audit_max_abs"]["causality"] == c["audit_max_abs"]["rows_independent"] == 0.0
    assert c["audit_max_abs"]["other_documents"] == c["audit_max_abs"]["noise_same_rows"] == 0.0
    assert c["causality_tolerance"] == train_gpt.CAUSALITY_TOLERANCE and c["audit_max_abs"]["normalization"] < 1e-5
    assert c["audit_counts"]["c2_windows"] + c["audit_counts"]["c2_lora"] == 1                                     # the whole vocabulary, once per forward
    c3, c4 = train_gpt.audit_score_before_update(r.evidence, hp.ttt_enabled), train_gpt.audit_one_pass(r.evidence)
    assert c3["score_before_update_ok"] is True and c4["one_pass_ok"] is True


def state_of(model, trainer=None):
    tensors = [p.detach().clone() for p in model.parameters()]
    if isinstance(trainer, train_gpt.LoRATestTimeTrainer):
        tensors += [t.clone() for t in (trainer.lora.weights.detach(), trainer.opt.m, trainer.opt.v, trainer.opt.steps)]
    elif trainer is not None:
        tensors += [s["momentum_buffer"].clone() for s in trainer.opt.state.values()]
    return tensors


@pytest.mark.parametrize("evaluation", ["documents, whole-model TTT", "documents, LoRA TTT"])
def test_the_probe_changes_nothing(evaluation):
    """The same evaluation with and without the probe: the same NLL for every target, bit for bit, the same coverage,
    and the same weights, adapters and optimizer state at the end."""
    hp = EVALUATIONS[evaluation]()
    runs = []
    for probe_cls in (None, train_gpt.ForwardAudit):
        model = random_gpt(hp, seed=1)
        if hp.ttt_method == "lora":
            r, c, trainer = audited_lora(hp, model, probe_cls=probe_cls)
        else:
            trainer = train_gpt.TestTimeTrainer(hp, cpu_runtime(), model, model, WINDOW)
            probe = probe_cls(hp, cpu_runtime()) if probe_cls else None
            r = train_gpt.evaluate(hp, cpu_runtime(), model, DOCUMENTS, TABLES, WINDOW, STRIDE, ttt=trainer,
                                   collect=True, audit=True, mode="documents", probe=probe)
            c = probe.result() if probe else None
        runs.append((r, c, state_of(model, trainer)))
    (plain, _, before), (probed, c, after) = runs
    assert c["causality_ok"] is True and sum(points(c).values()) > 0      # it did audit
    assert np.array_equal(plain.nll, probed.nll) and plain.val_loss == probed.val_loss
    assert torch.equal(plain.evidence.coverage, probed.evidence.coverage)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))


class RecordsBatches(train_gpt.ForwardAudit):
    """Records the weights' fingerprint and the first window start of each batch it is shown."""
    seen = []

    def batch(self, run_model, x, y, capacity, nll, mask):
        RecordsBatches.seen.append((train_gpt.weights_fingerprint(run_model), x[:, :1].clone()))
        super().batch(run_model, x, y, capacity, nll, mask)


@pytest.mark.parametrize("ttt", [False, True])
def test_the_batches_audited(ttt):
    """The first, middle and last batch of evaluate()'s last scoring call: without TTT its only one, with whole-model
    TTT the last chunk's, scored by weights every trained chunk has changed."""
    RecordsBatches.seen = []
    hp = windows_hp("sliding", ttt)
    model = random_gpt(hp, seed=1)
    start = train_gpt.weights_fingerprint(model)
    trainer = train_gpt.TestTimeTrainer(hp, cpu_runtime(), model, model, WINDOW) if ttt else None
    audited_windows(hp, model, ttt=trainer, probe_cls=RecordsBatches)
    assert len(RecordsBatches.seen) == (2 if ttt else 3)            # the last chunk's 2 batches; the first, middle, last
    assert all(torch.equal(f, start) != ttt for f, _ in RecordsBatches.seen)
    assert trainer is None or trainer.chunks_trained == 4                   # 5 chunks of 40 targets


class CountsLoRASteps(train_gpt.ForwardAudit):
    """Records which steps it audits, with the rows' chunk index and the adapters' B."""
    seen = []

    def lora_step(self, ttt, tokens, step, meta, nll, mask, targets):
        b_part = ttt.lora.a_bound == 0
        b_norm = (self.before * b_part).abs().sum(dim=1)
        CountsLoRASteps.seen.append((ttt.steps, step.fresh.copy(), step.valid.copy(), b_norm))
        super().lora_step(ttt, tokens, step, meta, nll, mask, targets)


def test_lora_steps_are_audited_with_trained_adapters():
    """The LoRA steps audited hold rows that have trained on their document (B not 0) and come one in each stretch
    between global phases, the first such step of it."""
    CountsLoRASteps.seen = []
    hp = lora_hp()
    _, c, trainer = audited_lora(hp, random_gpt(hp, seed=1), probe_cls=CountsLoRASteps)
    assert len(CountsLoRASteps.seen) == 2 and c["audit_counts"]["trained_rows"] >= 2
    for _, fresh, valid, b_norm in CountsLoRASteps.seen:
        trained = (valid > 0) & ~fresh
        assert trained.any() and (b_norm[torch.from_numpy(trained)] > 0).all()
    assert CountsLoRASteps.seen[0][0] == 1          # the first step after the rows' first chunk


def test_an_audit_that_audited_nothing_certifies_nothing():
    """No batch shown: every forward check fails. LoRA steps scored but none audited (every document within one chunk,
    so no adapter ever trained before it scored): they fail too, the LoRA forward was never checked."""
    hp = lora_hp()
    assert not any(train_gpt.ForwardAudit(hp, cpu_runtime()).result()[k] for k in FORWARD_CHECKS)
    short = documents_stream(longest=hp.ttt_lora_chunk)
    _, c, trainer = audited_lora(hp, random_gpt(hp, seed=1), short)
    assert trainer.steps > 0 and c["audit_counts"]["lora_steps"] == trainer.steps and points(c)["lora"] == 0
    assert not any(c[k] for k in FORWARD_CHECKS)


class FlashCapacity(nn.Module):
    """The flash-attention varlen path's hazard on the CPU: a batch holding more segments (count_segments) than its
    cu_seqlens capacity has room for comes back poisoned with NaN (causal_attention's overflow)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        nll = self.model(input_ids, target_ids, capacity, lora)
        over = train_gpt.count_segments(input_ids.numpy()) > capacity - 1
        return nll + float("nan") if over else nll


def test_the_audit_keeps_to_the_batch_varlen_capacity(monkeypatch):
    """C2 repeats one row in every row of the batch: a row of several documents repeated can hold more segments than
    the capacity the batch was counted at (on a GPU: NaN, C2 fails an honest model). It takes a row that fits. The
    stream: eight documents of 3 tokens (the first row of the first batch holds six), then documents of 30; one segment
    a row of base capacity, so the capacity is what the batches hold (the first, 12 segments: room for 16)."""
    monkeypatch.setattr(train_gpt, "VARLEN_SEGMENTS_PER_ROW", 1)
    monkeypatch.setattr(train_gpt, "VARLEN_OVERFLOWS", {})
    hp = windows_hp("documents")
    tokens = np.random.default_rng(5).integers(2, VOCAB, 200)
    tokens[np.r_[0:24:3, 24:200:30]] = train_gpt.BOS_ID
    r, c = audited_windows(hp, FlashCapacity(random_gpt(hp, seed=1)), tokens)
    assert np.isfinite(r.val_loss) and all(c[k] is True for k in FORWARD_CHECKS), c
    assert c["audit_counts"]["c2_windows"] + c["audit_counts"]["c2_lora"] == 1 and c["audit_counts"]["other_documents"] > 0


# --- C1 causality ---------------------------------------------------------------------------------------------

def leaky_attention(diagonal):
    """causal_attention with a mask that lets position i see positions up to i + diagonal."""
    def attention(q, k, v, backend, varlen=None):       # varlen ignored: it leaks across documents too
        T = q.size(1)
        mask = torch.ones(T, T, dtype=torch.bool).tril(diagonal=diagonal)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=k.size(2) != q.size(2))
        return y.transpose(1, 2)
    return attention


class PeeksAtItsTarget(train_gpt.GPT):
    """Position t's logits get a bonus for input t + 1 (in a real stream, its own target) at the positions
    in `where` (default: all but the last)."""
    where = slice(0, -1)

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        logits = self.logits(input_ids, None, capacity, lora)
        bonus = torch.zeros_like(logits)
        bonus[:, :-1] = 3.0 * F.one_hot(input_ids[:, 1:], logits.size(-1)).float()
        keep = torch.zeros(logits.size(1), dtype=torch.bool)
        keep[self.where] = True
        return per_token_nll(logits + bonus * keep[None, :, None], target_ids)


class PeeksInTheTail(PeeksAtItsTarget):
    """Peeks only inside the scored tail of a window, and not at its last two positions."""
    where = slice(WINDOW - STRIDE, WINDOW - 2)


class PeeksPastTheFirstWindow(PeeksAtItsTarget):
    """Peeks only when the window does not start where the stream does (an audit of the stream's first window
    alone would pass it)."""

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        honest = train_gpt.GPT.forward(self, input_ids, target_ids, capacity, lora)
        peeking = super().forward(input_ids, target_ids, capacity, lora)
        first = (input_ids[:, :4] == torch.from_numpy(TOKENS[:4])).all(dim=1)
        return torch.where(first[:, None], honest, peeking)


class ReadsALaterTarget(train_gpt.GPT):
    """Position t's logits get a bonus for the target of position t + 1 (a normalized distribution)."""

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        logits = self.logits(input_ids, None, capacity, lora)
        bonus = torch.zeros_like(logits)
        bonus[:, :-1] = 3.0 * F.one_hot(target_ids[:, 1:], logits.size(-1)).float()
        return per_token_nll(logits + bonus, target_ids)


@pytest.mark.parametrize("leak", ["no_mask", "one_step_mask_one_layer", "peeks_at_its_target",
                                  "reads_a_later_target", "peeks_in_the_tail", "peeks_past_the_first_window"])
def test_causality_fails_on_a_leaky_model(monkeypatch, hp, model, leak):
    if leak == "no_mask":
        monkeypatch.setattr(train_gpt, "causal_attention", leaky_attention(WINDOW))
        broken = model
    elif leak == "one_step_mask_one_layer":
        # one layer, one step: position t sees input t + 1 (its own target) and nothing further
        monkeypatch.setattr(train_gpt, "causal_attention", leaky_attention(1))
        broken = random_gpt(windows_hp(NUM_LAYERS=1, RECUR_LAYERS=""), seed=3)
    else:
        cls = {"peeks_at_its_target": PeeksAtItsTarget, "reads_a_later_target": ReadsALaterTarget,
               "peeks_in_the_tail": PeeksInTheTail, "peeks_past_the_first_window": PeeksPastTheFirstWindow}[leak]
        broken = copy_of(cls, hp, model)
    _, c = audited_windows(hp, broken)
    assert c["causality_ok"] is False and c["audit_max_abs"]["causality"] > 100 * train_gpt.CAUSALITY_TOLERANCE
    assert c["scoring_forward_ok"] is True                  # the forward audited is the one that scored


def test_a_target_peeking_model_is_normalized_and_scores_better(hp, model):
    """Why C1 must catch the peek: it is a proper distribution (C2 passes) and it lowers the score."""
    broken = copy_of(PeeksAtItsTarget, hp, model)
    peeking, c = audited_windows(hp, broken)
    assert c["normalization_ok"] is True and c["causality_ok"] is False
    assert peeking.val_loss < train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, STRIDE).val_loss - 0.5


def test_documents_mode_c1_fails_on_a_model_that_reads_other_documents():
    """ATTN_DOC_ISOLATION=0 scored by documents windows: causal, so the cuts pass, but a document's NLLs move when the
    document before it in its row changes: C1 fails on that half alone."""
    leaky = random_gpt(windows_hp("sliding", ATTN_DOC_ISOLATION=0), seed=1)
    _, c = audited_windows(windows_hp("documents"), leaky, DOCUMENTS)
    assert c["audit_max_abs"]["causality"] <= train_gpt.CAUSALITY_TOLERANCE and c["audit_counts"]["other_documents"] > 0
    assert c["causality_ok"] is False
    assert c["audit_max_abs"]["other_documents"] > 100 * train_gpt.CAUSALITY_TOLERANCE


def lora_reading(shift_dim, shift=-1):
    """TTTLoRA.add with each adapter fed its input rolled by `shift` along `shift_dim`: along the positions (1) the
    next position's input (the last position reads itself), along the rows (0) another row's."""
    real = train_gpt.TTTLoRA.add

    def add(self, slot, target, x, out):
        if shift_dim == 1:
            x = torch.cat((x[:, 1:], x[:, -1:]), dim=1)
        else:
            x = x.roll(shift, 0)
        return real(self, slot, target, x, out)
    return add


def test_a_lora_that_reads_the_next_position_fails_causality(monkeypatch):
    """The hole the old audit had: it ran the model without adapters, and a LoRA forward that reads the next
    position's input passed every check. Here it scores through its adapters: once a row's B has trained, C1 sees it
    (and only C1: it is normalized, its rows independent, the audited forward the scoring one)."""
    hp = lora_hp()
    monkeypatch.setattr(train_gpt.TTTLoRA, "add", lora_reading(1))
    _, c, _ = audited_lora(hp, random_gpt(hp, seed=1))
    assert c["causality_ok"] is False and c["audit_max_abs"]["causality"] > 100 * train_gpt.CAUSALITY_TOLERANCE
    assert c["scoring_forward_ok"] is c["rows_independent_ok"] is c["normalization_ok"] is True


# --- rows independent -----------------------------------------------------------------------------------------

class ReadsTheNextRow(train_gpt.GPT):
    """In evaluation only, position t of row b gets a bonus for input t + 1 - STRIDE of row b + 1: in the
    sliding evaluation's batches row b + 1 is the next window, STRIDE later, so that input is row b's own
    target at t. Cuts inside one row never see it."""

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        logits = self.logits(input_ids, None, capacity, lora)
        if not self.training:
            nxt = input_ids.roll(-1, 0)
            bonus = torch.zeros_like(logits)
            bonus[:, STRIDE - 1:] = 3.0 * F.one_hot(nxt[:, :input_ids.size(1) - STRIDE + 1], logits.size(-1)).float()
            logits = logits + bonus
        return per_token_nll(logits, target_ids)


def test_a_forward_that_reads_another_row_of_its_batch_fails(hp, model):
    """Consecutive windows share a batch, and a forward reading the next row reads the target it is scoring:
    scoring a row with every other row replaced must give the same NLLs. It does read the stream's future: the
    sliding evaluation scores it far better than the model."""
    peeker = copy_of(ReadsTheNextRow, hp, model)
    peeking, c = audited_windows(hp, peeker)
    assert c["rows_independent_ok"] is False and c["audit_max_abs"]["rows_independent"] > 100 * train_gpt.CAUSALITY_TOLERANCE
    assert c["scoring_forward_ok"] is True
    assert peeking.val_loss < train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, STRIDE).val_loss - 0.5


def test_a_lora_that_reads_another_row_fails(monkeypatch):
    hp = lora_hp()
    monkeypatch.setattr(train_gpt.TTTLoRA, "add", lora_reading(0))
    _, c, _ = audited_lora(hp, random_gpt(hp, seed=1))
    assert c["rows_independent_ok"] is False and c["audit_max_abs"]["rows_independent"] > 100 * train_gpt.CAUSALITY_TOLERANCE


# --- C2 normalization -----------------------------------------------------------------------------------------

class Unnormalized(train_gpt.GPT):
    kind = ""
    where = slice(None)

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        logits = self.logits(input_ids, None, capacity, lora)
        nll = per_token_nll(logits, target_ids)
        if self.kind == "plus_0.1":
            bad = nll + 0.1
        elif self.kind == "scaled":
            bad = 0.9 * nll
        elif self.kind == "raw_logit":                            # -logit[target]: no normalizer at all
            bad = -logits.gather(-1, target_ids[..., None])[..., 0]
        elif self.kind == "target_temperature":                  # the target's logit sharpened, the rest not
            bad = torch.logsumexp(logits, -1) - 1.5 * logits.gather(-1, target_ids[..., None])[..., 0]
        else:
            raise ValueError(self.kind)
        keep = torch.zeros(nll.size(1), dtype=torch.bool)
        keep[self.where] = True
        return torch.where(keep[None, :], bad, nll)


@pytest.mark.parametrize("kind", ["plus_0.1", "scaled", "raw_logit", "target_temperature"])
def test_normalization_fails_on_an_unnormalized_score(hp, model, kind):
    broken = copy_of(type(kind, (Unnormalized,), {"kind": kind}), hp, model)
    _, c = audited_windows(hp, broken)
    assert c["normalization_ok"] is False and c["audit_max_abs"]["normalization"] > 100 * train_gpt.NORMALIZATION_TOLERANCE
    assert c["causality_ok"] is True           # C1 does not see it (it is causal): C2 is the check that must


def test_normalization_is_checked_in_the_scored_tail(hp, model):
    broken = copy_of(type("tail", (Unnormalized,), {"kind": "plus_0.1", "where": slice(WINDOW - STRIDE, None)}), hp, model)
    assert audited_windows(hp, broken)[1]["normalization_ok"] is False


class UnnormalizedWithAdapters(train_gpt.GPT):
    """-log softmax without adapters, 0.1 nats less with them: only the LoRA path is unnormalized."""

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        nll = super().forward(input_ids, target_ids, capacity, lora)
        return nll if lora is None else nll - 0.1


def test_an_unnormalized_lora_path_fails():
    hp = lora_hp()
    _, c, _ = audited_lora(hp, copy_of(UnnormalizedWithAdapters, hp, random_gpt(hp, seed=1)))
    assert c["normalization_ok"] is False and c["audit_max_abs"]["normalization"] > 0.05
    assert c["causality_ok"] is True and c["scoring_forward_ok"] is True


class ExtraMassPastIdx512(train_gpt.GPT):
    """Normalized over ids < 512; ids >= 512 get more probability than the softmax gives them."""

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        nll = per_token_nll(self.logits(input_ids, None, capacity, lora), target_ids)
        return torch.where(target_ids >= 512, nll - 1.0, nll)


def test_normalization_covers_the_whole_vocabulary():
    """Vocab 600, summed in batches of 4 candidates: the last batch counts too."""
    hp = windows_hp(VOCAB_SIZE=600)
    model = random_gpt(hp, seed=4)
    tokens = np.random.default_rng(1).integers(0, 600, 100).astype(np.int64)
    assert audited_windows(hp, model, tokens)[1]["normalization_ok"] is True
    assert audited_windows(hp, copy_of(ExtraMassPastIdx512, hp, model), tokens)[1]["normalization_ok"] is False


# --- the audited forward is the scoring forward ----------------------------------------------------------------

class WithoutAdapters:
    """A LoRA trainer seen through a forward that drops the adapters (what the old audit ran)."""

    def __init__(self, ttt):
        self.lora, self.steps = ttt.lora, ttt.steps
        self.run_model = lambda x, y, capacity=None, lora=None: ttt.run_model(x, y, capacity)


class AuditsWithoutAdapters(train_gpt.ForwardAudit):
    def lora_step(self, ttt, *args):
        super().lora_step(WithoutAdapters(ttt), *args)


class AuditsTheTrainedAdapters(train_gpt.ForwardAudit):
    """Audits with the adapters as the step left them (trained on the chunk it scored), not as they scored it."""

    def lora_step(self, ttt, *args):
        self.before = ttt.lora.weights.detach().clone()
        super().lora_step(ttt, *args)


@pytest.mark.parametrize("probe_cls", [AuditsWithoutAdapters, AuditsTheTrainedAdapters])
def test_an_audit_of_another_forward_than_the_scoring_one_fails(probe_cls):
    """The checks pass on the forward audited (it is honest), but it is not the one that scored: its NLLs differ
    from the evaluation's for the same targets."""
    hp = lora_hp()
    _, c, _ = audited_lora(hp, random_gpt(hp, seed=1), probe_cls=probe_cls)
    assert c["scoring_forward_ok"] is False and c["audit_max_abs"]["scoring_forward"] > 100 * train_gpt.CAUSALITY_TOLERANCE
    assert c["causality_ok"] is c["rows_independent_ok"] is c["normalization_ok"] is True


def test_an_audit_of_an_honest_model_while_a_peeking_one_scored_fails(hp, model):
    """Every forward check passes on the honest model the audit was shown, but the score came from the peeking
    one: the NLL check tells them apart."""
    class AuditsTheHonestModel(train_gpt.ForwardAudit):
        def batch(self, run_model, *args):
            super().batch(model, *args)

    _, c = audited_windows(hp, copy_of(PeeksAtItsTarget, hp, model), probe_cls=AuditsTheHonestModel)
    assert c["scoring_forward_ok"] is False
    assert c["causality_ok"] is c["rows_independent_ok"] is c["normalization_ok"] is True


# --- C3 score before update: from the data each update trained on ---------------------------------

def ttt_setup(**overrides):
    hp = windows_hp("sliding", True, **overrides)
    model = random_gpt(hp, seed=1)
    return hp, model, train_gpt.TestTimeTrainer(hp, cpu_runtime(), model, model, WINDOW)


def audited(hp, model, ttt, run_model=None):
    r = train_gpt.evaluate(hp, cpu_runtime(), run_model or model, TOKENS, TABLES, WINDOW, STRIDE, ttt=ttt, audit=True)
    return r, train_gpt.audit_score_before_update(r.evidence, ttt is not None), train_gpt.audit_one_pass(r.evidence)


def test_score_before_update_passes_on_real_ttt():
    hp, model, ttt = ttt_setup()
    before = [p.detach().clone() for p in model.parameters()]
    r, c3, c4 = audited(hp, model, ttt)
    assert c3 == {"score_before_update_ok": True, "ttt_updates": 4, "ttt_unscored_targets_trained": 0,
                  "scoring_changed_weights": False}                           # 5 chunks of 40: 4 trained on
    assert c4["one_pass_ok"] is True
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))   # TTT did train


def test_score_before_update_fails_on_train_then_score_ttt(monkeypatch):
    monkeypatch.setattr(train_gpt, "ttt_schedule", train_then_score)
    hp, model, ttt = ttt_setup()
    r, c3, c4 = audited(hp, model, ttt)
    assert r.val_tokens == TOKENS.size - 1 and c4["one_pass_ok"] is True       # C4 cannot see it
    assert c3["score_before_update_ok"] is False and c3["ttt_unscored_targets_trained"] > 0


class TrainsOnTheNextChunk(train_gpt.TestTimeTrainer):
    """Trains after scoring chunk k, as the schedule says, but on chunk k+1's tokens: the event labels
    are right, the data is not (the old audit read the labels and passed it)."""

    def adapt(self, tokens, bos_cum, a, k, n_chunks, evidence):
        super().adapt(tokens, bos_cum, a + self.hp.ttt_chunk_tokens, k, n_chunks, evidence)


def test_score_before_update_fails_on_a_trainer_that_reads_the_next_chunk():
    hp, model, _ = ttt_setup()
    ttt = TrainsOnTheNextChunk(hp, cpu_runtime(), model, model, WINDOW)
    _, c3, c4 = audited(hp, model, ttt)
    assert c3["score_before_update_ok"] is False and c3["ttt_unscored_targets_trained"] > 0
    assert c4["one_pass_ok"] is True


class NudgesWhileScoring(nn.Module):
    """A run_model that changes a weight whenever it scores (no grad): a cache updated by scoring."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        if not torch.is_grad_enabled():
            with torch.no_grad():
                self.model.skip_weights.add_(1e-3)
        return self.model(input_ids, target_ids, capacity, lora)


@pytest.mark.parametrize("with_ttt", [True, False])
def test_score_before_update_fails_when_scoring_changes_the_weights(with_ttt):
    """A scorer that learns while it scores breaks the rule with TTT off too (a cache fed by scoring)."""
    hp, model, _ = ttt_setup()
    wrapped = NudgesWhileScoring(model)
    ttt = train_gpt.TestTimeTrainer(hp, cpu_runtime(), model, wrapped, WINDOW) if with_ttt else None
    _, c3, _ = audited(hp, model, ttt, wrapped)
    assert c3["score_before_update_ok"] is False and c3["scoring_changed_weights"] is True


def test_no_fingerprints_without_the_audit(monkeypatch):
    """Weight fingerprints are audit work: none when the audit is off; with it, one before and one after each
    scoring call (TTT or not)."""
    calls = []
    monkeypatch.setattr(train_gpt, "weights_fingerprint", lambda m: calls.append(1) or torch.zeros(1))
    hp, model, ttt = ttt_setup()
    r = train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, STRIDE, ttt=ttt)
    assert calls == [] and r.evidence is None
    audited(hp, model, ttt)
    assert len(calls) == 2 * 5                                # before and after each of the 5 scoring calls
    calls.clear()
    train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, STRIDE, audit=True)
    assert len(calls) == 2                                    # without TTT: one scoring call


# --- C4 one pass: a per-position count ------------------------------------------------------------

def test_one_pass_holds_on_the_real_evaluator(hp, model):
    r = train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, STRIDE, collect=True, audit=True)
    assert r.val_tokens == TOKENS.size - 1 and r.nll.shape == (TOKENS.size - 1,)
    assert train_gpt.audit_one_pass(r.evidence) == {
        "one_pass_ok": True, "targets_scored_once": TOKENS.size - 1, "targets_never_scored": 0,
        "targets_scored_twice_or_more": 0, "targets_expected": TOKENS.size - 1}


def test_one_pass_fails_when_one_target_is_scored_twice_and_another_dropped(monkeypatch, hp, model):
    """The last window shifted back by one: it re-scores the target before its range and drops the
    stream's last target. The count of scored targets stays right (the runtime check passes)."""
    real = train_gpt.sliding_windows

    def swapped(*args, **kwargs):
        starts, score_from, score_to = real(*args, **kwargs)
        score_from, score_to = score_from.copy(), score_to.copy()
        score_from[-1] -= 1
        score_to[-1] -= 1
        return starts, score_from, score_to

    monkeypatch.setattr(train_gpt, "sliding_windows", swapped)
    r = train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, STRIDE, audit=True)
    assert r.val_tokens == TOKENS.size - 1
    c4 = train_gpt.audit_one_pass(r.evidence)
    assert c4["one_pass_ok"] is False
    assert c4["targets_never_scored"] == 1 and c4["targets_scored_twice_or_more"] == 1


@pytest.mark.parametrize("how", ["drop_the_tail", "drop_the_first", "score_one_twice"])
def test_a_wrong_count_of_targets_stops_the_evaluation(monkeypatch, hp, model, how):
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
        train_gpt.evaluate(hp, cpu_runtime(), model, TOKENS, TABLES, WINDOW, STRIDE)


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
        x, y = t[:-1].view(-1, self.hp.train_seq_len), t[1:].view(-1, self.hp.train_seq_len)
        return x, y, train_gpt.capacity_of(x)


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
    no earlier than the last read, no later than the end of training (where the validation at step 4 runs)."""
    hp = tiny_hp(ITERATIONS=4, MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=4)
    result, loader, seen = run_train(hp, delay=0.05)
    assert result.steps == 4 and result.train_time_ms >= 4 * 50
    assert 0 < result.train_data_last_read_ms <= seen["train_ms"] <= result.train_time_ms <= seen["train_ms"] + 1.0
    gap_ms = 1e3 * (seen["at"] - loader.last_read_end)        # last read .. final validation, wall clock
    assert result.train_time_ms - result.train_data_last_read_ms <= gap_ms + 1.0
    assert result.train_data_last_read_ms >= 4 * 50 - 1.0       # after all four 50 ms reads


def test_the_deadline_is_the_challenges_600_s_when_the_cap_is_later():
    assert train_gpt.training_deadline_ms(tiny_hp(MAX_WALLCLOCK_SECONDS=609)) == 600e3
    assert train_gpt.training_deadline_ms(tiny_hp(MAX_WALLCLOCK_SECONDS=300)) == 300e3
    assert train_gpt.training_deadline_ms(tiny_hp(MAX_WALLCLOCK_SECONDS=0)) == 600e3


def export_run(demo_data, name, monkeypatch, delay=0.0, calibration_s=0.0, **settings):
    """train_and_export on the demo data, on a clock only reads move: each training read takes `delay`
    seconds of it, the Hessian collection `calibration_s`; nothing else takes any time (machine load cannot
    move the outcome)."""
    from test_cuda_hazards import FakeTime
    fake = FakeTime()
    monkeypatch.setattr(train_gpt, "time", fake)
    vocab = demo_data["vocab"]
    common = dict(VOCAB_SIZE=vocab, DATA_PATH=demo_data["dir"], TOKENIZER_PATH=demo_data["tokenizer"],
                  TRAIN_BATCH_TOKENS=8 * 32, TRAIN_SEQ_LEN=32, EVAL_STRIDE=16, ITERATIONS=3, VAL_BATCH_SIZE=512,
                  VAL_LOSS_EVERY=0, LZMA_PRESET=0, GPTQ_CALIB_SEQS=2, GPTQ_CALIB_LEN=16)
    hp = tiny_hp(**{**common, **settings})
    val, _ = train_gpt.load_validation_tokens(str(demo_data["dir"]), vocab, 300)
    tables = train_gpt.build_bpb_tables(str(demo_data["tokenizer"]), vocab)
    real_batch, real_collect = train_gpt.DistributedTokenLoader.batch, train_gpt.collect_hessians

    def slow_batch(self, step, micro):
        fake.now += delay
        return real_batch(self, step, micro)

    def slow_collect(*args):
        fake.now += calibration_s
        return real_collect(*args)

    monkeypatch.setattr(train_gpt.DistributedTokenLoader, "batch", slow_batch)
    monkeypatch.setattr(train_gpt, "collect_hessians", slow_collect)
    model = random_gpt(hp, seed=0)
    log = lambda *a, **k: None                     # noqa: E731
    rt = cpu_runtime()
    plan = train_gpt.plan_budget(hp, log)
    return train_gpt.train_and_export(hp, rt, name, model, model, val, tables, plan, log, train_gpt.StageTimes(rt))


def test_a_read_past_the_deadline_is_flagged(demo_data, tmp_path, monkeypatch):
    """A step whose read takes longer than the whole cap: the loop stops, and the summary keys say
    training data was read after the deadline; with a cap that is not reached they say it was not
    (on a clock only the reads move: 0.5 s and 0.01 s a read). Calibration reads no training data here (self):
    the loop's reads are the subject; training-data calibration has the test below."""
    monkeypatch.chdir(tmp_path)
    late = export_run(demo_data, "late", monkeypatch, delay=0.5, MAX_WALLCLOCK_SECONDS=0.2, GPTQ_CALIBRATION="self")
    in_time = export_run(demo_data, "in_time", monkeypatch, delay=0.01, MAX_WALLCLOCK_SECONDS=300, GPTQ_CALIBRATION="self")
    assert late.result.stopped_early and late.result.steps == 1
    assert late.train_deadline_ms == 200.0 and late.train_data_last_read_ms > 500.0
    assert late.read_after_deadline is True
    assert in_time.train_deadline_ms == 300e3 and in_time.result.steps == 3
    assert 0 < in_time.train_data_last_read_ms < 300e3 and in_time.read_after_deadline is False


def test_calibration_on_training_data_past_the_challenge_deadline_is_flagged(demo_data, tmp_path, monkeypatch):
    """GPTQ_CALIBRATION=train with MAX_WALLCLOCK_SECONDS above the challenge's 600 s (here, scaled down:
    the challenge's deadline 0.5 s, the run's cap 1.2 s, reserve 0.4 s): training stops near 0.8 s and
    calibration reads training data after 0.5 s. The old code compared it with the run's own cap."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_gpt, "CHALLENGE_TRAIN_SECONDS", 0.5)
    run = export_run(demo_data, "late_calibration", monkeypatch, delay=0.05, calibration_s=0.3,
                     MAX_WALLCLOCK_SECONDS=1.2, GPTQ_CALIBRATION="train", GPTQ_RESERVE_SECONDS=0.4, ITERATIONS=1000)
    assert run.train_deadline_ms == 500.0 and run.result.train_time_ms <= 800.0
    assert run.train_data_last_read_ms > 500.0 and run.read_after_deadline is True


# --- GPU-like rounding that depends on the batch row ---------------------------------------------------

class RoundsByRow(nn.Module):
    """The evaluator's forward with the rounding of a GPU whose kernels round a row by where it sits in the
    batch (split-K bf16 GEMMs): identical rows in different places get NLLs up to 2 x `amp` apart. `bias`
    lowers every NLL (an unnormalized model: each p(v) times exp(bias))."""

    def __init__(self, model, amp=1e-3, bias=0.0):
        super().__init__()
        self.model, self.amp, self.bias = model, amp, bias

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        rows = torch.arange(input_ids.size(0))[:, None]
        positions = torch.arange(input_ids.size(1))[None]
        return (self.model(input_ids, target_ids, capacity, lora) + self.amp * torch.sin(1.7 * rows + 0.3 * positions)
                - self.bias)


def test_row_dependent_rounding_does_not_fail_an_honest_model(hp, model):
    """2e-3 nats of row noise against tolerances of 1e-4: C1, rows and the scoring check compare the same rows of
    two forwards (no noise at all); C2 sums candidates from different rows, and its tolerance comes from the noise
    measured by moving them one row, logged beside it."""
    c = audited_windows(hp, RoundsByRow(model))[1]
    assert all(c[k] is True for k in FORWARD_CHECKS)
    assert c["audit_max_abs"]["causality"] == c["audit_max_abs"]["noise_same_rows"] == c["audit_max_abs"]["scoring_forward"] == 0.0
    assert c["causality_tolerance"] == train_gpt.CAUSALITY_TOLERANCE
    assert c["audit_max_abs"]["normalization"] > train_gpt.NORMALIZATION_TOLERANCE and 1e-3 < c["audit_max_abs"]["normalization_noise"] <= 2e-3
    assert c["normalization_tolerance"] == pytest.approx(
        train_gpt.NORMALIZATION_TOLERANCE + 2 * np.expm1(c["audit_max_abs"]["normalization_noise"]))
    plain = audited_windows(hp, model)[1]     # fp32 on the CPU: its own row noise is ~1e-5 nats, the tolerance ~1e-4
    assert plain["normalization_ok"] is True and plain["normalization_tolerance"] < 1.5 * train_gpt.NORMALIZATION_TOLERANCE


def test_row_noise_does_not_hide_a_leak_or_an_unnormalized_model(hp, model):
    assert audited_windows(hp, RoundsByRow(copy_of(PeeksInTheTail, hp, model)))[1]["causality_ok"] is False
    inflated = audited_windows(hp, RoundsByRow(model, bias=0.05))[1]      # every p(v) 5% too large
    assert inflated["normalization_ok"] is False and inflated["audit_max_abs"]["normalization"] > 0.04


class RoundsByRowOnPurpose(RoundsByRow):
    """Sharpens every other row's distribution by 10%: hardly moves its score, but rows in other places
    differ by tenths of a nat, which would widen a tolerance taken from that noise."""

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        logits = self.model.logits(input_ids, None, capacity, lora)
        logits = logits * (1 + 0.1 * (torch.arange(logits.size(0)) % 2))[:, None, None]
        return per_token_nll(logits, target_ids) - self.bias


def test_noise_made_on_purpose_cannot_widen_a_tolerance(hp, model):
    """C1 takes its tolerance from the same rows run twice only, so row noise made on purpose does not hide a leak;
    C2's noise above NOISE_CEILING_NATS fails the check (it cannot certify) instead of accepting sums far from 1."""
    c1 = audited_windows(hp, RoundsByRow(copy_of(PeeksInTheTail, hp, model), amp=0.15))[1]
    assert c1["causality_tolerance"] == train_gpt.CAUSALITY_TOLERANCE and c1["causality_ok"] is False
    c2 = audited_windows(hp, RoundsByRowOnPurpose(model, bias=0.2))[1]      # sums ~1.22 under 0.3 nats of row noise
    assert c2["audit_max_abs"]["normalization_noise"] > train_gpt.NOISE_CEILING_NATS and c2["normalization_ok"] is False


class NoisyTwice(RoundsByRow):
    """Rounds differently each time it runs (a nondeterministic kernel) by up to `amp`."""

    def forward(self, input_ids, target_ids, capacity=None, lora=None):
        nll = self.model(input_ids, target_ids, capacity, lora)
        return nll + self.amp * torch.rand(nll.shape)


def test_a_forward_too_noisy_to_compare_is_not_certified(hp, model):
    """The same batch run twice differing by more than NOISE_CEILING_NATS: C1, rows and the scoring check fail (a
    tolerance that wide could hide a leak); below it the tolerance grows with the noise and honest runs pass."""
    loud = audited_windows(hp, NoisyTwice(model, amp=0.05))[1]
    assert loud["audit_max_abs"]["noise_same_rows"] > train_gpt.NOISE_CEILING_NATS
    assert not any(loud[k] for k in ("scoring_forward_ok", "causality_ok", "rows_independent_ok"))
    quiet = audited_windows(hp, NoisyTwice(model, amp=1e-3))[1]
    assert quiet["causality_tolerance"] > train_gpt.CAUSALITY_TOLERANCE and quiet["causality_ok"] is True
