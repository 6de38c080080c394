"""Evaluation stage: sliding_windows coverage (whole stream and chunk ranges), and evaluate() against a
brute-force per-target loop (sums and the per-target NLL it collects), on one and three ranks."""

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


def check_windows(n, window, stride, lo=0, hi=None):
    """Check the windows for inputs [lo, hi); return how often each token of the stream is scored."""
    starts, score_from, score_to = train_gpt.sliding_windows(n, window, stride, lo, hi)
    hi = n - 1 if hi is None else hi
    w = min(window, n - 1)
    assert starts.dtype == score_from.dtype == score_to.dtype == np.int64
    assert starts.shape == score_from.shape == score_to.shape
    assert (np.diff(starts) >= 0).all()
    assert (starts >= 0).all() and (starts + w <= n - 1).all()        # equal-length windows inside the inputs
    assert ((score_from >= 0) & (score_from < score_to) & (score_to <= w)).all()   # a non-empty range each
    first, last = starts + score_from, starts + score_to              # the inputs each window scores
    assert first[0] == lo and last[-1] == hi and (first[1:] == last[:-1]).all()    # back to back, [lo, hi)
    sizes = last - first
    assert (sizes[1:-1] == stride).all()                              # later windows: `stride` new targets
    assert sizes[0] >= min(stride, hi - lo) and (len(sizes) == 1 or sizes[-1] <= stride)
    times_scored = np.zeros(n, dtype=int)
    for s, f, t in zip(starts, score_from, score_to):
        for j in range(f, t):
            target = s + j + 1                                        # input s + j predicts token s + j + 1
            times_scored[target] += 1
            context = target - s                                      # tokens the model sees before it
            assert context >= min(target, w - stride + 1), (target, context)
            if lo == 0 and target <= w:
                assert context == target                              # the first window: the whole prefix
    assert (times_scored[:lo + 1] == 0).all() and (times_scored[lo + 1:hi + 1] == 1).all()
    assert (times_scored[hi + 1:] == 0).all()
    if lo == 0:
        assert score_from[0] == 0 and starts[0] == 0                  # the first window scores everything
        assert len(starts) == 1 + math.ceil(max(0, hi - w) / stride)
    return times_scored


def test_sliding_windows_cover_every_target_once():
    for n, window, stride in COMBOS:
        try:
            times_scored = check_windows(n, window, stride)
            assert times_scored[0] == 0 and (times_scored[1:] == 1).all()
        except AssertionError as e:
            raise AssertionError(f"sliding_windows(n={n}, window={window}, stride={stride}): {e}") from e


