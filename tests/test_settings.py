"""Settings stage: read_settings / validate_settings / grad_accum_steps against the documented contract."""

import re
from pathlib import Path

import pytest

import train_gpt
from train_gpt import PipelineError, read_settings

README = Path(__file__).resolve().parents[1] / "README.md"
SETTINGS_DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"


def test_defaults_resolve():
    hp, warnings = read_settings({})
    assert warnings == []
    assert set(hp.as_dict()) == set(train_gpt.SETTINGS)
    for name, row in train_gpt.SETTINGS.items():
        value = getattr(hp, name.lower())
        assert value == row.default and type(value) is row.type, name
        assert row.meaning.strip(), f"{name} has no description"
        assert row.error(name, row.default) is None, f"{name}'s default breaks its own rule"


def test_values_are_parsed_to_their_types():
    hp, _ = read_settings({"MODEL_DIM": "256", "MATRIX_LR": "0.02", "RUN_ID": "x1", "MAX_WALLCLOCK_SECONDS": "30"})
    assert (hp.model_dim, hp.matrix_lr, hp.run_id, hp.max_wallclock_seconds) == (256, 0.02, "x1", 30.0)
    assert type(hp.max_wallclock_seconds) is float


def test_explicit_variable_wins_over_preset(monkeypatch):
    monkeypatch.setitem(train_gpt.PRESETS, "wide", {"MODEL_DIM": 768, "NUM_LAYERS": 13})
    hp, _ = read_settings({"PRESET": "wide"})
    assert (hp.model_dim, hp.num_layers, hp.preset) == (768, 13, "wide")
    hp, _ = read_settings({"PRESET": "wide", "MODEL_DIM": "256"})
    assert (hp.model_dim, hp.num_layers) == (256, 13)
    hp, _ = read_settings({"MODEL_DIM": "256"})  # the preset does not leak into the default one
    assert (hp.model_dim, hp.num_layers) == (256, 11)


@pytest.mark.parametrize("name,raw", [
    ("MODEL_DIM", "abc"), ("MODEL_DIM", "512.0"), ("MODEL_DIM", ""), ("ITERATIONS", "1e3"),
    ("MAX_WALLCLOCK_SECONDS", "nan"), ("MAX_WALLCLOCK_SECONDS", "inf"), ("MATRIX_LR", "-inf"), ("MATRIX_LR", "fast"),
])
def test_malformed_value_names_the_variable(name, raw):
    with pytest.raises(PipelineError) as err:
        read_settings({name: raw})
    assert name in str(err.value) and repr(raw) in str(err.value)


def test_unknown_preset():
    with pytest.raises(PipelineError) as err:
        read_settings({"PRESET": "turbo"})
    assert "turbo" in str(err.value) and "baseline" in str(err.value)


@pytest.mark.parametrize("old", sorted(train_gpt.REPLACED_SETTINGS))
def test_replaced_names_error(old):
    with pytest.raises(PipelineError) as err:
        read_settings({old: "100"})
    assert old in str(err.value)
    replacement = re.findall(r"[A-Z][A-Z_]+[A-Z]", train_gpt.REPLACED_SETTINGS[old])
    assert replacement and all(r in train_gpt.SETTINGS for r in replacement)
    assert replacement[0] in str(err.value)


@pytest.mark.parametrize("typo,intended", [
    ("MODEL_DIMM", "MODEL_DIM"), ("NUM_LAYER", "NUM_LAYERS"), ("ITERATION", "ITERATIONS"),
    ("TRAIN_SEQLEN", "TRAIN_SEQ_LEN"), ("NUM_KV_HEAD", "NUM_KV_HEADS"), ("WARMDOWN_FRACT", "WARMDOWN_FRAC"),
])
def test_misspelt_setting_warns_with_the_intended_name(typo, intended):
    hp, warnings = read_settings({typo: "3"})
    assert len(warnings) == 1
    assert typo in warnings[0] and intended in warnings[0]
    assert getattr(hp, intended.lower()) == train_gpt.SETTINGS[intended].default  # ignored, not applied


@pytest.mark.parametrize("name", ["SEEDS", "PATH", "HOME", "NPROC", "USER", "SHELL", "LANG", "PWD", "TERM",
                                  "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "PYTHONPATH", "MASTER_PORT",
                                  "MASTER_ADDR", "LOCAL_RANK", "WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID",
                                  "NCCL_DEBUG", "HOSTNAME", "RECORD_DIR", "data_path"])
