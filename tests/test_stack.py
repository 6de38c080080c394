"""The competitive stack: every switch changes the forward or the update, a tiny run with
it still learns, the scheduled switches (EMA, recurrence) act at the step they are meant to, and
distributed training equals single-process training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import train_gpt
from _helpers import cpu_runtime, random_gpt, run_distributed, tiny_hp
from tools import harness

# Each switch: (settings that turn it on, settings that turn it off), on a tiny model.
SWITCHES = {
    "MLP_ACT": ({"MLP_ACT": "leaky_relu2"}, {"MLP_ACT": "relu2"}),
    "ROPE_DIMS": ({"ROPE_DIMS": "4"}, {"ROPE_DIMS": "0"}),
    "XSA_LAST_N": ({"XSA_LAST_N": "2"}, {"XSA_LAST_N": "0"}),
    "ATTN_GATE": ({"ATTN_GATE": "1"}, {"ATTN_GATE": "0"}),
    "ATTN_GATE_DIMS": ({"ATTN_GATE": "1", "ATTN_GATE_DIMS": "12"}, {"ATTN_GATE": "1", "ATTN_GATE_DIMS": "0"}),
    "BIGRAM_VOCAB": ({"BIGRAM_VOCAB": "32"}, {"BIGRAM_VOCAB": "0"}),
    "SMEAR_GATE": ({"SMEAR_GATE": "1"}, {"SMEAR_GATE": "0"}),
    "SMEAR_GATE_DIMS": ({"SMEAR_GATE": "1", "SMEAR_GATE_DIMS": "12"}, {"SMEAR_GATE": "1", "SMEAR_GATE_DIMS": "0"}),
    "LN_SCALE": ({"LN_SCALE": "1"}, {"LN_SCALE": "0"}),
    "PARALLEL_LAST_N": ({"PARALLEL_LAST_N": "1"}, {"PARALLEL_LAST_N": "0"}),
    "PARALLEL_LANES": ({"PARALLEL_LAST_N": "1", "PARALLEL_LANES": "2"}, {"PARALLEL_LAST_N": "1", "PARALLEL_LANES": "1"}),
    "RECUR_LAYERS": ({"RECUR_LAYERS": "1-1"}, {"RECUR_LAYERS": ""}),
}
ALL_OFF = {"MLP_ACT": "relu2", "ROPE_DIMS": "0", "XSA_LAST_N": "0", "ATTN_GATE": "0", "ATTN_GATE_DIMS": "0",
           "BIGRAM_VOCAB": "0", "SMEAR_GATE": "0", "SMEAR_GATE_DIMS": "0", "LN_SCALE": "0", "PARALLEL_LAST_N": "0",
           "PARALLEL_LANES": "1", "RECUR_LAYERS": ""}


def pattern_batch(vocab: int, n: int = 8, t: int = 16, seed: int = 0) -> torch.Tensor:
    """Sequences of a fixed random 8-token cycle (easy to learn) with random phases."""
    gen = torch.Generator().manual_seed(seed)
    cycle = torch.randint(2, vocab, (8,), generator=gen)
    phase = torch.randint(0, 8, (n,), generator=gen)
    idx = (phase[:, None] + torch.arange(t + 1)[None, :]) % 8
    return cycle[idx]


def build(settings: dict, seed: int = 0, recurrence_on: bool = True):
    hp = tiny_hp(**{**ALL_OFF, **settings})
    model = random_gpt(hp, seed=seed)
    model.recurrence_on = recurrence_on
    return hp, model


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_switch_changes_the_forward(name):
    """Same seed, same random weights where shared: turning the switch on changes the logits."""
    on, off = SWITCHES[name]
    _, m_on = build(on)
    _, m_off = build(off)
    shared = {k: v for k, v in m_off.state_dict().items() if k in m_on.state_dict()
              and m_on.state_dict()[k].shape == v.shape}
    m_on.load_state_dict(shared, strict=False)
    x = pattern_batch(64)[:, :-1]
    with torch.no_grad():
        assert not torch.allclose(m_on.logits(x), m_off.logits(x), atol=1e-5), name


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_tiny_run_with_switch_still_learns(name):
    """Thirty optimizer steps (Muon + AdamW, the real optimizers) on a learnable pattern, from the
    real initialisation: the loss falls by more than half."""
    on, _ = SWITCHES[name]
    hp = tiny_hp(**{**ALL_OFF, **on})
    torch.manual_seed(0)
    model = train_gpt.GPT(hp)
    model.recurrence_on = True
    optimizers = train_gpt.build_optimizers(model, hp, cpu_runtime())
    seq = pattern_batch(hp.vocab_size)
    losses = []
    for _ in range(30):
        loss = model(seq[:, :-1], seq[:, 1:]).mean()
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (name, losses[0], losses[-1])


def test_zero_initialised_additions_start_as_identity_but_learn():
    """BigramHash's projection, SmearGate and the attention gate start as no-ops (the model starts as
    the one without them), yet receive a gradient, so the update differs from step one."""
    torch.manual_seed(0)
    hp = tiny_hp(**{**ALL_OFF, "BIGRAM_VOCAB": "32", "SMEAR_GATE": "1", "ATTN_GATE": "1"})
    model = train_gpt.GPT(hp)
    torch.manual_seed(0)
    plain = train_gpt.GPT(tiny_hp(**ALL_OFF))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    seq = pattern_batch(64)
    assert torch.allclose(model(seq[:, :-1], seq[:, 1:]), plain(seq[:, :-1], seq[:, 1:]), atol=1e-6)
    model(seq[:, :-1], seq[:, 1:]).mean().backward()
    for p in (model.bigram.proj.weight, model.smear):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the gate sits behind the zero-initialised output projection (like c_q, c_k, c_v): its gradient
    # appears once one optimizer step has moved the projection
    for opt in train_gpt.build_optimizers(model, hp, cpu_runtime()):
        opt.step()
        opt.zero_grad(set_to_none=True)
    model(seq[:, :-1], seq[:, 1:]).mean().backward()
    assert model.blocks[0].attn.gate.weight.grad.abs().sum() > 0


def test_smear_gate_never_smears_into_a_bos():
    """The embedding at a BOS position does not depend on the token before it."""
    hp, model = build({"SMEAR_GATE": "1"})
    with torch.no_grad():
        model.smear.fill_(0.7)
        a = torch.tensor([[5, 6, train_gpt.BOS_ID, 7]])
        b = torch.tensor([[5, 9, train_gpt.BOS_ID, 7]])
        ea, eb = model.embed(a), model.embed(b)
    assert torch.equal(ea[0, 2], eb[0, 2])            # BOS: nothing smeared in
    assert not torch.allclose(ea[0, 1], eb[0, 1])     # the changed token itself differs
    assert torch.equal(ea[0, 0], eb[0, 0])


def test_xsa_output_is_orthogonal_to_its_own_value():
    hp = tiny_hp(**ALL_OFF)
    attn = train_gpt.CausalSelfAttention(hp, xsa=True)
    with torch.no_grad():
        for lin in (attn.c_q, attn.c_k, attn.c_v):
            lin.weight.normal_()
        attn.proj.weight.copy_(torch.eye(hp.model_dim))
    x = torch.randn(2, 8, hp.model_dim)
    y = attn(x).view(2, 8, hp.num_heads, -1)
    v = attn.c_v(x).view(2, 8, hp.num_kv_heads, -1).repeat_interleave(hp.num_heads // hp.num_kv_heads, dim=2)
    cos = (y * torch.nn.functional.normalize(v, dim=-1)).sum(-1)
    assert cos.abs().max() < 1e-5
    attn.xsa = False
    assert (attn(x).view(2, 8, hp.num_heads, -1) * torch.nn.functional.normalize(v, dim=-1)).sum(-1).abs().max() > 1e-2


def test_partial_rope_rotates_only_the_first_dims():
    rot = train_gpt.Rotary(head_dim=16, rope_dims=4, base=10000.0)
    x = torch.randn(1, 6, 2, 16)
    y = rot(x)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.allclose(y[:, 0], x[:, 0])           # position 0: no rotation
    assert not torch.allclose(y[:, 3, :, :4], x[:, 3, :, :4])
    assert torch.allclose(y[..., :4].norm(dim=-1), x[..., :4].norm(dim=-1), atol=1e-5)


def test_ln_scale_and_parallel_lanes_are_per_layer():
    hp = tiny_hp(**{**ALL_OFF, "LN_SCALE": "1", "PARALLEL_LAST_N": "1", "XSA_LAST_N": "1"})
    model = train_gpt.GPT(hp)
    assert [b.norm_scale for b in model.blocks] == [1.0, 1 / math.sqrt(2)]
    assert [b.parallel for b in model.blocks] == [False, True]
    assert [b.lanes for b in model.blocks] == [1, 1]
    assert [b.attn.xsa for b in model.blocks] == [False, True]
    two = train_gpt.GPT(tiny_hp(**{**ALL_OFF, "NUM_LAYERS": "4", "PARALLEL_LAST_N": "2", "PARALLEL_LANES": "2"}))
    assert [b.lanes for b in two.blocks] == [1, 1, 2, 2]
    assert not hasattr(two.blocks[1], "lane_post") and two.blocks[2].lane_post.shape == (2, 2)


def test_recurrence_layer_order_and_skips():
    hp = tiny_hp(**{**ALL_OFF, "NUM_LAYERS": "6", "RECUR_LAYERS": "2-3", "RECUR_PASSES": "3"})
    model = train_gpt.GPT(hp)
    assert model.layer_order() == [0, 1, 2, 3, 4, 5]
    model.recurrence_on = True
    assert model.layer_order() == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    # repeated passes reuse the same weights: no new block parameters; with SKIP_GATES=1 (the default) the 10
    # visiting positions take 5 skips instead of 3: two more (weight, gate) pairs of model_dim each
    plain = train_gpt.count_parameters(train_gpt.GPT(tiny_hp(**{**ALL_OFF, "NUM_LAYERS": "6"})))
    assert train_gpt.count_parameters(model) == plain + 2 * 2 * hp.model_dim
    additive = {**ALL_OFF, "NUM_LAYERS": "6", "SKIP_GATES": "0"}
    assert train_gpt.count_parameters(train_gpt.GPT(tiny_hp(**{**additive, "RECUR_LAYERS": "2-3"}))) == \
        train_gpt.count_parameters(train_gpt.GPT(tiny_hp(**additive)))


def test_flops_per_token_counts_recurrence():
    base = tiny_hp(**{**ALL_OFF, "NUM_LAYERS": "6"})
    recur = tiny_hp(**{**ALL_OFF, "NUM_LAYERS": "6", "RECUR_LAYERS": "2-3", "RECUR_PASSES": "3"})
    assert train_gpt.effective_layers(recur) == 10
    added = train_gpt.flops_per_token(recur, 16) - train_gpt.flops_per_token(base, 16)
    d, per_block = base.model_dim, (train_gpt.matmul_params(base) - base.vocab_size * base.model_dim) / 6
    assert added == pytest.approx(4 * (6 * per_block + 6 * 16 * d))


@pytest.mark.parametrize("gates", [{"ATTN_GATE": "1"}, {"ATTN_GATE": "1", "ATTN_GATE_DIMS": "12", "SMEAR_GATE": "1",
                                                           "SMEAR_GATE_DIMS": "12"}])
def test_matmul_params_match_the_model(gates):
    """matmul_params counts exactly the 2-D weights used in matmuls (not the BigramHash table, a lookup),
    but SmearGate's gate (12 weights; left out on purpose)."""
    hp = tiny_hp(**{**ALL_OFF, "BIGRAM_VOCAB": "32", **gates})
    model = train_gpt.GPT(hp)
    counted = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features > 1)
    assert train_gpt.matmul_params(hp) == counted + model.tok_emb.weight.numel()


