"""Quantization and packing: SDClip int8-per-row / fp16 round trip, the no-pickle artifact layout (parts
grouped by kind), corrupt input."""

import io
import json
import lzma
import pickle

import numpy as np
import pytest
import torch

import train_gpt
from _helpers import random_gpt, tiny_hp
from train_gpt import ARTIFACT_MAGIC, PipelineError

SOURCE = "artifacts/test-run.pgolf.xz"
CONFIG = {"VOCAB_SIZE": 1024, "NUM_LAYERS": 3, "MODEL_DIM": 128, "NUM_HEADS": 4, "NUM_KV_HEADS": 2, "MLP_MULT": 2,
          "ROPE_BASE": 10000.0, "LOGIT_SOFTCAP": 30.0}


def arch_config(hp):
    """The model-shape settings export_artifact stores: ARCH_SETTINGS' values."""
    return {name: hp.values[name] for name in train_gpt.ARCH_SETTINGS}


SIGMAS = 20.0
BITS8 = train_gpt.QuantSpec((("embed", 8), ("mlp", 8), ("attn", 8)), (("embed", SIGMAS), ("mlp", SIGMAS), ("attn", SIGMAS)))
# int8 everywhere, SDClip k = 20: the scheme these tests check by hand

def sample_state():
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(300, 256, generator=gen)              # a weight matrix: int8 per row at BITS8
    big[0] = 0.0                                             # an all-zero row
    big[1, 5] = 40.0                                         # a row with one outlier
    big[2] *= 1e-6                                           # a row of tiny values
    return {
        "big.weight": big,
        "tall.weight": torch.randn(70_000, 1, generator=gen),  # a weight matrix with one column
        "mix": torch.randn(256, 256, generator=gen),           # 2-D but not a .weight (a control tensor): fp16
        "small.weight": torch.randn(64, 32, generator=gen) * 3,  # small weight matrices are quantized too
        "vector": torch.randn(100, generator=gen),
        "cube": torch.randn(50, 40, 40, generator=gen),        # big but not 2-D: fp16
        "scalar": torch.tensor(2.718281828),
        "empty": torch.zeros(0, 16),
    }


def test_schemes():
    state = sample_state()
    schemes = {e["name"]: e["scheme"] for e in train_gpt.quantize_state_dict(state, BITS8)}
    assert schemes == {"big.weight": "int8_row", "tall.weight": "int8_row", "mix": "fp16", "small.weight": "int8_row",
                       "vector": "fp16", "cube": "fp16", "scalar": "fp16", "empty": "fp16"}


def scale_of(row):
    return torch.tensor(SIGMAS * row.double().std(correction=0).item() / 127).half().float().item()


def test_round_trip():
    state = sample_state()
    blob = train_gpt.pack_artifact(train_gpt.quantize_state_dict(state, BITS8), preset=6, config=CONFIG)
    out, config = train_gpt.unpack_artifact(blob, SOURCE)
    assert config == CONFIG and [type(v) for v in config.values()] == [type(v) for v in CONFIG.values()]
    assert list(out) == list(state)
    for name, w in state.items():
        got = out[name]
        assert got.dtype == torch.float32 and got.shape == w.shape, name
        if train_gpt.choose_scheme(name, w, BITS8) == "fp16":
            assert torch.equal(got, w.half().float()), name          # exact after fp16 rounding
            continue
        # SDClip int8 per row: an independent scale (fp16 of k std(row) / 127, population std), every value
        # a multiple of it, |q| <= 127, error at most half a step inside the clip, values past it clipped
        std = w.double().std(dim=1, correction=0)
        scale = (SIGMAS * std / 127).float().clamp_min(torch.finfo(torch.float16).tiny).half().float()[:, None]
        q = got / scale
        assert torch.allclose(q, q.round(), atol=1e-3) and q.abs().max() <= 127 + 1e-3, name
        inside = w.abs() <= 127 * scale
        assert ((got - w).abs() <= scale / 2 * (1 + 1e-5))[inside].all(), name
        assert torch.equal(got[~inside], (127 * scale * w.sign()).expand_as(w)[~inside]), name
    assert torch.equal(out["big.weight"][0], torch.zeros(256))
    # the outlier (40, raising its row's std to ~2.7) stays inside k std = 20 std, within half a step
    assert abs(out["big.weight"][1, 5] - 40.0) <= scale_of(state["big.weight"][1]) / 2