def test_unrelated_variables_do_not_warn(name):
    assert read_settings({name: "1"})[1] == []


@pytest.mark.parametrize("env,names", [
    ({"MODEL_DIM": "100", "NUM_HEADS": "8"}, ["MODEL_DIM", "NUM_HEADS"]),
    ({"MODEL_DIM": "24", "NUM_HEADS": "8"}, ["MODEL_DIM", "NUM_HEADS"]),          # head dim 3 is odd (RoPE)
    ({"NUM_HEADS": "8", "NUM_KV_HEADS": "3"}, ["NUM_HEADS", "NUM_KV_HEADS"]),
    ({"NUM_LAYERS": "0"}, ["NUM_LAYERS"]),
    ({"TRAIN_BATCH_TOKENS": "-8"}, ["TRAIN_BATCH_TOKENS"]),
    ({"VAL_MAX_TOKENS": "-1"}, ["VAL_MAX_TOKENS"]),
    ({"MAX_WALLCLOCK_SECONDS": "-1"}, ["MAX_WALLCLOCK_SECONDS"]),
    ({"WARMDOWN_FRAC": "1.5"}, ["WARMDOWN_FRAC"]),
    ({"LR_WARMUP_FRAC": "0.6", "WARMDOWN_FRAC": "0.6"}, ["LR_WARMUP_FRAC", "WARMDOWN_FRAC"]),
    ({"VOCAB_SIZE": "70000"}, ["VOCAB_SIZE"]),
    ({"COMPILE": "2"}, ["COMPILE"]),
    ({"COMPUTE_DTYPE": "fp16"}, ["COMPUTE_DTYPE"]),
    ({"LZMA_PRESET": "10"}, ["LZMA_PRESET"]),
    ({"EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "256"}, ["EVAL_STRIDE"]),
    ({"EVAL_SEQ_LEN": "0", "TRAIN_SEQ_LEN": "64", "EVAL_STRIDE": "65"}, ["EVAL_STRIDE"]),   # window 0 = TRAIN_SEQ_LEN
    ({"EVAL_SEQ_LEN": "32"}, ["EVAL_STRIDE"]),                             # the default stride 64 > window 32
    ({"EVAL_STRIDE": "-1"}, ["EVAL_STRIDE"]),
    ({"EVAL_AUDIT": "2"}, ["EVAL_AUDIT"]),
    ({"TTT_ENABLED": "-1"}, ["TTT_ENABLED"]),
    ({"TTT_ENABLED": "1", "TTT_LAST_N": "12"}, ["TTT_LAST_N", "NUM_LAYERS"]),
    ({"MLP_ACT": "gelu"}, ["MLP_ACT"]),
    ({"ROPE_DIMS": "7"}, ["ROPE_DIMS"]),
    ({"ROPE_DIMS": "128"}, ["ROPE_DIMS"]),                                  # more than the head dim 64
    ({"BIGRAM_VOCAB": "1"}, ["BIGRAM_VOCAB"]),
    ({"SMEAR_GATE": "2"}, ["SMEAR_GATE"]),
    ({"RECUR_LAYERS": "three"}, ["RECUR_LAYERS"]),
    ({"NUM_LAYERS": "4", "RECUR_LAYERS": "3-5"}, ["RECUR_LAYERS", "NUM_LAYERS"]),   # 3-5 needs 6 layers
    ({"RECUR_LAYERS": "2-1"}, ["RECUR_LAYERS"]),
    ({"RECUR_LAYERS": "3-5", "RECUR_PASSES": "1"}, ["RECUR_PASSES"]),
    ({"RECUR_START_FRAC": "1.5"}, ["RECUR_START_FRAC"]),
    ({"LR_FLOOR": "2"}, ["LR_FLOOR"]),
    ({"MUON_WD": "-0.1"}, ["MUON_WD"]),
    ({"QUANT_MATRIX_BITS": "4"}, ["QUANT_MATRIX_BITS"]),
    ({"TTT_CHUNK_TOKENS": "0"}, ["TTT_CHUNK_TOKENS"]),
    ({"TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "1023"}, ["TTT_CHUNK_TOKENS"]),   # < the window: would never train
    ({"TTT_EPOCHS": "0"}, ["TTT_EPOCHS"]),
    ({"TTT_LAST_N": "-1"}, ["TTT_LAST_N"]),
    ({"TTT_LR_SCHEDULE": "linear"}, ["TTT_LR_SCHEDULE"]),
    ({"TTT_GRAD_CLIP": "-1"}, ["TTT_GRAD_CLIP"]),
    ({"MUON_NS_COEFFS": "cubic"}, ["MUON_NS_COEFFS"]),
    ({"PARALLEL_LANES": "3"}, ["PARALLEL_LANES"]),
    ({"PARALLEL_LAST_N": "7"}, ["PARALLEL_LAST_N", "encoder half"]),          # two lanes would starve the skips
    ({"TERNARY_PATTERNS": ".mlp.", "LATE_QAT_THRESHOLD": "0"}, ["TERNARY_PATTERNS", "never trained"]),
    ({"RECUR_LAYERS": "8-9"}, ["RECUR_LAYERS", "PARALLEL_LAST_N"]),        # into the two-lane blocks 8-10
    ({"ATTN_GATE_DIMS": "513"}, ["ATTN_GATE_DIMS", "MODEL_DIM"]),
    ({"SMEAR_GATE_DIMS": "-1"}, ["SMEAR_GATE_DIMS"]),
    ({"QUANT_EMBED_BITS": "9"}, ["QUANT_EMBED_BITS"]),
    ({"QUANT_CLIP_SIGMAS_MLP": "0"}, ["QUANT_CLIP_SIGMAS_MLP"]),
    ({"LQER_TENSORS": "-1"}, ["LQER_TENSORS"]),
    ({"LQER_RANK": "0"}, ["LQER_RANK"]),
    ({"ARTIFACT_BUDGET_BYTES": "16000001"}, ["ARTIFACT_BUDGET_BYTES", "16000000"]),   # above the challenge's cap
    ({"TTT_LR": "-0.1"}, ["TTT_LR"]),
    ({"TTT_MOMENTUM": "-1"}, ["TTT_MOMENTUM"]),
    ({"EVAL_TIME_LIMIT_SECONDS": "-1"}, ["EVAL_TIME_LIMIT_SECONDS"]),
    ({"EVAL_TIME_LIMIT_SECONDS": "nan"}, ["EVAL_TIME_LIMIT_SECONDS"]),
    ({"RUN_ID": "../escape"}, ["RUN_ID"]),
    ({"RUN_ID": ".hidden"}, ["RUN_ID"]),
])
def test_validation_errors_name_the_variables(env, names):
    with pytest.raises(PipelineError) as err:
        read_settings(env)
    for name in names:
        assert name in str(err.value)


def test_boundary_values_are_accepted():
    hp, _ = read_settings({"VOCAB_SIZE": "65536", "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "128",
                           "LR_WARMUP_FRAC": "0.5", "WARMDOWN_FRAC": "0.5", "MAX_WALLCLOCK_SECONDS": "0",
                           "LZMA_PRESET": "0", "COMPILE": "0", "COMPUTE_DTYPE": "bf16"})
    assert hp.vocab_size == 65536 and hp.eval_stride == 128
    hp, _ = read_settings({"TRAIN_SEQ_LEN": "64", "EVAL_STRIDE": "64", "TTT_ENABLED": "1", "NUM_LAYERS": "2", "RECUR_LAYERS": "", "PARALLEL_LAST_N": "1",
                           "TTT_LAST_N": "2", "TTT_LR": "0", "TTT_MOMENTUM": "0", "EVAL_TIME_LIMIT_SECONDS": "0",
                           "EVAL_AUDIT": "1"})
    assert (hp.eval_stride, hp.ttt_last_n, hp.ttt_lr, hp.eval_time_limit_seconds) == (64, 2, 0.0, 0.0)
    hp, _ = read_settings({"TRAIN_SEQ_LEN": "32", "EVAL_SEQ_LEN": "0", "EVAL_STRIDE": "0"})   # 0 = plain evaluation
    assert train_gpt.eval_geometry(hp) == (32, 32)
    hp, _ = read_settings({"TRAIN_SEQ_LEN": "32", "EVAL_SEQ_LEN": "128"})            # stride 64 <= window 128
    assert train_gpt.eval_geometry(hp) == (128, 64)
    hp, _ = read_settings({"NUM_LAYERS": "1", "RECUR_LAYERS": "", "PARALLEL_LAST_N": "0"})   # TTT_LAST_N=0: every parameter
    assert hp.num_layers == 1 and hp.ttt_last_n == 0
    hp, _ = read_settings({"ARTIFACT_BUDGET_BYTES": "16000000"})   # the challenge's cap itself
    assert hp.artifact_budget_bytes == 16_000_000
    hp, _ = read_settings({"TTT_ENABLED": "1", "TTT_CHUNK_TOKENS": "2560"})   # one window (2,560) per chunk: allowed
    assert hp.ttt_chunk_tokens == 2560
    hp, _ = read_settings({"TTT_CHUNK_TOKENS": "10", "TTT_ENABLED": "0"})   # short chunks are fine while TTT is off
    assert hp.ttt_chunk_tokens == 10


def test_explicit_names_are_recorded(monkeypatch):
    monkeypatch.setitem(train_gpt.PRESETS, "wide", {"MODEL_DIM": 768})
    hp, _ = read_settings({"PRESET": "wide", "NUM_LAYERS": "9", "SEEDS": "1,2", "NUM_LAYER": "3"})
    assert hp.explicit == {"PRESET", "NUM_LAYERS"}          # not preset values, defaults, or non-settings
    assert hp.replace(MODEL_DIM=64).explicit == hp.explicit and hp.replace(MODEL_DIM=64).model_dim == 64
    assert hp.model_dim == 768                              # replace returns a copy


def test_nll_dump_path_checks(tmp_path):
    existing = tmp_path / "old.npz"
    existing.write_bytes(b"keep me")
    with pytest.raises(PipelineError) as err:
        read_settings({"NLL_DUMP": str(existing)})
    assert "NLL_DUMP" in str(err.value) and str(existing) in str(err.value)
    with pytest.raises(PipelineError) as err:
        read_settings({"NLL_DUMP": str(tmp_path / "no_such_dir" / "dump.npz")})
    assert "NLL_DUMP" in str(err.value)
    assert existing.read_bytes() == b"keep me"
    hp, _ = read_settings({"NLL_DUMP": str(tmp_path / "new.npz")})
    assert hp.nll_dump == str(tmp_path / "new.npz")


def test_eval_only_path_must_be_a_file(tmp_path):
    for path in (tmp_path / "missing.pgolf.xz", tmp_path):
        with pytest.raises(PipelineError) as err:
            read_settings({"EVAL_ONLY": str(path)})
        assert "EVAL_ONLY" in str(err.value) and str(path) in str(err.value)


# settings that keep a 1-layer, head-dim-8 model valid (no recurrence, RoPE on 4 dims); explicit in
# EVAL_ONLY environments below too, equal to the artifact's, so they never conflict with it
ARTIFACT_VALID = {"RECUR_LAYERS": "", "ROPE_DIMS": "4", "PARALLEL_LAST_N": "0"}


@pytest.fixture
def saved_artifact(tmp_path):
    """An artifact of a 1-layer, width-32 GPT (vocab 64), written as export_artifact would."""
    hp, _ = read_settings({**ARTIFACT_VALID, "NUM_LAYERS": "1", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                           "VOCAB_SIZE": "64", "MLP_MULT": "3", "ROPE_BASE": "500", "LOGIT_SOFTCAP": "15"})
    model = train_gpt.GPT(hp)
    blob = train_gpt.pack_artifact(train_gpt.quantize_state_dict(model.state_dict(), train_gpt.QuantSpec.from_settings(hp)), 6,
                                   {name: hp.values[name] for name in train_gpt.ARCH_SETTINGS})
    path = tmp_path / "saved.pgolf.xz"
    path.write_bytes(blob)
    return str(path), hp


def test_eval_only_takes_the_model_shape_from_the_artifact(saved_artifact):
    path, trained = saved_artifact
    hp, _ = read_settings({**ARTIFACT_VALID, "EVAL_ONLY": path, "TRAIN_SEQ_LEN": "32", "EVAL_STRIDE": "16", "MODEL_DIM": "32"})
    got = train_gpt.settings_for_artifact(hp, path)
    for name in train_gpt.ARCH_SETTINGS:
        assert got.values[name] == trained.values[name] and type(got.values[name]) is type(trained.values[name]), name
    assert (got.num_layers, got.mlp_mult, got.rope_base, got.logit_softcap) == (1, 3, 500.0, 15.0)
    assert (got.train_seq_len, got.eval_stride, got.eval_only) == (32, 16, path)   # the rest is the caller's
    train_gpt.GPT(got).load_state_dict(train_gpt.read_artifact(path)[1], strict=True)


@pytest.mark.parametrize("env,names", [
    ({"NUM_LAYERS": "2"}, ["NUM_LAYERS"]),
    ({"MODEL_DIM": "64"}, ["MODEL_DIM"]),
    ({"VOCAB_SIZE": "1024"}, ["VOCAB_SIZE"]),
    ({"LOGIT_SOFTCAP": "30"}, ["LOGIT_SOFTCAP"]),
    ({"TTT_LAST_N": "2"}, ["TTT_LAST_N", "NUM_LAYERS"]),   # TTT_LAST_N=2 > the artifact's 1 layer
])
def test_eval_only_conflicts_name_the_setting(saved_artifact, env, names):
    path, _ = saved_artifact
    hp, _ = read_settings({**ARTIFACT_VALID, "EVAL_ONLY": path, **env})
    with pytest.raises(PipelineError) as err:
        train_gpt.settings_for_artifact(hp, path)
    for name in names:
        assert name in str(err.value)
    if names == ["NUM_LAYERS"]:
        assert path in str(err.value) and "NUM_LAYERS=1" in str(err.value)


def test_eval_only_rejects_a_file_that_is_not_an_artifact(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an artifact")
    hp, _ = read_settings({"EVAL_ONLY": str(path)})
    with pytest.raises(PipelineError) as err:
        train_gpt.settings_for_artifact(hp, str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("world,expected", [(1, 8), (2, 4), (4, 2), (8, 1), (16, 1)])
def test_grad_accum_default_keeps_the_global_batch(world, expected):
    hp, _ = read_settings({"TRAIN_BATCH_TOKENS": str(16 * 1024), "TRAIN_SEQ_LEN": "128"})
    assert train_gpt.grad_accum_steps(hp, world) == expected


def test_grad_accum_explicit_and_errors():
    hp, _ = read_settings({"TRAIN_BATCH_TOKENS": "4096", "TRAIN_SEQ_LEN": "64", "GRAD_ACCUM_STEPS": "2"})
    assert train_gpt.grad_accum_steps(hp, 4) == 2
    hp, _ = read_settings({"TRAIN_BATCH_TOKENS": "4096", "TRAIN_SEQ_LEN": "1000"})
    with pytest.raises(PipelineError) as err:
        train_gpt.grad_accum_steps(hp, 1)
    for name in ("TRAIN_BATCH_TOKENS", "GRAD_ACCUM_STEPS", "TRAIN_SEQ_LEN"):
        assert name in str(err.value)


def test_the_settings_table_is_generated_from_the_declarations():
    """docs/settings.md's table is settings_table() of the declarations, every setting one row in declaration
    order; a declaration changed without regenerating the table (python3 tools/harness.py settings-table --write
    docs/settings.md) fails here."""
    from tools import harness
    text = SETTINGS_DOC.read_text(encoding="utf-8")
    assert harness.readme_with_settings(text) == text, "stale: python3 tools/harness.py settings-table --write docs/settings.md"


def test_a_changed_declaration_makes_the_settings_table_stale(monkeypatch):
    from tools import harness
    text = SETTINGS_DOC.read_text(encoding="utf-8")
    row = train_gpt.SETTINGS["MODEL_DIM"]
    monkeypatch.setitem(train_gpt.SETTINGS, "MODEL_DIM", __import__("dataclasses").replace(row, meaning="residual width (changed)"))
    assert harness.readme_with_settings(text) != text


def test_the_readme_is_a_short_guide_with_the_two_commands_first():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    head = "\n".join(lines[:40])
    assert "pip install -r requirements.txt && bash run_8xh100.sh" in head and "bash .ci/run" in head
    assert "../shared" not in "\n".join(lines) and not re.search(r"(?i)\bissue \d", "\n".join(lines))


def test_each_declared_rule_is_kept():
    """Every setting with a declared range or choices refuses a value just outside it, naming the variable
    and saying the rule; the checks come from the declarations alone."""
    checked = 0
    for name, row in train_gpt.SETTINGS.items():
        outside = []
        if row.choices is not None:
            outside.append("nope" if row.type is str else max(row.choices) + 1)
        if row.at_least is not None:
            outside.append(row.at_least - (1 if row.type is int else 0.5))
        if row.at_most is not None:
            outside.append(row.at_most + 1)
        if row.above is not None:
            outside.append(row.above)
        for value in outside:
            with pytest.raises(PipelineError) as err:
                read_settings({name: str(value)})
            assert f"{name}=" in str(err.value) and row.rule() in str(err.value), (name, value, str(err.value))
            checked += 1
        inside = list(row.choices or ()) + [v for v in (row.at_least, row.at_most) if v is not None]
        for value in inside:                                 # the bounds themselves and every choice keep the rule
            assert row.error(name, row.type(value)) is None, (name, value)
    assert checked > 60


def test_a_rule_says_itself_in_words():
    Setting = train_gpt.Setting
    cases = [(Setting(1.0, "m", above=0.5, type=float), 0.4, "must be > 0.5"),
             (Setting(1, "m", at_most=5, type=int), 6, "must be <= 5"),
             (Setting("a", "m", choices=("a",)), "b", "must be a"),
             (Setting(1, "m", at_least=2, at_most=4, type=int), 5, "must be in 2..4"),
             (Setting(1, "m", at_least=-1, type=int), -2, "must be >= -1")]
    for row, value, words in cases:
        assert row.error("X", value).endswith(words), (row, row.error("X", value))


def test_every_setting_is_a_declared_field():
    """hp.<name> is a dataclass field an editor can find, one per setting, and nothing else is a setting."""
    fields = {f.name for f in __import__("dataclasses").fields(train_gpt.Hyperparameters)}
    assert fields - {"explicit"} == {name.lower() for name in train_gpt.SETTINGS}


# The levers of the best legal runs after record #1855 (docs/levers.md), each default with the run it follows.
LEVER_DEFAULTS = {
    "DATA_PATH": "./data/datasets/fineweb10B_sp8192_caseops",   # CaseOps: #1729, #1855 and every later record
    "TTT_LORA_ALPHA": 144.0,          # #1767's output scale, as #1855 ran it
    "TTT_LORA_KEEP_A": 1,             # #1767's A kept across documents
    "TTT_LORA_TARGETS": "k,o,mlp,head",   # #2019: no Q/V LoRA
    "TTT_LORA_LR": 8e-5,              # #1925, seed-matched (#2019: #1855's 1e-4 x 0.75)
    "TTT_LORA_BETA2": 0.99,           # #1855's log
    "TTT_LORA_WEIGHT_DECAY": 0.5,     # #1855's log
    "EVAL_SEQ_LEN": 2560,             # #1953 / #2019
    "QK_GAIN_INIT": 5.25,             # #2019
    "TTT_PHASES": 1,                  # #1925, seed-matched
    "TTT_PHASE_DOCS_FRAC": 0.07,      # #1925: 3,500 of 50,000 documents
    "AWQ_GROUPS": 1, "AWQ_BITS": 8, "AWQ_GROUP_SIZE": 64,   # #1908 as #1946 and #2019 ran it
    "LOGIT_SOFTCAP_ASYM": 1,          # #1923, as #2019 ran it
    "GPTQ_CALIBRATION": "train", "GPTQ_CALIB_SEQS": 768, "GPTQ_CALIB_LEN": 2048,   # #1855: 16 batches of 48 x 2048
    "GPTQ_RESERVE_SECONDS": 4.0,      # #1855's code default
    "MATRIX_LR": 0.026, "LQER_RANK": 4, "LQER_TENSORS": 3,   # #1855's (no run isolates a change: docs/quantization.md)
    "VAL_LOSS_EVERY": 0,              # #1855: no periodic validation in the timed run
}


def test_the_defaults_are_the_documented_levers():
    hp, _ = read_settings({})
    for name, value in LEVER_DEFAULTS.items():
        assert hp.values[name] == value, (name, hp.values[name], value)
