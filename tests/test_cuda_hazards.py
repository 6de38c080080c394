"""CUDA-only hazards, each emulated on the CPU (README.md, "GPU readiness"): what would crash the first
8xH100 run or push it past its 600 s. Every test here failed on the code before its fix."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from _helpers import time_limit
from test_pipeline import TINY_RUN, TORCHRUN_VARS

REPO = Path(__file__).resolve().parents[1]

# --- a failure on one rank ends every rank ---------------------------------------------------------

FAILING_RUN = """
import os, sys, time
sys.path.insert(0, {repo!r})
import torch.distributed as dist
import train_gpt
# NCCL's shutdown waits for peers that sit in a collective; gloo's does not. Emulate NCCL's.
dist.destroy_process_group = lambda *args, **kwargs: time.sleep(3600)
mode, rank = sys.argv[1], int(os.environ["RANK"])
open(f"worker{{rank}}.pid", "w").write(str(os.getpid()))     # the test kills what a hang leaves behind
if mode == "training" and rank == 1:
    batch = train_gpt.DistributedTokenLoader.batch
    def failing_batch(self, step, micro):
        if step == 2:
            raise RuntimeError("injected failure on rank 1 at step 2")
        return batch(self, step, micro)
    train_gpt.DistributedTokenLoader.batch = failing_batch
if mode == "rank0_export":                      # packing runs on rank 0 alone, inside on_main
    def failing_pack(*args, **kwargs):
        raise ValueError("injected failure in rank 0's export")
    train_gpt.pack_artifact = failing_pack
