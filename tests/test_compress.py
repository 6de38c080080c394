"""Compression (issue 4): ternary quantization and both packings, fake quantization equal to export,
late QAT reaching every exported tensor, GPTQ against round-to-nearest on real activations, the
planner against the real artifact, and the training-loop switches (late QAT, ternary from a step,
telemetry, the calibration reserve)."""


import numpy as np
import pytest
import torch

import train_gpt
from _helpers import cpu_runtime, random_gpt, tiny_hp
from test_stack import ALL_OFF, ListLog, gaussian_model, make_shards, run_training

PRESET = 6


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
        scheme, parts = train_gpt.quantize_tensor(w, "ternary", None, PRESET)
        q, scale = train_gpt.quantize_ternary(w)
        q = q.to(torch.int8).numpy()
        sizes = {"ternary_base3": train_gpt.lzma_size([train_gpt.pack_ternary_base3(q), scale.numpy()], PRESET),
                 "ternary_mask": train_gpt.lzma_size([*train_gpt.pack_ternary_mask(q).values(), scale.numpy()], PRESET)}
        assert scheme == min(sizes, key=sizes.get)
        picked[name] = scheme
    assert picked == {"dense": "ternary_base3", "sparse": "ternary_mask"}


# --- the quantizers ------------------------------------------------------------------------------------

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
        deq = train_gpt.fake_quantize(w, scheme)
        assert torch.isfinite(deq).all() and deq[0].abs().sum() == 0 and deq[1, 150] != 0, scheme


@pytest.mark.parametrize("scheme", ["ternary", "ternary_h", "int5_row", "int6_row", "int7_row", "int8_row"])
def test_dequantized_artifact_equals_the_fake_quantized_forward_weight(scheme):
    """What export stores and unpack returns is bit for bit the weight the QAT forward used."""
    gen = torch.Generator().manual_seed(1)
    cols = 384 if scheme == "ternary_h" else 300                                  # Hadamard: whole blocks of 128
    w = torch.randn(48, cols, generator=gen) * torch.rand(48, 1, generator=gen)   # rows of different scale
    w.requires_grad_(True)
    ste = train_gpt.fake_quantize(w, scheme)
    stored, parts = train_gpt.quantize_tensor(w, scheme, None, PRESET)
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
    _, parts = train_gpt.quantize_tensor(w, "ternary", None, PRESET)
    assert np.array_equal(parts["scale"], train_scale.numpy())
    deq = train_gpt.dequantize_parts("ternary_base3", {"trits": train_gpt.pack_ternary_base3(
        train_gpt.quantize_ternary(w)[0].to(torch.int8).numpy()), "scale": parts["scale"]}, [16, 256])
    _, rederived = train_gpt.quantize_ternary(deq)
    assert (rederived.float() < 0.9 * train_scale.float()).all()


# --- late QAT reaches every exported tensor ---------------------------------------------------------------

@pytest.mark.parametrize("ternary", ["", ".mlp."])
def test_qat_reaches_every_tensor_export_quantizes(monkeypatch, ternary):
    hp = tiny_hp(BIGRAM_VOCAB=32, ATTN_GATE=1, TERNARY_PATTERNS=ternary)
    model = random_gpt(hp)
    bits = dict(mlp=6, other=6)
    entries = train_gpt.quantize_state_dict(model.state_dict(), bits, train_gpt.ternary_patterns(hp), preset=PRESET)
    exported = {e["name"]: train_gpt.scheme_family(e["scheme"]) for e in entries if e["scheme"] != "fp16"}
    names = {id(p): n for n, p in model.named_parameters()}
    seen = {}
    real = train_gpt.fake_quantize

    def spy(w, scheme):
        seen[names[id(w)]] = scheme
        return real(w, scheme)

    monkeypatch.setattr(train_gpt, "fake_quantize", spy)
    n_on = train_gpt.set_qat(model, bits, train_gpt.ternary_patterns(hp))
    x = torch.randint(0, hp.vocab_size, (2, 16))
    model(x, x).mean().backward()
    assert n_on == len(exported) and seen == exported
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