def test_artifact_is_not_a_pickle():
    state = sample_state()
    blob = train_gpt.pack_artifact(train_gpt.quantize_state_dict(state, BITS8), preset=6, config=CONFIG)
    raw = lzma.decompress(blob)
    assert raw.startswith(ARTIFACT_MAGIC)
    # the documented layout, read independently: magic | u64 header length | JSON header | arrays,
    # the header {"config": model-shape settings, "tensors": [one entry per tensor]}
    pos = len(ARTIFACT_MAGIC)
    head_len = int.from_bytes(raw[pos:pos + 8], "little")
    head = json.loads(raw[pos + 8:pos + 8 + head_len])
    assert set(head) == {"config", "tensors", "rans"} and head["config"] == CONFIG
    header = head["tensors"]
    body = raw[pos + 8 + head_len:]
    assert [e["name"] for e in header] == list(state)
    # the integer matrices are rANS-coded: their "q" says so, and the coder's arrays follow every other part
    coded = [e for e in header if e["scheme"].startswith("int")]
    assert coded and all(e["parts"]["q"] == "rans" for e in coded)
    rans = head["rans"]
    assert rans["offset"] == 127 and rans["families"] == list(dict.fromkeys(
        train_gpt.coding_family(e["name"]) for e in coded))
    # the other parts are laid out grouped by kind (every scale, then fp16 values), tensor after tensor
    # within a kind, back to back, then the coder's arrays
    placed = sorted(((offset, nbytes, part) for e in header for part, p in e["parts"].items() if p != "rans"
                     for (dtype, shape, offset, nbytes) in [p]))
    coder = sorted((offset, nbytes, "rans:" + k) for k, (dtype, shape, offset, nbytes) in rans["arrays"].items())
    end = 0
    for offset, nbytes, _ in placed + coder:
        assert offset == end
        end += nbytes
    kinds = [part for _, _, part in placed]
    assert kinds == sorted(kinds, key=train_gpt.PART_ORDER.index)
    assert [k for _, _, k in coder][-3:] == ["rans:freqs", "rans:states", "rans:words"]
    for e in header:
        for p in e["parts"].values():
            if p != "rans":
                dtype, shape, offset, nbytes = p
                assert nbytes == np.dtype(dtype).itemsize * int(np.prod(shape))
        if e["scheme"] == "fp16":
            dtype, shape, offset, nbytes = e["parts"]["w"]
            w = np.frombuffer(body, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
            assert np.array_equal(w, state[e["name"]].half().numpy())
    assert end == len(body)
    for data in (raw, blob):
        with pytest.raises(Exception):
            torch.load(io.BytesIO(data), weights_only=False)
        with pytest.raises(Exception):
            pickle.loads(data)


def test_packing_is_deterministic():
    entries = train_gpt.quantize_state_dict(sample_state(), BITS8)
    assert train_gpt.pack_artifact(entries, 6, CONFIG) == \
        train_gpt.pack_artifact(train_gpt.quantize_state_dict(sample_state(), BITS8), 6, dict(CONFIG))
    assert train_gpt.pack_artifact(entries, 6, CONFIG) != train_gpt.pack_artifact(entries, 6, {**CONFIG, "NUM_LAYERS": 4})


def test_model_round_trip_loads_strictly():
    hp = tiny_hp(NUM_LAYERS=3, MODEL_DIM=128, VOCAB_SIZE=1024)   # embedding 131,072 elements: int8
    model = random_gpt(hp, seed=0)
    blob = train_gpt.pack_artifact(train_gpt.quantize_state_dict(model.state_dict(), BITS8), preset=6, config=arch_config(hp))
    state, config = train_gpt.unpack_artifact(blob, SOURCE)
    assert config == arch_config(hp) and set(config) == set(train_gpt.ARCH_SETTINGS)
    fresh = train_gpt.GPT(hp)
    fresh.load_state_dict(state, strict=True)
    assert train_gpt.state_checksum(fresh.state_dict()) == train_gpt.state_checksum(state)
    assert train_gpt.state_checksum(fresh.state_dict()) != train_gpt.state_checksum(model.state_dict())
    x = torch.randint(0, hp.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (fresh(x, x).mean() - model(x, x).mean()).abs() < 0.05 * model(x, x).mean().abs() + 0.05


def test_odd_shapes_round_trip():
    hp = tiny_hp(NUM_LAYERS=1, RECUR_LAYERS="")        # no U-Net skips: skip_weights is an empty (0, dim) tensor
    model = random_gpt(hp, seed=0)
    blob = train_gpt.pack_artifact(train_gpt.quantize_state_dict(model.state_dict(), BITS8), 6, arch_config(hp))
    state, _ = train_gpt.unpack_artifact(blob, SOURCE)
    train_gpt.GPT(hp).load_state_dict(state, strict=True)


def test_state_checksum_sees_every_weight():
    state = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    base = train_gpt.state_checksum(state)
    assert train_gpt.state_checksum(dict(reversed(list(state.items())))) == base   # order-independent
    changed = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    changed["b"][1, 1] = 1e-7
    assert train_gpt.state_checksum(changed) != base
    assert train_gpt.state_checksum({"a": torch.ones(3), "c": torch.zeros(2, 2)}) != base


def good_blob():
    return train_gpt.pack_artifact(train_gpt.quantize_state_dict(sample_state(), BITS8), 6, CONFIG)


def corrupt(kind):
    blob = good_blob()
    raw = lzma.decompress(blob)
    xz = lambda data: lzma.compress(data, format=lzma.FORMAT_XZ)   # noqa: E731
    if kind == "garbage":
        return b"this is not an artifact at all"
    if kind == "empty":
        return b""
    if kind == "truncated":
        return blob[:len(blob) // 2]
    if kind == "flipped_byte":
        mid = len(blob) // 2
        return blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1:]
    if kind == "pickle":
        buf = io.BytesIO()
        torch.save(sample_state(), buf)
        return xz(buf.getvalue())
    if kind == "wrong_magic":
        return xz(b"PGOLF0\n" + raw[len(ARTIFACT_MAGIC):])
    if kind == "unknown_scheme":
        pos = len(ARTIFACT_MAGIC)
        head_len = int.from_bytes(raw[pos:pos + 8], "little")
        head = raw[pos + 8:pos + 8 + head_len].replace(b'"int8_row"', b'"int4_xx"')
        return xz(raw[:pos] + len(head).to_bytes(8, "little") + head + raw[pos + 8 + head_len:])
    if kind == "truncated_payload":          # a well-formed xz stream whose arrays are cut short
        return xz(raw[:-1000])
    if kind == "garbage_header":             # a well-formed xz stream whose JSON header is broken
        pos = len(ARTIFACT_MAGIC) + 8
        return xz(raw[:pos] + b"{" * 10 + raw[pos + 10:])
    if kind in ("no_config", "old_layout"):  # header without the model-shape settings; the pre-config list
        pos = len(ARTIFACT_MAGIC)
        head_len = int.from_bytes(raw[pos:pos + 8], "little")
        tensors = json.loads(raw[pos + 8:pos + 8 + head_len])["tensors"]
        head = json.dumps(tensors if kind == "old_layout" else {"tensors": tensors}).encode()
        return xz(raw[:pos] + len(head).to_bytes(8, "little") + head + raw[pos + 8 + head_len:])
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "flipped_byte", "pickle", "wrong_magic",
                                  "unknown_scheme", "truncated_payload", "garbage_header", "no_config",
                                  "old_layout"])