# --- optimizer -------------------------------------------------------------------------------------

def muon_update(row_norm: bool, wd: float):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4))
    p.grad = torch.randn(8, 4) * torch.arange(1, 9)[:, None]     # rows of very different norms
    before = p.detach().clone()
    train_gpt.Muon([p], lr=0.1, momentum=0.9, backend_steps=5, row_norm=row_norm, weight_decay=wd).step()
    return before, p.detach().clone()


def test_muon_row_norm_changes_the_update():
    _, a = muon_update(False, 0.0)
    _, b = muon_update(True, 0.0)
    assert not torch.allclose(a, b, atol=1e-4)


def test_muon_weight_decay_is_decoupled():
    before, plain = muon_update(False, 0.0)
    _, decayed = muon_update(False, 0.5)
    update = before - plain                                   # lr * orthogonalised step
    assert torch.allclose(decayed, before * (1 - 0.1 * 0.5) - update, atol=1e-6)


def test_lr_floor_and_warmdown():
    hp = tiny_hp(WARMDOWN_FRAC="0.5", LR_FLOOR="0.1", LR_WARMUP_FRAC="0", WARMDOWN_SHAPE="lerp")
    assert train_gpt.lr_scale(0.25, hp) == 1.0
    assert train_gpt.lr_scale(0.75, hp) == pytest.approx(0.1 + 0.9 * 0.5)
    assert train_gpt.lr_scale(1.0, hp) == pytest.approx(0.1)
    clamp = hp.replace(warmdown_shape="clamp")      # the default (record #1855): 0.5 at 0.75, the floor from 0.95
    assert [train_gpt.lr_scale(p, clamp) for p in (0.75, 0.94, 0.96)] == pytest.approx([0.5, 0.12, 0.1])
    assert train_gpt.lr_scale(1.0, tiny_hp(WARMDOWN_FRAC="0.5", LR_FLOOR="0")) == 0.0


