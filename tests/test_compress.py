"""Compression: SDClip's grid, ternary quantization and both packings, fake quantization
equal to export, late QAT reaching every exported tensor, GPTQ on the SDClip grid against
round-to-nearest on real activations (the tied embedding with the head's input Hessian), LQER, the
budget fit moving k, the planner against real artifacts (Gaussian and trained weights), and the
training-loop switches (late QAT, ternary from a step, telemetry, the calibration reserve)."""


import numpy as np
import pytest
import torch

import train_gpt
from _helpers import cpu_runtime, random_gpt, tiny_hp
from test_stack import ALL_OFF, ListLog, make_shards, run_training

PRESET = 6


def spec(bits=6, embed_bits=8, mlp=12.0, attn=13.0, embed=15.0):
    return train_gpt.QuantSpec((("embed", embed_bits), ("mlp", bits), ("attn", bits)),
                               (("embed", embed), ("mlp", mlp), ("attn", attn)))


def gaussian_model(hp, seed=0):
    torch.manual_seed(seed)
    model = train_gpt.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.02)
    return model


# --- SDClip ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,sigmas", [(6, 12.85), (7, 15.0), (5, 8.0), (8, 20.0)])
def test_sdclip_scale_is_k_std_per_row_and_round_trips_exactly(bits, sigmas):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(40, 300, generator=gen) * torch.rand(40, 1, generator=gen)    # rows of different spread
    w[0] = 0.0
    w[1, 7] = 50.0                                                                  # an outlier, clipped
    q, scale = train_gpt.quantize_rows(w, bits, sigmas)
    qmax = 2 ** (bits - 1) - 1
    want = (sigmas * w.double().std(dim=1, correction=0) / qmax).float().clamp_min(torch.finfo(torch.float16).tiny)
    assert scale.dtype == torch.float16 and torch.equal(scale, want.half())
    assert torch.equal(q, torch.clamp(torch.round(w / scale.float()[:, None]), -qmax, qmax))
    assert q.abs().max() <= qmax and q[0].abs().sum() == 0
    # one outlier lifts its row's std to about 50 / sqrt(300) = 2.9: below k = 17.3 it sits past the clip
    assert (q[1, 7] == qmax) == (sigmas < 300 ** 0.5)
    stored, parts = train_gpt.quantize_tensor(w, f"int{bits}_row", sigmas, None, PRESET)
    assert parts["q"].dtype == np.int8 and parts["scale"].dtype == np.float16
    blob = train_gpt.pack_artifact([dict(name="m.weight", scheme=stored, shape=[40, 300], parts=parts)], PRESET, {})
    assert torch.equal(train_gpt.unpack_artifact(blob, "t")[0]["m.weight"], train_gpt.dequantize_rows(q, scale))


