"""The one-GPU rehearsal (tools/gpu_rehearsal.sh), its plumbing on the CPU: by default the probe (tools/gpu_probe.py)
measures each part of the run and prints one table and projection (and a JSON); --pipeline runs the pipeline once
and prints one JSON of what the run measured. Without a GPU, or on a GPU without flash-attn, both refuse before
anything runs (REHEARSAL_ALLOW_CPU=1 runs them on the CPU)."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from _helpers import TINY, time_limit
from test_pipeline import TINY_RUN, TORCHRUN_VARS
from tools import gpu_probe
from tools.eval_projection_fit import lengths_from_ranges

REPO = Path(__file__).resolve().parents[1]
REPORT_KEYS = {"step_ms", "tokens_per_s", "mfu", "peak_memory_mib", "compile_s", "compile", "stage_s", "wall_s",
               "implied_8xh100_step_ms", "implied_8xh100_steps_in_600s", "projected_8xh100_step_ms", "eval_time_s",
               "attention", "compute_dtype", "hardware", "shape", "bytes_total", "val_bpb", "compliance_all_ok"}
# A limit for hangs only (time_limit, tests/_helpers.py): the pipeline rehearsal's tiny CPU run took 22 s (45 s on a
# loaded machine), the probe's 20-28 s, the refusals 2-17 s.
REHEARSAL_TIMEOUT_S = time_limit(22)
# The probe's tiny CPU run: rows of the LoRA batch's short documents, the first step at window / 8 (TTT_LORA_CHUNK).
PROBE_RUN = dict(TINY_RUN, TTT_ENABLED="1", TTT_LORA_BATCH_TOKENS="256", TTT_LORA_CHUNK="8", EVAL_MODE="documents")
PROBE_ARGS = ["--split-tokens", "20000", "--longest-doc", "300", "--no-plan"]


def rehearsal_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in train_gpt.SETTINGS and k not in TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", TORCHRUN=f"{sys.executable} -m torch.distributed.run")
    env.update(extra)
    return env


def copy_rehearsal(dest: Path) -> Path:
    """The files the rehearsal needs, copied to `dest` (it writes data/, logs/ and artifacts/ there)."""
    for rel in ("train_gpt.py", "tools/__init__.py", "tools/harness.py", "tools/ship_code.py", "tools/gpu_rehearsal.sh",
                "tools/gpu_probe.py", "tools/eval_projection_fit.py", "tools/fineweb_doc_ranges_1855.json"):
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
def test_the_pipeline_rehearsal_runs_the_pipeline_and_reports_one_json(demo_data, tmp_path):
    """At a tiny shape on 1 CPU process, in a copy of the entry: the report's figures are the run summary's."""
    copy_rehearsal(tmp_path)
    run_id = "plumbing"
    settings = dict(TINY_RUN, DATA_PATH=str(demo_data["dir"]), TOKENIZER_PATH=str(demo_data["tokenizer"]),
                    VOCAB_SIZE=str(demo_data["vocab"]), RUN_ID=run_id)
    proc = subprocess.run(["bash", "tools/gpu_rehearsal.sh", "--pipeline"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=REHEARSAL_TIMEOUT_S,
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


# --- the probe (tools/gpu_probe.py) ------------------------------------------------------------------------------

def a_cuda_box_without_flash(monkeypatch):
    """This process as a CUDA machine whose flash-attn does not import, where building anything is an error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", None)
    monkeypatch.setattr(train_gpt, "FLASH_VARLEN_FUNC", None)

    def ran(*args, **kwargs):
        raise AssertionError("the probe started work before refusing")

    for name in ("init_runtime", "build_model", "GPT"):
        monkeypatch.setattr(train_gpt, name, ran)
    monkeypatch.setattr(gpu_probe, "start_plan", ran)


@pytest.mark.parametrize("allow_sdpa", ["0", "1"])
def test_without_flash_attn_the_probe_refuses_in_one_line_before_anything_runs(monkeypatch, capsys, tmp_path,
                                                                               allow_sdpa):
    """On a CUDA box without flash_attn_interface or flash_attn: exit 2, one line naming the FA3 wheel's install line
    for torch 2.9.1+cu128, whatever ALLOW_SDPA says; no model, no plan, no JSON."""
    a_cuda_box_without_flash(monkeypatch)
    monkeypatch.setenv("ALLOW_SDPA", allow_sdpa)
    out = tmp_path / "probe.json"
    assert gpu_probe.main(["--json", str(out)]) == 2
    err = capsys.readouterr()
    assert err.out == "" and len(err.err.splitlines()) == 1
    assert "flash-attn does not import" in err.err and gpu_probe.FA3_INSTALL in err.err and "torch==2.9.1" in err.err
    assert not out.exists()


