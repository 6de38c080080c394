"""`tools/harness.py submit` and its statistics, on hand-made run summaries (no training here).

References: published Student t-table values, closed forms (df = 1, 2, infinity), a t CDF computed
by numerical integration of the density with numpy (no incomplete beta), Welch's df worked by hand,
and numpy for every mean and sample std. The end-to-end test with real runs is test_seeds.py.
"""

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_gpt
from _helpers import OFFICIAL_TOKENIZERS
from tools import harness

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_CODE = b'"""A stand-in train_gpt.py: the harness copies it and compares it with the logs, never runs it."""\n'
SHIPPED = train_gpt.ship_code(FAKE_CODE)      # what the record holds and each run counted as bytes_code
VAL_TOKENS, VAL_BYTES = 9553, 16217
RULES_FIELDS = ["author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code",
                "track", "seeds", "seed_results", "val_bpb_std", "hardware", "pytorch_version", "t_statistic",
                "welch_df", "p_value", "technique_summary"]
SEED_FIELDS = ["val_loss", "val_bpb", "artifact_bytes", "steps", "step_avg_ms", "eval_time_s"]
SP1024_SHA = "4f5e8adb109c66b4886963bc75a7befd73bda36d27fd7102df8e9e66503b0e2a"
SP8192_SHA = "4e979c92754cc9d7bdebd9dfe5edf3fc0b41b38714b394e4297fa851e3afd516"
CASEOPS_SHA = "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d"
SP1024_SPLIT, SP8192_SPLIT = 62_021_632, 40_540_160