# --- GPTQ ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def activations(demo_data):
    """Hessians of every linear's inputs in a random GPT over real text (the demo validation shard)."""
    hp = tiny_hp(VOCAB_SIZE=demo_data["vocab"], MODEL_DIM=64, BIGRAM_VOCAB=0)
    model = random_gpt(hp, seed=3)
    tokens = train_gpt.load_validation_tokens(str(demo_data["dir"]), hp.vocab_size, 8 * 64)
    batch = torch.from_numpy(tokens.astype(np.int64)).view(8, 64)
    return model, train_gpt.collect_hessians(model, cpu_runtime(), [batch[:4], batch[4:]])


def test_hessians_are_the_mean_input_outer_product(activations):
    model, hessians = activations
    h = hessians["blocks.0.mlp.proj.weight"]
    assert h.shape == (128, 128) and torch.allclose(h, h.T) and (h.diagonal() >= 0).all()
    assert set(hessians) == {n for n, m in model.named_parameters() if n.endswith(".weight") and m.ndim == 2
                             and n != "tok_emb.weight"}


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_gptq_hessian_weighted_error_is_at_most_round_to_nearest(activations, bits):
    model, hessians = activations
    total_gptq = total_rtn = 0.0
    for name, h in hessians.items():
        w = model.state_dict()[name]
        q, scale = train_gpt.gptq_quantize(w, h, bits)
        assert q.abs().max() <= 2 ** (bits - 1) - 1 and torch.equal(q, q.round())
        gptq = train_gpt.hessian_error(w, train_gpt.dequantize_rows(q, scale), h)
        rtn = train_gpt.hessian_error(w, train_gpt.dequantize_rows(*train_gpt.quantize_rows(w, bits)), h)
        assert (gptq <= rtn * (1 + 1e-9)).all(), name
        total_gptq, total_rtn = total_gptq + gptq.sum().item(), total_rtn + rtn.sum().item()
    assert total_gptq < 0.9 * total_rtn                 # and clearly better overall, not just a tie


def test_gptq_handles_dead_inputs():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    x = torch.randn(100, 16, generator=torch.Generator().manual_seed(1))
    x[:, 3] = 0.0                                                    # an input that is always zero
    q, scale = train_gpt.gptq_quantize(w, x.T @ x / 100, 6)
    assert torch.isfinite(q).all() and torch.isfinite(scale.float()).all()


def test_export_uses_gptq_when_given_hessians(activations, tmp_path):
    model, hessians = activations
    hp = tiny_hp(VOCAB_SIZE=model.tok_emb.num_embeddings, MODEL_DIM=64, BIGRAM_VOCAB=0, LZMA_PRESET=PRESET)
    plain = train_gpt.quantize_state_dict(model.state_dict(), dict(mlp=6, other=6), preset=PRESET)
    gptq = train_gpt.quantize_state_dict(model.state_dict(), dict(mlp=6, other=6), hessians=hessians, preset=PRESET)
    for a, b in zip(plain, gptq):
        same = all(np.array_equal(a["parts"][k], b["parts"][k]) for k in a["parts"])
        assert same == (a["name"] not in hessians), a["name"]
    out = train_gpt.export_artifact(hp, model, str(tmp_path / "g.xz"), ListLog(), hessians)
    _, state, _ = train_gpt.read_artifact(str(tmp_path / "g.xz"))
    name = "blocks.1.attn.c_v.weight"
    q, scale = train_gpt.gptq_quantize(model.state_dict()[name], hessians[name], 6)
    assert torch.equal(state[name], train_gpt.dequantize_rows(q, scale)) and out["quant"]["pruned"] == 0


