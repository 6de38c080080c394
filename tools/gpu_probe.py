"""One-GPU probe of the 8xH100 run, part by part: each part of a training step and of the evaluation, run in
isolation on one CUDA GPU at the settings' shape (the April defaults unless the environment says otherwise), timed
(synchronised) and with its peak allocated memory, then the 8xH100 projection built from those times, beside the
CPU-side projections (tools/harness.py gpu-plan, and eval_projection at the records' rates). tools/gpu_rehearsal.sh
runs it under `timeout`.

    python3 tools/gpu_probe.py [--json PATH] [--cap-seconds 490] [--no-plan]

Parts, in this order (PARTS), each under its own deadline and all under --cap-seconds:
  attention        one flash varlen attention forward + backward at a rank's micro-batch (48 x 2,048 at the defaults),
                   documents of DOC_TOKENS, through the bounded cu_seqlens (varlen_capacity)
  optimizer        one optimizer step (build_optimizers, the gradient clip: AdamW, and Muon's Newton-Schulz over every
                   matrix on this one GPU); Muon alone; Muon's work per matrix of each shape (a rank's share on 8 GPUs)
  train_off        compile (the first micro-step less a steady one) and the micro-step (forward + backward of the
  train_on         micro-batch through compile_model's graph, with its capacity) with depth recurrence off, then on;
                   the optimizer's states and the EMA are held, as in training
  lora_step        one LoRA TTT chunk step (LoRATestTimeTrainer.chunk_step) of the first batch at the full window:
                   lora_rows() documents of LONGEST_DOC_TOKENS (random tokens, a BOS at each start), the validation
                   stream (--split-tokens) on the device
  eval_forward     one scoring forward of the final evaluation's batch (score_windows, eval_batch_seqs rows on 8 GPUs)
  lora_first_step  that batch's first chunk step (fresh adapters, rows of the shortest length): with lora_step it splits
                   a LoRA step's time into a fixed part and a part per token

A part that runs past its deadline (SIGALRM) or the cap ends the run: the table and the JSON say what was measured
and why it stopped. Another error in a part (out of memory, a dynamo error in its own words) is reported and the next
part runs; a part the settings do not use (the LoRA steps without LoRA TTT) is skipped. Exit 0: every other part
measured; 1: a part failed or the run was stopped; 2: refused before anything ran (no CUDA GPU, no flash-attn,
settings a run would refuse, an existing --json). REHEARSAL_ALLOW_CPU=1 runs every part on the CPU (SDPA, eager
unless COMPILE=1) at whatever shape the settings give: the plumbing tests (tests/test_rehearsal.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_gpt as tg  # noqa: E402

DOC_TOKENS = 811                 # FineWeb's mean validation document: 40,540,160 sp8192 tokens / 50,000 documents
LONGEST_DOC_TOKENS = 97_114      # its longest, the first LoRA batch's (#1855's logs: `ttp: b782/782 ... dl:30339-97114`)
SPLIT_TOKENS = 40_540_160        # FineWeb's sp8192 validation split (docs: RULES.md): the stream on the device
LENGTHS_FILE = REPO / "tools" / "fineweb_doc_ranges_1855.json"   # FineWeb-like lengths when DATA_PATH has no val shards
FA3_INSTALL = ("pip install --no-deps flash_attn_3 --find-links "
               "https://windreamer.github.io/flash-attention3-wheels/cu128_torch291/")   # #1855's requirements.txt
CAP_S = 490.0                    # the whole probe; tools/gpu_rehearsal.sh's `timeout` is 30 s longer
REPORT_RESERVE_S = 30.0          # kept from the cap for the projection, the CPU-side plan and the report
ASSUMED_BUS_GB_S = 200.0         # NCCL bus bandwidth on 8xH100 NVLink, assumed (not measured here: one GPU)
GPUS = tg.PROJECTION_GPUS


@dataclass
class Part:
    name: str
    what: str
    deadline_s: float            # on CUDA; compile dominates the parts that compile (their times are the unknown)
    run: Callable[["Probe"], dict]
    skip: Callable[[tg.Hyperparameters], str] = lambda hp: ""    # why the part does not apply to these settings


class PartTimeout(BaseException):
    """A part's deadline passed (SIGALRM). A BaseException, so that no `except Exception` on the way (dynamo wraps
    what a compile raises) turns it into another error."""


ALARM = {"fired": False}


def _alarm(signum, frame):
    ALARM["fired"] = True
    raise PartTimeout()


@dataclass
class Record:
    """One part's outcome: status ok / error / timeout / not run; seconds (the whole part, compiles included), the
    peak allocated memory while it ran and what was held when it began (GiB, CUDA only), and what it measured."""
    name: str
    status: str = "not run"
    why: str = ""
    seconds: float | None = None
    peak_gib: float | None = None
    peak_reserved_gib: float | None = None
    held_gib: float | None = None
    result: dict = field(default_factory=dict)


class Probe:
    """The model, its compiled form and the synthetic data every part shares, built once (build())."""

    def __init__(self, hp: tg.Hyperparameters, rt: tg.Runtime, split_tokens: int, longest_doc: int):
        self.hp, self.rt = hp, rt
        self.cuda = rt.device.type == "cuda"
        self.compiled = hp.compile == 1 or (hp.compile == -1 and self.cuda)
        self.split_tokens, self.longest_doc = split_tokens, longest_doc
        self.window, self.stride = tg.eval_geometry(hp)
        self.final_recurrence = tg.run_states(hp)[-1][0]        # the state training ends in: the evaluation's
        self.optimizers, self.ema, self.lora = None, None, None

    def build(self) -> None:
        hp, rt = self.hp, self.rt
        self.model = tg.build_model(hp, rt)
        self.backend = self.model.blocks[0].attn.backend
        self.run_model = tg.compile_model(self.model, bool(hp.compile_optimize_ddp)) if self.compiled else self.model
        rng = np.random.default_rng(hp.seed)
        self.train_rows = tg.micro_batch_tokens(hp, GPUS) // hp.train_seq_len
        ids = rng.integers(tg.BOS_ID + 1, hp.vocab_size, (self.train_rows, hp.train_seq_len))
        ids.reshape(-1)[::DOC_TOKENS] = tg.BOS_ID                      # documents of DOC_TOKENS across the rows
        self.train_segments = tg.count_segments(ids)
        self.train_capacity = tg.varlen_capacity(self.train_rows, hp.train_seq_len, self.train_segments)
        self.train_x = tg.to_device(ids, rt.device)
        self.train_y = tg.to_device(rng.integers(tg.BOS_ID + 1, hp.vocab_size, ids.shape), rt.device)
        self.lora_rows = tg.lora_rows(hp, self.window)
        self.eval_rows = tg.eval_batch_seqs(hp, tg.Runtime(0, GPUS, 0, rt.device, False, None, None), self.split_tokens,
                                            self.window, self.stride, hp.eval_mode)
        self.eval_from = self.lora_rows * self.longest_doc
        self.stream = None

    def validation_stream(self) -> torch.Tensor:
        """The validation stream on the device, made when an evaluation part first needs it (training does not hold
        it): lora_rows() documents of longest_doc first, then documents of DOC_TOKENS; its BOS prefix counts on the
        host (bos_cum)."""
        if self.stream is None:
            n = max(self.split_tokens, self.eval_from + self.eval_rows * self.window + 1)
            stream = np.random.default_rng(self.hp.seed + 1).integers(tg.BOS_ID + 1, self.hp.vocab_size, n)
            stream[:self.eval_from:self.longest_doc] = tg.BOS_ID
            stream[self.eval_from::DOC_TOKENS] = tg.BOS_ID
            self.bos_cum = tg.bos_prefix(stream)
            self.stream = tg.to_device(stream, self.rt.device)
        return self.stream

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.rt.device)

    def timed(self, fn: Callable[[], object], reps: int) -> tuple[float, list[float]]:
        """(seconds of the first call, seconds of each of `reps` calls after it), each call synchronised."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        first, steady = time.perf_counter() - t0, []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            steady.append(time.perf_counter() - t0)
        return first, steady

    def training_state(self) -> None:
        self.model.train()
        for p in self.model.parameters():
            p.requires_grad_(True)
            p.grad = None

    def evaluation_state(self, grad: bool) -> None:
        """As the evaluation runs: the training optimizers and the EMA gone, eval mode, the final recurrence state;
        the base weights frozen for LoRA TTT (grad=False), as evaluate() leaves them for scoring (grad=True)."""
        self.optimizers = self.ema = None
        self.model.eval()
        self.model.recurrence_on = self.final_recurrence
        for p in self.model.parameters():
            p.requires_grad_(grad)
            p.grad = None


