"""The training details of record #1855, each a setting, each against a hand-written reference:
the warmdown's shape, orthogonal initialisation, the gates' optimizer, the per-group clip k defaults.
(The gated U-Net skips over visiting positions are checked with the whole forward in test_frontier.py.)"""

import pytest
import torch

import train_gpt
from _helpers import cpu_runtime, tiny_hp


@pytest.mark.parametrize("progress,clamp,lerp", [
    (0.10, 1.0, 1.0),                              # before the warmdown (the last 85%)
    (0.50, 0.5 / 0.85, 0.1 + 0.9 * 0.5 / 0.85),
    (0.90, 0.1 / 0.85, 0.1 + 0.9 * 0.1 / 0.85),    # remaining 0.1176: still above the floor
    (0.95, 0.1, 0.1 + 0.9 * 0.05 / 0.85),          # remaining 0.0588: held at the floor
    (1.00, 0.1, 0.1),
])
def test_warmdown_shape(progress, clamp, lerp):
    hp = tiny_hp(WARMDOWN_FRAC=0.85, LR_FLOOR=0.1)
    assert hp.warmdown_shape == "clamp"            # record #1855's max((1 - f) / 0.85, 0.1)
    assert train_gpt.lr_scale(progress, hp) == pytest.approx(clamp, abs=1e-12)
    assert train_gpt.lr_scale(progress, hp.replace(warmdown_shape="lerp")) == pytest.approx(lerp, abs=1e-12)


def is_orthogonal(w: torch.Tensor) -> bool:
    """Orthonormal rows (a wide or square matrix) or orthonormal columns (a tall one)."""
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return torch.allclose(g, torch.eye(g.shape[0]), atol=1e-5)


def test_orthogonal_init_of_q_k_v_and_mlp_up():
    torch.manual_seed(0)
    model = train_gpt.GPT(tiny_hp())
    for b in model.blocks:
        for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.fc):
            assert is_orthogonal(lin.weight.detach())
        assert not b.attn.proj.weight.any() and not b.mlp.proj.weight.any()       # output projections still 0
    torch.manual_seed(0)
    default = train_gpt.GPT(tiny_hp(INIT_ORTHOGONAL=0))
    assert not any(is_orthogonal(lin.weight.detach()) for b in default.blocks for lin in (b.attn.c_q, b.mlp.fc))


def optimizer_of(optimizers, p) -> str:
    found = [type(o).__name__ for o in optimizers for g in o.param_groups for q in g["params"] if q is p]
    assert len(found) == 1, found
    return found[0]


def test_gates_train_with_adamw_not_muon():
    for flag, expected in ((1, "AdamW"), (0, "Muon")):
        model = train_gpt.GPT(tiny_hp(GATES_IN_ADAM=flag))
        optimizers = train_gpt.build_optimizers(model, model_hp := tiny_hp(GATES_IN_ADAM=flag), cpu_runtime())
        gates = [b.attn.gate.weight for b in model.blocks] + [model.smear_gate.weight]
        assert len(train_gpt.gate_weights(model)) == len(gates) == model_hp.num_layers + 1
        assert all(optimizer_of(optimizers, g) == expected for g in gates)
        assert optimizer_of(optimizers, model.blocks[0].attn.c_q.weight) == "Muon"    # the weights stay in Muon
        held = sum(len(g["params"]) for o in optimizers for g in o.param_groups)
        assert held == len(list(model.parameters())) - len(model.softcaps()) == len(list(model.parameters())) - 2


def test_clip_k_defaults_are_the_records():
    spec = train_gpt.QuantSpec.from_settings(train_gpt.read_settings({})[0])
    assert (spec.sigmas_of("mlp"), spec.sigmas_of("attn"), spec.sigmas_of("embed")) == (11.5, 13.0, 14.0)


def asym4_by_hand(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Record #1855's LQER factor storage written as loops: A (m x r) int2 in [-2, 1] on one scale max|A| / 1.5;
    B (r x n) int4 in [-8, 7], one scale max|g| / 7.5 per 64 consecutive values of a row. Returns the
    dequantized (A, B), the scales rounded to fp16 as stored."""
    sa = float(torch.tensor(float(a.abs().max()) / 1.5).half())
    qa = torch.tensor([[min(1.0, max(-2.0, round(float(a[i, j]) / sa))) for j in range(a.shape[1])]
                       for i in range(a.shape[0])])
    out_b = torch.zeros_like(b)
    for row in range(b.shape[0]):
        for g0 in range(0, b.shape[1], 64):
            g = b[row, g0:g0 + 64]
            sb = float(torch.tensor(float(g.abs().max()) / 7.5).half())
            out_b[row, g0:g0 + 64] = torch.tensor([min(7.0, max(-8.0, round(float(v) / sb))) * sb for v in g])
    return qa * sa, out_b


def test_lqer_asym4_factors_against_a_hand_written_quantizer():
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    deq = train_gpt.dequantize_rows(*train_gpt.quantize_rows(w, 5, 3.0))
    parts, drop = train_gpt.lqer_candidate(w, deq, None, rank=4)           # asym4 is the default
    assert parts["lqer_b_scale"].shape == (4, 2) and parts["lqer_a_scale"].shape == (1,)
    u, s, vh = torch.linalg.svd((w - deq).double(), full_matrices=False)
    a, b = asym4_by_hand((u[:, :4] * s[:4]).float(), vh[:4].float())
    torch.testing.assert_close(train_gpt.lqer_correction(parts), a @ b, rtol=1e-5, atol=1e-6)
    corrected = deq + a @ b
    eye = torch.eye(128)
    before, after = (train_gpt.hessian_error(w, x, eye).sum().item() for x in (deq, corrected))
    assert drop == pytest.approx(before - after, rel=1e-5) and after < before
    # stored in the artifact and loaded back: the corrected weight
    q, scale = train_gpt.quantize_rows(w, 5, 3.0)
    entry = dict(name="m.weight", scheme="int5_row", shape=[96, 128],
                 parts=train_gpt.to_numpy_parts(dict(q=q, scale=scale, **parts)))
    blob = train_gpt.pack_artifact([entry], 6, {})
    torch.testing.assert_close(train_gpt.unpack_artifact(blob, "t")[0]["m.weight"], corrected, rtol=1e-5, atol=1e-5)
    # row6 stays available and is told apart on load by its 1-D lqer_b_scale
    row6, _ = train_gpt.lqer_candidate(w, deq, None, rank=4, factors="row6")
    assert row6["lqer_b_scale"].ndim == 1 and row6["lqer_a"].abs().max() > 1