CHUNK_COMBOS = [(n, window, stride, chunk)
                for n in (2, 3, 5, 17, 40, 101)
                for window in (1, 3, 8, 16)
                for stride in sorted({1, 3, window // 2 or 1, window})
                for chunk in (1, 2, 5, 7, 16, 33, 200)
                if stride <= window]


def test_sliding_windows_chunk_ranges_cover_their_targets_once():
    """The lo/hi form (one TTT chunk at a time): the windows for [lo, hi) score exactly the targets
    lo+1 .. hi, each once, every window the same length; the chunks together score the stream once."""
    for n, window, stride, chunk in CHUNK_COMBOS:
        total = np.zeros(n, dtype=int)
        for lo in range(0, n - 1, chunk):
            try:
                total += check_windows(n, window, stride, lo, min(lo + chunk, n - 1))
            except AssertionError as e:
                raise AssertionError(f"sliding_windows(n={n}, window={window}, stride={stride}, "
                                     f"lo={lo}, hi={min(lo + chunk, n - 1)}): {e}") from e
        assert total[0] == 0 and (total[1:] == 1).all(), (n, window, stride, chunk)


def test_sliding_windows_examples():
    lists = lambda *args: [a.tolist() for a in train_gpt.sliding_windows(*args)]   # noqa: E731
    # plain evaluation: contiguous chunks; a short tail is scored by a window moved back
    assert lists(9, 4, 4) == [[0, 4], [0, 0], [4, 4]]
    assert lists(11, 4, 4) == [[0, 4, 6], [0, 0, 2], [4, 4, 4]]
    # stride 2: each later window scores its last 2 targets (the tail window fewer)
    assert lists(10, 4, 2) == [[0, 2, 4, 5], [0, 2, 2, 3], [4, 4, 4, 4]]
    # stream shorter than a window: one window of all inputs
    assert lists(3, 8, 4) == [[0], [0], [2]]
    # a range [lo, hi): the first window ends `stride` after lo (full left context), then stride by stride
    assert lists(20, 8, 4, 5, 12) == [[1, 4], [4, 5], [8, 8]]
    # a range near the start: the window starts at 0, reaches forward, and scores only [lo, hi)
    assert lists(20, 8, 4, 2, 6) == [[0], [2], [6]]
    assert lists(20, 8, 4, 7, 7) == [[], [], []]


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


def reference_context_starts(n, window, stride):
    """For each target t = 1 .. n-1, the first token the model sees when scoring it: the start of
    the last window whose range starts at or before t."""
    windows = reference_windows(n, window, stride)
    return np.array([max(s for s, first in windows if first <= t) for t in range(1, n)])


def brute_force(model, tokens, tables, context_starts):
    """Per-target NLL (nats, float64) and bytes, one target at a time: target t is scored from the
    prefix tokens[context_starts[t - 1]:t] alone, by a full log-softmax over the vocabulary."""
    base, lead, boundary = tables
    nll, nbytes = [], []
    with torch.no_grad():
        for t in range(1, tokens.size):
            logits = model.logits(torch.from_numpy(tokens[context_starts[t - 1]:t])[None])[0, -1].double()
            nll.append(float(torch.logsumexp(logits, 0) - logits[tokens[t]]))
            nbytes.append(int(base[tokens[t]]) + int(lead[tokens[t]] and not boundary[tokens[t - 1]]))
    return np.array(nll), np.array(nbytes)


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
    r = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, window, stride, collect=True)
    nll, nbytes = brute_force(model, tokens, tables, reference_context_starts(n, window, stride))
    nll_sum, byte_sum = nll.sum(), int(nbytes.sum())
    assert r.val_tokens == n - 1
    assert r.val_bytes == byte_sum
    assert r.val_loss == pytest.approx(nll_sum / (n - 1), rel=1e-5)
    assert r.val_bpb == pytest.approx(nll_sum / (math.log(2) * byte_sum), rel=1e-5)
    assert r.val_bpb == pytest.approx(r.val_loss * r.val_tokens / (math.log(2) * r.val_bytes), rel=1e-12)
    # the collected per-target NLL: one per target, in stream order, each equal to the reference
    assert r.nll.dtype == np.float64 and r.nll.shape == (n - 1,)
    np.testing.assert_allclose(r.nll, nll, rtol=1e-5, atol=1e-5)
    assert r.nll.sum() == pytest.approx(r.val_loss * (n - 1), rel=1e-12)
    assert model.training                       # evaluate hands the model back in training mode


def test_collect_is_off_by_default(setup):
    hp, model, tables = setup
    tokens = np.random.default_rng(2).integers(0, VOCAB, 50).astype(np.int64)
    r = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, 16, 8)
    assert r.nll is None and r.evidence is None


def test_stride_equal_window_is_plain_chunked_evaluation(setup):
    hp, model, tables = setup
    hp.val_batch_size = 10_000
    window, chunks = 16, 6
    tokens = np.random.default_rng(5).integers(0, VOCAB, window * chunks + 1).astype(np.int64)
    r = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, window, window, collect=True)
    with torch.no_grad():
        x = torch.from_numpy(tokens[:-1]).view(chunks, window)
        y = torch.from_numpy(tokens[1:]).view(chunks, window)
        nll = F.cross_entropy(model.logits(x).double().flatten(0, 1), y.flatten(), reduction="none")
    assert r.val_loss == pytest.approx(nll.sum().item() / (window * chunks), rel=1e-6)
    np.testing.assert_allclose(r.nll, nll.numpy(), rtol=1e-5, atol=1e-6)


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


def chunked_context_starts(n, window, stride, chunk):
    """Context starts when the stream is scored one chunk of `chunk` inputs at a time (TTT): in chunk
    [a, b) the first window ends at min(b, max(a + stride, W)), each later one `stride` further (the
    last at b); a target is scored by the first window that ends after its input; windows start at
    max(0, end - W)."""
    w = min(window, n - 1)
    out = []
    for i in range(n - 1):                                # input i predicts target i + 1
        a = i // chunk * chunk
        b = min(a + chunk, n - 1)
        end = min(b, max(a + stride, w))
        while end <= i:
            end = min(b, end + stride)
        out.append(max(0, end - w))
    return np.array(out)