def _ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def part_attention(p: Probe, reps: int) -> dict:
    hp, dev = p.hp, p.rt.device
    rows, t = p.train_rows, hp.train_seq_len
    heads, kv, d = hp.num_heads, hp.num_kv_heads, hp.model_dim // hp.num_heads
    dtype = tg.FLASH_DTYPE if p.backend == "flash" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(rows, t, h, d, generator=gen, device=dev, dtype=dtype).requires_grad_()
               for h in (heads, kv, kv))
    grad = torch.randn(rows, t, heads, d, generator=gen, device=dev, dtype=dtype)
    varlen = (tg.document_ids(p.train_x), p.train_capacity) if hp.attn_doc_isolation else None

    def once():
        tg.causal_attention(q, k, v, p.backend, varlen).backward(grad)
        q.grad = k.grad = v.grad = None

    _, steady = p.timed(once, reps)
    return dict(ms=_ms(steady), rows=rows, seq_len=t, backend=p.backend, segments=p.train_segments,
                cu_seqlens_entries=p.train_capacity if hp.attn_doc_isolation else None,
                fa3_accumulators_gib_modelled=tg.fa3_backward_bytes(rows * t, p.train_capacity, heads, kv, d) / tg.GIB
                if hp.attn_doc_isolation else None)


def part_optimizer(p: Probe, reps: int) -> dict:
    """Gradients are random (the step's work does not depend on their values); the states it makes stay held for the
    training parts, with an EMA, as in training."""
    hp = p.hp
    p.training_state()
    p.optimizers = tg.build_optimizers(p.model, hp, p.rt)
    trained = [q for opt in p.optimizers for group in opt.param_groups for q in group["params"]]
    gen = torch.Generator(device=p.rt.device).manual_seed(1)
    for q in trained:
        q.grad = 1e-3 * torch.randn(q.shape, generator=gen, device=q.device, dtype=q.dtype)

    def step():
        if hp.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(trained, hp.grad_clip_norm)
        for opt in p.optimizers:
            opt.step()

    first, steady = p.timed(step, reps)
    muon = p.optimizers[2]
    _, muon_steady = p.timed(muon.step, reps)
    groups = []
    for group in muon.param_groups:
        _, per_matrix = p.timed(lambda: muon._update(group["params"][0], group), reps)
        groups.append(dict(shape=list(group["params"][0].shape), matrices=len(group["params"]), update_ms=_ms(per_matrix)))
    for q in trained:
        q.grad = None
    p.ema = tg.WeightEMA(p.model, hp.ema_horizon_frac) if hp.ema_horizon_frac > 0 else None
    return dict(step_ms=_ms(steady), first_ms=1e3 * first, muon_ms=_ms(muon_steady), muon_groups=groups,
                grad_bytes=sum(q.numel() * 4 for q in p.model.parameters()))


