"""Legal score-first test-time training, checked from the outside: the model passed to evaluate() is
wrapped so that every forward in grad mode (a TTT training step) records the inputs and targets it was
given, located in the stream; every call that scores records the targets it scores. From that trace:
no training target is one not yet scored, training on chunk k uses only chunk k's targets (none of
chunk k+1), the last chunk is never trained on; only the last TTT_LAST_N blocks change; two gloo ranks
end bit-identical. The trace checker itself is shown to fail on a train-then-score schedule and on
trainers that reach into the next chunk."""

import math

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

import train_gpt
from _helpers import cpu_runtime, random_gpt, run_distributed, tiny_hp, train_then_score

VOCAB = 64
WINDOW = 16
STRIDE = 8
TOKENS = np.random.default_rng(7).integers(0, VOCAB, 200).astype(np.int64)     # 199 targets
TABLES = (np.ones(VOCAB, dtype=np.int64), np.zeros(VOCAB, dtype=bool), np.zeros(VOCAB, dtype=bool))


class Recorder(nn.Module):
    """run_model stand-in: forwards to the GPT, and records (inputs, targets) of every grad-mode call."""

    def __init__(self, model, trace):
        super().__init__()
        self.model, self.trace = model, trace

    def forward(self, input_ids, target_ids, *rest):
        if torch.is_grad_enabled():
            self.trace.append(("train", input_ids.detach().numpy().copy(), target_ids.detach().numpy().copy()))
        return self.model(input_ids, target_ids, *rest)


def record_scoring(monkeypatch, trace):
    """Wrap train_gpt.score_windows: record the stream positions of the targets each call scores."""
    real = train_gpt.score_windows

    def recording(hp, rt, run_model, tokens, starts, score_from, score_to, *rest, **named):
        targets = [s + j + 1 for s, f, t in zip(starts, score_from, score_to) for j in range(f, t)]
        trace.append(("score", np.array(targets, dtype=np.int64)))
        return real(hp, rt, run_model, tokens, starts, score_from, score_to, *rest, **named)

    monkeypatch.setattr(train_gpt, "score_windows", recording)


def locate(tokens, x, y):
    """Stream positions of the targets of each training row: the unique p with tokens[p:p+L] == row's
    inputs and tokens[p+1:p+L+1] == its targets; returns the targets' positions p+1 .. p+L."""
    L = x.shape[1]
    view = sliding_window_view(tokens, L + 1)
    out = []
    for xr, yr in zip(x, y):
        hits = np.flatnonzero((view[:, :-1] == xr).all(1) & (view[:, 1:] == yr).all(1))
        assert len(hits) == 1, f"training row found {len(hits)} times in the stream"
        out.append(np.arange(hits[0] + 1, hits[0] + L + 1))
    return np.concatenate(out)


def check_trace(trace, tokens, chunk):
    """Assert score-first TTT from a trace; return {chunk: training targets}."""
    n_targets = tokens.size - 1
    n_chunks = math.ceil(n_targets / chunk)
    chunk_of = lambda t: (np.asarray(t) - 1) // chunk          # noqa: E731  target t is input t - 1's
    scored = np.zeros(tokens.size, dtype=int)
    current, trained = None, {}
    for event in trace:
        if event[0] == "score":
            chunks = set(chunk_of(event[1]).tolist())
            assert len(chunks) == 1, f"one scoring call spans chunks {chunks}"
            current = chunks.pop()
            scored[event[1]] += 1
            continue
        targets = locate(tokens, event[1], event[2])
        assert (scored[targets] == 1).all(), f"trained on targets not yet scored: {targets[scored[targets] != 1]}"
        assert set(chunk_of(targets).tolist()) == {current}, \
            f"training after scoring chunk {current} used targets of chunks {set(chunk_of(targets).tolist())}"
        assert current < n_chunks - 1, "trained on the last chunk"
        trained.setdefault(current, []).append(targets)
    assert scored[0] == 0 and (scored[1:] == 1).all(), "not every target scored exactly once"
    assert sorted(trained) == list(range(n_chunks - 1)), f"trained on chunks {sorted(trained)}"
    return {k: np.concatenate(v) for k, v in trained.items()}


def ttt_hp(**overrides):
    settings = dict(NUM_LAYERS=3, TTT_ENABLED=1, TTT_CHUNK_TOKENS=32, TTT_EPOCHS=2, TTT_LR=0.05,
                    TTT_LAST_N=2, VAL_BATCH_SIZE=WINDOW)              # one sequence per training step
    settings.update(overrides)
    return tiny_hp(**settings)