@pytest.mark.parametrize("chunk", [23, 7])
def test_ttt_with_zero_learning_rate_equals_brute_force(setup, chunk):
    """TTT_LR=0: the chunked, score-first evaluation changes no weight, so every target's NLL equals
    the brute-force NLL from its chunk-layout context. Chunks of 7 < the window: the first windows
    reach past their chunk and must score only its targets."""
    _, model, tables = setup
    n, window, stride = 90, 16, 5
    hp = tiny_hp(TTT_ENABLED=1, TTT_CHUNK_TOKENS=window, TTT_LR=0, TTT_EPOCHS=1, VAL_BATCH_SIZE=3 * 16)
    tokens = np.random.default_rng(11).integers(0, VOCAB, n).astype(np.int64)
    fresh = random_gpt(hp, seed=1)
    before = train_gpt.state_checksum(fresh.state_dict())
    ttt = train_gpt.TestTimeTrainer(hp, cpu_runtime(), fresh, fresh, window)
    hp.ttt_chunk_tokens = chunk                 # below the window read_settings insists on (TTT would not train)
    trained = []
    real_adapt = ttt.adapt
    ttt.adapt = lambda tokens, bos_cum, a, k, n_chunks, evidence: trained.append(k) or real_adapt(tokens, bos_cum, a, k, n_chunks, evidence)
    r = train_gpt.evaluate(hp, cpu_runtime(), fresh, tokens, tables, window, stride, ttt=ttt, collect=True)
    assert train_gpt.state_checksum(fresh.state_dict()) == before
    nll, nbytes = brute_force(model, tokens, tables, chunked_context_starts(n, window, stride, chunk))
    assert r.val_tokens == n - 1 and r.val_bytes == int(nbytes.sum())
    np.testing.assert_allclose(r.nll, nll, rtol=1e-5, atol=1e-5)
    assert r.val_loss == pytest.approx(nll.mean(), rel=1e-5)
    assert trained == list(range(math.ceil((n - 1) / chunk) - 1))          # every chunk but the last


def _distributed_eval(rank, world_size, n, window, stride, val_batch):
    hp = tiny_hp(VAL_BATCH_SIZE=val_batch)
    model = random_gpt(hp, seed=1)
    tokens = np.random.default_rng(3).integers(0, VOCAB, n).astype(np.int64)
    rng = np.random.default_rng(0)
    tables = (rng.integers(0, 4, VOCAB).astype(np.int64), rng.random(VOCAB) < 0.5, rng.random(VOCAB) < 0.2)
    rt = cpu_runtime(rank=rank, world_size=world_size, distributed=True)
    r = train_gpt.evaluate(hp, rt, model, tokens, tables, window, stride, collect=True)
    single = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, window, stride, collect=True)
    return (r.val_loss, r.val_bpb, r.val_tokens, r.val_bytes), (single.val_loss, single.val_bpb), r.nll, single.nll


@pytest.mark.slow
def test_evaluate_on_three_ranks_equals_one_rank():
    """Windows split unevenly over 3 gloo ranks (10 windows, batches of 2): same result everywhere,
    and the per-target NLL gathered from the ranks is the single-process one, in stream order."""
    results = run_distributed(_distributed_eval, 3, 101, 16, 10, 2 * 3 * 16)
    (loss, bpb, n_tok, n_bytes), (single_loss, single_bpb), nll, single_nll = results[0]
    assert n_tok == 100
    for (other, _single, _nll, _) in results:
        assert other == (loss, bpb, n_tok, n_bytes)
    # to float rounding: each rank's forwards hold fewer windows than the single process's
    assert loss == pytest.approx(single_loss, rel=1e-6) and bpb == pytest.approx(single_bpb, rel=1e-6)
    assert nll.shape == (100,)
    np.testing.assert_allclose(nll, single_nll, rtol=1e-6, atol=1e-9)


# --- projected 8xH100 evaluation time -------------------------------------------------------------

H100_SECONDS_PER_FLOP = 1 / (8 * 989e12 * 0.08)      # EVAL_FORWARD_MFU, from #1855's quantized diagnostic pass


