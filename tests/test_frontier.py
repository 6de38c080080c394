"""The April records' pieces (the frontier stack), each against a hand-written reference: the two-lane parallel
residual, its order with depth recurrence and the U-Net skips, the sparse attention gate, the input-dependent
SmearGate (never into a BOS), Polar Express's per-iteration coefficients, and the frontier preset's shape."""

import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from _helpers import random_gpt, tiny_hp


def norm(x):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)


def attention_ref(attn, x):
    """CausalSelfAttention written out: q/k RMSNorm, partial RoPE, gain, causal softmax with GQA, XSA,
    the output gate 2 sigmoid(W x[:, :, :gate_dims]) per head, then the output projection."""
    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.c_q.weight.T).view(B, T, H, D)
    k = (x @ attn.c_k.weight.T).view(B, T, Hkv, D)
    v = (x @ attn.c_v.weight.T).view(B, T, Hkv, D)
    q, k = attn.rotary(norm(q)), attn.rotary(norm(k))
    q = q * attn.q_gain[None, None, :, None]
    k, vv = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vv)
    if attn.xsa:
        vn = vv / vv.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        y = y - (y * vn).sum(-1, keepdim=True) * vn
    if attn.gate is not None:
        y = y * (2 * torch.sigmoid(x[..., :attn.gate_dims] @ attn.gate.weight.T))[..., None]
    return y.reshape(B, T, -1) @ attn.proj.weight.T


def mlp_ref(mlp, x):
    return (F.leaky_relu(x @ mlp.fc.weight.T, mlp.negative_slope) ** 2) @ mlp.proj.weight.T