def run_ttt(monkeypatch, hp, trainer_cls=train_gpt.TestTimeTrainer, tokens=TOKENS):
    """Evaluate with TTT through a Recorder; return (result, trace, model, weights before)."""
    trace = []
    record_scoring(monkeypatch, trace)
    model = random_gpt(hp, seed=1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    recorder = Recorder(model, trace)
    ttt = trainer_cls(hp, cpu_runtime(), model, recorder, WINDOW)
    r = train_gpt.evaluate(hp, cpu_runtime(), recorder, tokens, TABLES, WINDOW, STRIDE, ttt=ttt, collect=True,
                           audit=True)
    return r, trace, model, before


@pytest.mark.parametrize("chunk,epochs", [(32, 2), (40, 1)])     # chunk a multiple of the window, and not
def test_ttt_trains_only_on_scored_tokens_of_the_chunk_just_scored(monkeypatch, chunk, epochs):
    hp = ttt_hp(TTT_CHUNK_TOKENS=chunk, TTT_EPOCHS=epochs)
    r, trace, _, _ = run_ttt(monkeypatch, hp)
    trained = check_trace(trace, TOKENS, chunk)
    n_seq = chunk // WINDOW                                    # whole sequences of each chunk
    for k, targets in trained.items():
        assert len(targets) == epochs * n_seq * WINDOW
        assert set(targets.tolist()) == set(range(k * chunk + 1, k * chunk + n_seq * WINDOW + 1))
    assert r.val_tokens == TOKENS.size - 1
    assert train_gpt.audit_score_before_update(r.evidence, True)["score_before_update_ok"] is True


def test_first_chunk_is_scored_before_any_update_and_later_chunks_after(monkeypatch):
    hp = ttt_hp()
    r, _, _, _ = run_ttt(monkeypatch, hp)
    plain = train_gpt.evaluate(hp, cpu_runtime(), random_gpt(hp, seed=1), TOKENS, TABLES, WINDOW, STRIDE,
                               collect=True)
    # chunk 0: the loaded weights (to float rounding: TTT's frozen/unfrozen flags change CPU kernel paths)
    np.testing.assert_allclose(r.nll[:32], plain.nll[:32], rtol=1e-6, atol=0)
    for k in range(1, 7):                                             # later chunks: adapted weights
        assert not np.allclose(r.nll[32 * k:32 * (k + 1)], plain.nll[32 * k:32 * (k + 1)], rtol=1e-6, atol=0)


def test_every_parameter_trains_by_default(monkeypatch):
    """TTT_LAST_N=0 (the default, records 04-06 on): every block unfrozen, the embedding and the control
    tensors too; and still only on scored targets of the chunk just scored."""
    hp = ttt_hp(TTT_LAST_N=0)
    r, trace, model, before = run_ttt(monkeypatch, hp)
    check_trace(trace, TOKENS, 32)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert all(p.requires_grad for p in model.parameters())
    for prefix in ("tok_emb.", "blocks.0.", "blocks.1.", "blocks.2.", "skip_weights", "smear"):
        assert any(name.startswith(prefix) for name in changed), prefix


def test_cosine_learning_rate_over_the_chunks():
    hp = ttt_hp(TTT_LR=0.1)
    ttt = train_gpt.TestTimeTrainer(hp, cpu_runtime(), random_gpt(hp), random_gpt(hp), WINDOW)
    assert [ttt.lr(k, 5) for k in range(5)] == pytest.approx([0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05,
                                                              0.1 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0])
    hp.ttt_lr_schedule = "constant"
    assert [ttt.lr(k, 5) for k in range(5)] == [0.1] * 5


@pytest.mark.parametrize("setting,value", [("TTT_LR_SCHEDULE", "constant"), ("TTT_GRAD_CLIP", "0.01"),
                                           ("TTT_LAST_N", "1"), ("TTT_MOMENTUM", "0")])
def test_each_ttt_setting_changes_the_update(monkeypatch, setting, value):
    base, _, model_a, _ = run_ttt(monkeypatch, ttt_hp(TTT_LAST_N=0))
    other, _, model_b, _ = run_ttt(monkeypatch, ttt_hp(**{"TTT_LAST_N": 0, setting: value}))
    assert train_gpt.state_checksum(model_a.state_dict()) != train_gpt.state_checksum(model_b.state_dict())
    assert base.val_loss != other.val_loss


def test_only_the_last_blocks_change(monkeypatch):
    hp = ttt_hp(TTT_LAST_N=2)                                          # 3 blocks: 1 and 2 train, 0 is frozen
    _, _, model, before = run_ttt(monkeypatch, hp)
    for name, p in model.named_parameters():
        trainable = name.startswith(("blocks.1.", "blocks.2."))
        assert p.requires_grad, name          # frozen by dropping gradients: compiled graphs keep their guards
        if trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} changed"