def test_self_generated_calibration_is_seeded_and_reads_no_data():
    hp = tiny_hp()
    model = random_gpt(hp)
    a = train_gpt.generate_calibration(model, cpu_runtime(), 3, 10, 50.0, seed=5)
    b = train_gpt.generate_calibration(model, cpu_runtime(), 3, 10, 50.0, seed=5)
    c = train_gpt.generate_calibration(model, cpu_runtime(), 3, 10, 50.0, seed=6)
    assert a.shape == (3, 10) and (a[:, 0] == train_gpt.BOS_ID).all() and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < hp.vocab_size


def test_training_calibration_stops_the_loop_by_the_reserve(tmp_path):
    data = make_shards(tmp_path)
    _, lines = run_training(data, {"ITERATIONS": "100000", "MAX_WALLCLOCK_SECONDS": "3", "GPTQ_CALIBRATION": "train",
                                   "GPTQ_RESERVE_SECONDS": "2"})
    stop = [l for l in lines if l.startswith("stopping_early")]
    assert len(stop) == 1
    stopped_ms = int(stop[0].split("train_time:")[1].split("ms")[0])
    assert 800 <= stopped_ms < 2000        # near the 3 s cap less the 2 s reserve, far from the 3 s cap itself


# --- the planner -----------------------------------------------------------------------------------------

PLANNER_TOLERANCE = 0.10     # predicted model bytes within 10% of the real artifact (Gaussian weights)


@pytest.mark.parametrize("ternary", ["", ".mlp."])
def test_planner_predicts_the_artifact_within_tolerance(tmp_path, ternary):
    hp = tiny_hp(**{**ALL_OFF, "MODEL_DIM": "128", "NUM_LAYERS": "3", "VOCAB_SIZE": "512", "MLP_MULT": "3",
                    "LZMA_PRESET": str(PRESET), "TERNARY_PATTERNS": ternary})
    plan = train_gpt.plan_artifact(hp)
    model = gaussian_model(hp)
    out = train_gpt.export_artifact(hp, model, str(tmp_path / "p.xz"), ListLog())
    predicted = sum(g["bytes"] for g in plan)
    assert abs(out["bytes_model"] - predicted) <= PLANNER_TOLERANCE * out["bytes_model"]
    assert sum(g["params"] for g in plan) == train_gpt.count_parameters(model)
    actual = {(g["name"], g["scheme"]): g for g in out["quant"]["groups"]}
    assert {(g["name"], train_gpt.scheme_family(g["scheme"])) for g in plan} == set(actual)
    assert any(s == "ternary" for _, s in actual) == bool(ternary)


def test_planner_says_when_the_default_shape_does_not_fit():
    log = ListLog()
    hp = tiny_hp(**{"MODEL_DIM": "512", "NUM_LAYERS": "11", "VOCAB_SIZE": "1024", "MLP_MULT": "3", "NUM_HEADS": "8",
                    "NUM_KV_HEADS": "4", "BIGRAM_VOCAB": "3072", "BIGRAM_DIM": "112", "ROPE_DIMS": "16",
                    "RECUR_LAYERS": "", "QUANT_MATRIX_BITS": "8", "LZMA_PRESET": str(PRESET)})
    predicted = train_gpt.log_plan(hp, train_gpt.plan_artifact(hp), log)
    assert predicted > 20_000_000 and "over by" in log.lines[-1]
    hp6 = hp.replace(QUANT_MATRIX_BITS=6)
    assert train_gpt.log_plan(hp6, train_gpt.plan_artifact(hp6), log) < predicted