def test_corrupt_artifact_raises_pipeline_error_naming_the_source(kind):
    with pytest.raises(PipelineError) as err:
        train_gpt.unpack_artifact(corrupt(kind), SOURCE)
    assert SOURCE in str(err.value)


# --- AWQ-lite (PR #1908): the most salient column groups at more bits inside the GPTQ solve ------------------

INT6 = train_gpt.QuantSpec((("embed", 7), ("mlp", 6), ("attn", 6)), (("embed", 14.0), ("mlp", 11.5), ("attn", 13.0)))


def activations_hessian(cols, rms, n=4096, seed=0):
    """Mean x x^T of n Gaussian inputs whose column j has RMS rms[j] (plus a little correlation)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=gen) * torch.as_tensor(rms, dtype=torch.float32)
    x = x + 0.1 * x.roll(1, dims=1)
    return x.T @ x / n


def test_awq_picks_the_groups_of_largest_activation_rms_times_mean_weight():
    """Four 64-column groups: the largest weights (group 0), the largest activations (group 1), neither but the
    largest product (group 2). The rule picks group 2 first, over the whole model: a second matrix's best group
    comes second, before the first matrix's runner-up; a matrix at AWQ_BITS or more never takes part."""
    gen = torch.Generator().manual_seed(1)
    w_scale = torch.tensor([5.0, 1.0, 3.0, 1.0]).repeat_interleave(64)
    act_rms = torch.tensor([1.0, 5.0, 3.0, 1.0]).repeat_interleave(64)
    state = {"a.weight": torch.randn(32, 256, generator=gen).sign() * w_scale,        # |w| exactly w_scale
             "b.weight": torch.ones(32, 128) * torch.tensor([1.0, 7.0]).repeat_interleave(64),
             "tok_emb.weight": torch.full((64, 128), 100.0)}                          # int8 at BITS8: not a candidate
    hessians = {"a.weight": torch.diag(act_rms ** 2), "b.weight": torch.eye(128),
                "tok_emb.weight": torch.eye(128)}
    spec = INT6.with_bits(embed=8)
    scores = train_gpt.awq_saliency(state["a.weight"], hessians["a.weight"], 64)
    assert torch.allclose(scores, torch.tensor([5.0, 5.0, 9.0, 1.0]) * 64)
    one = train_gpt.awq_select(state, hessians, spec, (), 1, 64, 8)
    assert list(one) == ["a.weight"] and one["a.weight"].tolist() == list(range(128, 192))
    two = train_gpt.awq_select(state, hessians, spec, (), 2, 64, 8)                  # b's group 1 scores 7 x 64
    assert sorted(two) == ["a.weight", "b.weight"] and two["b.weight"].tolist() == list(range(64, 128))
    assert train_gpt.awq_select(state, hessians, spec, (), 1, 64, 6) == {}            # every matrix has 6 bits or more