def test_the_rehearsal_script_refuses_without_flash_attn_even_with_allow_sdpa(tmp_path):
    """The shell script on a CUDA-looking box (a sitecustomize makes torch.cuda.is_available() true and hides both
    flash-attn modules from every python3 it starts): one line, exit 2, before it builds data or starts torchrun, in
    both modes; ALLOW_SDPA=1 no longer lets the rehearsal run on SDPA."""
    fake = tmp_path / "fake_cuda"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(
        "import sys\nsys.modules['flash_attn_interface'] = None\nsys.modules['flash_attn'] = None\n"
        "import torch\ntorch.cuda.is_available = lambda: True\n")
    entry = copy_rehearsal(tmp_path / "entry")
    for mode in ([], ["--pipeline"]):
        proc = subprocess.run(["bash", "tools/gpu_rehearsal.sh", *mode], cwd=entry, capture_output=True, text=True,
                              timeout=REHEARSAL_TIMEOUT_S,
                              env=rehearsal_env(PYTHONPATH=str(fake), ALLOW_SDPA="1", TORCHRUN="false"))
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and gpu_probe.FA3_INSTALL in proc.stderr
        assert not (entry / "data").exists() and not (entry / "logs").exists()


def fake_probe():
    return SimpleNamespace(cuda=False, hp=train_gpt.read_settings(dict(TINY))[0])


def test_a_part_over_its_deadline_is_reported_and_ends_the_run(monkeypatch):
    """Each part runs under its deadline (SIGALRM): one that passes it is recorded as a timeout, also when the alarm
    comes out of it wrapped in another error (dynamo wraps what a compile raises), and no later part runs."""
    monkeypatch.setattr(gpu_probe, "REPORT_RESERVE_S", 0.0)

    def sleeps(p):
        time.sleep(30)

    def wrapped(p):
        try:
            time.sleep(30)
        except BaseException as e:
            raise RuntimeError("backend compiler failed") from e

    for slow in (sleeps, wrapped):
        parts = [gpu_probe.Part("quick", "", 60, lambda p: {"x": 1}), gpu_probe.Part("slow", "", 0.2, slow),
                 gpu_probe.Part("after", "", 60, lambda p: {"y": 2})]
        records, stopped = gpu_probe.run_parts(fake_probe(), parts, 600, time.perf_counter(), log=lambda line: None)
        assert [r.status for r in records] == ["ok", "timeout", "not run"]
        assert records[0].result == {"x": 1} and "deadline" in records[1].why and "slow" in stopped
        assert "slow" in records[2].why


def test_the_cap_stops_the_run_before_a_part_it_cannot_afford(monkeypatch):
    """The probe checks its own clock before each part: with the cap spent, the part is not started and the record
    says why."""
    monkeypatch.setattr(gpu_probe, "REPORT_RESERVE_S", 0.0)
    parts = [gpu_probe.Part("first", "", 60, lambda p: {}), gpu_probe.Part("second", "", 60, lambda p: {})]
    records, stopped = gpu_probe.run_parts(fake_probe(), parts, 10.0, time.perf_counter() - 9.5, log=lambda line: None)
    assert [r.status for r in records] == ["not run", "not run"]
    assert "cap" in stopped and "first" in stopped and "cap" in records[0].why


def test_a_dynamo_error_is_reported_in_its_own_words_and_the_next_part_runs():
    """A compile error is reported with its own type and first line (train_gpt.compile_failure); the flash-attn hint
    comes only when the error mentions flash. An error that is not a timeout does not end the run."""
    class Unsupported(torch._dynamo.exc.TorchDynamoException):
        pass

    def graph_break(p):
        raise Unsupported("Dynamo does not know how to trace builtin operator `foo`\nfrom user code: ...")

    def flash_break(p):
        raise Unsupported("Could not trace flash_attn_varlen_func")

    parts = [gpu_probe.Part("a", "", 60, graph_break), gpu_probe.Part("b", "", 60, flash_break),
             gpu_probe.Part("c", "", 60, lambda p: {"z": 3})]
    records, stopped = gpu_probe.run_parts(fake_probe(), parts, 600, time.perf_counter(), log=lambda line: None)
    assert [r.status for r in records] == ["error", "error", "ok"] and stopped == ""
    assert records[0].why == ("torch.compile failed (Unsupported: Dynamo does not know how to trace builtin operator "
                              "`foo`)")
    assert records[1].why.startswith("torch.compile failed (Unsupported: Could not trace flash_attn_varlen_func; the "
                                     "attention kernel is")


