"""End to end: `run_8xh100.sh` with NPROC=2 (CPU, gloo), three seeds and a tiny configuration on the
demo data, in a temporary copy of the entry, assembling into a temporary RECORD_DIR.

Every file of the record is checked against what the runs wrote, every statistic is recomputed with
numpy from the per-seed JSON summaries (the p-value by numerical integration of the t density, not
the harness's incomplete beta), and the record's README commands are run: the reproduction command
must resolve to the runs' settings, and the EVAL_ONLY re-score, run from inside the record folder
with the copied train_gpt.py, must reproduce the seed's val_bpb and NLL dump.
"""

import datetime
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_gpt
from test_harness import t_cdf_by_integration

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_FILES = ["train_gpt.py", "run_8xh100.sh", "requirements.txt", "submission.json", "tools/__init__.py",
               "tools/harness.py"]
TINY = {"NUM_LAYERS": "2", "RECUR_LAYERS": "0-0", "PARALLEL_LAST_N": "1", "MODEL_DIM": "64", "NUM_HEADS": "4",
        "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "4096", "ITERATIONS": "8",
        "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0", "EVAL_STRIDE": "32", "VAL_MAX_TOKENS": "4096",
        "VAL_BATCH_SIZE": "8192", "LZMA_PRESET": "6", "GPTQ_CALIB_SEQS": "2", "GPTQ_CALIB_LEN": "32",
        "TTT_CHUNK_TOKENS": "1024", "TTT_EPOCHS": "1"}
KNOBS = {"AUTHOR": "Test Author", "GITHUB_ID": "test-id", "SUBMISSION_NAME": "Tiny three seeds",
         "REFERENCE_BPB": "3.70 3.72 3.71"}
SEEDS = (1, 2, 3)
TORCHRUN = f"{sys.executable} -m torch.distributed.run"
LAUNCH_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
               "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SEEDS", "NPROC", "TORCHRUN",
               "RECORD_DIR", "REFERENCE_BPB", "SUBMISSION_NAME", "AUTHOR", "GITHUB_ID"}


