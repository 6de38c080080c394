"""The integers' entropy coder (rANS with per-context tables, train_gpt's rans_* / coding_*): exact round
trips, sizes at the entropy it claims, loud failures on corrupt input, and the artifact that uses it."""

from __future__ import annotations

import io
import json
import lzma

import numpy as np
import pytest
import torch

import train_gpt
from train_gpt import PipelineError


def laplace_symbols(n: int, contexts: int, seed: int = 0):
    """Symbols 0..62 (int6 integers + 31) whose spread depends on their context, and the contexts."""
    rng = np.random.default_rng(seed)
    ctx = rng.integers(0, contexts, n)
    q = np.clip(np.round(rng.laplace(0.0, 1.0 + 2.0 * ctx, n)), -31, 31).astype(np.int64)
    return q + 31, ctx


def tables(symbols, ctx, contexts, alphabet=63):
    counts = np.zeros((contexts, alphabet), dtype=np.int64)
    np.add.at(counts, (ctx, symbols), 1)
    return counts, train_gpt.rans_frequencies(counts)


def conditional_entropy_bytes(counts) -> float:
    """sum over contexts of n_c H(symbols | c), in bytes: the size an ideal static coder reaches."""
    total = 0.0
    for c in counts:
        p = c[c > 0] / c.sum()
        total -= (c[c > 0] * np.log2(p)).sum()
    return total / 8


@pytest.mark.parametrize("n", [0, 1, 31, 4096, 200_003])
def test_rans_round_trips_exactly(n):
    symbols, ctx = laplace_symbols(n, 4, seed=n)
    _, freqs = tables(symbols, ctx, 4)
    states, words = train_gpt.rans_encode(symbols, ctx, freqs)
    assert states.dtype == np.uint32 and words.dtype == np.uint16
    assert np.array_equal(train_gpt.rans_decode(states, words, ctx, freqs), symbols)


def test_rans_codes_at_the_conditional_entropy():
    symbols, ctx = laplace_symbols(1_000_000, 4)
    counts, freqs = tables(symbols, ctx, 4)
    states, words = train_gpt.rans_encode(symbols, ctx, freqs)
    ideal = conditional_entropy_bytes(counts)
    coded = 2 * words.size + 4 * states.size
    assert ideal < coded < 1.003 * ideal + 4 * states.size
    # the contexts are worth their tables: one table for all costs the order-0 entropy, over 5% more here
    assert conditional_entropy_bytes(counts.sum(axis=0, keepdims=True)) > 1.05 * ideal