# --- settings ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("env,fragment", [
    ({"LATE_QAT_THRESHOLD": "0.05", "LR_FLOOR": "0.1"}, "LATE_QAT_THRESHOLD=0.05 would never turn on"),
    ({"LATE_QAT_THRESHOLD": "0.5", "WARMDOWN_FRAC": "0"}, "LATE_QAT_THRESHOLD=0.5 would never turn on"),
    ({"LATE_QAT_THRESHOLD": "1.5"}, "LATE_QAT_THRESHOLD=1.5 must be in [0, 1]"),
    ({"TERNARY_FROM_STEP": "0"}, "TERNARY_FROM_STEP=0 needs TERNARY_PATTERNS"),
    ({"TERNARY_FROM_STEP": "-2", "TERNARY_PATTERNS": ".mlp."}, "TERNARY_FROM_STEP=-2"),
    ({"TERNARY_PATTERNS": ".mlp.,,"}, "TERNARY_PATTERNS='.mlp.,,' has an empty fragment"),
    ({"GPTQ_CALIBRATION": "data"}, "GPTQ_CALIBRATION='data' must be self, train or none"),
    ({"GPTQ_CALIB_SEQS": "0"}, "GPTQ_CALIB_SEQS=0 must be positive"),
    ({"GPTQ_RESERVE_SECONDS": "5"}, "GPTQ_RESERVE_SECONDS is used only with GPTQ_CALIBRATION=train"),
    ({"GPTQ_CALIBRATION": "train", "GPTQ_RESERVE_SECONDS": "0"}, "GPTQ_CALIBRATION=train needs 0 < GPTQ_RESERVE_SECONDS=0"),
    ({"GPTQ_CALIBRATION": "train", "MAX_WALLCLOCK_SECONDS": "0"}, "GPTQ_CALIBRATION=train needs"),
])
def test_compression_settings_errors_name_the_variable(env, fragment):
    with pytest.raises(train_gpt.PipelineError, match=None) as err:
        train_gpt.read_settings(env)
    assert fragment in str(err.value)


# --- the Hadamard basis (TERNARY_HADAMARD) -------------------------------------------------------------

def sylvester(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def test_hadamard_blocks_is_the_blockwise_orthonormal_hadamard_and_its_own_inverse():
    w = torch.randn(5, 256, generator=torch.Generator().manual_seed(0))
    h = sylvester(train_gpt.TERNARY_GROUP)
    want = torch.cat([w[:, :128].double() @ h, w[:, 128:].double() @ h], dim=1)
    got = train_gpt.hadamard_blocks(w)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert torch.allclose(train_gpt.hadamard_blocks(got), w, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), w.norm(dim=1), rtol=1e-5)


def test_hadamard_ternary_stores_the_rotated_trits_and_the_forward_undoes_the_rotation():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    stored, parts = train_gpt.quantize_tensor(w, "ternary_h", None, PRESET)
    assert stored.startswith("ternary_h_")
    q, scale = train_gpt.quantize_ternary(train_gpt.hadamard_blocks(w))
    assert np.array_equal(parts["scale"], scale.numpy())
    deq = train_gpt.dequantize_parts(stored, parts, [16, 256])
    assert torch.equal(deq, train_gpt.hadamard_blocks(train_gpt.dequantize_ternary(q, scale)))
    # a different function from plain ternary: the rotation changes which values are stored
    assert not torch.equal(deq, train_gpt.fake_quantize(w, "ternary").detach())


def test_hadamard_needs_whole_blocks_and_ternary_matrices():
    with pytest.raises(train_gpt.PipelineError, match="TERNARY_HADAMARD=1 needs TERNARY_PATTERNS"):
        train_gpt.read_settings({"TERNARY_HADAMARD": "1"})
    hp = tiny_hp(TERNARY_PATTERNS=".mlp.", TERNARY_HADAMARD=1)          # width 32: not whole blocks of 128
    with pytest.raises(train_gpt.PipelineError, match="blocks.0.mlp.fc.weight has 32 inputs"):
        train_gpt.plan_artifact(hp)


def test_hadamard_ternary_trains_with_telemetry(tmp_path):
    data = make_shards(tmp_path)
    _, lines = run_training(data, {"ITERATIONS": "4", "MODEL_DIM": "128", "TERNARY_PATTERNS": ".mlp.",
                                   "TERNARY_HADAMARD": "1", "TERNARY_FROM_STEP": "0", "LATE_QAT_THRESHOLD": "0",
                                   "TRAIN_LOG_EVERY": "2"})
    assert any(l.startswith("ternary_qat: on from step 0: 4 matrices") for l in lines)
    assert sum(l.startswith("ternary: mlp zeros:") for l in lines) == 3      # the logs at steps 1, 2, 4