def part_train(p: Probe, reps: int, recurrence: bool) -> dict:
    hp = p.hp
    p.training_state()
    p.model.recurrence_on = recurrence

    def micro_step():
        with tg.autocast(p.rt):
            loss = p.run_model(p.train_x, p.train_y, p.train_capacity).mean()
        loss.backward()
        for q in p.model.parameters():
            q.grad = None

    graphs = tg.compiled_graphs() if p.compiled else 0
    first, steady = p.timed(micro_step, reps)
    step_ms = _ms(steady)
    return dict(step_ms=step_ms, compile_s=max(0.0, first - step_ms / 1e3), compiled=p.compiled,
                graphs=(tg.compiled_graphs() - graphs) if p.compiled else 0, rows=p.train_rows, seq_len=hp.train_seq_len,
                tokens=p.train_rows * hp.train_seq_len, recurrence=recurrence, layers_run=tg.effective_layers(hp, recurrence))


def _lora_trainer(p: Probe):
    if p.lora is None:
        p.evaluation_state(grad=False)
        adapters = tg.TTTLoRA(p.hp, p.model, p.lora_rows, p.rt.device, p.final_recurrence)
        p.lora = tg.LoRATestTimeTrainer(p.hp, p.rt, p.model, p.run_model, p.window, adapters)
    p.evaluation_state(grad=False)
    return p.lora


def lora_steps(hp: tg.Hyperparameters, rows: int, longest: int, window: int) -> tuple[tg.LoRAStep, tg.LoRAStep]:
    """(the first step, the first step at the full window) of a batch of `rows` documents of `longest` inputs laid end
    to end from input 0, as LoRASchedule plans them."""
    spans = np.array([[r * longest, (r + 1) * longest] for r in range(rows)], dtype=np.int64)
    schedule = tg.LoRASchedule([spans], rows, hp.ttt_lora_chunk, window)
    first = step = schedule.plan()
    while step.length < window:
        schedule.advance()
        if schedule.done():
            raise ValueError(f"documents of {longest} tokens never reach the window {window}")
        step = schedule.plan()
    return first, step


def _meta(step: tg.LoRAStep, device: torch.device) -> torch.Tensor:
    return tg.to_device(np.stack([step.start, step.valid, step.score_from, step.score_to, step.learn,
                                  step.fresh]).astype(np.int64), device)


def part_lora(p: Probe, reps: int, which: str) -> dict:
    trainer = _lora_trainer(p)
    first, full = lora_steps(p.hp, p.lora_rows, p.longest_doc, p.window)
    step = full if which == "full" else first
    meta = _meta(step, p.rt.device)
    stream = p.validation_stream()
    t_first, steady = p.timed(lambda: trainer.chunk_step(stream, step, meta, None), reps)
    step_ms = _ms(steady)
    return dict(step_ms=step_ms, compile_s=max(0.0, t_first - step_ms / 1e3), rows=p.lora_rows, length=step.length,
                tokens=p.lora_rows * step.length, document_tokens=p.longest_doc, fresh=bool(step.fresh.any()),
                stream_tokens=int(stream.numel()))


def part_eval_forward(p: Probe, reps: int) -> dict:
    p.evaluation_state(grad=True)
    w, rows, stream = p.window, p.eval_rows, p.validation_stream()
    starts = p.eval_from + np.arange(rows, dtype=np.int64) * w

    def forward():
        tg.score_windows(p.hp, p.rt, p.run_model, stream, starts, np.zeros(rows, dtype=np.int64),
                         np.full(rows, w, dtype=np.int64), w, rows, False, None, p.bos_cum)

    t_first, steady = p.timed(forward, reps)
    ms = _ms(steady)
    return dict(ms=ms, compile_s=max(0.0, t_first - ms / 1e3), rows=rows, window=w, tokens=rows * w)


def _no_lora(hp: tg.Hyperparameters) -> str:
    return "" if hp.ttt_enabled and hp.ttt_method == "lora" else "the settings run no LoRA TTT"


def _no_recurrence(hp: tg.Hyperparameters) -> str:
    return "" if hp.recur_layers else "RECUR_LAYERS is empty: no recurrence"


REPS = 5                       # steady calls timed after the first of each part (the median is reported)
PARTS = [
    Part("attention", "attention fwd+bwd, a rank's micro-batch", 60, lambda p: part_attention(p, 2 * REPS)),
    Part("optimizer", "optimizer step (AdamW + Muon on every matrix)", 60, lambda p: part_optimizer(p, REPS)),
    Part("train_off", "compile + micro-step, recurrence off", 170, lambda p: part_train(p, REPS, False)),
    Part("train_on", "compile + micro-step, recurrence on", 200, lambda p: part_train(p, REPS, True), _no_recurrence),
    Part("lora_step", "compile + LoRA chunk step, full window", 200, lambda p: part_lora(p, REPS, "full"), _no_lora),
    Part("eval_forward", "compile + scoring forward", 120, lambda p: part_eval_forward(p, REPS)),
    Part("lora_first_step", "compile + LoRA chunk step, first (shortest)", 150, lambda p: part_lora(p, REPS, "first"),
         _no_lora),
]