def test_frequencies_cover_every_symbol_and_fit_16_bits():
    counts = np.array([[5, 0, 1_000_000, 1, 0], [0, 0, 7, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    freqs = train_gpt.rans_frequencies(counts)
    assert freqs.max() < 2 ** 16
    assert np.all((freqs > 0) >= (counts > 0))                        # every symbol that occurs can be coded
    assert list(freqs.sum(axis=1)) == [2 ** 16, 2 ** 16, 0, 2 ** 16]
    symbols, ctx = np.array([2, 2, 2, 0, 3, 1]), np.array([1, 1, 1, 0, 0, 3])
    states, words = train_gpt.rans_encode(symbols, ctx, freqs)
    assert np.array_equal(train_gpt.rans_decode(states, words, ctx, freqs), symbols)
    with pytest.raises(ValueError, match="frequency 0"):
        train_gpt.rans_encode(np.array([1]), np.array([0]), freqs)


@pytest.mark.parametrize("how", ["flip_word", "flip_last_word", "flip_state", "drop_word", "extra_word", "lanes"])
def test_rans_fails_loudly_on_corrupt_input(how):
    symbols, ctx = laplace_symbols(100_000, 4)
    _, freqs = tables(symbols, ctx, 4)
    states, words = train_gpt.rans_encode(symbols, ctx, freqs)
    states, words = states.copy(), words.copy()
    if how == "flip_word":
        words[words.size // 2] ^= 1
    elif how == "flip_last_word":                     # read last: only the final states can tell
        words[-1] ^= 1 << 15
    elif how == "flip_state":
        states[3] ^= 1 << 20
    elif how == "drop_word":
        words = words[:-1]
    elif how == "extra_word":
        words = np.append(words, np.uint16(7))
    else:
        states = states[:-1]
    with pytest.raises(ValueError):
        train_gpt.rans_decode(states, words, ctx, freqs)


def trained_like_state(seed=0):
    """Matrices with column scales that vary, like trained weights, plus vectors (fp16)."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.exp(torch.randn(1, 96, generator=g))
    return {"tok_emb.weight": torch.randn(200, 96, generator=g),
            "blocks.0.mlp.fc.weight": torch.randn(192, 96, generator=g) * cols,
            "blocks.1.mlp.fc.weight": torch.randn(192, 96, generator=g) * cols,
            "blocks.0.attn.c_q.weight": torch.randn(96, 96, generator=g) * cols,
            "blocks.0.attn_scale": torch.randn(96, generator=g)}


SPEC = train_gpt.QuantSpec((("embed", 7), ("mlp", 6), ("attn", 6)), (("embed", 15.0), ("mlp", 12.0), ("attn", 13.0)))


def test_artifact_coders_load_the_same_weights_and_rans_is_smaller():
    entries = train_gpt.quantize_state_dict(trained_like_state(), SPEC)
    rans = train_gpt.pack_artifact(entries, 9, {})
    plain = train_gpt.pack_artifact(entries, 9, {}, coder="lzma")
    a, b = train_gpt.unpack_artifact(rans, "rans")[0], train_gpt.unpack_artifact(plain, "lzma")[0]
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    for e in entries:                                 # and they are exactly the quantizer's integers x scales
        if e["scheme"].startswith("int"):
            assert torch.equal(a[e["name"]], train_gpt.dequantize_rows(torch.from_numpy(e["parts"]["q"].astype(np.float32)),
                                                                      torch.from_numpy(e["parts"]["scale"])))
    assert len(rans) < len(plain)
    with pytest.raises(ValueError, match="coder"):
        train_gpt.pack_artifact(entries, 9, {}, coder="zip")


def test_a_corrupt_rans_stream_inside_a_valid_xz_is_a_pipeline_error():
    blob = train_gpt.pack_artifact(train_gpt.quantize_state_dict(trained_like_state(), SPEC), 9, {})
    raw = bytearray(lzma.decompress(blob))
    pos = len(train_gpt.ARTIFACT_MAGIC)
    head_len = int.from_bytes(raw[pos:pos + 8], "little")
    head = json.loads(raw[pos + 8:pos + 8 + head_len])
    _, _, offset, nbytes = head["rans"]["arrays"]["words"]
    raw[pos + 8 + head_len + offset + nbytes // 2] ^= 0x10
    with pytest.raises(PipelineError, match="malformed artifact"):
        train_gpt.unpack_artifact(lzma.compress(bytes(raw), format=lzma.FORMAT_XZ), "corrupt.pgolf.xz")


def test_column_classes_follow_the_columns_scale():
    q = np.zeros((8, 6), dtype=np.int8)
    q[:, [4, 1]] = 9
    q[:, 2] = 3
    rows, cols = train_gpt.coding_classes(q)
    assert rows.dtype == cols.dtype == np.uint8 and rows.shape == (8,) and cols.shape == (6,)
    assert cols[4] == train_gpt.CODER_COL_CLASSES - 1 and cols[1] >= cols[2] > cols[0]
    assert set(cols) <= set(range(train_gpt.CODER_COL_CLASSES)) and set(rows) <= set(range(train_gpt.CODER_ROW_CLASSES))
    assert train_gpt.coding_family("blocks.10.mlp.fc.weight") == "blocks.*.mlp.fc.weight"


# --- function-preserving permutations (tools/codec_evidence.py) ----------------------------------------------

def random_tiny_model():
    from _helpers import tiny_hp
    hp = tiny_hp(NUM_HEADS="4", NUM_KV_HEADS="2", ATTN_GATE="1")
    torch.manual_seed(0)
    model = train_gpt.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return hp, model.eval()


def logits_of(model, state, ids):
    model.load_state_dict(state)
    with torch.no_grad():
        return model.logits(ids)


def test_similarity_permutations_leave_the_model_function_unchanged():
    from tools import codec_evidence
    hp, model = random_tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hessians = {k: torch.eye(v.shape[1]) + 0.1 * torch.ones(v.shape[1], v.shape[1]) for k, v in state.items() if v.ndim == 2}
    permuted, permuted_hessians = codec_evidence.similarity_permuted(state, hessians, hp)
    moved = [k for k in state if not torch.equal(state[k], permuted[k])]
    assert any(".mlp.fc." in k for k in moved) and any(".mlp.proj." in k for k in moved)
    assert any(".attn.c_q." in k for k in moved) and any("q_gain" in k for k in moved)
    ids = torch.randint(0, hp.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(model, permuted, ids), logits_of(model, state, ids), atol=1e-5, rtol=1e-5)
    # the broken case: the up projection's rows moved without the down projection's columns
    fc = next(k for k in moved if k.endswith(".mlp.fc.weight"))
    half = dict(state, **{fc: permuted[fc]})
    assert not torch.allclose(logits_of(model, half, ids), logits_of(model, state, ids), atol=1e-3)


def test_head_permutations_stay_in_their_key_value_group():
    from tools import codec_evidence
    hp, model = random_tiny_model()
    state = dict(model.state_dict())
    with pytest.raises(ValueError, match="key-value group"):
        codec_evidence.permute_heads(state, "blocks.0.attn.", np.array([2, 1, 0, 3]), 4, 2)
    ids = torch.randint(0, hp.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    swapped = dict(state)
    codec_evidence.permute_heads(swapped, "blocks.0.attn.", np.array([1, 0, 3, 2]), 4, 2)
    torch.testing.assert_close(logits_of(model, swapped, ids), logits_of(model, state, ids), atol=1e-5, rtol=1e-5)