def test_training_calibration_counts_as_a_training_read(demo_data, tmp_path, monkeypatch):
    """GPTQ_CALIBRATION=train: calibration's end is the last training-data read; if it ends past the
    cap (here: Hessian collection made slow), the run is flagged as having read data after the deadline."""
    monkeypatch.chdir(tmp_path)
    vocab = demo_data["vocab"]
    common = dict(VOCAB_SIZE=vocab, DATA_PATH=demo_data["dir"], TOKENIZER_PATH=demo_data["tokenizer"],
                  TRAIN_BATCH_TOKENS=8 * 32, TRAIN_SEQ_LEN=32, EVAL_STRIDE=16, ITERATIONS=3, COMPILE_WARMUP_STEPS=0,
                  VAL_LOSS_EVERY=0, LZMA_PRESET=0, GPTQ_CALIBRATION="train", GPTQ_CALIB_SEQS=2, GPTQ_CALIB_LEN=32,
                  MAX_WALLCLOCK_SECONDS=3, GPTQ_RESERVE_SECONDS=1)
    val = train_gpt.load_validation_tokens(str(demo_data["dir"]), vocab, 300)
    tables = train_gpt.build_bpb_tables(str(demo_data["tokenizer"]), vocab)
    real = train_gpt.collect_hessians
    out = {}
    for name, delay in (("in_time", 0.0), ("late", 3.5)):
        def collect(*args, delay=delay):
            import time
            time.sleep(delay)
            return real(*args)
        monkeypatch.setattr(train_gpt, "collect_hessians", collect)
        hp = tiny_hp(**common)
        model = random_gpt(hp, seed=0)
        log = ListLog()
        out[name] = train_gpt.train_and_export(hp, cpu_runtime(), name, model, model, val, tables, log)
        assert any(l.startswith("gptq_calibration: train 2x32 tokens") for l in log.lines)
    in_time, late = out["in_time"], out["late"]
    assert in_time["quant"]["calibration"] == "train"
    assert in_time["train_time_ms"] < in_time["quant"]["calibration_end_ms"] == in_time["train_data_last_read_ms"] < 3e3
    assert in_time["train_data_read_after_deadline"] is False
    assert late["quant"]["calibration_end_ms"] > 3e3 and late["train_data_read_after_deadline"] is True


@pytest.mark.slow
def test_compiled_model_follows_every_qat_state_like_eager():
    """torch.compile (inductor, as on CUDA) with fake quantization off, ternary-only and all on:
    each state gives eager's loss and gradients (the states a run compiles before its clock)."""
    hp = tiny_hp(TERNARY_PATTERNS=".mlp.", MODEL_DIM=128, BIGRAM_VOCAB=32)
    model = random_gpt(hp, seed=7)
    compiled = train_gpt.compile_model(model)
    x = torch.randint(0, hp.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    bits, ternary = dict(mlp=6, other=6), (".mlp.",)
    losses = []
    for state in (lambda: train_gpt.set_qat(model, None, ()),
                  lambda: train_gpt.set_qat(model, bits, ternary, only_ternary=True),
                  lambda: train_gpt.set_qat(model, bits, ternary)):
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
@pytest.mark.parametrize("scheme", ["int6_row", "int8_row", "ternary", "ternary_h"])
def test_compiled_fake_quantization_is_bit_exact(scheme):
    """Inductor must round the fp16 scale like eager: the compiled QAT forward then uses exactly the
    weights export stores. (Plain torch.compile kept the fp32 scale: most values differed, a few in their rounding.)"""
    w = torch.randn(384, 512, generator=torch.Generator().manual_seed(8)) * 0.02
    train_gpt.compile_model(torch.nn.Identity())                  # sets the inductor option compile_model uses
    compiled = torch.compile(lambda w: train_gpt.fake_quantize(w, scheme), dynamic=False)
    assert torch.equal(compiled(w), train_gpt.fake_quantize(w, scheme))