def projection_hp(**extra):
    env = dict(TINY, TRAIN_SEQ_LEN="64", EVAL_SEQ_LEN="0", EVAL_STRIDE="32", TTT_LORA_BATCH_TOKENS="128",
               TTT_LORA_CHUNK="16", TTT_PHASES="0")
    return train_gpt.read_settings(dict(env, **extra))[0]


MEASURED = {
    "optimizer": {"step_ms": 10.0, "grad_bytes": 1000,
                  "muon_groups": [{"shape": [4, 8], "matrices": 10, "update_ms": 0.5},
                                  {"shape": [8, 8], "matrices": 3, "update_ms": 1.0}]},
    "train_off": {"step_ms": 100.0, "tokens": 4096, "compile_s": 20.0},
    "train_on": {"step_ms": 150.0, "tokens": 4096, "compile_s": 30.0},
    "eval_forward": {"ms": 80.0, "tokens": 800, "compile_s": 2.0},
    "lora_step": {"step_ms": 40.0, "tokens": 128, "compile_s": 3.0},
    "lora_first_step": {"step_ms": 12.0, "tokens": 16, "compile_s": 1.0},
}


def test_the_projection_from_given_part_times():
    """The arithmetic, by hand, on one 64-input document (the LoRA batch: 2 rows, window 64, chunks of 16: steps of
    16, 32, 64 and 64 inputs, so 4 steps and 2 x 176 = 352 forward tokens on one rank)."""
    hp = projection_hp()
    tokens = np.concatenate(([train_gpt.BOS_ID], np.full(64, 5)))
    proj = gpu_probe.projection(hp, MEASURED, tokens, tokens.size)
    tr, ev = proj["train"], proj["eval"]
    # Muon: every matrix's update on one GPU (10 x 0.5 + 3 x 1.0 ms) replaced by rank 0's share (2 x 0.5 + 1 x 1.0)
    assert tr["optimizer_ms"] == pytest.approx(10.0 - 8.0 + 2.0)
    # all-gather of rank 0's rounds (2 x 7 x 32 + 1 x 7 x 64 bf16 values), ring all-reduce of 1,000 gradient bytes
    comm_ms = 1e3 * (2 * (2 * 7 * 32 + 7 * 64) + 2 * 7 / 8 * 1000) / (gpu_probe.ASSUMED_BUS_GB_S * 1e9)
    assert tr["communication_ms_assumed"] == pytest.approx(comm_ms)
    assert tr["step_ms_recurrence_off"] == pytest.approx(104.0 + comm_ms)
    assert tr["step_ms_recurrence_on"] == pytest.approx(154.0 + comm_ms)
    f, train_ms = hp.recur_start_frac, 600e3 - 1e3 * hp.gptq_reserve_seconds     # calibration's reserve: not training
    assert hp.gptq_calibration == "train"
    assert tr["steps_in_600s"] == pytest.approx(f * train_ms / (104 + comm_ms) + (1 - f) * train_ms / (154 + comm_ms))
    # a LoRA step = 8 ms + 0.25 ms a token: the line through (16 tokens, 12 ms) and (128 tokens, 40 ms)
    assert ev["ttt_lora_step_model"] == pytest.approx({"fixed_s": 0.008, "per_token_s": 0.00025})
    assert ev["ttt"] == pytest.approx(4 * 0.008 + 352 * 0.00025) and ev["phases"] == 0.0
    # the plain pass: one 64-token window over 8 GPUs at the forward's 80 ms / 800 tokens
    assert ev["plain"] == pytest.approx(64 / 8 * 1e-4)
    # compiles: both scoring shapes at the forward's, the 2 LoRA lengths measured and the other 2 at their mean
    assert ev["compile"] == pytest.approx(2 * 2.0 + (3.0 + 1.0) + 2 * 2.0)
    assert ev["total"] == pytest.approx(train_gpt.EVAL_LOAD_ASSUMED_S + 12.0 + 64 / 8 * 1e-4 + 0.12)


def test_the_projection_without_some_parts_bounds_or_leaves_null():
    hp = projection_hp(TTT_PHASES="1", TTT_PHASE_DOCS_FRAC="1.0")     # a phase after the one document
    tokens = np.concatenate(([train_gpt.BOS_ID], np.full(64, 5)))
    measured = {k: v for k, v in MEASURED.items() if k not in ("lora_first_step", "optimizer")}
    proj = gpu_probe.projection(hp, measured, tokens, tokens.size)
    # without the optimizer there is no step time; without the first LoRA step, bounds from the full one: every step
    # at 40 ms (upper), or 40 ms / 128 tokens for each of the 352 (lower)
    assert proj["train"]["step_ms_recurrence_on"] is None and proj["train"]["steps_in_600s"] is None
    assert proj["eval"]["ttt"] is None and proj["eval"]["total"] is None
    assert proj["eval"]["ttt_lora_bounds"] == pytest.approx([352 * 0.040 / 128, 4 * 0.040])
    # the phase (the one document) at the recurrence-on micro-step's time per token
    assert proj["eval"]["phases"] == pytest.approx(64 / 8 * 0.150 / 4096)


