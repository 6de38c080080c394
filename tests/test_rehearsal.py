"""The one-GPU rehearsal (tools/gpu_rehearsal.sh), its plumbing on the CPU: it runs the pipeline
once and prints one JSON of what the run measured; without a GPU it refuses unless told to run anyway."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt
from _helpers import time_limit
from test_pipeline import TINY_RUN, TORCHRUN_VARS

REPO = Path(__file__).resolve().parents[1]
REPORT_KEYS = {"step_ms", "tokens_per_s", "mfu", "peak_memory_mib", "compile_s", "compile", "stage_s", "wall_s",
               "implied_8xh100_step_ms", "implied_8xh100_steps_in_600s", "projected_8xh100_step_ms", "eval_time_s",
               "attention", "compute_dtype", "hardware", "shape", "bytes_total", "val_bpb", "compliance_all_ok"}
# A limit for hangs only (time_limit, tests/_helpers.py): the rehearsal's tiny CPU run took 22 s, its refusals 2-4 s.
REHEARSAL_TIMEOUT_S = time_limit(22)


def rehearsal_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in train_gpt.SETTINGS and k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", TORCHRUN=f"{sys.executable} -m torch.distributed.run", **extra)
    return env


def copy_rehearsal(dest: Path) -> Path:
    """The files the rehearsal needs, copied to `dest` (it writes data/, logs/ and artifacts/ there)."""
    for rel in ("train_gpt.py", "tools/__init__.py", "tools/harness.py", "tools/ship_code.py", "tools/gpu_rehearsal.sh"):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    return dest


def test_without_a_gpu_the_rehearsal_refuses_in_seconds(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_rehearsal.sh")], cwd=tmp_path, env=rehearsal_env(),
                          capture_output=True, text=True, timeout=REHEARSAL_TIMEOUT_S)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and proc.stdout == ""


def test_a_missing_package_is_one_line_before_anything_runs(tmp_path):
    """On a box with torch but not sentencepiece the rehearsal says so in one line (exit 2) before it
    builds data or trains; a `sitecustomize` on PYTHONPATH hides sentencepiece from every python3 it starts."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['sentencepiece'] = None   # import fails\n")
    entry = copy_rehearsal(tmp_path / "entry")
    proc = subprocess.run(["bash", "tools/gpu_rehearsal.sh"], cwd=entry, capture_output=True, text=True,
                          timeout=REHEARSAL_TIMEOUT_S,
                          env=rehearsal_env(PYTHONPATH=str(hide), REHEARSAL_ALLOW_CPU="1"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "gpu_rehearsal.sh: missing Python package(s) sentencepiece: pip install sentencepiece"]
    assert not (entry / "data").exists() and not (entry / "logs").exists()


@pytest.mark.slow
def test_the_rehearsal_runs_the_pipeline_and_reports_one_json(demo_data, tmp_path):
    """At a tiny shape on 1 CPU process, in a copy of the entry: the report's figures are the run summary's."""
    copy_rehearsal(tmp_path)
    run_id = "plumbing"
    settings = dict(TINY_RUN, DATA_PATH=str(demo_data["dir"]), TOKENIZER_PATH=str(demo_data["tokenizer"]),
                    VOCAB_SIZE=str(demo_data["vocab"]), RUN_ID=run_id)
    proc = subprocess.run(["bash", "tools/gpu_rehearsal.sh"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=REHEARSAL_TIMEOUT_S,
                          env=rehearsal_env(REHEARSAL_ALLOW_CPU="1", REHEARSAL_TRAIN_SECONDS="0", **settings))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    summary = json.loads((tmp_path / "logs" / f"{run_id}.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert summary["hyperparameters"]["EVAL_AUDIT"] == 1 and summary["world_size"] == 1
    assert report["step_ms"] == summary["step_avg_ms"] and report["implied_8xh100_step_ms"] == summary["step_avg_ms"] / 8
    # MFU from the FLOPs the training steps ran (train_gpt.py's train_flops), null in a summary without them
    assert report["mfu"] == (summary["train_flops"] / (summary["train_time_ms"] / 1e3 * 989e12)
                             if summary.get("train_flops") is not None else None)
    assert report["stage_s"]["train"] == round(summary["stage_ms"]["train"] / 1e3, 2)
    # the evaluation's time by part, measured, beside the 8xH100 projection by part (the first GPU run replaces it)
    assert set(report["eval_parts_s"]) == {"compile_in_warm_up", "load", "audit", "roundtrip_plain_eval", "eval"}
    assert report["eval_parts_s"]["eval"] == round(summary["stage_ms"]["eval"] / 1e3, 2)
    assert report["projected_8xh100_eval_parts_s"] == summary["projected_h100_eval_parts_s"]
    assert report["ttt"] == summary["ttt_summary"]
    assert report["compliance_all_ok"] is True and report["attention"] == "sdpa"