def test_k_is_the_byte_knob():
    """On Gaussian rows the entropy of q follows b - log2 k + c: doubling k saves about one bit per weight,
    and an added bit of precision at the same k costs about nothing (the grid is the same)."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))

    def bits_per_weight(bits, sigmas):
        _, parts = train_gpt.quantize_tensor(w, f"int{bits}_row", sigmas, None, PRESET)
        return 8 * train_gpt.lzma_size([parts["q"]], PRESET) / w.numel()

    at6, at12, at24 = (bits_per_weight(6, k) for k in (6.0, 12.0, 24.0))
    assert at6 - at12 == pytest.approx(1.0, abs=0.1)
    assert 0.7 < at12 - at24 < 1.0          # the rule flattens once a step is a large share of sigma (0.77 at k=24)
    assert bits_per_weight(7, 24.0) - bits_per_weight(6, 12.0) == pytest.approx(0.0, abs=0.1)


# --- ternary packing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 7, 8, 9, 127, 128, 129, 1001])
def test_both_ternary_layouts_round_trip_exactly_at_odd_lengths(n):
    rng = np.random.default_rng(n)
    for p_zero in (0.0, 0.3, 1.0):
        q = rng.choice(np.array([-1, 0, 1], dtype=np.int8), size=n, p=[(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2])
        base3 = train_gpt.pack_ternary_base3(q)
        assert base3.dtype == np.uint8 and base3.size == -(-n // 5)          # 5 trits per byte
        assert np.array_equal(train_gpt.unpack_ternary_base3(base3, n), q)
        mask = train_gpt.pack_ternary_mask(q)
        assert mask["nonzero"].size == -(-n // 8) and mask["negative"].size == -(-int((q != 0).sum()) // 8)
        assert np.array_equal(train_gpt.unpack_ternary_mask(mask["nonzero"], mask["negative"], n), q)


def test_base3_byte_values_by_hand():
    q = np.array([-1, 0, 1, 1, -1, 1], dtype=np.int8)          # digits 0,1,2,2,0 | 2 (+ padding 1,1,1,1)
    assert list(train_gpt.pack_ternary_base3(q)) == [0 + 3 + 18 + 54 + 0, 2 + 3 + 9 + 27 + 81]


def test_export_keeps_the_layout_lzma_shrinks_more():
    """Mostly-zero trits favour the bitmask; dense random trits favour base-3."""
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(64, 512, generator=gen)
    sparse = dense * (torch.rand(64, 512, generator=gen) < 0.03)
    picked = {}
    for name, w in (("dense", dense), ("sparse", sparse)):
        scheme, parts = train_gpt.quantize_tensor(w, "ternary", 0.0, None, PRESET)
        q, scale = train_gpt.quantize_ternary(w)
        q = q.to(torch.int8).numpy()
        sizes = {"ternary_base3": train_gpt.lzma_size([train_gpt.pack_ternary_base3(q), scale.numpy()], PRESET),
                 "ternary_mask": train_gpt.lzma_size([*train_gpt.pack_ternary_mask(q).values(), scale.numpy()], PRESET)}
        assert scheme == min(sizes, key=sizes.get)
        picked[name] = scheme
    assert picked == {"dense": "ternary_base3", "sparse": "ternary_mask"}


def test_ternary_quantizer_by_hand():
    w = torch.tensor([[0.3, -0.1, 0.0, 2.0] * 32 + [0.5, -0.5, 0.1]])     # 128 + a short group of 3
    q, scale = train_gpt.quantize_ternary(w)
    assert scale.dtype == torch.float16 and scale.shape == (1, 2)
    assert scale[0, 0] == torch.tensor(0.6).half() and scale[0, 1] == torch.tensor(1.1 / 3).half()
    assert q[0, :4].tolist() == [0.0, 0.0, 0.0, 1.0]                     # |w| / 0.6 rounds to 1 only for 2.0
    assert q[0, 128:].tolist() == [1.0, -1.0, 0.0]
    assert torch.equal(train_gpt.dequantize_ternary(q, scale), q * torch.cat([scale[0, :1].float().expand(128),
                                                                               scale[0, 1:].float().expand(3)]))


def test_zero_rows_and_groups_stay_zero():
    w = torch.zeros(3, 200)
    w[1, 150] = 1.0
    for scheme in ("ternary", "int6_row"):
        deq = train_gpt.fake_quantize(w, scheme, 12.0)
        assert torch.isfinite(deq).all() and deq[0].abs().sum() == 0 and deq[1, 150] != 0, scheme


@pytest.mark.parametrize("scheme", ["ternary", "int5_row", "int6_row", "int7_row", "int8_row"])
def test_dequantized_artifact_equals_the_fake_quantized_forward_weight(scheme):
    """What export stores and unpack returns is bit for bit the weight the QAT forward used."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 300, generator=gen) * torch.rand(48, 1, generator=gen)   # rows of different scale
    w.requires_grad_(True)
    ste = train_gpt.fake_quantize(w, scheme, 12.5)
    stored, parts = train_gpt.quantize_tensor(w, scheme, 12.5, None, PRESET)
    blob = train_gpt.pack_artifact([dict(name="m.weight", scheme=stored, shape=list(w.shape), parts=parts)],
                                   PRESET, {})
    state, _ = train_gpt.unpack_artifact(blob, "test")
    assert torch.equal(state["m.weight"], ste.detach())
    # the straight-through gradient is the identity
    ste.backward(torch.arange(w.numel(), dtype=torch.float32).view_as(w))
    assert torch.equal(w.grad, torch.arange(w.numel(), dtype=torch.float32).view_as(w))


def test_stored_ternary_scales_are_the_training_scales_not_rederived():
    """Re-deriving the scale from the ternary values (a defect of earlier records) shrinks it by the
    share of zeros; the artifact holds the absmean of the float weights."""
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    _, train_scale = train_gpt.quantize_ternary(w)
    _, parts = train_gpt.quantize_tensor(w, "ternary", 0.0, None, PRESET)
    assert np.array_equal(parts["scale"], train_scale.numpy())
    deq = train_gpt.dequantize_parts("ternary_base3", {"trits": train_gpt.pack_ternary_base3(
        train_gpt.quantize_ternary(w)[0].to(torch.int8).numpy()), "scale": parts["scale"]}, [16, 256])
    _, rederived = train_gpt.quantize_ternary(deq)
    assert (rederived.float() < 0.9 * train_scale.float()).all()


# --- late QAT reaches every exported tensor, on the export's grid ------------------------------------------

@pytest.mark.parametrize("ternary", ["", ".mlp."])
def test_qat_reaches_every_tensor_export_quantizes(monkeypatch, ternary):
    hp = tiny_hp(BIGRAM_VOCAB=32, ATTN_GATE=1, TERNARY_PATTERNS=ternary)
    model = random_gpt(hp)
    grid = spec(embed_bits=7)
    entries = train_gpt.quantize_state_dict(model.state_dict(), grid, train_gpt.ternary_patterns(hp), preset=PRESET)
    exported = {e["name"]: train_gpt.scheme_family(e["scheme"]) for e in entries if e["scheme"] != "fp16"}
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    real = train_gpt.fake_quantize

    def spy(w, scheme, sigmas=0.0):
        seen[names[id(w)]] = (scheme, sigmas)
        return real(w, scheme, sigmas)

    monkeypatch.setattr(train_gpt, "fake_quantize", spy)
    n_on = train_gpt.set_qat(model, grid, train_gpt.ternary_patterns(hp))
    x = torch.randint(0, hp.vocab_size, (2, 16))
    model(x, x).mean().backward()
    assert n_on == len(exported) and {n: s for n, (s, _) in seen.items()} == exported
    for name, (scheme, sigmas) in seen.items():            # each on its group's SDClip k
        if scheme != "ternary":
            assert sigmas == grid.sigmas_of(train_gpt.quant_group(name)), name
    assert seen["tok_emb.weight"] == ("int7_row", 15.0)    # the tied embedding: lookup and head
    assert all(p.grad is not None for n, p in model.named_parameters() if n in exported)
    if ternary:
        assert {s for n, s in exported.items() if ".mlp." in n} == {"ternary"}
    train_gpt.set_qat(model, None, ())
    seen.clear()
    model(x, x)
    assert seen == {}