def test_without_recurrence_the_projection_takes_the_one_training_graph():
    hp = projection_hp(RECUR_LAYERS="")
    tokens = np.concatenate(([train_gpt.BOS_ID], np.full(64, 5)))
    measured = {k: v for k, v in MEASURED.items() if k != "train_on"}
    tr = gpu_probe.projection(hp, measured, tokens, tokens.size)["train"]
    assert tr["step_ms_recurrence_on"] == tr["step_ms_recurrence_off"]
    assert tr["steps_in_600s"] == pytest.approx((600e3 - 1e3 * hp.gptq_reserve_seconds) / tr["step_ms_recurrence_off"])


def test_the_fineweb_like_lengths_rebuild_from_the_committed_ranges():
    """tools/fineweb_doc_ranges_1855.json (the batch ranges #1855's logs name) rebuilds 50,000 lengths, longest first,
    each named batch's 64 inside its logged range; the longest document is the 97,114-token one."""
    batches = json.loads((REPO / "tools" / "fineweb_doc_ranges_1855.json").read_text())["batches"]
    lengths = lengths_from_ranges({k: (lo, hi) for k, lo, hi in batches})          # inputs: tokens - 1
    assert lengths.size == 50_000 and np.all(np.diff(lengths) <= 0)
    assert max(hi for _, _, hi in batches) == gpu_probe.LONGEST_DOC_TOKENS
    ascending = lengths[::-1]
    for k, lo, hi in batches:
        batch = ascending[(k - 1) * 64:k * 64] + 1
        assert lo - 1 <= batch.min() and batch.max() <= hi


def test_without_validation_shards_the_projection_takes_the_fineweb_like_lengths(tmp_path):
    hp = train_gpt.read_settings({"DATA_PATH": str(tmp_path)})[0]
    tokens, split, why = gpu_probe.projection_stream(hp, gpu_probe.SPLIT_TOKENS)
    spans = train_gpt.document_spans(tokens)
    assert len(spans) == 50_000 and split == tokens.size and "no validation shards" in why
    assert (spans[:, 1] - spans[:, 0]).max() == gpu_probe.LONGEST_DOC_TOKENS - 1     # rebuilt log-uniform, rounded down


@pytest.mark.slow
def test_the_probe_runs_every_part_and_prints_one_table_and_json(demo_data, tmp_path):
    """Through the script, at a tiny shape on the CPU (SDPA, eager), in a copy of the entry: every part measured, the
    table's rows and the JSON's, the projection's fields filled, the CPU-side plan skipped (--no-plan), exit 0."""
    entry = copy_rehearsal(tmp_path / "entry")
    out = tmp_path / "probe.json"
    settings = dict(PROBE_RUN, DATA_PATH=str(demo_data["dir"]), TOKENIZER_PATH=str(demo_data["tokenizer"]),
                    VOCAB_SIZE=str(demo_data["vocab"]))
    proc = subprocess.run(["bash", "tools/gpu_rehearsal.sh", "--json", str(out), *PROBE_ARGS], cwd=entry,
                          capture_output=True, text=True, timeout=REHEARSAL_TIMEOUT_S,
                          env=rehearsal_env(REHEARSAL_ALLOW_CPU="1", **settings))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [part.name for part in gpu_probe.PARTS]
    rows = [line.split(" | ")[0].lstrip("| ") for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows[:len(names) + 1] == ["part", *names]
    assert {"step ms, recurrence off / on", "steps in 600 s", "training peak GiB", "LoRA TTT peak GiB",
            "eval ttt s", "eval total s"} <= set(rows)
    report = json.loads(out.read_text())
    assert list(report["parts"]) == names and all(p["status"] == "ok" for p in report["parts"].values())
    assert report["attention"] == "sdpa" and report["compiled"] is False and report["stopped"] is None
    assert report["parts"]["lora_step"]["length"] == 64 and report["parts"]["lora_first_step"]["length"] == 8
    assert report["parts"]["lora_step"]["document_tokens"] == 300 and report["shape"]["micro_batch"] == [8, 64]
    assert all(v is not None for k, v in report["projection"]["train"].items())
    assert report["projection"]["eval"]["total"] is not None and "validation shards" in report["lengths_from"]
    assert report["cpu_side"]["plan_error"] == "not run (--no-plan)"
    assert report["cpu_side"]["eval_parts_records_rates"]["total"] > 0
