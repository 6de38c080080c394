"""The one-GPU rehearsal (tools/gpu_rehearsal.sh, issue 10), its plumbing on the CPU: it runs the pipeline
once and prints one JSON of what the run measured; without a GPU it refuses unless told to run anyway."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt
from test_pipeline import TINY_RUN, TORCHRUN_VARS

REPO = Path(__file__).resolve().parents[1]
REPORT_KEYS = {"step_ms", "tokens_per_s", "mfu", "peak_memory_mib", "compile_s", "compile", "stage_s", "wall_s",
               "implied_8xh100_step_ms", "implied_8xh100_steps_in_600s", "projected_8xh100_step_ms", "eval_time_s",
               "attention", "compute_dtype", "hardware", "shape", "bytes_total", "val_bpb", "compliance_all_ok"}


def rehearsal_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in train_gpt.SETTINGS and k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", TORCHRUN=f"{sys.executable} -m torch.distributed.run", **extra)
    return env


def test_without_a_gpu_the_rehearsal_refuses_in_seconds(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_rehearsal.sh")], cwd=tmp_path, env=rehearsal_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_the_rehearsal_runs_the_pipeline_and_reports_one_json(demo_data, tmp_path):
    """At a tiny shape on 1 CPU process, in a copy of the entry: the report's figures are the run summary's."""
    for rel in ("train_gpt.py", "tools/__init__.py", "tools/harness.py", "tools/gpu_rehearsal.sh"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, tmp_path / rel)
    run_id = "plumbing"
    settings = dict(TINY_RUN, DATA_PATH=str(demo_data["dir"]), TOKENIZER_PATH=str(demo_data["tokenizer"]),
                    VOCAB_SIZE=str(demo_data["vocab"]), RUN_ID=run_id)
    proc = subprocess.run(["bash", "tools/gpu_rehearsal.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=rehearsal_env(REHEARSAL_ALLOW_CPU="1", REHEARSAL_TRAIN_SECONDS="0", **settings))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    summary = json.loads((tmp_path / "logs" / f"{run_id}.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert summary["hyperparameters"]["EVAL_AUDIT"] == 1 and summary["world_size"] == 1
    assert report["step_ms"] == summary["step_avg_ms"] and report["implied_8xh100_step_ms"] == summary["step_avg_ms"] / 8
    assert report["mfu"] == summary["flops_per_token"] * summary["tokens_per_s"] / 989e12
    assert report["stage_s"]["train"] == round(summary["stage_ms"]["train"] / 1e3, 2)
    assert report["compliance_all_ok"] is True and report["attention"] == "sdpa"