def test_late_qat_turns_on_in_the_warmdown_and_changes_training(tmp_path):
    data = make_shards(tmp_path)
    base = {"ITERATIONS": "20", "WARMDOWN_FRAC": "0.5", "LR_FLOOR": "0", "TRAIN_LOG_EVERY": "1"}
    off, _ = run_training(data, {**base, "LATE_QAT_THRESHOLD": "0"})
    on, lines = run_training(data, {**base, "LATE_QAT_THRESHOLD": "0.5"})
    started = [l for l in lines if l.startswith("late_qat: on")]
    # lr scale at step s of 20 in a 0.5 warmdown: (20 - s) / 10 < 0.5 from s = 16
    assert len(started) == 1 and started[0].startswith("late_qat: on from step 16 ")
    assert any(not torch.equal(off[k], on[k]) for k in off)
    assert not any(l.startswith("ternary:") for l in lines)          # no ternary matrices: no telemetry


def test_late_qat_trains_on_the_grid_it_is_given(tmp_path):
    """train(qat_spec=...) is how the budget plan's k reaches late QAT: another k, another training."""
    data = make_shards(tmp_path)
    base = {"ITERATIONS": "20", "WARMDOWN_FRAC": "0.5", "LR_FLOOR": "0", "LATE_QAT_THRESHOLD": "0.5"}
    fine, _ = run_training(data, base)
    coarse, _ = run_training(data, {**base, "QUANT_CLIP_SIGMAS_MLP": "40", "QUANT_CLIP_SIGMAS_ATTN": "40"})
    assert any(not torch.equal(fine[k], coarse[k]) for k in fine)


def test_ternary_from_step_and_its_telemetry(tmp_path):
    data = make_shards(tmp_path)
    _, lines = run_training(data, {"ITERATIONS": "8", "TERNARY_PATTERNS": ".mlp.", "TERNARY_FROM_STEP": "3",
                                   "LATE_QAT_THRESHOLD": "0", "TRAIN_LOG_EVERY": "2"})
    started = [l for l in lines if l.startswith("ternary_qat: on")]
    assert started == ["ternary_qat: on from step 3: 4 matrices train through the ternary quantizer"]
    tele = [l for l in lines if l.startswith("ternary:")]
    assert len(tele) == 3                                          # the logs at steps 4, 6, 8
    zeros = [float(l.split("zeros:")[1].split()[0]) for l in tele]
    flipped = [float(l.split("flipped:")[1].split()[0]) for l in tele]
    assert all(0 < z < 1 for z in zeros) and flipped[0] == 0 and max(flipped[1:]) > 0


# --- GPTQ on the SDClip grid ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def activations(demo_data):
    """Hessians of every quantized matrix's inputs in a random GPT over real text (the demo validation shard)."""
    hp = tiny_hp(VOCAB_SIZE=demo_data["vocab"], MODEL_DIM=64, BIGRAM_VOCAB=0)
    model = random_gpt(hp, seed=3)
    tokens, _ = train_gpt.load_validation_tokens(str(demo_data["dir"]), hp.vocab_size, 8 * 64)
    batch = torch.from_numpy(tokens.astype(np.int64)).view(8, 64)
    return model, train_gpt.collect_hessians(model, cpu_runtime(), [batch[:4], batch[4:]]), batch