# --- the checker has teeth ---------------------------------------------------------------------------

def test_checker_fails_on_train_then_score(monkeypatch):
    monkeypatch.setattr(train_gpt, "ttt_schedule", train_then_score)
    _, trace, _, _ = run_ttt(monkeypatch, ttt_hp())
    with pytest.raises(AssertionError, match="not yet scored"):
        check_trace(trace, TOKENS, 32)


def train_on_the_last_chunk_too(n_chunks):
    for k in range(n_chunks):
        yield "score", k
        yield "train", k


def test_checker_fails_when_the_last_chunk_is_trained_on(monkeypatch):
    monkeypatch.setattr(train_gpt, "ttt_schedule", train_on_the_last_chunk_too)
    tokens = TOKENS[:193]                                      # 192 targets: 6 whole chunks, the last trainable
    _, trace, _, _ = run_ttt(monkeypatch, ttt_hp(), tokens=tokens)
    with pytest.raises(AssertionError, match="last chunk"):
        check_trace(trace, tokens, 32)


class ReachesAhead(train_gpt.TestTimeTrainer):
    """Trains after scoring chunk k on the stream shifted `shift` tokens forward: its last targets
    belong to chunk k + 1 (shift 1: an off-by-one at the boundary)."""
    shift = 1

    def adapt(self, tokens, bos_cum, a, k, n_chunks, evidence):
        super().adapt(tokens, bos_cum, a + self.shift, k, n_chunks, evidence)


@pytest.mark.parametrize("shift", [1, 32])
def test_checker_fails_when_training_reaches_into_the_next_chunk(monkeypatch, shift):
    cls = type("Shifted", (ReachesAhead,), {"shift": shift})
    r, trace, _, _ = run_ttt(monkeypatch, ttt_hp(), trainer_cls=cls)
    with pytest.raises(AssertionError, match="not yet scored"):
        check_trace(trace, TOKENS, 32)
    assert train_gpt.audit_score_before_update(r.evidence, True)["score_before_update_ok"] is False   # C3 sees it too


# --- two ranks ---------------------------------------------------------------------------------------

def _ttt_on_ranks(rank, world_size):
    torch.manual_seed(rank)                                    # nothing may depend on per-rank RNG state
    trace = []

    class Patch:                                               # record_scoring without pytest's monkeypatch
        @staticmethod
        def setattr(obj, name, value):
            setattr(obj, name, value)

    record_scoring(Patch, trace)
    hp = ttt_hp()
    model = random_gpt(hp, seed=1)
    initial = train_gpt.state_checksum(model.state_dict())
    recorder = Recorder(model, trace)
    rt = cpu_runtime(rank=rank, world_size=world_size, distributed=True)
    ttt = train_gpt.TestTimeTrainer(hp, rt, model, recorder, WINDOW)
    r = train_gpt.evaluate(hp, rt, recorder, TOKENS, TABLES, WINDOW, STRIDE, ttt=ttt, audit=True)
    return dict(initial=initial, final=train_gpt.state_checksum(model.state_dict()), val_bpb=r.val_bpb,
                val_tokens=r.val_tokens, trace=trace, audit=train_gpt.audit_score_before_update(r.evidence, True),
                one_pass=train_gpt.audit_one_pass(r.evidence))


@pytest.mark.slow
def test_two_ranks_stay_bit_identical_and_train_only_on_scored_tokens():
    results = run_distributed(_ttt_on_ranks, 2)
    a, b = results
    assert a["initial"] == b["initial"] and a["final"] == b["final"]            # bit-identical weights
    assert a["final"] != a["initial"]                                            # and TTT did train
    assert a["val_bpb"] == b["val_bpb"] and a["val_tokens"] == b["val_tokens"] == TOKENS.size - 1
    assert a["audit"]["score_before_update_ok"] is True and b["audit"] == a["audit"]
    assert a["one_pass"]["one_pass_ok"] is True and b["one_pass"] == a["one_pass"]   # coverage summed over ranks
    trained = [check_trace(r["trace"], TOKENS, 32) for r in results]
    for k in trained[0]:                                   # each rank its own sequence of the chunk
        assert not set(trained[0][k].tolist()) & set(trained[1][k].tolist())
        assert set(trained[0][k].tolist()) | set(trained[1][k].tolist()) == set(range(32 * k + 1, 32 * k + 33))