def stand_in_documents(seed: int, n_tokens: int) -> np.ndarray:
    """Documents of random ids ([BOS] + 40..200 ids in [4, 1024)), n_tokens in all."""
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[harness.BOS_ID], rng.integers(4, 1024, rng.integers(40, 200))]) for _ in range(n_tokens // 40)]
    return np.concatenate(docs)[:n_tokens]


# The data the hand-made runs ran on, written into every entry (the `entry` fixture) where their settings look:
# a stand-in tokenizer file and validation and training shards of different documents. `stand_in_pair` makes the
# pair known, as the official FineWeb data is (KNOWN_DATA_PAIRS), its validation sha256 not pinned.
STAND_IN_TOKENIZER = b"a stand-in for the official sp1024 tokenizer: the harness only hashes it"
STAND_IN_VAL, STAND_IN_TRAIN = stand_in_documents(0, VAL_TOKENS + 1), stand_in_documents(1, 20_000)


def shard_bytes(tokens) -> bytes:
    header = np.zeros(harness.SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (harness.SHARD_MAGIC, harness.SHARD_VERSION, len(tokens))
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


STAND_IN_SHA = hashlib.sha256(STAND_IN_TOKENIZER).hexdigest()
STAND_IN_VAL_SHA = hashlib.sha256(shard_bytes(STAND_IN_VAL)).hexdigest()
STAND_IN_TRAIN_SHA = hashlib.sha256(shard_bytes(STAND_IN_TRAIN)).hexdigest()
DATA_PATH, TOKENIZER_PATH = "./data/datasets/fineweb10B_sp1024", "./data/tokenizers/fineweb_1024_bpe.model"
# An 8xH100 run on that data: the hardware (the data pair and the whole split are every hand-made run's)
H100 = dict(device="cuda", world_size=8, hardware="NVIDIA H100 80GB HBM3", torch_version="2.13.0+cu128",
            cuda_version="12.8")


def write_stand_in_data(root: Path) -> None:
    (root / TOKENIZER_PATH).parent.mkdir(parents=True, exist_ok=True)
    (root / TOKENIZER_PATH).write_bytes(STAND_IN_TOKENIZER)
    harness.write_shard(root / DATA_PATH / "fineweb_val_000000.bin", STAND_IN_VAL)
    harness.write_shard(root / DATA_PATH / "fineweb_train_000000.bin", STAND_IN_TRAIN)


@pytest.fixture(autouse=True)
def stand_in_pair(monkeypatch):
    monkeypatch.setitem(harness.KNOWN_DATA_PAIRS, STAND_IN_SHA, dict(
        name="stand-in sp1024", val_split_tokens=VAL_TOKENS + 1, val_shards_sha256=None))


# -----------------------------------------------------------------------------
# Independent references
# -----------------------------------------------------------------------------

def t_cdf_by_integration(t: float, df: float, points: int = 200_001) -> float:
    """P(T <= t) by Simpson's rule on the Student t density after x = tan(theta), theta in (-pi/2, atan t]."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi))
    theta = np.linspace(-math.pi / 2, math.atan(t), points)
    x = np.tan(theta[1:])
    # integrand c * (1 + x^2/df)^(-(df+1)/2) * (1 + x^2); its limit at theta = -pi/2 is 0 (df > 1) or c (df = 1)
    g = np.concatenate([[c if df == 1 else 0.0], c * (1 + x * x / df) ** (-(df + 1) / 2) * (1 + x * x)])
    h = (theta[-1] - theta[0]) / (points - 1)
    return float(h / 3 * (g[0] + g[-1] + 4 * g[1:-1:2].sum() + 2 * g[2:-1:2].sum()))


def t_quantile(p: float, df: float) -> float:
    """Inverse of harness.student_t_cdf by bisection."""
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if harness.student_t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def welch_by_hand(ours, reference, margin):
    """(t, df, p) of the one-sided Welch test, written out with numpy and the integrated t CDF."""
    a, b = np.asarray(ours, float), np.asarray(reference, float)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t = (a.mean() - (b.mean() - margin)) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return float(t), float(df), t_cdf_by_integration(float(t), float(df))


# -----------------------------------------------------------------------------
# Statistics
# -----------------------------------------------------------------------------

def test_importing_the_harness_needs_no_torch_train_gpt_or_sentencepiece():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tools.harness; "
            "print(sorted(m for m in ('torch', 'train_gpt', 'sentencepiece') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(REPO_ROOT)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("p, df, table", [
    (0.95, 2, 2.920), (0.975, 10, 2.228), (0.99, 5, 3.365), (0.995, 1, 63.657), (0.90, 30, 1.310),
    (0.975, 3, 3.182), (0.999, 20, 3.552), (0.95, 120, 1.658), (0.99, 2, 6.965), (0.975, 1, 12.706)])
def test_t_cdf_matches_the_published_t_table(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=5e-4 + 1e-9)   # tables round to 3 decimals
    assert harness.student_t_cdf(-table, df) == pytest.approx(1 - harness.student_t_cdf(table, df), abs=1e-15)


@pytest.mark.parametrize("t", [-50.0, -3.0, -1.0, -0.2, 0.0, 0.7, 2.5, 10.0, 1e3])
def test_t_cdf_closed_forms(t):
    assert harness.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)       # Cauchy
    assert harness.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
    assert harness.student_t_cdf(t, math.inf) == 0.5 * math.erfc(-t / math.sqrt(2))


@pytest.mark.parametrize("t", [-4.0, -1.5, 0.3, 2.0, 3.5])
def test_t_cdf_tends_to_the_normal_for_large_df(t):
    normal = 0.5 * math.erfc(-t / math.sqrt(2))
    assert harness.student_t_cdf(t, 1e7) == pytest.approx(normal, abs=1e-6)
    assert abs(harness.student_t_cdf(t, 1e3) - normal) > abs(harness.student_t_cdf(t, 1e5) - normal) or t == 0


@pytest.mark.parametrize("df", [2.0, 2.118, 4.07547, 7.3, 29.5])
@pytest.mark.parametrize("t", [-6.0, -2.5, -0.4, 0.0, 1.1, 3.0])
def test_t_cdf_matches_numerical_integration_for_fractional_df(t, df):
    assert harness.student_t_cdf(t, df) == pytest.approx(t_cdf_by_integration(t, df), abs=1e-8)


def test_t_cdf_matches_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    for df in (1.0, 2.0, 2.5, 4.07547, 13.0, 1e4):
        for t in (-30.0, -5.0, -2.0, -0.3, 0.0, 0.8, 4.0):
            assert harness.student_t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), rel=1e-10, abs=1e-300)


def test_t_cdf_keeps_tiny_tails():
    # P(T <= -30) at df=5 is about 3.5e-7: a subtraction from 1 would lose most of its digits
    tail = harness.student_t_cdf(-30.0, 5)
    assert tail == pytest.approx(t_cdf_by_integration(-30.0, 5), rel=1e-5)
    assert 0 < tail < 1e-6


def test_incomplete_beta_special_cases():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert harness.regularized_incomplete_beta(2.5, 1.0, x) == pytest.approx(x ** 2.5, abs=1e-14)
        assert harness.regularized_incomplete_beta(1.0, 3.0, x) == pytest.approx(1 - (1 - x) ** 3, abs=1e-14)
    assert harness.regularized_incomplete_beta(7.0, 7.0, 0.5) == pytest.approx(0.5, abs=1e-14)
    with pytest.raises(ValueError):
        harness.regularized_incomplete_beta(0.0, 1.0, 0.5)


def test_welch_df_and_t_by_hand():
    # s1^2/n1 = 0.01/3 = 1/300, s2^2/n2 = (0.2/3 * ... ) = 1/60:
    # df = (1/300 + 1/60)^2 / ((1/300)^2 / 2 + (1/60)^2 / 3) = 216/53
    ours, ref, margin = [1.0, 1.1, 1.2], [2.0, 2.2, 2.4, 2.6], 0.01
    r = harness.welch_one_sided(ours, ref, margin)
    assert r["welch_df"] == pytest.approx(216 / 53, rel=1e-12)
    assert r["t_statistic"] == pytest.approx((1.1 - 2.3 + margin) / math.sqrt(1 / 300 + 1 / 60), rel=1e-12)
    assert r["p_value"] == pytest.approx(harness.student_t_cdf(r["t_statistic"], 216 / 53), rel=1e-15)
    assert r["p_value"] < 1e-3                       # clearly better: small p
    worse = harness.welch_one_sided(ref, ours, margin)
    assert worse["p_value"] > 0.999                  # clearly worse: p near 1


def test_welch_margin_moves_the_test():
    ours, ref = [1.050, 1.051, 1.052], [1.060, 1.061, 1.062]    # 0.010 better
    assert harness.welch_one_sided(ours, ref, 0.0)["p_value"] < 0.01
    assert harness.welch_one_sided(ours, ref, 0.010)["p_value"] == pytest.approx(0.5, abs=1e-12)  # exactly at the margin
    assert harness.welch_one_sided(ours, ref, 0.02)["p_value"] > 0.99


def test_welch_needs_two_values_and_some_spread():
    none = dict(t_statistic=None, welch_df=None, p_value=None)
    assert harness.welch_one_sided([1.0], [1.1, 1.2], 0.0) == none
    assert harness.welch_one_sided([1.0, 1.0], [1.1, 1.1], 0.0) == none


def test_margin_bpb():
    assert harness.margin_bpb(1000, 2500) == pytest.approx(0.005 / math.log(2) * 0.4, rel=1e-15)
    assert harness.margin_bpb(VAL_TOKENS, VAL_BYTES, margin_nats=0.01) == pytest.approx(
        2 * harness.margin_bpb(VAL_TOKENS, VAL_BYTES), rel=1e-15)


# -----------------------------------------------------------------------------
# Hand-made runs
# -----------------------------------------------------------------------------

def fake_summary(run_id, seed, val_bpb, **overrides):
    """A run summary with the keys train_gpt.py writes; val_loss consistent with val_bpb. Its artifact
    (write_runs puts it on disk) is `bytes_model` bytes, its sha256 that of fake_artifact()."""
    hp = {**train_gpt.read_settings({"PRESET": "baseline"})[0].as_dict(), "PRESET": "baseline", "ARTIFACT_BUDGET_BYTES": 16_000_000, "MAX_WALLCLOCK_SECONDS": 600.0,
          "ITERATIONS": 20000, "NUM_LAYERS": 9, "MODEL_DIM": 512, "NUM_HEADS": 8, "NUM_KV_HEADS": 4, "MLP_MULT": 2,
          "VOCAB_SIZE": 1024, "TRAIN_SEQ_LEN": 1024, "TRAIN_BATCH_TOKENS": 524288, "EVAL_AUDIT": 1, "TTT_ENABLED": 0,
          "DATA_PATH": DATA_PATH, "TOKENIZER_PATH": TOKENIZER_PATH,
          "LZMA_PRESET": 9, "SEED": seed, "RUN_ID": run_id}
    bytes_model = overrides.pop("bytes_model", 2_000 + seed)
    s = dict(run_id=run_id, seed=seed, preset="baseline", world_size=2, device="cpu", hardware="x86_64",
             torch_version="2.13.0+cpu", cuda_version=None, eval_only=False, steps=1000 + seed,
             train_time_ms=590_000.0 + seed, step_avg_ms=590.0, tokens_per_s=1.0, stopped_early=True,
             pre_quant_val_loss=None, pre_quant_val_bpb=val_bpb - 0.01, bytes_model=bytes_model,
             bytes_code=len(SHIPPED), code_readable_sha256=hashlib.sha256(FAKE_CODE).hexdigest(),
             artifact_path=f"artifacts/{run_id}.pgolf.xz",
             artifact_sha256=hashlib.sha256(fake_artifact(run_id, bytes_model)).hexdigest(),
             train_data_last_read_ms=589_000.0, train_deadline_ms=600_000.0, train_data_read_after_deadline=False,
             val_loss=val_bpb * math.log(2) * VAL_BYTES / VAL_TOKENS, val_bpb=val_bpb, val_tokens=VAL_TOKENS,
             val_bytes=VAL_BYTES, val_split_tokens=VAL_TOKENS + 1, val_full_split=True, eval_seq_len=1024,
             eval_stride=64, eval_time_ms=80_000.0 + seed, quant_scheme="int8_lzma", model_params=17_059_912,
             quant=dict(calibration="self", calibration_end_ms=589_500.0),
             compliance=dict(scoring_forward_ok=True, causality_ok=True, rows_independent_ok=True, normalization_ok=True, score_before_update_ok=True, one_pass_ok=True,
                             no_train_data_after_deadline=True, all_ok=True),
             nll_dump=None, wall_time_s=700.0, hyperparameters=hp, tokenizer_sha256=STAND_IN_SHA,
             val_shards_sha256=STAND_IN_VAL_SHA, train_tokens_read=8_208,
             train_shards_read=[dict(name="fineweb_train_000000.bin", sha256=STAND_IN_TRAIN_SHA)])
    s["bytes_total"] = s["bytes_model"] + s["bytes_code"]
    for key, value in overrides.items():
        if key == "hyperparameters":
            s["hyperparameters"] = dict(hp, **value)
        else:
            s[key] = value
    s.setdefault("roundtrip_sha256_per_rank", [s["artifact_sha256"]] * s["world_size"])
    s.setdefault("explicit_settings", sorted(s["hyperparameters"]))
    for key in train_gpt.SUMMARY_KEYS:           # keys the harness does not read: as a run that has none to report
        s.setdefault(key, None)
    return s


def summary_bytes(s):
    """logs/<RUN_ID>.json as train_gpt.py writes it."""
    return (json.dumps(s, indent=2, sort_keys=True) + "\n").encode()


def log_tail(s):
    """The lines train_gpt.py logs after the source that the harness checks the summary against, ending
    with the summary's path and sha256."""
    lines = [f"world_size:{s['world_size']} device:{s['device']} compute_dtype:torch.float32 attention:sdpa",
             *([f"gpu:{s['hardware']} x{s['world_size']}"] if s["device"] == "cuda" else []),
             f"run_id:{s['run_id']} seed:{s['seed']}",
             "hyperparameters:" + json.dumps(s["hyperparameters"], sort_keys=True),
             "explicit_settings:" + json.dumps(s["explicit_settings"]),
             f"val_stream_tokens:{s['val_tokens'] + 1} (of {s['val_split_tokens']}"
             + (")" if s["val_full_split"] else ", partial validation)"),
             f"data: tokenizer sha256 {s.get('tokenizer_sha256') or '0' * 64} re-encodes the first 16 validation "
             f"documents to the same ids; 1 validation shard(s) sha256 {s.get('val_shards_sha256') or '0' * 64}",
             "train_shards_read:" + json.dumps(dict(tokens=s["train_tokens_read"], shards=s["train_shards_read"]),
                                               sort_keys=True),
             f"final_{s['quant_scheme']}_roundtrip_exact val_loss:{s['val_loss']:.8f} val_bpb:{s['val_bpb']:.8f}",
             f"eval_time: {s['eval_time_ms']:.0f}ms from the artifact's load to the final score (every pass counted)"]
    if s["compliance"] is not None:
        lines.append("compliance: " + json.dumps(s["compliance"], sort_keys=True))
    lines.append(f"summary: logs/{s['run_id']}.json sha256 {hashlib.sha256(summary_bytes(s)).hexdigest()}")
    return "".join(line + "\n" for line in lines).encode()


def fake_artifact(run_id, size):
    seed = run_id.encode()
    return (seed * (size // len(seed) + 1))[:size]


BPBS = {1: 1.0501, 2: 1.0523, 3: 1.0512}


def write_runs(root, seeds=(1, 2, 3), prefix="pg", summaries=None, code=FAKE_CODE, manifest=True, **overrides):
    """logs/<prefix>_seed<N>.{json,txt} and artifacts/<prefix>_seed<N>.pgolf.xz for each seed under `root`
    (the artifact as its summary describes it, the log ending in the lines the summary says), and the
    sweep's manifest logs/<prefix>.sweep.json (unless manifest=False); returns the run ids."""
    (root / "logs").mkdir(exist_ok=True)
    (root / "artifacts").mkdir(exist_ok=True)
    ids = []
    for i, seed in enumerate(seeds):
        run_id = f"{prefix}_seed{seed}" if f"{prefix}_seed{seed}" not in ids else f"{prefix}_seed{seed}_{i}"
        s = (summaries or {}).get(i) or fake_summary(run_id, seed, BPBS.get(seed, 1.05), **overrides)
        (root / "logs" / f"{run_id}.json").write_bytes(summary_bytes(s))
        (root / "logs" / f"{run_id}.txt").write_bytes(code + harness.LOG_SOURCE_END.encode() + log_tail(s))
        (root / s["artifact_path"]).write_bytes(fake_artifact(s["run_id"], s["bytes_model"]))
        ids.append(run_id)
    if manifest:
        (root / "logs" / f"{prefix}.sweep.json").write_text(json.dumps(dict(
            prefix=prefix, seeds=[str(s) for s in seeds], run_ids=ids, code_sha256=hashlib.sha256(code).hexdigest(),
            settings={}, practice=False)))
    return ids


def edit_summary(root, run_id, as_run=False, **changes):
    """Change fields of logs/<run_id>.json after its log was written (what a hand edit does); with as_run,
    the log's last line vouches for the new summary, as if the run had written these values."""
    path = root / "logs" / f"{run_id}.json"
    s = json.loads(path.read_text())
    s.update(changes)
    path.write_bytes(summary_bytes(s))
    if as_run:
        log = root / "logs" / f"{run_id}.txt"
        text = log.read_bytes()
        head = text[:text.rstrip(b"\n").rfind(b"\n") + 1]
        log.write_bytes(head + f"summary: logs/{run_id}.json sha256 {hashlib.sha256(summary_bytes(s)).hexdigest()}\n"
                        .encode())


@pytest.fixture
def entry(tmp_path, monkeypatch):
    """A working directory like the repository root: train_gpt.py, requirements.txt, submission.json."""
    for var in ("RECORD_DIR", "REFERENCE_BPB", "SUBMISSION_NAME", "AUTHOR", "GITHUB_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    write_stand_in_data(tmp_path)
    (tmp_path / "train_gpt.py").write_bytes(FAKE_CODE)
    (tmp_path / "requirements.txt").write_text("torch\nnumpy\nsentencepiece\n")
    (tmp_path / "submission.json").write_text(json.dumps({"name": "placeholder", "val_bpb": None}) + "\n")
    return tmp_path


def tree(root):
    """{relative path: sha256} of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def submit(*args):
    return harness.main(["submit", *args])


@pytest.fixture(autouse=True)
def shipped_in_this_process(monkeypatch, tmp_path_factory):
    """submit makes the record's train_gpt.py with train_gpt.py's own ship_code in a subprocess of the code
    it submits (tests/test_seeds.py runs that on real runs); the stand-in code here has no ship_code, so
    its shipped form is made in this process with the same function and checked by the same verify."""
    def shipped(code_path):
        out = tmp_path_factory.mktemp("shipped") / "train_gpt.py"
        out.write_bytes(train_gpt.ship_code(Path(code_path).read_bytes()))
        reasons = harness._ship_code_module().verify_shipped(str(out), str(code_path))
        return (None, reasons) if reasons else (out.read_bytes(), [])
    monkeypatch.setattr(harness, "shipped_code", shipped)


def test_assembles_a_record_with_every_file_and_statistic(entry, capsys):
    ids = write_runs(entry)
    assert submit(*ids, "--record-dir", "rec", "--date", "2026-04-01") == 0
    rec = entry / "rec"
    assert sorted(os.listdir(rec)) == sorted(["README.md", "submission.json", "train_gpt.py", "requirements.txt",
                                              "pg.sweep.json"] + [f"{i}.{ext}" for i in ids for ext in ("txt", "json")])
    assert (rec / "train_gpt.py").read_bytes() == SHIPPED       # the shipped form, whose size the runs counted
    assert harness._ship_code_module().verify_shipped(str(rec / "train_gpt.py"), str(entry / "train_gpt.py")) == []
    assert (rec / "requirements.txt").read_bytes() == (entry / "requirements.txt").read_bytes()
    for i in ids:
        for ext in ("txt", "json"):
            assert (rec / f"{i}.{ext}").read_bytes() == (entry / "logs" / f"{i}.{ext}").read_bytes()

    sub = json.loads((rec / "submission.json").read_text())
    assert list(sub)[:len(RULES_FIELDS)] == RULES_FIELDS
    summaries = [json.loads((entry / "logs" / f"{i}.json").read_text()) for i in ids]
    bpb = np.array([s["val_bpb"] for s in summaries])
    loss = np.array([s["val_loss"] for s in summaries])
    margin = 0.005 / math.log(2) * VAL_TOKENS / VAL_BYTES
    t, df, p = welch_by_hand(bpb, harness.DEFAULT_REFERENCE_BPB, margin)
    assert sub["val_bpb"] == pytest.approx(bpb.mean(), rel=1e-14)
    assert sub["val_loss"] == pytest.approx(loss.mean(), rel=1e-14)
    assert sub["val_bpb_std"] == pytest.approx(bpb.std(ddof=1), rel=1e-12)
    assert sub["val_loss_std"] == pytest.approx(loss.std(ddof=1), rel=1e-12)
    assert sub["margin_bpb"] == pytest.approx(margin, rel=1e-14)
    assert (sub["t_statistic"], sub["welch_df"]) == (pytest.approx(t, rel=1e-12), pytest.approx(df, rel=1e-12))
    assert sub["p_value"] == pytest.approx(p, abs=1e-8)
    assert sub["reference_val_bpb"] == [1.05989, 1.06125, 1.06209]
    assert sub["bytes_total"] == max(s["bytes_total"] for s in summaries) == summaries[2]["bytes_total"]
    assert sub["bytes_code"] == len(SHIPPED)
    assert sub["seeds"] == [1, 2, 3] and sub["track"] == "10min_16mb" and sub["date"] == "2026-04-01"
    assert sub["author"] is None and sub["github_id"] is None and sub["name"] == "baseline_9x512_int8_lzma"
    assert sub["hardware"] == "x86_64 (cpu, 2 processes)" and sub["pytorch_version"] == "2.13.0+cpu"
    assert sub["cuda_version"] is None and sub["on_track_hardware"] is False
    for s in summaries:
        r = sub["seed_results"][str(s["seed"])]
        assert {k: r[k] for k in SEED_FIELDS} == dict(
            val_loss=s["val_loss"], val_bpb=s["val_bpb"], artifact_bytes=s["bytes_total"], steps=s["steps"],
            step_avg_ms=s["step_avg_ms"], eval_time_s=s["eval_time_ms"] / 1e3)
    assert "9 layers x 512" in sub["technique_summary"] and "no TTT" in sub["technique_summary"]

    readme = (rec / "README.md").read_text()
    assert "Practice record" in readme
    for s in summaries:
        assert f"| {s['seed']} | `{s['run_id']}` | {s['val_bpb']:.8f} | {s['val_loss']:.8f} |" in readme
        assert f"EVAL_ONLY=../artifacts/{s['run_id']}.pgolf.xz RUN_ID=rescore_{s['run_id']}" in readme
    assert f"**{bpb.mean():.8f}**" in readme and f"p = {p:.3g}" in readme
    assert 'SEEDS="1 2 3" NPROC=2 ' in readme and "bash run_8xh100.sh" in readme
    out = capsys.readouterr().out
    assert f"mean val_bpb {bpb.mean():.8f}" in out and f"p={p:.3g}" in out


def test_dry_run_writes_nothing(entry, capsys):
    ids = write_runs(entry)
    before = tree(entry)
    assert submit(*ids, "--record-dir", "rec", "--dry-run") == 0
    assert tree(entry) == before
    assert "dry run: would write rec" in capsys.readouterr().out


REFUSALS = {
    "over the byte cap": dict(runs=dict(summaries={0: fake_summary("pg_seed1", 1, 1.05, bytes_model=16_000_001,
                                                                   hyperparameters={"ARTIFACT_BUDGET_BYTES": 20_000_000})},
                                        hyperparameters={"ARTIFACT_BUDGET_BYTES": 20_000_000})),
    "ARTIFACT_BUDGET_BYTES=1,000": dict(runs=dict(hyperparameters={"ARTIFACT_BUDGET_BYTES": 1_000})),
    "past its wallclock cap": dict(runs=dict(summaries={1: fake_summary("pg_seed2", 2, 1.05, train_time_ms=600_000.5)})),
    "past the challenge's 600 s": dict(runs=dict(train_time_ms=650_000.0,
                                                 hyperparameters={"MAX_WALLCLOCK_SECONDS": 0.0})),
    "says it read training data after its deadline": dict(
        runs=dict(summaries={2: fake_summary("pg_seed3", 3, 1.05, train_data_read_after_deadline=True)})),
    # a run that trusted its own cap (609 s) and said "not after the deadline": the harness checks the times
    "read training data after the deadline: train_data_last_read_ms = 600500.0": dict(runs=dict(summaries={
        0: fake_summary("pg_seed1", 1, 1.05, train_data_last_read_ms=600_500.0, train_time_ms=598_000.0,
                        hyperparameters={"MAX_WALLCLOCK_SECONDS": 609.0})})),
    "read training data after the deadline: quant.calibration_end_ms = 607000.0": dict(runs=dict(summaries={
        1: fake_summary("pg_seed2", 2, 1.05, quant=dict(calibration="train", calibration_end_ms=607_000.0),
                        hyperparameters={"MAX_WALLCLOCK_SECONDS": 609.0, "GPTQ_CALIBRATION": "train"})})),
    "no compliance audit": dict(runs=dict(summaries={0: fake_summary("pg_seed1", 1, 1.05, compliance=None)})),
    "failed the compliance audit: causality_ok": dict(runs=dict(summaries={1: fake_summary(
        "pg_seed2", 2, 1.05, compliance=dict(causality_ok=False, normalization_ok=True, all_ok=False))})),
    "disagree on code bytes": dict(runs=dict(summaries={1: fake_summary("pg_seed2", 2, 1.05,
                                                                        bytes_code=len(SHIPPED) + 1)})),
    "records a train_gpt.py different from train_gpt.py": dict(after=lambda root: (root / "train_gpt.py").write_bytes(
        FAKE_CODE + b"# edited after the runs\n")),
    "already exists: a record is never overwritten": dict(after=lambda root: (root / "rec").mkdir()),
    "EVAL_ONLY re-score": dict(runs=dict(summaries={0: fake_summary("pg_seed1", 1, 1.05, eval_only=True)})),
    "appear more than once": dict(runs=dict(seeds=(1, 1, 2))),
    "ran different settings from seed 1 (pg_seed1): NUM_LAYERS=10 vs 9": dict(runs=dict(summaries={
        1: fake_summary("pg_seed2", 2, 1.05, hyperparameters={"NUM_LAYERS": 10})})),
    "different validation sets (val_tokens": dict(runs=dict(summaries={2: fake_summary("pg_seed3", 3, 1.05,
                                                                                       val_tokens=VAL_TOKENS - 1)})),
    "evaluated for longer than the challenge's 600 s": dict(runs=dict(eval_time_ms=600_001.0)),
    "logs/pg_seed2.json is missing": dict(after=lambda root: (root / "logs" / "pg_seed2.json").unlink()),
    "logs/pg_seed3.txt (the train log) is missing": dict(after=lambda root: (root / "logs" / "pg_seed3.txt").unlink()),
    "requirements.txt is missing": dict(after=lambda root: (root / "requirements.txt").unlink()),
    "has sha256": dict(after=lambda root: (root / "artifacts" / "pg_seed1.pgolf.xz").write_bytes(
        b"x" + fake_artifact("pg_seed1", 2_001)[1:])),
    "is not on disk": dict(after=lambda root: (root / "artifacts" / "pg_seed2.pgolf.xz").unlink()),
    "is 1,999 bytes, not the 2003": dict(after=lambda root: (root / "artifacts" / "pg_seed3.pgolf.xz").write_bytes(
        fake_artifact("pg_seed3", 1_999))),
    "summary does not name the training shards it read (train_shards_read None)": dict(runs=dict(summaries={
        1: fake_summary("pg_seed2", 2, 1.05, train_shards_read=None)})),
    f"its training shard fineweb_train_000000.bin in {DATA_PATH} has sha256": dict(
        after=lambda root: harness.write_shard(root / DATA_PATH / "fineweb_train_000000.bin", STAND_IN_TRAIN[1:])),
    "occur in the 1 training shard(s) it read": dict(
        after=lambda root: harness.write_shard(root / DATA_PATH / "fineweb_train_000000.bin", STAND_IN_VAL)),
    "its data is not on disk here (the training shard(s)": dict(
        runs=H100, after=lambda root: (root / DATA_PATH / "fineweb_train_000000.bin").unlink()),
}


@pytest.mark.parametrize("reason", list(REFUSALS))
def test_refusals_say_why_exit_1_and_write_nothing(entry, capsys, reason):
    case = REFUSALS[reason]
    ids = write_runs(entry, **case.get("runs", {}))
    case.get("after", lambda root: None)(entry)
    before = tree(entry)
    assert submit(*ids, "--record-dir", "rec") == 1
    err = capsys.readouterr().err
    assert "submit: refusing to assemble:" in err and reason in err, err
    assert tree(entry) == before
    assert [p.name for p in entry.iterdir() if p.name.startswith(".")] == []


def test_the_artifact_is_measured_not_trusted(entry):
    """bytes_total in the summary says nothing the harness believes: it measures the artifact on disk, so a
    summary under-reporting a 16,000,001-byte model is refused, and one whose sizes are right is accepted."""
    big = 16_000_001 - len(SHIPPED)
    s = fake_summary("pg_seed1", 1, 1.05, bytes_model=big)
    s["bytes_model"], s["bytes_total"] = 1_000, 1_000 + len(SHIPPED)      # the lie
    ids = write_runs(entry, seeds=(1,), summaries={0: s})
    (entry / "artifacts" / "pg_seed1.pgolf.xz").write_bytes(fake_artifact("pg_seed1", big))
    assert submit(*ids, "--record-dir", "rec") == 1
    honest = write_runs(entry, seeds=(2,), prefix="ok", hyperparameters={"ITERATIONS": 20001})   # another sweep
    assert submit(*honest, "--record-dir", "rec2", "--exclude", "pg_seed1=refused: its artifact is over the cap") == 0


def test_every_reason_is_reported_at_once(entry, capsys):
    ids = write_runs(entry, summaries={0: fake_summary("pg_seed1", 1, 1.05, compliance=None),
                                       1: fake_summary("pg_seed2", 2, 1.05, bytes_model=17_000_000)})
    assert submit(*ids, "--record-dir", "rec") == 1
    err = capsys.readouterr().err
    assert "seed 1 (pg_seed1) has no compliance audit" in err and "seed 2 (pg_seed2) is over the byte cap" in err


def test_cpu_runs_default_to_a_practice_record_under_logs(entry, capsys):
    ids = write_runs(entry, prefix="pg_20260401_120000")
    before = (entry / "submission.json").read_bytes()
    assert submit(*ids, "--date", "2026-04-01") == 0
    assert (entry / "logs" / "pg_20260401_120000_record" / "submission.json").is_file()
    assert not (entry / "records").exists()
    assert (entry / "submission.json").read_bytes() == before
    assert "a practice record, not a record (not run on the track's hardware" in capsys.readouterr().out


def test_cpu_runs_may_not_write_under_records(entry, capsys):
    ids = write_runs(entry)
    assert submit(*ids, "--record-dir", "records/track_10min_16mb/x") == 1
    assert "is under records/" in capsys.readouterr().err
    assert not (entry / "records").exists()


def test_8xh100_runs_go_to_records_and_update_the_top_level_submission(entry):
    ids = write_runs(entry, **H100)
    assert submit(*ids, "--date", "2026-04-01", "--name", "My run: v1") == 0
    rec = entry / "records" / "track_10min_16mb" / "2026-04-01_My_run_v1"
    sub = json.loads((rec / "submission.json").read_text())
    assert sub["on_track_hardware"] is True and sub["name"] == "My run: v1"
    assert sub["hardware"] == "8x NVIDIA H100 80GB HBM3" and sub["cuda_version"] == "12.8"
    assert sub["pytorch_version"] == "2.13.0+cu128"
    assert json.loads((entry / "submission.json").read_text()) == sub
    assert "Practice record" not in (rec / "README.md").read_text()

    # a worse sweep (another configuration) is no record: a non-record submission; the top level keeps the record
    worse = write_runs(entry, prefix="pg2", summaries={i: fake_summary(f"pg2_seed{s}", s, 1.2, **H100,
                                                                       hyperparameters={"ITERATIONS": 9})
                                                       for i, s in enumerate((1, 2, 3))})
    assert submit(*worse, "--date", "2026-04-02") == 1         # the first sweep's runs are of the same code
    assert submit(*worse, "--date", "2026-04-02", *[f"--exclude={i}=the record before" for i in ids]) == 0
    nonrec = entry / "records" / "track_non_record_16mb" / "2026-04-02_baseline_9x512_int8_lzma"
    assert json.loads((nonrec / "submission.json").read_text())["excluded_runs"] == {i: "the record before" for i in ids}
    assert "left out by the submitter with these reasons: `pg_seed1`: the record before" in (nonrec / "README.md").read_text()
    assert json.loads((entry / "submission.json").read_text()) == sub


def test_partial_validation_is_never_a_record(entry, capsys):
    """8xH100 runs that scored only part of the validation split (VAL_MAX_TOKENS): refused under records/,
    assembled as a practice record that says so, and the top-level submission.json left alone."""
    partial = dict(H100, val_full_split=False, val_tokens=99_999)
    ids = write_runs(entry, **partial)
    before = (entry / "submission.json").read_bytes()
    assert submit(*ids, "--record-dir", "records/track_10min_16mb/x") == 1
    assert "scored part of it (VAL_MAX_TOKENS)" in capsys.readouterr().err
    assert submit(*ids, "--date", "2026-04-01") == 0
    rec = entry / "logs" / "pg_record"
    sub = json.loads((rec / "submission.json").read_text())
    assert sub["val_full_split"] is False and "Partial validation: scored the first 100,000 of" in sub["blurb"]
    assert "**Partial validation.**" in (rec / "README.md").read_text()
    assert not (entry / "records").exists() and (entry / "submission.json").read_bytes() == before
    assert "a practice record, not a record (partial validation" in capsys.readouterr().out


def test_one_gpu_is_not_the_track(entry):
    ids = write_runs(entry, **dict(H100, world_size=1))
    before = (entry / "submission.json").read_bytes()
    assert submit(*ids, "--date", "2026-04-01") == 0
    assert not (entry / "records").exists() and (entry / "logs" / "pg_record").is_dir()
    assert (entry / "submission.json").read_bytes() == before


def test_a_single_seed_has_null_spread_and_no_test(entry):
    ids = write_runs(entry, seeds=(7,))
    assert submit(*ids, "--record-dir", "rec") == 0
    sub = json.loads((entry / "rec" / "submission.json").read_text())
    assert sub["seeds"] == [7] and sub["val_bpb_std"] is None
    assert (sub["t_statistic"], sub["welch_df"], sub["p_value"]) == (None, None, None)


# -----------------------------------------------------------------------------
# Environment knobs: each changes what is written
# -----------------------------------------------------------------------------

def test_env_record_dir(entry, monkeypatch):
    ids = write_runs(entry)
    monkeypatch.setenv("RECORD_DIR", str(entry / "elsewhere" / "rec"))
    assert submit(*ids) == 0
    assert (entry / "elsewhere" / "rec" / "submission.json").is_file()
    assert not (entry / "logs" / "pg_record").exists()


def test_env_reference_bpb(entry, monkeypatch):
    ids = write_runs(entry)
    monkeypatch.setenv("REFERENCE_BPB", "1.0601, 1.0590 1.0612")
    assert submit(*ids, "--record-dir", "rec") == 0
    sub = json.loads((entry / "rec" / "submission.json").read_text())
    t, df, p = welch_by_hand(list(BPBS.values()), [1.0601, 1.0590, 1.0612], sub["margin_bpb"])
    assert sub["reference_val_bpb"] == list(harness.DEFAULT_REFERENCE_BPB)      # the published best: always the test
    user = sub["user_reference"]
    assert user["val_bpb"] == [1.0601, 1.0590, 1.0612] and user["mean"] == pytest.approx(np.mean(user["val_bpb"]))
    assert user["t_statistic"] == pytest.approx(t, rel=1e-12) and user["p_value"] == pytest.approx(p, abs=1e-8)
    assert user["welch_df"] == pytest.approx(df, rel=1e-12)
    assert "Against REFERENCE_BPB (1.06010, 1.05900, 1.06120; mean 1.06010)" in (entry / "rec" / "README.md").read_text()


@pytest.mark.parametrize("bad", ["1.06", "1.06 x", "1.06 -1"])
def test_env_reference_bpb_malformed_is_a_usage_error(entry, monkeypatch, capsys, bad):
    ids = write_runs(entry)
    monkeypatch.setenv("REFERENCE_BPB", bad)
    with pytest.raises(SystemExit) as exc:
        submit(*ids, "--record-dir", "rec")
    assert exc.value.code == 2 and "--reference-bpb" in capsys.readouterr().err
    assert not (entry / "rec").exists()


def test_env_submission_name_author_github_id(entry, monkeypatch):
    ids = write_runs(entry, **H100)
    monkeypatch.setenv("SUBMISSION_NAME", "Int8 baseline")
    monkeypatch.setenv("AUTHOR", "Ada Lovelace")
    monkeypatch.setenv("GITHUB_ID", "ada")
    assert submit(*ids, "--date", "2026-04-03") == 0
    sub = json.loads((entry / "records" / "track_10min_16mb" / "2026-04-03_Int8_baseline" / "submission.json").read_text())
    assert (sub["name"], sub["author"], sub["github_id"]) == ("Int8 baseline", "Ada Lovelace", "ada")


# -----------------------------------------------------------------------------
# Reproduction commands: the settings the run recorded as set in its environment
# -----------------------------------------------------------------------------

def test_explicit_settings_reproduce_the_resolved_settings():
    env = {"NUM_LAYERS": "3", "RECUR_LAYERS": "0-1", "PARALLEL_LAST_N": "1", "MATRIX_LR": "0.031", "DATA_PATH": "/d a/x",
           "EVAL_STRIDE": "0", "SEED": "5", "RUN_ID": "r", "EVAL_AUDIT": "1", "ADAM_EPS": "1e-09", "PRESET": "frontier"}
    hp = train_gpt.read_settings(env)[0]
    run = harness.SeedRun("r", dict(seed=5, hyperparameters=hp.as_dict(), explicit_settings=sorted(hp.explicit)), b"", b"")
    explicit = harness.explicit_settings(run)
    assert set(explicit) == {"NUM_LAYERS", "RECUR_LAYERS", "PARALLEL_LAST_N", "MATRIX_LR", "DATA_PATH", "EVAL_STRIDE",
                             "ADAM_EPS", "PRESET"}                  # the launcher's SEED, RUN_ID, EVAL_AUDIT left out
    import shlex
    parsed = dict(word.split("=", 1) for word in shlex.split(harness._env_line(explicit)))
    again = train_gpt.read_settings(dict(parsed, SEED="5", RUN_ID="r", EVAL_AUDIT="1"))[0].as_dict()
    assert again == hp.as_dict()


# -----------------------------------------------------------------------------
# What the runs make: a record, a non-record submission, or a practice record
# -----------------------------------------------------------------------------

RECORD_DIR = Path("records") / "track_10min_16mb"
NON_RECORD_DIR = Path("records") / "track_non_record_16mb"


def test_a_summary_without_the_data_pair_is_refused(entry, capsys):
    """A summary from before the data contract (no tokenizer sha256): its log vouches for no data pair."""
    ids = write_runs(entry, **dict(H100, tokenizer_sha256=None))
    assert submit(*ids, "--date", "2026-04-01") == 1
    assert "its log's data line" in capsys.readouterr().err
    assert harness.known_data_pair([harness.SeedRun("x", dict(fake_summary("x", 1, 1.0), tokenizer_sha256=None),
                                                    b"", b"")])[0] is None


@pytest.mark.parametrize("data, known", [
    (dict(tokenizer_sha256=SP1024_SHA, val_split_tokens=SP1024_SPLIT), "sp1024 fineweb_1024_bpe.model"),
    (dict(tokenizer_sha256=SP8192_SHA, val_split_tokens=SP8192_SPLIT), "sp8192 fineweb_8192_bpe.model"),
    (dict(tokenizer_sha256=SP8192_SHA, val_split_tokens=SP1024_SPLIT), None),   # sp8192's tokenizer, sp1024's split
    (dict(tokenizer_sha256=CASEOPS_SHA, val_split_tokens=SP1024_SPLIT), None),  # CaseOps tokenizer, sp1024's split
    (dict(tokenizer_sha256=CASEOPS_SHA, val_split_tokens=47_851_521),
     "CaseOps sp8192 fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"),   # the range the records' logs allow
    (dict(tokenizer_sha256=CASEOPS_SHA, val_split_tokens=47_853_569), None),   # past it
    (dict(tokenizer_sha256=hashlib.sha256(b"demo").hexdigest(), val_split_tokens=SP1024_SPLIT), None),   # the demo's
])
def test_the_known_fineweb_data_pairs(data, known):
    """The official pairs: a tokenizer sha256 and its split's token count (no FineWeb here to submit runs on: the
    submissions below run on the stand-in pair)."""
    run = harness.SeedRun("x", dict(fake_summary("x", 1, 1.0), **data), b"", b"")
    assert harness.known_data_pair([run])[0] == known


def test_only_a_known_data_pair_makes_a_record(entry, capsys):
    """8xH100, whole split, 3 significant seeds: a record on the known (stand-in) pair; the same runs on a tokenizer
    no pair knows are a practice record."""
    ids = write_runs(entry, **H100)
    assert submit(*ids, "--date", "2026-04-01") == 0
    folder = entry / RECORD_DIR / "2026-04-01_baseline_9x512_int8_lzma"
    sub, readme = json.loads((folder / "submission.json").read_text()), (folder / "README.md").read_text()
    assert sub["kind"] == "record" and sub["not_a_record_because"] == [] and "**Record.**" in readme
    assert sub["known_data_pair"] == "stand-in sp1024" and "the known FineWeb pair stand-in sp1024." in readme
    assert f"tokenizer sha256 `{STAND_IN_SHA}`, validation shards sha256 `{STAND_IN_VAL_SHA}`" in readme
    assert json.loads((entry / "submission.json").read_text()) == sub
    before = (entry / "submission.json").read_bytes()
    (entry / "other.model").write_bytes(b"another tokenizer")
    other = hashlib.sha256(b"another tokenizer").hexdigest()
    ids = write_runs(entry, prefix="pg2", tokenizer_sha256=other, **H100,
                     hyperparameters={"TOKENIZER_PATH": "other.model", "ITERATIONS": 9})
    assert submit(*ids, "--date", "2026-04-01", "--exclude", "pg_seed1=x", "--exclude", "pg_seed2=x",
                  "--exclude", "pg_seed3=x") == 0
    sub = json.loads((entry / "logs" / "pg2_record" / "submission.json").read_text())
    assert sub["kind"] == "practice record" and sub["known_data_pair"] is None
    assert sub["not_a_record_because"][0] == f"not a known FineWeb tokenizer and validation split: tokenizer sha256 " \
                                             f"{other} is not a known FineWeb tokenizer"
    assert "not a known FineWeb pair." in (entry / "logs" / "pg2_record" / "README.md").read_text()
    assert (entry / "submission.json").read_bytes() == before


def test_a_tokenizer_file_that_contradicts_the_summary_is_refused(entry, capsys):
    """Where the run's tokenizer is on disk, its sha256 is measured, not taken from the summary."""
    (entry / "demo.model").write_bytes(b"the demo tokenizer")
    ids = write_runs(entry, **H100, hyperparameters={"TOKENIZER_PATH": "demo.model"})
    assert submit(*ids, "--date", "2026-04-01") == 1
    err = capsys.readouterr().err
    assert (f"says tokenizer_sha256 {STAND_IN_SHA}, but its files here measure "
            f"{hashlib.sha256(b'the demo tokenizer').hexdigest()}") in err
    assert not (entry / "records").exists()


@pytest.mark.skipif(not (OFFICIAL_TOKENIZERS / "fineweb_1024_bpe.model").is_file(),
                    reason=f"no fineweb_1024_bpe.model in {OFFICIAL_TOKENIZERS} (PGOLF_OFFICIAL_FILES names the folder)")
def test_the_official_tokenizer_on_disk_measures_as_known():
    measured = harness.measure_data(str(OFFICIAL_TOKENIZERS / "fineweb_1024_bpe.model"), None)["tokenizer_sha256"]
    assert measured == SP1024_SHA and harness.KNOWN_DATA_PAIRS[measured]["name"] == "sp1024 fineweb_1024_bpe.model"


def test_validation_shards_are_measured_where_present(entry, capsys):
    """Shards on disk: their sha256 (sorted names, bytes concatenated) and header token counts."""
    data = entry / "shards"
    harness.write_shard(data / "fineweb_val_000001.bin", [1, 5, 6])
    harness.write_shard(data / "fineweb_val_000000.bin", [1, 2, 3, 4])
    harness.write_shard(data / "fineweb_val_bytes_000000.bin", [0, 1, 1, 1])   # a CaseOps byte sidecar: no shard
    harness.write_shard(data / "fineweb_train_000000.bin", STAND_IN_TRAIN)
    digest = hashlib.sha256((data / "fineweb_val_000000.bin").read_bytes()
                            + (data / "fineweb_val_000001.bin").read_bytes()).hexdigest()
    assert harness.measure_data(None, str(data)) == dict(tokenizer_sha256=None, val_shards_sha256=digest,
                                                         val_split_tokens=7)
    ids = write_runs(entry, **H100, hyperparameters={"DATA_PATH": str(data)})
    assert submit(*ids, "--date", "2026-04-01") == 1
    err = capsys.readouterr().err
    assert f"says val_shards_sha256 {STAND_IN_VAL_SHA}, but its files here measure {digest}" in err
    assert f"says val_split_tokens {VAL_TOKENS + 1}, but its files here measure 7" in err


@pytest.mark.parametrize("seeds, bpb, why", [
    ((1,), {}, "1 seed(s): a record needs at least 3"),                    # one seed: no test
    ((1, 2), {}, "2 seed(s): a record needs at least 3"),
    ((1, 2, 3), {1: 1.2, 2: 1.21, 3: 1.19}, "not significant: p = 0.99"),   # worse than the reference
])
def test_runs_without_significance_are_a_non_record_submission(entry, capsys, seeds, bpb, why):
    """On-track, whole split, known data, but no significance: records/track_non_record_16mb/, never the
    top-level submission.json."""
    ids = write_runs(entry, seeds=seeds, summaries={i: fake_summary(f"pg_seed{s}", s, bpb.get(s, BPBS[s]), **H100)
                                                    for i, s in enumerate(seeds)})
    before = (entry / "submission.json").read_bytes()
    assert submit(*ids, "--date", "2026-04-01") == 0
    folder = entry / NON_RECORD_DIR / "2026-04-01_baseline_9x512_int8_lzma"
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["kind"] == "non-record" and why in sub["not_a_record_because"][0] and why in sub["blurb"]
    readme = (folder / "README.md").read_text()
    assert "**Non-record submission.**" in readme and f"- {sub['not_a_record_because'][0]}" in readme
    assert not (entry / RECORD_DIR).exists() and (entry / "submission.json").read_bytes() == before
    assert f"a non-record, not a record ({why}" in capsys.readouterr().out


def test_a_non_record_may_not_go_where_records_go(entry, capsys):
    ids = write_runs(entry, seeds=(1,), **H100)
    assert submit(*ids, "--record-dir", str(RECORD_DIR / "x")) == 1
    err = capsys.readouterr().err
    assert "is under records/" in err and "a non-record may not go" in err and "1 seed(s): a record needs" in err
    assert not (entry / "records").exists()


def test_practice_flag_forces_a_practice_record(entry, capsys):
    """run_8xh100.sh's demo passes --practice: whatever the summaries say, never a record."""
    ids = write_runs(entry, **H100)
    assert submit(*ids, "--practice", "--date", "2026-04-01") == 0
    sub = json.loads((entry / "logs" / "pg_record" / "submission.json").read_text())
    assert sub["kind"] == "practice record" and sub["not_a_record_because"][0].startswith("a practice sweep")
    assert not (entry / "records").exists()


def test_a_practice_sweep_manifest_forces_a_practice_record(entry):
    ids = write_runs(entry, **H100)
    path = entry / "logs" / "pg.sweep.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), practice=True)))
    assert submit(*ids, "--date", "2026-04-01") == 0
    assert not (entry / "records").exists() and (entry / "logs" / "pg_record").is_dir()


# -----------------------------------------------------------------------------
# The sweep: every seed, or none
# -----------------------------------------------------------------------------

def test_a_seed_left_out_of_the_sweep_is_named(entry, capsys):
    """Four seeds ran, three are submitted: refused, naming the fourth."""
    ids = write_runs(entry, seeds=(1, 2, 3, 4), **H100)
    assert submit(*ids[:3], "--date", "2026-04-01") == 1
    assert "run(s) pg_seed4 of sweep logs/pg.sweep.json are left out" in capsys.readouterr().err
    assert not (entry / "records").exists()


def test_a_run_of_the_same_code_outside_the_sweep_is_named(entry, capsys):
    """The manifest rewritten to three seeds: the fourth run's log still names it. And sweep
    shopping: its settings changed in a knob that changes nothing (TRAIN_LOG_EVERY), it is still a run
    of the same code; its summary edited into a re-score is read from its log. Only --exclude with a
    reason, written into the submission, lets it stay out."""
    ids = write_runs(entry, seeds=(1, 2, 3, 4), **H100)
    path = entry / "logs" / "pg.sweep.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), seeds=["1", "2", "3"], run_ids=ids[:3])))
    assert submit(*ids[:3], "--date", "2026-04-01") == 1
    reason = "logs/pg_seed4.txt is a run of the same train_gpt.py that is not in sweep logs/pg.sweep.json"
    assert reason in capsys.readouterr().err
    other = fake_summary("pg_seed4", 4, 1.0, **H100, hyperparameters={"TRAIN_LOG_EVERY": 7})
    (entry / "logs" / "pg_seed4.txt").write_bytes(FAKE_CODE + harness.LOG_SOURCE_END.encode() + log_tail(other))
    edit_summary(entry, "pg_seed4", hyperparameters=dict(other["hyperparameters"], EVAL_ONLY="x.pgolf.xz"))
    assert submit(*ids[:3], "--date", "2026-04-01") == 1
    assert reason in capsys.readouterr().err
    assert submit(*ids[:3], "--date", "2026-04-01", "--exclude", "pg_seed4=a smoke test", "--dry-run") == 0
    assert submit(*ids[:3], "--exclude", "pg_seed1=one of them", "--dry-run") == 1
    assert "--exclude pg_seed1: it is a run of sweep logs/pg.sweep.json" in capsys.readouterr().err


def test_a_rescore_of_the_same_code_is_not_a_run_of_a_sweep(entry):
    ids = write_runs(entry, **H100)
    rescore = fake_summary("rescore", 9, 1.0, **H100, hyperparameters={"EVAL_ONLY": "artifacts/pg_seed1.pgolf.xz"})
    (entry / "logs" / "rescore.txt").write_bytes(FAKE_CODE + harness.LOG_SOURCE_END.encode() + log_tail(rescore))
    assert submit(*ids, "--dry-run") == 0


def test_a_crashed_seed_is_reported(entry, capsys):
    """A seed of the sweep without a summary is named, not dropped; so is an audit-failed one."""
    ids = write_runs(entry, seeds=(1, 2, 3, 4), **H100)
    (entry / "logs" / "pg_seed4.json").unlink()
    assert submit("--sweep", "logs/pg.sweep.json") == 1
    assert "logs/pg_seed4.json is missing: run pg_seed4 did not finish" in capsys.readouterr().err
    write_runs(entry, seeds=(1, 2, 3, 4), summaries={3: fake_summary("pg_seed4", 4, 1.05, **dict(H100, compliance=dict(
        scoring_forward_ok=True, causality_ok=True, rows_independent_ok=True, normalization_ok=True, score_before_update_ok=True,
        one_pass_ok=False, no_train_data_after_deadline=True, all_ok=False)))}, **H100)
    assert submit(*ids) == 1
    assert "seed 4 (pg_seed4) failed the compliance audit: one_pass_ok, all_ok" in capsys.readouterr().err


def test_the_sweep_manifest_is_required(entry, capsys):
    ids = write_runs(entry, manifest=False, **H100)
    assert submit(*ids) == 1
    assert "logs/pg.sweep.json (the sweep manifest run_8xh100.sh writes before the first seed) is missing" in \
        capsys.readouterr().err


def test_submit_takes_every_run_of_the_sweep_manifest(entry):
    write_runs(entry, **H100)
    assert submit("--sweep", "logs/pg.sweep.json", "--date", "2026-04-01") == 0
    sub = json.loads((entry / RECORD_DIR / "2026-04-01_baseline_9x512_int8_lzma" / "submission.json").read_text())
    assert sub["seeds"] == [1, 2, 3] and sub["sweep"]["run_ids"] == ["pg_seed1", "pg_seed2", "pg_seed3"]


def test_the_sweep_command_writes_the_manifest_once(entry, monkeypatch, capsys):
    (entry / "train_gpt.py").write_bytes((REPO_ROOT / "train_gpt.py").read_bytes())
    monkeypatch.setenv("NUM_LAYERS", "3")
    monkeypatch.setenv("SEED", "9")
    assert harness.main(["sweep", "s1", "1", "2", "--practice"]) == 0
    m = json.loads((entry / "logs" / "s1.sweep.json").read_text())
    assert m["run_ids"] == ["s1_seed1", "s1_seed2"] and m["seeds"] == ["1", "2"] and m["practice"] is True
    assert m["code_sha256"] == hashlib.sha256((REPO_ROOT / "train_gpt.py").read_bytes()).hexdigest()
    assert m["settings"]["NUM_LAYERS"] == "3" and "SEED" not in m["settings"]
    assert harness.main(["sweep", "s1", "1"]) == 2
    assert "already exists" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# The summary against its log and its artifact
# -----------------------------------------------------------------------------

EDITS = {
    "its log's headline says val_loss:": dict(val_bpb=1.0),
    "roundtrip_sha256_per_rank": dict(roundtrip_sha256_per_rank=["0" * 64] * 8),
    "is not 8 (world_size) copies": dict(roundtrip_sha256_per_rank=[None]),
    "its log's compliance line": dict(compliance=dict(scoring_forward_ok=True, causality_ok=True, rows_independent_ok=True,
                                                      normalization_ok=True, score_before_update_ok=True, one_pass_ok=True,
                                                      no_train_data_after_deadline=True, all_ok=True, extra=1)),
    "its log's eval_time (80001 ms) is not the summary's eval_time_ms 70000": dict(eval_time_ms=70_000.0),
}


@pytest.mark.parametrize("reason", list(EDITS))
def test_an_edited_summary_is_refused(entry, capsys, reason):
    """The summary's headline, audit and eval time against its log, its per-rank sha256 against the artifact."""
    ids = write_runs(entry, **H100)
    edit_summary(entry, ids[0], as_run=True, **EDITS[reason])    # even with a log that vouches for the edit
    assert submit(*ids, "--date", "2026-04-01") == 1
    err = capsys.readouterr().err
    assert f"seed 1 (pg_seed1)" in err and reason in err, err
    assert not (entry / "records").exists()


def test_a_summary_edited_after_its_run_is_refused(entry, capsys):
    """The log's last line holds the summary's sha256: an edit of a field the log prints nowhere (the byte
    count that sets the significance margin) no longer matches it."""
    ids = write_runs(entry, **H100)
    edit_summary(entry, ids[1], val_bytes=VAL_BYTES // 2)
    assert submit(*ids, "--date", "2026-04-01") == 1
    assert "seed 2 (pg_seed2): its log vouches for a summary with sha256" in capsys.readouterr().err
    assert not (entry / "records").exists()


def test_lines_appended_to_a_log_are_refused(entry, capsys):
    """The review's probe: forged headline, eval_time, compliance and summary lines appended to each log,
    for summaries edited 0.2 bpb lower. The check read the last line of each kind; now each must be one."""
    ids = write_runs(entry, **H100)
    for run_id in ids:
        s = json.loads((entry / "logs" / f"{run_id}.json").read_text())
        s["val_bpb"] -= 0.2
        s["val_loss"] = s["val_bpb"] * math.log(2) * s["val_bytes"] / s["val_tokens"]
        (entry / "logs" / f"{run_id}.json").write_bytes(summary_bytes(s))
        forged = log_tail(s).decode().splitlines()
        with open(entry / "logs" / f"{run_id}.txt", "a") as f:
            f.write("".join(line + "\n" for line in forged if line.startswith(("final_", "eval_time", "compliance",
                                                                               "summary"))))
    assert submit(*ids, "--date", "2026-04-01") == 1
    err = capsys.readouterr().err
    assert "its log has 2 final_<scheme>_roundtrip_exact lines, not one" in err
    assert "its log has 2 'summary: <path> sha256 <hex>' lines, not one" in err
    assert not (entry / "records").exists()


@pytest.mark.parametrize("reason, log_as", [
    ("its log scored", dict(val_tokens=999_999, val_full_split=False)),                # partial validation disguised
    ("its log ran 2 process(es) on cpu; the summary says 8 on cuda", dict(device="cpu", world_size=2)),
    ("its log ran on NVIDIA H100 PCIe; the summary says NVIDIA H100 80GB HBM3", dict(hardware="NVIDIA H100 PCIe")),
    ("its log's data line", dict(tokenizer_sha256="ef" * 32)),                         # another tokenizer in the log
])
def test_a_summary_that_its_log_contradicts_is_refused(entry, capsys, reason, log_as):
    """The review's probes: a run whose log says partial validation, a CPU run, a PCIe card or another
    tokenizer, with a summary (vouched for by the log's last line) that says the whole split on 8xH100 SXM
    with the official sp1024 tokenizer."""
    ids = write_runs(entry, **dict(H100, **log_as))
    says = dict(H100, val_full_split=True, val_tokens=VAL_TOKENS, val_split_tokens=VAL_TOKENS + 1,
                tokenizer_sha256=STAND_IN_SHA)
    for run_id in ids:
        sha = json.loads((entry / "logs" / f"{run_id}.json").read_text())["artifact_sha256"]
        edit_summary(entry, run_id, as_run=True, **dict(says, roundtrip_sha256_per_rank=[sha] * 8))
    assert submit(*ids, "--date", "2026-04-01") == 1
    assert reason in capsys.readouterr().err
    assert not (entry / "records").exists()


def test_a_summary_whose_explicit_settings_its_log_contradicts_is_refused(entry, capsys):
    """The reproduction command sets the settings the summary names as explicit: a summary edited to leave one
    out (a setting that helped, hidden from the command) no longer matches the log's explicit_settings line."""
    ids = write_runs(entry)
    for run_id in ids:
        says = json.loads((entry / "logs" / f"{run_id}.json").read_text())["explicit_settings"]
        edit_summary(entry, run_id, as_run=True, explicit_settings=[k for k in says if k != "NUM_LAYERS"])
    assert submit(*ids, "--date", "2026-04-01") == 1
    assert "its log's explicit settings" in capsys.readouterr().err
    assert not (entry / "records").exists()


def test_a_setting_hidden_from_explicit_settings_is_refused(entry, capsys):
    """Runs with NUM_LAYERS=12 (the preset's default is 9) whose summary and log both leave it out of
    explicit_settings: the record's reproduction command would not set it, so the harness compares every value
    with its preset's default. Dropping the setting from the summary's hyperparameters does not hide it either."""
    ids = write_runs(entry, hyperparameters={"NUM_LAYERS": 12})
    for i, run_id in enumerate(ids):
        summary = json.loads((entry / "logs" / f"{run_id}.json").read_text())
        says = summary["explicit_settings"]
        hidden = [k for k in says if k != "NUM_LAYERS"]
        changes = dict(explicit_settings=hidden)
        if i == 0:
            changes["hyperparameters"] = {k: v for k, v in summary["hyperparameters"].items() if k != "NUM_LAYERS"}
        edit_summary(entry, run_id, as_run=True, **changes)
        log = entry / "logs" / f"{run_id}.txt"
        log.write_text(log.read_text().replace("explicit_settings:" + json.dumps(says), "explicit_settings:" + json.dumps(hidden)))
    assert submit(*ids, "--date", "2026-04-01") == 1
    err = capsys.readouterr().err
    assert "neither PRESET='baseline''s defaults nor in its explicit_settings: NUM_LAYERS=12" in err
    assert "its hyperparameters are not train_gpt.py's settings (missing: ['NUM_LAYERS']" in err
    assert "its log's hyperparameters line is not the summary's hyperparameters" in err
    assert "its log's explicit settings" not in err          # summary and log agree: only the values give it away
    assert not (entry / "records").exists()


def test_the_harness_without_torch_says_so_cleanly(tmp_path):
    """A command that reads train_gpt.py's declarations, where torch cannot be imported: one line naming the
    cause, exit 2 (1 means 'refused'), no traceback."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n            raise ImportError('no torch here')\n"
        "sys.meta_path.insert(0, Block())\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "harness.py"), "settings-table"], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot import it" in proc.stderr and "torch" in proc.stderr


def test_pcie_and_nvl_cards_are_not_the_track(entry):
    assert harness.on_track_hardware(dict(H100, hardware="NVIDIA H100 80GB HBM3"))
    for card in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL"):
        assert not harness.on_track_hardware(dict(H100, hardware=card))


@pytest.mark.parametrize("missing", harness.COMPLIANCE_CHECKS[:-1])
def test_every_compliance_check_is_required_by_name(entry, capsys, missing):
    compliance = {k: True for k in harness.COMPLIANCE_CHECKS if k != missing}
    ids = write_runs(entry, **dict(H100, compliance=compliance))
    assert submit(*ids, "--date", "2026-04-01") == 1
    assert f"failed the compliance audit: {missing} (missing)" in capsys.readouterr().err


def test_a_full_split_claim_must_count_the_whole_split(entry, capsys):
    ids = write_runs(entry, **dict(H100, val_tokens=4095))
    assert submit(*ids) == 1
    assert "says it scored the whole split, but val_tokens 4,095 + 1 is not its val_split_tokens" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# records/ is the repository's, through any path
# -----------------------------------------------------------------------------

def test_a_symlink_into_records_is_seen_through(entry, capsys):
    """RECORD_DIR=logs/link/x with logs/link -> records/track_10min_16mb: the real path decides."""
    ids = write_runs(entry, **dict(H100, val_full_split=False, val_tokens=99_999))
    (entry / RECORD_DIR).mkdir(parents=True)
    os.symlink(entry / RECORD_DIR, entry / "logs" / "link")
    assert submit(*ids, "--record-dir", "logs/link/x") == 1
    err = capsys.readouterr().err
    assert "logs/link/x is under records/" in err and "a practice record may not go" in err and "partial validation" in err
    assert list((entry / RECORD_DIR).iterdir()) == []


def test_records_itself_a_symlink_is_seen_through(entry, capsys, tmp_path_factory):
    """The review's probe E: records/ a link to a folder elsewhere, RECORD_DIR into it by the link's target:
    a partial-validation practice record was written into track_10min_16mb/."""
    ids = write_runs(entry, **dict(H100, val_full_split=False, val_tokens=99_999))
    target = tmp_path_factory.mktemp("real_records")
    (target / "track_10min_16mb").mkdir()
    os.symlink(target, entry / "records")
    assert submit(*ids, "--record-dir", str(target / "track_10min_16mb" / "x")) == 1
    assert "where a practice record may not go" in capsys.readouterr().err
    assert list((target / "track_10min_16mb").iterdir()) == []


def test_a_copy_of_the_code_elsewhere_does_not_move_records(entry, capsys, tmp_path_factory):
    """The review's probe D: --code pointing at a copy outside the repository moved the anchor with it, and
    a 1xH100 practice record was written into the repository's records/track_10min_16mb/."""
    ids = write_runs(entry, **dict(H100, world_size=1, roundtrip_sha256_per_rank=None))
    for i in ids:
        sha = json.loads((entry / "logs" / f"{i}.json").read_text())["artifact_sha256"]
        edit_summary(entry, i, as_run=True, roundtrip_sha256_per_rank=[sha])
    elsewhere = tmp_path_factory.mktemp("copy")
    (elsewhere / "train_gpt.py").write_bytes(FAKE_CODE)
    assert submit(*ids, "--code", str(elsewhere / "train_gpt.py"), "--record-dir", str(entry / RECORD_DIR / "x")) == 1
    assert "where a practice record may not go" in capsys.readouterr().err
    assert not (entry / "records").exists()


PROBE_3 = {1: 1.0572, 2: 1.0575, 3: 1.0569}        # the review's seeds, at sp8192's 3.72 bytes per token
SP8192_BYTES = round(VAL_TOKENS * 3.7217)


def test_a_reference_can_only_add_a_test(entry, capsys):
    """The review's probe 3: seeds 1.0572 / 1.0575 / 1.0569 miss the bar against the published best (p = 0.0426),
    and REFERENCE_BPB="1.06107 1.06108" (two values, no spread) made them a record (p = 0.0039). The published best's
    per-seed values are always the test; REFERENCE_BPB is a second one, that a record must pass too."""
    ids = write_runs(entry, summaries={i: fake_summary(f"pg_seed{s}", s, bpb, val_bytes=SP8192_BYTES, **H100)
                                       for i, (s, bpb) in enumerate(PROBE_3.items())})
    for ref in (harness.DEFAULT_REFERENCE_BPB, [1.06107, 1.06108]):       # the default, then the probe's
        status, sub = harness.submit(ids, reference=ref, dry_run=True)
        assert status == 0 and sub["kind"] == "non-record" and sub["p_value"] == pytest.approx(0.0426, abs=1e-4)
    assert submit(*ids, "--dry-run", "--reference-bpb", "1.06107 1.06108") == 0
    out = capsys.readouterr().out
    assert "vs the published best (mean 1.06108) - margin 0.001938 bpb: t=-2.9195 df=2.291 p=0.0426" in out
    assert "vs REFERENCE_BPB (mean 1.06107) - margin 0.001938 bpb: t=-11.1772 df=2.003 p=0.00393" in out
    status, sub = harness.submit(ids, reference=[1.0, 1.01], dry_run=True)              # a stricter reference
    assert status == 0 and sub["kind"] == "non-record" and sub["p_value"] == pytest.approx(0.0426, abs=1e-4)
    assert sub["user_reference"]["val_bpb"] == [1.0, 1.01] and sub["user_reference"]["p_value"] > 0.9
    assert [why.split(":")[0] for why in sub["not_a_record_because"]] == ["not significant"] * 2
    beaten = write_runs(entry, prefix="ok", hyperparameters={"ITERATIONS": 9}, val_bytes=SP8192_BYTES, **H100)
    probe = dict.fromkeys(ids, "the probe above")
    status, sub = harness.submit(beaten, reference=[1.2, 1.21, 1.22], dry_run=True, exclude=probe)
    assert status == 0 and sub["kind"] == "record" and sub["user_reference"]["p_value"] < 0.01   # ~1.051: beats both
    status, sub = harness.submit(beaten, reference=[1.05, 1.051, 1.052], dry_run=True, exclude=probe)
    assert status == 0 and sub["kind"] == "non-record" and sub["p_value"] < 0.01         # a stricter one not beaten
    assert sub["not_a_record_because"] == [f"not significant: p = {sub['user_reference']['p_value']:.3g} for beating "
                                           "REFERENCE_BPB by 0.005 nats (needs p < 0.01)"]


def test_records_is_anchored_to_the_code_not_the_working_directory(entry, capsys, monkeypatch):
    """Run from elsewhere, --record-dir into the repository's records/ is still records/."""
    ids = write_runs(entry, **dict(H100, world_size=1))
    for i in ids:
        edit_summary(entry, i, as_run=True, artifact_path=str(entry / "artifacts" / f"{i}.pgolf.xz"))
    elsewhere = entry / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert submit(*ids, "--logs", str(entry / "logs"), "--code", str(entry / "train_gpt.py"), "--requirements",
                  str(entry / "requirements.txt"), "--record-dir", str(entry / RECORD_DIR / "x")) == 1
    assert "is under records/" in capsys.readouterr().err
    assert not (entry / "records").exists()
    assert submit(*ids, "--logs", str(entry / "logs"), "--code", str(entry / "train_gpt.py"), "--requirements",
                  str(entry / "requirements.txt"), "--date", "2026-04-01") == 0       # a practice record, under logs/
    assert (entry / "logs" / "pg_record").is_dir() and not (entry / "records").exists()


# -----------------------------------------------------------------------------
# The rehearsal's MFU
# -----------------------------------------------------------------------------

def rehearsal_summary(**overrides):
    s = fake_summary("r", 1, 1.05, world_size=1, device="cuda", hardware="NVIDIA H100 80GB HBM3", tokens_per_s=1e6,
                     flops_per_token=3e9, train_time_ms=120_000.0, wall_ms=200_000.0, step_avg_ms=500.0,
                     stage_ms={"train": 120_000.0}, train_flops=2.5e17)
    s.update(overrides)
    return s


def test_rehearsal_mfu_counts_the_flops_the_steps_ran():
    """train_flops / (train seconds x GPUs x 989e12), not flops_per_token (recurrence on) x tokens."""
    s = rehearsal_summary()
    report = harness.rehearsal_report(s)
    assert report["mfu"] == pytest.approx(2.5e17 / (120.0 * 1 * 989e12), rel=1e-12)
    assert report["mfu"] != pytest.approx(3e9 * 1e6 / 989e12, rel=1e-3)
    assert harness.rehearsal_report(dict(s, world_size=8, train_flops=8 * 2.5e17))["mfu"] == pytest.approx(
        report["mfu"], rel=1e-12)
    assert harness.rehearsal_report(dict(s, train_flops=None))["mfu"] is None
    assert harness.rehearsal_report({k: v for k, v in s.items() if k != "train_flops"})["mfu"] is None


# -----------------------------------------------------------------------------
# requirements.txt
# -----------------------------------------------------------------------------

def test_requirements_have_floors_not_pins():
    """`pip install -r` must not replace a GPU box's torch (its flash-attn wheel is built for it)."""
    lines = [line.split("#")[0].strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    reqs = {re.split(r"[<>=!~ \[]", line)[0]: line for line in lines if line}
    assert set(reqs) >= {"torch", "numpy", "sentencepiece"}
    assert all("==" not in line for line in reqs.values()), reqs
    assert re.fullmatch(r"torch>=2\.(\d+)", reqs["torch"]) and int(reqs["torch"].split(".")[1]) >= 5


def test_a_run_of_other_readable_code_or_another_shipped_size_is_refused(entry, capsys):
    """The record holds the shipped form of the readable train_gpt.py: a run that counted other code bytes,
    or recorded another readable source, did not run it."""
    ids = write_runs(entry, summaries={0: fake_summary("pg_seed1", 1, 1.05, code_readable_sha256="0" * 64),
                                       1: fake_summary("pg_seed2", 2, 1.05, bytes_code=len(FAKE_CODE))})
    assert submit(*ids, "--record-dir", "rec") == 1
    err = capsys.readouterr().err
    assert f"seed 1 (pg_seed1) ran a readable source of sha256 {'0' * 64}, not train_gpt.py's" in err
    assert f"seed 2 (pg_seed2) counted {len(FAKE_CODE)} code bytes; the shipped form of train_gpt.py is {len(SHIPPED)}" in err


def test_a_log_of_the_shipped_code_is_a_log_of_this_code(entry):
    """A run started from the shipped file logs the code it unpacks to (comments and docstrings gone)."""
    ids = write_runs(entry)
    unpacked = harness._ship_code_module().unpack_shipped(SHIPPED)[0]
    for i in ids:
        log = entry / "logs" / f"{i}.txt"
        log.write_bytes(unpacked + log.read_bytes()[len(FAKE_CODE):])
    assert submit(*ids, "--record-dir", "rec") == 0


# -----------------------------------------------------------------------------
# Validation documents in the training data (train_val_overlap): the windows rule against a brute-force search
# -----------------------------------------------------------------------------

def documents_in(val: np.ndarray, train: np.ndarray) -> list[int]:
    """The validation documents every k-token window of whose body occurs in `train`, by brute force: each window
    looked for at every offset."""
    k, text = harness.OVERLAP_WINDOW, train.tolist()
    grams = {tuple(text[i:i + k]) for i in range(len(text) - k + 1)}
    starts = np.flatnonzero(val == harness.BOS_ID).tolist() + [len(val)]
    found = []
    for d, (b, e) in enumerate(zip(starts, starts[1:])):
        body = val[b + 1:e].tolist()
        windows = [tuple(body[i:i + k]) for i in range(0, len(body) - k + 1, k)]
        if windows and all(w in grams for w in windows):
            found.append(d)
    return found


@pytest.mark.parametrize("case", ["disjoint", "copies", "without_bos", "inside_documents", "one_token_changed",
                                  "across_shards"])
def test_validation_documents_found_in_training_shards(tmp_path, case):
    """Copies at BOS boundaries, without any BOS, pasted inside longer training documents, a window split over two
    shards (an empty one between them): found; a document with one token changed in one window: not found; each as
    the brute force finds."""
    rng = np.random.default_rng(3)
    val, train = STAND_IN_VAL, STAND_IN_TRAIN
    starts = np.flatnonzero(val == harness.BOS_ID).tolist() + [val.size]
    docs = [val[b:e] for b, e in zip(starts, starts[1:])]
    if case == "copies":
        train = np.concatenate([train[:5000], *docs[:10], train[5000:]])
    elif case == "without_bos":
        train = np.concatenate([train, *[d[1:] for d in docs[10:20]]])
    elif case == "inside_documents":
        train = np.concatenate([train[:7], docs[3][1:], rng.integers(4, 1024, 5), docs[4][1:], train[7:]])
    elif case == "one_token_changed":
        changed = docs[5].copy()
        changed[5] = 3                                     # in its first window
        train = np.concatenate([train, changed, docs[6]])
    shards = [train] if case != "across_shards" else [train[:200], docs[7][:30], [], docs[7][30:], train[200:]]
    files = []
    for i, tokens in enumerate(shards):
        harness.write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", tokens)
        files.append(tmp_path / f"fineweb_train_{i:06d}.bin")
    harness.write_shard(tmp_path / "fineweb_val_000000.bin", val)
    o = harness.train_val_overlap([tmp_path / "fineweb_val_000000.bin"], files)
    expected = documents_in(val, np.concatenate(shards))
    assert o["found_docs"] == expected
    assert expected == {"disjoint": [], "copies": list(range(10)), "without_bos": list(range(10, 20)),
                        "inside_documents": [3, 4], "one_token_changed": [6], "across_shards": [7]}[case]
    assert o["train_sha256"] == [hashlib.sha256((tmp_path / f.name).read_bytes()).hexdigest() for f in files]
    assert o["docs"] == len(docs) and o["windows"] == sum((len(d) - 1) // 32 for d in docs)


def test_the_overlap_command(tmp_path, capsys):
    """`overlap DATA_PATH`: what check will find in a data folder, before any run; exit 1 on a document found."""
    harness.write_shard(tmp_path / "fineweb_val_000000.bin", STAND_IN_VAL)
    harness.write_shard(tmp_path / "fineweb_train_000000.bin", STAND_IN_TRAIN)
    harness.write_shard(tmp_path / "fineweb_train_000001.bin", STAND_IN_VAL)
    assert harness.main(["overlap", str(tmp_path), "--shards", "1"]) == 0
    assert "against 1 training shard(s) (20,000 tokens)" in capsys.readouterr().out
    assert harness.main(["overlap", str(tmp_path)]) == 1
    docs = STAND_IN_VAL.tolist().count(harness.BOS_ID)
    assert f"{docs - 1:,} documents found in them (the first at validation token 0)" in capsys.readouterr().out