def test_hessians_are_the_mean_input_outer_product(activations):
    model, hessians, batch = activations
    h = hessians["blocks.0.mlp.proj.weight"]
    assert h.shape == (128, 128) and torch.allclose(h, h.T) and (h.diagonal() >= 0).all()
    assert h.dtype == torch.float32
    # every quantized matrix, the tied embedding included (its Hessian: the head's input, d x d)
    assert set(hessians) == {n for n, m in model.named_parameters() if n.endswith(".weight") and m.ndim == 2}
    with torch.no_grad():
        head_input = model.final_norm(model.hidden(batch)).reshape(-1, 64).double()
    assert torch.allclose(hessians["tok_emb.weight"].double(), head_input.T @ head_input / head_input.shape[0],
                          rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bits,sigmas", [(5, 8.0), (6, 12.0), (8, 20.0)])
def test_gptq_hessian_weighted_error_is_at_most_round_to_nearest_on_the_same_grid(activations, bits, sigmas):
    model, hessians, _ = activations
    total_gptq = total_rtn = 0.0
    for name, h in hessians.items():
        w = model.state_dict()[name]
        q, scale = train_gpt.gptq_quantize(w, h, bits, sigmas)
        rtn_q, rtn_scale = train_gpt.quantize_rows(w, bits, sigmas)
        assert torch.equal(scale, rtn_scale)                           # the same SDClip grid
        assert q.abs().max() <= 2 ** (bits - 1) - 1 and torch.equal(q, q.round())
        gptq = train_gpt.hessian_error(w, train_gpt.dequantize_rows(q, scale), h)
        rtn = train_gpt.hessian_error(w, train_gpt.dequantize_rows(rtn_q, rtn_scale), h)
        assert (gptq <= rtn * (1 + 1e-9)).all(), name
        total_gptq, total_rtn = total_gptq + gptq.sum().item(), total_rtn + rtn.sum().item()
    assert total_gptq < 0.9 * total_rtn                 # and clearly better overall, not just a tie


def test_gptq_handles_dead_inputs():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(1))
    x[:, 3] = 0.0                                                    # an input that is always zero
    q, scale = train_gpt.gptq_quantize(w, x.T @ x / 100, 6, 12.0)
    assert torch.isfinite(q).all() and torch.isfinite(scale.float()).all()


def test_export_uses_gptq_for_every_matrix_the_embedding_with_the_head_hessian(activations):
    model, hessians, _ = activations
    grid = spec(embed_bits=7)
    plain = train_gpt.quantize_state_dict(model.state_dict(), grid, preset=PRESET)
    gptq = train_gpt.quantize_state_dict(model.state_dict(), grid, hessians=hessians, preset=PRESET)
    for a, b in zip(plain, gptq):
        same = all(np.array_equal(a["parts"][k], b["parts"][k]) for k in a["parts"])
        if a["name"] not in hessians:
            assert same, a["name"]
        elif np.prod(a["shape"]) > 100:           # a 1 x 12 gate may round the same either way
            assert not same, a["name"]
    emb = next(e for e in gptq if e["name"] == "tok_emb.weight")
    q, scale = train_gpt.gptq_quantize(model.tok_emb.weight, hessians["tok_emb.weight"], 7, 15.0)
    assert emb["scheme"] == "int7_row" and np.array_equal(emb["parts"]["q"], q.to(torch.int8).numpy())
    # with another Hessian (any other: here the identity) the embedding would round differently
    q_other, _ = train_gpt.gptq_quantize(model.tok_emb.weight, torch.eye(64), 7, 15.0)
    assert not torch.equal(q, q_other)


# --- LQER ------------------------------------------------------------------------------------------

def test_lqer_factors_reproduce_the_corrected_weight_and_lower_the_error(activations):
    model, hessians, _ = activations
    name = "blocks.1.mlp.fc.weight"
    w, h = model.state_dict()[name], hessians[name]
    q, scale = train_gpt.gptq_quantize(w, h, 5, 8.0)
    deq = train_gpt.dequantize_rows(q, scale)
    parts, drop = train_gpt.lqer_candidate(w, deq, h, rank=4, factors="row6")
    assert parts["lqer_a"].shape == (4, w.shape[0]) and parts["lqer_b"].shape == (4, w.shape[1])
    qmax = 2 ** (train_gpt.LQER_BITS - 1) - 1
    assert all(parts[k].abs().max() <= qmax and torch.equal(parts[k], parts[k].round()) for k in ("lqer_a", "lqer_b"))
    # by hand: A = (qa sa)^T (rows x r), B = qb sb (r x cols)
    a = (parts["lqer_a"] * parts["lqer_a_scale"].float()[:, None]).T
    b = parts["lqer_b"] * parts["lqer_b_scale"].float()[:, None]
    corrected = deq + a @ b
    before, after = (train_gpt.hessian_error(w, x, h).sum().item() for x in (deq, corrected))
    assert drop == pytest.approx(before - after, rel=1e-9) and after < 0.95 * before
    # stored and loaded: the artifact's weight is the corrected one
    stored = dict(q=q, scale=scale, **parts)
    entry = dict(name=name, scheme="int5_row", shape=list(w.shape), parts=train_gpt.to_numpy_parts(stored))
    blob = train_gpt.pack_artifact([entry], PRESET, {})
    assert torch.allclose(train_gpt.unpack_artifact(blob, "t")[0][name], corrected, atol=1e-6)