sys.exit(train_gpt.entry_point())
"""
# The fixed code ends both modes in 10-12 s; the old code hung until the emulated shutdown's hour (NCCL: the
# 30-minute collective timeout). A limit for hangs only (time_limit, tests/_helpers.py) tells them apart.
FAILING_RUN_TIMEOUT_S = time_limit(12)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["training", "rank0_export"])
def test_a_failure_on_one_rank_ends_every_rank_in_seconds(demo_data, tmp_path, mode):
    """Rank 1 raising mid-training (its peer waits in a collective), and rank 0 raising
    something other than a PipelineError inside on_main (its peer waits for the broadcast). With NCCL's
    blocking shutdown emulated, the old code left the run hanging until the 30-minute collective timeout
    (FAILING_RUN_TIMEOUT_S, minutes, tells the two apart)."""
    script = tmp_path / "failing_run.py"
    script.write_text(FAILING_RUN.format(repo=str(REPO)))
    env = {k: v for k, v in os.environ.items() if k not in train_gpt.SETTINGS and k not in TORCHRUN_VARS}
    env.update(TINY_RUN, DATA_PATH=str(demo_data["dir"]), TOKENIZER_PATH=str(demo_data["tokenizer"]),
               VOCAB_SIZE=str(demo_data["vocab"]), RUN_ID="failing", OMP_NUM_THREADS="1", ITERATIONS="6")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), mode]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
        try:
            proc.wait(timeout=FAILING_RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)          # torchrun starts each worker in a session of its own
            for pid_file in tmp_path.glob("worker*.pid"):
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            pytest.fail(f"the run was still hanging after {FAILING_RUN_TIMEOUT_S:.0f} s ({mode})")
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode != 0
    assert "injected failure" in err
    if mode == "rank0_export":   # both ranks end with the message, the other rank without a traceback of its own
        assert "[rank 1] train_gpt.py: error: internal error on rank 0: ValueError: injected failure" in err


# --- Muon sends only the updates a rank computed --------------------------------------------------

MUON_SHAPES = [(32, 16)] * 3 + [(16, 48)] * 2 + [(24, 24)]


def _muon_elements_sent(rank, world_size):
    """Elements this rank hands to collectives during one Muon step, and the parameters after it."""
    import torch
    import torch.distributed as dist
    sent = []
    real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

    def all_reduce(tensor, *args, **kwargs):
        sent.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    def all_gather(outputs, tensor, *args, **kwargs):
        sent.append(tensor.numel())
        return real_all_gather(outputs, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    try:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in MUON_SHAPES]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        train_gpt.Muon(params, lr=0.05, momentum=0.9, backend_steps=5, rank=rank, world_size=world_size).step()
    finally:
        dist.all_reduce, dist.all_gather = real_all_reduce, real_all_gather
    return sum(sent), [p.detach() for p in params]


@pytest.mark.slow
def test_muon_ranks_send_their_own_updates_not_the_whole_model():
    """Muon all-reduced a flat fp32 buffer of every matrix, mostly zeros on each rank. Now each
    round of matrices of one shape is one all_gather of the updates each rank computed: about half the
    elements per rank on 2 ranks, with the same result as one process."""
    from _helpers import run_distributed
    total = sum(a * b for a, b in MUON_SHAPES)
    rounds = {shape: -(-MUON_SHAPES.count(shape) // 2) for shape in set(MUON_SHAPES)}   # per shape, on 2 ranks
    share = sum(n * shape[0] * shape[1] for shape, n in rounds.items())                 # 2,368 of 3,648
    _, single = _muon_elements_sent(0, 1)
    for sent, params in run_distributed(_muon_elements_sent, 2):
        assert sent == share < total, (sent, share, total)
        for got, want in zip(params, single):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --- the residual stream in the compute dtype ---------------------------------------------------------

def test_residual_stream_is_bf16_under_cuda_like_autocast(monkeypatch):
    """F.embedding returns the fp32 table's dtype and CUDA autocast runs rms_norm in fp32, so the
    residual stream (embedding, x0, every block's input and output) was fp32 on CUDA: twice the bytes."""
    from test_model import cuda_autocast_rms_norm
    from _helpers import cpu_runtime, random_gpt, tiny_hp
    cuda_autocast_rms_norm(monkeypatch)
    hp = tiny_hp(NUM_LAYERS=3, PARALLEL_LAST_N=1, RECUR_LAYERS="0-1")
    model = random_gpt(hp)
    model.recurrence_on = True
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, args[1].dtype,
                                                                     *(o.dtype for o in (out if isinstance(out, tuple) else (out,))))))
        block.forward_lanes = (lambda f: lambda lanes, x0, *a: seen.append((lanes[0].dtype, lanes[1].dtype, x0.dtype))
                               or f(lanes, x0, *a))(block.forward_lanes)
    x = torch.randint(0, hp.vocab_size, (2, 16))
    with train_gpt.autocast(cpu_runtime(autocast_dtype=torch.bfloat16)):
        model(x, x)
    assert seen and all(dtype == torch.bfloat16 for dtypes in seen for dtype in dtypes), seen


# --- Hessians in fp32 under bf16 autocast ---------------------------------------------------------------