def run_parts(probe: Probe, parts: list[Part], cap_s: float, t_start: float, log=print) -> tuple[list[Record], str]:
    """Run the parts in order, each under min(its deadline, what the cap leaves less REPORT_RESERVE_S); returns their
    records and why the run stopped ('' when every part ran). A timeout ends the run; another error is recorded and
    the next part runs. On the CPU a part's deadline is not scaled: the tests' tiny shapes take seconds."""
    records, stopped = [Record(part.name) for part in parts], ""
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for part, rec in zip(parts, records):
            if part.skip(probe.hp):
                rec.status, rec.why = "skipped", part.skip(probe.hp)
                continue
            left = cap_s - REPORT_RESERVE_S - (time.perf_counter() - t_start)
            if left < 1.0:
                stopped = f"the cap: {cap_s:g} s (less {REPORT_RESERVE_S:g} s for the report) was spent before {part.name}"
                rec.why = stopped
                break
            limit = min(part.deadline_s, left)
            gc.collect()
            if probe.cuda:
                probe.sync()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(probe.rt.device)
                rec.held_gib = torch.cuda.memory_allocated(probe.rt.device) / tg.GIB
            log(f"gpu_probe: {part.name}: {part.what} (deadline {limit:.0f} s)")
            t0 = time.perf_counter()
            ALARM["fired"] = False
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                rec.result = part.run(probe)
                rec.status = "ok"
            except BaseException as e:
                signal.setitimer(signal.ITIMER_REAL, 0)
                if isinstance(e, PartTimeout) or ALARM["fired"]:      # the alarm, however it came out of the part
                    rec.status, rec.why = "timeout", f"over its deadline of {limit:.0f} s" + (
                        " (what the cap left)" if limit < part.deadline_s else "")
                    stopped = f"{part.name} ran over its deadline of {limit:.0f} s"
                elif isinstance(e, torch._dynamo.exc.TorchDynamoException):
                    rec.status, rec.why = "error", f"torch.compile failed ({tg.compile_failure(e)})"
                elif isinstance(e, Exception):     # out of memory, a kernel's refusal: reported, the next part runs
                    traceback.print_exc()
                    said = str(e).splitlines()[0] if str(e) else ""
                    rec.status, rec.why = "error", f"{type(e).__name__}: {said}"
                else:
                    raise
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if probe.cuda and rec.status != "timeout":
                probe.sync()
            rec.seconds = time.perf_counter() - t0
            if probe.cuda:
                rec.peak_gib = torch.cuda.max_memory_allocated(probe.rt.device) / tg.GIB
                rec.peak_reserved_gib = torch.cuda.max_memory_reserved(probe.rt.device) / tg.GIB
            log(f"gpu_probe: {part.name}: {rec.status} in {rec.seconds:.1f} s {rec.why}".rstrip())
            if stopped:
                break
    finally:
        signal.signal(signal.SIGALRM, old)
    for rec in records:
        if rec.status == "not run" and not rec.why:
            rec.why = f"the run stopped: {stopped}"
    return records, stopped


# --- the 8xH100 projection, from the parts' times ------------------------------------------------------------------

def projection_stream(hp: tg.Hyperparameters, split_tokens: int) -> tuple[np.ndarray, int, str]:
    """(a token stream whose documents have the lengths to project from, the split's tokens it stands for, where the
    lengths come from): the validation shards at DATA_PATH (scaled to split_tokens), else FineWeb-like lengths
    rebuilt from #1855's logged TTT batches (tools/eval_projection_fit.py; CaseOps tokens: 49.95M, 23% more than the
    sp8192 split's 40.5M; projected at their own size). Only the BOS positions matter."""
    try:
        tokens, _ = tg.load_validation_tokens(hp.data_path, hp.vocab_size, hp.val_max_tokens)
        return tokens, split_tokens, f"the validation shards at {hp.data_path}, scaled to {split_tokens} tokens"
    except tg.PipelineError:
        pass
    from tools.eval_projection_fit import lengths_from_ranges
    ranges = json.loads(LENGTHS_FILE.read_text())["batches"]
    lengths = lengths_from_ranges({k: (lo, hi) for k, lo, hi in ranges}) + 1      # tokens per document, BOS included
    tokens = np.full(int(lengths.sum()) + 1, tg.BOS_ID + 1, dtype=np.uint8)          # 50 MB: only BOS matters
    tokens[np.concatenate(([0], np.cumsum(lengths)[:-1]))] = tg.BOS_ID
    return tokens, tokens.size, (f"no validation shards at {hp.data_path}: {lengths.size} FineWeb-like documents rebuilt "
                                 f"from #1855's logged TTT batches ({LENGTHS_FILE.name}), {tokens.size} tokens")


def lora_step_model(hp: tg.Hyperparameters, window: int, full: dict | None, first: dict | None) -> dict | None:
    """A LoRA chunk step's seconds as fixed + per_token x (rows x length): the line through the two measured steps,
    clamped at 0 (with only the full step: its time as the fixed part, an upper bound, and as all per token, a lower
    bound)."""
    if full is None:
        return None
    t_full, n_full = full["step_ms"] / 1e3, full["tokens"]
    if first is None or first["tokens"] >= n_full:
        return dict(fixed_s=None, per_token_s=None, upper=dict(fixed_s=t_full, per_token_s=0.0),
                    lower=dict(fixed_s=0.0, per_token_s=t_full / n_full))
    t_first, n_first = first["step_ms"] / 1e3, first["tokens"]
    per_token = max(0.0, (t_full - t_first) / (n_full - n_first))
    fixed = t_first - per_token * n_first
    if fixed < 0:
        fixed, per_token = 0.0, t_full / n_full
    return dict(fixed_s=fixed, per_token_s=per_token)