def test_lqer_goes_to_the_tensors_it_helps_most_and_its_bytes_count(activations):
    model, hessians, _ = activations
    grid = spec(bits=5, mlp=8.0, attn=8.0)
    without = train_gpt.quantize_state_dict(model.state_dict(), grid, hessians=hessians, preset=PRESET)
    with_lqer = train_gpt.quantize_state_dict(model.state_dict(), grid, hessians=hessians, preset=PRESET,
                                              lqer_tensors=2, lqer_rank=4)
    chosen = [e["name"] for e in with_lqer if "lqer_a" in e["parts"]]
    assert len(chosen) == 2
    drops = {}
    for e in without:
        if e["scheme"].startswith("int"):
            deq = train_gpt.dequantize_parts(e["scheme"], e["parts"], e["shape"])
            drops[e["name"]] = train_gpt.lqer_candidate(model.state_dict()[e["name"]], deq, hessians[e["name"]], 4)[1]
    assert set(chosen) == set(sorted(drops, key=drops.get)[-2:])
    sizes = [len(train_gpt.pack_artifact(entries, PRESET, {})) for entries in (without, with_lqer)]
    assert sizes[1] > sizes[0]                                      # the factors are in the artifact's bytes


# --- calibration text --------------------------------------------------------------------------------

def test_self_generated_calibration_is_seeded_and_reads_no_data():
    hp = tiny_hp()
    model = random_gpt(hp)
    a = train_gpt.generate_calibration(model, cpu_runtime(), 3, 10, 50.0, seed=5)
    b = train_gpt.generate_calibration(model, cpu_runtime(), 3, 10, 50.0, seed=5)
    c = train_gpt.generate_calibration(model, cpu_runtime(), 3, 10, 50.0, seed=6)
    assert a.shape == (3, 10) and (a[:, 0] == train_gpt.BOS_ID).all() and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < hp.vocab_size


def test_calibration_text_does_not_depend_on_how_ranks_share_it():
    """Every rank draws the sampling noise of every sequence and keeps its rows: 2 ranks' shares, put
    together, are the one-process text (ranks simulated in one process: decoding is per row)."""
    hp = tiny_hp()
    model = random_gpt(hp)
    whole = train_gpt.generate_calibration(model, cpu_runtime(), 5, 12, 1.0, seed=3)
    shares = [train_gpt.generate_calibration(model, cpu_runtime(rank=r, world_size=2), 5, 12, 1.0, seed=3)
              for r in (0, 1)]
    assert [s.shape[0] for s in shares] == [2, 3]
    assert torch.equal(torch.cat(shares), whole)


def test_training_calibration_stops_the_loop_by_the_reserve(monkeypatch):
    """GPTQ_CALIBRATION=train: the loop's cap is MAX_WALLCLOCK_SECONDS less GPTQ_RESERVE_SECONDS (3 s - 2 s),
    on a clock only the (stand-in) loader moves, 50 ms a step."""
    from test_cuda_hazards import FakeTime, StepLoader
    hp = tiny_hp(ITERATIONS=100_000, MAX_WALLCLOCK_SECONDS=3, GPTQ_CALIBRATION="train", GPTQ_RESERVE_SECONDS=2,
                 VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=100_000)
    fake = FakeTime()
    monkeypatch.setattr(train_gpt, "time", fake)
    lines = ListLog()
    model = random_gpt(hp)
    result = train_gpt.train(hp, cpu_runtime(), model, model, StepLoader(hp, fake, 0.05, 1000.0), lines, lambda *a: None)
    stop = [l for l in lines.lines if l.startswith("stopping_early")]
    assert len(stop) == 1 and result.stopped_early
    assert 800 < result.train_time_ms <= 1000             # under the 1 s left of the 3 s cap by the 2 s reserve


def test_training_calibration_without_a_cap_reserves_nothing(monkeypatch):
    """The default GPTQ_CALIBRATION=train with MAX_WALLCLOCK_SECONDS=0 (no cap): the loop runs its ITERATIONS
    (there is no cap to take the reserve from); calibration is then checked against the challenge's 600 s."""
    from test_cuda_hazards import FakeTime, StepLoader
    hp = tiny_hp(ITERATIONS=12, MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=100_000)
    assert hp.gptq_calibration == "train" and hp.gptq_reserve_seconds > 0
    fake = FakeTime()
    monkeypatch.setattr(train_gpt, "time", fake)
    model = random_gpt(hp)
    result = train_gpt.train(hp, cpu_runtime(), model, model, StepLoader(hp, fake, 0.05, 1000.0), ListLog(), lambda *a: None)
    assert result.steps == 12 and not result.stopped_early
    assert train_gpt.training_deadline_ms(hp) == 600e3


def test_training_calibration_counts_as_a_training_read(demo_data, tmp_path, monkeypatch):
    """GPTQ_CALIBRATION=train: calibration's end is the last training-data read; if it ends past the
    cap (here its Hessian collection takes 3.5 s of a clock nothing else moves), the run is flagged."""
    from test_audit import export_run
    monkeypatch.chdir(tmp_path)
    common = dict(GPTQ_CALIBRATION="train", GPTQ_CALIB_SEQS=2, GPTQ_CALIB_LEN=32, MAX_WALLCLOCK_SECONDS=3,
                  GPTQ_RESERVE_SECONDS=1)
    in_time = export_run(demo_data, "in_time", monkeypatch, calibration_s=0.5, **common)
    late = export_run(demo_data, "late", monkeypatch, calibration_s=3.5, **common)
    assert in_time.artifact.quant["calibration"] == "train"
    assert in_time.artifact.quant["calibration_end_ms"] == in_time.train_data_last_read_ms == 500.0
    assert in_time.read_after_deadline is False
    assert late.artifact.quant["calibration_end_ms"] == 3500.0 and late.read_after_deadline is True