def test_hessians_are_fp32_under_bf16_autocast():
    """x^T x computed inside autocast is a bf16 matmul (3 significant digits). The Hessians
    must match an fp64 product of the very inputs the layers saw, to fp32 precision."""
    from _helpers import cpu_runtime, random_gpt, tiny_hp
    hp = tiny_hp(MODEL_DIM=64)
    model = random_gpt(hp, seed=2)
    rt = cpu_runtime(autocast_dtype=torch.bfloat16)
    batches = [torch.randint(0, hp.vocab_size, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    inputs = []
    hook = model.blocks[1].mlp.proj.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    hessians = train_gpt.collect_hessians(model, rt, batches)
    hook.remove()
    x = torch.cat([i.reshape(-1, i.size(-1)) for i in inputs]).double()
    assert x.dtype == torch.float64 and inputs[0].dtype == torch.bfloat16       # the layer saw bf16 activations
    want = x.T @ x / x.shape[0]
    got = hessians["blocks.1.mlp.proj.weight"]
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


# --- incremental decoding ------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [
    {},                                                                         # tiny: recurrence, two lanes, gates
    {"NUM_LAYERS": "4", "RECUR_LAYERS": "1-2", "PARALLEL_LAST_N": "1", "PARALLEL_LANES": "1", "ATTN_GATE_DIMS": "0",
     "SMEAR_GATE_DIMS": "0", "ROPE_DIMS": "0", "XSA_LAST_N": "2"},
])
def test_incremental_decoding_equals_full_prefix_logits_at_every_position(settings):
    """Self-calibration recomputed the whole prefix for every new token (~500x the work at
    1024 tokens). Decoding with the DecodeCache (keys/values per block visit, BigramHash's and
    SmearGate's previous token) gives the full forward's logits at every position, a BOS mid-sequence
    included. Decoding (self-calibration only) attends across documents, so the full forward compared with it
    does too (ATTN_DOC_ISOLATION=0)."""
    from _helpers import random_gpt, tiny_hp
    hp = tiny_hp(**settings, ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole")
    model = random_gpt(hp, seed=4)
    model.recurrence_on = True
    x = torch.randint(0, hp.vocab_size, (3, 20), generator=torch.Generator().manual_seed(4))
    x[:, 0] = train_gpt.BOS_ID
    x[1, 9] = train_gpt.BOS_ID
    with torch.no_grad():
        full = model.logits(x)
        cache = train_gpt.DecodeCache()
        steps = [model.logits(x[:, t:t + 1], cache) for t in range(x.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
    assert cache.pos == 20 and len(cache.keys) == len(model.layer_order())


def test_calibration_decodes_incrementally():
    """generate_calibration runs one position per forward: never the whole prefix again."""
    from _helpers import cpu_runtime, random_gpt, tiny_hp
    hp = tiny_hp()
    model = random_gpt(hp)
    lengths = []
    real = model.logits
    model.logits = lambda ids, cache=None: lengths.append(ids.size(1)) or real(ids, cache)
    train_gpt.generate_calibration(model, cpu_runtime(), 2, 12, 1.0, seed=0)
    assert lengths == [1] * 11


# --- GPTQ split over ranks ---------------------------------------------------------------------------

def _distributed_gptq(rank, world_size):
    from _helpers import cpu_runtime, random_gpt, tiny_hp
    hp = tiny_hp(MODEL_DIM=64, LQER_TENSORS=2)
    model = random_gpt(hp, seed=5)
    rt = cpu_runtime(rank=rank, world_size=world_size, distributed=world_size > 1)
    batches = [torch.randint(0, hp.vocab_size, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    hessians = train_gpt.collect_hessians(model, rt, batches[rank::world_size])    # each rank its share
    quantizer = train_gpt.DistributedQuantizer(hp, rt, model.state_dict(), hessians)
    entries = quantizer.quantize(train_gpt.QuantSpec.from_settings(hp))
    return sorted(quantizer.mine), entries


@pytest.mark.slow
def test_gptq_split_over_two_ranks_equals_gptq_on_one():
    """GPTQ ran on rank 0's CPU while the other ranks waited. Now the matrices are dealt out to
    the ranks and the Hessians summed over them: 2 gloo ranks give rank 0 the one-process artifact."""
    from _helpers import run_distributed
    (_, single), = [_distributed_gptq(0, 1)]
    (mine0, entries), (mine1, nothing) = run_distributed(_distributed_gptq, 2)
    assert nothing is None and mine0 and mine1 and not set(mine0) & set(mine1)
    assert [e["name"] for e in entries] == [e["name"] for e in single]
    for a, b in zip(entries, single):
        assert a["scheme"] == b["scheme"] and a["parts"].keys() == b["parts"].keys(), a["name"]
        for k in a["parts"]:
            assert np.array_equal(a["parts"][k], b["parts"][k]), (a["name"], k)
    assert sum("lqer_a" in e["parts"] for e in entries) == 2


# --- the clock never passes the cap ---------------------------------------------------------------------

class FakeTime:
    """A clock for train_gpt that only the loader moves: every step takes exactly what the loader says, so
    the stop rule is tested without the machine's load in the way."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


class StepLoader:
    """A stand-in loader: each step takes step_s on the fake clock, except a step that starts within two
    steps of the cap, which takes twice as long: it would be the last step, slower than every one before."""

    def __init__(self, hp, fake, step_s, cap_ms):
        self.hp, self.fake, self.step_s, self.cap_ms = hp, fake, step_s, cap_ms
        self.grad_accum, self.local_tokens, self.clock, self.slowed = 1, 2 * hp.train_seq_len, None, 0

    def batch(self, step, micro):
        slow = self.clock is not None and self.cap_ms - self.clock() < 2 * 1e3 * self.step_s
        self.slowed += slow
        self.fake.now += self.step_s * (2 if slow else 1)
        t = torch.randint(0, self.hp.vocab_size, (self.local_tokens + 1,), generator=torch.Generator().manual_seed(step))
        x, y = t[:-1].view(-1, self.hp.train_seq_len), t[1:].view(-1, self.hp.train_seq_len)
        return x, y, train_gpt.capacity_of(x)


@pytest.mark.parametrize("step_s", [0.05, 0.047, 0.11])
def test_the_clock_never_passes_the_cap_under_a_slow_last_step(monkeypatch, step_s):
    """The stop rule used the average step, so a last step slower than the average ended past
    the cap (the old rule, on this clock: 1550 ms of a 1500 ms cap at 50 ms steps). It now keeps (unfinished
    steps + 1 + STOP_SAFETY_STEPS) of the slowest recent step in hand."""
    from _helpers import cpu_runtime, random_gpt, tiny_hp
    cap_ms = 1500.0
    hp = tiny_hp(ITERATIONS=10_000, MAX_WALLCLOCK_SECONDS=cap_ms / 1e3, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=10_000,
                 GPTQ_CALIBRATION="none")     # the clock alone: no reserve for calibration
    model = random_gpt(hp)
    fake = FakeTime()
    monkeypatch.setattr(train_gpt, "time", fake)
    loader = StepLoader(hp, fake, step_s, cap_ms)
    real_clock = train_gpt.StepClock

    class Watched(real_clock):                              # lets the loader read the training clock
        def __init__(self, *args):
            super().__init__(*args)
            loader.clock = self.elapsed_ms

    monkeypatch.setattr(train_gpt, "StepClock", Watched)
    result = train_gpt.train(hp, cpu_runtime(), model, model, loader, lambda *a, **k: None, lambda *a: None)
    assert result.stopped_early
    assert result.train_time_ms <= cap_ms
    assert result.train_time_ms > cap_ms - 4 * 1e3 * step_s  # and the loop did not stop needlessly early


def test_the_stop_rule_counts_the_unfinished_steps_of_an_asynchronous_device():
    """On CUDA one launched step may still be running when the loop votes: the rule then keeps one more
    step in hand (emulated: a clock with one unfinished step)."""
    from _helpers import cpu_runtime
    clock = train_gpt.StepClock(cpu_runtime(), cap_ms=1000.0)
    clock.durations = [100.0, 120.0, 90.0]
    clock.train_ms, clock.t0 = 700.0, time.perf_counter()
    assert not clock.should_stop()                          # 700 + (0 + 1 + 1) x 120 = 940 <= 1000
    clock.unfinished = ["a launched step"]
    assert clock.should_stop()                              # 700 + (1 + 1 + 1) x 120 = 1060 > 1000


# --- no recompilation after the warm-up -------------------------------------------------------------------

COMPILED_RUN = {"COMPILE": "1", "NUM_LAYERS": "2", "RECUR_LAYERS": "0-0", "PARALLEL_LAST_N": "1", "MODEL_DIM": "32",
                "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "ROPE_DIMS": "8", "ATTN_GATE_DIMS": "8", "SMEAR_GATE_DIMS": "8",
                "TRAIN_SEQ_LEN": "32", "TRAIN_BATCH_TOKENS": "512", "ITERATIONS": "12", "VAL_LOSS_EVERY": "5",
                "VAL_MAX_TOKENS": "1500", "VAL_BATCH_SIZE": "1024", "EVAL_STRIDE": "16", "TTT_CHUNK_TOKENS": "256",
                "TTT_EPOCHS": "1", "EVAL_AUDIT": "1", "EVAL_MODE": "sliding", "TTT_METHOD": "whole", "GPTQ_CALIB_SEQS": "2", "GPTQ_CALIB_LEN": "16",
                "COMPILE_WARMUP_STEPS": "1", "LZMA_PRESET": "1", "WARMDOWN_FRAC": "0.5", "LATE_QAT_THRESHOLD": "0.5", "TTT_ENABLED": "1",
                "LR_FLOOR": "0.1", "RECUR_START_FRAC": "0.3", "MAX_WALLCLOCK_SECONDS": "0"}


@pytest.mark.slow
@pytest.mark.parametrize("evaluation", [dict(EVAL_MODE="sliding", TTT_METHOD="whole"),    # the March-stack form
                                        dict(EVAL_MODE="documents", TTT_METHOD="lora",     # the default, 4 LoRA rows,
                                             TTT_LORA_BATCH_TOKENS="128", TTT_PHASES="2",  # 2 phases, no budget
                                             TTT_PHASE_DOCS_FRAC="0.5", EVAL_TIME_LIMIT_SECONDS="0")])
def test_a_compiled_run_compiles_nothing_after_its_warm_up(demo_data, tmp_path, evaluation):
    """Compiled with inductor and fullgraph=True (a graph break is an error), a whole run:
    warm-up, training through recurrence switching on and late QAT, periodic and final validation, the
    pre-quant and round-trip evaluations, the audit and score-first TTT (per-document LoRA at every row length
    and its global phases, by default). Dynamo's own count of graphs
    built after the clock started is 0. (The old code recompiled at step 0 (inputs aliased in the
    warm-up), at the first periodic validation and when late QAT switched on.) Its time limit is run_train's
    (RUN_TIMEOUT_S, test_pipeline.py), derived from this run with an empty compile cache: 317 s. The shape is
    already tiny (2 layers of width 32, one recurring, one two-lane); the time is inductor compiling the 7 graphs
    (266 s of the 317), not running them."""
    from test_pipeline import run_train, succeeded, summary
    succeeded(run_train(tmp_path, demo_data, RUN_ID="compiled", **dict(COMPILED_RUN, **evaluation)))
    s = summary(tmp_path, "compiled")
    log = (tmp_path / "logs" / "compiled.txt").read_text()
    assert s["compile"]["graphs_in_warm_up"] >= 6 and s["compile"]["graph_breaks"] == 0
    assert s["compile"]["recompiles_in_clock"] == 0 and s["compile"]["recompiles_after_warm_up"] == 0
    assert "late_qat: on from step" in log and "recurrence: on from step" in log and "step:10/12 val_loss" in log
    assert log.index("clock_start:") < log.index("step:1/12 train_loss")
    assert s["ttt"] is True and s["compliance"]["all_ok"] is True
    if evaluation["TTT_METHOD"] == "lora":      # the LoRA steps at every row length and the phases ran compiled
        t = s["ttt_summary"]
        assert t["lora_steps_rank0"] > 0 and t["phases_done"] == 2 and t["cut"] is None
    for stage in ("compile", "train", "pre_quant_eval", "calibration", "gptq", "pack", "load", "audit", "eval"):
        assert s["stage_ms"][stage] > 0, stage
    assert s["wall_ms"] > sum(s["stage_ms"].values()) * 0.9
    # the evaluation graphs compiled in the warm-up count in the evaluation's time, not in neither budget
    assert 0 < s["eval_compile_ms"] < s["stage_ms"]["compile"]
    assert s["eval_time_ms"] == pytest.approx(s["eval_measured_ms"] + s["eval_compile_ms"])
    assert f"eval_time: {s['eval_time_ms']:.0f}ms = {s['eval_measured_ms']:.0f}ms from the artifact's load" in log


# --- the attention kernel: never slower without a word --------------------------------------------------

def test_cuda_without_flash_attn_is_an_error_unless_sdpa_is_allowed(monkeypatch):
    """A torch reinstalled under a flash-attn wheel built for another torch stops flash-attn importing;
    the old code then trained with SDPA, said so only in the log file, and every step was slower."""
    from _helpers import tiny_hp
    cuda = torch.device("cuda", 0)          # a device object only: nothing runs on it
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", None)
    with pytest.raises(train_gpt.PipelineError, match="ALLOW_SDPA=1"):
        train_gpt.check_attention_backend(tiny_hp(), cuda, train_gpt.attention_backend(cuda, torch.bfloat16))
    line = train_gpt.check_attention_backend(tiny_hp(ALLOW_SDPA=1), cuda, "sdpa")
    assert line.startswith("attention: sdpa") and "ALLOW_SDPA=1" in line
    assert train_gpt.check_attention_backend(tiny_hp(), torch.device("cpu"), "sdpa").startswith("attention: sdpa")
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", lambda *a, **k: None)
    monkeypatch.setattr(train_gpt, "FLASH_VARLEN_FUNC", lambda *a, **k: None)
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_SOURCE", "flash_attn_interface 3.0.0b1")
    assert train_gpt.attention_backend(cuda, torch.bfloat16) == "flash"
    assert train_gpt.check_attention_backend(tiny_hp(), cuda, "flash") == ("attention: flash (flash_attn_interface "
                                                                           "3.0.0b1), varlen per document")


def test_the_attention_kernel_is_named_on_the_console(demo_data, tmp_path):
    from test_pipeline import run_train
    proc = run_train(tmp_path, demo_data, RUN_ID="console", ITERATIONS=1, EVAL_STRIDE=0, GPTQ_CALIBRATION="none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "attention: sdpa (PyTorch scaled_dot_product_attention; on the CPU)" in proc.stdout.splitlines()


def untraceable_flash(q, k, v, causal=True):
    """A flash-attn build dynamo cannot trace (a kernel called through an opaque extension): a graph break."""
    torch._dynamo.graph_break()
    y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=causal, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


def test_a_flash_attn_that_torch_compile_cannot_trace_is_reported_at_warm_up(monkeypatch):
    """fullgraph=True makes the graph break an error at the warm-up, before the clock; the report names the
    kernel and what to install instead of a dynamo traceback."""
    from _helpers import cpu_runtime, tiny_hp
    from test_liveness import FixedBatches
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_FUNC", untraceable_flash)
    monkeypatch.setattr(train_gpt, "FLASH_ATTN_SOURCE", "flash_attn 2.0.0")
    hp = tiny_hp(ITERATIONS=2, MAX_WALLCLOCK_SECONDS=0, VAL_LOSS_EVERY=0, COMPILE_WARMUP_STEPS=1,
                 ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole")          # the dense kernel is the untraceable one here
    model = train_gpt.GPT(hp)
    model.set_attention_backend("flash")
    torch._dynamo.reset()
    with pytest.raises(train_gpt.PipelineError) as err:
        train_gpt.train(hp, cpu_runtime(), model, train_gpt.compile_model(model), FixedBatches(hp),
                        lambda *a, **k: None, lambda *a: None)
    torch._dynamo.reset()
    assert "torch.compile failed in the warm-up" in str(err.value) and "Traceback" not in str(err.value)
    assert "the attention kernel is flash_attn 2.0.0: torch.compile needs a flash-attn build made for torch" in str(err.value)


def test_ddp_graphs_are_not_split_by_default():
    """Every April record turned dynamo's DDPOptimizer off (it split each training graph in 6-7 pieces);
    COMPILE_OPTIMIZE_DDP=1 turns it back on."""
    import torch._dynamo.config as dynamo_config
    from _helpers import tiny_hp
    saved = dynamo_config.optimize_ddp
    try:
        dynamo_config.optimize_ddp = True                     # torch's own default
        assert tiny_hp().compile_optimize_ddp == 0
        train_gpt.compile_model(torch.nn.Identity(), bool(tiny_hp().compile_optimize_ddp))
        assert dynamo_config.optimize_ddp is False
        train_gpt.compile_model(torch.nn.Identity(), bool(tiny_hp(COMPILE_OPTIMIZE_DDP=1).compile_optimize_ddp))
        assert dynamo_config.optimize_ddp is True
    finally:
        dynamo_config.optimize_ddp = saved