def test_awq_lowers_the_hessian_weighted_error_of_a_matrix_with_one_salient_group():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(96, 256, generator=gen)
    rms = torch.ones(256)
    rms[64:128] = 8.0                                                                   # one group of loud inputs
    h = activations_hessian(256, rms)
    cols = train_gpt.awq_select({"m.weight": w}, {"m.weight": h}, INT6, (), 1, 64, 8)["m.weight"]
    assert cols.tolist() == list(range(64, 128))
    plain = train_gpt.hessian_error(w, train_gpt.dequantize_rows(*train_gpt.gptq_quantize(w, h, 6, 11.5)), h).sum()
    q, scale = train_gpt.gptq_quantize(w, h, 6, 11.5, awq_cols=cols, awq_bits=8)
    mult, top = train_gpt.column_grid(256, 6, cols, 8)
    assert q[:, 64:128].abs().max() > 31 and q.abs().le(top).all()                    # the group uses the int8 range
    awq = train_gpt.hessian_error(w, train_gpt.dequantize_grid(q, scale, mult), h).sum()
    assert awq < 0.5 * plain


def awq_model():
    """A random tiny GPT, its Hessians from random tokens, and AWQ-lite's choice of 2 groups of 16 columns."""
    hp = tiny_hp(NUM_LAYERS=2, MODEL_DIM=64, VOCAB_SIZE=256, AWQ_GROUPS=2, AWQ_GROUP_SIZE=16)
    model = random_gpt(hp, seed=3)
    x = torch.randint(0, hp.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    rt = train_gpt.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False,
                           control_group=None, autocast_dtype=None)
    hessians = train_gpt.collect_hessians(model, rt, [x])
    return hp, rt, model, hessians