def lora_ttt_seconds(hp: tg.Hyperparameters, tokens: np.ndarray, split_tokens: int, window: int, fixed_s: float,
                     per_token_s: float) -> float:
    """The busiest rank's LoRA TTT seconds on GPUS ranks (eval_projection's count, at a measured step time): per phase
    segment, each rank's batches (lora_batches) at fixed_s a step plus per_token_s a forward token (lora_schedule_work),
    the busiest rank's, or the work over the ranks when the stream is a part of the split."""
    scale = split_tokens / tokens.size
    w = min(window, tokens.size - 1)
    spans = tg.document_spans(tokens)
    order = np.argsort(-(spans[:, 1] - spans[:, 0]), kind="stable")
    bounds, rows, total = tg.phase_boundaries(hp, len(spans)), tg.lora_rows(hp, w), 0.0
    for lo, hi in zip([0] + bounds, bounds + [len(spans)]):
        ranks = [sum(steps * fixed_s + n * per_token_s for steps, n in
                     (tg.lora_schedule_work([b], rows, hp.ttt_lora_chunk, w) for b in mine))
                 for mine in tg.lora_batches(spans[order[lo:hi]], rows, hp.ttt_lora_chunk, w, GPUS)]
        total += max(max(ranks), scale * sum(ranks) / GPUS)
    return total