# --- the budget fit moves k ------------------------------------------------------------------------

def fit(hp, model, budget, hessians=None, planned=1.0):
    rt = cpu_runtime()
    hp = hp.replace(ARTIFACT_BUDGET_BYTES=budget)
    log = ListLog()
    plan = train_gpt.BudgetPlan(train_gpt.QuantSpec.from_settings(hp, planned), planned, 0, [], 0,
                                sum(t.numel() for n, t in model.state_dict().items() if t.ndim == 2))
    quantizer = train_gpt.DistributedQuantizer(hp, rt, model.state_dict(), hessians)
    blob, entries, fitted, tried = train_gpt.fit_budget(hp, rt, quantizer, plan, {}, log, train_gpt.StageTimes(rt))
    return blob, fitted, tried, log.lines


FIT_HP = {**ALL_OFF, "MODEL_DIM": "128", "NUM_LAYERS": "3", "VOCAB_SIZE": "512", "LZMA_PRESET": str(PRESET),
          "GPTQ_CALIBRATION": "none", "LQER_TENSORS": "0"}


def natural_bytes(hp, model):
    """Model bytes at the settings' k."""
    entries = train_gpt.quantize_state_dict(model.state_dict(), train_gpt.QuantSpec.from_settings(hp), preset=PRESET)
    return len(train_gpt.pack_artifact(entries, PRESET, {}))


def in_window(total, budget):
    return budget * (1 - train_gpt.FIT_WINDOW) <= total <= budget


def test_the_budget_fit_lands_just_under_a_cap_by_moving_k_coarser():
    hp = tiny_hp(**FIT_HP)
    model = gaussian_model(hp)
    code = train_gpt.code_bytes()
    natural = natural_bytes(hp, model)
    budget = code + int(0.8 * natural)                                                  # 20% fewer model bytes
    blob, fitted, tried, lines = fit(hp, model, budget)
    assert in_window(code + len(blob), budget), (code + len(blob), budget, tried)       # just under
    assert dict(fitted.bits) == dict(train_gpt.QuantSpec.from_settings(hp).bits)        # same bits: k moved
    factor = fitted.sigmas_of("mlp") / hp.quant_clip_sigmas_mlp
    assert factor > 1 and fitted.sigmas_of("attn") == pytest.approx(factor * hp.quant_clip_sigmas_attn)
    assert factor == pytest.approx(2 ** (8 * 0.2 * natural / sum(t.numel() for t in model.state_dict().values() if t.ndim == 2)), rel=0.5)
    assert any(l.startswith("budget_fit: over by") for l in lines) and 2 <= len(tried) <= train_gpt.FIT_ATTEMPTS


def test_the_budget_fit_spends_what_the_first_pack_leaves_under_the_cap_on_finer_k():
    """The first pack, at the settings' k, lands 15% under the cap: the fit moves every k finer than the settings
    until the artifact is within FIT_WINDOW (0.3%) of the cap. (The fit of 33164c4 stopped at the settings' k.)"""
    hp = tiny_hp(**FIT_HP)
    model = gaussian_model(hp)
    code = train_gpt.code_bytes()
    natural = natural_bytes(hp, model)
    budget = code + int(natural / 0.85)
    blob, fitted, tried, lines = fit(hp, model, budget)
    first = int(tried[0].split()[0])
    assert tried[0].endswith(train_gpt.QuantSpec.from_settings(hp).describe()) and first < 0.86 * (budget - code)
    assert in_window(code + len(blob), budget), (code + len(blob), budget, tried)
    factor = fitted.sigmas_of("mlp") / hp.quant_clip_sigmas_mlp
    assert train_gpt.FIT_MIN_SCALE < factor < 1 and fitted.sigmas_of("embed") == pytest.approx(factor * hp.quant_clip_sigmas_embed)
    assert any(l.startswith("budget_fit: under by") for l in lines) and len(tried) <= train_gpt.FIT_ATTEMPTS


def test_the_budget_fit_goes_no_finer_than_its_bound():
    """A roomy budget (16 MB for a ~200 kB model): k goes to FIT_MIN_SCALE of the settings and stops there."""
    hp = tiny_hp(**FIT_HP)
    model = gaussian_model(hp)
    blob, fitted, tried, lines = fit(hp, model, 16_000_000, planned=2.0)
    assert fitted == train_gpt.QuantSpec.from_settings(hp, train_gpt.FIT_MIN_SCALE) and len(tried) == 2
    coarse = train_gpt.quantize_state_dict(model.state_dict(), train_gpt.QuantSpec.from_settings(hp, 2.0), preset=PRESET)
    assert len(blob) > len(train_gpt.pack_artifact(coarse, PRESET, {}))            # the spare bytes were spent