def test_projected_eval_time_and_the_limit():
    """eval_projection's parts: the plain pass and the scoring windows at EVAL_FORWARD_MFU (a third of the training
    FLOPs per token), whole-model TTT at TTT_ASSUMED_MFU (forward + backward), the fixed load and compile
    assumptions; refused only when the passes TTT cannot shed are over the limit."""
    hp = tiny_hp(EVAL_TIME_LIMIT_SECONDS=0, TTT_ENABLED=0, EVAL_MODE="sliding")
    n, w, stride = 1001, 16, 4
    tokens = np.random.default_rng(0).integers(2, VOCAB, n).astype(np.int64)
    windows = 1 + math.ceil((n - 1 - w) / stride)                         # 247
    plain = math.ceil((n - 1) / hp.train_seq_len) * hp.train_seq_len     # the plain pass (quantization gap)
    forward = lambda T: 2 * train_gpt.matmul_params(hp) + 2 * train_gpt.effective_layers(hp) * T * hp.model_dim  # noqa: E731
    lines = []
    parts = train_gpt.check_eval_budget(hp, tokens, n, w, stride, lines.append)
    assert parts["plain"] + parts["scoring"] == pytest.approx((windows * w * forward(w) + plain * forward(hp.train_seq_len))
                                                              * H100_SECONDS_PER_FLOP, rel=1e-12)
    assert parts["total"] == pytest.approx(parts["plain"] + parts["scoring"] + train_gpt.EVAL_LOAD_ASSUMED_S
                                           + train_gpt.EVAL_COMPILE_ASSUMED_S, rel=1e-12)
    assert len(lines) == 1 and lines[0].startswith("projected_8xH100_eval:")
    # whole-model TTT adds TTT_EPOCHS training steps over every chunk but the last, at TTT_ASSUMED_MFU
    ttt = tiny_hp(TTT_ENABLED=1, TTT_METHOD="whole", TTT_EPOCHS=3, TTT_CHUNK_TOKENS=64, EVAL_MODE="sliding")
    chunks = math.ceil((n - 1) / 64)                                    # 16: 15 trained on
    assert train_gpt.eval_projection(ttt, tokens, n, w, stride)["ttt"] == pytest.approx(
        3 * (chunks - 1) * 64 * train_gpt.flops_per_token(ttt, w) / (8 * 989e12 * train_gpt.TTT_ASSUMED_MFU), rel=1e-12)
    # a larger split scales every data-dependent part
    doubled = train_gpt.eval_projection(hp, tokens, 2 * n, w, stride)
    assert doubled["scoring"] == pytest.approx(2 * parts["scoring"], rel=1e-12)
    # the limit: refused just below what TTT cannot shed, accepted above it, never checked at 0
    must = parts["plain"] + parts["scoring"]
    for limit, refused in ((must * 0.999, True), (must * 1.001, False), (0.0, False)):
        hp.eval_time_limit_seconds = limit
        if refused:
            with pytest.raises(train_gpt.PipelineError, match="EVAL_TIME_LIMIT_SECONDS"):
                train_gpt.check_eval_budget(hp, tokens, n, w, stride, lines.append)
        else:
            assert train_gpt.check_eval_budget(hp, tokens, n, w, stride, lines.append) == parts


def test_lora_schedule_by_hand():
    """Batches of 2 documents (longest first): [100, 30] then [5]; chunks of 48, window 64 (rows of 8, 16, 32 or
    64). Step 1 scores chunk 0 of both (they need 48 and 30 inputs: rows of 64); the 30 has ended, its row sits
    empty while the 100 goes on: step 2 its second chunk (ends at 96: the last 64 inputs), step 3 its last 4
    targets; then the [5] batch in one step of rows of 8. A document's last chunk never learns."""
    batches = [np.array([[0, 100], [100, 130]]), np.array([[130, 135]])]
    schedule = train_gpt.LoRASchedule(batches, rows=2, chunk=48, window=64)
    plans = []
    while not schedule.done():
        step = schedule.plan()
        plans.append((step.length, step.start.tolist(), step.valid.tolist(), step.score_from.tolist(),
                      step.score_to.tolist(), step.learn.tolist(), step.fresh.tolist()))
        schedule.advance()
    assert plans == [(64, [0, 100], [64, 30], [0, 0], [48, 30], [True, False], [True, True]),
                     (64, [32, 0], [64, 0], [16, 0], [64, 0], [True, False], [False, False]),
                     (64, [36, 0], [64, 0], [60, 0], [64, 0], [False, False], [False, False]),
                     (8, [130, 0], [5, 0], [0, 0], [5, 0], [False, False], [True, False])]
    assert train_gpt.lora_schedule_work(batches, 2, 48, 64) == (4, 3 * 128 + 16)
    assert train_gpt.lora_lengths(64) == [8, 16, 32, 64]