def projection(hp: tg.Hyperparameters, measured: dict[str, dict], tokens: np.ndarray, split_tokens: int) -> dict:
    """The 8xH100 projection from the parts' results (`measured`: {part: its result}, the parts that ran):

    training step = the micro-step (a rank's micro-batch: one per step on 8 GPUs) + the optimizer step on 8 GPUs (the
    measured step less Muon's work on every matrix, plus a rank's share: per shape, ceil(matrices / 8) updates) +
    communication (DDP's all-reduce of the fp32 gradients and Muon's all-gather of bf16 updates at ASSUMED_BUS_GB_S:
    assumed, and counted in full though DDP overlaps it with backward); steps in the training time, recurrence off
    before RECUR_START_FRAC of it and on after (late QAT's slower graph not measured).
    evaluation: load assumed (EVAL_LOAD_ASSUMED_S); compile = the measured compiles of the graphs it compiles (the
    scoring forward for both scoring shapes, the two LoRA steps measured and their mean for the other row lengths, the
    recurrence-on micro-step for a phase's step); the plain pass and scoring at the measured forward time per token;
    LoRA TTT from the two LoRA steps (lora_step_model, lora_ttt_seconds); the phases' tokens at the recurrence-on
    micro-step's time per token (scaled by FLOPs per token to the window); the audit (EVAL_AUDIT=1) as eval_projection
    counts it. A part that did not run leaves what needs it null."""
    out: dict = {"train": {}, "eval": {}}
    tr = out["train"]
    opt, off, on = measured.get("optimizer"), measured.get("train_off"), measured.get("train_on")
    if not hp.recur_layers:         # one training graph: train_on was skipped
        on = off
    if opt is not None:
        muon_all = sum(g["matrices"] * g["update_ms"] for g in opt["muon_groups"])
        muon_share = sum(math.ceil(g["matrices"] / GPUS) * g["update_ms"] for g in opt["muon_groups"])
        tr["optimizer_ms"] = opt["step_ms"] - muon_all + muon_share
        gather = sum(math.ceil(g["matrices"] / GPUS) * (GPUS - 1) * math.prod(g["shape"]) * 2 for g in opt["muon_groups"])
        reduce = 2 * (GPUS - 1) / GPUS * opt["grad_bytes"]
        tr["communication_ms_assumed"] = 1e3 * (gather + reduce) / (ASSUMED_BUS_GB_S * 1e9)
    for name, rec in (("recurrence_off", off), ("recurrence_on", on)):
        tr[f"step_ms_{name}"] = (rec["step_ms"] + tr["optimizer_ms"] + tr["communication_ms_assumed"]
                                 if rec is not None and opt is not None else None)
    train_ms = tg.training_deadline_ms(hp) - (1e3 * hp.gptq_reserve_seconds if hp.gptq_calibration == "train" else 0.0)
    s_off, s_on = tr["step_ms_recurrence_off"], tr["step_ms_recurrence_on"]
    if s_on is not None and (s_off is not None or not hp.recur_layers):
        f = hp.recur_start_frac if hp.recur_layers else 0.0
        tr["steps_in_600s"] = f * train_ms / (s_off or s_on) + (1 - f) * train_ms / s_on
        tr["tokens_per_s_recurrence_on"] = hp.train_batch_tokens / (s_on / 1e3)
        tr["mfu_recurrence_on"] = (tg.flops_per_token(hp, hp.train_seq_len) * hp.train_batch_tokens
                                   / (s_on / 1e3 * GPUS * tg.H100_BF16_DENSE_FLOPS))
    else:
        tr["steps_in_600s"] = tr["tokens_per_s_recurrence_on"] = tr["mfu_recurrence_on"] = None

    ev = out["eval"]
    window, stride = tg.eval_geometry(hp)
    w = min(window, tokens.size - 1)
    scale = split_tokens / tokens.size
    fwd = measured.get("eval_forward")
    per_token = fwd["ms"] / 1e3 / fwd["tokens"] if fwd is not None else None          # s per forward token, one GPU
    fpt = lambda t: tg.flops_per_token(hp, t)  # noqa: E731
    ev["load"] = tg.EVAL_LOAD_ASSUMED_S
    lora_on = hp.ttt_enabled and hp.ttt_method == "lora"
    full, first = measured.get("lora_step"), measured.get("lora_first_step")
    compiles = [fwd and 2 * fwd["compile_s"]]
    if lora_on:
        measured_lora = [r["compile_s"] for r in (full, first) if r is not None]
        n_lengths = len(tg.lora_lengths(w))
        compiles.append(sum(measured_lora) + (n_lengths - len(measured_lora)) * statistics.mean(measured_lora)
                        if measured_lora else None)
    if hp.ttt_enabled and (hp.ttt_method == "whole" or hp.ttt_phases):
        compiles.append(on and on["compile_s"])
    ev["compile"] = sum(compiles) if all(c is not None for c in compiles) else None
    if per_token is not None:
        plain = len(tg.sliding_windows(tokens.size, hp.train_seq_len, hp.train_seq_len)[0]) * min(hp.train_seq_len,
                                                                                                   tokens.size - 1)
        ev["plain"] = plain * scale / GPUS * per_token * fpt(hp.train_seq_len) / fpt(w)
        ev["scoring"] = len(tg.scoring_windows(hp.eval_mode, tokens, window, stride)[0]) * w * scale / GPUS * per_token
        ev["audit"] = 3 * w * (max(hp.vocab_size, 1) + 2 * 7) / GPUS * per_token if hp.eval_audit else 0.0
    else:
        ev["plain"] = ev["scoring"] = ev["audit"] = None
    train_token_s = on["step_ms"] / 1e3 / on["tokens"] * fpt(w) / fpt(hp.train_seq_len) if on is not None else None
    ev["ttt"], ev["ttt_lora_step_model"] = 0.0, None
    if lora_on:
        model = lora_step_model(hp, w, full, first)
        ev["ttt_lora_step_model"] = model
        if model is not None and model["fixed_s"] is not None:
            ev["ttt"] = lora_ttt_seconds(hp, tokens, split_tokens, window, model["fixed_s"], model["per_token_s"])
        elif model is not None:
            ev["ttt_lora_bounds"] = [lora_ttt_seconds(hp, tokens, split_tokens, window, **model[k]) for k in ("lower", "upper")]
            ev["ttt"] = None
        else:
            ev["ttt"] = None
        spans = tg.document_spans(tokens)
        lengths = np.sort(spans[:, 1] - spans[:, 0])[::-1]
        bounds = tg.phase_boundaries(hp, len(spans))
        phase_tokens = sum(int(lengths[:b].sum()) for b in bounds) * scale
        ev["phases"] = phase_tokens / GPUS * train_token_s if train_token_s is not None else (None if bounds else 0.0)
    elif hp.ttt_enabled:
        chunks = -(-(tokens.size - 1) // hp.ttt_chunk_tokens)
        tokens_trained = hp.ttt_epochs * (chunks - 1) * hp.ttt_chunk_tokens * scale
        ev["ttt"] = tokens_trained / GPUS * train_token_s if train_token_s is not None else None
        ev["phases"] = 0.0
    else:
        ev["phases"] = 0.0
    keys = ["load", "compile", "plain", "ttt", "phases", "audit"] + ([] if lora_on else ["scoring"])
    ev["total"] = sum(ev[k] for k in keys) if all(ev[k] is not None for k in keys) else None
    return out


# --- the CPU-side projections, for comparison -----------------------------------------------------------------------

def start_plan(split_tokens: int) -> subprocess.Popen:
    """tools/harness.py gpu-plan in the background (on the CPU, 2 threads, niced): its training and TTT peaks."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    return subprocess.Popen(["nice", "-n", "10", sys.executable, str(REPO / "tools" / "harness.py"), "gpu-plan",
                             "--split-tokens", str(split_tokens)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_plan(proc: subprocess.Popen | None, wait_s: float) -> dict:
    if proc is None:
        return {"error": "not run (--no-plan)"}
    try:
        out, err = proc.communicate(timeout=max(wait_s, 0.1))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"gpu-plan had not finished within the cap (stopped after {wait_s:.0f} s more)"}
    if proc.returncode != 0:
        return {"error": f"gpu-plan exit {proc.returncode}: {(err.strip().splitlines() or [''])[-1]}"}
    return json.loads(out)


def cpu_side(hp: tg.Hyperparameters, model: tg.GPT, plan: dict, tokens: np.ndarray, split_tokens: int) -> dict:
    """gpu-plan's peaks, its training peak recounted for this one process (world size 1: no DDP buckets, every Muon
    momentum), and eval_projection at the records' rates on the projection's lengths."""
    out = {"train_peak_gib": plan.get("train_peak_gib"), "ttt_peak_gib": plan.get("ttt_peak_gib"),
           "step_ms": plan.get("step_ms"), "steps_in_600s": plan.get("steps_in_600s"), "plan_error": plan.get("error")}
    if plan.get("train_saved_bytes_per_token") is not None:
        saved = tg.SavedActivations(plan["train_saved_bytes_per_token"], plan["train_saved_bytes_fixed"],
                                    plan["train_graph"] == "compiled")
        out["train_peak_gib_one_gpu"] = tg.training_peak(hp, model, saved, world_size=1)["total"]
    else:
        out["train_peak_gib_one_gpu"] = None
    out["eval_parts_records_rates"] = tg.eval_projection(hp, tokens, split_tokens, *tg.eval_geometry(hp))
    return out


# --- the report -----------------------------------------------------------------------------------------------------

def _f(x, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def measured_line(name: str, r: dict) -> str:
    """The part's main figures in a few words."""
    if name == "attention":
        return (f"{r['ms']:.1f} ms fwd+bwd ({r['rows']}x{r['seq_len']}, {r['backend']}, {r['segments']} segments, "
                f"{r['cu_seqlens_entries']} cu_seqlens entries; FA3 accumulators modelled "
                f"{_f(r['fa3_accumulators_gib_modelled'])} GiB)")
    if name == "optimizer":
        return (f"{r['step_ms']:.1f} ms a step (Muon {r['muon_ms']:.1f} ms; first {r['first_ms']:.0f} ms); per matrix: "
                + ", ".join(f"{'x'.join(map(str, g['shape']))} x{g['matrices']} {g['update_ms']:.2f} ms"
                            for g in r["muon_groups"]))
    if name.startswith("train"):
        return (f"{r['step_ms']:.1f} ms micro-step ({r['rows']}x{r['seq_len']}, {r['layers_run']} layer visits); "
                f"compile {r['compile_s']:.1f} s ({r['graphs']} graphs)" + ("" if r["compiled"] else " (eager)"))
    if name.startswith("lora"):
        return (f"{r['step_ms']:.1f} ms a step ({r['rows']} rows x {r['length']}, documents of {r['document_tokens']}); "
                f"compile {r['compile_s']:.1f} s")
    if name == "eval_forward":
        return f"{r['ms']:.1f} ms a forward ({r['rows']} rows x {r['window']}); compile {r['compile_s']:.1f} s"
    return json.dumps(r)