@pytest.mark.parametrize("target_factor", [0.6, 1.0, 3.0])
def test_next_factor_finds_the_factor_of_a_log_linear_size_curve(target_factor):
    """On totals that follow b - c log2 k exactly, the rule's first guess is off by its slope error, the secant
    and the interpolation land on the target; every guess stays within the bounds."""
    def total(f):
        return 10_000_000 - 1_500_000 * np.log2(f)
    target, points = total(target_factor), [(1.0, total(1.0))]
    for _ in range(3):
        f = train_gpt.next_factor(points, target, sdclip_params=8_000_000)
        assert train_gpt.FIT_MIN_SCALE <= f <= train_gpt.FIT_MAX_SCALE
        points.append((f, total(f)))
    assert points[-1][0] == pytest.approx(target_factor, rel=1e-6)
    assert train_gpt.next_factor([(1.0, total(1.0))], total(0.01), 8_000_000) == train_gpt.FIT_MIN_SCALE
    assert train_gpt.next_factor([(1.0, total(1.0))], total(100.0), 8_000_000) == train_gpt.FIT_MAX_SCALE


def test_the_budget_fit_steps_bits_down_only_past_the_reach_of_k_and_refuses_what_cannot_fit():
    hp = tiny_hp(**{**ALL_OFF, "MODEL_DIM": "64", "LZMA_PRESET": str(PRESET), "GPTQ_CALIBRATION": "none",
                    "LQER_TENSORS": "0"})
    model = gaussian_model(hp)
    code = train_gpt.code_bytes()
    coarsest = train_gpt.precision_ladder(train_gpt.QuantSpec.from_settings(hp))[-1].coarser(train_gpt.FIT_MAX_SCALE)
    entries = train_gpt.quantize_state_dict(model.state_dict(), coarsest, preset=PRESET)
    floor = len(train_gpt.pack_artifact(entries, PRESET, {}))
    with pytest.raises(train_gpt.PipelineError, match="artifact over budget") as err:
        fit(hp, model, code + floor // 2)
    assert "every setting tried" in str(err.value)


# --- the planner -----------------------------------------------------------------------------------------

PLANNER_TOLERANCE = train_gpt.PLANNER_TOLERANCE


def export(hp, model, tmp_path, name="p.xz"):
    rt, log = cpu_runtime(), ListLog()
    plan = train_gpt.plan_budget(hp, log)
    return plan, train_gpt.export_artifact(hp, rt, model, str(tmp_path / name), plan, None, log, train_gpt.StageTimes(rt))


@pytest.mark.parametrize("ternary", ["", ".mlp."])
def test_planner_predicts_the_artifact_within_tolerance_on_gaussian_weights(tmp_path, ternary):
    hp = tiny_hp(**{**ALL_OFF, "MODEL_DIM": "128", "NUM_LAYERS": "3", "VOCAB_SIZE": "512", "MLP_MULT": "3",
                    "LZMA_PRESET": str(PRESET), "TERNARY_PATTERNS": ternary, "LQER_TENSORS": "0"})
    model = gaussian_model(hp)
    plan, out = export(hp, model, tmp_path)
    assert abs(out.bytes_model - plan.predicted_bytes) <= PLANNER_TOLERANCE * out.bytes_model
    assert sum(g["params"] for g in plan.groups) == train_gpt.count_parameters(model)
    actual = {(g["name"], g["scheme"]): g for g in out.quant["groups"]}
    assert {(g["name"], train_gpt.scheme_family(g["scheme"])) for g in plan.groups} == set(actual)
    assert any(s == "ternary" for _, s in actual) == bool(ternary)


def test_planner_is_an_upper_bound_within_tolerance_on_trained_weights(tmp_path):
    """Weights after a short CPU training (heavier tails than Gaussian) compress at least as well as the
    Gaussian planner predicts, and not much better."""
    data = make_shards(tmp_path, vocab=512)
    settings = {**ALL_OFF, "MODEL_DIM": "64", "VOCAB_SIZE": "512", "ITERATIONS": "60", "LZMA_PRESET": str(PRESET),
                "LQER_TENSORS": "0", "LATE_QAT_THRESHOLD": "0"}
    state, _ = run_training(data, settings)
    hp = tiny_hp(**settings)
    model = train_gpt.GPT(hp)
    model.load_state_dict(state)
    plan, out = export(hp, model, tmp_path)
    assert (1 - PLANNER_TOLERANCE) * plan.predicted_bytes <= out.bytes_model <= plan.predicted_bytes * 1.01


def test_planner_predicts_the_factor_on_k_a_shape_needs():
    """A budget the settings' k overshoot: the plan coarsens k by the factor the -log2 k rule gives, and its table
    at that k lands in the fit's window; a budget they leave room in: it refines k; a roomy one: to FIT_MIN_SCALE."""
    hp = tiny_hp(**{**ALL_OFF, "MODEL_DIM": "128", "NUM_LAYERS": "3", "VOCAB_SIZE": "512", "LZMA_PRESET": str(PRESET)})
    code = train_gpt.code_bytes()
    assert train_gpt.plan_budget(hp, ListLog()).factor == train_gpt.FIT_MIN_SCALE
    at_settings = sum(g["bytes"] for g in train_gpt.plan_artifact(hp, train_gpt.QuantSpec.from_settings(hp)))
    for share, direction in ((0.85, 1), (1.1, -1)):
        budget = code + int(share * at_settings)
        plan = train_gpt.plan_budget(hp.replace(ARTIFACT_BUDGET_BYTES=budget), ListLog())
        assert (plan.factor - 1.0) * direction > 0 and plan.spec == train_gpt.QuantSpec.from_settings(hp).coarser(plan.factor)
        assert budget * (1 - train_gpt.FIT_WINDOW) <= plan.predicted_bytes + code <= budget


# --- settings ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env,fragment", [
    ({"LATE_QAT_THRESHOLD": "0.05", "LR_FLOOR": "0.1"}, "LATE_QAT_THRESHOLD=0.05 would never turn on"),
    ({"LATE_QAT_THRESHOLD": "0.5", "WARMDOWN_FRAC": "0"}, "LATE_QAT_THRESHOLD=0.5 would never turn on"),
    ({"LATE_QAT_THRESHOLD": "1.5"}, "LATE_QAT_THRESHOLD=1.5 must be a fraction in [0, 1]"),
    ({"TERNARY_FROM_STEP": "0"}, "TERNARY_FROM_STEP=0 needs TERNARY_PATTERNS"),
    ({"TERNARY_FROM_STEP": "-2", "TERNARY_PATTERNS": ".mlp."}, "TERNARY_FROM_STEP=-2"),
    ({"TERNARY_PATTERNS": ".mlp.,,"}, "TERNARY_PATTERNS='.mlp.,,' has an empty fragment"),
    ({"GPTQ_CALIBRATION": "data"}, "GPTQ_CALIBRATION='data' must be self, train or none"),
    ({"GPTQ_CALIB_SEQS": "0"}, "GPTQ_CALIB_SEQS=0 must be positive"),
    ({"GPTQ_CALIBRATION": "self", "GPTQ_RESERVE_SECONDS": "5"}, "GPTQ_RESERVE_SECONDS is used only with GPTQ_CALIBRATION=train"),
    ({"GPTQ_RESERVE_SECONDS": "0"}, "GPTQ_CALIBRATION=train needs 0 < GPTQ_RESERVE_SECONDS=0"),
    ({"GPTQ_RESERVE_SECONDS": "600"}, "GPTQ_CALIBRATION=train needs 0 < GPTQ_RESERVE_SECONDS=600 < MAX_WALLCLOCK_SECONDS=600"),
    ({"GPTQ_CALIBRATION": "none", "AWQ_GROUPS": "2"}, "AWQ_GROUPS=2 ranks columns by the GPTQ calibration's activations"),
    ({"AWQ_BITS": "6"}, "AWQ_BITS=6 is no more than QUANT_MATRIX_BITS=6 and QUANT_EMBED_BITS=7"),
    ({"AWQ_BITS": "5"}, "AWQ_BITS=5 must be 6, 7 or 8"),
])
def test_compression_settings_errors_name_the_variable(env, fragment):
    with pytest.raises(train_gpt.PipelineError) as err:
        train_gpt.read_settings(env)
    assert fragment in str(err.value)