def model_ref(model, ids):
    """The whole forward to the final norm's input, written out: embedding, SmearGate, then the layer order
    with U-Net skips (first visits pair encoder outputs with decoder inputs, last in first out), sequential
    blocks, and two-lane parallel blocks: attention reads lane 0 mixed with x0, the MLP reads lane 1, each
    lane becomes lane_resid[j] lane_j + lane_post[0, j] attn + lane_post[1, j] mlp; the lanes' mean at the end."""
    x = norm(model.tok_emb.weight[ids])
    if model.smear is not None:
        prev, cur = x[:, :-1], x[:, 1:]
        gate = (ids[:, 1:] != train_gpt.BOS_ID).float()[..., None]
        if model.smear_gate is not None:
            gate = gate * 2 * torch.sigmoid(cur[..., :model.smear_dims] @ model.smear_gate.weight.T)
        x = torch.cat([x[:, :1], cur + model.smear * prev * gate], dim=1)
    x0, skips, seen, lanes = x, [], set(), None
    order = model.layer_order()
    for pos, i in enumerate(order):
        b = model.blocks[i]
        first = i not in seen
        seen.add(i)
        if model.skip_gates is not None:
            # SKIP_GATES=1 (record #1855): visiting positions, the first half encoders; decoder position d takes
            # skip d, x -> g x + (1 - g) w skip with g = sigmoid(gate)
            d = pos - len(order) // 2
            if d >= 0 and skips:
                g = torch.sigmoid(model.skip_gates[d])
                if lanes is None:
                    x = g * x + (1 - g) * model.skip_weights[d] * skips.pop()
                else:
                    lanes = [g * lanes[0] + (1 - g) * model.skip_weights[d] * skips.pop(), lanes[1]]
        elif first and i >= model.num_encoder and skips:
            skip = model.skip_weights[i - model.num_encoder] * skips.pop()
            if lanes is None:
                x = x + skip
            else:
                lanes = [lanes[0] + skip, lanes[1]]
        mix = lambda h: b.resid_mix[0] * h + b.resid_mix[1] * x0      # noqa: E731
        attn = lambda h: b.attn_scale * attention_ref(b.attn, norm(h) * b.norm_scale)  # noqa: E731
        mlp = lambda h: b.mlp_scale * mlp_ref(b.mlp, norm(h) * b.norm_scale)            # noqa: E731
        if b.lanes == 2:
            lanes = lanes or [x, x]
            a, m = attn(mix(lanes[0])), mlp(lanes[1])
            lanes = [b.lane_resid[j] * lanes[j] + b.lane_post[0, j] * a + b.lane_post[1, j] * m for j in range(2)]
        else:
            h = mix(x)
            a = attn(h)
            x = h + a + mlp(h if b.parallel else h + a)
        if (pos < len(order) // 2) if model.skip_gates is not None else (first and i < model.num_encoder):
            skips.append(x)
    return x if lanes is None else (lanes[0] + lanes[1]) / 2


@pytest.mark.parametrize("settings", [
    {"NUM_LAYERS": "6", "RECUR_LAYERS": "1-2", "PARALLEL_LAST_N": "2"},           # recurrence, skips, two lanes
    {"NUM_LAYERS": "5", "RECUR_LAYERS": "0-1", "PARALLEL_LAST_N": "3"},           # a lane block takes a skip
    {"NUM_LAYERS": "4", "RECUR_LAYERS": "", "PARALLEL_LAST_N": "2", "PARALLEL_LANES": "1"},   # single lane
    {"NUM_LAYERS": "4", "RECUR_LAYERS": "1-1", "PARALLEL_LAST_N": "0", "ATTN_GATE_DIMS": "0"},  # dense gate
    {"NUM_LAYERS": "6", "RECUR_LAYERS": "1-2", "PARALLEL_LAST_N": "2", "SKIP_GATES": "0"},   # additive skips
    {"NUM_LAYERS": "5", "RECUR_LAYERS": "0-1", "PARALLEL_LAST_N": "3", "SKIP_GATES": "0"},
])
def test_the_forward_equals_the_hand_written_one(settings):
    hp = tiny_hp(BIGRAM_VOCAB=0, ATTN_GATE=1, XSA_LAST_N=2, **settings,     # the hand-written forward attends
                 ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole")   # across documents (isolation: test_model)
    model = random_gpt(hp, seed=3)
    model.recurrence_on = True
    with torch.no_grad():
        for b in model.blocks:                     # learned lane weights away from their inits
            if b.lanes == 2:
                b.lane_resid.copy_(torch.tensor([0.7, 1.3]))
                b.lane_post.copy_(torch.tensor([[0.5, -0.4], [1.5, 0.9]]))
        model.smear.normal_()
        if model.skip_gates is not None:
            model.skip_gates.normal_()             # gates away from their 0 init (half and half)
    ids = torch.randint(0, hp.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    ids[:, 5] = train_gpt.BOS_ID
    with torch.no_grad():
        torch.testing.assert_close(model.hidden(ids), model_ref(model, ids), rtol=1e-4, atol=1e-4)


def test_two_lane_blocks_start_their_lanes_at_the_first_parallel_block_and_take_skips_on_lane_0():
    hp = tiny_hp(NUM_LAYERS=6, RECUR_LAYERS="1-2", PARALLEL_LAST_N=2, BIGRAM_VOCAB=0)
    model = train_gpt.GPT(hp)
    model.recurrence_on = True
    assert model.layer_order() == [0, 1, 2, 1, 2, 1, 2, 3, 4, 5]
    assert [b.lanes for b in model.blocks] == [1, 1, 1, 1, 2, 2]
    seen = []
    for i, b in enumerate(model.blocks):
        if b.lanes == 2:
            real = b.forward_lanes
            b.forward_lanes = lambda lanes, x0, *a, real=real, i=i: seen.append((i, lanes[0] is lanes[1])) or real(lanes, x0, *a)
    ids = torch.randint(0, hp.vocab_size, (1, 8))
    with torch.no_grad():
        model.hidden(ids)
    assert [i for i, _ in seen] == [4, 5]                     # layers 4, 5 run on lanes, each once
    assert seen[0][1] is True        # layer 4: its skip joins the stream, then both lanes start as that stream
    assert seen[1][1] is False       # layer 5: its skip goes into lane 0 only


def test_the_sparse_gate_reads_only_the_first_dims():
    hp = tiny_hp(ATTN_GATE=1, ATTN_GATE_DIMS=12, MODEL_DIM=32)
    attn = train_gpt.CausalSelfAttention(hp, xsa=False)
    assert attn.gate.weight.shape == (hp.num_heads, 12)
    with torch.no_grad():
        for p in attn.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attention_ref(attn, x), rtol=1e-4, atol=1e-5)
        y = x.clone()
        y[..., 12:] += 1.0                                        # only the gate's input is read at dims < 12:
        gated = attn(y)                                           # the rest of the forward still changes,
        attn.gate = None                                          # so compare the gate's factor alone
        assert not torch.allclose(gated, attn(y))
    g = train_gpt.CausalSelfAttention(hp, xsa=False)
    assert torch.equal(g.gate.weight, torch.zeros(hp.num_heads, 12))     # 2 sigmoid(0) = 1: starts as the identity


def test_the_input_dependent_smear_gate_by_hand_and_never_into_a_bos():
    hp = tiny_hp(SMEAR_GATE=1, SMEAR_GATE_DIMS=12, BIGRAM_VOCAB=0)
    model = random_gpt(hp, seed=5)
    with torch.no_grad():
        model.smear.normal_()
        model.smear_gate.weight.normal_()
    ids = torch.tensor([[7, 9, train_gpt.BOS_ID, 11, 13]])
    e = norm(model.tok_emb.weight[ids])
    with torch.no_grad():
        got = model.embed(ids)
        gate = 2 * torch.sigmoid(e[0, 1:, :12] @ model.smear_gate.weight.T)           # (4, 1): one per position
        want = e[0, 1:] + model.smear * e[0, :-1] * gate * (ids[0, 1:] != train_gpt.BOS_ID).float()[:, None]
    torch.testing.assert_close(got[0, 1:], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0, 2], e[0, 2], rtol=0, atol=1e-6)                  # the BOS: nothing smeared in
    other = ids.clone()
    other[0, 1] = 3                                                                     # change the token before the BOS
    with torch.no_grad():
        assert torch.equal(model.embed(other)[0, 2], got[0, 2])
        assert not torch.allclose(model.embed(other)[0, 1], got[0, 1])
    # the gate depends on the current token: a constant-gate model (SMEAR_GATE_DIMS=0) gives another embedding
    flat = random_gpt(tiny_hp(SMEAR_GATE=1, SMEAR_GATE_DIMS=0, BIGRAM_VOCAB=0), seed=5)
    with torch.no_grad():
        flat.smear.copy_(model.smear)
        assert not torch.allclose(flat.embed(ids), got)


def test_polar_express_applies_one_tuple_per_iteration():
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    table = train_gpt.NEWTON_SCHULZ_COEFFS["polar"]
    assert len(table) == 5 and table[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    for steps in (1, 3, 5, 7):
        x = g / (g.norm() + 1e-7)
        for i in range(steps):
            a, b, c = table[min(i, 4)]                       # past the fifth: the last tuple again
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        torch.testing.assert_close(train_gpt.zeropower_newton_schulz(g, steps, "polar"), x, rtol=1e-5, atol=1e-5)
    polar = train_gpt.zeropower_newton_schulz(g, 5, "polar")
    quintic = train_gpt.zeropower_newton_schulz(g, 5, "quintic")
    assert not torch.allclose(polar, quintic, atol=1e-3)
    sv = torch.linalg.svdvals(polar)
    assert sv.min() > 0.7 and sv.max() < 1.3                  # orthogonalised


def test_the_frontier_shape_is_the_april_records():
    hp, _ = train_gpt.read_settings({})
    model = train_gpt.GPT(hp)
    assert 35_900_000 < train_gpt.count_parameters(model) < 36_000_000          # #1855: 35.95M
    model.recurrence_on = True
    assert model.layer_order() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert [b.lanes for b in model.blocks] == [1] * 8 + [2] * 3                 # two lanes from layer 8
    assert model.blocks[0].attn.gate.weight.shape == (8, 12) and model.smear_gate.weight.shape == (1, 12)
    assert model.bigram is None and model.blocks[0].attn.q_gain.detach()[0].item() == 5.25