def test_lora_batches_are_dealt_to_balance_the_ranks():
    """lora_batches: consecutive runs of `rows` documents (longest first), the costliest batch first, each to the
    rank with the least work so far: the one long document's batch to one rank, the short ones to the other."""
    lengths = [400, 30, 30, 30, 30, 30, 30]
    ends = np.cumsum(lengths)
    spans = np.stack([ends - lengths, ends], axis=1)
    ranks = train_gpt.lora_batches(spans, 2, 16, 64, 2)
    assert [[b[:, 1] - b[:, 0] for b in mine] for mine in map(list, ranks)][0][0].tolist() == [400, 30]
    assert sorted(len(b) for b in ranks[1]) == [1, 2, 2]
    assert sum(len(b) for mine in ranks for b in mine) == len(lengths)


@pytest.mark.parametrize("env,low,high", [
    ({}, 450, 750),                                                 # LoRA TTT: most of the projection
    ({"TTT_METHOD": "whole"}, 300, 550),
    ({"TTT_ENABLED": "0"}, 120, 250),
    ({"PRESET": "stack1024"}, 120, 250)])
def test_default_configuration_is_not_refused(env, low, high):
    """The defaults on sp8192's 40,540,160 validation tokens (a synthetic stream of documents of 600 tokens on
    average stands for it): what must fit (the plain pass and scoring without TTT) is inside EVAL_TIME_LIMIT_SECONDS
    (570), so they are not refused; the whole projection, TTT included, lies in a sane band (the default's, ~580 s,
    is over the limit: the run-time budget cuts TTT's tail, docs/evaluation.md)."""
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.geometric(1 / 600, 400), 20_000)
    tokens = np.concatenate([np.concatenate(([1], rng.integers(2, 8192, n - 1))) for n in lengths]).astype(np.int64)
    hp, _ = train_gpt.read_settings(env)
    assert hp.eval_time_limit_seconds == 570.0
    parts = train_gpt.check_eval_budget(hp, tokens, 40_540_160, *train_gpt.eval_geometry(hp), lambda line: None)
    assert parts["plain"] + parts["scoring"] + parts["audit"] < 570 and low < parts["total"] < high, parts


# --- per-document evaluation (EVAL_MODE=documents) -------------------------------------------------

def stream_of_documents(n: int, seed: int, shortest: int = 2, longest: int = 40) -> np.ndarray:
    """n tokens: documents of random lengths (some longer than a 16-token window), each [BOS] + tokens
    that are never BOS; the stream starts with a BOS, as the validation shards do."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, VOCAB, n).astype(np.int64)
    p = 0
    while p < n:
        tokens[p] = train_gpt.BOS_ID
        p += int(rng.integers(shortest, longest + 1))
    return tokens


def document_context_starts(tokens: np.ndarray, window: int, stride: int) -> np.ndarray:
    """For each target t = 1 .. n-1 (input p = t - 1), the first token the documented per-document rule lets
    the model see, enumerated independently: its document's start d (the last BOS at or before p) while p is
    within the first window of the document; after that, sliding windows inside the document end at
    d + w + k * stride (or the document's end), and a target is scored by the first one that reaches it."""
    n_inputs = tokens.size - 1
    w = min(window, n_inputs)
    bos = [i for i in range(n_inputs) if tokens[i] == train_gpt.BOS_ID]
    out = []
    for p in range(n_inputs):
        d = max([b for b in bos if b <= p], default=0)
        q = min([b for b in bos if b > p], default=n_inputs)
        if p < d + w:
            out.append(d)
        else:
            end = min(q, d + w + math.ceil((p + 1 - d - w) / stride) * stride)
            out.append(end - w)
    return np.array(out)


@pytest.mark.parametrize("n,window,stride,chunk", [(160, 16, 4, 0), (160, 16, 16, 0), (97, 16, 3, 0),
                                                   (160, 16, 4, 37), (12, 16, 4, 0)])
def test_document_windows_cover_every_target_once_from_its_own_document(n, window, stride, chunk):
    """Every target of each range once; a target within a window of its document's start sees the whole
    document before it (the window starts at or before the document's start, so on a model that isolates
    documents it sees exactly that prefix); one later in a long document sees at least window - stride
    tokens of it and nothing before it; a window never runs past the stream."""
    tokens = stream_of_documents(n, seed=n + stride)
    w = min(window, n - 1)
    ranges = [(a, min(a + chunk, n - 1)) for a in range(0, n - 1, chunk)] if chunk else [(0, n - 1)]
    coverage = np.zeros(n, dtype=np.int64)
    bos = np.flatnonzero(tokens[:-1] == train_gpt.BOS_ID)
    for lo, hi in ranges:
        starts, first, last = train_gpt.document_windows(tokens, window, stride, lo, hi)
        assert ((starts >= 0) & (starts + w <= n - 1) & (0 <= first) & (first < last) & (last <= w)).all()
        for s, f, l in zip(starts, first, last):
            for p in range(s + f, s + l):
                assert lo <= p < hi
                coverage[p + 1] += 1
                d = bos[bos <= p].max(initial=0)
                if p < d + w:
                    assert s <= d or s == n - 1 - w      # (moved back only at the stream's end)
                else:
                    assert s >= d and p - s >= w - stride
    assert coverage[0] == 0 and (coverage[1:] == 1).all()


@pytest.mark.parametrize("n,window,stride,val_batch", [(160, 16, 4, 10_000), (160, 16, 4, 2 * 16),
                                                       (97, 16, 16, 10_000)])
def test_documents_evaluation_equals_one_document_at_a_time(setup, n, window, stride, val_batch):
    """EVAL_MODE=documents against the hand-written reference: each target scored from a forward of its own
    document's tokens alone (document_context_starts), one target at a time; exact bytes; the same count of
    targets and bytes as the sliding evaluation of the same stream."""
    hp, model, tables = setup
    hp.val_batch_size = val_batch
    tokens = stream_of_documents(n, seed=n)
    r = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, window, stride, collect=True, mode="documents")
    nll, nbytes = brute_force(model, tokens, tables, document_context_starts(tokens, window, stride))
    assert r.val_tokens == n - 1 and r.val_bytes == int(nbytes.sum())
    np.testing.assert_allclose(r.nll, nll, rtol=1e-5, atol=1e-5)
    assert r.val_bpb == pytest.approx(nll.sum() / (math.log(2) * nbytes.sum()), rel=1e-5)
    sliding = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, window, stride, mode="sliding")
    assert (sliding.val_tokens, sliding.val_bytes) == (r.val_tokens, r.val_bytes)
    assert abs(sliding.val_loss - r.val_loss) > 1e-4          # a different context: a different score


