"""Evaluation stage: sliding_windows coverage, and evaluate() against a brute-force per-target loop."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from _helpers import cpu_runtime, random_gpt, run_distributed, tiny_hp

# --- sliding_windows ---------------------------------------------------------------------

COMBOS = [(n, window, stride)
          for n in list(range(2, 42)) + [100, 257, 1025]
          for window in (1, 2, 3, 5, 8, 16, 64)
          for stride in sorted({1, 2, 3, window // 2 or 1, window - 1 or 1, window})
          if stride <= window]


def check_windows(n, window, stride):
    starts, score_from = train_gpt.sliding_windows(n, window, stride)
    w = min(window, n - 1)
    assert starts.dtype == score_from.dtype == np.int64 and starts.shape == score_from.shape
    assert starts[0] == 0 and score_from[0] == 0                      # the first window scores everything
    assert (np.diff(starts) >= 0).all()
    assert (starts >= 0).all() and (starts + w <= n - 1).all()        # equal-length windows inside the inputs
    assert ((score_from >= 0) & (score_from < w)).all()               # each scores a non-empty suffix
    times_scored = np.zeros(n, dtype=int)
    for s, f in zip(starts, score_from):
        for j in range(f, w):
            target = s + j + 1                                        # input s + j predicts token s + j + 1
            times_scored[target] += 1
            context = target - s                                      # tokens the model sees before it
            if target > w:                                            # beyond the first window
                assert context >= w - stride + 1, (target, context)
            else:
                assert context == target                              # the whole prefix
    assert times_scored[0] == 0 and (times_scored[1:] == 1).all()
    assert len(starts) == 1 + math.ceil(max(0, n - 1 - w) / stride)


def test_sliding_windows_cover_every_target_once():
    for n, window, stride in COMBOS:
        try:
            check_windows(n, window, stride)
        except AssertionError as e:
            raise AssertionError(f"sliding_windows(n={n}, window={window}, stride={stride}): {e}") from e


def test_sliding_windows_examples():
    # plain evaluation: contiguous chunks; a short tail is scored by a window moved back
    assert [a.tolist() for a in train_gpt.sliding_windows(9, 4, 4)] == [[0, 4], [0, 0]]
    assert [a.tolist() for a in train_gpt.sliding_windows(11, 4, 4)] == [[0, 4, 6], [0, 0, 2]]
    # stride 2: each later window scores its last 2 targets (the tail window fewer)
    assert [a.tolist() for a in train_gpt.sliding_windows(10, 4, 2)] == [[0, 2, 4, 5], [0, 2, 2, 3]]
    # stream shorter than a window: one window of all inputs
    assert [a.tolist() for a in train_gpt.sliding_windows(3, 8, 4)] == [[0], [0]]


# --- evaluate --------------------------------------------------------------------------------

VOCAB = 64


@pytest.fixture(scope="module")
def setup():
    hp = tiny_hp()
    model = random_gpt(hp, seed=1)
    rng = np.random.default_rng(0)
    tables = (rng.integers(0, 4, VOCAB).astype(np.int64), rng.random(VOCAB) < 0.5, rng.random(VOCAB) < 0.2)
    return hp, model, tables


def reference_windows(n, window, stride):
    """The documented window layout, enumerated independently: [(start, first scored target)]."""
    w = min(window, n - 1)
    out, scored_to, end = [(0, 1)], w, w                  # targets 1..w scored by the first window
    while scored_to < n - 1:
        end = min(end + stride, n - 1)
        out.append((end - w, scored_to + 1))
        scored_to = end
    return out


def brute_force(model, tokens, tables, window, stride):
    """Sum of NLL (nats, float64) and bytes, one target at a time: target t is scored by the last
    window whose range starts at or before t, from the prefix tokens[start:t] alone."""
    base, lead, boundary = tables
    windows = reference_windows(tokens.size, window, stride)
    nll_sum, byte_sum = 0.0, 0
    with torch.no_grad():
        for t in range(1, tokens.size):
            start = max(s for s, first in windows if first <= t)
            logits = model.logits(torch.from_numpy(tokens[start:t])[None])[0, -1].double()
            nll_sum += float(torch.logsumexp(logits, 0) - logits[tokens[t]])
            byte_sum += int(base[tokens[t]]) + int(lead[tokens[t]] and not boundary[tokens[t - 1]])
    return nll_sum, byte_sum


@pytest.mark.parametrize("n,window,stride,val_batch", [
    (101, 16, 16, 10_000),     # plain, tail window moved back
    (101, 16, 5, 10_000),      # sliding, tail
    (101, 16, 5, 3 * 16),      # sliding, batches of 3 windows (last batch padded)
    (97, 16, 1, 7 * 16),       # stride 1
    (12, 16, 4, 10_000),       # stream shorter than a window
])
def test_evaluate_equals_brute_force(setup, n, window, stride, val_batch):
    hp, model, tables = setup
    hp.val_batch_size = val_batch
    tokens = np.random.default_rng(n + stride).integers(0, VOCAB, n).astype(np.int64)
    r = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, window, stride)
    nll_sum, byte_sum = brute_force(model, tokens, tables, window, stride)
    assert r.val_tokens == n - 1
    assert r.val_bytes == byte_sum
    assert r.val_loss == pytest.approx(nll_sum / (n - 1), rel=1e-5)
    assert r.val_bpb == pytest.approx(nll_sum / (math.log(2) * byte_sum), rel=1e-5)
    assert r.val_bpb == pytest.approx(r.val_loss * r.val_tokens / (math.log(2) * r.val_bytes), rel=1e-12)
    assert model.training                       # evaluate hands the model back in training mode


def test_stride_equal_window_is_plain_chunked_evaluation(setup):
    hp, model, tables = setup
    hp.val_batch_size = 10_000
    window, chunks = 16, 6
    tokens = np.random.default_rng(5).integers(0, VOCAB, window * chunks + 1).astype(np.int64)
    r = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, window, window)
    with torch.no_grad():
        x = torch.from_numpy(tokens[:-1]).view(chunks, window)
        y = torch.from_numpy(tokens[1:]).view(chunks, window)
        nll = F.cross_entropy(model.logits(x).double().flatten(0, 1), y.flatten(), reduction="sum").item()
    assert r.val_loss == pytest.approx(nll / (window * chunks), rel=1e-6)


def test_stride_changes_the_score(setup):
    """Stride < window changes the score (more context), so the stride is really used."""
    hp, model, tables = setup
    tokens = np.random.default_rng(9).integers(0, VOCAB, 200).astype(np.int64)
    plain = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, 16, 16)
    sliding = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, 16, 4)
    assert plain.val_bytes == sliding.val_bytes and plain.val_tokens == sliding.val_tokens
    assert plain.val_loss != pytest.approx(sliding.val_loss, rel=1e-6)


def test_zero_byte_stream_errors(setup):
    hp, model, _ = setup
    zero = (np.zeros(VOCAB, dtype=np.int64), np.zeros(VOCAB, dtype=bool), np.ones(VOCAB, dtype=bool))
    with pytest.raises(train_gpt.PipelineError):
        train_gpt.evaluate(hp, cpu_runtime(), model, np.arange(20) % VOCAB, zero, 16, 16)


def _distributed_eval(rank, world_size, n, window, stride, val_batch):
    hp = tiny_hp(VAL_BATCH_SIZE=val_batch)
    model = random_gpt(hp, seed=1)
    tokens = np.random.default_rng(3).integers(0, VOCAB, n).astype(np.int64)
    rng = np.random.default_rng(0)
    tables = (rng.integers(0, 4, VOCAB).astype(np.int64), rng.random(VOCAB) < 0.5, rng.random(VOCAB) < 0.2)
    rt = cpu_runtime(rank=rank, world_size=world_size, distributed=True)
    r = train_gpt.evaluate(hp, rt, model, tokens, tables, window, stride)
    single = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, window, stride)
    return (r.val_loss, r.val_bpb, r.val_tokens, r.val_bytes), (single.val_loss, single.val_bpb)


@pytest.mark.slow
def test_evaluate_on_three_ranks_equals_one_rank():
    """Windows split unevenly over 3 gloo ranks (10 windows, batches of 2): same result everywhere."""
    results = run_distributed(_distributed_eval, 3, 101, 16, 10, 2 * 3 * 16)
    (loss, bpb, n_tok, n_bytes), (single_loss, single_bpb) = results[0]
    assert n_tok == 100
    for (other, _single) in results:
        assert other == (loss, bpb, n_tok, n_bytes)
    assert loss == pytest.approx(single_loss, rel=1e-9) and bpb == pytest.approx(single_bpb, rel=1e-9)
