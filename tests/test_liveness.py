"""Every setting the frontier stack brought (the April records' pieces) changes what a run computes: a setting
that does nothing is a defect. Training settings: a few steps of the real train() from the same initialisation
and the same batches end in different weights when one setting moves. TTT settings: the real TestTimeTrainer on
the same scored chunks ends in different weights. And TTT with TTT_LAST_N=0 trains every block."""

import pytest
import torch

import train_gpt
from _helpers import cpu_runtime, random_gpt, tiny_hp

# the frontier pieces on, at a tiny shape: layer 0 recurrent, layer 1 two-lane, gates, no BigramHash;
# late QAT from an LR scale of 0.5 so it switches on inside 10 steps
BASE = dict(NUM_LAYERS=2, BIGRAM_VOCAB=0, ITERATIONS=10, MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=0,
            TRAIN_LOG_EVERY=1000, LATE_QAT_THRESHOLD=0.5, EMA_HORIZON_FRAC=0.2, COMPILE=0)

TRAINING_SETTINGS = [
    ("RECUR_LAYERS", ""), ("RECUR_PASSES", "2"), ("RECUR_START_FRAC", "0.7"),
    ("PARALLEL_LAST_N", "0"), ("PARALLEL_LANES", "1"),
    ("ATTN_GATE", "0"), ("ATTN_GATE_DIMS", "0"), ("SMEAR_GATE_DIMS", "0"), ("QK_GAIN_INIT", "1.5"),
    ("MLP_MULT", "3"),
    ("MUON_NS_COEFFS", "quintic"), ("MUON_MOMENTUM", "0.9"), ("MUON_MOMENTUM_WARMUP_FRAC", "0.8"),
    ("MUON_WD", "0"), ("EMBED_WD", "0"), ("ADAM_WD", "0"), ("MATRIX_LR", "0.05"), ("SCALAR_LR", "0.05"),
    ("TIED_EMBED_LR", "0.05"), ("BETA2", "0.95"), ("WARMDOWN_FRAC", "0.3"), ("LR_FLOOR", "0.3"),
    ("EMA_HORIZON_FRAC", "0"), ("LATE_QAT_THRESHOLD", "0"),
    ("SKIP_GATES", "0"), ("INIT_ORTHOGONAL", "0"), ("GATES_IN_ADAM", "0"), ("WARMDOWN_SHAPE", "lerp"),
]


class FixedBatches:
    """The loader train() expects: the same pseudo-random batch for a given step, whatever the settings."""

    def __init__(self, hp):
        self.hp, self.grad_accum, self.local_tokens = hp, 1, 4 * hp.train_seq_len

    def batch(self, step, micro):
        t = torch.randint(0, self.hp.vocab_size, (self.local_tokens + 1,), generator=torch.Generator().manual_seed(step))
        x, y = t[:-1].view(-1, self.hp.train_seq_len), t[1:].view(-1, self.hp.train_seq_len)
        return x, y, train_gpt.capacity_of(x)


def trained_weights(**overrides) -> dict[str, torch.Tensor]:
    hp = tiny_hp(**{**BASE, **overrides})
    torch.manual_seed(0)
    model = train_gpt.GPT(hp)                     # the real initialisation, seeded
    train_gpt.train(hp, cpu_runtime(), model, model, FixedBatches(hp), lambda *a, **k: None, lambda *a: None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def default_weights():
    return trained_weights()


@pytest.mark.parametrize("name,value", TRAINING_SETTINGS)
def test_every_training_setting_changes_the_trained_weights(default_weights, name, value):
    assert str(tiny_hp(**BASE).values[name]) != value, f"{name}={value} is the default: the test would compare a run with itself"
    moved = trained_weights(**{name: value})
    shared = [k for k in default_weights if k in moved and default_weights[k].shape == moved[k].shape]
    assert not shared or any(not torch.equal(default_weights[k], moved[k]) for k in shared) or \
        set(moved) != set(default_weights), f"{name}={value} left every weight as it was"


def test_the_check_itself_sees_a_setting_that_does_nothing():
    """A setting train() never reads (TTT_LR, an evaluation setting) leaves the trained weights bit for bit:
    the comparison above is not vacuous."""
    a, b = trained_weights(), trained_weights(TTT_LR=0.5)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# --- TTT -----------------------------------------------------------------------------------------------

TTT_BASE = dict(NUM_LAYERS=2, BIGRAM_VOCAB=0, TTT_ENABLED=1, TTT_CHUNK_TOKENS=64, TTT_EPOCHS=2,
                TTT_LR=0.05, TTT_GRAD_CLIP=0.05)   # a clip small enough to bind, so the clip setting is seen
TTT_SETTINGS = [("TTT_LR_SCHEDULE", "constant"), ("TTT_GRAD_CLIP", "0"), ("TTT_MOMENTUM", "0"),
                ("TTT_LAST_N", "1"), ("TTT_LR", "0.01"), ("TTT_EPOCHS", "1")]


def ttt_weights(**overrides):
    hp = tiny_hp(**{**TTT_BASE, **overrides})
    model = random_gpt(hp, seed=4)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    ttt = train_gpt.TestTimeTrainer(hp, cpu_runtime(), model, model, hp.train_seq_len)
    tokens = torch.randint(0, hp.vocab_size, (6 * 64 + 1,), generator=torch.Generator().manual_seed(5))
    for k in range(3):                    # chunks 0, 1, 2 of 6: trained on after being scored
        ttt.adapt(tokens, train_gpt.bos_prefix(tokens.numpy()), 64 * k, k, 6, None)
    return before, {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("name,value", TTT_SETTINGS)
def test_every_ttt_setting_changes_the_adapted_weights(name, value):
    _, default = ttt_weights()
    _, moved = ttt_weights(**{name: value})
    assert any(not torch.equal(default[k], moved[k]) for k in default), f"{name}={value} changed nothing"


def test_ttt_trains_every_block_by_default():
    """TTT_LAST_N=0 (the default): every parameter of every block, the embedding and the gates move."""
    hp, _ = train_gpt.read_settings({})
    assert hp.ttt_last_n == 0
    before, after = ttt_weights(TTT_LAST_N=0)
    still = [k for k in before if torch.equal(before[k], after[k])]
    assert not still, f"TTT left these parameters untouched: {still}"
    before, after = ttt_weights(TTT_LAST_N=1)                      # and TTT_LAST_N=1 leaves block 0 alone
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.0."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("blocks.1."))