def test_presets():
    """frontier (the default: the April records' model and optimizer on CaseOps sp8192 data), sp8192 (the same on
    plain sp8192 data), stack1024 (the March stack on sp1024, the default before) and baseline (the official
    recipe); a preset only sets defaults."""
    frontier, _ = train_gpt.read_settings({})
    assert frontier.preset == "frontier" and frontier.vocab_size == 8192
    assert (frontier.data_path, frontier.tokenizer_path) == (
        "./data/datasets/fineweb10B_sp8192_caseops", "./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    plain, _ = train_gpt.read_settings({"PRESET": "sp8192"})
    assert (plain.data_path, plain.tokenizer_path) == ("./data/datasets/fineweb10B_sp8192",
                                                       "./data/tokenizers/fineweb_8192_bpe.model")
    assert {k: v for k, v in plain.values.items() if k not in ("PRESET", "DATA_PATH", "TOKENIZER_PATH")} == \
        {k: v for k, v in frontier.values.items() if k not in ("PRESET", "DATA_PATH", "TOKENIZER_PATH")}
    assert (frontier.num_layers, frontier.model_dim, frontier.mlp_mult, frontier.train_seq_len, frontier.bigram_vocab,
            frontier.recur_layers, frontier.recur_passes, frontier.recur_start_frac) == (11, 512, 4, 2048, 0, "3-5", 3, 0.35)
    assert (frontier.parallel_last_n, frontier.parallel_lanes, frontier.qk_gain_init) == (3, 2, 5.25)   # from layer 8
    assert (frontier.attn_gate, frontier.attn_gate_dims, frontier.smear_gate, frontier.smear_gate_dims) == (1, 12, 1, 12)
    assert (frontier.muon_momentum, frontier.muon_wd, frontier.embed_wd, frontier.matrix_lr, frontier.beta2,
            frontier.warmdown_frac, frontier.lr_floor, frontier.muon_ns_coeffs) == (0.97, 0.095, 0.085, 0.026, 0.99,
                                                                                   0.85, 0.1, "polar")
    assert (frontier.ttt_enabled, frontier.ttt_lr, frontier.ttt_lr_schedule, frontier.ttt_momentum,
            frontier.ttt_grad_clip, frontier.ttt_last_n) == (1, 0.005, "cosine", 0.9, 1.0, 0)
    stack, _ = train_gpt.read_settings({"PRESET": "stack1024"})
    assert (stack.vocab_size, stack.mlp_mult, stack.bigram_vocab, stack.recur_layers, stack.parallel_last_n,
            stack.attn_gate, stack.muon_ns_coeffs, stack.ttt_enabled, stack.qk_gain_init) == (
            1024, 3, 3072, "", 0, 0, "quintic", 0, 1.5)
    base, _ = train_gpt.read_settings({"PRESET": "baseline"})
    assert (base.num_layers, base.mlp_mult, base.mlp_act, base.bigram_vocab, base.recur_layers,
            base.ema_horizon_frac, base.matrix_lr, base.vocab_size) == (9, 2, "relu2", 0, "", 0.0, 0.04, 1024)
    mine, _ = train_gpt.read_settings({"PRESET": "baseline", "NUM_LAYERS": "4"})
    assert mine.num_layers == 4 and mine.mlp_mult == 2
    for name in train_gpt.PRESETS:
        assert train_gpt.read_settings({"PRESET": name})[0].preset == name     # every preset is valid as is


# --- scheduled switches and distributed equivalence, through the real training loop --------------

def make_shards(tmp_path, vocab=64, n=60_000, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab, n)
    tokens[::97] = train_gpt.BOS_ID
    harness.write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    return str(tmp_path)


class ListLog:
    def __init__(self):
        self.lines = []

    def __call__(self, line, console=True):
        self.lines.append(line)


def run_training(data_path: str, settings: dict, rank: int = 0, world_size: int = 1):
    """Train a tiny model with the real train() loop; returns (final state, log lines)."""
    env = {**ALL_OFF, "TRAIN_BATCH_TOKENS": "512", "ITERATIONS": "20", "MAX_WALLCLOCK_SECONDS": "0",
           "VAL_LOSS_EVERY": "0", "COMPILE_WARMUP_STEPS": "0", "TRAIN_LOG_EVERY": "1000", **settings}
    hp = tiny_hp(**env)
    rt = cpu_runtime(rank=rank, world_size=world_size, distributed=world_size > 1)
    model = train_gpt.build_model(hp, rt)
    stream = train_gpt.TokenStream([f"{data_path}/fineweb_train_000000.bin"], hp.vocab_size)
    accum = train_gpt.grad_accum_steps(hp, world_size)
    loader = train_gpt.DistributedTokenLoader(stream, hp.train_batch_tokens, hp.train_seq_len, world_size,
                                              accum, rank, rt.device)
    log = ListLog()
    train_gpt.train(hp, rt, model, model, loader, log, lambda step, ms: None)
    return {k: v.clone() for k, v in model.state_dict().items()}, log.lines


def test_recurrence_turns_on_at_its_step(tmp_path):
    _, lines = run_training(make_shards(tmp_path), {"RECUR_LAYERS": "1-1", "RECUR_START_FRAC": "0.5"})
    on = [l for l in lines if l.startswith("recurrence: on")]
    assert len(on) == 1 and on[0].startswith("recurrence: on from step 10 ")


def test_ema_is_what_training_leaves_in_the_model(tmp_path):
    """EMA on: the weights left for export differ from the live weights of the same run; an EMA whose
    horizon is vanishingly short equals no EMA exactly (so the switch is the only difference)."""
    data = make_shards(tmp_path)
    live, _ = run_training(data, {"EMA_HORIZON_FRAC": "0"})
    ema, lines = run_training(data, {"EMA_HORIZON_FRAC": "0.2"})
    instant, _ = run_training(data, {"EMA_HORIZON_FRAC": "1e-9"})
    assert any(l.startswith("ema: the exported weights are the EMA") for l in lines)
    assert all(torch.equal(live[k], instant[k]) for k in live)
    assert any(not torch.allclose(live[k], ema[k], atol=1e-6) for k in live)


def _train_rank(rank, world_size, data_path, settings):
    return run_training(data_path, settings, rank, world_size)[0]


@pytest.mark.slow
def test_two_gloo_ranks_train_like_one_process(tmp_path):
    """DDP's bucketed, overlapped gradient all-reduce plus Muon's split Newton-Schulz: 2 ranks end
    with the same weights as 1 process (same global batch), to float tolerance, with the stack on."""
    data = make_shards(tmp_path)
    settings = {"BIGRAM_VOCAB": "32", "SMEAR_GATE": "1", "XSA_LAST_N": "2", "LN_SCALE": "1",
                "GRAD_ACCUM_STEPS": "2", "ITERATIONS": "4", "EMA_HORIZON_FRAC": "0.3", "GRAD_CLIP_NORM": "0.3"}
    single, _ = run_training(data, {**settings, "GRAD_ACCUM_STEPS": "4"})
    ranks = run_distributed(_train_rank, 2, data, settings)
    for k in single:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert torch.allclose(single[k], ranks[0][k], atol=2e-5, rtol=1e-4), k


@pytest.mark.parametrize("name,value", [("ADAM_WD", "0.5"), ("MUON_WD", "0.5"), ("EMBED_WD", "0.5"),
                                        ("GRAD_CLIP_NORM", "0.01"), ("MUON_ROW_NORM", "1"), ("LR_FLOOR", "0.5"),
                                        ("MUON_NS_COEFFS", "polar"), ("BETA2", "0.5")])
def test_optimizer_switch_changes_the_trained_weights(tmp_path, name, value):
    """Through the real training loop: the same run with the switch on ends with other weights."""
    data = make_shards(tmp_path)
    base = {"ADAM_WD": "0", "MUON_WD": "0", "EMBED_WD": "0", "GRAD_CLIP_NORM": "0", "MUON_ROW_NORM": "0",
            "LR_FLOOR": "0", "MUON_NS_COEFFS": "quintic", "BETA2": "0.99", "ITERATIONS": "6", "WARMDOWN_FRAC": "0.5",
            "LATE_QAT_THRESHOLD": "0"}
    off, _ = run_training(data, base)
    on, _ = run_training(data, {**base, name: value})
    assert any(not torch.allclose(off[k], on[k], atol=1e-7) for k in off), name