@pytest.mark.parametrize("coder", train_gpt.INT_CODERS)
def test_awq_round_trips_exactly_through_the_artifact(coder):
    hp, _, model, hessians = awq_model()
    state = model.state_dict()
    awq = train_gpt.awq_select(state, hessians, INT6, (), hp.awq_groups, hp.awq_group_size, hp.awq_bits)
    entries = train_gpt.quantize_state_dict(state, INT6, hessians=hessians, awq=awq, awq_bits=8)
    with_awq = [e for e in entries if "awq_cols" in e["parts"]]
    assert with_awq and all(e["scheme"].endswith("_row_awq8") for e in with_awq)
    assert sum(e["parts"]["awq_cols"].size for e in with_awq) == 2 * 16
    for e in with_awq:
        assert e["parts"]["q"].shape[1] + e["parts"]["q_awq"].shape[1] == e["shape"][1]
        assert np.abs(e["parts"]["q_awq"]).max() > 31 >= np.abs(e["parts"]["q"]).max()
    blob = train_gpt.pack_artifact(entries, 6, arch_config(hp), coder=coder)
    out, _ = train_gpt.unpack_artifact(blob, SOURCE)
    for e in entries:
        assert torch.equal(out[e["name"]], train_gpt.dequantize_parts(e["scheme"], e["parts"], e["shape"])), e["name"]
    train_gpt.GPT(hp).load_state_dict(out, strict=True)
    for name, cols in awq.items():     # the weights GPTQ chose, on the int6/int7 grid and the int8 columns' grid
        bits = int(train_gpt.choose_scheme(name, state[name], INT6)[3])
        k = INT6.sigmas_of(train_gpt.quant_group(name))
        q, scale = train_gpt.gptq_quantize(state[name], hessians[name], bits, k, awq_cols=cols, awq_bits=8)
        mult = torch.ones(state[name].shape[1])
        mult[cols] = (2 ** (bits - 1) - 1) / 127
        assert torch.equal(out[name], q * scale.float()[:, None] * mult), name
    if coder == "rans":      # the int8 columns are coded in a stream of their own: the int6/int7 stream keeps its alphabet
        raw = lzma.decompress(blob)
        pos = len(ARTIFACT_MAGIC)
        head = json.loads(raw[pos + 8:pos + 8 + int.from_bytes(raw[pos:pos + 8], "little")])
        assert head["rans"]["offset"] == 63 and head["rans_awq"]["offset"] == 127
        assert abs(train_gpt.coded_bytes(entries, 6) - len(blob)) < 0.1 * len(blob)


def test_awq_is_off_at_zero_groups_and_changes_only_the_chosen_matrices():
    hp, rt, model, hessians = awq_model()
    state = model.state_dict()
    spec = train_gpt.QuantSpec.from_settings(hp)
    on = train_gpt.DistributedQuantizer(hp, rt, state, hessians)
    off = train_gpt.DistributedQuantizer(hp.replace(AWQ_GROUPS=0), rt, state, hessians)
    assert off.awq == {} and sum(c.numel() for c in on.awq.values()) == 32
    on_entries, off_entries = on.quantize(spec), off.quantize(spec)
    assert not any("awq_cols" in e["parts"] for e in off_entries)
    plain = train_gpt.quantize_state_dict(state, spec, hessians=hessians, lqer_tensors=hp.lqer_tensors,
                                          lqer_rank=hp.lqer_rank, lqer_factors=hp.lqer_factors)
    assert train_gpt.pack_artifact(off_entries, 6, {}) == train_gpt.pack_artifact(plain, 6, {})
    changed = {e["name"] for e, f in zip(on_entries, off_entries) if e["scheme"] != f["scheme"]}
    assert changed == set(on.awq)


def test_the_default_turns_awq_on_as_record_1908_ran_it():
    hp, _ = train_gpt.read_settings({})
    assert (hp.awq_groups, hp.awq_bits, hp.awq_group_size) == (1, 8, 64)
    for preset in ("stack1024", "baseline"):
        assert train_gpt.read_settings({"PRESET": preset})[0].awq_groups == 0