@pytest.mark.slow
def test_compiled_model_follows_every_qat_state_like_eager():
    """torch.compile (inductor, as on CUDA) with fake quantization off, ternary-only and all on:
    each state gives eager's loss and gradients (the states a run compiles before its clock)."""
    hp = tiny_hp(TERNARY_PATTERNS=".mlp.", MODEL_DIM=128, BIGRAM_VOCAB=32)
    model = random_gpt(hp, seed=7)
    compiled = train_gpt.compile_model(model)
    x = torch.randint(0, hp.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    grid, ternary = spec(), (".mlp.",)
    losses = []
    for state in (lambda: train_gpt.set_qat(model, None, ()),
                  lambda: train_gpt.set_qat(model, grid, ternary, only_ternary=True),
                  lambda: train_gpt.set_qat(model, grid, ternary)):
        state()
        grads = []
        for run in (model, compiled):
            model.zero_grad()
            loss = run(x, x).mean()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            losses.append(loss.item())
        torch.testing.assert_close(losses[-1], losses[-2], rtol=1e-4, atol=1e-4)
        for g_eager, g_comp in zip(*grads):
            torch.testing.assert_close(g_comp, g_eager, rtol=1e-3, atol=1e-4)
    assert len({round(l, 6) for l in losses[::2]}) == 3          # the three states are three different models


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int6_row", "int8_row", "ternary"])
def test_compiled_fake_quantization_is_bit_exact(scheme):
    """Inductor must round the fp16 scale like eager: the compiled QAT forward then uses exactly the
    weights export stores. (Plain torch.compile kept the fp32 scale: most values differed, a few in their rounding.)"""
    w = torch.randn(384, 512, generator=torch.Generator().manual_seed(8)) * 0.02
    train_gpt.compile_model(torch.nn.Identity())                  # sets the inductor option compile_model uses
    compiled = torch.compile(lambda w: train_gpt.fake_quantize(w, scheme, 12.0), dynamic=False)
    assert torch.equal(compiled(w), train_gpt.fake_quantize(w, scheme, 12.0))
