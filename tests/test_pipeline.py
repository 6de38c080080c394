"""End to end: train_gpt.py run as a program (torchrun with 2 gloo ranks, and single process) on the
demo dataset, in temporary working directories. Runs are shared between tests (module fixtures)."""

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
import sentencepiece as spm

import train_gpt

TRAIN_GPT = Path(__file__).resolve().parents[1] / "train_gpt.py"
TINY_RUN = {"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "64",
            "TRAIN_BATCH_TOKENS": "4096", "ITERATIONS": "8", "MAX_WALLCLOCK_SECONDS": "0", "VAL_LOSS_EVERY": "0",
            "EVAL_STRIDE": "32", "LZMA_PRESET": "6"}
REQUIRED_KEYS = ["run_id", "seed", "world_size", "device", "steps", "train_time_ms", "step_avg_ms", "tokens_per_s",
                 "stopped_early", "val_loss", "val_bpb", "val_tokens", "val_bytes", "pre_quant_val_loss",
                 "pre_quant_val_bpb", "roundtrip_val_loss", "roundtrip_val_bpb", "bytes_model", "bytes_code",
                 "bytes_total", "artifact_path", "artifact_sha256", "eval_time_ms", "hyperparameters"]
TORCHRUN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID"}


def run_train(cwd, demo, extra=None, nproc=1, **settings):
    """Run train_gpt.py in `cwd` on the demo data with the tiny config (+ settings); CompletedProcess."""
    env = {k: v for k, v in os.environ.items()
           if k not in train_gpt.SETTINGS and k not in train_gpt.REPLACED_SETTINGS and k not in TORCHRUN_VARS}
    env.update(TINY_RUN, DATA_PATH=str(demo["dir"]), TOKENIZER_PATH=str(demo["tokenizer"]), VOCAB_SIZE=str(demo["vocab"]))
    env.update({k: str(v) for k, v in settings.items()})
    env.update(extra or {})
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN_GPT)]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(TRAIN_GPT)]
    Path(cwd).mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def succeeded(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return proc


def summary(cwd, run_id):
    return json.loads((Path(cwd) / "logs" / f"{run_id}.json").read_text())


def digests(directory):
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def val_stream(demo):
    """The validation tokens, read by hand from the shard."""
    raw = Path(demo["val_shards"][0][0]).read_bytes()
    return np.frombuffer(raw[1024:], dtype="<u2").astype(np.int64)


@pytest.fixture(scope="module")
def dist_run(demo_data, tmp_path_factory):
    """2 gloo ranks under torchrun; NUM_LAYER is a deliberate typo (must be warned about, not applied)."""
    cwd = tmp_path_factory.mktemp("dist")
    proc = succeeded(run_train(cwd, demo_data, nproc=2, RUN_ID="dist", NUM_LAYER="3"))
    return cwd, proc, summary(cwd, "dist")


@pytest.fixture(scope="module")
def single_runs(demo_data, tmp_path_factory):
    """Two identical single-process runs, different RUN_IDs and working directories."""
    runs = []
    for run_id in ("one", "two"):
        cwd = tmp_path_factory.mktemp(run_id)
        proc = succeeded(run_train(cwd, demo_data, RUN_ID=run_id))
        runs.append((cwd, proc, summary(cwd, run_id)))
    return runs


def test_distributed_run_summary(dist_run, demo_data):
    cwd, proc, s = dist_run
    missing = [k for k in REQUIRED_KEYS if k not in s]
    assert not missing, f"summary lacks {missing}"
    assert (s["run_id"], s["seed"], s["world_size"], s["device"], s["steps"], s["stopped_early"]) == \
        ("dist", 1337, 2, "cpu", 8, False)
    assert s["hyperparameters"] == {**s["hyperparameters"], "NUM_LAYERS": 2, "MODEL_DIM": 64, "EVAL_STRIDE": 32,
                                    "VOCAB_SIZE": demo_data["vocab"]}
    assert set(s["hyperparameters"]) == set(train_gpt.SETTINGS)
    assert s["train_time_ms"] > 0 and s["eval_time_ms"] > 0 and s["tokens_per_s"] > 0
    assert s["step_avg_ms"] == pytest.approx(s["train_time_ms"] / s["steps"])
    assert s["tokens_per_s"] == pytest.approx(8 * 4096 / (s["train_time_ms"] / 1e3), rel=1e-9)


def test_both_ranks_loaded_the_same_weights(dist_run):
    _, _, s = dist_run
    for key in ("roundtrip_probe_nll_per_rank", "roundtrip_state_sha256_per_rank", "roundtrip_sha256_per_rank"):
        assert len(s[key]) == 2 and s[key][0] == s[key][1], key
    assert s["roundtrip_sha256_per_rank"][0] == s["artifact_sha256"]
    assert math.isfinite(s["roundtrip_probe_nll_per_rank"][0])


def test_bytes_and_artifact(dist_run):
    cwd, _, s = dist_run
    artifact = Path(cwd) / s["artifact_path"]
    assert s["bytes_code"] == TRAIN_GPT.stat().st_size
    assert s["bytes_model"] == artifact.stat().st_size
    assert s["bytes_total"] == s["bytes_model"] + s["bytes_code"]
    assert s["artifact_sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert artifact.read_bytes()[:6] == b"\xfd7zXZ\x00"                            # an xz stream
    assert [p.name for p in (Path(cwd) / "artifacts").iterdir()] == [artifact.name]


def test_val_tokens_bytes_and_bpb(dist_run, demo_data):
    _, _, s = dist_run
    tokens = val_stream(demo_data)
    assert s["val_tokens"] == tokens.size - 1 == demo_data["val_tokens"] - 1
    sp = spm.SentencePieceProcessor(model_file=str(demo_data["tokenizer"]))
    starts = np.flatnonzero(tokens == sp.bos_id())
    docs = [tokens[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [tokens.size])]
    assert s["val_bytes"] == sum(len(sp.decode(d).encode("utf-8")) for d in docs)
    assert s["val_bpb"] == pytest.approx(s["val_loss"] * s["val_tokens"] / (math.log(2) * s["val_bytes"]), rel=1e-12)
    assert s["pre_quant_val_bpb"] == pytest.approx(
        s["pre_quant_val_loss"] * s["val_tokens"] / (math.log(2) * s["val_bytes"]), rel=1e-12)
    assert (s["roundtrip_val_loss"], s["roundtrip_val_bpb"]) == (s["val_loss"], s["val_bpb"])
    assert s["val_loss"] == pytest.approx(s["pre_quant_val_loss"], rel=1e-2)     # int8 costs little
    assert s["val_loss"] < math.log(demo_data["vocab"])                           # it learned something


def test_text_log(dist_run):
    cwd, proc, s = dist_run
    text = (Path(cwd) / "logs" / "dist.txt").read_text(encoding="utf-8")
    assert text.startswith(TRAIN_GPT.read_text(encoding="utf-8"))
    lines = re.findall(r"^final_int8_lzma_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)$", text, re.M)
    assert len(lines) == 1
    assert abs(float(lines[0][0]) - s["val_loss"]) <= 1e-8 and abs(float(lines[0][1]) - s["val_bpb"]) <= 1e-8
    assert re.search(r"^step:8/8 train_loss:\S+ train_time:", text, re.M)
    assert f"Total submission size int8+lzma: {s['bytes_total']} bytes" in text
    warning = "warning: NUM_LAYER is not a setting; did you mean NUM_LAYERS?"
    assert warning in text and warning in proc.stdout
    assert proc.stdout.count("final_int8_lzma_roundtrip_exact") == 1             # rank 0 alone prints


def test_world_size_does_not_change_the_result(dist_run, single_runs):
    """Same global batch (grad accumulation 8 // world): 1 and 2 ranks train the same model."""
    _, _, two = dist_run
    _, _, one = single_runs[0]
    assert one["world_size"] == 1 and one["steps"] == two["steps"]
    assert one["val_tokens"] == two["val_tokens"] and one["val_bytes"] == two["val_bytes"]
    assert one["pre_quant_val_loss"] == pytest.approx(two["pre_quant_val_loss"], rel=1e-5)
    assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-5)


def test_identical_runs_give_identical_artifacts(single_runs):
    (cwd1, _, s1), (cwd2, _, s2) = single_runs
    assert s1["run_id"] != s2["run_id"]
    assert s1["artifact_sha256"] == s2["artifact_sha256"]
    assert (Path(cwd1) / s1["artifact_path"]).read_bytes() == (Path(cwd2) / s2["artifact_path"]).read_bytes()
    assert (s1["val_loss"], s1["val_bpb"]) == (s2["val_loss"], s2["val_bpb"])


def test_over_budget_fails_cleanly_and_writes_no_artifact(demo_data, single_runs, tmp_path):
    bytes_model = single_runs[0][2]["bytes_model"]             # the same model, packed by a successful run
    proc = run_train(tmp_path, demo_data, RUN_ID="budget", ARTIFACT_BUDGET_BYTES=1000)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert str(TRAIN_GPT.stat().st_size) in proc.stderr and str(bytes_model) in proc.stderr
    assert "ARTIFACT_BUDGET_BYTES" in proc.stderr
    assert not list(tmp_path.glob("artifacts/*"))
    assert not (tmp_path / "logs" / "budget.json").exists()


def test_missing_data_path_fails_cleanly(demo_data, tmp_path):
    nowhere = tmp_path / "no_such_dir"
    proc = run_train(tmp_path, demo_data, RUN_ID="nodata", DATA_PATH=nowhere)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert os.path.join(str(nowhere), "fineweb_train_*.bin") in proc.stderr


def test_rerun_with_existing_run_id_changes_nothing(demo_data, single_runs):
    cwd, _, s = single_runs[0]
    before = digests(cwd)
    assert "logs/one.txt" in before and "logs/one.json" in before and s["artifact_path"] in before
    proc = run_train(cwd, demo_data, RUN_ID="one")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "one.txt" in proc.stderr and "RUN_ID" in proc.stderr
    assert digests(cwd) == before
