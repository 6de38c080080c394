"""The training details of record #1855 (issue 18), each a setting, each against a hand-written reference:
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
        assert sum(len(g["params"]) for o in optimizers for g in o.param_groups) == len(list(model.parameters()))


def test_clip_k_defaults_are_the_records():
    spec = train_gpt.QuantSpec.from_settings(train_gpt.read_settings({})[0])
    assert (spec.sigmas_of("mlp"), spec.sigmas_of("attn"), spec.sigmas_of("embed")) == (11.5, 13.0, 14.0)