def report_table(records: list[Record]) -> list[str]:
    lines = ["| part | s | peak GiB | held GiB | measured |", "|---|---|---|---|---|"]
    for rec in records:
        what = measured_line(rec.name, rec.result) if rec.status == "ok" else f"{rec.status}: {rec.why}"
        lines.append(f"| {rec.name} | {_f(rec.seconds, '.1f')} | {_f(rec.peak_gib)} | {_f(rec.held_gib)} | {what} |")
    return lines


def projection_table(proj: dict, cpu: dict, records: dict[str, Record]) -> list[str]:
    tr, ev = proj["train"], proj["eval"]
    rec_eval = cpu.get("eval_parts_records_rates") or {}
    peak = lambda name: records[name].peak_gib if name in records else None  # noqa: E731
    lines = ["| 8xH100 projection | from the parts | CPU-side projection |", "|---|---|---|",
             f"| step ms, recurrence off / on | {_f(tr.get('step_ms_recurrence_off'), '.1f')} / "
             f"{_f(tr.get('step_ms_recurrence_on'), '.1f')} (optimizer {_f(tr.get('optimizer_ms'), '.1f')}, communication "
             f"{_f(tr.get('communication_ms_assumed'), '.1f')} assumed) | {_f(cpu.get('step_ms'), '.1f')} (at "
             f"{tg.ASSUMED_MFU:.0%} MFU, recurrence on) |",
             f"| steps in 600 s | {_f(tr.get('steps_in_600s'), '.0f')} (MFU {_f(tr.get('mfu_recurrence_on'), '.1%')}) | "
             f"{_f(cpu.get('steps_in_600s'), '.0f')} |",
             f"| training peak GiB | {_f(peak('train_on'))} measured on this GPU (recurrence on) | "
             f"{_f(cpu.get('train_peak_gib_one_gpu'))} for this one GPU; {_f(cpu.get('train_peak_gib'))} a rank of 8 |",
             f"| LoRA TTT peak GiB | {_f(peak('lora_step'))} measured (the full-window step) | "
             f"{_f(cpu.get('ttt_peak_gib'))} |"]
    for k in ("load", "compile", "plain", "ttt", "audit", "total"):
        value, extra = ev.get(k), ""
        if k == "ttt":              # eval_projection's 'ttt' holds the phases too
            value = ev["ttt"] + ev["phases"] if ev["ttt"] is not None and ev["phases"] is not None else None
            model = ev.get("ttt_lora_step_model") or {}
            extra = f" (phases {_f(ev['phases'], '.1f')}"
            if ev.get("ttt_lora_bounds"):
                extra += f"; LoRA between {ev['ttt_lora_bounds'][0]:.0f} and {ev['ttt_lora_bounds'][1]:.0f}"
            elif model.get("fixed_s") is not None:
                extra += f"; LoRA {model['fixed_s'] * 1e3:.1f} ms a step + {model['per_token_s'] * 1e9:.2f} ns a token"
            extra += ")"
        lines.append(f"| eval {k} s | {_f(value, '.1f')}{extra} | {_f(rec_eval.get(k), '.1f')} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the report here (default logs/gpu_probe_<UTC time>.json); "
                                                 "an existing file is never overwritten")
    ap.add_argument("--cap-seconds", type=float, default=CAP_S, help=f"the whole probe's cap (default {CAP_S:g})")
    ap.add_argument("--split-tokens", type=int, default=SPLIT_TOKENS,
                    help=f"validation tokens on the device, and the split projected (default {SPLIT_TOKENS})")
    ap.add_argument("--longest-doc", type=int, default=LONGEST_DOC_TOKENS,
                    help=f"tokens of each document of the LoRA batch (default {LONGEST_DOC_TOKENS})")
    ap.add_argument("--no-plan", action="store_true", help="skip the CPU-side gpu-plan beside the measurements")
    ap.add_argument("--check", action="store_true", help="only check that the probe can run here (exit 0) or say why not")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    # refusals first, before anything is built: one line, exit 2
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("REHEARSAL_ALLOW_CPU") != "1":
        print("gpu_probe: no CUDA GPU here (REHEARSAL_ALLOW_CPU=1 runs it on the CPU, at the settings' shape)",
              file=sys.stderr)
        return 2
    if cuda and tg.FLASH_ATTN_FUNC is None:
        print(f"gpu_probe: flash-attn does not import here (neither flash_attn_interface (FA3) nor flash_attn (FA2)) and "
              f"the 8xH100 run needs it; the records ran torch 2.9.1+cu128 with FA3: pip install torch==2.9.1 && "
              f"{FA3_INSTALL} (torch here: {torch.__version__})", file=sys.stderr)
        return 2
    try:
        hp, warnings = tg.read_settings(dict(os.environ))
        if cuda:
            dtype = torch.bfloat16 if hp.compute_dtype != "fp32" else None
            backend = tg.attention_backend(torch.device("cuda"), dtype)
            if backend != "flash":
                raise tg.PipelineError("COMPUTE_DTYPE=fp32 runs SDPA attention: the probe measures the run's flash path")
            tg.check_attention_backend(hp, torch.device("cuda"), backend)
        if args.split_tokens < 2 or args.longest_doc < 2:
            raise tg.PipelineError(f"--split-tokens {args.split_tokens} and --longest-doc {args.longest_doc} must be >= 2")
    except tg.PipelineError as e:
        print(f"gpu_probe: {e}", file=sys.stderr)
        return 2
    if args.check:
        return 0
    json_path = Path(args.json or REPO / "logs" / f"gpu_probe_{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}.json")
    if json_path.exists() or not json_path.parent.is_dir():
        print(f"gpu_probe: --json {json_path}: " + ("exists (never overwritten)" if json_path.exists()
                                                    else "its folder does not exist"), file=sys.stderr)
        return 2

    plan_proc = None if args.no_plan else start_plan(args.split_tokens)
    for w in warnings:
        print(f"gpu_probe: warning: {w}", file=sys.stderr)
    rt = tg.init_runtime(hp)
    probe = Probe(hp, rt, args.split_tokens, args.longest_doc)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    log(f"gpu_probe: {torch.cuda.get_device_name(rt.device) if probe.cuda else 'CPU'}, torch {torch.__version__}, "
        f"{tg.FLASH_ATTN_SOURCE or 'no flash-attn'}, cap {args.cap_seconds:g} s")
    probe.build()
    records, stopped = run_parts(probe, PARTS, args.cap_seconds, t_start, log)
    measured = {rec.name: rec.result for rec in records if rec.status == "ok"}
    stream, split, lengths_from = projection_stream(hp, args.split_tokens)
    proj = projection(hp, measured, stream, split)
    plan = finish_plan(plan_proc, args.cap_seconds - (time.perf_counter() - t_start) - 5.0)
    cpu = cpu_side(hp, probe.model, plan, stream, split)
    by_name = {rec.name: rec for rec in records}
    lines = report_table(records) + [""] + projection_table(proj, cpu, by_name)
    report = {
        "device": torch.cuda.get_device_name(rt.device) if probe.cuda else "cpu", "torch_version": torch.__version__,
        "flash_attn": tg.FLASH_ATTN_SOURCE, "attention": probe.backend, "compiled": probe.compiled,
        "shape": dict(layers=hp.num_layers, dim=hp.model_dim, vocab=hp.vocab_size, train_seq_len=hp.train_seq_len,
                      micro_batch=[probe.train_rows, hp.train_seq_len], window=probe.window, lora_rows=probe.lora_rows,
                      eval_rows=probe.eval_rows),
        "explicit_settings": sorted(hp.explicit), "cap_s": args.cap_seconds, "stopped": stopped or None,
        "wall_s": time.perf_counter() - t_start,
        "parts": {rec.name: dict(status=rec.status, why=rec.why or None, seconds=rec.seconds, peak_gib=rec.peak_gib,
                                 peak_reserved_gib=rec.peak_reserved_gib, held_gib=rec.held_gib, **rec.result)
                  for rec in records},
        "projection": proj, "lengths_from": lengths_from, "cpu_side": cpu,
        "assumptions": {"communication": f"NCCL bus bandwidth {ASSUMED_BUS_GB_S:g} GB/s (assumed, not measured)",
                        "eval_load_s": f"{tg.EVAL_LOAD_ASSUMED_S:g} (assumed)",
                        "not_measured": "DDP, late QAT's graph, the run's data loading, GPTQ and export"},
    }
    print("\n".join(lines))
    with open(json_path, "x") as f:
        json.dump(report, f, indent=2)
    print(f"gpu_probe: wrote {json_path} ({report['wall_s']:.0f} s)", file=sys.stderr)
    code = 0 if all(rec.status in ("ok", "skipped") for rec in records) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    if stopped:
        os._exit(code)     # a part cut by its deadline may leave compile workers behind: do not wait for them
    return code


if __name__ == "__main__":
    sys.exit(main())