def test_documents_evaluation_of_a_leaky_model_differs_from_the_reference(setup):
    """The reference can fail: a model that attends across documents (ATTN_DOC_ISOLATION=0) packed by the
    document schedule sees the documents before it in a window, and its NLLs differ from one document alone."""
    hp, _, tables = setup
    leaky = random_gpt(tiny_hp(ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole"), seed=1)
    tokens = stream_of_documents(160, seed=160)
    r = train_gpt.evaluate(hp, cpu_runtime(), leaky, tokens, tables, 16, 4, collect=True, mode="documents")
    nll, _ = brute_force(leaky, tokens, tables, document_context_starts(tokens, 16, 4))
    assert np.abs(r.nll - nll).max() > 1e-2


def test_documents_mode_needs_document_isolation():
    with pytest.raises(train_gpt.PipelineError, match="EVAL_MODE=documents needs ATTN_DOC_ISOLATION=1"):
        tiny_hp(ATTN_DOC_ISOLATION=0, TTT_METHOD="whole")
    assert tiny_hp(ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole").eval_mode == "sliding"
    with pytest.raises(train_gpt.PipelineError, match="EVAL_MODE"):
        tiny_hp(EVAL_MODE="docs")


def test_documents_evaluation_with_zero_lr_ttt_equals_without(setup):
    """Whole-model TTT chunks cut documents: a document continued in the next chunk keeps its context from
    its own start (the chunk before is already scored). With TTT_LR=0 the per-target NLLs equal the
    evaluation without TTT. (Documents no longer than the window: inside a longer one, a chunk's edge moves
    the sliding windows, which changes the context of a few targets, as in the sliding evaluation.)"""
    hp, model, tables = setup
    tokens = stream_of_documents(160, seed=5, longest=16)
    ttt_hp = tiny_hp(TTT_ENABLED=1, TTT_CHUNK_TOKENS=37, TTT_LR=0.0, TTT_EPOCHS=1)
    ttt = train_gpt.TestTimeTrainer(ttt_hp, cpu_runtime(), model, model, 16)
    with_ttt = train_gpt.evaluate(ttt_hp, cpu_runtime(), model, tokens, tables, 16, 4, ttt=ttt, collect=True,
                                  mode="documents")
    plain = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, tables, 16, 4, collect=True, mode="documents")
    np.testing.assert_allclose(with_ttt.nll, plain.nll, rtol=1e-5, atol=1e-6)
