"""Model and optimizer: FLOP count, the flash-attn call site, bf16 autocast, torch.compile,
Newton-Schulz, and distributed Muon against single-process Muon."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import train_gpt
from _helpers import cpu_runtime, random_gpt, run_distributed, tiny_hp


def reference_attention(q, k, v, causal=True):
    """Stand-in for flash_attn_func: q (B, T, H, D), k/v (B, T, Hkv, D), GQA by repeating each kv head
    for H // Hkv consecutive query heads; explicit masked softmax."""
    assert causal is True
    B, T, H, D = q.shape
    k = k.repeat_interleave(H // k.size(2), dim=2)
    v = v.repeat_interleave(H // v.size(2), dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(D)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, v.float()).to(q.dtype)


# --- FLOPs -------------------------------------------------------------------------------------

def measured_flops_per_token(model, T, batch=2):
    x = torch.randint(0, model.tok_emb.num_embeddings, (batch, T), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, x).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / (batch * T)


@pytest.mark.parametrize("T", [16, 128])
def test_flops_per_token_matches_flop_counter(monkeypatch, T):
    """flops_per_token = 6 N + 6 L T d. FlopCounterMode counts matmuls forward + backward.

    Deliberate differences: (1) PyTorch's CPU SDPA kernel has no FLOP formula, so attention is
    measured through the explicit stand-in, whose T x T score matmuls count the masked (future)
    half too: the counter sees 12 L T d where a causal kernel does 6 L T d, the formula's term;
    (2) N counts the weights of matmuls only (not the BigramHash table, a lookup), with the layers
    that depth recurrence repeats counted once per pass (recurrence is on here: order 0, 0, 0, 1; layer 1 is a
    two-lane parallel block)."""
    hp = tiny_hp(MODEL_DIM=64, NUM_HEADS=4, NUM_KV_HEADS=2, VOCAB_SIZE=256, TRAIN_SEQ_LEN=T, RECUR_PASSES=3,
                 SMEAR_GATE_DIMS=0, ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole")               # SmearGate's 12-weight gate: left out of the formula on purpose
    model = train_gpt.GPT(hp)
    model.recurrence_on = True
    passes = {i: model.layer_order().count(i) for i in range(hp.num_layers)}
    linear = measured_flops_per_token(model, T)                     # SDPA: matmuls of the linears only
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", reference_attention)
    model.set_attention_backend("flash")
    with train_gpt.autocast(cpu_runtime(autocast_dtype=torch.bfloat16)):   # flash runs only in 16-bit
        with_attention = measured_flops_per_token(model, T)
    attention_full = with_attention - linear
    L, d = sum(passes.values()), hp.model_dim
    assert L == 4
    assert attention_full == pytest.approx(12 * L * T * d, rel=1e-9)   # QK^T and PV, fwd + 2x bwd, full square
    block_weights = [sum(m.weight.numel() for m in b.modules() if isinstance(m, torch.nn.Linear)) for b in model.blocks]
    matmul_params = (model.tok_emb.weight.numel() + model.bigram.proj.weight.numel()
                     + sum(passes[i] * block_weights[i] for i in passes))
    assert linear == pytest.approx(6 * matmul_params, rel=1e-9)       # 2 N forward + 4 N backward
    formula = train_gpt.flops_per_token(hp, T)
    causal_measured = linear + attention_full / 2
    assert formula == pytest.approx(causal_measured, rel=1e-9)        # exact: every matmul is counted


# --- attention backends --------------------------------------------------------------------------

@pytest.mark.parametrize("heads,kv_heads,with_lse", [(4, 2, False), (4, 1, False), (4, 4, False), (4, 2, True)])
def test_flash_call_site_equals_sdpa(monkeypatch, heads, kv_heads, with_lse):
    hp = tiny_hp(NUM_HEADS=heads, NUM_KV_HEADS=kv_heads, ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole")     # the dense kernel
    model = random_gpt(hp, seed=2)
    x = torch.randint(0, hp.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), train_gpt.autocast(cpu_runtime(autocast_dtype=torch.bfloat16)):
        sdpa = model.logits(x)
    calls = []

    def fake_flash(q, k, v, causal=True):
        calls.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        out = reference_attention(q, k, v, causal=causal)
        return (out, torch.zeros(q.shape[:3])) if with_lse else out     # some FA3 builds return (out, lse)

    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", fake_flash)
    model.set_attention_backend("flash")
    with torch.no_grad(), train_gpt.autocast(cpu_runtime(autocast_dtype=torch.bfloat16)):
        flash = model.logits(x)
    D = hp.model_dim // heads
    assert calls == [((3, 16, heads, D), (3, 16, kv_heads, D), (3, 16, kv_heads, D))] * hp.num_layers
    # both run in bf16 (logits ~5 in size): the mean gap is bf16 rounding, ~0.01
    assert (flash - sdpa).abs().mean() < 0.03
    # the comparison is sensitive to the kv-head mapping: a wrong GQA grouping gives other logits (~0.5 apart)
    if kv_heads not in (1, heads):
        monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", lambda q, k, v, causal=True: reference_attention(
            q, k.repeat(1, 1, heads // kv_heads, 1), v.repeat(1, 1, heads // kv_heads, 1)))
        with torch.no_grad(), train_gpt.autocast(cpu_runtime(autocast_dtype=torch.bfloat16)):
            assert (model.logits(x) - sdpa).abs().mean() > 0.2


def strict_flash_attn_func(q, k, v, causal=False):
    """A strict stand-in for flash_attn_func: refuses what FA2/FA3 refuse (any dtype but fp16/bf16,
    q, k and v of different dtypes, a layout other than (B, T, H, D) with a contiguous last dim,
    k/v heads that do not divide the q heads), then computes the reference attention."""
    for t in (q, k, v):
        if t.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"FlashAttention only supports fp16 and bf16, got {t.dtype}")
        if t.ndim != 4 or t.stride(-1) != 1:
            raise RuntimeError("FlashAttention needs (batch, seq, heads, dim) with a contiguous last dimension")
    if not q.dtype == k.dtype == v.dtype:
        raise RuntimeError(f"query, key and value must have the same dtype: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]:
        raise RuntimeError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    return reference_attention(q, k, v, causal)


def cuda_autocast_rms_norm(monkeypatch):
    """Make F.rms_norm behave as under CUDA autocast (torch >= 2.12 runs it in fp32 and returns fp32);
    CPU autocast keeps it in the input's dtype, so without this no CPU test sees fp32 q and k."""
    real = torch.nn.functional.rms_norm

    def fp32_rms_norm(x, normalized_shape, weight=None, eps=None):
        return real(x.float(), normalized_shape, weight, eps)

    monkeypatch.setattr(torch.nn.functional, "rms_norm", fp32_rms_norm)


def test_flash_path_survives_cuda_autocast_dtypes(monkeypatch):
    """Hazard: with CUDA autocast q and k reach flash_attn_func in fp32 while v is bf16; FA2/FA3 crash at
    the first forward. The strict stand-in, driven under bf16 autocast with fp32 rms_norm, must accept every
    call, forward and backward, and agree with SDPA under the same autocast (the varlen kernel: below)."""
    hp = tiny_hp(NUM_HEADS=4, NUM_KV_HEADS=2, ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole")
    model = random_gpt(hp, seed=2)
    x = torch.randint(0, hp.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    rt = cpu_runtime(autocast_dtype=torch.bfloat16)
    cuda_autocast_rms_norm(monkeypatch)
    assert torch.nn.functional.rms_norm(torch.ones(2, 4, dtype=torch.bfloat16), (4,)).dtype == torch.float32
    with train_gpt.autocast(rt):
        sdpa = model(x, x)
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", strict_flash_attn_func)
    model.set_attention_backend("flash")
    with train_gpt.autocast(rt):
        flash = model(x, x)
    flash.mean().backward()
    assert all(p.grad is not None for p in model.blocks[0].attn.parameters())
    assert (flash - sdpa.detach()).abs().mean() < 0.01 * sdpa.abs().mean()


def test_flash_only_with_a_16_bit_compute_dtype(monkeypatch):
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", strict_flash_attn_func)
    cuda = torch.device("cuda", 0)
    assert train_gpt.attention_backend(cuda, torch.bfloat16) == "flash"
    assert train_gpt.attention_backend(cuda, None) == "sdpa"          # COMPUTE_DTYPE=fp32: FA has no fp32 kernel
    assert train_gpt.attention_backend(torch.device("cpu"), torch.bfloat16) == "sdpa"
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", None)
    assert train_gpt.attention_backend(cuda, torch.bfloat16) == "sdpa"


# --- document isolation (ATTN_DOC_ISOLATION) -------------------------------------------------------

def rows_with_documents(vocab: int, seed: int = 4):
    """Two rows of 16 tokens: row 0 holds documents at 0, 4 and 9 (BOS = 1); row 1 starts mid-document
    (the tail of one begun earlier) and has a BOS at 7. No other token is a BOS."""
    x = torch.randint(2, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    x[0, [0, 4, 9]] = train_gpt.BOS_ID
    x[1, 7] = train_gpt.BOS_ID
    return x, [(0, 0, 4), (0, 4, 9), (0, 9, 16), (1, 0, 7), (1, 7, 16)]


def isolation_gap(model, x, segments) -> float:
    """Largest |logit difference| between each document's positions in the packed rows and the same document
    run alone (the hand-written reference: one forward per document)."""
    with torch.no_grad():
        packed = model.logits(x)
        return max((packed[r, a:b] - model.logits(x[r:r + 1, a:b])[0]).abs().max().item() for r, a, b in segments)


def test_document_isolation_equals_one_forward_per_document():
    """Every piece that could read across a BOS is on (BigramHash, SmearGate with its gate, the attention gate,
    XSA, depth recurrence, a two-lane parallel block): the packed rows give each document the logits it gets
    alone. The same model with ATTN_DOC_ISOLATION=0 does not (the check can fail)."""
    hp = tiny_hp()
    assert hp.attn_doc_isolation == 1 and hp.bigram_vocab and hp.smear_gate
    x, segments = rows_with_documents(hp.vocab_size)
    for recurrence in (False, True):
        model = random_gpt(hp, seed=5)
        model.recurrence_on = recurrence
        assert isolation_gap(model, x, segments) < 1e-5
    leaky = random_gpt(tiny_hp(ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole"), seed=5)
    assert isolation_gap(leaky, x, segments) > 1e-2


def test_document_isolation_in_training_gradients():
    """Training uses the same forward: the loss of the second document's targets has no gradient through the
    first document's input embeddings (the token embeddings at its positions)."""
    x = torch.tensor([[1, 10, 11, 12, 13, 1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]])
    for isolation, leaks in ((1, False), (0, True)):
        model = random_gpt(tiny_hp(ATTN_DOC_ISOLATION=isolation, EVAL_MODE="sliding", TTT_METHOD="whole"), seed=6).train()
        seen = []
        model.tok_emb.register_forward_hook(lambda m, i, out: seen.append(out) or out.retain_grad())
        nll = model(x[:, :-1], x[:, 1:])
        nll[:, 5:].sum().backward()          # targets of the second document only (inputs 5 ..)
        grad = seen[0].grad[0, :5].abs().max().item()      # the first document's input positions
        assert (grad > 1e-6) == leaks, (isolation, grad)


def test_document_ids_and_cu_seqlens():
    x, _ = rows_with_documents(64)
    docs = train_gpt.document_ids(x)
    assert docs[0].tolist() == [1] * 4 + [2] * 5 + [3] * 7 and docs[1].tolist() == [0] * 7 + [1] * 9
    assert train_gpt.count_segments(x.numpy()) == 5                      # row starts and the BOS after them
    capacity = train_gpt.varlen_capacity(2, 16, 5)
    assert capacity == 2 * 16 + 1                                        # the base: min(T, 16) per row
    cu, overflow = train_gpt.varlen_cu_seqlens(docs, capacity)
    assert cu.dtype == torch.int32 and cu.numel() == capacity and not overflow
    assert cu.tolist() == [0, 4, 9, 16, 23] + [32] * 28                  # segment starts, then empty segments
    cu, overflow = train_gpt.varlen_cu_seqlens(docs, 4)                  # a capacity too small: flagged, and
    assert cu.tolist() == [0, 16, 32, 32] and bool(overflow)             # the rows alone (no segment past T)


def strict_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
    """A strict stand-in for flash_attn_varlen_func: refuses what FA2/FA3 refuse (16-bit q, k, v of one dtype as
    (total, heads, dim); int32 1-D cu_seqlens from 0 to total, non-decreasing; no segment longer than
    max_seqlen), then runs the reference attention on each segment alone, as varlen does."""
    total, H, D = q.shape
    for t in (q, k, v):
        if t.dtype not in (torch.float16, torch.bfloat16) or t.dtype != q.dtype or t.ndim != 3 or t.stride(-1) != 1:
            raise RuntimeError(f"varlen needs 16-bit (total, heads, dim) tensors of one dtype, got {t.dtype} {tuple(t.shape)}")
    if k.shape[0] != total or H % k.shape[1]:
        raise RuntimeError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)} do not match")
    for cu in (cu_seqlens_q, cu_seqlens_k):
        if cu.dtype != torch.int32 or cu.ndim != 1 or cu[0] != 0 or cu[-1] != total or (cu.diff() < 0).any():
            raise RuntimeError(f"bad cu_seqlens {cu.tolist()}")
    if not torch.equal(cu_seqlens_q, cu_seqlens_k) or max(cu_seqlens_q.diff().max().item(), 0) > min(max_seqlen_q, max_seqlen_k):
        raise RuntimeError("segments longer than max_seqlen, or q and k segmented differently")
    assert causal is True
    out = torch.zeros_like(q)
    for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist()):
        if b > a:
            out[a:b] = reference_attention(q[None, a:b], k[None, a:b], v[None, a:b])[0]
    return out


def test_varlen_call_site_equals_masked_sdpa(monkeypatch):
    """The CUDA branch (flash_attn_varlen_func over the flattened batch) computes what the SDPA block-diagonal
    mask computes, forward and backward; a varlen that ignored the segments (one per row) would not."""
    hp = tiny_hp(BIGRAM_VOCAB=0)
    model = random_gpt(hp, seed=2)
    x, _ = rows_with_documents(hp.vocab_size)
    rt = cpu_runtime(autocast_dtype=torch.bfloat16)
    cuda_autocast_rms_norm(monkeypatch)
    with torch.no_grad(), train_gpt.autocast(rt):
        sdpa = model.logits(x)
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", None)      # the dense kernel must not be called
    monkeypatch.setattr(train_gpt, "FLASH_VARLEN_FUNC", strict_varlen_func)
    model.set_attention_backend("flash")
    with train_gpt.autocast(rt):
        flash = model.logits(x, None, train_gpt.capacity_of(x))
    flash.mean().backward()
    assert all(p.grad is not None for p in model.blocks[0].attn.parameters())
    assert (flash.detach() - sdpa).abs().mean() < 0.03       # bf16 rounding
    whole_rows = lambda q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal: strict_varlen_func(
        q, k, v, *[torch.arange(0, q.size(0) + 1, 16, dtype=torch.int32)] * 2, max_seqlen_q, max_seqlen_k, causal)
    monkeypatch.setattr(train_gpt, "FLASH_VARLEN_FUNC", whole_rows)
    with torch.no_grad(), train_gpt.autocast(rt):
        assert (model.logits(x, None, train_gpt.capacity_of(x)) - sdpa).abs().mean() > 0.1


def test_document_isolation_without_varlen_is_an_error(monkeypatch):
    cuda = torch.device("cuda", 0)          # a device object only: nothing runs on it
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", strict_flash_attn_func)
    monkeypatch.setattr(train_gpt, "FLASH_VARLEN_FUNC", None)
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_SOURCE", "flash_attn 2.0.0")
    with pytest.raises(train_gpt.PipelineError, match="ATTN_DOC_ISOLATION=0"):
        train_gpt.check_attention_backend(tiny_hp(), cuda, "flash")
    assert train_gpt.check_attention_backend(tiny_hp(ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole"), cuda, "flash") == "attention: flash (flash_attn 2.0.0)"


def test_attention_is_causal():
    hp = tiny_hp()
    model = random_gpt(hp, seed=3)
    x = torch.randint(0, hp.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % hp.vocab_size
    with torch.no_grad():
        a, b = model.logits(x), model.logits(y)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_attention_backend_choice():
    assert train_gpt.attention_backend(torch.device("cpu"), None) == "sdpa"
    model = train_gpt.build_model(tiny_hp(), cpu_runtime())
    assert {b.attn.backend for b in model.blocks} == {"sdpa"}


def test_forward_is_per_token_cross_entropy():
    hp = tiny_hp()
    model = random_gpt(hp, seed=4)
    x = torch.randint(0, hp.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, hp.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        nll = model(x, y)
        logits = model.logits(x)
    assert nll.shape == (2, 16) and nll.dtype == torch.float32
    assert logits.abs().max() <= hp.logit_softcap
    expected = -torch.log_softmax(logits.double(), -1).gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(nll.double(), expected, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_forward_close_to_fp32():
    hp = tiny_hp()
    model = random_gpt(hp, seed=5)
    x = torch.randint(0, hp.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, hp.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        fp32 = model(x, y)
        with train_gpt.autocast(cpu_runtime(autocast_dtype=torch.bfloat16)):
            bf16 = model(x, y)
            inner_dtype = model.blocks[0].attn.c_q(torch.randn(1, hp.model_dim)).dtype
    assert inner_dtype == torch.bfloat16                  # autocast really was on
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().max() < 0.01 * fp32.abs().max()
    assert (bf16.mean() - fp32.mean()).abs() < 0.002 * fp32.mean()
    with train_gpt.autocast(cpu_runtime()):              # fp32 runtime: autocast off
        assert model.blocks[0].attn.c_q(torch.randn(1, hp.model_dim)).dtype == torch.float32


@pytest.mark.slow
def test_torch_compile_matches_eager():
    hp = tiny_hp()
    model = random_gpt(hp, seed=6)
    x = torch.randint(0, hp.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        eager, comp = model(x, x), compiled(x, x)
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-4)


# --- Muon ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (128, 64), (16, 128)])
def test_newton_schulz_orthogonalises(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    if shape[0] == shape[1]:   # keep a square test matrix well conditioned (5 steps cannot lift sv ~ 1e-4)
        u, _, vh = torch.linalg.svd(g)
        g = u @ torch.diag(torch.linspace(0.1, 3.0, shape[0])) @ vh
    out = train_gpt.zeropower_newton_schulz(g, steps=5)
    assert out.shape == g.shape and out.dtype == torch.float32
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.5 and sv.max() < 1.5, sv
    # same singular vectors as g: U^T out V is diagonal (the polar factor, up to the sv band)
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    core = u.T @ out.double() @ vh.T
    off_diagonal = core - torch.diag(torch.diagonal(core))
    assert off_diagonal.abs().max() < 1e-4
    assert ((torch.diagonal(core) > 0.5) & (torch.diagonal(core) < 1.5)).all()


MUON_SHAPES = [(32, 16), (16, 48), (24, 24), (64, 8), (8, 8)]   # 5 matrices: uneven split over 2 ranks


def _muon_updates(rank, world_size, steps):
    """Parameters after `steps` Muon steps on fixed pseudo-random gradients (the same on all ranks)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in MUON_SHAPES]
    opt = train_gpt.Muon(params, lr=0.05, momentum=0.9, backend_steps=5, rank=rank, world_size=world_size)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params]


def reference_muon(steps, lr=0.05, momentum=0.9):
    """Muon written out: Nesterov momentum, Newton-Schulz, scale sqrt(max(1, rows/cols))."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in MUON_SHAPES]
    bufs = [torch.zeros_like(p) for p in params]
    for _ in range(steps):
        for i, p in enumerate(params):
            grad = torch.randn(p.shape, generator=gen)
            bufs[i] = momentum * bufs[i] + grad
            update = train_gpt.zeropower_newton_schulz(grad + momentum * bufs[i], 5)
            params[i] = p - lr * update * max(1.0, p.shape[0] / p.shape[1]) ** 0.5
    return params


def test_single_process_muon_matches_the_written_out_update():
    for got, want in zip(_muon_updates(0, 1, 3), reference_muon(3)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_distributed_muon_equals_single_process():
    single = _muon_updates(0, 1, 3)
    per_rank = run_distributed(_muon_updates, 2, 3)
    for rank_params in per_rank:
        for got, want in zip(rank_params, single):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