def clean_env(**extra):
    """The caller's environment without any setting or launcher variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in train_gpt.SETTINGS and k not in LAUNCH_VARS
           and k not in train_gpt.REPLACED_SETTINGS}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def copy_entry(dest: Path) -> Path:
    for rel in ENTRY_FILES:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, dest / rel)
    return dest


def digests(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def utc_today():
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def launch(root, demo, timeout=600, **extra):
    env = clean_env(**TINY, DATA_PATH=str(demo["dir"]), TOKENIZER_PATH=str(demo["tokenizer"]),
                    VOCAB_SIZE=str(demo["vocab"]), NPROC="2", TORCHRUN=TORCHRUN, **extra)
    return subprocess.run(["bash", "run_8xh100.sh"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def three_seeds(demo_data, tmp_path_factory):
    """Run the launcher once; snapshot what it wrote before any test touches the record folder."""
    root = copy_entry(tmp_path_factory.mktemp("entry"))
    record = tmp_path_factory.mktemp("out") / "record"
    top_level = (root / "submission.json").read_bytes()
    dates = {utc_today()}
    proc = launch(root, demo_data, SEEDS=" ".join(map(str, SEEDS)), RUN_ID="e2e", RECORD_DIR=str(record),
                  NLL_DUMP="dump.npz", **KNOBS)
    dates.add(utc_today())
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    summaries = [json.loads((root / "logs" / f"e2e_seed{s}.json").read_text()) for s in SEEDS]
    return dict(root=root, record=record, proc=proc, summaries=summaries, dates=dates, top_level=top_level,
                files=digests(record), submission=json.loads((record / "submission.json").read_text()),
                readme=(record / "README.md").read_text())


def test_every_file_of_the_record(three_seeds):
    root, files = three_seeds["root"], three_seeds["files"]
    logs = [f"e2e_seed{s}.{ext}" for s in SEEDS for ext in ("txt", "json")]
    assert sorted(files) == sorted(["README.md", "submission.json", "train_gpt.py", "requirements.txt"] + logs)
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
    assert files["train_gpt.py"] == sha(root / "train_gpt.py")
    assert files["requirements.txt"] == sha(root / "requirements.txt")
    for name in logs:
        assert files[name] == sha(root / "logs" / name)
    code = (root / "train_gpt.py").read_text()
    for s in SEEDS:  # the copy is the source each run logged
        assert (root / "logs" / f"e2e_seed{s}.txt").read_text().startswith(code + "=" * 100 + "\n")


def test_each_seed_ran_with_the_audit_and_its_own_seed(three_seeds):
    for seed, s in zip(SEEDS, three_seeds["summaries"]):
        assert (s["seed"], s["run_id"], s["world_size"], s["eval_only"]) == (seed, f"e2e_seed{seed}", 2, False)
        assert s["hyperparameters"]["EVAL_AUDIT"] == 1 and s["compliance"]["all_ok"] is True
        assert s["hyperparameters"]["NUM_LAYERS"] == 2 and s["val_tokens"] == 4095
        assert s["ttt"] is True and s["compliance"]["ttt_updates"] == 3        # the default: TTT on
    assert len({s["val_bpb"] for s in three_seeds["summaries"]}) == 3   # different seeds, different models


def test_nll_dump_is_written_per_seed(three_seeds):
    for s in three_seeds["summaries"]:
        assert s["nll_dump"] == f"dump_seed{s['seed']}.npz"
        d = np.load(three_seeds["root"] / s["nll_dump"])
        assert d["nll"].sum() / (math.log(2) * d["bytes"].sum()) == pytest.approx(s["val_bpb"], rel=1e-12)


def test_every_statistic_recomputed_from_the_summaries(three_seeds):
    sub, summaries = three_seeds["submission"], three_seeds["summaries"]
    bpb = np.array([s["val_bpb"] for s in summaries], dtype=np.float64)
    loss = np.array([s["val_loss"] for s in summaries], dtype=np.float64)
    ref = np.array([3.70, 3.72, 3.71])
    margin = 0.005 / math.log(2) * summaries[0]["val_tokens"] / summaries[0]["val_bytes"]
    va, vb = bpb.var(ddof=1) / 3, ref.var(ddof=1) / 3
    t = (bpb.mean() - ref.mean() + margin) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    assert sub["val_bpb"] == pytest.approx(bpb.mean(), rel=1e-14)
    assert sub["val_loss"] == pytest.approx(loss.mean(), rel=1e-14)
    assert sub["val_bpb_std"] == pytest.approx(bpb.std(ddof=1), rel=1e-12)
    assert sub["val_loss_std"] == pytest.approx(loss.std(ddof=1), rel=1e-12)
    assert sub["margin_bpb"] == pytest.approx(margin, rel=1e-14)
    assert sub["t_statistic"] == pytest.approx(t, rel=1e-12)
    assert sub["welch_df"] == pytest.approx(df, rel=1e-12)
    assert sub["p_value"] == pytest.approx(t_cdf_by_integration(t, df), abs=1e-8)
    assert sub["reference_val_bpb"] == list(ref)
    assert sub["bytes_total"] == max(s["bytes_total"] for s in summaries)
    assert sub["bytes_code"] == summaries[0]["bytes_code"] == (three_seeds["root"] / "train_gpt.py").stat().st_size
    assert sub["seeds"] == list(SEEDS)
    for s in summaries:
        assert sub["seed_results"][str(s["seed"])] == dict(
            val_loss=s["val_loss"], val_bpb=s["val_bpb"], artifact_bytes=s["bytes_total"], steps=s["steps"],
            step_avg_ms=s["step_avg_ms"], eval_time_s=s["eval_time_ms"] / 1e3, train_time_s=s["train_time_ms"] / 1e3,
            run_id=s["run_id"], artifact_sha256=s["artifact_sha256"])


def test_submission_fields(three_seeds):
    sub, s0 = three_seeds["submission"], three_seeds["summaries"][0]
    for field in ["author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "bytes_total", "bytes_code",
                  "track", "seeds", "seed_results", "val_bpb_std", "hardware", "pytorch_version", "t_statistic",
                  "welch_df", "p_value", "technique_summary"]:
        assert field in sub, field
    assert (sub["author"], sub["github_id"], sub["name"]) == ("Test Author", "test-id", "Tiny three seeds")
    assert sub["date"] in three_seeds["dates"] and sub["track"] == "10min_16mb"
    assert sub["hardware"] == f"{s0['hardware']} (cpu, 2 processes)"
    assert sub["pytorch_version"] == s0["torch_version"] and sub["cuda_version"] == s0["cuda_version"]
    assert sub["on_track_hardware"] is False and "practice record" in sub["blurb"]
    assert "2 layers x 64" in sub["technique_summary"] and "stride 32" in sub["technique_summary"]
    # VAL_MAX_TOKENS: a partial validation, which the record says (and records/ would refuse)
    assert sub["val_full_split"] is False and "Partial validation: scored the first 4,096 of" in sub["blurb"]
    assert "**Partial validation.**" in three_seeds["readme"]


def test_nothing_written_outside_the_record(three_seeds):
    root = three_seeds["root"]
    assert (root / "submission.json").read_bytes() == three_seeds["top_level"]
    assert not (root / "records").exists()
    assert not any(p.name.endswith("_record") for p in (root / "logs").iterdir())
    out = three_seeds["proc"].stdout
    assert f"mean val_bpb {three_seeds['submission']['val_bpb']:.8f}" in out
    assert f"submit: wrote {three_seeds['record']}/" in out


def test_readme_table_and_reproduction_command(three_seeds):
    readme, summaries = three_seeds["readme"], three_seeds["summaries"]
    for s in summaries:
        assert f"| {s['seed']} | `{s['run_id']}` | {s['val_bpb']:.8f} | {s['val_loss']:.8f} |" in readme
    command = next(line for line in readme.splitlines() if line.startswith('SEEDS="1 2 3" '))
    words = shlex.split(command)
    assert words[-2:] == ["bash", "run_8xh100.sh"]
    env = dict(word.split("=", 1) for word in words[:-2])
    assert env.pop("SEEDS") == "1 2 3" and env.pop("NPROC") == "2"
    for s in summaries:   # with what the launcher sets per seed, the settings resolve to exactly what each seed ran
        per_seed = dict(SEED=str(s["seed"]), RUN_ID=s["run_id"], EVAL_AUDIT="1", NLL_DUMP=s["nll_dump"])
        hp = train_gpt.read_settings(dict(env, **per_seed))[0]
        assert hp.as_dict() == s["hyperparameters"]


def test_eval_only_from_inside_the_record_folder_reproduces_val_bpb(three_seeds):
    record, s = three_seeds["record"], three_seeds["summaries"][1]
    lines = three_seeds["readme"].splitlines()
    start = lines.index(f"Seed {s['seed']} (val_bpb {s['val_bpb']:.8f}):")
    block = lines[start + 3:lines.index("```", start + 3)]
    assert block[0].startswith("echo ") and "sha256sum -c" in block[0]
    assert block[1].startswith("EVAL_ONLY=") and block[1].endswith("torchrun --standalone --nproc_per_node=2 train_gpt.py")
    script = "\n".join(block).replace("torchrun --standalone", f"{TORCHRUN} --standalone")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=record, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().splitlines()[-1] == f"{s['val_bpb']:.8f}"        # the README's NLL-dump check
    rescore = json.loads((record / "logs" / f"rescore_{s['run_id']}.json").read_text())
    assert rescore["eval_only"] is True and rescore["artifact_sha256"] == s["artifact_sha256"]
    assert rescore["val_bpb"] == pytest.approx(s["val_bpb"], rel=1e-12)
    assert rescore["bytes_code"] == s["bytes_code"] and rescore["compliance"]["all_ok"] is True
    dump = np.load(record / f"rescore_{s['run_id']}.npz")
    assert dump["nll"].dtype == np.float64 and dump["nll"].size == s["val_tokens"]
    assert dump["nll"].sum() / (math.log(2) * dump["bytes"].sum()) == pytest.approx(s["val_bpb"], rel=1e-12)


def test_a_failed_seed_stops_the_script_with_its_log(demo_data, tmp_path):
    root = copy_entry(tmp_path / "entry")
    proc = launch(root, demo_data, SEEDS="1 2", RUN_ID="fail", ARTIFACT_BUDGET_BYTES="1000",
                  RECORD_DIR=str(tmp_path / "record"))
    assert proc.returncode == 1
    assert "run_8xh100.sh: seed 1 failed; last lines of logs/fail_seed1.txt:" in proc.stderr
    last = [line for line in (root / "logs" / "fail_seed1.txt").read_text().splitlines() if line.strip()][-1]
    assert last in proc.stderr
    assert not list((root / "logs").glob("fail_seed2*")) and not (tmp_path / "record").exists()


def test_an_existing_record_dir_is_refused_before_any_training(demo_data, tmp_path):
    root = copy_entry(tmp_path / "entry")
    (tmp_path / "record").mkdir()
    proc = launch(root, demo_data, timeout=60, SEEDS="1", RECORD_DIR=str(tmp_path / "record"))
    assert proc.returncode == 1 and "already exists; a record is never overwritten" in proc.stderr
    assert not (root / "logs").exists()
