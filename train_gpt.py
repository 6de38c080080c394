"""Parameter Golf entry: train a GPT in 600 s on 8xH100, pack it under 16,000,000 bytes, score val_bpb.

Run:  torchrun --standalone --nproc_per_node=8 train_gpt.py      (or: python3 train_gpt.py)
Every knob is an environment variable, declared once as a field of Hyperparameters (README.md has the table).

The file reads top to bottom, each section using what stands above it (tests/test_layout.py):
  settings -> distributed setup -> data -> val_bpb tables -> quantization grid -> model -> optimizer
  -> evaluation and its self-audit -> training loop -> quantization and packing -> the pipeline
  (train, export, round-trip load on every rank, audit, score, report).
The same code runs on CPU (gloo, PyTorch SDPA, fp32) and CUDA (NCCL, flash-attn when importable,
bf16 autocast, torch.compile); the few CUDA-only lines say so.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import functools
import glob
import hashlib
import io
import json
import linecache
import lzma
import math
import os
import platform
import re
import subprocess
import sys
import time
import tokenize
import traceback
import uuid
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# -----------------------------------------------------------------------------
# CONSTANTS
# Numbers that matter, named once.
# -----------------------------------------------------------------------------

SHARD_MAGIC = 20240520           # h[0] of every challenge shard
SHARD_VERSION = 1                # h[1]
SHARD_HEADER_INTS = 256          # header length in little-endian int32
BOS_ID = 1                       # every document starts with BOS; no EOS
MAX_VOCAB_SIZE = 65536           # shards store token ids as uint16
CHALLENGE_CAP_BYTES = 16_000_000     # decimal cap: code bytes + compressed model bytes
CHALLENGE_TRAIN_SECONDS = 600.0      # training wallclock on 8xH100; training data may not be read after it
H100_BF16_DENSE_FLOPS = 989e12   # per GPU, dense bf16 (H100 SXM datasheet)
EVAL_MODES = ("documents", "sliding")
LORA_TARGETS = ("q", "k", "v", "o", "mlp", "head")     # where per-document TTT may put adapters (TTTLoRA)
LQER_FORMATS = ("asym4", "row6")  # LQER_FACTORS: how the low-rank factors are stored (lqer_correction)
# The 8xH100 evaluation projection's rates, each from a record's logs (docs/evaluation.md, "The projection"):
EVAL_FORWARD_MFU = 0.08          # a scoring pass: #1855's quantized diagnostic, 47.85M tokens in 10.6-11.6 s
TTT_ASSUMED_MFU = 0.028          # global phases and whole-model TTT: #1855's three phases, 40.3M tokens in 75-84 s
LORA_STEP_S = 0.055              # a LoRA chunk step's fixed time, beside its tokens at LORA_TTT_MFU of 2/3 of the
LORA_TTT_MFU = 0.5               # training FLOPs (no weight gradients): the fit of #1855's TTT times, 455-509 s
EVAL_LOAD_ASSUMED_S = 5.0        # reading and decompressing the artifact on every rank (assumed, not measured)
EVAL_COMPILE_ASSUMED_S = 150.0   # compiling the evaluation's graphs (assumed: #1855's LoRA compile took 84-153 s)
ASSUMED_MFU = 0.28               # 8xH100 training projection: accepted records ran at 26-33% MFU
PROJECTION_GPUS = 8
ARTIFACT_MAGIC = b"PGOLF1\n"     # our own artifact layout (no pickle), see pack_artifact

# MUON_NS_COEFFS: the (a, b, c) of each Newton-Schulz iteration of Muon (zeropower_newton_schulz)
NEWTON_SCHULZ_COEFFS = {
    # modded-nanogpt's quintic: the same (a, b, c) at every iteration
    "quintic": ((3.4445, -4.7750, 2.0315),),
    # Polar Express (Amsel et al. 2025, arXiv 2505.16932), as record #1787 used them: one tuple per
    # iteration, each optimal for the singular-value range the previous ones leave; iterations past
    # the fifth repeat the last
    "polar": ((8.156554524902461, -22.48329292557795, 15.878769915207462),
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
}


class PipelineError(Exception):
    """A user-facing error: bad setting, bad file, budget overrun. Printed without a traceback."""


# -----------------------------------------------------------------------------
# THE SHIPPED CODE
# This file is the readable source. What a record ships as train_gpt.py, and what bytes_code counts, is a
# small self-extracting wrapper around its comment- and docstring-free form (ship_code; tools/ship_code.py
# writes it): every line kept, so the code that runs has this file's AST less its docstrings and its line
# numbers (tracebacks point at the same lines here); the full text would not fit in 50 kB compressed.
# The compressed bytes sit in a latin-1 string literal, one character per byte with five escaped, about
# 1.5% over the raw bytes (base85 would add 25%).
# Shipping the code compressed: the 04-05 record (#1394, lzma + base85) and #1855 (brotli + base85).
# -----------------------------------------------------------------------------

SHIPPED_FILENAME = "<train_gpt.py without comments and docstrings>"    # the shipped code's name in tracebacks
SHIP_FILTERS = [dict(id=lzma.FILTER_LZMA2, preset=9 | lzma.PRESET_EXTREME, lc=3, lp=0, pb=0)]


def shipped_form(source: bytes) -> bytes:
    """`source` (UTF-8 Python) without its comments and docstrings, every line kept (a docstring's lines go
    blank; one that was its body's only statement leaves `pass`), so every line number is unchanged and
    the AST is the source's with its docstrings removed."""
    lines = source.decode("utf-8").split("\n")
    for tok in tokenize.tokenize(io.BytesIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col].rstrip()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            doc = body[0]
            if lines[doc.lineno - 1][:doc.col_offset].strip() or lines[doc.end_lineno - 1][doc.end_col_offset:].strip():
                raise ValueError(f"line {doc.lineno}: a docstring shares its lines with other code")
            for row in range(doc.lineno, doc.end_lineno + 1):
                lines[row - 1] = ""
            if len(body) == 1:
                lines[doc.lineno - 1] = " " * doc.col_offset + "pass"
    return "\n".join(lines).encode("utf-8")


def latin1_literal(data: bytes) -> bytes:
    """`data` as the body of a '-quoted str literal of a latin-1 source file: each byte its own character,
    except backslash, quote, LF, CR and NUL, which a literal cannot hold raw and are escaped."""
    for raw, escaped in ((b"\\", b"\\\\"), (b"'", b"\\'"), (b"\n", b"\\n"), (b"\r", b"\\r")):
        data = data.replace(raw, escaped)
    return re.sub(rb"\x00(?![0-7])", rb"\\0", data).replace(b"\x00", b"\\x00")


def ship_code(source: bytes) -> bytes:
    """The train_gpt.py a record ships for the readable `source`: a latin-1 file that sets READABLE_SHA256,
    READABLE_BYTES and SHIPPED_SOURCE (shipped_form(source), xz-compressed with SHIP_FILTERS) and
    executes SHIPPED_SOURCE as itself. Deterministic: the same source gives the same bytes."""
    packed = lzma.compress(shipped_form(source), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=SHIP_FILTERS)
    return (b"# coding: latin-1\n"
            + b"import lzma;READABLE_SHA256='%s';READABLE_BYTES=%d\n" % (hashlib.sha256(source).hexdigest().encode(), len(source))
            + b"SHIPPED_SOURCE=lzma.decompress('" + latin1_literal(packed) + b"'.encode('latin-1'))\n"
            + b"exec(compile(SHIPPED_SOURCE,'%s','exec'))\n" % SHIPPED_FILENAME.encode())


with open(__file__, "rb") as _src:     # read once at start: an edit during a run changes neither what is logged nor counted
    _ON_DISK = _src.read()
if "SHIPPED_SOURCE" in globals():      # run from the shipped wrapper, which set these before executing this code
    SOURCE, SOURCE_SHA256, SOURCE_BYTES = SHIPPED_SOURCE, READABLE_SHA256, READABLE_BYTES   # noqa: F821
    linecache.cache[SHIPPED_FILENAME] = (len(SOURCE), None, [line + "\n" for line in SOURCE.decode("utf-8").split("\n")],
                                         SHIPPED_FILENAME)      # for tracebacks; mtime None: never re-read from disk
else:
    SOURCE, SOURCE_SHA256, SOURCE_BYTES = _ON_DISK, hashlib.sha256(_ON_DISK).hexdigest(), len(_ON_DISK)


def code_shipped() -> bool:
    return "SHIPPED_SOURCE" in globals()


@functools.cache
def code_bytes() -> int:
    """bytes_code: the size of what ships, the wrapper running now or the one ship_code makes of this file."""
    return len(_ON_DISK) if code_shipped() else len(ship_code(SOURCE))


# -----------------------------------------------------------------------------
# HYPERPARAMETERS
# Every knob is an environment variable declared here, once. A preset only changes defaults;
# a variable set explicitly always wins. Schedules are fractions of the run (of the wallclock
# cap, or of ITERATIONS when there is no cap), so one set of defaults serves a 3-minute CPU
# run and the 600 s 8xH100 run.
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """One environment variable's declaration: its default, one-line meaning and the rule a value must keep
    (a range, a list of choices, or a check returning what is wrong); `type` comes from the field's annotation."""
    default: object
    meaning: str
    at_least: float | None = None
    at_most: float | None = None
    above: float | None = None
    choices: tuple | None = None
    check: Callable[[object], str | None] | None = None
    type: type = str

    def parse(self, name: str, raw: str) -> object:
        """The variable's text as a value of its type; PipelineError naming it when it is not one."""
        try:
            if self.type is int:
                return int(raw)
            if self.type is float:
                value = float(raw)
                if not math.isfinite(value):
                    raise ValueError
                return value
            return raw
        except ValueError:
            raise PipelineError(f"{name}={raw!r} is not a valid {self.type.__name__}") from None

    def rule(self) -> str:
        """The rule in words ('' when there is none beyond the type), as errors and docs/settings.md's table say it."""
        if self.choices is not None:
            shown = [str(c) for c in self.choices]
            return "must be " + (" or ".join([", ".join(shown[:-1]), shown[-1]]) if len(shown) > 1 else shown[0])
        if self.above is not None:
            return "must be positive" if self.above == 0 else f"must be > {self.above}"
        if (self.at_least, self.at_most) == (0.0, 1.0):
            return "must be a fraction in [0, 1]"
        if self.at_least is not None and self.at_most is not None:
            return f"must be in {self.at_least}..{self.at_most}"
        if self.at_least == 1 and self.type is int:
            return "must be positive"
        if self.at_least is not None:
            return f"must be >= {self.at_least}"
        return "" if self.at_most is None else f"must be <= {self.at_most}"

    def error(self, name: str, value: object) -> str | None:
        """What is wrong with this value of the variable, naming it; None when it keeps the rule."""
        shown = f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"
        broken = ((self.choices is not None and value not in self.choices)
                  or (self.above is not None and not value > self.above)
                  or (self.at_least is not None and value < self.at_least)
                  or (self.at_most is not None and value > self.at_most))
        if broken:
            return f"{shown} {self.rule()}"
        problem = self.check(value) if self.check is not None else None
        return f"{shown} {problem}" if problem else None


def setting(default: object, meaning: str, **rule) -> object:
    """A Hyperparameters field declared as an environment variable (see Setting)."""
    return field(default=default, metadata={"setting": Setting(default, meaning, **rule)})


# Checks a range or a list of choices cannot say: each returns what is wrong with the value, or None.
def known_preset(name: str) -> str | None:
    return None if name in PRESETS else f"is unknown; choose one of {sorted(PRESETS)}"


def plain_file_name(name: str) -> str | None:
    return "must be a plain file name" if name and (os.sep in name or name.startswith(".")) else None


def existing_file(path: str) -> str | None:
    return "is not a file" if path and not os.path.isfile(path) else None


def new_file_in_existing_folder(path: str) -> str | None:
    if path and os.path.exists(path):
        return "already exists; it is never overwritten"
    if path and not os.path.isdir(os.path.dirname(path) or "."):
        return f"folder {os.path.dirname(path)} does not exist"
    return None


def layer_range(spec: str) -> str | None:
    try:
        parse_layer_range(spec)
    except ValueError:
        return "must look like '3-5' (or be empty)"
    return None


def name_fragments(patterns: str) -> str | None:
    return "has an empty fragment" if patterns and any(not f.strip() for f in patterns.split(",")) else None


def lora_target_list(targets: str) -> str | None:
    names = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown or not names or len(set(names)) != len(names):
        return f"must be distinct names among {', '.join(LORA_TARGETS)} (got {unknown or 'repeats'})"
    return None


def not_one(buckets: int) -> str | None:
    return "must be 0 (off) or >= 2" if buckets == 1 else None


def parse_layer_range(spec: str) -> tuple[int, int] | None:
    """"3-5" -> (3, 5); "" -> None."""
    if not spec:
        return None
    lo, _, hi = spec.partition("-")
    return int(lo), int(hi or lo)


@dataclass
class Hyperparameters:
    """Every setting, resolved by read_settings: one field per environment variable, named as the variable in
    lower case (hp.model_dim is MODEL_DIM), declared with its type, default, rule and meaning (setting(...)).
    The rules of one variable are kept by validate_settings from these declarations; docs/settings.md's table is
    generated from them (python3 tools/harness.py settings-table --write docs/settings.md)."""
    preset: str = setting("frontier", "named set of defaults: frontier (this entry, on CaseOps sp8192 data), sp8192 (the same on plain sp8192 data), stack1024 (the March stack on sp1024) or baseline (the official naive baseline's recipe)", check=known_preset)
    data_path: str = setting("./data/datasets/fineweb10B_sp8192_caseops", "folder holding fineweb_{train,val}_*.bin (and, for CaseOps data, the fineweb_val_bytes_*.bin sidecar)")
    tokenizer_path: str = setting("./data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", "SentencePiece model that wrote the shards (for val_bpb bytes)")
    vocab_size: int = setting(8192, "embedding rows; must hold every tokenizer id", at_least=1, at_most=MAX_VOCAB_SIZE)
    run_id: str = setting("", "names logs/<RUN_ID>.{txt,json} and artifacts/<RUN_ID>.pgolf.xz (default: a fresh uuid)", check=plain_file_name)
    seed: int = setting(1337, "seed of the initialisation, self-calibration sampling and audit draws (training data is read in stream order)")
    iterations: int = setting(20000, "maximum optimizer steps", at_least=1)
    max_wallclock_seconds: float = setting(600.0, "training time cap in seconds; 0 = no cap (schedules then follow ITERATIONS)", at_least=0)
    train_batch_tokens: int = setting(786432, "tokens per optimizer step, over all ranks and micro-steps", at_least=1)
    train_seq_len: int = setting(2048, "training sequence length", at_least=1)
    grad_accum_steps: int = setting(0, "micro-steps per optimizer step; 0 = 8 // world_size (global batch independent of world size)", at_least=0)
    val_batch_size: int = setting(524288, "evaluation tokens per forward pass, over all ranks", at_least=1)
    val_loss_every: int = setting(0, "validate every N steps during training; 0 = only at the end (as #1855: each pass costs training time and a compiled graph)", at_least=0)
    val_max_tokens: int = setting(0, "score only the first N tokens of the validation stream; 0 = all", at_least=0)
    train_log_every: int = setting(200, "log a train step line every N steps", at_least=1)
    eval_seq_len: int = setting(2560, "evaluation (and TTT) window length, longer than training's (RoPE is relative; #1953 and #2019 scored windows of 2,560 after training at 2,048); 0 = TRAIN_SEQ_LEN", at_least=0)
    eval_stride: int = setting(64, "sliding-window stride (new targets scored per window); 0 or EVAL_SEQ_LEN = plain evaluation; with EVAL_MODE=documents only inside documents longer than the window", at_least=0)
    eval_mode: str = setting("documents", "final evaluation: documents (each document scored with context only from itself, whole documents packed into windows; needs ATTN_DOC_ISOLATION=1) or sliding (windows across the stream)", choices=EVAL_MODES)
    eval_audit: int = setting(0, "1 = run the compliance self-audit (causal, normalized, score-before-update, one pass)", choices=(0, 1))
    eval_only: str = setting("", "path of a saved artifact: skip training, load it and score it (model shape from the artifact)", check=existing_file)
    nll_dump: str = setting("", "write per-target arrays target, nll (nats, float64), bytes to this .npz", check=new_file_in_existing_folder)
    eval_time_limit_seconds: float = setting(570.0, "evaluation budget kept at run time, from the artifact's load (and the evaluation compiles) to the final score: TTT adapts less, then not at all, before it would run over; a run whose scoring alone is projected over it on 8xH100 is refused; 0 = none", at_least=0)
    ttt_enabled: int = setting(1, "1 = legal score-first test-time training during the final evaluation", choices=(0, 1))
    ttt_method: str = setting("lora", "lora (per-document LoRA, chunk scored then trained, plus global SGD phases; records #1610-#1855) or whole (SGD of the whole model per TTT_CHUNK_TOKENS chunk; records #1413/#1493)", choices=("lora", "whole"))
    ttt_lora_rank: int = setting(80, "rank of each per-document LoRA adapter", at_least=1)
    ttt_lora_alpha: float = setting(144.0, "LoRA output scale alpha: delta = (x A) B alpha / rank (record #1767, as #1855 ran it)", above=0.0)
    ttt_lora_targets: str = setting("k,o,mlp,head", "comma-separated adapters of every layer visit: q, k, v (the attention's input to the projection), o (its input to its output), mlp (the MLP's input to its output), head (to the logits); #2019 dropped q and v", check=lora_target_list)
    ttt_lora_keep_a: int = setting(1, "1 = a row's LoRA A is kept from one document to the next and redrawn after each global phase, only B restarts at 0 (record #1767's warm start, as #1855 ran it); 0 = A redrawn per document", choices=(0, 1))
    ttt_lora_lr: float = setting(8e-5, "AdamW learning rate of the per-document LoRA (#1925's seed-matched 8e-5; #1855 ran 1e-4)", at_least=0)
    ttt_lora_beta2: float = setting(0.99, "AdamW beta2 of the per-document LoRA (beta1 is 0; record #1855's log)", at_least=0.0, at_most=1.0)
    ttt_lora_weight_decay: float = setting(0.5, "AdamW weight decay of the per-document LoRA (record #1855's log)", at_least=0)
    ttt_lora_chunk: int = setting(48, "targets per LoRA chunk (at most the evaluation window): scored, then one LoRA step on them", at_least=1)
    ttt_lora_batch_tokens: int = setting(81920, "tokens of each LoRA forward per rank: rows of the evaluation window, one document per row (its memory bound: tools/harness.py gpu-plan)", at_least=1)
    ttt_phases: int = setting(1, "global SGD phases of TTT_METHOD=lora (whole model, on documents already scored; #1925's seed-matched 1, #1855 ran 3); 0 = none", at_least=0)
    ttt_phase_docs_frac: float = setting(0.07, "the phases end at this fraction of the documents (longest first), evenly spaced (#1925: 3,500 of 50,000; #1855: 2,500)", at_least=0.0, at_most=1.0)
    ttt_phase_lr: float = setting(0.001, "SGD learning rate of a global phase (one epoch over the scored documents, cosine over its chunks)", at_least=0)
    ttt_chunk_tokens: int = setting(32768, "targets per TTT chunk: scored first, then trained on", at_least=1)
    ttt_epochs: int = setting(3, "SGD steps on each scored chunk (each over all of its sequences)", at_least=1)
    ttt_lr: float = setting(0.005, "TTT SGD learning rate (at the first chunk)", at_least=0)
    ttt_lr_schedule: str = setting("cosine", "TTT learning rate over the chunks: cosine (TTT_LR to 0 at the last chunk) or constant", choices=("cosine", "constant"))
    ttt_momentum: float = setting(0.9, "TTT SGD momentum", at_least=0)
    ttt_grad_clip: float = setting(1.0, "clip TTT's gradient norm; 0 = off", at_least=0)
    ttt_last_n: int = setting(0, "TTT trains only the last N blocks; 0 = every parameter", at_least=0)
    num_layers: int = setting(11, "transformer blocks", at_least=1)
    model_dim: int = setting(512, "residual width", at_least=1)
    num_heads: int = setting(8, "query heads", at_least=1)
    num_kv_heads: int = setting(4, "key/value heads (GQA)", at_least=1)
    mlp_mult: int = setting(4, "MLP hidden width = MLP_MULT * MODEL_DIM", at_least=1)
    mlp_act: str = setting("leaky_relu2", "MLP activation: relu2 (relu(x)^2) or leaky_relu2 (leaky_relu(x, 0.5)^2)", choices=("relu2", "leaky_relu2"))
    rope_dims: int = setting(16, "head dims that get RoPE (partial RoPE); 0 = all", at_least=0)
    xsa_last_n: int = setting(11, "XSA (subtract the output's component along its own value) in the last N layers; 0 = off", at_least=0)
    attn_doc_isolation: int = setting(1, "1 = a token attends only to earlier tokens of its own document (documents start at BOS), in training, evaluation and TTT; 0 = across documents", choices=(0, 1))
    attn_gate: int = setting(1, "1 = per-head gate 2 sigmoid(W x) on the attention output", choices=(0, 1))
    attn_gate_dims: int = setting(12, "the attention gate reads the first N dims of the block input (sparse gate); 0 = all dims (dense)", at_least=0)
    bigram_vocab: int = setting(0, "BigramHash buckets for the hashed (previous, current) token pair; 0 = off", at_least=0, check=not_one)
    bigram_dim: int = setting(112, "BigramHash embedding width (projected to MODEL_DIM)", at_least=1)
    smear_gate: int = setting(1, "1 = SmearGate: mix the previous token's embedding in (never into a BOS)", choices=(0, 1))
    smear_gate_dims: int = setting(12, "SmearGate's gate is 2 sigmoid(w . x_t[:N]) of the current token's first N dims; 0 = a constant gate", at_least=0)
    skip_gates: int = setting(1, "U-Net skips: 1 = over the visiting positions of the layer order (the looped stack's repeats included), each x <- lerp(w skip, x, sigmoid(g)) (record #1855); 0 = additive skips between physical layers on their first visit", choices=(0, 1))
    init_orthogonal: int = setting(1, "1 = orthogonal initialisation of the Q, K, V and MLP-up matrices (record #1855); 0 = PyTorch's default", choices=(0, 1))
    ln_scale: int = setting(1, "1 = scale each block's normalized inputs by 1/sqrt(layer + 1)", choices=(0, 1))
    recur_layers: str = setting("3-5", "depth recurrence: contiguous layers 'a-b' re-run in a row; empty = off", check=layer_range)
    recur_passes: int = setting(3, "passes through RECUR_LAYERS once recurrence is on")
    recur_start_frac: float = setting(0.35, "fraction of the run after which recurrence is on", at_least=0.0, at_most=1.0)
    parallel_last_n: int = setting(3, "last N blocks are parallel (attention and MLP side by side); 0 = off", at_least=0)
    parallel_lanes: int = setting(2, "parallel blocks carry 1 residual lane (both read it) or 2 (attention and MLP each their own, mixed by learned weights)", choices=(1, 2))
    rope_base: float = setting(10000.0, "RoPE frequency base")
    logit_softcap: float = setting(30.0, "logits = c * tanh(logits / c)", above=0.0)
    logit_softcap_asym: int = setting(1, "1 = two caps, for positive and negative logits, both starting at LOGIT_SOFTCAP: fixed in training, learned by TTT (the global phases, whole-model TTT) on scored tokens (record #1923, as #2019 ran it); 0 = one fixed cap", choices=(0, 1))
    qk_gain_init: float = setting(5.25, "initial per-head query gain after q/k RMSNorm (records #1493 and #2019: 5.25)")
    tied_embed_init_std: float = setting(0.005, "std of the tied embedding's initialisation")
    matrix_lr: float = setting(0.026, "Muon learning rate for matrices")
    scalar_lr: float = setting(0.02, "Adam learning rate for vectors and scalars")
    tied_embed_lr: float = setting(0.03, "Adam learning rate for the tied embedding and the BigramHash table")
    gates_in_adam: int = setting(1, "1 = the attention and SmearGate gate matrices train with AdamW, as record #1855 (Muon only on the weight matrices); 0 = with Muon", choices=(0, 1))
    muon_momentum: float = setting(0.97, "Muon momentum after warm-up")
    muon_momentum_warmup_start: float = setting(0.92, "Muon momentum at the start of training")
    muon_momentum_warmup_frac: float = setting(0.3, "fraction of the run over which Muon momentum warms up", at_least=0.0, at_most=1.0)
    muon_row_norm: int = setting(1, "1 = normalize each gradient row before Newton-Schulz", choices=(0, 1))
    muon_ns_coeffs: str = setting("polar", "Newton-Schulz coefficients: polar (Polar Express, one tuple per iteration) or quintic (3.4445, -4.7750, 2.0315)", choices=tuple(NEWTON_SCHULZ_COEFFS))
    muon_wd: float = setting(0.095, "Muon decoupled weight decay (p -= lr * wd * p)", at_least=0)
    embed_wd: float = setting(0.085, "AdamW decoupled weight decay of the embedding tables")
    adam_wd: float = setting(0.02, "AdamW decoupled weight decay of the vectors and scalars", at_least=0)
    muon_backend_steps: int = setting(5, "Newton-Schulz iterations", at_least=1)
    beta1: float = setting(0.9, "Adam beta1")
    beta2: float = setting(0.99, "Adam beta2")
    adam_eps: float = setting(1e-8, "Adam epsilon")
    grad_clip_norm: float = setting(0.3, "clip the global gradient norm; 0 = off", at_least=0)
    lr_warmup_frac: float = setting(0.0, "fraction of the run with a linear learning-rate warm-up", at_least=0.0, at_most=1.0)
    warmdown_frac: float = setting(0.85, "final fraction of the run with the learning-rate warmdown (WARMDOWN_SHAPE, ending at LR_FLOOR)", at_least=0.0, at_most=1.0)
    lr_floor: float = setting(0.1, "learning-rate scale the warmdown ends at", at_least=0.0, at_most=1.0)
    warmdown_shape: str = setting("clamp", "warmdown of the LR scale: clamp = max(remaining, LR_FLOOR), linear to 0 cut at the floor (record #1855); lerp = LR_FLOOR + (1 - LR_FLOOR) remaining", choices=("clamp", "lerp"))
    ema_horizon_frac: float = setting(0.058, "EMA of the weights with this time constant, as a fraction of the run; exported; 0 = off", at_least=0)
    compile: int = setting(-1, "torch.compile the model: 1 on, 0 off, -1 = on for CUDA, off for CPU", choices=(-1, 0, 1))
    compile_optimize_ddp: int = setting(0, "1 = dynamo's DDPOptimizer splits each compiled training graph at DDP's gradient buckets; 0 = one graph, as every April record ran it", choices=(0, 1))
    allow_sdpa: int = setting(0, "1 = run on CUDA with PyTorch SDPA attention when flash-attn does not import (slower); 0 = that is an error", choices=(0, 1))
    compile_warmup_steps: int = setting(2, "compiled runs: forward/backward passes on random tokens per training state before the clock starts (no update)", at_least=0)
    compute_dtype: str = setting("auto", "autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32", choices=("auto", "bf16", "fp32"))
    artifact_budget_bytes: int = setting(CHALLENGE_CAP_BYTES, "cap on raw code bytes + compressed model bytes (at most the challenge's 16,000,000)", at_least=1, at_most=CHALLENGE_CAP_BYTES)
    lzma_preset: int = setting(9, "lzma preset for the artifact (0-9)", at_least=0, at_most=9)
    quant_matrix_bits: int = setting(6, "bits per weight of the large matrices (5-8, per-row scale)", choices=(5, 6, 7, 8))
    quant_clip_sigmas_mlp: float = setting(11.5, "SDClip: the MLP matrices' rows are clipped at k std(row) (the byte knob); the budget fit scales every k by one factor in [0.5, 4] to fill the budget", above=0.0)
    quant_clip_sigmas_attn: float = setting(13.0, "SDClip k of the attention (and every other) matrix", above=0.0)
    quant_embed_bits: int = setting(7, "bits per weight of the embedding tables (5-8, per-row scale)", choices=(5, 6, 7, 8))
    quant_clip_sigmas_embed: float = setting(14.0, "SDClip k of the embedding tables", above=0.0)
    lqer_tensors: int = setting(3, "LQER: a low-rank correction of the quantization error for this many tensors (largest error first); 0 = off", at_least=0)
    lqer_rank: int = setting(4, "rank of each LQER correction", at_least=1)
    awq_groups: int = setting(1, "AWQ-lite (PR #1908): the N most salient groups of AWQ_GROUP_SIZE input columns over all GPTQ'd matrices (activation RMS x mean |w|, one ranking for the model) are quantized at AWQ_BITS inside the same GPTQ solve; 0 = off", at_least=0)
    awq_bits: int = setting(8, "bits of the AWQ-lite columns (same clip as their rows, finer step); only matrices with fewer bits take part", choices=(6, 7, 8))
    awq_group_size: int = setting(64, "input columns per AWQ-lite group", at_least=1)
    lqer_factors: str = setting("asym4", "LQER factor storage: asym4 = A = U S as int2 in [-2, 1] with one scale, B = V^T as int4 in [-8, 7] in groups of 64 (record #1855); row6 = balanced U sqrt(S), sqrt(S) V^T as 6-bit absmax per row", choices=LQER_FORMATS)
    ternary_patterns: str = setting("", "comma-separated name fragments (e.g. '.mlp.') of weight matrices exported ternary; empty = none", check=name_fragments)
    ternary_from_step: int = setting(-1, "ternary matrices train through the ternary quantizer from this step; -1 = from late QAT on", at_least=-1)
    late_qat_threshold: float = setting(0.2, "late QAT: once the warmdown's LR scale falls below this, every quantized tensor trains through its export quantizer; 0 = off", at_least=0.0, at_most=1.0)
    gptq_calibration: str = setting("train", "GPTQ Hessians from: train (training tokens, on the training clock, as record #1855), self (text the model generates, no data; the earlier default, with GPTQ_CALIB_SEQS=32 GPTQ_CALIB_LEN=1024), none (round to nearest)", choices=("self", "train", "none"))
    gptq_calib_seqs: int = setting(768, "calibration sequences for GPTQ, shared by the ranks (#1855's Hessians: its 16 batches of 48 x 2048 tokens on rank 0)")
    gptq_calib_len: int = setting(2048, "tokens per calibration sequence")
    gptq_calib_temp: float = setting(0.8, "sampling temperature of self-generated calibration text")
    gptq_reserve_seconds: float = setting(4.0, "GPTQ_CALIBRATION=train with a wallclock cap: training stops this early so calibration ends inside the deadline (#1855's default)")
    explicit: frozenset[str] = field(default=frozenset(), repr=False)   # set in the environment, not by preset or default

    @classmethod
    def from_values(cls, values: dict[str, object], explicit: frozenset[str] = frozenset()) -> "Hyperparameters":
        """From {VARIABLE: value} (a run summary's `hyperparameters`)."""
        return cls(**{name.lower(): value for name, value in values.items()}, explicit=frozenset(explicit))

    @property
    def values(self) -> dict[str, object]:
        return {name: getattr(self, name.lower()) for name in SETTINGS}

    def replace(self, **changes) -> "Hyperparameters":
        return dataclasses.replace(self, **{name.lower(): value for name, value in changes.items()})

    def as_dict(self) -> dict[str, object]:
        return self.values


SETTING_TYPES = {"int": int, "float": float, "str": str}
SETTINGS: dict[str, Setting] = {f.name.upper(): dataclasses.replace(f.metadata["setting"], type=SETTING_TYPES[f.type])
                                for f in dataclasses.fields(Hyperparameters) if "setting" in f.metadata}

# The March stack (record #1019's model on sp1024; this entry's default until the April pieces landed).
STACK1024 = {
    "DATA_PATH": "./data/datasets/fineweb10B_sp1024", "TOKENIZER_PATH": "./data/tokenizers/fineweb_1024_bpe.model",
    "VOCAB_SIZE": 1024, "MLP_MULT": 3, "ATTN_GATE": 0, "BIGRAM_VOCAB": 3072, "SMEAR_GATE_DIMS": 0, "RECUR_LAYERS": "",
    "PARALLEL_LAST_N": 0, "PARALLEL_LANES": 1, "QK_GAIN_INIT": 1.5, "EVAL_SEQ_LEN": 0, "LOGIT_SOFTCAP_ASYM": 0, "MATRIX_LR": 0.025, "SCALAR_LR": 0.025,
    "TIED_EMBED_LR": 0.035, "MUON_MOMENTUM": 0.99, "MUON_MOMENTUM_WARMUP_FRAC": 0.22, "MUON_NS_COEFFS": "quintic",
    "MUON_WD": 0.04, "EMBED_WD": 0.04, "ADAM_WD": 0.04, "BETA2": 0.95, "WARMDOWN_FRAC": 0.5, "EMA_HORIZON_FRAC": 0.048,
    "LATE_QAT_THRESHOLD": 0.25, "QUANT_EMBED_BITS": 8, "QUANT_CLIP_SIGMAS_EMBED": 20.0, "LQER_TENSORS": 0,
    "TTT_ENABLED": 0, "TTT_LR": 0.002, "TTT_LR_SCHEDULE": "constant", "TTT_GRAD_CLIP": 0.0, "TTT_LAST_N": 2,
    "SKIP_GATES": 0, "INIT_ORTHOGONAL": 0, "GATES_IN_ADAM": 0, "WARMDOWN_SHAPE": "lerp", "QUANT_CLIP_SIGMAS_MLP": 12.0,
    "AWQ_GROUPS": 0, "GPTQ_CALIBRATION": "self", "GPTQ_CALIB_SEQS": 32, "GPTQ_CALIB_LEN": 1024,
}

PRESETS: dict[str, dict[str, object]] = {
    # The defaults above: the April records' stack (records #1394 ... #1855 of openai/parameter-golf) with their
    # published 8xH100 settings as fractions of a ~4,900-step run (momentum warm-up 1,500 steps -> 0.3,
    # EMA 0.9965/step = 286 steps -> 0.058); late QAT over the last ~9%. Data: CaseOps sp8192, as every record
    # from #1729 on (tools/caseops.py builds it; docs/caseops.md).
    "frontier": {},
    # The same on plain sp8192 data (records #1394 ... #1626; CaseOps data came with #1729)
    "sp8192": {"DATA_PATH": "./data/datasets/fineweb10B_sp8192", "TOKENIZER_PATH": "./data/tokenizers/fineweb_8192_bpe.model"},
    "stack1024": STACK1024,
    # The official naive baseline (openai/parameter-golf train_gpt.py): 9L x 512, GQA 8/4,
    # relu^2 MLP 2x, tied embeddings, softcap 30, U-Net skips, Muon + Adam. The yardstick.
    "baseline": {
        **STACK1024, "NUM_LAYERS": 9, "MLP_MULT": 2, "MLP_ACT": "relu2", "TRAIN_SEQ_LEN": 1024, "TRAIN_BATCH_TOKENS": 524288,
        "ROPE_DIMS": 0, "XSA_LAST_N": 0, "BIGRAM_VOCAB": 0, "SMEAR_GATE": 0, "LN_SCALE": 0,
        "MATRIX_LR": 0.04, "SCALAR_LR": 0.04, "TIED_EMBED_LR": 0.05, "MUON_MOMENTUM": 0.95,
        "MUON_MOMENTUM_WARMUP_START": 0.85, "MUON_MOMENTUM_WARMUP_FRAC": 0.036,   # 500 of 13,780 steps
        "MUON_ROW_NORM": 0, "MUON_WD": 0.0, "EMBED_WD": 0.0, "ADAM_WD": 0.0, "GRAD_CLIP_NORM": 0.0,
        "WARMDOWN_FRAC": 0.087, "LR_FLOOR": 0.0, "EMA_HORIZON_FRAC": 0.0,          # warmdown 1,200 of 13,780
        "QUANT_MATRIX_BITS": 8, "QUANT_CLIP_SIGMAS_MLP": 20.0, "QUANT_CLIP_SIGMAS_ATTN": 20.0,
        "LATE_QAT_THRESHOLD": 0.0, "GPTQ_CALIBRATION": "none", "QK_GAIN_INIT": 1.5,
        "EVAL_STRIDE": 0,                                                           # plain windows, as it scored
    },
}

# Variables the launcher scripts and torchrun use; never reported as misspelt settings.
NOT_SETTINGS = {"SEEDS", "NPROC", "TORCHRUN", "RECORD_DIR", "DEMO", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "ROLE_RANK",
                "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "TORCHELASTIC_RUN_ID"}
# Names a user may carry over from the official baseline whose meaning we changed on purpose.
REPLACED_SETTINGS = {
    "WARMDOWN_ITERS": "WARMDOWN_FRAC (schedules are fractions of the run)",
    "WARMUP_STEPS": "COMPILE_WARMUP_STEPS (compile warm-up) or LR_WARMUP_FRAC (learning-rate warm-up)",
    "MUON_MOMENTUM_WARMUP_STEPS": "MUON_MOMENTUM_WARMUP_FRAC",
}


def read_settings(env: dict[str, str]) -> tuple[Hyperparameters, list[str]]:
    """Resolve every setting: explicit variable > preset > built-in default.

    Returns the hyperparameters and a list of warnings (variables that look like misspelt
    settings). Raises PipelineError for a malformed value, an unknown preset or a replaced name.
    """
    preset_name = env.get("PRESET", SETTINGS["PRESET"].default)
    problem = SETTINGS["PRESET"].error("PRESET", preset_name)   # needed now: it picks the other defaults
    if problem:
        raise PipelineError(problem)
    for old, new in REPLACED_SETTINGS.items():
        if old in env:
            raise PipelineError(f"{old} is not used by this script; use {new}")
    values: dict[str, object] = {}
    for name, row in SETTINGS.items():
        values[name] = row.parse(name, env[name]) if name in env else PRESETS[preset_name].get(name, row.default)
    warnings = []
    for key in sorted(env):
        if key in SETTINGS or key in NOT_SETTINGS or not key.isupper():
            continue
        close = difflib.get_close_matches(key, list(SETTINGS), n=1, cutoff=0.85)
        if close:
            warnings.append(f"{key} is not a setting; did you mean {close[0]}? (it is ignored)")
    hp = Hyperparameters.from_values(values, frozenset(name for name in SETTINGS if name in env))
    validate_settings(hp)
    return hp, warnings


def validate_settings(hp: Hyperparameters) -> None:
    """Checks that need no data or devices; each error names the variables at fault. First every setting
    against its own declared rule, then the rules that span settings."""
    for name, row in SETTINGS.items():
        problem = row.error(name, getattr(hp, name.lower()))
        if problem:
            raise PipelineError(problem)
    if hp.lr_warmup_frac + hp.warmdown_frac > 1.0:
        raise PipelineError(f"LR_WARMUP_FRAC + WARMDOWN_FRAC = {hp.lr_warmup_frac + hp.warmdown_frac} exceeds 1")
    if hp.model_dim % hp.num_heads:
        raise PipelineError(f"MODEL_DIM={hp.model_dim} is not divisible by NUM_HEADS={hp.num_heads}")
    if (hp.model_dim // hp.num_heads) % 2:
        raise PipelineError(f"head dim MODEL_DIM/NUM_HEADS={hp.model_dim // hp.num_heads} must be even for RoPE")
    if hp.num_heads % hp.num_kv_heads:
        raise PipelineError(f"NUM_HEADS={hp.num_heads} is not divisible by NUM_KV_HEADS={hp.num_kv_heads}")
    if hp.ttt_last_n > hp.num_layers:
        raise PipelineError(f"TTT_LAST_N={hp.ttt_last_n} exceeds NUM_LAYERS={hp.num_layers}")
    for name in ["ATTN_GATE_DIMS", "SMEAR_GATE_DIMS"]:
        if hp.values[name] > hp.model_dim:
            raise PipelineError(f"{name}={hp.values[name]} exceeds MODEL_DIM={hp.model_dim}")
    head_dim = hp.model_dim // hp.num_heads
    if hp.rope_dims % 2 or hp.rope_dims > head_dim:
        raise PipelineError(f"ROPE_DIMS={hp.rope_dims} must be even and at most the head dim {head_dim}")
    recur = parse_layer_range(hp.recur_layers)
    if recur and not 0 <= recur[0] <= recur[1] < hp.num_layers:
        raise PipelineError(f"RECUR_LAYERS={hp.recur_layers!r} is not a range of layers 0..{hp.num_layers - 1} "
                            f"(NUM_LAYERS={hp.num_layers}); set RECUR_LAYERS= to turn recurrence off")
    if recur and hp.recur_passes < 2:
        raise PipelineError(f"RECUR_PASSES={hp.recur_passes} must be >= 2 when RECUR_LAYERS is set")
    first_parallel = max(0, hp.num_layers - hp.parallel_last_n)
    if hp.parallel_last_n and hp.parallel_lanes == 2 and first_parallel < hp.num_layers // 2:
        raise PipelineError(f"PARALLEL_LAST_N={hp.parallel_last_n} puts two-lane blocks in the encoder half (layers "
                            f"< {hp.num_layers // 2} of NUM_LAYERS={hp.num_layers}), whose U-Net skips they would not feed")
    if recur and hp.parallel_last_n and hp.parallel_lanes == 2 and recur[1] >= first_parallel:
        raise PipelineError(f"RECUR_LAYERS={hp.recur_layers!r} reaches the two-lane parallel blocks (from layer "
                            f"{first_parallel}, PARALLEL_LAST_N={hp.parallel_last_n}): recurrence must stay below them")
    if hp.gptq_calibration != "none" and (hp.gptq_calib_seqs <= 0 or hp.gptq_calib_len < 2 or hp.gptq_calib_temp <= 0):
        raise PipelineError(f"GPTQ_CALIB_SEQS={hp.gptq_calib_seqs} must be positive, GPTQ_CALIB_LEN={hp.gptq_calib_len} "
                            f">= 2 and GPTQ_CALIB_TEMP={hp.gptq_calib_temp} positive")
    if hp.gptq_calibration == "train" and hp.max_wallclock_seconds and not 0 < hp.gptq_reserve_seconds < hp.max_wallclock_seconds:
        raise PipelineError(f"GPTQ_CALIBRATION=train needs 0 < GPTQ_RESERVE_SECONDS={hp.gptq_reserve_seconds:g} < "
                            f"MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds:g}: calibration must end inside the cap")
    if "GPTQ_RESERVE_SECONDS" in hp.explicit and hp.gptq_calibration != "train":
        raise PipelineError(f"GPTQ_RESERVE_SECONDS is used only with GPTQ_CALIBRATION=train "
                            f"(it is {hp.gptq_calibration!r})")
    awq_set = hp.awq_groups and {"AWQ_GROUPS", "AWQ_BITS", "AWQ_GROUP_SIZE"} & hp.explicit    # else off where moot
    if awq_set and hp.gptq_calibration == "none":
        raise PipelineError(f"AWQ_GROUPS={hp.awq_groups} ranks columns by the GPTQ calibration's activations: it needs "
                            "GPTQ_CALIBRATION=self or train (or AWQ_GROUPS=0)")
    if awq_set and hp.awq_bits <= min(hp.quant_matrix_bits, hp.quant_embed_bits):
        raise PipelineError(f"AWQ_BITS={hp.awq_bits} is no more than QUANT_MATRIX_BITS={hp.quant_matrix_bits} and "
                            f"QUANT_EMBED_BITS={hp.quant_embed_bits}: no matrix would take part (or set AWQ_GROUPS=0)")
    if hp.late_qat_threshold and (hp.warmdown_frac == 0 or hp.late_qat_threshold <= hp.lr_floor):
        raise PipelineError(f"LATE_QAT_THRESHOLD={hp.late_qat_threshold} would never turn on: the LR scale only "
                            f"falls below it in a warmdown (WARMDOWN_FRAC={hp.warmdown_frac}) that ends above it "
                            f"(LR_FLOOR={hp.lr_floor}); set it above LR_FLOOR or to 0")
    if hp.ternary_from_step >= 0 and not hp.ternary_patterns:
        raise PipelineError(f"TERNARY_FROM_STEP={hp.ternary_from_step} needs TERNARY_PATTERNS (no matrix is ternary)")
    if hp.ternary_patterns and hp.ternary_from_step < 0 and not hp.late_qat_threshold:
        raise PipelineError(f"TERNARY_PATTERNS={hp.ternary_patterns!r} would export matrices ternary that never trained "
                            "ternary: set TERNARY_FROM_STEP or LATE_QAT_THRESHOLD")
    if hp.ttt_enabled and hp.ttt_method == "lora" and not hp.attn_doc_isolation:
        raise PipelineError("TTT_METHOD=lora adapts one LoRA per document in rows that hold other documents too: it "
                            "needs ATTN_DOC_ISOLATION=1 (or use TTT_METHOD=whole)")
    if hp.ttt_enabled and hp.ttt_method == "lora" and hp.eval_mode != "documents":
        raise PipelineError("TTT_METHOD=lora scores document by document: it needs EVAL_MODE=documents "
                            "(or use TTT_METHOD=whole)")
    if hp.eval_mode == "documents" and not hp.attn_doc_isolation:
        raise PipelineError("EVAL_MODE=documents needs ATTN_DOC_ISOLATION=1 (it packs whole documents into a "
                            "window); set EVAL_MODE=sliding to score with attention across documents")
    eval_seq_len = hp.eval_seq_len or hp.train_seq_len
    if hp.eval_stride > eval_seq_len:
        raise PipelineError(f"EVAL_STRIDE={hp.eval_stride} exceeds the evaluation window {eval_seq_len}")
    if hp.ttt_enabled and hp.ttt_chunk_tokens < eval_seq_len:
        raise PipelineError(f"TTT_CHUNK_TOKENS={hp.ttt_chunk_tokens} is shorter than the evaluation window "
                            f"{eval_seq_len}: TTT trains on whole windows of a chunk, so it would never train")


# -----------------------------------------------------------------------------
# DISTRIBUTED SETUP AND RUN LOG
# torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python3 train_gpt.py` is a world of one.
# NCCL on CUDA, gloo on CPU. A second gloo group carries the tiny per-step "stop now?" vote
# on CUDA so the hot loop never waits on the GPU to decide when to stop.
# The collectives the later stages call by name stand here, next to the groups they run in: votes and
# Python objects in that control group (agree_max, on_main, gather, gather_to_main), device tensors in
# the default group (gather_tensors). The step clock (StepClock) times training and TTT's steps alike.
# -----------------------------------------------------------------------------

@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    control_group: object        # process group for CPU-side votes (None = default group)
    autocast_dtype: torch.dtype | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime(hp: Hyperparameters) -> Runtime:
    """Pick the device, start the process group and choose the compute dtype."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    distributed = world_size > 1
    if torch.cuda.is_available():  # CUDA-only
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False    # fp32 matmuls (Hessians, GPTQ, LQER) stay fp32;
        torch.backends.cudnn.allow_tf32 = False          # training runs in bf16 autocast anyway
    else:
        device = torch.device("cpu")
    control_group = None
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        if device.type == "cuda":  # CUDA-only: CPU tensors for votes that must not sync the GPU
            control_group = dist.new_group(backend="gloo")
    dtype_name = hp.compute_dtype if hp.compute_dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast_dtype = torch.bfloat16 if dtype_name == "bf16" else None
    return Runtime(rank, world_size, local_rank, device, distributed, control_group, autocast_dtype)


def autocast(rt: Runtime):
    if rt.autocast_dtype is None:
        return torch.autocast(rt.device.type, enabled=False)
    return torch.autocast(rt.device.type, dtype=rt.autocast_dtype)


def agree_max(rt: Runtime, values: list[float]) -> list[float]:
    """Element-wise maximum over ranks (a float64 CPU tensor in the gloo group: no GPU sync)."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=rt.control_group)
    return t.tolist()


def on_main(rt: Runtime, fn):
    """Run fn() on rank 0 and hand its result to every rank. Whatever fn raises there is raised on every
    rank as a PipelineError (anything but a PipelineError after its traceback is printed), so no rank is
    left waiting in a collective for a rank 0 that has failed."""
    box = [None, None]
    if rt.is_main:
        try:
            box[0] = fn()
        except PipelineError as e:
            box[1] = str(e)
        except Exception as e:
            traceback.print_exc()
            box[1] = f"internal error on rank 0: {type(e).__name__}: {e}"
    if rt.distributed:
        dist.broadcast_object_list(box, src=0, group=rt.control_group)
    if box[1] is not None:
        raise PipelineError(box[1])
    return box[0]


def gather(rt: Runtime, value) -> list:
    """Every rank's value, in rank order, on every rank (a small Python object; all_gather_object in the
    control group). gather_to_main hands the values to rank 0 alone; gather_tensors gathers device tensors."""
    if not rt.distributed:
        return [value]
    out = [None] * rt.world_size
    dist.all_gather_object(out, value, group=rt.control_group)
    return out


def gather_to_main(rt: Runtime, value) -> list:
    """Every rank's value (a picklable object) on rank 0, in rank order; [] elsewhere (gather_object in the
    control group): for results only rank 0 uses, which gather would copy to every rank."""
    if not rt.distributed:
        return [value]
    out = [None] * rt.world_size if rt.is_main else None
    dist.gather_object(value, out, dst=0, group=rt.control_group)
    return out if rt.is_main else []


def gather_tensors(rt: Runtime, t: Tensor) -> Tensor:
    """Every rank's t (same shape on every rank), concatenated in rank order, on every rank: all_gather in
    the default group (NCCL on CUDA), the tensors kept on their device, where gather pickles Python objects."""
    if not rt.distributed:
        return t
    out = [torch.empty_like(t) for _ in range(rt.world_size)]
    dist.all_gather(out, t)
    return torch.cat(out)


STEP_TIME_WINDOW = 16      # the stop rule predicts the next step from the slowest of the last 16
STOP_SAFETY_STEPS = 1      # and keeps one more such step in hand, for a last step slower than those


class StepClock:
    """The training clock: ms of training so far (paused for validation) and the steps' durations.

    On CUDA the host runs ahead of the GPU. After launching a step, the clock waits (on a CUDA event,
    not a full synchronize: the new step stays queued) until the step before it has finished, so at
    most one launched step is unfinished when the loop votes on the next one, and a step's duration
    is the gap between two completions on the device. On the CPU a step is done when its call returns.
    should_stop() says whether one more step could end past the cap: now + (unfinished steps + the
    next + STOP_SAFETY_STEPS) x the slowest recent step > cap."""

    def __init__(self, rt: Runtime, cap_ms: float):
        self.cuda, self.cap_ms = rt.device.type == "cuda", cap_ms
        self.train_ms, self.t0, self.last_done = 0.0, time.perf_counter(), time.perf_counter()
        self.unfinished: list = []                 # CUDA events of launched steps not yet waited for
        self.durations: list[float] = []

    def elapsed_ms(self) -> float:
        return self.train_ms + 1e3 * (time.perf_counter() - self.t0)

    def step_launched(self) -> None:
        if self.cuda:  # CUDA-only
            event = torch.cuda.Event()
            event.record()
            self.unfinished.append(event)
            if len(self.unfinished) < 2:
                return
            self.unfinished.pop(0).synchronize()
        now = time.perf_counter()
        self.durations = (self.durations + [1e3 * (now - self.last_done)])[-STEP_TIME_WINDOW:]
        self.last_done = now

    def should_stop(self) -> bool:
        if not self.cap_ms or not self.durations:
            return False
        ahead = len(self.unfinished) + 1 + STOP_SAFETY_STEPS
        return self.elapsed_ms() + ahead * max(self.durations) > self.cap_ms

    def pause(self) -> None:
        """Stop the clock with every launched step finished (the device synchronised)."""
        if self.cuda:  # CUDA-only: make the clock honest before pausing it
            torch.cuda.synchronize()
        self.train_ms += 1e3 * (time.perf_counter() - self.t0)
        self.unfinished = []

    def resume(self) -> None:
        self.t0 = self.last_done = time.perf_counter()


def artifact_path(run_id: str) -> str:
    return os.path.join("artifacts", f"{run_id}.pgolf.xz")


class RunLog:
    """logs/<RUN_ID>.txt, written by rank 0: the source first, then every line printed.

    Refuses to start if the log or summary of this RUN_ID, or another file the run will write
    (`outputs`: its artifact), already exists, so a rerun never overwrites what an earlier run wrote
    and finds out before training, not after.
    """

    def __init__(self, rt: Runtime, run_id: str, log_dir: str = "logs", outputs: tuple[str, ...] = ()):
        self.rt = rt
        self.txt_path = os.path.join(log_dir, f"{run_id}.txt")
        self.json_path = os.path.join(log_dir, f"{run_id}.json")
        self.file = None
        if rt.is_main:
            for path in (self.txt_path, self.json_path, *outputs):
                if os.path.exists(path):
                    raise PipelineError(f"{path} already exists; choose another RUN_ID")
            os.makedirs(log_dir, exist_ok=True)
            self.file = open(self.txt_path, "x", encoding="utf-8")
            self.file.write(SOURCE.decode("utf-8"))
            self.file.write("=" * 100 + "\n")

    def __call__(self, line: str, console: bool = True) -> None:
        if not self.rt.is_main:
            return
        if console:
            print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()

    def write_summary(self, summary: dict) -> None:
        """Write logs/<RUN_ID>.json atomically (rank 0), and end the log with its path and sha256, so the
        summary cannot be edited apart from the log that vouches for it."""
        if not self.rt.is_main:
            return
        data = (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode("utf-8")
        tmp = self.json_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, self.json_path)
        self(f"summary: {self.json_path} sha256 {hashlib.sha256(data).hexdigest()}")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# -----------------------------------------------------------------------------
# DATA LOADING
# Shards: 256 x int32 header (magic, version, n_tokens), then n_tokens x uint16.
# Training reads the train shards as one endless stream (wrapping around at the end).
# Optimizer step s consumes world_size * grad_accum chunks of (local_tokens + 1) tokens; chunk
# (s * grad_accum + micro) * world_size + rank goes to that rank and micro-step, so the ranks'
# spans are disjoint and contiguous, and a step's tokens do not depend on the world size.
# Every batch's documents are counted here, on the host (count_segments): document-isolated attention on
# CUDA (flash_attn_varlen_func, MODULES) takes a cu_seqlens of a bounded capacity (varlen_capacity).
# -----------------------------------------------------------------------------

def read_shard_header(path: str) -> int:
    """Validate a shard's header against its size; return its token count."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(SHARD_HEADER_INTS * 4), dtype="<i4")
    except OSError as e:
        raise PipelineError(f"{path}: cannot read ({e.strerror})") from None
    if header.size < SHARD_HEADER_INTS:
        raise PipelineError(f"{path}: file is {size} bytes, shorter than the {SHARD_HEADER_INTS * 4}-byte header")
    if header[0] != SHARD_MAGIC:
        raise PipelineError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise PipelineError(f"{path}: unsupported version {header[1]} (expected {SHARD_VERSION})")
    n_tokens = int(header[2])
    expected = SHARD_HEADER_INTS * 4 + 2 * n_tokens
    if n_tokens < 0 or size != expected:
        raise PipelineError(f"{path}: header says {n_tokens} tokens ({expected} bytes) but the file is {size} bytes")
    return n_tokens


def load_shard(path: str) -> np.ndarray:
    """Memory-map a validated shard's tokens (uint16)."""
    n_tokens = read_shard_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(n_tokens,))


def find_shards(data_path: str, split: str) -> list[str]:
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    prefix = len(f"fineweb_{split}_")       # numbered shards only: fineweb_val_bytes_* is the byte sidecar
    files = sorted(f for f in glob.glob(pattern) if os.path.basename(f)[prefix:-len(".bin")].isdigit())
    if not files:
        raise PipelineError(f"no {split} shards: nothing matches {pattern} (set DATA_PATH)")
    return files


def check_token_range(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise PipelineError(f"{where}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}")


VARLEN_SEGMENTS_PER_ROW = 16   # cu_seqlens capacity per row (FineWeb: ~3.5 segments per 2,048-token row)
VARLEN_OVERFLOWS: dict[tuple[int, int, int], int] = {}   # (rows, seq_len, capacity) -> batches past the base capacity


def count_segments(ids: np.ndarray) -> int:
    """Segments flash_attn_varlen_func sees in a (rows, T) batch of token ids: each row's start, and each BOS
    after it (a BOS at a row's start begins that row's segment)."""
    return ids.shape[0] + int(np.count_nonzero(ids[:, 1:] == BOS_ID))


def varlen_capacity(rows: int, seq_len: int, segments: int = 0) -> int:
    """cu_seqlens entries for a (rows, seq_len) batch of `segments` segments, counted on the host: the base
    capacity rows * min(seq_len, VARLEN_SEGMENTS_PER_ROW) + 1, which every warm-up compiles; a batch of more
    segments (many short documents) gets the base doubled until it holds them, at most rows * seq_len + 1 (another
    shape, compiled when it comes, and counted in VARLEN_OVERFLOWS for the log and the summary).
    FA3's backward sizes its accumulators by total_q + (entries - 1) * 128 rows per head: at 48 x 2,048 the base
    capacity (769 entries) costs 2x the tokens, one entry per token (98,305) 129x, ~49 GiB (docs/evaluation.md)."""
    base = rows * min(seq_len, VARLEN_SEGMENTS_PER_ROW)
    held = base
    while held < segments:
        held = min(2 * held, rows * seq_len)
    if held > base:
        key = (rows, seq_len, held + 1)
        VARLEN_OVERFLOWS[key] = VARLEN_OVERFLOWS.get(key, 0) + 1
    return held + 1


def capacity_of(ids: Tensor) -> int:
    """varlen_capacity of a batch on the device (a host copy: for forwards outside the hot loops)."""
    return varlen_capacity(ids.size(0), ids.size(1), count_segments(ids.cpu().numpy()))


TRAIN_SHARD_CHECK_TOKENS = 1 << 20   # each train shard's first tokens are range-checked at start-up


class TokenStream:
    """The train shards as one endless token stream; read(start, n) wraps around at the end. Every shard's
    header is checked when the stream opens, and its first TRAIN_SHARD_CHECK_TOKENS tokens against the
    vocabulary, so a wrong file fails before training; every read is range-checked too. read_end is one past
    the furthest position read (unwrapped: past `total` once the stream wrapped); files_read(end) names the
    shards holding the stream's first `end` tokens."""

    def __init__(self, files: list[str], vocab_size: int):
        self.files = files
        self.shards = [load_shard(f) for f in files]
        for f, shard in zip(files, self.shards):
            check_token_range(np.asarray(shard[:TRAIN_SHARD_CHECK_TOKENS]), vocab_size, f)
        self.sizes = np.array([s.size for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.total = int(self.offsets[-1])
        self.vocab_size = vocab_size
        self.read_end = 0
        if self.total == 0:
            raise PipelineError(f"train shards hold no tokens: {files}")

    def files_read(self, end: int) -> list[str]:
        return self.files[:int(np.searchsorted(self.offsets[:-1], min(end, self.total)))]

    def read(self, start: int, n: int) -> np.ndarray:
        self.read_end = max(self.read_end, start + n)
        pieces, pos = [], start % self.total
        while n > 0:
            i = int(np.searchsorted(self.offsets, pos, side="right") - 1)
            take = min(n, int(self.offsets[i + 1]) - pos)
            local = pos - int(self.offsets[i])
            piece = np.asarray(self.shards[i][local:local + take])
            check_token_range(piece, self.vocab_size, self.files[i])
            pieces.append(piece)
            n -= take
            pos = (pos + take) % self.total
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


class DistributedTokenLoader:
    """Hands each (step, micro-step, rank) its own contiguous span of the train stream."""

    def __init__(self, stream: TokenStream, batch_tokens: int, seq_len: int, world_size: int,
                 grad_accum: int, rank: int, device: torch.device):
        self.stream, self.seq_len, self.rank, self.device = stream, seq_len, rank, device
        self.world_size, self.grad_accum = world_size, grad_accum
        self.local_tokens = batch_tokens // (world_size * grad_accum)

    def span_start(self, step: int, micro: int, rank: int) -> int:
        chunk = (step * self.grad_accum + micro) * self.world_size + rank
        return chunk * (self.local_tokens + 1)

    def batch(self, step: int, micro: int) -> tuple[Tensor, Tensor, int]:
        """(inputs, targets, the varlen capacity of the inputs, counted here on the host)."""
        span = self.stream.read(self.span_start(step, micro, self.rank), self.local_tokens + 1)
        capacity = varlen_capacity(self.local_tokens // self.seq_len, self.seq_len,
                                   count_segments(span[:-1].reshape(-1, self.seq_len)))
        t = torch.from_numpy(span.astype(np.int64))
        if self.device.type == "cuda":  # CUDA-only: async host-to-device copy
            t = t.pin_memory().to(self.device, non_blocking=True)
        x = t[:-1].view(-1, self.seq_len)
        y = t[1:].view(-1, self.seq_len)
        return x, y, capacity


def load_validation_tokens(data_path: str, vocab_size: int, max_tokens: int) -> tuple[np.ndarray, int]:
    """All val shards concatenated (optionally the first max_tokens): (the stream to score, the length
    of the whole validation split)."""
    files = find_shards(data_path, "val")
    tokens = np.concatenate([np.asarray(load_shard(f)) for f in files]).astype(np.int64)
    split_tokens = tokens.size
    check_token_range(tokens, vocab_size, f"validation shards {files}")
    if max_tokens:
        tokens = tokens[:max_tokens]
    if tokens.size < 2:
        raise PipelineError(f"validation stream has {tokens.size} tokens; need at least 2 ({files})")
    return tokens, split_tokens


# -----------------------------------------------------------------------------
# EVALUATION SETUP: exact val_bpb
# bytes(target) = base_bytes[y] + (has_leading_space[y] and not is_boundary[x]), x the previous
# token; val_bpb = sum NLL / (ln 2 * sum bytes). Tables follow the challenge's rules exactly.
# -----------------------------------------------------------------------------

def open_tokenizer(tokenizer_path: str):
    """The SentencePiece model at TOKENIZER_PATH; a clean error when it is missing or not one."""
    import sentencepiece as spm
    if not os.path.isfile(tokenizer_path):
        raise PipelineError(f"TOKENIZER_PATH={tokenizer_path} does not exist")
    try:
        return spm.SentencePieceProcessor(model_file=tokenizer_path)
    except (OSError, RuntimeError) as e:
        raise PipelineError(f"TOKENIZER_PATH={tokenizer_path} is not a SentencePiece model ({e})") from None


def build_bpb_tables(tokenizer_path: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (base_bytes int64, has_leading_space bool, is_boundary bool), each table_size long."""
    sp = open_tokenizer(tokenizer_path)
    n = sp.vocab_size()
    if n > vocab_size:
        raise PipelineError(f"tokenizer {tokenizer_path} has {n} pieces but VOCAB_SIZE={vocab_size}")
    table_size = max(n, vocab_size)
    base_bytes = np.zeros(table_size, dtype=np.int64)
    has_leading_space = np.zeros(table_size, dtype=bool)
    is_boundary = np.ones(table_size, dtype=bool)
    for t in range(n):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        is_boundary[t] = False
        if sp.is_byte(t):
            base_bytes[t] = 1
            continue
        piece = sp.id_to_piece(t)
        if piece.startswith("\u2581"):
            has_leading_space[t] = True
            piece = piece[1:]
        base_bytes[t] = len(piece.encode("utf-8"))
    return base_bytes, has_leading_space, is_boundary


class ByteSidecar:
    """Bytes per position of the validation stream, read from its sidecar (load_byte_sidecar): it replaces
    the tables wherever the stream's bytes are counted (target_bytes)."""

    def __init__(self, tokens: np.ndarray, nbytes: np.ndarray):
        self.tokens, self.nbytes = tokens, nbytes


def target_bytes(prev: np.ndarray, target: np.ndarray, tables) -> np.ndarray:
    """UTF-8 bytes each target token stands for, given the token before it (int64). With a ByteSidecar the
    targets must be the validation stream's own, from its second token on."""
    if isinstance(tables, ByteSidecar):
        n = target.size
        if not np.array_equal(target, tables.tokens[1:n + 1]):
            raise PipelineError("the byte sidecar counts the validation stream; these targets are not its own")
        return tables.nbytes[1:n + 1]
    base_bytes, has_leading_space, is_boundary = tables
    return base_bytes[target] + (has_leading_space[target] & ~is_boundary[prev])


# --- CaseOps: case moved out of the text into operator symbols (records #1729 and #1855) ------------------
# The CaseOps tokenizer (TOKENIZER_PATH ..._lossless_caps_caseops_v1_reserved.model) was trained on text where
# every maximal run of ASCII letters is written in lower case after at most these operators: TITLE before a
# word whose first letter was upper case, ALLCAPS before a word of 2+ letters all upper case, CAPNEXT before
# each further upper-case letter of a mixed-case word; ESC before a literal operator character of the input.
# The operators are the tokenizer's user-defined pieces. The map is a bijection from all strings onto its
# image: caseops_decode(caseops_encode(x)) == x for every x, and a text t is a CaseOps text exactly when
# caseops_encode(caseops_decode(t)) == t.
CASEOPS_TITLE, CASEOPS_ALLCAPS, CASEOPS_CAPNEXT, CASEOPS_ESC = "\ue001", "\ue002", "\ue003", "\ue004"
CASEOPS_OPERATORS = (CASEOPS_TITLE, CASEOPS_ALLCAPS, CASEOPS_CAPNEXT, CASEOPS_ESC)
_CASEOPS_WORD = re.compile("[A-Za-z]+|[\ue001-\ue004]")
_CASEOPS_CODE = re.compile("\ue004([\ue001-\ue004])|\ue002([a-z]+)|[\ue001\ue003]([a-z])|[\ue001-\ue004]")


class CaseOpsError(ValueError):
    """A text that no input maps to (an operator without what must follow it)."""


def _caseops_word(m: re.Match) -> str:
    word = m.group()
    if word in CASEOPS_OPERATORS:
        return CASEOPS_ESC + word
    lower = word.lower()
    if word == lower:
        return word
    if len(word) >= 2 and word.isupper():
        return CASEOPS_ALLCAPS + lower
    head = (CASEOPS_TITLE if word[0].isupper() else "") + lower[0]
    return head + "".join(CASEOPS_CAPNEXT + low if ch.isupper() else low for ch, low in zip(word[1:], lower[1:]))


def caseops_encode(text: str) -> str:
    """The CaseOps text of `text` (any string)."""
    return _CASEOPS_WORD.sub(_caseops_word, text)


def _caseops_undo(m: re.Match) -> str:
    literal, allcaps, capital = m.groups()
    if literal is not None:
        return literal
    if allcaps is not None:
        return allcaps.upper()
    if capital is not None:
        return capital.upper()
    raise CaseOpsError(f"operator U+{ord(m.group()):04X} at character {m.start()} is not followed by what it needs")


def caseops_decode(text: str) -> str:
    """The original of a CaseOps text; CaseOpsError when an operator is left dangling."""
    return _CASEOPS_CODE.sub(_caseops_undo, text)


def caseops_operator_ids(sp) -> dict[str, int] | None:
    """{operator: id} when the tokenizer `sp` has the four operators as pieces (a CaseOps tokenizer), else None."""
    ids = {op: sp.piece_to_id(op) for op in CASEOPS_OPERATORS}
    found = [op for op, i in ids.items() if sp.id_to_piece(i) == op]
    if found and len(found) < len(CASEOPS_OPERATORS):
        raise PipelineError(f"the tokenizer has only {len(found)} of the 4 CaseOps operators as pieces")
    return ids if found else None


def stream_bytes(tokens: np.ndarray, tables, operator_ids: dict[str, int] | None = None) -> np.ndarray:
    """UTF-8 bytes of the ORIGINAL text that each position of the token stream stands for (int64; position 0,
    never a target, gets 0): target_bytes's count, except that on a CaseOps stream an operator stands for
    no byte, and an operator character that ESC made literal stands for its own UTF-8 bytes. Over any
    document this is the count the plain sp8192 tables give the same document (tests/test_caseops.py)."""
    out = np.zeros(tokens.size, dtype=np.int64)
    out[1:] = target_bytes(tokens[:-1], tokens[1:], tables)
    if operator_ids is None:
        return out
    op_of = {i: op for op, i in operator_ids.items()}
    out[np.isin(tokens, list(op_of))] = 0
    esc = operator_ids[CASEOPS_ESC]
    escaped = set()
    for p in np.flatnonzero(tokens == esc).tolist():     # literal operators are rare: a short Python loop
        if p in escaped or p + 1 == tokens.size:         # itself the literal one; or the stream was cut after it
            continue
        if int(tokens[p + 1]) not in op_of:
            raise PipelineError(f"CaseOps stream: the ESC at position {p} is not followed by an operator")
        escaped.add(p + 1)
        out[p + 1] = len(op_of[int(tokens[p + 1])].encode("utf-8"))
    return out


TOKENIZER_CHECK_DOCS = 16           # validation documents decoded and re-encoded at start-up ...
TOKENIZER_CHECK_TOKENS = 1 << 20     # ... found among the first shard's first tokens


def check_tokenizer_matches_shards(tokenizer_path: str, data_path: str, tokens: np.ndarray) -> int:
    """The byte tables are only right for the tokenizer that wrote the shards: a wrong one counts other
    bytes (sp1024 shards scored with the sp8192 tables came out ~25% low). Decode the first
    TOKENIZER_CHECK_DOCS complete documents of the validation stream `tokens` and encode the text again:
    the tokenizer that wrote them gives back the same ids (every document of the development shards
    does); another gives other ids. Returns the number of documents checked; a mismatch is an error."""
    sp = open_tokenizer(tokenizer_path)
    bos = np.flatnonzero(tokens == BOS_ID)
    docs = [tokens[a + 1:b] for a, b in zip(bos[:TOKENIZER_CHECK_DOCS], bos[1:TOKENIZER_CHECK_DOCS + 1])]
    if not docs:
        raise PipelineError(f"DATA_PATH={data_path}: the validation stream holds no complete document (each starts "
                            f"with BOS id {BOS_ID}), so TOKENIZER_PATH={tokenizer_path} cannot be checked against it")
    not_caseops = [] if caseops_operator_ids(sp) is not None else None
    for i, doc in enumerate(docs):
        ids = doc.tolist()
        if max(ids, default=0) >= sp.vocab_size() or sp.encode(text := sp.decode(ids)) != ids:
            raise PipelineError(f"TOKENIZER_PATH={tokenizer_path} did not write the shards in DATA_PATH={data_path}: "
                                f"validation document {i} decodes and re-encodes to other ids (bytes would be "
                                "counted with the wrong tables); point both at one tokenization")
        if not_caseops is not None and not is_caseops_text(text):
            not_caseops.append(i)
    if not_caseops and len(not_caseops) > len(docs) // 4:
        raise PipelineError(f"TOKENIZER_PATH={tokenizer_path} is a CaseOps tokenizer but validation documents {not_caseops} "
                            f"of {len(docs)} in DATA_PATH={data_path} are not CaseOps text (the transform was not "
                            "applied, or another one was): build the data with tools/caseops.py")
    return len(docs)


def is_caseops_text(text: str) -> bool:
    """Whether `text` is the CaseOps transform of some string. The tokenizer's NFKC normalization breaks this
    for a few documents (fullwidth capitals become ASCII ones; "A" + combining ring becomes TITLE "å"), so
    check_tokenizer_matches_shards refuses only when more than a quarter of the documents fail."""
    try:
        return caseops_encode(caseops_decode(text)) == text
    except CaseOpsError:
        return False


def load_byte_sidecar(tokenizer_path: str, data_path: str, tokens: np.ndarray, tables):
    """The byte count of the validation stream `tokens` (VAL_MAX_TOKENS may have cut it): a ByteSidecar when
    fineweb_val_bytes_XXXXXX.bin files sit beside the validation shards (record #1729's layout: shard headers,
    then one uint16 per token, parallel to fineweb_val_XXXXXX.bin), else the tables. A CaseOps tokenizer needs
    one: its tables alone would count the operators' UTF-8 bytes. The sidecar must hold exactly the bytes
    stream_bytes derives from the ids, the sp8192 tables' count of the same documents (tools/caseops.py writes
    it; the record's own export counts each piece's raw span, whitespace the tokenizer collapsed included, and
    is refused: docs/caseops.md). A sidecar marks CaseOps data: with a tokenizer that is not CaseOps it is refused."""
    operator_ids = caseops_operator_ids(open_tokenizer(tokenizer_path))
    files = sorted(glob.glob(os.path.join(data_path, "fineweb_val_bytes_[0-9]*.bin")))
    if files and operator_ids is None:
        raise PipelineError(f"DATA_PATH={data_path} has a byte sidecar (fineweb_val_bytes_*.bin: CaseOps data) but "
                            f"TOKENIZER_PATH={tokenizer_path} is not a CaseOps tokenizer; point both at one tokenization")
    if not files:
        if operator_ids is not None:
            raise PipelineError(f"TOKENIZER_PATH={tokenizer_path} is a CaseOps tokenizer but DATA_PATH={data_path} has no "
                                "fineweb_val_bytes_*.bin sidecar to count the original bytes (tools/caseops.py sidecar)")
        return tables
    shards = find_shards(data_path, "val")
    if [os.path.basename(f).replace("_bytes", "") for f in files] != [os.path.basename(f) for f in shards]:
        raise PipelineError(f"DATA_PATH={data_path}: the byte sidecar files {files} do not pair with the validation shards")
    for f, shard in zip(files, shards):
        if read_shard_header(f) != read_shard_header(shard):
            raise PipelineError(f"{f}: {read_shard_header(f)} entries for the {read_shard_header(shard)} tokens of {shard}")
    nbytes = np.concatenate([np.asarray(load_shard(f)) for f in files])[:tokens.size].astype(np.int64)
    expected = stream_bytes(tokens, tables, operator_ids)
    if not np.array_equal(nbytes[1:], expected[1:]):
        first = int(np.flatnonzero(nbytes[1:] != expected[1:])[0]) + 1
        raise PipelineError(f"DATA_PATH={data_path}: the byte sidecar counts {int(nbytes[1:].sum())} bytes, the tokens stand for "
                            f"{int(expected[1:].sum())} (first difference at position {first}: {int(nbytes[first])} vs "
                            f"{int(expected[first])}); rewrite it with tools/caseops.py sidecar")
    return ByteSidecar(tokens, nbytes)


def file_sha256(paths: list[str]) -> str:
    """sha256 of the files' bytes, concatenated in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def shards_sha256(rt: Runtime, files: list[str]) -> list[str]:
    """sha256 of each file (file_sha256), the files shared out over the ranks (rank r hashes files r, r +
    world_size, ...) and gathered: every rank gets the whole list, in the order given."""
    mine = {i: file_sha256([files[i]]) for i in range(rt.rank, len(files), rt.world_size)}
    found = {i: h for part in gather(rt, mine) for i, h in part.items()}
    return [found[i] for i in range(len(files))]


@dataclass
class DataFingerprint:
    """The data a run scored, pinned at start-up: the tokenizer file and the validation shards (sha256), how many
    validation documents the tokenizer re-encoded to the shards' ids, and how much of the split is scored."""
    tokenizer_sha256: str
    val_shards_sha256: str
    tokenizer_check_docs: int
    val_split_tokens: int            # tokens of the whole validation split
    val_full_split: bool             # every one of them scored (no VAL_MAX_TOKENS)


# -----------------------------------------------------------------------------
# QUANTIZATION GRID
# Every weight matrix gets a scheme (choose_scheme): ternary for names matching TERNARY_PATTERNS
# ({-1, 0, +1} with an fp16 mean-|w| scale per 128 inputs); else int<b> per row with SDClip (record
# 2026-04-05): the row's clip is k std(row), its fp16 scale k std(row) / (2^(b-1) - 1), where b and k
# are per group (attention and other matrices, MLP matrices, embedding tables: QUANT_*). Entropy,
# hence compressed size, then follows H(q) ~ b - log2 k + 1.05 bits per weight for near-Gaussian rows,
# so k is the byte knob. Vectors and control tensors: fp16. One function per scheme computes the
# stored values, used by the fake-quantized forward of late QAT (QuantLinear) and by the export.
# It stands before the model, whose fake-quantized layers round onto it during training.
# -----------------------------------------------------------------------------

EMBEDDING_TABLES = ("tok_emb.weight", "bigram.table.weight")
TERNARY_GROUP = 128        # ternary weights share one scale per 128 inputs (Bonsai; record PR #640)
FP16_TINY = torch.finfo(torch.float16).tiny


def quant_group(name: str) -> str:
    """The quantizer's group of a weight: embed (embedding tables), mlp or attn (every other matrix)."""
    if name in EMBEDDING_TABLES:
        return "embed"
    return "mlp" if ".mlp." in name else "attn"


@dataclass(frozen=True)
class QuantSpec:
    """Bits and SDClip k (clip in row standard deviations) of each quantizer group."""
    bits: tuple[tuple[str, int], ...]
    sigmas: tuple[tuple[str, float], ...]

    @staticmethod
    def from_settings(hp: Hyperparameters, scale: float = 1.0) -> "QuantSpec":
        bits = dict(embed=hp.quant_embed_bits, mlp=hp.quant_matrix_bits, attn=hp.quant_matrix_bits)
        sigmas = dict(embed=hp.quant_clip_sigmas_embed, mlp=hp.quant_clip_sigmas_mlp, attn=hp.quant_clip_sigmas_attn)
        return QuantSpec(tuple(bits.items()), tuple((g, k * scale) for g, k in sigmas.items()))

    def bits_of(self, group: str) -> int:
        return dict(self.bits)[group]

    def sigmas_of(self, group: str) -> float:
        return dict(self.sigmas)[group]

    def coarser(self, factor: float) -> "QuantSpec":
        return QuantSpec(self.bits, tuple((g, k * factor) for g, k in self.sigmas))

    def with_bits(self, **bits: int) -> "QuantSpec":
        return QuantSpec(tuple((g, bits.get(g, b)) for g, b in self.bits), self.sigmas)

    def describe(self) -> str:
        return " ".join(f"{g}:int{b}@k={dict(self.sigmas)[g]:.2f}" for g, b in self.bits)


def sdclip_scale(w: Tensor, bits: int, sigmas: float) -> Tensor:
    """fp16 per-row scale k std(row) / (2^(bits-1) - 1) (population std: a 1-column row has std 0)."""
    qmax = 2 ** (bits - 1) - 1
    return (sigmas * w.std(dim=1, correction=0) / qmax).clamp_min(FP16_TINY).half()


def round_rows(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return torch.clamp(torch.round(w / scale.float()[:, None]), -qmax, qmax)


def quantize_rows(w: Tensor, bits: int, sigmas: float) -> tuple[Tensor, Tensor]:
    """SDClip round to nearest: integers q in [-(2^(bits-1) - 1), 2^(bits-1) - 1] (float32) and the fp16
    row scale; rounding uses the fp16-rounded scale. The fake-quantized forward and the export both call
    this, so they agree bit for bit. Any device."""
    w = w.detach().float()
    scale = sdclip_scale(w, bits, sigmas)
    return round_rows(w, scale, 2 ** (bits - 1) - 1), scale


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]


def quantize_ternary(w: Tensor) -> tuple[Tensor, Tensor]:
    """Ternary q in {-1, 0, +1} (float32, w's shape) with one fp16 scale per TERNARY_GROUP inputs of a
    row: scale = mean |w| of the group (BitNet b1.58 absmean), q = clamp(round(w / scale), -1, 1) with
    the fp16-rounded scale. A last, shorter group averages over its own length."""
    rows, cols = w.shape
    groups = -(-cols // TERNARY_GROUP)
    padded = F.pad(w.detach().float(), (0, groups * TERNARY_GROUP - cols)).view(rows, groups, TERNARY_GROUP)
    counts = torch.full((groups,), float(TERNARY_GROUP), device=w.device)
    counts[-1] = cols - (groups - 1) * TERNARY_GROUP
    scale = (padded.abs().sum(dim=2) / counts).clamp_min(FP16_TINY).half()
    q = torch.clamp(torch.round(padded / scale.float()[..., None]), -1, 1)
    return q.view(rows, -1)[:, :cols], scale


def dequantize_ternary(q: Tensor, scale: Tensor) -> Tensor:
    rows, cols = q.shape
    groups = scale.shape[1]
    padded = F.pad(q.float(), (0, groups * TERNARY_GROUP - cols)).view(rows, groups, TERNARY_GROUP)
    return (padded * scale.float()[..., None]).view(rows, -1)[:, :cols]


def fake_quantize(w: Tensor, scheme: str, sigmas: float = 0.0) -> Tensor:
    """The weights export will store for `scheme` (ternary, or int<b>_row with SDClip k = sigmas), as a
    tensor whose gradient flows straight through to w.
    Exactly the dequantized values: deq + (w - w) adds an exact zero."""
    with torch.no_grad():
        if scheme == "ternary":
            deq = dequantize_ternary(*quantize_ternary(w))
        else:
            deq = dequantize_rows(*quantize_rows(w, int(scheme[3]), sigmas))
    return deq.to(w.dtype) + (w - w.detach())


def ternary_patterns(hp: Hyperparameters) -> tuple[str, ...]:
    return tuple(p.strip() for p in hp.ternary_patterns.split(",") if p.strip())


def choose_scheme(name: str, t: Tensor, spec: QuantSpec, ternary: tuple[str, ...] = ()) -> str:
    """Weight matrices: ternary when the name contains a TERNARY_PATTERNS fragment (never the embedding
    tables), else int<bits of its quant_group>_row. Vectors and control tensors: fp16."""
    if t.ndim == 2 and name.endswith(".weight"):
        if name not in EMBEDDING_TABLES and any(fragment in name for fragment in ternary):
            return "ternary"
        return f"int{spec.bits_of(quant_group(name))}_row"
    return "fp16"


def weight_group(name: str) -> str:
    """The report's grouping of tensors: tok_emb, bigram, attn, mlp, other."""
    for group, fragment in (("tok_emb", "tok_emb."), ("bigram", "bigram."), ("attn", ".attn."), ("mlp", ".mlp.")):
        if fragment in name:
            return group
    return "other"


# -----------------------------------------------------------------------------
# MODULES
# One attention entry point: flash-attn (FA3's flash_attn_interface, else FA2's flash_attn) on
# CUDA when importable, PyTorch SDPA otherwise. Both take q, k, v as (batch, seq, heads, dim)
# with fewer k/v heads (GQA), causal. With ATTN_DOC_ISOLATION=1 (VarLen attention, records #1530 on)
# a token also sees only its own document: flash_attn_varlen_func over the flattened batch on CUDA,
# a block-diagonal causal mask with SDPA; both from the same document ids (document_ids).
# -----------------------------------------------------------------------------

def _import_flash_attn():
    """(flash_attn_func, flash_attn_varlen_func or None, 'module version') of FA3 or FA2, whichever imports
    first; (None, None, None) if neither."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            imported = __import__(module)
            return (imported.flash_attn_func, getattr(imported, "flash_attn_varlen_func", None),
                    f"{module} {getattr(imported, '__version__', '(no version)')}")
        except (ImportError, AttributeError):
            continue
    return None, None, None


FLASH_ATTN_FUNC, FLASH_VARLEN_FUNC, FLASH_ATTN_SOURCE = _import_flash_attn()


FLASH_DTYPE = torch.bfloat16     # FA2/FA3 accept only fp16/bf16, one dtype for q, k and v


def attention_backend(device: torch.device, autocast_dtype: torch.dtype | None) -> str:
    """flash on CUDA with a 16-bit compute dtype when flash-attn imports; SDPA otherwise (FA2/FA3
    have no fp32 kernels, so COMPUTE_DTYPE=fp32 uses SDPA on CUDA too)."""
    usable = FLASH_ATTN_FUNC is not None and device.type == "cuda" and autocast_dtype is not None
    return "flash" if usable else "sdpa"


def check_attention_backend(hp: Hyperparameters, device: torch.device, backend: str) -> str:
    """One line naming the attention kernel the run uses. On CUDA without flash-attn, SDPA would make every
    step slower without a word on the console (a torch reinstalled under a flash-attn wheel built for
    another torch stops it importing): that is an error unless ALLOW_SDPA=1."""
    if backend == "flash" and hp.attn_doc_isolation and FLASH_VARLEN_FUNC is None:
        raise PipelineError(f"ATTN_DOC_ISOLATION=1 needs flash_attn_varlen_func, which {FLASH_ATTN_SOURCE} lacks: "
                            "install a flash-attn build that has it, or set ATTN_DOC_ISOLATION=0")
    if backend == "flash":
        return f"attention: flash ({FLASH_ATTN_SOURCE})" + (", varlen per document" if hp.attn_doc_isolation else "")
    if device.type == "cuda" and FLASH_ATTN_FUNC is None and not hp.allow_sdpa:
        raise PipelineError(f"flash-attn does not import here (neither flash_attn_interface (FA3) nor flash_attn "
                            f"(FA2)): install the build made for torch {torch.__version__}, or set ALLOW_SDPA=1 to "
                            "train with PyTorch SDPA attention (slower)")
    why = ("on the CPU" if device.type != "cuda" else "flash-attn does not import; ALLOW_SDPA=1"
           if FLASH_ATTN_FUNC is None else "flash-attn has no fp32 kernel; COMPUTE_DTYPE=fp32")
    return f"attention: sdpa (PyTorch scaled_dot_product_attention; {why})"


def document_ids(input_ids: Tensor) -> Tensor:
    """(B, T) -> (B, T): the index of each token's document inside its row (a BOS starts the next one;
    tokens before a row's first BOS are document 0, the tail of a document begun in an earlier row)."""
    return (input_ids == BOS_ID).cumsum(dim=1)


def varlen_cu_seqlens(docs: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """(cu_seqlens, overflow) for flash_attn_varlen_func over the B*T flattened tokens: the start of every segment
    (a row's first token or a change of document), sorted, cut to `capacity` - 1 starts, then B*T; int32, one
    shape per capacity. `overflow` (a 0-d bool tensor, no host sync) is true when the batch holds more segments
    than that: the caller counted wrong; cu_seqlens then holds the rows alone (still no segment past T, so the
    kernel stays in bounds) and causal_attention poisons the output with NaN rather than let documents run
    together."""
    n, t = docs.numel(), docs.size(1)
    if capacity < n // t + 1:
        raise RuntimeError(f"a varlen capacity of {capacity} cannot hold the {n // t} rows of the batch")
    flat = docs.reshape(-1)
    pos = torch.arange(n, device=docs.device)
    row_starts = pos % t == 0
    starts = row_starts | torch.cat((flat.new_ones(1, dtype=torch.bool), flat[1:] != flat[:-1]))
    overflow = starts.sum() > capacity - 1
    cu = torch.where(overflow, torch.sort(torch.where(row_starts, pos, n)).values,
                     torch.sort(torch.where(starts, pos, n)).values)[:capacity - 1]
    return torch.cat((cu, cu.new_full((1,), n))).to(torch.int32), overflow


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str,
                     varlen: tuple[Tensor, int | None] | None = None) -> Tensor:
    """q: (B, T, H, D); k, v: (B, T, Hkv, D); varlen: ((B, T) document ids (document_ids), the cu_seqlens capacity
    (varlen_capacity; the flash path needs it)) or None (attention across documents). Returns (B, T, H, D)."""
    B, T, H, D = q.shape
    if backend == "flash":
        # CUDA autocast runs F.rms_norm in fp32 (torch >= 2.12): q and k arrive fp32 while v is bf16
        q, k, v = q.to(FLASH_DTYPE), k.to(FLASH_DTYPE), v.to(FLASH_DTYPE)
        if varlen is None:
            out = FLASH_ATTN_FUNC(q, k, v, causal=True)
        else:
            docs, capacity = varlen
            if capacity is None:
                raise RuntimeError("a document-isolated flash forward needs its cu_seqlens capacity (varlen_capacity)")
            cu, overflow = varlen_cu_seqlens(docs, capacity)
            out = FLASH_VARLEN_FUNC(q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                                    cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T, causal=True)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the LSE
        if varlen is not None:
            out = out.masked_fill(overflow, float("nan"))
        return out.reshape(B, T, H, D)
    mask = None
    if varlen is not None:       # block-diagonal causal: earlier (or the same) position of the same document
        docs = varlen[0]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = (causal[None] & (docs[:, :, None] == docs[:, None, :]))[:, None]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


class FakeQuantWeight:
    """Mixin of QuantLinear and QuantEmbedding: `qat_scheme` None uses the float weight; set to a
    scheme (late QAT, or ternary from TERNARY_FROM_STEP), train_weight() is fake_quantize(weight,
    scheme, qat_sigmas): the exact values export will store, with a straight-through gradient."""
    qat_scheme: str | None = None
    qat_sigmas: float = 0.0           # the SDClip k of an integer scheme

    def train_weight(self) -> Tensor:
        if self.qat_scheme is None:
            return self.weight
        return fake_quantize(self.weight, self.qat_scheme, self.qat_sigmas)


class QuantLinear(FakeQuantWeight, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.train_weight())


class QuantEmbedding(FakeQuantWeight, nn.Embedding):
    """The tied head reads train_weight() too, so both uses see the exported table."""

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.train_weight())


def set_qat(model: nn.Module, spec: QuantSpec | None, ternary: tuple[str, ...], only_ternary: bool = False) -> int:
    """Point every QuantLinear/QuantEmbedding at the scheme (and SDClip k) export will give its weight
    (spec None: all off; only_ternary: just the ternary ones). Returns how many modules fake-quantize now."""
    on = 0
    for name, module in model.named_modules():
        if not isinstance(module, FakeQuantWeight):
            continue
        if spec is None:
            module.qat_scheme = None
            continue
        weight = f"{name}.weight"
        scheme = choose_scheme(weight, module.weight, spec, ternary)
        if scheme.startswith("ternary") or not only_ternary:
            module.qat_scheme, module.qat_sigmas = scheme, spec.sigmas_of(quant_group(weight))
        on += module.qat_scheme is not None
    return on


class RMSNorm(nn.Module):
    """RMSNorm without a weight; a module (not a function) so a forward hook sees its output (the
    final one's output is the head's input, whose Hessian GPTQ uses for the tied embedding)."""

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x)


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def to_compute_dtype(x: Tensor) -> Tensor:
    """x in autocast's dtype when autocast is on: the residual stream stays bf16 on CUDA (an embedding
    lookup returns the fp32 table's dtype, and CUDA autocast runs rms_norm in fp32)."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class Rotary(nn.Module):
    """RoPE on the first `rope_dims` dims of each head (partial RoPE); the rest carry no position."""

    def __init__(self, head_dim: int, rope_dims: int, base: float):
        super().__init__()
        self.rope_dims, self.base = rope_dims or head_dim, base   # no buffer: DDP has nothing to broadcast

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """Rotate x: (B, T, H, D), whose first position is `offset` in the sequence."""
        dims = torch.arange(0, self.rope_dims, 2, device=x.device, dtype=torch.float32)
        t = torch.arange(offset, offset + x.size(1), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, 1.0 / (self.base ** (dims / self.rope_dims)))
        cos, sin = freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)
        rot, rest = x[..., :self.rope_dims], x[..., self.rope_dims:]
        half = self.rope_dims // 2
        x1, x2 = rot[..., :half], rot[..., half:]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


class DecodeCache:
    """State for incremental decoding (GPTQ self-calibration): keys and values of every position so far,
    one slot per block visit (a layer depth recurrence repeats has one per pass), and the previous token
    and embedding that BigramHash and SmearGate read. `pos` is the number of positions already decoded."""

    def __init__(self):
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        self.pos = 0
        self.prev_ids: Tensor | None = None
        self.prev_embed: Tensor | None = None

    def extend(self, slot: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if slot in self.keys:
            k, v = torch.cat((self.keys[slot], k), dim=1), torch.cat((self.values[slot], v), dim=1)
        self.keys[slot], self.values[slot] = k, v
        return k, v


def cached_attention(q: Tensor, k: Tensor, v: Tensor, offset: int) -> Tensor:
    """q: (B, T, H, D) at positions offset..offset+T-1 over keys k, v: (B, offset+T, Hkv, D)."""
    mask = torch.arange(k.size(1), device=q.device)[None, :] <= offset + torch.arange(q.size(1), device=q.device)[:, None]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    """GQA attention with q/k RMSNorm, a learned per-head query gain, partial RoPE, and optionally
    XSA (remove from each head's output its component along that position's own value vector;
    arXiv 2603.09078, used by records #1019 on) and a per-head output gate 2 sigmoid(W x) computed
    from the first ATTN_GATE_DIMS dims of the input (the sparse gate of record #1787; 0 = all dims, the
    dense gate), zero-initialised so it starts as the identity."""

    def __init__(self, hp: Hyperparameters, xsa: bool):
        super().__init__()
        dim = hp.model_dim
        self.num_heads, self.num_kv_heads = hp.num_heads, hp.num_kv_heads
        self.head_dim = dim // hp.num_heads
        kv_dim = hp.num_kv_heads * self.head_dim
        self.c_q = QuantLinear(dim, dim, bias=False)
        self.c_k = QuantLinear(dim, kv_dim, bias=False)
        self.c_v = QuantLinear(dim, kv_dim, bias=False)
        self.proj = QuantLinear(dim, dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.q_gain = nn.Parameter(torch.full((hp.num_heads,), hp.qk_gain_init))
        self.rotary = Rotary(self.head_dim, hp.rope_dims, hp.rope_base)
        self.xsa = xsa
        self.gate_dims = hp.attn_gate_dims or dim
        self.gate = QuantLinear(self.gate_dims, hp.num_heads, bias=False) if hp.attn_gate else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)           # 2 * sigmoid(0) = 1: starts as the identity
        self.backend = "sdpa"

    def forward(self, x: Tensor, cache: DecodeCache | None = None, slot: int = 0,
                varlen: tuple[Tensor, int | None] | None = None, lora: "TTTLoRA | None" = None) -> Tensor:
        """x: the block's normed input (B, T, d); varlen: see causal_attention; lora: per-document TTT's adapters,
        whose deltas of layer visit `slot` (each from x) add to q, k, v and the output (o)."""
        B, T, _ = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if lora is not None:
            q, k, v = lora.add(slot, "q", x, q), lora.add(slot, "k", x, k), lora.add(slot, "v", x, v)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        offset = cache.pos if cache is not None else 0
        q, k = self.rotary(rms_norm(q), offset), self.rotary(rms_norm(k), offset)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        if cache is None:
            y = causal_attention(q, k, v, self.backend, varlen)
        else:
            y = cached_attention(q, *cache.extend(slot, k, v), offset)
        if self.xsa:
            vn = F.normalize(v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2), dim=-1).to(y.dtype)
            y = y - (y * vn).sum(dim=-1, keepdim=True) * vn     # (autocast runs normalize in fp32)
        if self.gate is not None:
            y = y * (2.0 * torch.sigmoid(self.gate(x[..., :self.gate_dims])))[..., None]
        out = self.proj(y.reshape(B, T, -1))
        return out if lora is None else lora.add(slot, "o", x, out)


class MLP(nn.Module):
    """relu^2 (baseline) or LeakyReLU(0.5)^2 (records #1019 on)."""

    def __init__(self, dim: int, mult: int, act: str):
        super().__init__()
        self.fc = QuantLinear(dim, mult * dim, bias=False)
        self.proj = QuantLinear(mult * dim, dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.negative_slope = 0.5 if act == "leaky_relu2" else 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.leaky_relu(self.fc(x), self.negative_slope).square())


class Block(nn.Module):
    """Pre-norm block with learned per-channel branch scales and a mix of the input embedding x0.

    LN_SCALE multiplies the normalized branch inputs by 1/sqrt(layer + 1). The last PARALLEL_LAST_N
    blocks are parallel: with PARALLEL_LANES=1 attention and MLP read the same input (one residual
    lane); with 2 (records 04-13 on) the model carries two lanes through them, attention reading lane 0
    (mixed with x0), the MLP lane 1, and each lane becomes a learned mix of itself and both outputs:
    lane_j <- lane_resid[j] lane_j + lane_post[0, j] attn + lane_post[1, j] mlp (inits 1.1 and 1, as the
    records had them)."""

    def __init__(self, hp: Hyperparameters, layer: int):
        super().__init__()
        dim = hp.model_dim
        self.attn = CausalSelfAttention(hp, xsa=layer >= hp.num_layers - hp.xsa_last_n)
        self.mlp = MLP(dim, hp.mlp_mult, hp.mlp_act)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack([torch.ones(dim), torch.zeros(dim)]))
        self.norm_scale = 1.0 / math.sqrt(layer + 1) if hp.ln_scale else 1.0
        self.parallel = layer >= hp.num_layers - hp.parallel_last_n
        self.lanes = hp.parallel_lanes if self.parallel else 1
        if self.lanes == 2:
            self.lane_resid = nn.Parameter(torch.full((2,), 1.1))
            self.lane_post = nn.Parameter(torch.ones(2, 2))

    def mix(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        return mix[0] * x + mix[1] * x0

    def attention(self, x: Tensor, cache: DecodeCache | None, slot: int, varlen, lora) -> Tensor:
        return self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.norm_scale, cache, slot, varlen, lora)

    def feed_forward(self, x: Tensor, slot: int, lora: "TTTLoRA | None") -> Tensor:
        n = rms_norm(x) * self.norm_scale
        out = self.mlp(n)
        return self.mlp_scale.to(x.dtype) * (out if lora is None else lora.add(slot, "mlp", n, out))

    def forward(self, x: Tensor, x0: Tensor, cache: DecodeCache | None = None, slot: int = 0,
                varlen=None, lora: "TTTLoRA | None" = None) -> Tensor:
        x = self.mix(x, x0)
        attn_out = self.attention(x, cache, slot, varlen, lora)
        return x + attn_out + self.feed_forward(x if self.parallel else x + attn_out, slot, lora)

    def forward_lanes(self, lanes: tuple[Tensor, Tensor], x0: Tensor, cache: DecodeCache | None = None,
                      slot: int = 0, varlen=None, lora: "TTTLoRA | None" = None) -> tuple[Tensor, Tensor]:
        attn_out = self.attention(self.mix(lanes[0], x0), cache, slot, varlen, lora)
        mlp_out = self.feed_forward(lanes[1], slot, lora)
        r, p = self.lane_resid.to(attn_out.dtype), self.lane_post.to(attn_out.dtype)
        return r[0] * lanes[0] + p[0, 0] * attn_out + p[1, 0] * mlp_out, r[1] * lanes[1] + p[0, 1] * attn_out + p[1, 1] * mlp_out


class BigramHash(nn.Module):
    """Embedding of the hashed (previous, current) token pair, projected to the model width.

    The projection starts at zero, so the model starts as if it were absent. Bucket 0 is for the
    first position of a sequence (no previous token), and with `bos_first` (ATTN_DOC_ISOLATION=1) for a BOS too,
    so a document's first token reads nothing of the one before.
    """

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.table = QuantEmbedding(buckets, dim)
        nn.init.normal_(self.table.weight, std=0.02)
        self.proj = QuantLinear(dim, model_dim, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, ids: Tensor, prev_ids: Tensor | None = None, bos_first: bool = False) -> Tensor:
        """prev_ids: the token before ids[:, 0] (incremental decoding), else none (bucket 0)."""
        first = torch.zeros_like(ids[:, :1]) if prev_ids is None else prev_ids
        prev = torch.cat((first, ids[:, :-1]), dim=1)
        h = (prev * 1_000_003 + ids) % (self.buckets - 1) + 1
        if prev_ids is None:
            h[:, 0] = 0
        if bos_first:
            h = torch.where(ids == BOS_ID, 0, h)
        return self.proj(self.table(h))


class GPT(nn.Module):
    """Tied-embedding GPT with U-Net skips: the first half's outputs feed the second half in reverse. By default
    (SKIP_GATES=1) the skips pair visiting positions of the layer order, so the looped layers' repeats have their
    own, each x <- lerp(w skip, x, sigmoid(g)); SKIP_GATES=0: x + w skip between physical layers on their first visit.

    Depth recurrence: once `recurrence_on` is set (from RECUR_START_FRAC of training), layers RECUR_LAYERS run
    RECUR_PASSES times in a row. Two-lane parallel blocks start their lanes as copies of the stream, take the skips
    on lane 0, and the lanes' mean goes to the final norm.

    forward(input_ids, target_ids, capacity, lora) -> per-token NLL in nats, float32, shape (B, T); capacity: the
    varlen cu_seqlens capacity of the batch (varlen_capacity; the flash path needs it), lora: per-document TTT's
    adapters (TTTLoRA), one row each. logits(input_ids, cache) with a DecodeCache decodes incrementally: input_ids
    are the next tokens.
    With ATTN_DOC_ISOLATION=1 every forward without a cache (training, evaluation, TTT, the audit) keeps each
    token inside its document: attention (document_ids), SmearGate (never into a BOS) and BigramHash (a BOS
    hashes alone) read nothing across a BOS, so a row of several documents gives each the NLLs it would get
    alone (RoPE is relative). Incremental decoding (self-generated GPTQ calibration only) attends across.
    """

    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.softcap = hp.logit_softcap
        # record #1923: learnable caps of the positive and the negative logits (identical to the one cap at the start)
        self.softcap_pos = nn.Parameter(torch.tensor(hp.logit_softcap)) if hp.logit_softcap_asym else None
        self.softcap_neg = nn.Parameter(torch.tensor(hp.logit_softcap)) if hp.logit_softcap_asym else None
        self.tok_emb = QuantEmbedding(hp.vocab_size, hp.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=hp.tied_embed_init_std)
        self.bigram = BigramHash(hp.bigram_vocab, hp.bigram_dim, hp.model_dim) if hp.bigram_vocab else None
        # SmearGate: x_t += smear * gate_t * x_{t-1}, never into a BOS (a new document); zero at start.
        # gate_t = 1, or with SMEAR_GATE_DIMS = n the input-dependent 2 sigmoid(w . x_t[:n]) (record 04-27)
        self.smear = nn.Parameter(torch.zeros(hp.model_dim)) if hp.smear_gate else None
        self.smear_dims = hp.smear_gate_dims
        self.smear_gate = QuantLinear(hp.smear_gate_dims, 1, bias=False) if hp.smear_gate and hp.smear_gate_dims else None
        if self.smear_gate is not None:
            nn.init.zeros_(self.smear_gate.weight)
        self.blocks = nn.ModuleList([Block(hp, i) for i in range(hp.num_layers)])
        self.final_norm = RMSNorm()
        self.num_encoder = hp.num_layers // 2
        self.recur_range = parse_layer_range(hp.recur_layers)
        self.recur_passes = hp.recur_passes
        self.recurrence_on = False
        # SKIP_GATES=1 (record #1855): the skips pair visiting positions of layer_order(), the first half's
        # outputs feeding the second half last in, first out; skip k: x <- lerp(w_k skip, x, sigmoid(g_k)), g = 0
        # at the start (half and half). The parameters of skip k serve both layer orders (recurrence off, on).
        self.skip_gated = bool(hp.skip_gates)
        positions = len(self.layer_order(recurrence=True)) if self.skip_gated else hp.num_layers
        self.num_skips = min(positions // 2, positions - positions // 2)
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, hp.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, hp.model_dim)) if self.skip_gated else None
        if hp.init_orthogonal:      # record #1855: orthogonal Q, K, V and MLP-up (the output projections stay 0)
            for b in self.blocks:
                for lin in (b.attn.c_q, b.attn.c_k, b.attn.c_v, b.mlp.fc):
                    nn.init.orthogonal_(lin.weight)
        self.doc_isolation = bool(hp.attn_doc_isolation)

    def set_attention_backend(self, backend: str) -> None:
        for block in self.blocks:
            block.attn.backend = backend

    def layer_order(self, recurrence: bool | None = None) -> list[int]:
        """The blocks in the order they run (RECUR_LAYERS repeated when recurrence is on, or when asked)."""
        order = list(range(len(self.blocks)))
        if (self.recurrence_on if recurrence is None else recurrence) and self.recur_range:
            lo, hi = self.recur_range
            order = order[:hi + 1] + list(range(lo, hi + 1)) * (self.recur_passes - 1) + order[hi + 1:]
        return order

    def embed(self, input_ids: Tensor, cache: DecodeCache | None = None) -> Tensor:
        x = self.tok_emb(input_ids)
        if self.bigram is not None:
            x = x + self.bigram(input_ids, cache.prev_ids if cache is not None else None,
                                bos_first=self.doc_isolation and cache is None)
        x = rms_norm(x)
        last = x[:, -1:]
        if self.smear is not None:
            before = cache.prev_embed if cache is not None else None   # the (unsmeared) position before x[:, 0]
            prev = x[:, :-1] if before is None else torch.cat((before, x[:, :-1]), dim=1)
            k = x.size(1) - prev.size(1)        # 1: the first position has no previous one
            gate = (input_ids[:, k:] != BOS_ID).to(x.dtype)[..., None]
            if self.smear_gate is not None:
                gate = gate * 2.0 * torch.sigmoid(self.smear_gate(x[:, k:, :self.smear_dims]))
            x = torch.cat((x[:, :k], x[:, k:] + self.smear.to(x.dtype) * prev * gate), dim=1)
        if cache is not None:
            cache.prev_ids, cache.prev_embed = input_ids[:, -1:], last
        return to_compute_dtype(x)

    def hidden(self, input_ids: Tensor, cache: DecodeCache | None = None, capacity: int | None = None,
               lora: "TTTLoRA | None" = None) -> Tensor:
        """The final norm's input (B, T, d). capacity: the cu_seqlens capacity of a document-isolated flash forward
        (varlen_capacity); lora: per-document TTT's adapters, one slot per layer visit."""
        x = self.embed(input_ids, cache)
        varlen = (document_ids(input_ids), capacity) if self.doc_isolation and cache is None else None
        x0, skips, seen, lanes = x, [], set(), None
        order = self.layer_order()
        half = len(order) // 2
        for slot, i in enumerate(order):
            first = i not in seen
            seen.add(i)
            k = slot - half if self.skip_gated else i - self.num_encoder     # which skip this position takes
            if skips and k >= 0 and (self.skip_gated or first):
                skip = self.skip_weights[k].to(x.dtype) * skips.pop()
                stream = x if lanes is None else lanes[0]
                if self.skip_gated:
                    stream = torch.lerp(skip, stream, torch.sigmoid(self.skip_gates[k].to(x.dtype)))
                else:
                    stream = stream + skip
                x, lanes = (stream, None) if lanes is None else (x, (stream, lanes[1]))
            block = self.blocks[i]
            if block.lanes == 2:
                lanes = block.forward_lanes(lanes or (x, x), x0, cache, slot, varlen, lora)
            else:
                x = block(x, x0, cache, slot, varlen, lora)
            encoder = slot < half if self.skip_gated else (first and i < self.num_encoder)
            if encoder:
                skips.append(x)
        if cache is not None:
            cache.pos += input_ids.size(1)
        return x if lanes is None else 0.5 * (lanes[0] + lanes[1])

    def logits(self, input_ids: Tensor, cache: DecodeCache | None = None, capacity: int | None = None,
               lora: "TTTLoRA | None" = None) -> Tensor:
        """Softcapped logits, float32, (B, T, vocab)."""
        h = self.final_norm(self.hidden(input_ids, cache, capacity, lora))
        logits = F.linear(h, self.tok_emb.train_weight().to(h.dtype))
        if lora is not None:
            logits = lora.add("head", "head", h, logits)
        logits = logits.float()
        if self.softcap_pos is None:
            return self.softcap * torch.tanh(logits / self.softcap)
        cap = torch.where(logits > 0, self.softcap_pos.float(), self.softcap_neg.float())
        return cap * torch.tanh(logits / cap)

    def softcaps(self) -> list[nn.Parameter]:
        """The learnable caps (LOGIT_SOFTCAP_ASYM=1): training leaves them alone, TTT learns them."""
        return [p for p in (self.softcap_pos, self.softcap_neg) if p is not None]

    def forward(self, input_ids: Tensor, target_ids: Tensor, capacity: int | None = None,
                lora: "TTTLoRA | None" = None) -> Tensor:
        logits = self.logits(input_ids, None, capacity, lora)
        nll = F.cross_entropy(logits.view(-1, logits.size(-1)), target_ids.reshape(-1), reduction="none")
        return nll.view_as(target_ids)



def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_params(hp: Hyperparameters, recurrence_on: bool = True) -> int:
    """Weights that take part in a matmul per token: the blocks (with their attention gates), the
    BigramHash projection and the tied embedding once (as the output head; lookups are free). SmearGate's
    gate, SMEAR_GATE_DIMS weights per token (~1e-5 of the total), is left out. Layers depth recurrence
    repeats count once per pass (when it is on)."""
    d = hp.model_dim
    kv = hp.num_kv_heads * (d // hp.num_heads)
    block = 2 * d * d + 2 * d * kv + 2 * hp.mlp_mult * d * d + ((hp.attn_gate_dims or d) * hp.num_heads if hp.attn_gate else 0)
    return hp.vocab_size * d + (hp.bigram_dim * d if hp.bigram_vocab else 0) + effective_layers(hp, recurrence_on) * block


def effective_layers(hp: Hyperparameters, recurrence_on: bool = True) -> int:
    """Blocks run per token (with depth recurrence on, its layers once per pass)."""
    recur = parse_layer_range(hp.recur_layers) if recurrence_on else None
    return hp.num_layers + ((hp.recur_passes - 1) * (recur[1] - recur[0] + 1) if recur else 0)


def flops_per_token(hp: Hyperparameters, seq_len: int, recurrence_on: bool = True) -> float:
    """Training FLOPs per token (forward + backward): 6 N + 6 L T d, N = matmul_params, L the
    blocks run per token, causal attention."""
    return 6.0 * matmul_params(hp, recurrence_on) + 6.0 * effective_layers(hp, recurrence_on) * seq_len * hp.model_dim


def projected_h100_step_ms(flops_token: float, batch_tokens: int) -> float:
    """Step time on PROJECTION_GPUS H100s at ASSUMED_MFU."""
    return 1e3 * flops_token * batch_tokens / (PROJECTION_GPUS * H100_BF16_DENSE_FLOPS * ASSUMED_MFU)


def projected_steps(hp: Hyperparameters, step_ms_recurrence_on: float) -> float:
    """Steps in 600 s on 8xH100: before RECUR_START_FRAC of the run at the step time without recurrence,
    after it at the step time with it on (step_ms_recurrence_on)."""
    if not hp.recur_layers:
        return 600e3 / step_ms_recurrence_on
    off_ms = projected_h100_step_ms(flops_per_token(hp, hp.train_seq_len, False), hp.train_batch_tokens)
    return hp.recur_start_frac * 600e3 / off_ms + (1 - hp.recur_start_frac) * 600e3 / step_ms_recurrence_on


# --- memory: a rank's peak in one training step, from a CPU count of what autograd saves for backward ---------

GIB = 2 ** 30
MEMORY_PROBE_TOKENS = 64     # tokens per row of the CPU measurement (every saved activation scales with the rows)


class CudaAutocastPolicy(torch.overrides.TorchFunctionMode):
    """Under CPU bf16 autocast, run the calls of this model's forward whose dtype CUDA autocast decides otherwise
    as CUDA does (ATen's autocast_mode.h lists): pow (x.square() is pow) in fp32, and rms_norm from torch 2.12
    (torch 2.9.1's list lacks it); sum and norm return fp32 (F.normalize divides by an fp32 norm). CPU autocast
    keeps all of them in bf16. Only for counting saved bytes as a GPU holds them (saved_activations);
    tests/test_memory.py checks that every other call of the forward is one both policies treat alike."""

    FP32 = {torch.Tensor.square, torch.Tensor.pow, torch.Tensor.__rpow__, torch.pow} | (
        {F.rms_norm} if torch.torch_version.TorchVersion(torch.__version__) >= (2, 12) else set())
    FP32_RESULT = {torch.Tensor.sum, torch.sum, torch.Tensor.norm, torch.norm}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if not (torch.is_autocast_enabled("cpu") and isinstance(x, Tensor) and x.dtype == torch.bfloat16):
            return func(*args, **kwargs)
        if func in self.FP32:
            return func(x.float(), *args[1:], **kwargs)
        if func in self.FP32_RESULT and kwargs.get("dtype") is None:
            return func(*args, **kwargs, dtype=torch.float32)
        if func is F.normalize:
            p, dim, eps = kwargs.get("p", 2.0), kwargs.get("dim", 1), kwargs.get("eps", 1e-12)
            return x / x.norm(p, dim, keepdim=True, dtype=torch.float32).clamp_min(eps).expand_as(x)
        return func(*args, **kwargs)


def saved_bytes(forward: Callable[[], object], exclude: set[int] = frozenset()) -> int:
    """Bytes of the storages autograd saves for backward while forward() runs, each storage counted once however
    often it is saved (x * x saves x twice), those whose data_ptr is in `exclude` (the parameters) left out."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


@dataclass
class SavedActivations:
    """What one forward saves for its backward, in bytes: per_token of the batch, plus fixed (autocast's bf16
    copies of the weights, made once per forward)."""
    per_token: float
    fixed: float
    compiled: bool

    def bytes(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens


def saved_activations(forward: Callable[[Tensor], object], batch: Callable[[int], Tensor], exclude: set[int],
                      compiled: bool) -> SavedActivations:
    """Measure on CPU, under bf16 autocast with CUDA's dtype policy (CudaAutocastPolicy), what forward(batch(rows))
    saves for backward at 1 and 2 rows: the difference is one row's bytes (per_token: divided by a row's tokens),
    the rest is fixed. compiled: through torch.compile's min-cut partition (the backend aot_eager_decomp_partition
    saves what inductor's graphs save, without generating their code: tests/test_memory.py), else eager."""
    def run(x: Tensor) -> object:
        with CudaAutocastPolicy():
            return forward(x)

    fn = torch.compile(run, backend="aot_eager_decomp_partition", fullgraph=True, dynamic=False) if compiled else run
    counts = []
    for rows in (1, 2):
        x = batch(rows)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            counts.append(saved_bytes(lambda: fn(x), exclude))
    if compiled:
        torch._dynamo.reset()         # the run compiles its own graphs later, from an empty cache
    per_row = counts[1] - counts[0]
    return SavedActivations(per_token=per_row / x[0].numel(), fixed=counts[0] - per_row, compiled=compiled)


def training_activations(hp: Hyperparameters, compiled: bool) -> SavedActivations:
    """saved_activations of a training forward (loss per token) of a CPU GPT with the run's shape, recurrence on.
    Measured with ATTN_DOC_ISOLATION=0: CPU SDPA would save its (B, 1, T, T) document mask, where flash's varlen
    kernel saves what its dense kernel does (q, k, v, out, the log-sum-exp) plus cu_seqlens, which training_peak
    adds."""
    with torch.random.fork_rng(devices=[]):
        model = GPT(hp.replace(ATTN_DOC_ISOLATION=0))
    model.recurrence_on = True
    gen = torch.Generator().manual_seed(0)
    batch = lambda rows: torch.randint(0, hp.vocab_size, (rows, MEMORY_PROBE_TOKENS), generator=gen)  # noqa: E731
    return saved_activations(lambda x: model(x, x), batch, {p.untyped_storage().data_ptr() for p in model.parameters()},
                             compiled)


FA3_BLOCK_M = 128           # FA3's backward tile on an H100 for head dims up to 64, causal (hopper/flash_api.cpp)


def fa3_backward_bytes(tokens: int, entries: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """What FA3's varlen attention backward allocates beside its inputs and outputs (hopper/flash_api.cpp, mha_bwd):
    softmax_d and softmax_lse_log2 (heads x P fp32 each), dq_accum (heads x P x d fp32) and, with GQA, dk_accum and
    dv_accum (kv_heads x P x d fp32, zero-filled), P = round_up(tokens + (entries - 1) x FA3_BLOCK_M, FA3_BLOCK_M)
    for cu_seqlens of `entries`, d the head dim rounded up (64 at least)."""
    padded = -(-(tokens + (entries - 1) * FA3_BLOCK_M) // FA3_BLOCK_M) * FA3_BLOCK_M
    d = 64 if head_dim <= 64 else -(-head_dim // 32) * 32
    return 4 * (2 * heads * padded + heads * padded * d + (2 * kv_heads * padded * d if kv_heads != heads else 0))


COMPILE_CACHE_ENTRIES = 64   # graphs dynamo may keep per function: every state x shape the warm-up compiles fits


def compile_model(model: nn.Module, optimize_ddp: bool = False) -> nn.Module:
    """torch.compile, whole graph (a graph break is an error at warm-up, before the clock), static shapes,
    with inductor rounding at every explicit dtype cast as eager does (without it inductor keeps the fp32
    value through fake_quantize's fp16 scale, so the compiled QAT forward would round some weights
    differently from the export: tests/test_compress). The cache limit is raised so that the graphs the
    warm-up builds (training and evaluation, per recurrence/QAT state) all stay compiled: at dynamo's
    default of 8 it would silently run the rest in eager. optimize_ddp (COMPILE_OPTIMIZE_DDP) is dynamo's
    DDPOptimizer, which splits each training graph at DDP's gradient buckets (6-7 pieces here)."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config
    inductor_config.emulate_precision_casts = True
    dynamo_config.optimize_ddp = optimize_ddp
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, COMPILE_CACHE_ENTRIES)
    return torch.compile(model, dynamic=False, fullgraph=True)


def compile_failure(e: Exception) -> str:
    """A torch.compile (dynamo) error in one line: its own type and first line, and a flash-attn hint only when the
    error mentions flash (the warm-up's message; tools/gpu_probe.py's)."""
    said = str(e).splitlines()[0] if str(e) else ""
    hint = (f"; the attention kernel is {FLASH_ATTN_SOURCE}: torch.compile needs a flash-attn build made for torch "
            f"{torch.__version__} whose kernels are registered torch ops (FA3's flash_attn_interface from the "
            "hopper/ build, or flash-attn >= 2.7)") if "flash" in str(e).lower() else ""
    return f"{type(e).__name__}: {said}{hint}"


def build_model(hp: Hyperparameters, rt: Runtime) -> GPT:
    torch.manual_seed(hp.seed)
    model = GPT(hp).to(rt.device)
    model.set_attention_backend(attention_backend(rt.device, rt.autocast_dtype))
    return model


# -----------------------------------------------------------------------------
# MUON OPTIMIZER
# Muon (Keller Jordan, modded-nanogpt): momentum, then orthogonalise the update with a quintic
# Newton-Schulz iteration (its coefficients, NEWTON_SCHULZ_COEFFS, stand with the CONSTANTS). Every
# linear weight of the blocks uses it; the tied embedding and the vectors/scalars use Adam. Ranks
# split the Newton-Schulz work: matrices of one shape are dealt out in turn, and each round of
# world_size matrices is shared by one all_gather of the ranks' updates (bf16 on CUDA), so a rank
# sends only the updates it computed.
# -----------------------------------------------------------------------------

def zeropower_newton_schulz(g: Tensor, steps: int, coeffs: str = "quintic") -> Tensor:
    """Approximately orthogonalise a matrix (its singular values pushed towards 1): `steps` iterations
    x <- a x + (b x x^T + c (x x^T)^2) x, with iteration i's (a, b, c) from NEWTON_SCHULZ_COEFFS[coeffs]."""
    table = NEWTON_SCHULZ_COEFFS[coeffs]
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)  # CUDA-only dtype choice
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class Muon(torch.optim.Optimizer):
    """Nesterov-momentum SGD whose 2-D updates are orthogonalised by Newton-Schulz.

    Gradients must already be averaged over ranks (DDP does it). With row_norm, each row of the
    momentum-corrected gradient is scaled to unit norm before Newton-Schulz (as the best record
    did). The update of a (rows x cols) matrix is scaled by sqrt(max(1, rows / cols)); weight decay
    is decoupled: p <- p * (1 - lr * weight_decay) - lr * update. One parameter group per shape.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, rank: int = 0, world_size: int = 1,
                 row_norm: bool = False, weight_decay: float = 0.0, coeffs: str = "quintic"):
        by_shape: dict[tuple, list] = {}
        for p in params:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        super().__init__([dict(params=ps) for ps in by_shape.values()],
                         dict(lr=lr, momentum=momentum, backend_steps=backend_steps, row_norm=row_norm,
                              weight_decay=weight_decay, coeffs=coeffs))
        self.rank, self.world_size = rank, world_size

    @staticmethod
    def _no_update(p: Tensor) -> Tensor:
        return torch.zeros_like(p, dtype=torch.bfloat16 if p.is_cuda else torch.float32)  # Newton-Schulz's dtype

    def _update(self, p: Tensor, group: dict) -> Tensor:
        """This rank's orthogonalised update of p (zeros when p has no gradient)."""
        if p.grad is None:
            return self._no_update(p)
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        g = p.grad.add(buf, alpha=group["momentum"])
        if group["row_norm"]:
            g = g / (g.norm(dim=1, keepdim=True) + 1e-7)
        g = zeropower_newton_schulz(g, group["backend_steps"], group["coeffs"])
        return g * max(1.0, g.size(0) / g.size(1)) ** 0.5

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), self.world_size):
                mine = base + self.rank      # in a last, short round a rank may have no matrix
                update = self._update(params[mine], group) if mine < len(params) else self._no_update(params[base])
                updates = [update]
                if self.world_size > 1:
                    updates = [torch.empty_like(update) for _ in range(self.world_size)]
                    dist.all_gather(updates, update)
                for p, u in zip(params[base:base + self.world_size], updates):
                    if group["weight_decay"]:
                        p.mul_(1.0 - group["lr"] * group["weight_decay"])
                    p.add_(u.to(p.dtype), alpha=-group["lr"])


def gate_weights(model: GPT) -> list[Tensor]:
    """The attention output gates' and the SmearGate's matrices (a few dims in, one value per head out)."""
    gates = [b.attn.gate for b in model.blocks] + [model.smear_gate]
    return [g.weight for g in gates if g is not None]


def build_optimizers(model: GPT, hp: Hyperparameters, rt: Runtime) -> list[torch.optim.Optimizer]:
    """Muon for every linear weight (but the gates with GATES_IN_ADAM=1, as record #1855); AdamW for the
    embedding tables (EMBED_WD) and everything else (ADAM_WD) but the learnable softcaps, which training
    leaves at LOGIT_SOFTCAP (GPT.softcaps)."""
    in_adam = {id(w) for w in gate_weights(model)} if hp.gates_in_adam else set()
    matrices = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in in_adam]
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    taken = {id(p) for p in matrices + tables + model.softcaps()}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    adam = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps)
    optimizers = [
        torch.optim.AdamW([dict(params=tables, lr=hp.tied_embed_lr, base_lr=hp.tied_embed_lr)],
                          weight_decay=hp.embed_wd, **adam),
        torch.optim.AdamW([dict(params=scalars, lr=hp.scalar_lr, base_lr=hp.scalar_lr)],
                          weight_decay=hp.adam_wd, **adam),
        Muon(matrices, lr=hp.matrix_lr, momentum=hp.muon_momentum, backend_steps=hp.muon_backend_steps,
             rank=rt.rank, world_size=rt.world_size, row_norm=bool(hp.muon_row_norm), weight_decay=hp.muon_wd,
             coeffs=hp.muon_ns_coeffs),
    ]
    for group in optimizers[2].param_groups:
        group["base_lr"] = hp.matrix_lr
    return optimizers


# -----------------------------------------------------------------------------
# EVALUATION
# Windows of EVAL_SEQ_LEN inputs. The first window scores all its targets; each later window
# ends EVAL_STRIDE further on and scores only the targets no earlier window scored, so every
# target of the stream (positions 1 .. T-1) is scored exactly once with as much left context as
# the window allows. Every window has the same length (a window near the start reaches forward
# and scores only its own range). Windows are split across ranks in contiguous ranges; NLL sums
# in float64.
# Legal score-first test-time training (TTT_ENABLED=1): the stream is cut into chunks of
# TTT_CHUNK_TOKENS targets; chunk k is scored with the current weights, then (except the last)
# trained on, its training targets all inside chunk k. ttt_schedule() is the order of events;
# the C3 audit checks, from weight fingerprints taken while it ran, that it was kept. The default,
# per-document LoRA TTT (LoRATestTimeTrainer), scores each document chunk by chunk through its own
# adapters, rows of documents planned on the host (LoRASchedule), with global phases in between.
# Evaluation and its self-audit stand before TRAINING, which scores with them: periodic validation,
# and the warm-up that compiles the scoring graphs before the training clock starts.
# -----------------------------------------------------------------------------

def sliding_windows(n_tokens: int, window: int, stride: int, lo: int = 0, hi: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows scoring the inputs [lo, hi) of a stream of n_tokens tokens (default: all).

    Input i predicts target i + 1. Returns (starts, score_from, score_to): window j covers
    inputs [starts[j], starts[j] + W) with W = min(window, n_tokens - 1) and scores the
    targets of its offsets [score_from[j], score_to[j]). The first window scores up to
    max(lo + stride, W); each later one the next stride inputs (the last one what is left).
    """
    n_inputs = n_tokens - 1
    hi = n_inputs if hi is None else hi
    w = min(window, n_inputs)
    if lo >= hi:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    first_end = min(hi, max(lo + stride, w))
    ends = np.minimum(first_end + stride * np.arange(-(-(hi - first_end) // stride) + 1, dtype=np.int64), hi)
    covered = np.concatenate(([lo], ends[:-1]))
    starts = np.maximum(0, ends - w)
    return starts, covered - starts, ends - starts


def document_windows(tokens: np.ndarray, window: int, stride: int, lo: int = 0, hi: int | None = None,
                     bos: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows scoring the inputs [lo, hi) document by document (EVAL_MODE=documents), in the format of
    sliding_windows. A document starts at a BOS (or at the stream's start) and its inputs run to the next
    BOS, which is its last target: the next document's BOS is predicted from the end of the one before (as
    #1855's document spans do), so every target is scored once and the counts equal the sliding evaluation's.

    The part of a document within `window` of its start is scored from a window that starts at the
    document's start; consecutive such parts share one window while they fit in it (the model's document
    isolation keeps them apart), so a stream of short documents costs about one forward per token. The rest
    of a longer document is scored by sliding windows of `stride` new targets inside it. A window is moved
    earlier only where the stream ends (never a change: what lies before a document is masked). `bos`: the
    stream's BOS positions, when the caller has them already."""
    n_inputs = tokens.size - 1
    hi = n_inputs if hi is None else hi
    w = min(window, n_inputs)
    if lo >= hi:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    bos = np.flatnonzero(tokens[:n_inputs] == BOS_ID) if bos is None else bos
    cuts = bos[(bos > lo) & (bos < hi)]
    piece_lo, piece_hi = np.concatenate(([lo], cuts)), np.concatenate((cuts, [hi]))
    before = np.searchsorted(bos, piece_lo, side="right") - 1
    doc_start = np.where(before >= 0, bos[np.maximum(before, 0)] if bos.size else 0, 0)
    starts, froms, tos = [], [], []
    row = None                                    # [window start, first input scored, end] being filled

    def flush():
        if row is not None:
            start = min(row[0], n_inputs - w)
            starts.append(start), froms.append(row[1] - start), tos.append(row[2] - start)

    for d, p, q in zip(doc_start.tolist(), piece_lo.tolist(), piece_hi.tolist()):
        head_end = min(q, d + w)
        if p < head_end:
            if row is not None and row[2] == p and head_end - row[0] <= w:
                row[2] = head_end
            else:
                flush()
                row = [d, p, head_end]
        if head_end < q:
            flush()
            row = None
            s_, f_, t_ = sliding_windows(tokens.size, w, stride, max(p, head_end), q)
            starts.extend(s_.tolist()), froms.extend(f_.tolist()), tos.extend(t_.tolist())
    flush()
    return np.array(starts, dtype=np.int64), np.array(froms, dtype=np.int64), np.array(tos, dtype=np.int64)


def scoring_windows(mode: str, tokens: np.ndarray, window: int, stride: int, lo: int = 0, hi: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The windows of an evaluation mode (EVAL_MODES) over inputs [lo, hi)."""
    if mode == "documents":
        return document_windows(tokens, window, stride, lo, hi)
    return sliding_windows(tokens.size, window, stride, lo, hi)


def eval_geometry(hp: Hyperparameters) -> tuple[int, int]:
    """(window, stride) of the final evaluation."""
    window = hp.eval_seq_len or hp.train_seq_len
    return window, hp.eval_stride or window


def eval_batch_seqs(hp: Hyperparameters, rt: Runtime, n_tokens: int, window: int, stride: int,
                    mode: str = "sliding") -> int:
    """Windows per forward on each rank when scoring a stream of n_tokens: VAL_BATCH_SIZE tokens over all
    ranks, but no more than a rank's share of the stream's windows (EVAL_MODE=documents: of the fewest it can
    have, one per window of tokens; the count depends on no data). Every scoring forward of the stream has
    exactly this many rows (short batches are padded), so a compiled model sees one shape per geometry."""
    w = min(window, n_tokens - 1)
    if mode == "documents":
        n_windows = -(-(n_tokens - 1) // w)
    else:
        n_windows = len(sliding_windows(n_tokens, window, stride)[0])
    return max(1, min(hp.val_batch_size // (rt.world_size * w), -(-n_windows // rt.world_size)))


def to_device(a: np.ndarray, device: torch.device) -> Tensor:
    """One host-to-device copy (pinned and asynchronous on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":  # CUDA-only: a pageable copy would make the host wait
        return t.pin_memory().to(device, non_blocking=True)
    return t


def bos_prefix(tokens: np.ndarray) -> np.ndarray:
    """BOS counts of the stream's prefixes: out[i] = BOS tokens among tokens[:i] (for varlen capacities)."""
    return np.concatenate(([0], np.cumsum(tokens == BOS_ID)))


def rows_segments(bos_cum: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Varlen segments (count_segments) of each row tokens[s:s + length] of the stream, from bos_prefix()."""
    return 1 + bos_cum[starts + length] - bos_cum[starts + 1]


@dataclass
class EvalResult:
    val_loss: float      # mean NLL per target, nats
    val_bpb: float       # bits per UTF-8 byte
    val_tokens: int      # targets scored (stream length - 1)
    val_bytes: int
    eval_time_ms: float
    nll: np.ndarray | None = None          # per-target NLL in stream order (rank 0, when collected)
    evidence: "ScoringEvidence | None" = None   # what the evaluator did, for the audit (EVAL_AUDIT=1)
    forward_tokens: int = 0                # tokens one rank ran forward (evaluate(): the budget's plain rate)


class ScoringEvidence:
    """What the evaluator did, recorded from the data it used (EVAL_AUDIT=1 only; it costs a little).

    coverage[p]: how many times target position p was scored (this rank; summed over ranks by
    finish()), taken from the very window table and mask that select the NLL summed for the score.
    For every TTT update, the target positions it trained on, from the index tensor that built its
    targets, are checked against the targets scored so far on any rank: C3 from data, not labels.
    Weights are fingerprinted around every scoring call when TTT runs (scoring must not change them)."""

    def __init__(self, n_tokens: int, rt: Runtime):
        self.rt = rt
        self.coverage = torch.zeros(n_tokens, dtype=torch.int32, device=rt.device)
        self.updates = self.unscored_trained = 0
        self.local_updates = self.local_unscored = 0
        self.weights_moved = torch.zeros((), dtype=torch.bool, device=rt.device)   # by a scoring call
        self.scoring_changed_weights = False

    def scored(self, targets: Tensor) -> None:
        self.coverage.index_add_(0, targets, torch.ones_like(targets, dtype=torch.int32))

    def training_on(self, targets: Tensor) -> None:
        """Before a TTT update: count its targets (this rank's) that no rank has scored yet."""
        targets = targets.reshape(-1)
        everyone = gather_tensors(self.rt, targets)
        seen = self.coverage[everyone]
        if self.rt.distributed:
            dist.all_reduce(seen)
        unscored = int((seen == 0).sum())              # the same on every rank
        self.unscored_trained += unscored
        self.updates += 1

    def training_on_local(self, targets: Tensor) -> None:
        """Before a per-document LoRA step (this rank's documents, no collective): count its targets this rank has
        not scored yet (a document is scored and adapted on one rank). finish() adds the ranks' counts up."""
        self.local_unscored += int((self.coverage[targets.reshape(-1)] == 0).sum())
        self.local_updates += 1

    def finish(self) -> Tensor:
        """Coverage summed over ranks (every rank gets it); whether any scoring call moved a weight."""
        local = torch.tensor([self.local_unscored, self.local_updates], dtype=torch.int64, device=self.rt.device)
        if self.rt.distributed:
            dist.all_reduce(self.coverage)
            dist.all_reduce(local)
        self.unscored_trained += int(local[0])
        self.updates += int(local[1])
        self.scoring_changed_weights = bool(agree_max(self.rt, [float(self.weights_moved.item())])[0])
        return self.coverage


def weights_fingerprint(model: nn.Module) -> Tensor:
    """A digest of all weights on the device (their L1 and L2 norms, by multi-tensor kernels, no host
    sync): any change of a weight changes it (audit only)."""
    with torch.no_grad():
        params = [p.detach() for p in model.parameters()]
        return torch.stack(torch._foreach_norm(params, 1) + torch._foreach_norm(params, 2))


def ttt_schedule(n_chunks: int):
    """Score chunk k, then train on it; the last chunk is never trained on."""
    for k in range(n_chunks):
        yield "score", k
        if k < n_chunks - 1:
            yield "train", k


def ttt_seqs_per_rank(hp: Hyperparameters, rt: Runtime, seq_len: int) -> int:
    """Whole sequences of seq_len inputs each rank trains on per chunk (a chunk's sequences dealt out)."""
    return hp.ttt_chunk_tokens // seq_len // rt.world_size


class TestTimeTrainer:
    """Score-first TTT (records 04-06 and 04-09): after a chunk is scored, TTT_EPOCHS steps of SGD with
    momentum on it, every parameter trained (TTT_LAST_N=0) or the last TTT_LAST_N blocks only; the
    learning rate decays over the chunks (cosine from TTT_LR to 0 at the last chunk, or constant);
    gradients averaged over ranks (one all-reduce) and clipped to TTT_GRAD_CLIP. The optimizer, and so
    its momentum, lives across chunks. Each rank trains on its own whole sequences of the chunk, all
    of them in one forward (one shape for a compiled model)."""

    def __init__(self, hp: Hyperparameters, rt: Runtime, model: GPT, run_model: nn.Module, seq_len: int):
        self.hp, self.rt, self.run_model, self.seq_len = hp, rt, run_model, seq_len
        self.n_seq = ttt_seqs_per_rank(hp, rt, seq_len)
        if self.n_seq == 0:
            raise PipelineError(f"TTT_CHUNK_TOKENS={hp.ttt_chunk_tokens} holds fewer than one sequence of {seq_len} "
                                f"tokens per rank ({rt.world_size} ranks): raise it")
        blocks = model.blocks[-hp.ttt_last_n:] if hp.ttt_last_n else [model]
        trainable = {id(p) for block in blocks for p in block.parameters()}
        # frozen weights keep requires_grad (the compiled graphs were built so); their gradients are dropped
        self.params = [p for p in model.parameters() if id(p) in trainable]
        self.frozen = [p for p in model.parameters() if id(p) not in trainable]
        self.opt = torch.optim.SGD(self.params, lr=hp.ttt_lr, momentum=hp.ttt_momentum)
        self.chunks_trained, self.cut = 0, ""

    def lr(self, k: int, n_chunks: int) -> float:
        if self.hp.ttt_lr_schedule == "cosine":
            return self.hp.ttt_lr * 0.5 * (1.0 + math.cos(math.pi * k / max(1, n_chunks - 1)))
        return self.hp.ttt_lr

    def adapt(self, tokens: Tensor, bos_cum: np.ndarray, a: int, k: int, n_chunks: int,
              evidence: ScoringEvidence | None) -> None:
        """Train on chunk k, whose inputs start at stream position a: this rank's n_seq whole sequences
        of it (targets a + 1 ... at most a + TTT_CHUNK_TOKENS, all already scored); bos_cum: bos_prefix()
        of the stream, for the rows' varlen capacity."""
        n_seq = min(self.n_seq, (tokens.numel() - 1 - a) // (self.seq_len * self.rt.world_size))
        if n_seq <= 0:                 # only a chunk past the stream's end (the schedule never trains on one)
            return
        starts = a + (self.rt.rank * n_seq + np.arange(n_seq)) * self.seq_len
        capacity = varlen_capacity(n_seq, self.seq_len, int(rows_segments(bos_cum, starts, self.seq_len).sum()))
        inputs = to_device(starts, tokens.device)[:, None] + torch.arange(self.seq_len, device=tokens.device)[None, :]
        x, y = tokens[inputs], tokens[inputs + 1]
        if evidence is not None:
            evidence.training_on(inputs + 1)
        for group in self.opt.param_groups:
            group["lr"] = self.lr(k, n_chunks)
        self.run_model.train()
        for _ in range(self.hp.ttt_epochs):
            with autocast(self.rt):
                loss = self.run_model(x, y, capacity).mean()
            loss.backward()
            self.step()
        self.run_model.eval()

    def step(self) -> None:
        """Apply the gradients of the last backward: drop the frozen ones, average over ranks, clip, SGD."""
        for p in self.frozen:
            p.grad = None
        if self.rt.distributed:
            grads = [p.grad for p in self.params]
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, op=dist.ReduceOp.AVG)
            for g, avg in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(avg)
        if self.hp.ttt_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.hp.ttt_grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def document_spans(tokens: np.ndarray) -> np.ndarray:
    """(n_docs, 2) input ranges [d, e) of the stream's documents: d a BOS (or 0), e the next BOS (or the last
    input + 1). A document's targets are d + 1 .. e: its own tokens and the next document's BOS."""
    n_inputs = tokens.size - 1
    starts = np.flatnonzero(tokens[:n_inputs] == BOS_ID)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate(([0], starts))
    return np.stack((starts, np.concatenate((starts[1:], [n_inputs]))), axis=1).astype(np.int64)


def phase_boundaries(hp: Hyperparameters, n_docs: int) -> list[int]:
    """Documents scored before each global SGD phase: TTT_PHASES evenly spaced up to TTT_PHASE_DOCS_FRAC of
    them (#1855: 833 / 1,666 / 2,500 of 50,000); a phase with no document is dropped."""
    last = int(round(hp.ttt_phase_docs_frac * n_docs))
    return sorted({last * (p + 1) // hp.ttt_phases for p in range(hp.ttt_phases)} - {0}) if hp.ttt_phases else []


LORA_LENGTH_BUCKETS = 4     # LoRA rows are window / 8, / 4, / 2 or the window long: four compiled shapes
LORA_PAD_ID = 0             # what a LoRA row holds past its document's end (never a BOS: one document per row)


def lora_targets(hp: Hyperparameters) -> tuple[str, ...]:
    return tuple(t.strip() for t in hp.ttt_lora_targets.split(",") if t.strip())


def lora_lengths(window: int) -> list[int]:
    """The row lengths LoRA forwards use (LORA_LENGTH_BUCKETS of them, the longest the window)."""
    return sorted({max(1, window >> k) for k in range(LORA_LENGTH_BUCKETS)})


def lora_rows(hp: Hyperparameters, window: int) -> int:
    """Documents adapted side by side on each rank: TTT_LORA_BATCH_TOKENS // the window (the memory bound)."""
    return max(1, hp.ttt_lora_batch_tokens // window)


def lora_layout(hp: Hyperparameters, model: GPT, recurrence: bool | None = None) -> tuple[dict, int]:
    """({(slot, target): (A's offset, in, B's offset, out)}, values per row) of TTTLoRA's adapters: every layer visit
    (model.layer_order(recurrence)) and target of TTT_LORA_TARGETS, the head once."""
    d, vocab = model.tok_emb.embedding_dim, model.tok_emb.num_embeddings
    kv = model.blocks[0].attn.c_k.out_features
    dims = dict(q=(d, d), k=(d, kv), v=(d, kv), o=(d, d), mlp=(d, d), head=(d, vocab))
    targets, r = lora_targets(hp), hp.ttt_lora_rank
    keys = [(slot, t) for slot in range(len(model.layer_order(recurrence))) for t in targets if t != "head"]
    keys += [("head", "head")] if "head" in targets else []
    layout, size = {}, 0
    for key in keys:
        n_in, n_out = dims[key[1]]
        layout[key] = (size, n_in, size + n_in * r, n_out)
        size += (n_in + n_out) * r
    return layout, size


class TTTLoRA(nn.Module):
    """Per-document adapters for `rows` rows, one document each (records #1610-#1855's BatchedTTTLoRA placement):
    for every layer visit (slot) and target of TTT_LORA_TARGETS a delta(x) = (x A) B * TTT_LORA_ALPHA / rank, added
    to q, k or v (x: the attention's normed input), to the attention output (o, from the same input), to the MLP
    output (mlp, from the MLP's normed input), and to the logits (head, from the final norm's output). A is
    (in, rank), B (rank, out). Every factor of a row is a slice of that row of `weights` (rows, P), so restarting a
    row or stepping the optimizer is a few whole-tensor operations. A row starts with B = 0 (no change); A is drawn
    uniform in +-1/sqrt(in) when the adapters are built and by redraw_a(), and kept across documents with
    TTT_LORA_KEEP_A=1 (record #1767's warm start), else redrawn for each document."""

    def __init__(self, hp: Hyperparameters, model: GPT, rows: int, device: torch.device, recurrence: bool | None = None):
        super().__init__()
        self.rows, self.rank, self.scale = rows, hp.ttt_lora_rank, hp.ttt_lora_alpha / hp.ttt_lora_rank
        self.keep_a = bool(hp.ttt_lora_keep_a)
        self.layout, size = lora_layout(hp, model, recurrence)
        self.weights = nn.Parameter(torch.zeros(rows, size, device=device))
        self.a_bound = torch.zeros(size, device=device)          # 1/sqrt(in) on A's entries, 0 on B's
        for a, n_in, b, _ in self.layout.values():
            self.a_bound[a:b] = 1.0 / math.sqrt(n_in)
        self.gen = torch.Generator(device=device).manual_seed(hp.seed)
        self.redraw_a()

    def add(self, slot, target: str, x: Tensor, out: Tensor) -> Tensor:
        """out + the delta of this slot's `target` adapter on x (rows, T, in); out unchanged without one."""
        spec = self.layout.get((slot, target))
        if spec is None:
            return out
        a, n_in, b, n_out = spec
        A = self.weights[:, a:a + n_in * self.rank].view(self.rows, n_in, self.rank)
        B = self.weights[:, b:b + self.rank * n_out].view(self.rows, self.rank, n_out)
        return out + torch.bmm(torch.bmm(x, A.to(x.dtype)), B.to(x.dtype)) * self.scale

    @torch.no_grad()
    def redraw_a(self, rows: Tensor | None = None) -> None:
        """Fresh adapters (B = 0, A drawn) for the rows marked in `rows` (bool, (rows,)), or for every row."""
        fresh = (torch.rand(self.weights.shape, generator=self.gen, device=self.weights.device) * 2 - 1) * self.a_bound
        self.weights.copy_(fresh if rows is None else torch.where(rows[:, None], fresh, self.weights))

    @torch.no_grad()
    def restart(self, rows: Tensor) -> None:
        """A new document in each row marked in `rows`: B = 0; A kept (TTT_LORA_KEEP_A=1) or redrawn."""
        if not self.keep_a:
            self.redraw_a(rows)
        else:
            self.weights.copy_(torch.where(rows[:, None] & (self.a_bound == 0)[None, :], 0.0, self.weights))


class RowAdamW:
    """AdamW over the rows of a (rows, P) parameter, each row with its own step count, so a row that starts a new
    document starts its optimizer over too (torch's AdamW keeps one count per tensor): for the rows that learn in a
    step, m <- b1 m + (1 - b1) g, v <- b2 v + (1 - b2) g^2, p <- p (1 - lr wd) - lr m^ / (sqrt(v^) + eps) with
    the bias corrections of the row's count. Betas (0, TTT_LORA_BETA2) and weight decay TTT_LORA_WEIGHT_DECAY
    as record #1855 (its log: beta2 0.99, weight decay 0.5)."""

    def __init__(self, p: nn.Parameter, lr: float, betas: tuple[float, float], weight_decay: float, eps: float = 1e-10):
        self.p, self.lr, (self.b1, self.b2), self.wd, self.eps = p, lr, betas, weight_decay, eps
        self.m, self.v = torch.zeros_like(p), torch.zeros_like(p)
        self.steps = torch.zeros(p.shape[0], 1, device=p.device)

    @torch.no_grad()
    def restart(self, rows: Tensor) -> None:
        for t in (self.m, self.v, self.steps):
            t.masked_fill_(rows[:, None], 0.0)

    @torch.no_grad()
    def step(self, learn: Tensor) -> None:
        """One step for the rows marked in `learn` (bool, (rows,)); the gradient is consumed."""
        on = learn[:, None].to(self.p.dtype)
        g = self.p.grad
        self.steps += on
        self.m.add_((g - self.m) * ((1 - self.b1) * on))
        self.v.add_((g * g - self.v) * ((1 - self.b2) * on))
        t = self.steps.clamp(min=1)
        update = (self.m / (1 - self.b1 ** t)) / ((self.v / (1 - self.b2 ** t)).sqrt() + self.eps)
        self.p.mul_(1 - self.lr * self.wd * on).sub_(self.lr * update * on)
        self.p.grad = None


@dataclass
class LoRAStep:
    """One chunk step of a rank's LoRA rows (host arrays, one entry per row; an empty row has start = valid = 0):
    row r holds inputs start[r] .. start[r] + length - 1 of the stream, the first valid[r] of them its document's
    (the rest padding), scores the targets of its offsets [score_from[r], score_to[r]) and, where learn[r], then
    trains on them; fresh[r] marks a row that begins a new document this step."""
    length: int
    start: np.ndarray
    valid: np.ndarray
    score_from: np.ndarray
    score_to: np.ndarray
    learn: np.ndarray
    fresh: np.ndarray


class LoRASchedule:
    """The chunk steps of one rank's batches of documents, planned on the host (the evaluator runs them;
    eval_projection counts them). A batch is up to `rows` documents of about one length (consecutive in the
    longest-first order: lora_batches): they start together, one per row, each with a fresh adapter, and the batch
    ends with its longest; a row whose document has ended sits empty. Each step scores the next TTT_LORA_CHUNK
    targets of every row's document from a row that starts at the document's start, or `window` inputs before the
    chunk's end once the document is longer: the rows are as long as the longest of them needs, rounded up to
    lora_lengths(window). A document's last chunk is scored and never trained on. (Refilling a row at once
    instead mixes documents at different points, so every row runs as long as the furthest: 1.7x the tokens on
    FineWeb's lengths, against 1.2x here: docs/evaluation.md.)"""

    def __init__(self, batches: list[np.ndarray], rows: int, chunk: int, window: int):
        self.batches, self.rows, self.window = list(batches), rows, window
        self.chunk = min(chunk, window)
        self.lengths = lora_lengths(window)
        self.spans = np.zeros((rows, 2), dtype=np.int64)   # each row's document [d, e), empty rows [0, 0)
        self.pos = np.zeros(rows, dtype=np.int64)           # each row's next input to score (its chunk's first)

    def done(self) -> bool:
        return not self.batches and not (self.pos < self.spans[:, 1]).any()

    def plan(self, learn: bool = True) -> LoRAStep:
        """The next step (beginning the next batch when every row is empty); advance() after running it."""
        fresh = np.zeros(self.rows, dtype=bool)
        if not (self.pos < self.spans[:, 1]).any():
            batch = self.batches.pop(0)
            self.spans[:] = 0
            self.spans[:len(batch)] = batch
            self.pos = self.spans[:, 0].copy()
            fresh[:len(batch)] = True
        d, e = self.spans[:, 0], self.spans[:, 1]
        active = self.pos < e
        cs, ce = self.pos, np.minimum(self.pos + self.chunk, e)
        need = np.where(active, np.minimum(self.window, ce - d), 0)
        length = next(n for n in self.lengths if n >= need.max())
        start = np.where(active, np.maximum(d, ce - length), 0)
        zero = np.zeros(self.rows, dtype=np.int64)
        return LoRAStep(length, start, np.where(active, np.minimum(e - start, length), zero),
                        np.where(active, cs - start, zero), np.where(active, ce - start, zero),
                        active & (ce < e) & learn, fresh)

    def advance(self) -> int:
        """Move every row past the chunk just scored; returns how many documents finished."""
        active = self.pos < self.spans[:, 1]
        self.pos = np.where(active, np.minimum(self.pos + self.chunk, self.spans[:, 1]), self.pos)
        return int((active & (self.pos >= self.spans[:, 1])).sum())

    def rest(self) -> list[tuple[int, int]]:
        """Input ranges [lo, hi) not yet scored: the rows' unscored parts and the batches not yet begun."""
        rows = [(int(p), int(e)) for p, e in zip(self.pos, self.spans[:, 1]) if p < e]
        return rows + [tuple(map(int, s)) for batch in self.batches for s in batch]


def lora_schedule_work(batches: list[np.ndarray], rows: int, chunk: int, window: int) -> tuple[int, int]:
    """(steps, forward tokens: rows x the step's length, empty rows included) of a LoRASchedule over these
    batches, without running a model."""
    schedule, steps, tokens = LoRASchedule(batches, rows, chunk, window), 0, 0
    while not schedule.done():
        steps, tokens = steps + 1, tokens + rows * schedule.plan().length
        schedule.advance()
    return steps, tokens


LORA_STEP_TOKENS = 100_000   # a LoRA step's fixed cost in tokens of work: LORA_STEP_S over the time of a token


def lora_batches(spans: np.ndarray, rows: int, chunk: int, window: int, world_size: int) -> list[list[np.ndarray]]:
    """Each rank's batches of the documents `spans` (longest first): consecutive runs of `rows` documents, dealt to
    the ranks largest first, each to the rank with the least work so far (a batch's work: its steps x
    LORA_STEP_TOKENS + its tokens), so every rank ends at about the same time; every rank computes the same deal."""
    batches = [spans[i:i + rows] for i in range(0, len(spans), rows)]
    cost = [steps * LORA_STEP_TOKENS + tokens for steps, tokens in
            (lora_schedule_work([b], rows, chunk, window) for b in batches)]
    load, mine = [0] * world_size, [[] for _ in range(world_size)]
    for k in sorted(range(len(batches)), key=lambda k: -cost[k]):
        r = load.index(min(load))
        load[r] += cost[k]
        mine[r].append(batches[k])
    return mine


def no_ttt_forward_tokens(lengths: np.ndarray, window: int, stride: int) -> np.ndarray:
    """Forward tokens scoring documents of these lengths (inputs), or any remainder of them, takes without TTT
    once TTT is cut: each is scored alone (document_windows of its own span: no window shared with another), its
    first window plus a window per `stride` targets after it, every window `window` tokens. EvalBudget's estimate
    of what is left (an upper bound: tests/test_lora_ttt.py)."""
    over = np.maximum(lengths - window, 0)
    return (1 + -(-over // stride)) * window


class LoRATestTimeTrainer:
    """Phased score-first TTT with per-document LoRA (records #1610/#1626 phased TTT, #1855's settings).

    Documents are sorted longest first (#1855's global batches) and dealt round-robin to the ranks, so every rank
    gets about the same work; each rank runs its own documents through a LoRASchedule of lora_rows() rows, one
    document and one fresh adapter (TTTLoRA, trained by RowAdamW) per row. A step is one forward of the rows
    through the compiled model with their adapters: its NLL on each row's chunk is the score, and its loss on the
    same chunk (now scored) then takes one adapter step, so chunk c + 1 is scored by an adapter trained on chunks
    0 .. c only. Rows hold one document each, padded past its end, so they are independent and each is one
    varlen segment.

    Global phases: the documents are cut at phase_boundaries() (counted in the sorted order); once every rank has
    scored its documents before a boundary, the whole model takes one SGD epoch (TTT_PHASE_LR, cosine, TTT_MOMENTUM,
    TTT_GRAD_CLIP, TTT_LAST_N) on all of them (global_phase) and the adapters start afresh, as #1855 does.

    The budget (EvalBudget) is checked before every step: when the step and the scoring of everything this rank
    has left (without TTT) no longer fit, TTT stops on this rank (cut = "lora") and what is left is scored by
    document_windows without it; a phase runs only if every rank can afford it and none has stopped."""

    def __init__(self, hp: Hyperparameters, rt: Runtime, model: GPT, run_model: nn.Module, window: int,
                 lora: TTTLoRA | None = None):
        self.hp, self.rt, self.model, self.run_model, self.window = hp, rt, model, run_model, window
        self.lora = lora or TTTLoRA(hp, model, lora_rows(hp, window), rt.device)
        self.opt = RowAdamW(self.lora.weights, hp.ttt_lora_lr, (0.0, hp.ttt_lora_beta2), hp.ttt_lora_weight_decay)
        self.phases_done = self.docs_adapted = self.steps = 0
        self.cut, self.phases_cut = "", False

    def chunk_step(self, tokens: Tensor, step: LoRAStep, meta: Tensor, evidence: "ScoringEvidence | None"
                   ) -> tuple[Tensor, Tensor, Tensor]:
        """Run one planned step, `meta` its arrays on the device: score, then learn; (per-row NLL (rows, length),
        the scored mask, the stream positions of the rows' targets). The evidence hears of the scores first."""
        start, valid, first, last, learn, fresh = meta
        if step.fresh.any():
            self.lora.restart(fresh.bool())
            self.opt.restart(fresh.bool())
        j = torch.arange(step.length, device=tokens.device)[None, :]
        inputs = (start[:, None] + j).clamp(max=tokens.numel() - 2)
        inside = j < valid[:, None]
        x = torch.where(inside, tokens[inputs], LORA_PAD_ID)
        y = torch.where(inside, tokens[inputs + 1], LORA_PAD_ID)
        mask = (j >= first[:, None]) & (j < last[:, None])
        with torch.enable_grad(), autocast(self.rt):
            nll = self.run_model(x, y, varlen_capacity(len(start), step.length, len(start)), self.lora)
        if evidence is not None:
            evidence.scored((inputs + 1)[mask])
        if step.learn.any():
            keep = mask & learn.bool()[:, None]
            if evidence is not None:
                evidence.training_on_local((inputs + 1)[keep])
            ((nll * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)).sum().backward()
            self.opt.step(learn.bool())
        return nll.detach(), mask, inputs + 1

    def global_phase(self, tokens: Tensor, host: np.ndarray, spans: np.ndarray, evidence: "ScoringEvidence | None"
                     ) -> None:
        """One SGD epoch of the whole model (or its last TTT_LAST_N blocks) on documents every rank has scored,
        `spans` in stream order: their inputs laid end to end (document isolation keeps them apart) and cut into
        rows of `window`, ttt_seqs_per_rank() rows per rank per step, gradients averaged over ranks, clipped to
        TTT_GRAD_CLIP, TTT_PHASE_LR on a cosine over the steps, TTT_MOMENTUM. The evidence checks every step's
        targets against what every rank has scored. The rows are planned on the host (their varlen capacity)."""
        hp, rt, w = self.hp, self.rt, self.window
        idx = np.concatenate([np.arange(d, e) for d, e in spans.tolist()])
        n_seq = ttt_seqs_per_rank(hp, rt, w)
        steps = idx.size // (w * n_seq * rt.world_size)
        if steps == 0:
            return
        trainer = TestTimeTrainer(hp, rt, self.model, self.run_model, w)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.model.train()
        for k in range(steps):
            rows = (k * rt.world_size + rt.rank) * n_seq + np.arange(n_seq)
            inputs = idx[rows[:, None] * w + np.arange(w)[None, :]]
            capacity = varlen_capacity(n_seq, w, count_segments(host[inputs]))
            inputs = to_device(inputs, rt.device)
            if evidence is not None:
                evidence.training_on(inputs + 1)
            for group in trainer.opt.param_groups:
                group["lr"] = hp.ttt_phase_lr * 0.5 * (1.0 + math.cos(math.pi * k / steps))
            with autocast(rt):
                loss = self.run_model(tokens[inputs], tokens[inputs + 1], capacity).mean()
            loss.backward()
            trainer.step()
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)


@torch.no_grad()
def score_windows(hp: Hyperparameters, rt: Runtime, run_model: nn.Module, tokens: Tensor, starts: np.ndarray,
                  score_from: np.ndarray, score_to: np.ndarray, w: int, batch: int, collect: bool,
                  evidence: ScoringEvidence | None, bos_cum: np.ndarray, split: bool = True, probe=None,
                  probe_at: tuple[float, ...] = ()) -> tuple[Tensor, Tensor, list]:
    """This rank's share of the windows (split: a contiguous range of them; else all, for a rank scoring what it
    alone has left): (NLL sum float64, targets scored, per-target NLL pieces).

    The share is padded to whole batches of `batch` windows (eval_batch_seqs) with windows that score
    nothing, and its window table is copied to the device once: the loop issues no host-device copy. Every
    batch runs at one varlen capacity, the largest its batches need (counted on the host from bos_cum).
    `probe` (the audit, ForwardAudit) is shown the batches at `probe_at` (fractions of this call's batches: 0 the
    first, 1 the last) once scored: the forward, its inputs, targets and capacity, the NLL and the scored mask."""
    lo, hi = (rt.rank * len(starts) // rt.world_size, (rt.rank + 1) * len(starts) // rt.world_size) if split \
        else (0, len(starts))
    padded = -(-(hi - lo) // batch) * batch
    table = np.zeros((3, padded), dtype=np.int64)
    table[1:, :] = w                                      # padding windows score the empty range [w, w)
    table[:, :hi - lo] = starts[lo:hi], score_from[lo:hi], score_to[lo:hi]
    segments = rows_segments(bos_cum, table[0], w).reshape(-1, batch).sum(axis=1) if padded else np.zeros(1)
    capacity = varlen_capacity(batch, w, int(segments.max()))
    s, first, last = to_device(table, rt.device)
    shown = {round(f * (padded // batch - 1)) for f in probe_at} if probe is not None else set()
    offsets = torch.arange(w + 1, device=rt.device)
    nll_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    scored = torch.zeros((), dtype=torch.int64, device=rt.device)
    pieces = []
    for b in range(0, padded, batch):
        positions = s[b:b + batch, None] + offsets[None, :]
        seq = tokens[positions]
        x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()    # one stride everywhere, for dynamo's guards
        with autocast(rt):
            nll = run_model(x, y, capacity)
        mask = (offsets[None, :w] >= first[b:b + batch, None]) & (offsets[None, :w] < last[b:b + batch, None])
        nll_sum += (nll.double() * mask).sum()
        scored += mask.sum()
        if evidence is not None:
            evidence.scored(positions[:, 1:][mask])
        if collect:
            pieces.append(nll.double()[mask].cpu())
        if b // batch in shown:
            probe.batch(run_model, x, y, capacity, nll, mask)
    return nll_sum, scored, pieces


def evaluate(hp: Hyperparameters, rt: Runtime, run_model: nn.Module, tokens: np.ndarray, tables,
             window: int, stride: int, ttt: TestTimeTrainer | None = None, collect: bool = False,
             audit: bool = False, mode: str = "sliding", budget: "EvalBudget | None" = None,
             probe=None) -> EvalResult:
    """Score every target of `tokens` once (see the section comment), with the windows of `mode`
    (EVAL_MODES). All ranks return the same sums; with collect=True rank 0 also gets the per-target NLL in
    stream order; with audit=True the result carries the ScoringEvidence. With TTT and a budget, a chunk is
    trained on only while the budget affords its training (the slowest so far, before any TTT_EPOCHS x
    TRAIN_STEP_COST x the plain rate x its tokens) and the scoring of what is left (its forward tokens x the
    plain rate x SCORE_RESERVE), on every rank; after the first refusal no chunk is trained on (ttt.cut =
    "chunks"). `probe` (the audit, ForwardAudit) is shown the first, middle and last batch of the last scoring call
    (without TTT the only one; with TTT the one after every trained chunk)."""
    t_start = time.perf_counter()
    run_model.eval()
    n_inputs = tokens.size - 1
    w = min(window, n_inputs)
    chunk = hp.ttt_chunk_tokens if ttt is not None else n_inputs
    bounds = [(a, min(a + chunk, n_inputs)) for a in range(0, n_inputs, chunk)]
    batch = eval_batch_seqs(hp, rt, tokens.size, window, stride, mode)
    all_tokens, bos_cum = to_device(tokens, rt.device), bos_prefix(tokens)
    evidence = ScoringEvidence(tokens.size, rt) if audit else None
    nll_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    scored = torch.zeros((), dtype=torch.int64, device=rt.device)
    per_target = []
    slowest, forward_tokens = 0.0, 0
    if ttt is not None and budget is not None:     # where each window's targets end: the forward tokens left after b
        all_starts, _, all_to = scoring_windows(mode, tokens, window, stride)
        ends = all_starts + all_to
    for event, k in ttt_schedule(len(bounds)):
        a, b = bounds[k]
        if event == "train":
            if budget is not None and not ttt.cut:
                cost = slowest or hp.ttt_epochs * TRAIN_STEP_COST * budget.rate * ttt.n_seq * ttt.seq_len
                rest = (ends.size - np.searchsorted(ends, b, side="right")) * w / rt.world_size
                if not budget.all_fit(cost + SCORE_RESERVE * budget.rate * rest):
                    ttt.cut = "chunks"
            if ttt.cut:
                continue
            t0 = time.perf_counter()
            ttt.adapt(all_tokens, bos_cum, a, k, len(bounds), evidence)
            ttt.chunks_trained += 1
            slowest = max(slowest, time.perf_counter() - t0)
            continue
        before = weights_fingerprint(run_model) if evidence is not None else None
        windows = scoring_windows(mode, tokens, window, stride, a, b)
        part_sum, part_scored, pieces = score_windows(hp, rt, run_model, all_tokens, *windows, w, batch, collect,
                                                      evidence, bos_cum, probe=probe,
                                                      probe_at=(0.0, 0.5, 1.0) if k == len(bounds) - 1 else ())
        forward_tokens += -(-len(windows[0]) // rt.world_size // batch) * batch * w
        nll_sum += part_sum
        scored += part_scored
        if collect:
            per_target.extend(gather(rt, torch.cat(pieces).numpy() if pieces else np.zeros(0)))
        if before is not None:
            evidence.weights_moved |= (weights_fingerprint(run_model) != before).any()
    run_model.train()
    result = scored_result(rt, tokens, tables, nll_sum, scored, evidence, t_start,
                           np.concatenate(per_target) if collect else None)
    result.forward_tokens = forward_tokens
    return result


def scored_result(rt: Runtime, tokens: np.ndarray, tables, nll_sum: Tensor, scored: Tensor,
                  evidence: "ScoringEvidence | None", t_start: float, per_target: np.ndarray | None) -> EvalResult:
    """The end of every scoring pass: the NLL sum and the target count added up over ranks, the evidence
    closed, the count checked against every target of `tokens`, val_loss (nats per target) and val_bpb
    (bits per byte of the targets)."""
    n_inputs = tokens.size - 1
    if rt.distributed:
        dist.all_reduce(nll_sum)
        dist.all_reduce(scored)
    if evidence is not None:
        evidence.finish()
    if int(scored.item()) != n_inputs:
        raise RuntimeError(f"evaluation scored {int(scored.item())} targets, expected {n_inputs}")
    total_bytes = int(target_bytes(tokens[:-1], tokens[1:], tables).sum())
    if total_bytes == 0:
        raise PipelineError("the validation stream's targets stand for 0 bytes; val_bpb is undefined")
    return EvalResult(nll_sum.item() / n_inputs, nll_sum.item() / (math.log(2) * total_bytes), n_inputs, total_bytes,
                      1e3 * (time.perf_counter() - t_start), per_target, evidence)


TRAIN_STEP_COST = 3.0       # a TTT step before one is measured: forward + backward, x the plain pass's time per token
SCORE_RESERVE = 2.0         # scoring what is left without TTT: x the plain pass's time per token (the margin for a
                            # machine that slows after the plain pass: docs/evaluation.md)


class EvalBudget:
    """EVAL_TIME_LIMIT_SECONDS kept at run time: seconds since `t0` (the artifact's load: compiles, the audit and the
    plain pass count) against the limit (0 = none). `rate`: the plain pass's seconds per forward token on one rank
    (its time over the tokens that rank ran; the ranks ran side by side, so a rank's tokens, not all ranks'). fits()
    is this rank's view (TTT decides per rank, with no collective); all_fit() the slowest rank's (a phase, which
    every rank runs together)."""

    def __init__(self, hp: Hyperparameters, rt: Runtime, t0: float, rate: float):
        self.limit, self.rt, self.t0, self.rate = hp.eval_time_limit_seconds, rt, t0, rate

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def fits(self, seconds: float) -> bool:
        return not self.limit or self.elapsed() + seconds <= self.limit

    def all_fit(self, seconds: float) -> bool:
        return not self.limit or agree_max(self.rt, [self.elapsed() + seconds])[0] <= self.limit


def evaluate_lora_ttt(hp: Hyperparameters, rt: Runtime, ttt: LoRATestTimeTrainer, tokens: np.ndarray, tables,
                      window: int, stride: int, budget: EvalBudget | None = None, collect: bool = False,
                      audit: bool = False, probe=None) -> EvalResult:
    """EVAL_MODE=documents with TTT_METHOD=lora (LoRATestTimeTrainer): each rank scores its documents chunk by chunk
    through their adapters, the phases in between, and with a budget keeps to it by construction: before every
    step it checks that the step (the slowest recent step's time per token x this step's tokens, before any:
    TRAIN_STEP_COST x the plain rate, times the steps that can be in flight) and the scoring of everything this
    rank has left without TTT (no_ttt_forward_tokens x the plain rate x SCORE_RESERVE) fit in what is left; if not,
    its TTT stops there and the rest (the rows' unscored chunks, the documents not begun) is scored by
    document_windows without TTT. Every target is scored once either way. `probe` (the audit, ForwardAudit) is shown
    the steps it picks, with the adapters that scored them, and the first batch of what is left to score without TTT;
    its time is left out of the steps' times the budget predicts from."""
    t_start = time.perf_counter()
    n_inputs, w = tokens.size - 1, min(window, tokens.size - 1)
    spans = document_spans(tokens)
    order = np.argsort(-(spans[:, 1] - spans[:, 0]), kind="stable")          # longest first
    boundaries = phase_boundaries(hp, len(spans))
    segments = [lora_batches(spans[order[lo:hi]], ttt.lora.rows, hp.ttt_lora_chunk, w, rt.world_size)[rt.rank]
                for lo, hi in zip([0] + boundaries, boundaries + [len(spans)])]       # this rank's, between phases
    cost = {id(b): int(no_ttt_forward_tokens(b[:, 1] - b[:, 0], w, stride).sum()) for seg in segments for b in seg}
    rest_batch = eval_batch_seqs(hp, rt, tokens.size, window, stride, "documents")
    # forward tokens of scoring this rank's unfinished batches without TTT, plus two of the rest's batches: its last
    # one's padding, and its first, which runs cold after the TTT steps (on CPU 0.35 s, then 0.13-0.17 s warm)
    left = sum(cost.values()) + 2 * rest_batch * w
    all_tokens, bos_cum = to_device(tokens, rt.device), bos_prefix(tokens)
    evidence = ScoringEvidence(tokens.size, rt) if audit else None
    nll_sum = torch.zeros((), dtype=torch.float64, device=rt.device)
    scored = torch.zeros((), dtype=torch.int64, device=rt.device)
    pieces, rest = [], []
    rate = budget.rate if budget is not None else 0.0
    clock, step_tokens = StepClock(rt, 0.0), []
    model = ttt.model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for phase, batches in enumerate(segments):
        schedule, current = LoRASchedule(batches, ttt.lora.rows, hp.ttt_lora_chunk, w), None
        while not ttt.cut and not schedule.done():
            if schedule.batches and not (schedule.pos < schedule.spans[:, 1]).any():   # a batch begins
                left -= cost[id(current)] if current is not None else 0
                current = schedule.batches[0]
            step = schedule.plan()
            n_tok = ttt.lora.rows * step.length
            if budget is not None:
                per_token = max(d / 1e3 for d in clock.durations) / min(step_tokens) if clock.durations else \
                    TRAIN_STEP_COST * rate
                ahead = len(clock.unfinished) + 1 + STOP_SAFETY_STEPS
                if not budget.fits(ahead * per_token * n_tok + SCORE_RESERVE * rate * left):
                    ttt.cut = "lora"
                    break
            meta = to_device(np.stack([step.start, step.valid, step.score_from, step.score_to, step.learn,
                                       step.fresh]).astype(np.int64), rt.device)
            audited = probe is not None and probe.lora_before(ttt, step, phase)
            nll, mask, targets = ttt.chunk_step(all_tokens, step, meta, evidence)
            nll_sum += (nll.double() * mask).sum()
            scored += mask.sum()
            if collect:
                pieces.append((targets[mask].cpu(), nll.double()[mask].cpu()))
            if audited:
                probe.lora_step(ttt, all_tokens, step, meta, nll, mask, targets)
                clock.pause()          # the audit is no step's time
                clock.resume()
            clock.step_launched()
            step_tokens = (step_tokens + [n_tok])[-STEP_TIME_WINDOW - 1:]
            ttt.steps += 1
            ttt.docs_adapted += schedule.advance()
        if schedule.done() and current is not None:
            left -= cost[id(current)]
        rest += schedule.rest()
        if phase < len(boundaries):
            phase_spans = np.sort(spans[order[:boundaries[phase]]], axis=0)
            phase_tokens = int((phase_spans[:, 1] - phase_spans[:, 0]).sum()) // rt.world_size
            go = not ttt.phases_cut and agree_max(rt, [float(bool(ttt.cut))])[0] == 0.0 and (
                budget is None or budget.all_fit(TRAIN_STEP_COST * rate * phase_tokens + SCORE_RESERVE * rate * left))
            if go:
                ttt.global_phase(all_tokens, tokens, phase_spans, evidence)
                ttt.phases_done += 1
                ttt.lora.redraw_a()
            else:
                ttt.phases_cut = True
    ttt.docs_adapted = int(sum(gather(rt, ttt.docs_adapted)))
    for p in model.parameters():          # as the scoring graph was compiled
        p.requires_grad_(True)
    rest_nll, rest_pos = None, None
    if rest:                   # what TTT did not reach, scored without it, this rank alone
        rest.sort()
        bos = np.flatnonzero(tokens[:n_inputs] == BOS_ID)
        windows = [np.concatenate(part) for part in zip(*[document_windows(tokens, window, stride, a, b, bos)
                                                           for a, b in rest])]
        part_sum, part_scored, part = score_windows(hp, rt, ttt.run_model, all_tokens, *windows, w, rest_batch,
                                                    collect, evidence, bos_cum, split=False, probe=probe,
                                                    probe_at=(0.0,))
        nll_sum += part_sum
        scored += part_scored
        rest_nll = torch.cat(part).numpy() if part else np.zeros(0)
        rest_pos = np.concatenate([np.arange(a + 1, b + 1) for a, b in rest])
    model.train()
    per_target = None
    if collect:
        positions = [torch.cat([t for t, _ in pieces]).numpy() if pieces else np.zeros(0, dtype=np.int64)]
        values = [torch.cat([v for _, v in pieces]).numpy() if pieces else np.zeros(0)]
        if rest_pos is not None:
            positions.append(rest_pos)
            values.append(rest_nll)
        per_target = np.zeros(n_inputs)
        for pos, val in gather(rt, (np.concatenate(positions), np.concatenate(values))):
            per_target[pos - 1] = val
    return scored_result(rt, tokens, tables, nll_sum, scored, evidence, t_start, per_target)


# -----------------------------------------------------------------------------
# SELF-AUDIT (EVAL_AUDIT=1)
# Checks the four rules of "What evaluation may do" in the challenge's rules on the forward that produces the
# reported score: C1 causal, C2 normalized, C3 score before update, C4 one pass. C1 (with rows independent) and
# C2 run inside the final evaluation (ForwardAudit, the evaluator's probe): on a few batches it has just scored,
# through the very forward that scored them, with the weights and LoRA adapters of that moment, in the batch's own
# shape; that this forward gives back the NLLs the evaluation scored ties the checks to the score. C3 and C4 read
# the ScoringEvidence the evaluator recorded from the data it used.
# -----------------------------------------------------------------------------

CAUSALITY_TOLERANCE = 1e-4       # max |delta NLL| of earlier targets when later tokens change ...
NORMALIZATION_TOLERANCE = 1e-4   # max |sum_v p(v) - 1| ...
NOISE_TOLERANCE_FACTOR = 2.0     # ... each plus this many times the noise between identical rows of the same run,
NOISE_CEILING_NATS = 0.01        # which may be at most this: above it the audit cannot certify, it fails


class ForwardAudit:
    """C1, rows independent and C2 on the final evaluation's own scoring forwards. The evaluator shows it some
    batches it has just scored (score_windows: batch(); LoRA TTT: lora_before() and lora_step()); it runs each again
    through the same forward with the same weights, adapters, shape, varlen capacity, grad mode and autocast (a
    compiled model builds no new graph), perturbed as each check needs. It leaves no state changed: adapters it
    swaps are restored exactly, no gradient is kept, the evidence is not told, its random tokens come from its own
    generator (never a BOS: that would add a varlen segment past the batch's capacity). Every rank audits its own
    batches, with no collective before result().

    At an audited batch (rows x L, each row's scored targets in `mask`):
    - scoring forward: the batch run again gives the NLLs the evaluation scored at its scored targets: the forward
      audited is the one that scored;
    - C1: in every row three cuts in its scored range (after its first scored target, halfway, at its end), every
      input and target from the cut on replaced (independently: reading a target through the next input fails
      too); the NLLs before the cut must not move. EVAL_MODE=documents windows also: in each row with a document
      after another, everything before that document's BOS replaced; the NLLs from the BOS on must not move;
    - rows independent: rows 0, 1, the middle and the last each kept with every other row replaced; its NLLs must
      not move (a row that holds a later window holds an earlier row's future);
    - C2, at the first audited batch of each forward (windows, LoRA) of a rank (it costs VOCAB_SIZE / rows forwards):
      a scored row in every row (with per-row adapters, every row given that row's adapter), each row another
      candidate target at every position, the whole vocabulary: exp(-NLL) sums to 1 at every position. The row is
      one whose segments, repeated in every row, fit the batch's varlen capacity (else a later batch is used).
    Every comparison is between the same rows of two forwards (on a GPU a row's rounding can depend on where it
    sits). Tolerances: CAUSALITY_TOLERANCE + NOISE_TOLERANCE_FACTOR x the largest difference of a batch run twice;
    NORMALIZATION_TOLERANCE + NOISE_TOLERANCE_FACTOR x expm1(the largest difference of candidates moved one row).
    A noise above NOISE_CEILING_NATS fails the checks: rounding rows differently on purpose could widen them.

    Which batches (evaluate, lora_before): the first, middle and last batch of evaluate()'s last scoring call (without
    TTT its only one; with whole-model TTT the last chunk's, after every trained chunk); with LoRA TTT the first step
    of each stretch between global phases (before the first, between, after the last) in which a row holds a
    document it has trained on (B no longer 0), with the adapters as they scored it, and the first batch of what a
    budget cut left to be scored without TTT."""

    def __init__(self, hp: Hyperparameters, rt: Runtime):
        self.rt, self.vocab, self.documents = rt, hp.vocab_size, hp.eval_mode == "documents"
        self.gen = torch.Generator(device=rt.device).manual_seed(hp.seed + rt.rank)
        self.worst = {k: torch.zeros((), dtype=torch.float64, device=rt.device) for k in (
            "scoring_forward", "noise_same_rows", "causality", "other_documents", "rows_independent", "normalization",
            "normalization_noise")}
        self.stretches, self.before, self.ms = set(), None, 0.0
        self.counts = dict.fromkeys(("windows", "lora", "lora_steps", "c2_windows", "c2_lora", "other_documents",
                                     "trained_rows"), 0)

    def sync_ms(self) -> float:
        if self.rt.device.type == "cuda":  # CUDA-only: the audit's time is its kernels'
            torch.cuda.synchronize()
        return 1e3 * time.perf_counter()

    def note(self, name: str, diff: Tensor) -> None:
        """Keep the largest |diff| seen for `name` (on the device; a NaN stays: the check fails)."""
        self.worst[name] = torch.maximum(self.worst[name], diff.abs().amax().double())

    def replace(self, t: Tensor, where: Tensor) -> Tensor:
        """t with the entries where `where` (broadcast) holds replaced by random tokens, never a BOS."""
        r = torch.randint(BOS_ID + 1, self.vocab, t.shape, generator=self.gen, device=t.device)
        return torch.where(where, r, t)

    def batch(self, run_model: nn.Module, x, y, capacity: int, nll, mask) -> None:
        """A batch score_windows has just scored (under its no_grad): run_model(x, y, capacity) gave `nll`."""
        t0 = self.sync_ms()

        def forward(xb, yb):
            with autocast(self.rt):
                return run_model(xb, yb, capacity).float()
        self.check(forward, x, y, nll, mask, "windows", capacity, mask.any(dim=1))
        self.ms += self.sync_ms() - t0

    def lora_before(self, ttt: "LoRATestTimeTrainer", step: LoRAStep, stretch: int) -> bool:
        """Before a LoRA chunk step of the `stretch`-th run of steps between global phases: whether to audit it (the
        first of its stretch in which a row holds a document it has trained on); if so the adapters are kept now."""
        self.counts["lora_steps"] += 1
        if stretch in self.stretches or not ((step.valid > 0) & ~step.fresh).any():
            return False
        self.stretches.add(stretch)
        self.before = ttt.lora.weights.detach().clone()
        return True

    def lora_step(self, ttt: "LoRATestTimeTrainer", tokens: Tensor, step: LoRAStep, meta, nll, mask, targets) -> None:
        """The step lora_before() chose, just run by chunk_step (its NLL, scored mask and targets' stream positions),
        audited with the adapters that scored it: those kept before it, with B = 0 in the rows it began afresh (as
        its restart set them; A does not matter while B is 0, the delta is exactly 0). Its own adapters (trained
        since) are put back after."""
        t0, lora, rows, dev = self.sync_ms(), ttt.lora, len(step.start), tokens.device
        b_part = (lora.a_bound == 0)[None, :]
        after = lora.weights.detach().clone()
        with torch.no_grad():
            lora.weights.copy_(self.before.masked_fill_(torch.from_numpy(step.fresh).to(dev)[:, None] & b_part, 0.0))
        trained = torch.from_numpy((step.valid > 0) & ~step.fresh).to(dev)
        self.counts["trained_rows"] += (((lora.weights != 0) & b_part).any(dim=1) & trained).sum()
        inside = torch.arange(step.length, device=dev)[None, :] < meta[1][:, None]
        capacity = varlen_capacity(rows, step.length, rows)

        def forward(xb, yb):
            with torch.enable_grad(), autocast(self.rt):          # chunk_step's grad mode: its compiled graph
                return ttt.run_model(xb, yb, capacity, lora).detach().float()

        def share(r):
            with torch.no_grad():
                lora.weights.copy_(lora.weights[r:r + 1].expand(rows, -1).clone())
        self.check(forward, torch.where(inside, tokens[targets - 1], LORA_PAD_ID),
                   torch.where(inside, tokens[targets], LORA_PAD_ID), nll, mask, "lora", capacity, trained, share)
        with torch.no_grad():
            lora.weights.copy_(after)
        self.before, self.ms = None, self.ms + self.sync_ms() - t0

    def check(self, forward, x, y, nll, mask, kind: str, capacity: int, c2_rows: Tensor, share=None) -> None:
        """The checks of one batch (see the class); c2_rows: the rows C2 may sum over (bool, (rows,)); share(r):
        give every row row r's adapters (per-row adapters only)."""
        rows, length = x.shape
        pos = torch.arange(length, device=x.device)[None, :]
        base = forward(x, y)
        self.note("noise_same_rows", forward(x, y) - base)
        self.note("scoring_forward", (base - nll.float()) * mask)
        first = mask.int().argmax(dim=1)
        last = first + mask.sum(dim=1)
        for cut in (first + 1, (first + last + 1) // 2, last):
            c = cut.clamp(1, length - 1)[:, None]
            self.note("causality", (forward(self.replace(x, pos >= c), self.replace(y, pos >= c)) - base) * (pos < c))
        if kind == "windows" and self.documents:
            later = (x == BOS_ID) & (pos >= 1)
            b = torch.where(later.any(dim=1), later.int().argmax(dim=1), 0)[:, None]   # 0: no such document
            moved = forward(self.replace(x, pos < b), self.replace(y, pos < b - 1))
            self.note("other_documents", (moved - base) * (pos >= b))
            self.counts["other_documents"] += later.any(dim=1).sum()
        for r in {0, min(1, rows - 1), rows // 2, rows - 1}:
            others = (torch.arange(rows, device=x.device) != r)[:, None]
            self.note("rows_independent", (forward(self.replace(x, others), self.replace(y, others)) - base)[r])
        self.counts[kind] += 1
        c2_rows = c2_rows & (1 + (x[:, 1:] == BOS_ID).sum(dim=1) <= (capacity - 1) // rows)   # its segments fit
        if self.counts["c2_" + kind] or not c2_rows.any():
            return
        self.counts["c2_" + kind] = 1
        r = int(c2_rows.int().argmax())
        if share is not None:
            share(r)
        xs, total = x[r:r + 1].expand(rows, length).contiguous(), 0.0
        for v0 in range(0, self.vocab, rows):
            v = v0 + torch.arange(rows, device=x.device)
            ys = v.clamp(max=self.vocab - 1)[:, None].expand(rows, length).contiguous()
            candidates = forward(xs, ys)
            total = total + (torch.exp(-candidates.double()) * (v < self.vocab)[:, None]).sum(dim=0)
            if v0 == 0:     # the same candidates, each one row on
                self.note("normalization_noise", forward(xs, ys.roll(1, 0)).roll(-1, 0) - candidates)
        self.note("normalization", total - 1.0)

    def result(self) -> dict:
        """The compliance keys, over every rank (call on every rank, after the evaluation): each check's verdict and
        tolerance, `audit_max_abs` (the largest |delta NLL| of each check, of the scoring forward against the scores,
        of the batch run twice (noise_same_rows) and of candidates moved one row (normalization_noise); for
        normalization the largest |sum - 1|) and `audit_counts` (batches audited per forward, LoRA steps seen, C2s
        done, rows of documents after another, audited LoRA rows whose B was not 0). A check that audited nothing,
        or not the LoRA forward when LoRA steps scored, or a forward without its C2, fails."""
        w = dict(zip(self.worst, agree_max(self.rt, [float(v) for v in self.worst.values()])))
        c = dict(zip(self.counts, map(sum, zip(*gather(self.rt, [int(v) for v in self.counts.values()])))))
        tolerance = CAUSALITY_TOLERANCE + NOISE_TOLERANCE_FACTOR * w["noise_same_rows"]
        c2_tolerance = NORMALIZATION_TOLERANCE + NOISE_TOLERANCE_FACTOR * math.expm1(w["normalization_noise"])
        audited = (c["windows"] + c["lora"] > 0 and (c["lora"] or not c["lora_steps"])
                   and w["noise_same_rows"] <= NOISE_CEILING_NATS)
        normalized = all(c["c2_" + k] or not c[k] for k in ("windows", "lora"))
        return dict(scoring_forward_ok=audited and w["scoring_forward"] <= tolerance,
                    causality_ok=audited and w["causality"] <= tolerance and w["other_documents"] <= tolerance,
                    rows_independent_ok=audited and w["rows_independent"] <= tolerance,
                    normalization_ok=audited and normalized and w["normalization_noise"] <= NOISE_CEILING_NATS
                    and w["normalization"] <= c2_tolerance,
                    causality_tolerance=tolerance, normalization_tolerance=c2_tolerance, audit_max_abs=w,
                    audit_counts=c)


def audit_score_before_update(evidence: ScoringEvidence, ttt_on: bool) -> dict:
    """C3 from the evidence: no TTT update trained on a target no rank had scored yet, and scoring never
    changed the weights."""
    ok = evidence.unscored_trained == 0 and not evidence.scoring_changed_weights
    return dict(score_before_update_ok=bool(ok), ttt_updates=evidence.updates if ttt_on else 0,
                ttt_unscored_targets_trained=evidence.unscored_trained,
                scoring_changed_weights=evidence.scoring_changed_weights)


def audit_one_pass(evidence: ScoringEvidence) -> dict:
    """C4 from the coverage count summed over ranks: every target position 1 .. T-1 scored exactly
    once, position 0 (never a target) not at all."""
    coverage = evidence.coverage
    counts = torch.bincount(coverage[1:].long().clamp(max=2), minlength=3).tolist()
    ok = int(coverage[0]) == 0 and counts[0] == 0 and counts[2] == 0
    return dict(one_pass_ok=bool(ok), targets_scored_once=counts[1], targets_never_scored=counts[0],
                targets_scored_twice_or_more=counts[2], targets_expected=int(coverage.numel() - 1))


# -----------------------------------------------------------------------------
# TRAINING
# Progress p in [0, 1] is the larger of step / ITERATIONS and elapsed / MAX_WALLCLOCK_SECONDS:
# whichever budget binds drives the schedules. The clock excludes compile warm-up and
# periodic validation. The loop stops when the next step would cross the wallclock cap
# (estimated from the recent step time), voted on by all ranks so they stop together.
# -----------------------------------------------------------------------------

def lr_scale(progress: float, hp: Hyperparameters) -> float:
    """Linear warm-up over LR_WARMUP_FRAC, flat, then over the last WARMDOWN_FRAC a linear decay that ends at
    LR_FLOOR (WARMDOWN_SHAPE=lerp) or falls towards 0 and is held at LR_FLOOR (clamp)."""
    if hp.lr_warmup_frac > 0 and progress < hp.lr_warmup_frac:
        return progress / hp.lr_warmup_frac
    if hp.warmdown_frac > 0 and progress > 1.0 - hp.warmdown_frac:
        remaining = max(0.0, (1.0 - progress) / hp.warmdown_frac)
        if hp.warmdown_shape == "clamp":          # record #1855 (from #1787's MIN_LR)
            return max(remaining, hp.lr_floor)
        return hp.lr_floor + (1.0 - hp.lr_floor) * remaining
    return 1.0


class WeightEMA:
    """EMA of the weights over the run's progress: after a step that advanced progress by dp,
    ema <- ema + (1 - exp(-dp / EMA_HORIZON_FRAC)) * (w - ema). Scale-free: the same horizon is
    ~333 steps of a 6,900-step 8xH100 run and ~10 steps of a 200-step CPU run."""

    def __init__(self, model: nn.Module, horizon_frac: float):
        self.horizon = horizon_frac
        self.params = list(model.parameters())
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self, progress_delta: float) -> None:
        weight = 1.0 - math.exp(-progress_delta / self.horizon)
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], weight)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s.to(p.dtype))


def muon_momentum(progress: float, hp: Hyperparameters) -> float:
    if hp.muon_momentum_warmup_frac <= 0:
        return hp.muon_momentum
    frac = min(1.0, progress / hp.muon_momentum_warmup_frac)
    return hp.muon_momentum_warmup_start + frac * (hp.muon_momentum - hp.muon_momentum_warmup_start)


def grad_accum_steps(hp: Hyperparameters, world_size: int) -> int:
    accum = hp.grad_accum_steps or max(1, 8 // world_size)
    per_micro = hp.train_batch_tokens // (world_size * accum)
    if hp.train_batch_tokens % (world_size * accum) or per_micro % hp.train_seq_len:
        raise PipelineError(
            f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens} must split into world_size({world_size}) x "
            f"GRAD_ACCUM_STEPS({accum}) micro-batches of whole TRAIN_SEQ_LEN={hp.train_seq_len} sequences")
    return accum


@dataclass
class TrainResult:
    steps: int
    train_time_ms: float
    stopped_early: bool
    tokens_seen: int
    train_data_last_read_ms: float   # training clock when the loop last read training data
    clock: "StepClock"               # the training clock, stopped at the end of the loop
    late_qat_step: int | None        # step at which late QAT turned on (None: never)
    ternary_qat_step: int | None     # step at which the ternary matrices started training ternary
    compile_ms: float                # warm-up: every graph compiled before the clock started ...
    eval_compile_ms: float           # ... of which building the evaluation graphs (counted in evaluation time)
    graphs_compiled: int             # graphs torch.compile built in the warm-up (0 without compile)
    recompiles_in_clock: int         # graphs it built while the training clock ran (should be 0)
    train_loss: float | None         # mean training loss since the log line before the last (ranks averaged)
    train_flops: float               # FLOPs of the steps run (all ranks), each at its own state's flops_per_token


class QATSwitch:
    """Turns fake quantization on during training: the ternary matrices from TERNARY_FROM_STEP, and
    every quantized tensor once the warmdown's LR scale falls below LATE_QAT_THRESHOLD. While
    ternary matrices train ternary, log_ternary() logs per group the share of zeros and of weights
    whose trit changed since the last log (ternary telemetry)."""

    def __init__(self, hp: Hyperparameters, model: GPT, log: RunLog, spec: "QuantSpec"):
        self.hp, self.model, self.log, self.spec = hp, model, log, spec
        self.ternary = ternary_patterns(hp)
        self.late_step = self.ternary_step = None
        self.last_trits: dict[str, Tensor] = {}

    def set_level(self, level: str) -> None:
        """Fake quantization "off", "ternary" (the ternary matrices only) or "late" (every tensor)."""
        if level == "off":
            set_qat(self.model, None, ())
        else:
            set_qat(self.model, self.spec, self.ternary, only_ternary=level == "ternary")

    def update(self, step: int, progress: float, scale: float) -> None:
        hp = self.hp
        if self.ternary_step is None and self.late_step is None and 0 <= hp.ternary_from_step <= step:
            n = set_qat(self.model, self.spec, self.ternary, only_ternary=True)
            self.ternary_step = step
            self.log(f"ternary_qat: on from step {step}: {n} matrices train through the ternary quantizer")
        in_warmdown = hp.warmdown_frac > 0 and progress > 1.0 - hp.warmdown_frac
        if self.late_step is None and hp.late_qat_threshold and in_warmdown and scale < hp.late_qat_threshold:
            n = set_qat(self.model, self.spec, self.ternary)
            self.late_step = step
            if self.ternary_step is None and self.ternary:
                self.ternary_step = step
            self.log(f"late_qat: on from step {step} (progress {progress:.3f}, lr scale {scale:.3f}): "
                     f"{n} tensors train through their export quantizer")

    @torch.no_grad()
    def log_ternary(self, step: int) -> None:
        if self.ternary_step is None:
            return
        stats: dict[str, list[int]] = {}
        for name, module in self.model.named_modules():
            scheme = getattr(module, "qat_scheme", None)
            if scheme != "ternary":
                continue
            trits = quantize_ternary(module.weight)[0].to(torch.int8)
            prev = self.last_trits.get(name)
            s = stats.setdefault(weight_group(name), [0, 0, 0])
            s[0] += trits.numel()
            s[1] += int((trits == 0).sum())
            s[2] += int((trits != prev).sum()) if prev is not None else 0
            self.last_trits[name] = trits
        self.log("ternary: " + " ".join(f"{g} zeros:{z / n:.4f} flipped:{f / n:.5f}" for g, (n, z, f) in stats.items()))


def late_qat_progress(hp: Hyperparameters) -> float:
    """Progress at which the warmdown's LR scale falls below LATE_QAT_THRESHOLD (late QAT's switch)."""
    return 1.0 - hp.warmdown_frac * (hp.late_qat_threshold - hp.lr_floor) / (1.0 - hp.lr_floor)


def run_states(hp: Hyperparameters) -> list[tuple[bool, str]]:
    """Every (depth recurrence on, fake-quantization level) state training passes through, in order; the
    last is the state it ends in. The switches happen at known fractions of the run (RECUR_START_FRAC,
    late_qat_progress); ternary from a step > 0 has no known fraction, so then every combination."""
    recur = bool(hp.recur_layers)
    events = [(hp.recur_start_frac, "recurrence")] if recur else []
    if hp.late_qat_threshold:
        events.append((late_qat_progress(hp), "late"))
    if hp.ternary_from_step > 0:
        levels = ["off", "ternary"] + (["late"] if hp.late_qat_threshold else [])
        return [(r, level) for r in ([False, True] if recur else [False]) for level in levels]
    state = (False, "ternary" if hp.ternary_from_step == 0 else "off")
    states = [state]
    for _, event in sorted(events):
        state = (True, state[1]) if event == "recurrence" else (state[0], "late")
        states.append(state)
    return states


def compiled_graphs() -> int:
    """Graphs torch.compile (dynamo) has built in this process so far: its own count."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def graph_breaks() -> int:
    from torch._dynamo.utils import counters
    return int(sum(counters["graph_break"].values()))


def warm_up(hp: Hyperparameters, rt: Runtime, model: GPT, run_model: nn.Module, train_model: nn.Module,
            qat: QATSwitch, accum: int, local_tokens: int, n_val_tokens: int, lora: "TTTLoRA | None" = None) -> float:
    """Run, before the training clock starts, every graph the run will need, so a compiled model builds
    them all now: in each state of run_states, COMPILE_WARMUP_STEPS training steps' forward/backward and,
    when periodic validation runs (VAL_LOSS_EVERY), a validation forward; then, in the state training ends
    in with fake quantization off, the graphs the configured evaluation runs and nothing else: the plain
    windows (pre-quantization diagnostic, round-trip pass), the final windows of EVAL_MODE (scoring without
    TTT), TTT_METHOD=whole's step, or TTT_METHOD=lora's steps at every row length (`lora`: the adapters the
    evaluation will use) and its global phases' step. Every varlen forward at its base capacity. Random
    tokens (never a BOS), inputs and targets distinct, no optimizer step: the weights are untouched and no
    data (train or validation) is read.

    Returns the ms spent on the evaluation's graphs: the evaluation pays for them (its budget is 600 s too),
    so they are counted in its time, not hidden before the training clock."""
    gen = torch.Generator().manual_seed(hp.seed)
    rand = lambda *shape: torch.randint(BOS_ID + 1, hp.vocab_size, shape, generator=gen).to(rt.device)  # noqa: E731
    eval_ms = [0.0]

    @contextlib.contextmanager
    def timed_as_evaluation():
        t0 = time.perf_counter()
        yield
        if rt.device.type == "cuda":  # CUDA-only: the graph has run, not just been queued
            torch.cuda.synchronize()
        eval_ms[0] += 1e3 * (time.perf_counter() - t0)

    def score_random(window: int, stride: int, mode: str = "sliding") -> None:
        """One forward of the shape evaluate() will use on the validation stream with this geometry."""
        w = min(window, n_val_tokens - 1)
        batch = eval_batch_seqs(hp, rt, n_val_tokens, window, stride, mode)
        windows = (np.arange(batch), np.zeros(batch, dtype=np.int64), np.full(batch, w))
        fake = rand(w + batch)
        score_windows(hp, rt, run_model, fake, *windows, w, batch, False, None, bos_prefix(fake.cpu().numpy()))

    def step_random(rows: int, length: int, adapters: "TTTLoRA | None" = None) -> None:
        """One forward and backward of `rows` x `length` random tokens at the base capacity."""
        with autocast(rt):
            loss = run_model(rand(rows, length), rand(rows, length), varlen_capacity(rows, length), adapters).mean()
        loss.backward()

    states = run_states(hp)
    rows = local_tokens // hp.train_seq_len
    for i, (recurrence_on, level) in enumerate(states):
        model.recurrence_on = recurrence_on
        qat.set_level(level)
        for _ in range(hp.compile_warmup_steps):
            for micro in range(accum):
                with train_model.no_sync() if rt.distributed and micro < accum - 1 else contextlib.nullcontext():
                    with autocast(rt):
                        loss = train_model(rand(rows, hp.train_seq_len), rand(rows, hp.train_seq_len),
                                           varlen_capacity(rows, hp.train_seq_len)).mean()
                    (loss / accum).backward()
        if hp.compile_warmup_steps and n_val_tokens and hp.val_loss_every:
            score_random(hp.train_seq_len, hp.train_seq_len)
    if hp.compile_warmup_steps and n_val_tokens:
        qat.set_level("off")
        window, stride = eval_geometry(hp)
        w = min(window, n_val_tokens - 1)
        with timed_as_evaluation():
            score_random(hp.train_seq_len, hp.train_seq_len)     # pre-quant and round-trip plain evaluations
            score_random(window, stride, hp.eval_mode)           # the final windows without TTT
            if hp.ttt_enabled and (hp.ttt_method == "whole" or hp.ttt_phases):
                run_model.train()
                step_random(ttt_seqs_per_rank(hp, rt, w), w)     # whole-model TTT / a global phase's step
                run_model.eval()
            if lora is not None:
                for p in model.parameters():
                    p.requires_grad_(False)
                for length in lora_lengths(w):
                    step_random(lora.rows, length, lora)
                    lora.weights.grad = None
                for p in model.parameters():
                    p.requires_grad_(True)
        run_model.train()
    for p in model.parameters():
        p.grad = None
    model.recurrence_on = False
    qat.set_level("off")
    if rt.device.type == "cuda":  # CUDA-only
        torch.cuda.synchronize()
    return eval_ms[0]


def train(hp: Hyperparameters, rt: Runtime, model: GPT, run_model: nn.Module, loader: DistributedTokenLoader,
          log: RunLog, validate, qat_spec: "QuantSpec | None" = None, n_val_tokens: int = 0,
          lora: "TTTLoRA | None" = None) -> TrainResult:
    """Train in place (leaving the EMA weights in the model when EMA is on). run_model is the
    (compiled) model; validate(step, train_ms) logs a val line; late QAT trains on qat_spec's grid (the
    budget plan's; default: the settings'); n_val_tokens sizes the warm-up's evaluation forwards (0: no
    evaluation forward in the warm-up); lora: the per-document TTT adapters the evaluation will use."""
    train_model = run_model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(run_model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    optimizers = build_optimizers(model, hp, rt)
    trained = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]    # not the softcaps
    accum = loader.grad_accum
    qat = QATSwitch(hp, model, log, qat_spec or QuantSpec.from_settings(hp))
    t_compile, graphs_before, eval_compile_ms = time.perf_counter(), compiled_graphs(), 0.0
    if run_model is not model:           # compiled: build every graph now, not inside the clock
        try:
            eval_compile_ms = warm_up(hp, rt, model, run_model, train_model, qat, accum, loader.local_tokens,
                                      n_val_tokens, lora)
        except torch._dynamo.exc.TorchDynamoException as e:
            traceback.print_exc()
            raise PipelineError(f"torch.compile failed in the warm-up ({compile_failure(e)}); COMPILE=0 runs without it"
                                ) from None
    compile_ms, graphs = 1e3 * (time.perf_counter() - t_compile), compiled_graphs() - graphs_before
    eval_compile_ms = agree_max(rt, [eval_compile_ms])[0]     # the slowest rank's
    step_flops = {on: flops_per_token(hp, hp.train_seq_len, on) * hp.train_batch_tokens for on in (False, True)}
    ema = WeightEMA(model, hp.ema_horizon_frac) if hp.ema_horizon_frac > 0 else None
    if rt.distributed:
        dist.barrier()

    reserve = hp.gptq_reserve_seconds if hp.gptq_calibration == "train" and hp.max_wallclock_seconds else 0.0
    cap_ms = 1e3 * (hp.max_wallclock_seconds - reserve)
    tokens_per_step = hp.train_batch_tokens
    loss_sum = torch.zeros((), device=rt.device)
    loss_count, step, last_read_ms, prev_progress, mean_loss, train_flops = 0, 0, 0.0, 0.0, None, 0.0
    stopped_early = False
    log(f"clock_start: warm-up compiled {graphs} graphs in {compile_ms:.0f}ms ({hp.compile_warmup_steps} step(s) in "
        f"each of {len(run_states(hp))} training state(s), and the evaluation forwards); the training clock starts now"
        if run_model is not model else "clock_start: not compiled, no warm-up; the training clock starts now")
    graphs_at_start = compiled_graphs()
    clock = StepClock(rt, cap_ms)
    while True:
        # one vote per step: every rank takes the slowest clock, so schedules agree everywhere
        want_stop = step > 0 and clock.should_stop()
        elapsed_ms, want_stop = agree_max(rt, [clock.elapsed_ms(), float(want_stop)])
        if want_stop and step < hp.iterations:
            stopped_early = True
            log(f"stopping_early: wallclock_cap train_time:{elapsed_ms:.0f}ms step:{step}/{hp.iterations}")
        last_step = step >= hp.iterations or stopped_early
        if hp.val_loss_every and step > 0 and (last_step or step % hp.val_loss_every == 0):
            clock.pause()
            validate(step, clock.train_ms)
            clock.resume()
        if last_step:
            clock.pause()
            break

        progress = max(step / hp.iterations, elapsed_ms / cap_ms if cap_ms else 0.0)
        scale = lr_scale(progress, hp)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        for group in optimizers[2].param_groups:
            group["momentum"] = muon_momentum(progress, hp)
        qat.update(step, progress, scale)
        if model.recur_range and not model.recurrence_on and progress >= hp.recur_start_frac:
            model.recurrence_on = True
            log(f"recurrence: on from step {step} (progress {progress:.3f}): layer order {model.layer_order()}")

        for micro in range(accum):
            x, y, capacity = loader.batch(step, micro)
            sync_now = micro == accum - 1 or not rt.distributed
            ctx = contextlib.nullcontext() if sync_now else train_model.no_sync()
            with ctx:
                with autocast(rt):
                    loss = train_model(x, y, capacity).mean()
                (loss / accum).backward()
            loss_sum += loss.detach()
            loss_count += 1
        last_read_ms = clock.elapsed_ms()
        if hp.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(trained, hp.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        for p in model.parameters():
            p.grad = None
        if ema is not None:
            ema.update(progress - prev_progress if step else 1.0 / hp.iterations)
        prev_progress = progress
        train_flops += step_flops[model.recurrence_on]
        step += 1
        clock.step_launched()

        if step % hp.train_log_every == 0 or step == 1 or step == hp.iterations:
            now_ms = clock.elapsed_ms()
            if rt.distributed:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            mean_loss = loss_sum.item() / loss_count
            loss_sum.zero_()
            loss_count = 0
            avg = now_ms / step
            left = (hp.iterations - step) * avg
            if cap_ms:
                left = min(left, cap_ms - now_ms)
            log(f"step:{step}/{hp.iterations} train_loss:{mean_loss:.4f} train_time:{now_ms:.0f}ms "
                f"step_avg:{avg:.2f}ms tok/s:{tokens_per_step * step / max(now_ms / 1e3, 1e-9):.0f} "
                f"eta:{max(0.0, left) / 1e3:.0f}s")
            qat.log_ternary(step)
    recompiles = compiled_graphs() - graphs_at_start
    if ema is not None:
        ema.copy_to_model()
        log(f"ema: the exported weights are the EMA (horizon {hp.ema_horizon_frac} of the run)")
    return TrainResult(step, clock.train_ms, stopped_early, step * tokens_per_step, last_read_ms, clock,
                       qat.late_step, qat.ternary_step, compile_ms, eval_compile_ms, graphs, recompiles, mean_loss,
                       train_flops)


# -----------------------------------------------------------------------------
# QUANTIZATION AND PACKING
# The export rounds every weight onto the grid of its scheme (QUANTIZATION GRID, above the model).
# With calibration Hessians, GPTQ rounds every integer matrix on its SDClip grid, the tied embedding
# with the Hessian of the head's input; LQER then adds a low-rank correction of the quantization error
# to the LQER_TENSORS tensors it helps most. GPTQ runs on the accelerator, the matrices dealt out to
# the ranks. The budget fit coarsens every k by one common factor until code + model fit
# ARTIFACT_BUDGET_BYTES (the planner predicts that factor before training, and late QAT trains on
# its grid), and steps bits down only as a last resort (precision_ladder).
# The artifact is our own layout, never a pickle:
#   ARTIFACT_MAGIC | u64 header length | JSON header | raw little-endian arrays
# compressed as one lzma (xz) stream. The header lists each tensor's name, shape, stored scheme
# and the (dtype, shape, offset, nbytes) of its parts; the parts of every tensor follow, grouped by
# kind (see pack_artifact).
# -----------------------------------------------------------------------------

# Settings that shape the model: stored in the artifact so EVAL_ONLY rebuilds the same network.
ARCH_SETTINGS = ("VOCAB_SIZE", "NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS", "MLP_MULT", "MLP_ACT",
                 "ROPE_BASE", "ROPE_DIMS", "LOGIT_SOFTCAP", "LOGIT_SOFTCAP_ASYM", "XSA_LAST_N", "ATTN_GATE", "ATTN_GATE_DIMS", "BIGRAM_VOCAB",
                 "BIGRAM_DIM", "SMEAR_GATE", "SMEAR_GATE_DIMS", "LN_SCALE", "RECUR_LAYERS", "RECUR_PASSES",
                 "PARALLEL_LAST_N", "PARALLEL_LANES")
GPTQ_DAMP = 0.01           # damping: this fraction of the mean Hessian diagonal is added to the diagonal
GPTQ_BLOCK = 128           # GPTQ updates the rest of the matrix once per block of this many columns
LQER_BITS = 6              # LQER_FACTORS=row6: per-row absmax integers of this many bits, fp16 scales
LQER_GROUP = 64            # LQER_FACTORS=asym4: B's int4 scale groups (record #1855's LQER_ASYM_GROUP)
FIT_MIN_SCALE = 0.5        # the budget fit scales every k by one factor in [FIT_MIN_SCALE, FIT_MAX_SCALE] of the
FIT_MAX_SCALE = 4.0        #   settings' (about 1 bit per weight more, 2 fewer), the planner too
FIT_ATTEMPTS = 6           # quantize-and-pack attempts per rung of the precision ladder
FIT_WINDOW = 0.003         # the fit lands code + model within this fraction under the budget (48 kB of 16 MB), aiming
                           #   at the window's middle (the records sat 7-98 kB under)


def precision_ladder(spec: QuantSpec) -> list[QuantSpec]:
    """Last resort of the budget fit, rung by rung: as set, then the MLP matrices one bit lower, then every
    matrix one bit lower (never below 5 bits)."""
    matrix = spec.bits_of("mlp")
    low = max(5, matrix - 1)
    ladder = [spec, spec.with_bits(mlp=low), spec.with_bits(mlp=low, attn=max(5, spec.bits_of("attn") - 1))]
    return [r for i, r in enumerate(ladder) if r not in ladder[:i]]


# --- calibration: Hessians of every quantized matrix's input ----------------------------------------
# H = E[x x^T] over the calibration tokens: of each QuantLinear's input (forward pre-hooks), and of the
# head's input (the final norm's output) for the tied embedding, which is the head's weight (record
# 2026-04-05). Accumulated in fp32 outside autocast (bf16 keeps 3 significant digits), summed over
# ranks. Self-calibration decodes incrementally (DecodeCache) with fake quantization paused; the
# sampling noise for every sequence comes from one seeded generator, so the text does not depend on
# how many ranks share the work (each decodes its own rows).

def calibration_rows(rt: Runtime, n_seqs: int) -> range:
    return range(rt.rank * n_seqs // rt.world_size, (rt.rank + 1) * n_seqs // rt.world_size)


@torch.no_grad()
def generate_calibration(model: GPT, rt: Runtime, n_seqs: int, seq_len: int, temperature: float,
                         seed: int) -> Tensor:
    """This rank's share (calibration_rows) of n_seqs sequences of seq_len tokens the model samples itself
    from BOS (no data is read): Gumbel-max sampling at `temperature`, decoded one token at a time."""
    rows = calibration_rows(rt, n_seqs)
    gen = torch.Generator(device=rt.device).manual_seed(seed)
    x = torch.full((len(rows), 1), BOS_ID, dtype=torch.long, device=rt.device)
    out, cache = [x], DecodeCache()
    for _ in range(seq_len - 1):
        with autocast(rt):
            logits = model.logits(x, cache)[:, -1].float()
        uniform = torch.rand(n_seqs, logits.size(-1), generator=gen, device=rt.device)[rows.start:rows.stop]
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        x = (logits / temperature + gumbel).argmax(dim=-1, keepdim=True)
        out.append(x)
    return torch.cat(out, dim=1)


def collect_hessians(model: GPT, rt: Runtime, batches: list[Tensor]) -> dict[str, Tensor]:
    """Mean x x^T (float32) of the input of every QuantLinear and of the head (for tok_emb.weight) over
    the calibration batches of token ids (B, T) of every rank, keyed by the weight's state-dict name."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def record(name: str, x: Tensor) -> None:
        with torch.autocast(x.device.type, enabled=False):
            x = x.detach().reshape(-1, x.size(-1)).float()
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
        counts[name] = counts.get(name, 0) + x.shape[0]

    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            hooks.append(module.register_forward_pre_hook(lambda m, args, name=f"{name}.weight": record(name, args[0])))
    hooks.append(model.final_norm.register_forward_hook(lambda m, args, out: record("tok_emb.weight", out)))
    try:
        with torch.no_grad(), autocast(rt), qat_paused(model):
            for x in batches:
                model.logits(x.to(rt.device), None, capacity_of(x))
    finally:
        for h in hooks:
            h.remove()
    names = sorted(sums)
    if rt.distributed:     # every rank saw the same modules, so the names agree
        total = torch.tensor([counts[n] for n in names], dtype=torch.float64, device=rt.device)
        dist.all_reduce(total)
        for n in names:
            dist.all_reduce(sums[n])
        counts = dict(zip(names, total.tolist()))
    return {n: sums[n] / counts[n] for n in names}


@contextlib.contextmanager
def qat_paused(model: nn.Module):
    """Within the block every quantizable module runs on its float weight; schemes restored after."""
    saved = {m: m.qat_scheme for m in model.modules() if isinstance(m, FakeQuantWeight)}
    for m in saved:
        m.qat_scheme = None
    try:
        yield
    finally:
        for m, scheme in saved.items():
            m.qat_scheme = scheme


# --- GPTQ (Frantar et al. 2022, arXiv 2210.17323) on the SDClip grid -------------------------------
# For an integer matrix W (out x in) with input Hessian H: quantize the columns one at a time, in
# descending order of H's diagonal (act-order), and fold each column's rounding error into the columns
# not yet quantized through the Cholesky factor of H^-1, one block of GPTQ_BLOCK columns at a time. The
# row scales are SDClip's, fixed from the float weights before any error feedback. Per row we keep
# whichever of GPTQ and round-to-nearest has the smaller Hessian-weighted error (w - q s) H (w - q s)^T,
# so GPTQ is never worse than round-to-nearest on the same grid. The factor depends only on H, so it is
# computed once per matrix and reused by every attempt of the budget fit (gptq_factor).

def hessian_error(w: Tensor, deq: Tensor, hessian: Tensor) -> Tensor:
    """Per-row (w - deq) H (w - deq)^T, float64."""
    e = (w - deq).double()
    return ((e @ hessian.double()) * e).sum(dim=1)


@dataclass
class GPTQFactor:
    order: Tensor      # act-order permutation of the columns
    back: Tensor       # its inverse
    u: Tensor | None   # upper Cholesky factor of the damped H^-1 in act-order (None: H hopeless, round to nearest)
    dead: Tensor       # inputs that were always zero


def gptq_factor(hessian: Tensor) -> GPTQFactor:
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True, stable=True)
    h = h[order][:, order]
    eye = torch.eye(h.shape[0], device=h.device)
    for damp in (GPTQ_DAMP, 10 * GPTQ_DAMP, 100 * GPTQ_DAMP):
        chol, info = torch.linalg.cholesky_ex(h + damp * h.diagonal().mean() * eye)
        if info == 0:
            u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
            return GPTQFactor(order, torch.argsort(order), u, dead)
    return GPTQFactor(order, torch.argsort(order), None, dead)


def _gptq_columns(w: Tensor, u: Tensor, scale: Tensor, mult: Tensor, top: Tensor) -> Tensor:
    """GPTQ's inner loop over columns of w (already in act-order); u = upper Cholesky factor of H^-1; column j on
    the grid step scale * mult[j], integers within +-top[j] (column_grid, in the same order)."""
    w = w.clone()
    q = torch.zeros_like(w)
    s = scale.float()
    n = w.shape[1]
    for i1 in range(0, n, GPTQ_BLOCK):
        i2 = min(i1 + GPTQ_BLOCK, n)
        block, err = w[:, i1:i2].clone(), torch.zeros(w.shape[0], i2 - i1, device=w.device)
        for i in range(i2 - i1):
            col, step, qmax = block[:, i], s * mult[i1 + i], top[i1 + i]
            q[:, i1 + i] = torch.clamp(torch.round(col / step), -qmax, qmax)      # round_grid, one column
            e = (col - q[:, i1 + i] * step) / u[i1 + i, i1 + i]
            block[:, i:] -= e[:, None] * u[i1 + i, i1 + i:i2][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return q


def column_grid(cols: int, bits: int, awq_cols: Tensor | None = None, awq_bits: int = 8,
                device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Each input column's (multiplier on the row scale, largest integer): the matrix's SDClip grid, except the
    AWQ-lite columns: steps (2^(bits-1) - 1) / (2^(awq_bits-1) - 1) of the row's, integers up to
    2^(awq_bits-1) - 1, so the same clip k std(row) on a finer grid. Float32."""
    qmax, qmax_awq = 2 ** (bits - 1) - 1, 2 ** (awq_bits - 1) - 1
    mult = torch.ones(cols, device=device)
    top = torch.full((cols,), float(qmax), device=device)
    if awq_cols is not None:
        mult[awq_cols.to(mult.device)] = qmax / qmax_awq
        top[awq_cols.to(mult.device)] = float(qmax_awq)
    return mult, top


def round_grid(w: Tensor, scale: Tensor, mult: Tensor, top: Tensor) -> Tensor:
    """Round to nearest on a column_grid (round_rows when every column is on the matrix's grid)."""
    return torch.clamp(torch.round(w / (scale.float()[:, None] * mult)), -top, top)


def dequantize_grid(q: Tensor, scale: Tensor, mult: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None] * mult


def gptq_quantize(w: Tensor, hessian: Tensor, bits: int, sigmas: float, factor: GPTQFactor | None = None,
                  awq_cols: Tensor | None = None, awq_bits: int = 8) -> tuple[Tensor, Tensor]:
    """GPTQ with act-order and blocks on the SDClip grid (see above), on w's device; the columns awq_cols (AWQ-lite,
    below) on their finer grid inside the same solve (column_grid). Returns (q float32 integers, fp16 row scale), the
    layout quantize_rows returns. hessian: (in, in), the mean x x^T."""
    w = w.detach().float()
    factor = factor or gptq_factor(hessian)
    scale = sdclip_scale(w, bits, sigmas)
    mult, top = column_grid(w.shape[1], bits, awq_cols, awq_bits, w.device)
    rtn = round_grid(w, scale, mult, top)
    if factor.u is None:
        return rtn, scale                                   # H hopeless even damped: round to nearest
    w_ordered = w.clone()
    w_ordered[:, factor.dead] = 0.0
    gptq = _gptq_columns(w_ordered[:, factor.order], factor.u, scale, mult[factor.order], top[factor.order])[:, factor.back]
    better = (hessian_error(w, dequantize_grid(gptq, scale, mult), hessian)
              < hessian_error(w, dequantize_grid(rtn, scale, mult), hessian))
    return torch.where(better[:, None], gptq, rtn), scale


# --- AWQ-lite (PR #1908 of openai/parameter-golf, on record #1855): a few input columns at more bits -------------
# Saliency of a group of AWQ_GROUP_SIZE consecutive input columns of a matrix: sum over its columns of the input's
# RMS (the square root of the calibration Hessian's diagonal: no second pass) times the column's mean |w|. The
# AWQ_GROUPS most salient groups over every GPTQ'd integer matrix below AWQ_BITS (one ranking for the whole model,
# as the AWQ-lite code of #1908's lineage ranks its candidates) are quantized at AWQ_BITS inside the same GPTQ solve, on the row's clip
# with a finer step (column_grid). Stored as the entry's scheme int<b>_row_awq<a> with parts q (the other columns),
# q_awq (these columns, coded in their own rANS stream) and awq_cols (their indices). Late QAT does not know the
# group (it is chosen from the Hessians, collected after training); as in the records, it exists only at export.

def awq_saliency(w: Tensor, hessian: Tensor, group: int) -> Tensor:
    """Saliency of each whole group of `group` consecutive input columns of w (a trailing partial group is none)."""
    per_column = hessian.diagonal().float().clamp_min(0).sqrt() * w.detach().float().abs().mean(dim=0).to(hessian.device)
    n = w.shape[1] // group
    return per_column[:n * group].reshape(n, group).sum(dim=1)


def awq_select(state: dict[str, Tensor], hessians: dict[str, Tensor], spec: QuantSpec, ternary: tuple[str, ...],
               groups: int, group_size: int, awq_bits: int) -> dict[str, Tensor]:
    """The `groups` most salient column groups over every integer matrix that has a Hessian, fewer bits than
    awq_bits and more columns than a group: {weight name: its chosen column indices, ascending (int64)}; ties go to
    the earlier name and group."""
    candidates = []
    for name in sorted(hessians):
        scheme = choose_scheme(name, state[name], spec, ternary)
        if scheme.startswith("int") and int(scheme[3]) < awq_bits and state[name].shape[1] > group_size:
            scores = awq_saliency(state[name], hessians[name], group_size).tolist()
            candidates += [(-score, name, g) for g, score in enumerate(scores)]
    chosen: dict[str, list[int]] = {}
    for _, name, g in sorted(candidates)[:groups]:
        chosen.setdefault(name, []).extend(range(g * group_size, (g + 1) * group_size))
    return {name: torch.tensor(sorted(cols)) for name, cols in chosen.items()}


# --- LQER: low-rank correction of the quantization error (record 2026-04-27) ------------------------
# E = W - deq(q): its best rank-r approximation A B from the SVD (A = U sqrt(S), B = sqrt(S) V^T, balanced
# so both factors quantize alike), stored as LQER_BITS-bit integers (A by column, B by row, absmax
# scales). Every integer matrix gets a candidate, scored by the drop in Hessian-weighted error that the
# stored (quantized) factors bring; the LQER_TENSORS with the largest drop keep theirs. Loading adds
# A B to the dequantized weight. LQER_FACTORS=asym4 (record #1855) stores instead A = U S (all of the
# singular values) as int2 in [-2, 1] with one fp16 scale max|A| / 1.5, and B = V^T (orthonormal rows) as int4
# in [-8, 7] with an fp16 scale max|g| / 7.5 per group g of LQER_GROUP consecutive values of a row (a row
# whose length is no multiple of it is one group). Its lqer_b_scale is 2-D (rank, groups), row6's 1-D.

def absmax_rows(t: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    qmax = 2 ** (bits - 1) - 1
    scale = (t.abs().amax(dim=1) / qmax).clamp_min(FP16_TINY).half()
    return round_rows(t, scale, qmax), scale


def lqer_asym4(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Stored parts of A (m x r, = U S) and B (r x n, = V^T) in the asym4 format."""
    sa = (a.abs().amax() / 1.5).clamp_min(FP16_TINY).half().reshape(1)
    qa = torch.clamp(torch.round(a.T / sa.float()), -2, 1)
    r, n = b.shape
    group = LQER_GROUP if n % LQER_GROUP == 0 else n
    bg = b.reshape(r, n // group, group)
    sb = (bg.abs().amax(dim=2) / 7.5).clamp_min(FP16_TINY).half()
    qb = torch.clamp(torch.round(bg / sb.float()[..., None]), -8, 7).reshape(r, n)
    return dict(lqer_a=qa, lqer_a_scale=sa, lqer_b=qb, lqer_b_scale=sb)


def lqer_candidate(w: Tensor, deq: Tensor, hessian: Tensor | None, rank: int,
                   factors: str = "asym4") -> tuple[dict[str, Tensor], float]:
    """(stored LQER parts, drop in Hessian-weighted error they bring) for one matrix; identity H without one."""
    u, s, vh = torch.linalg.svd((w.float() - deq).double(), full_matrices=False)
    r = min(rank, s.numel())
    if factors == "asym4":
        parts = lqer_asym4((u[:, :r] * s[:r]).float(), vh[:r].float())
    else:
        root = s[:r].sqrt()
        qa, sa = absmax_rows((u[:, :r] * root).T.float(), LQER_BITS)
        qb, sb = absmax_rows((root[:, None] * vh[:r]).float(), LQER_BITS)
        parts = dict(lqer_a=qa, lqer_a_scale=sa, lqer_b=qb, lqer_b_scale=sb)
    h = hessian if hessian is not None else torch.eye(w.shape[1], device=w.device)
    before = hessian_error(w.float(), deq, h).sum()
    return parts, (before - hessian_error(w.float(), deq + lqer_correction(parts), h).sum()).item()


def lqer_correction(parts: dict) -> Tensor:
    """A B from stored LQER parts (tensors or arrays), float32."""
    t = {k: v if isinstance(v, Tensor) else torch.from_numpy(np.array(v)) for k, v in parts.items()}
    if t["lqer_b_scale"].ndim == 2:            # asym4
        qb, sb = t["lqer_b"].float(), t["lqer_b_scale"].float()
        a = (t["lqer_a"].float() * t["lqer_a_scale"].float()).T
        b = (qb.reshape(qb.shape[0], sb.shape[1], -1) * sb[..., None]).reshape(qb.shape).to(a.device)
        return a @ b
    a = dequantize_rows(t["lqer_a"], t["lqer_a_scale"]).T
    b = dequantize_rows(t["lqer_b"], t["lqer_b_scale"]).to(a.device)
    return a @ b


# --- ternary packing ------------------------------------------------------------------------------
# Two layouts of the trits; export keeps, per tensor, whichever lzma compresses smaller:
#   base3: 5 trits per byte, byte = sum_k (q_k + 1) 3^k (3^5 = 243 <= 256), zero-padded;
#   mask:  one bit per weight "nonzero" (np.packbits), then one sign bit per nonzero weight.

def pack_ternary_base3(q: np.ndarray) -> np.ndarray:
    t = (q.reshape(-1).astype(np.int16) + 1).astype(np.uint8)
    t = np.concatenate([t, np.ones((-t.size) % 5, dtype=np.uint8)]).reshape(-1, 5)
    return (t.astype(np.uint16) * np.array([1, 3, 9, 27, 81], dtype=np.uint16)).sum(axis=1).astype(np.uint8)


def unpack_ternary_base3(packed: np.ndarray, n: int) -> np.ndarray:
    digits = packed.astype(np.int16)[:, None] // np.array([1, 3, 9, 27, 81], dtype=np.int16) % 3
    return (digits.reshape(-1)[:n] - 1).astype(np.int8)


def pack_ternary_mask(q: np.ndarray) -> dict[str, np.ndarray]:
    flat = q.reshape(-1)
    return {"nonzero": np.packbits(flat != 0), "negative": np.packbits(flat[flat != 0] < 0)}


def unpack_ternary_mask(nonzero: np.ndarray, negative: np.ndarray, n: int) -> np.ndarray:
    mask = np.unpackbits(nonzero)[:n].astype(bool)
    signs = np.unpackbits(negative)[:int(mask.sum())].astype(bool)
    q = np.zeros(n, dtype=np.int8)
    q[mask] = np.where(signs, -1, 1)
    return q


def lzma_size(arrays: list[np.ndarray], preset: int) -> int:
    raw = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return len(lzma.compress(raw, format=lzma.FORMAT_XZ, preset=preset | lzma.PRESET_EXTREME))


def coded_bytes(entries: list[dict], preset: int) -> int:
    """The bytes these entries' arrays take coded as the artifact codes them, on their own: the integer
    matrices rANS-coded (stream, states, and the lzma-compressed tables and classes), everything else lzma."""
    streams = rans_code_parts(entries)
    coded = {(i, part) for part, stream in streams.items() for i in stream["members"]}
    rest = [a for i, e in enumerate(entries) for k, a in e["parts"].items() if (i, k) not in coded]
    tables = [a for stream in streams.values() for k, a in stream["arrays"].items() if k not in ("states", "words")]
    words = sum(stream["arrays"][k].nbytes for stream in streams.values() for k in ("states", "words"))
    return lzma_size(rest + tables, preset) + words


def to_numpy_parts(parts: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """Stored dtypes: integers int8, scales fp16."""
    return {k: (v.to(torch.int8) if v.dtype == torch.float32 else v).cpu().numpy() for k, v in parts.items()}


def quantize_tensor(t: Tensor, scheme: str, sigmas: float, hessian: Tensor | None, preset: int,
                    factor: GPTQFactor | None = None, awq_cols: Tensor | None = None,
                    awq_bits: int = 8) -> tuple[str, dict[str, np.ndarray]]:
    """(stored scheme, parts) of one tensor; `sigmas` is the SDClip k of an integer scheme. Integer
    matrices use GPTQ when a Hessian is given (on the Hessian's device), with the columns awq_cols at awq_bits
    (stored scheme int<b>_row_awq<a>: parts q, q_awq, awq_cols); the ternary layout (ternary_base3
    or ternary_mask) is whichever compresses smaller."""
    if scheme == "fp16":
        return scheme, {"w": t.detach().cpu().half().numpy()}
    if scheme == "ternary":
        q, scale = quantize_ternary(t.detach().float().cpu())
        q = q.to(torch.int8).numpy()
        scale = scale.numpy()
        base3 = {"trits": pack_ternary_base3(q), "scale": scale}
        mask = {**pack_ternary_mask(q), "scale": scale}
        if lzma_size(list(base3.values()), preset) <= lzma_size(list(mask.values()), preset):
            return f"{scheme}_base3", base3
        return f"{scheme}_mask", mask
    bits = int(scheme[3])
    if hessian is not None:
        q, scale = gptq_quantize(t.to(hessian.device), hessian, bits, sigmas, factor, awq_cols, awq_bits)
    else:
        q, scale = quantize_rows(t, bits, sigmas)
    if hessian is None or awq_cols is None:
        return scheme, to_numpy_parts(dict(q=q, scale=scale))
    salient = torch.zeros(q.shape[1], dtype=torch.bool, device=q.device)
    salient[awq_cols.to(q.device)] = True
    parts = to_numpy_parts(dict(q=q[:, ~salient], q_awq=q[:, salient], scale=scale))
    return f"{scheme}_awq{awq_bits}", dict(parts, awq_cols=awq_cols.cpu().numpy().astype(np.int16))


def dequantize_parts(scheme: str, parts: dict[str, np.ndarray], shape: list[int]) -> Tensor:
    """Float32 tensor of `shape` from stored parts (the exact inverse of quantize_tensor's layout, plus
    the LQER correction when its parts are there)."""
    if scheme == "fp16":
        return torch.from_numpy(parts["w"].astype(np.float32)).reshape(shape)
    if scheme.startswith("ternary_"):
        n = int(np.prod(shape))
        if scheme.endswith("_base3"):
            q = unpack_ternary_base3(parts["trits"], n)
        else:
            q = unpack_ternary_mask(parts["nonzero"], parts["negative"], n)
        q = torch.from_numpy(q.astype(np.float32)).reshape(shape)
        return dequantize_ternary(q, torch.from_numpy(parts["scale"].astype(np.float16)))
    scale = torch.from_numpy(parts["scale"].astype(np.float16))
    if "awq_cols" in parts:            # int<b>_row_awq<a>: put the AWQ-lite columns back on their finer grid
        awq_cols = torch.from_numpy(parts["awq_cols"].astype(np.int64))
        q = torch.empty(shape, dtype=torch.float32)
        salient = torch.zeros(shape[1], dtype=torch.bool)
        salient[awq_cols] = True
        q[:, ~salient] = torch.from_numpy(parts["q"].astype(np.float32))
        q[:, salient] = torch.from_numpy(parts["q_awq"].astype(np.float32))
        mult, _ = column_grid(shape[1], int(scheme[3]), awq_cols, part_bits(scheme, "q_awq"))
        deq = dequantize_grid(q, scale, mult)
    else:
        deq = dequantize_rows(torch.from_numpy(parts["q"].astype(np.float32)), scale).reshape(shape)
    if "lqer_a" in parts:
        deq = deq + lqer_correction({k: v for k, v in parts.items() if k.startswith("lqer_")})
    return deq


STORED_SCHEMES = {"fp16", "ternary_base3", "ternary_mask", *(f"int{b}_row" for b in (5, 6, 7, 8)),
                  *(f"int{b}_row_awq{a}" for b in (5, 6, 7) for a in range(b + 1, 9))}


def part_bits(scheme: str, part: str) -> int:
    """Bits of the integers of `part` (q or q_awq) of a stored int<b>_row[_awq<a>] entry."""
    return int(scheme.rsplit("awq", 1)[1]) if part == "q_awq" else int(scheme[3])


def quantize_entry(name: str, t: Tensor, spec: QuantSpec, ternary: tuple[str, ...], hessian: Tensor | None,
                   preset: int, lqer_rank: int = 0, factor: GPTQFactor | None = None,
                   lqer_factors: str = "asym4", awq_cols: Tensor | None = None,
                   awq_bits: int = 8) -> tuple[dict, tuple | None]:
    """One tensor: ({name, scheme, shape, parts}, its LQER candidate (parts, error drop) or None when
    lqer_rank is 0 or the tensor is not an integer matrix). GPTQ on the Hessian's device when one is given,
    with the AWQ-lite columns awq_cols at awq_bits."""
    scheme = choose_scheme(name, t, spec, ternary)
    hessian = hessian if scheme.startswith("int") else None
    stored, parts = quantize_tensor(t, scheme, spec.sigmas_of(quant_group(name)), hessian, preset, factor,
                                    awq_cols, awq_bits)
    entry = dict(name=name, scheme=stored, shape=list(t.shape), parts=parts)
    if not lqer_rank or not stored.startswith("int"):
        return entry, None
    device = hessian.device if hessian is not None else t.device
    deq = dequantize_parts(stored, parts, list(t.shape)).to(device)
    lqer, drop = lqer_candidate(t.to(device).float(), deq, hessian, lqer_rank, lqer_factors)
    return entry, ({k: v.cpu() for k, v in lqer.items()}, drop)


def quantize_state_dict(state: dict[str, Tensor], spec: QuantSpec, ternary: tuple[str, ...] = (),
                        hessians: dict[str, Tensor] | None = None, preset: int = 6,
                        lqer_tensors: int = 0, lqer_rank: int = 4, lqer_factors: str = "asym4",
                        awq: dict[str, Tensor] | None = None, awq_bits: int = 8) -> list[dict]:
    """[{name, scheme, shape, parts: {part: ndarray}}] in state-dict order, in one process; `hessians`
    (by weight name) turns on GPTQ for the integer matrices that have one, `awq` (awq_select's) AWQ-lite. The
    export's distributed form is DistributedQuantizer; this one serves tests and tools."""
    done = [quantize_entry(n, t, spec, ternary, (hessians or {}).get(n), preset, lqer_rank if lqer_tensors else 0,
                           lqer_factors=lqer_factors, awq_cols=(awq or {}).get(n), awq_bits=awq_bits)
            for n, t in state.items()]
    return add_lqer([e for e, _ in done], lqer_tensors, {e["name"]: c for e, c in done if c})


def add_lqer(entries: list[dict], lqer_tensors: int, candidates: dict) -> list[dict]:
    """Give the lqer_tensors candidates with the largest (positive) error drop their LQER parts."""
    best = sorted((c for c in candidates.items() if c[1][1] > 0), key=lambda c: -c[1][1])[:lqer_tensors]
    chosen = {name: parts for name, (parts, _) in best}
    return [dict(e, parts={**e["parts"], **to_numpy_parts(chosen[e["name"]])}) if e["name"] in chosen else e
            for e in entries]


class DistributedQuantizer:
    """The export's quantization, on every rank: the integer matrices with Hessians (the expensive GPTQ)
    are dealt out to the ranks, largest first, each rank quantizing its own on its device and proposing
    their LQER corrections; rank 0 gathers the results and quantizes the rest (fp16 tensors, ternary,
    and integer tensors without a Hessian). GPTQ factors are kept between the budget fit's attempts."""

    def __init__(self, hp: Hyperparameters, rt: Runtime, state: dict[str, Tensor], hessians: dict[str, Tensor] | None):
        self.hp, self.rt, self.state, self.hessians = hp, rt, state, hessians or {}
        self.ternary = ternary_patterns(hp)
        spec = QuantSpec.from_settings(hp)
        gptq_names = [n for n, t in state.items() if n in self.hessians
                      and choose_scheme(n, t, spec, self.ternary).startswith("int")]
        gptq_names.sort(key=lambda n: -state[n].numel() * state[n].shape[1])          # cost ~ rows x cols^2
        self.mine = {n for i, n in enumerate(gptq_names) if i % rt.world_size == rt.rank}
        self.factors: dict[str, GPTQFactor] = {}
        chosen = on_main(rt, lambda: {n: c.tolist() for n, c in awq_select(
            state, {n: self.hessians[n] for n in gptq_names}, spec, self.ternary, hp.awq_groups, hp.awq_group_size,
            hp.awq_bits).items()}) if hp.awq_groups and gptq_names else {}
        self.awq = {n: torch.tensor(c) for n, c in chosen.items()}      # AWQ-lite's columns, the same on every rank

    def quantize(self, spec: QuantSpec) -> list[dict] | None:
        """Every rank calls this; rank 0 gets the entries in state-dict order, the others None."""
        hp, mine = self.hp, {}
        lqer_rank = hp.lqer_rank if hp.lqer_tensors else 0
        for name in sorted(self.mine):
            h = self.hessians[name].to(self.rt.device)
            if name not in self.factors:
                self.factors[name] = gptq_factor(h)
            mine[name] = quantize_entry(name, self.state[name], spec, self.ternary, h, hp.lzma_preset, lqer_rank,
                                        self.factors[name], hp.lqer_factors, self.awq.get(name), hp.awq_bits)
        done = {}
        for share in gather_to_main(self.rt, mine):
            done.update(share)
        if not self.rt.is_main:
            return None
        results = [done.get(n) or quantize_entry(n, t, spec, self.ternary, None, hp.lzma_preset, lqer_rank,
                                                 lqer_factors=hp.lqer_factors)
                   for n, t in self.state.items()]
        return add_lqer([e for e, _ in results], hp.lqer_tensors, {e["name"]: c for e, c in results if c})


# --- entropy coding of the integer matrices -----------------------------------------------------------
# lzma codes the integers about 2% above their entropy; an rANS coder with static tables codes them at it.
# Each integer matrix's symbols (q + qmax) are coded under a context: its family (the tensor's name without
# the layer index: blocks.*.mlp.fc.weight ...) x the class of its column x the class of its row, classes by
# quantiles of the mean |q| of the column (row) within the tensor (column and row scales differ in trained
# weights; one table per context turns that into bits). The classes are stored per tensor (one byte per row
# and column), the tables per context. RANS_LANES interleaved states are coded in lock step, one numpy
# operation per step for all of them, so a 16 MB artifact decodes in seconds.
# rANS: J. Duda, "Asymmetric numeral systems" (2013); interleaving after F. Giesen's ryg_rans (2014).

RANS_PROB_BITS = 16          # frequencies sum to 2^16 in every context
RANS_LOW = 1 << 16           # states live in [2^16, 2^32); renormalization moves 16 bits at a time
RANS_STEPS = 2048            # lanes = symbols / RANS_STEPS, within [RANS_MIN_LANES, RANS_MAX_LANES]: the state
RANS_MIN_LANES = 32          #   overhead (4 bytes a lane) stays under ~0.2% and decoding takes a few thousand
RANS_MAX_LANES = 8192        #   numpy steps whatever the size
CODER_COL_CLASSES = 4        # column classes per tensor ... (1 row x 4 columns coded smallest of those measured,
CODER_ROW_CLASSES = 1        # ... and row classes     1x1, 1x4, 2x4, 4x4, 2x8: docs/compression.md)


def rans_frequencies(counts: np.ndarray) -> np.ndarray:
    """Per row of counts (contexts x symbols): integer frequencies summing to 2^RANS_PROB_BITS, at least 1
    for every symbol that occurs, 0 for the others (a context with no symbols gets all zeros); each below
    2^16, so they store as uint16."""
    total = 1 << RANS_PROB_BITS
    freqs = np.zeros(counts.shape, dtype=np.int64)
    for i, c in enumerate(counts.astype(np.int64)):
        if c.sum() == 0:
            continue
        f = np.where(c > 0, np.maximum(1, np.round(c * (total / c.sum()))), 0).astype(np.int64)
        order = np.argsort(-c, kind="stable")
        while f.sum() != total:          # put the rounding's remainder on the most frequent symbols
            step = np.sign(total - f.sum())
            for k in order[:abs(total - int(f.sum()))]:
                if f[k] + step >= 1:
                    f[k] += step
        if f.max() == total:             # one symbol: leave room for a neighbour so every frequency fits 16 bits
            f[np.argmax(f)] -= 1
            f[(np.argmax(f) + 1) % f.size] += 1
        freqs[i] = f
    return freqs


def rans_lanes(n: int) -> int:
    return int(min(RANS_MAX_LANES, max(RANS_MIN_LANES, n // RANS_STEPS)))


def rans_encode(symbols: np.ndarray, contexts: np.ndarray, freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Code symbols[i] under the table freqs[contexts[i]]: (final lane states uint32, 16-bit words uint16).
    Symbol i goes to lane i % lanes; the last step is padded with certain (cost-free) symbols."""
    n, lanes = symbols.size, rans_lanes(symbols.size)
    steps, total = -(-n // lanes), 1 << RANS_PROB_BITS
    cum = np.cumsum(freqs, axis=1) - freqs
    if np.any(freqs[contexts, symbols] == 0):
        raise ValueError("rans_encode: a symbol has frequency 0 in its context")
    pad = steps * lanes - n
    f = np.concatenate([freqs[contexts, symbols], np.full(pad, total)]).astype(np.uint64).reshape(steps, lanes)
    c = np.concatenate([cum[contexts, symbols], np.zeros(pad, np.int64)]).astype(np.uint64).reshape(steps, lanes)
    x = np.full(lanes, RANS_LOW, dtype=np.uint64)
    bits, low16, out = np.uint64(RANS_PROB_BITS), np.uint64(0xFFFF), []
    for t in range(steps - 1, -1, -1):                    # rANS codes backwards; the decoder reads forwards
        full = x >= (f[t] << np.uint64(32 - RANS_PROB_BITS))
        out.append((x[full] & low16).astype(np.uint16))
        x[full] >>= np.uint64(16)
        x = ((x // f[t]) << bits) + x % f[t] + c[t]
    words = np.concatenate(out[::-1]) if out else np.zeros(0, dtype=np.uint16)
    return x.astype(np.uint32), words


def rans_decode(states: np.ndarray, words: np.ndarray, contexts: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """The symbols rans_encode coded (int64, len(contexts) of them). Raises ValueError when the stream is
    not what rans_encode wrote for these tables: words left over or missing, or final states off RANS_LOW."""
    n, lanes = contexts.size, states.size
    if lanes != rans_lanes(n):
        raise ValueError(f"rans_decode: {lanes} lane states for {n} symbols (expected {rans_lanes(n)})")
    steps, total = -(-n // lanes), 1 << RANS_PROB_BITS
    cum = np.cumsum(freqs, axis=1) - freqs
    lookup = np.zeros((len(freqs), total), dtype=np.int16)          # slot -> symbol, per context
    for i, f in enumerate(freqs):
        if f.sum():
            lookup[i] = np.repeat(np.arange(f.size), f)
    pad = steps * lanes - n
    ctx = np.concatenate([contexts, np.zeros(pad, dtype=contexts.dtype)]).reshape(steps, lanes)
    real = np.concatenate([np.ones(n, dtype=bool), np.zeros(pad, dtype=bool)]).reshape(steps, lanes)
    x, w, pos = states.astype(np.int64), words.astype(np.int64), 0
    out = np.empty((steps, lanes), dtype=np.int64)
    for t in range(steps):
        slot = x & (total - 1)
        s = lookup[ctx[t], slot].astype(np.int64)
        x = np.where(real[t], freqs[ctx[t], s] * (x >> RANS_PROB_BITS) + slot - cum[ctx[t], s], x)
        low = np.flatnonzero(x < RANS_LOW)
        if pos + low.size > w.size:
            raise ValueError("rans_decode: the stream ends early")
        x[low] = (x[low] << 16) | w[pos:pos + low.size]
        pos += low.size
        out[t] = s
    if pos != w.size or np.any(x != RANS_LOW):
        raise ValueError("rans_decode: corrupt stream (the states do not return to their start)")
    return out.reshape(-1)[:n]


def coding_family(name: str) -> str:
    """The family whose tables code a tensor's integers: its name with layer indices as '*'."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def rank_classes(values: np.ndarray, classes: int) -> np.ndarray:
    """Equal-count classes 0 .. classes-1 of `values` by rank (ties by position), uint8."""
    rank = np.empty(values.size, dtype=np.int64)
    rank[np.argsort(values, kind="stable")] = np.arange(values.size)
    return (rank * classes // max(values.size, 1)).astype(np.uint8)


def coding_classes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row classes, column classes) of an integer matrix: ranks of the rows' (columns') mean |q|."""
    a = np.abs(q.astype(np.int16))
    return rank_classes(a.mean(axis=1), CODER_ROW_CLASSES), rank_classes(a.mean(axis=0), CODER_COL_CLASSES)


def coding_contexts(family: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The context of every integer of a matrix, row-major (int32)."""
    per_family = CODER_ROW_CLASSES * CODER_COL_CLASSES
    return (family * per_family + rows.astype(np.int32)[:, None] * CODER_COL_CLASSES + cols.astype(np.int32)[None, :]).reshape(-1)


def rans_code_matrices(qs: list[np.ndarray], families: list[int], n_families: int, offset: int) -> dict[str, np.ndarray]:
    """Entropy-code integer matrices (see the section comment): their classes, the context tables and the rANS
    stream, as arrays: rows_i / cols_i (uint8 classes of matrix i), freqs (contexts x symbols,
    uint16), states (uint32) and words (uint16)."""
    classes = [coding_classes(q) for q in qs]
    contexts = np.concatenate([coding_contexts(f, r, c) for f, (r, c) in zip(families, classes)])
    symbols = np.concatenate([q.reshape(-1).astype(np.int64) + offset for q in qs])
    counts = np.zeros((n_families * CODER_ROW_CLASSES * CODER_COL_CLASSES, 2 * offset + 1), dtype=np.int64)
    np.add.at(counts, (contexts, symbols), 1)
    freqs = rans_frequencies(counts)
    states, words = rans_encode(symbols, contexts, freqs)
    out = {f"rows_{i}": r for i, (r, _) in enumerate(classes)} | {f"cols_{i}": c for i, (_, c) in enumerate(classes)}
    return out | dict(freqs=freqs.astype(np.uint16), states=states, words=words)


def rans_decode_matrices(coded: dict[str, np.ndarray], shapes: list[list[int]], families: list[int],
                         offset: int) -> list[np.ndarray]:
    """The int8 matrices rans_code_matrices coded (ValueError when the stream is corrupt)."""
    freqs = coded["freqs"].astype(np.int64)
    contexts = np.concatenate([coding_contexts(f, coded[f"rows_{i}"], coded[f"cols_{i}"]) for i, f in enumerate(families)])
    if contexts.size and (contexts.max() >= len(freqs) or np.any(freqs.sum(axis=1)[np.unique(contexts)] != 1 << RANS_PROB_BITS)):
        raise ValueError("rANS tables do not cover the coded contexts")
    symbols = rans_decode(coded["states"], coded["words"], contexts, freqs)
    out, pos = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append((symbols[pos:pos + n] - offset).astype(np.int8).reshape(shape))
        pos += n
    return out


PART_ORDER = ("q", "q_awq", "lqer_a", "lqer_b", "trits", "nonzero", "negative", "awq_cols", "scale", "lqer_a_scale",
              "lqer_b_scale", "w")
INT_CODERS = ("rans", "lzma")     # how the integer matrices are stored: rANS-coded (the default) or in the lzma stream
RANS_PARTS = {"q": "rans", "q_awq": "rans_awq"}   # integer parts rANS-coded, each kind its own stream: header key


def rans_code_parts(entries: list[dict]) -> dict[str, dict]:
    """The integer parts (RANS_PARTS) of the int*_row entries rANS-coded, one stream per part kind, its tables per
    family (coding_family): {part: {members: entry indices, families: names, offset: the largest integer, arrays:
    rans_code_matrices'}}; kinds no entry has are left out."""
    streams = {}
    for part in RANS_PARTS:
        members = [i for i, e in enumerate(entries) if e["scheme"].startswith("int") and part in e["parts"]]
        if not members:
            continue
        names = list(dict.fromkeys(coding_family(entries[i]["name"]) for i in members))
        offset = max(2 ** (part_bits(entries[i]["scheme"], part) - 1) - 1 for i in members)
        arrays = rans_code_matrices([entries[i]["parts"][part] for i in members],
                                    [names.index(coding_family(entries[i]["name"])) for i in members], len(names), offset)
        streams[part] = dict(members=members, families=names, offset=offset, arrays=arrays)
    return streams


def pack_artifact(entries: list[dict], preset: int, config: dict, coder: str = "rans") -> bytes:
    """Serialize quantized entries and the model-shape settings (ARCH_SETTINGS) to the compressed
    artifact (see the section comment), one xz stream. The payload holds the parts grouped by kind
    (PART_ORDER: every tensor's integers, then every scale, then the fp16 tensors), which lzma compresses
    best of the layouts measured (docs/quantization.md, "Byte layout"). With coder "rans" the integer matrices ("q"
    and "q_awq" of the int*_row entries) are entropy-coded instead (rans_code_parts): their arrays go in the payload
    under the stream's key in the header (RANS_PARTS), the entries' parts are marked coded. Deterministic."""
    if coder not in INT_CODERS:
        raise ValueError(f"coder {coder!r} is not one of {INT_CODERS}")
    streams = rans_code_parts(entries) if coder == "rans" else {}
    coded = {(i, part) for part, stream in streams.items() for i in stream["members"]}
    header, payload, offset_bytes = [], io.BytesIO(), 0

    def place(arr: np.ndarray) -> list:
        nonlocal offset_bytes
        raw = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        payload.write(raw)
        offset_bytes += len(raw)
        return [arr.dtype.newbyteorder("<").str, list(arr.shape), offset_bytes - len(raw), len(raw)]

    parts_of = [{} for _ in entries]
    for kind in PART_ORDER:
        for i, (e, placed) in enumerate(zip(entries, parts_of)):
            if kind in e["parts"]:
                placed[kind] = "rans" if (i, kind) in coded else place(e["parts"][kind])
    coded_streams = {RANS_PARTS[part]: dict(families=stream["families"], offset=stream["offset"],
                                            arrays={k: place(a) for k, a in stream["arrays"].items()})
                     for part, stream in streams.items()}
    for e, placed in zip(entries, parts_of):
        if set(placed) != set(e["parts"]):
            raise ValueError(f"{e['name']}: parts {sorted(set(e['parts']) - set(placed))} have no place in PART_ORDER")
        header.append(dict(name=e["name"], scheme=e["scheme"], shape=e["shape"], parts=placed))
    head = json.dumps(dict(config=config, tensors=header, **coded_streams), separators=(",", ":")).encode()
    blob = ARTIFACT_MAGIC + len(head).to_bytes(8, "little") + head + payload.getvalue()
    return lzma.compress(blob, format=lzma.FORMAT_XZ, preset=preset | lzma.PRESET_EXTREME)


def coded_shape(tensor: dict, part: str) -> list[int]:
    """Shape of an rANS-coded part of a header's tensor: the matrix less (q) or only (q_awq) its AWQ-lite columns."""
    rows, cols = tensor["shape"]
    awq = tensor["parts"].get("awq_cols")
    n_awq = int(np.prod(awq[1])) if isinstance(awq, list) else 0
    return [rows, n_awq if part == "q_awq" else cols - n_awq]


def unpack_artifact(data: bytes, source: str) -> tuple[dict[str, Tensor], dict]:
    """Decompress, decode and dequantize an artifact: (float32 state dict, model-shape settings)."""
    try:
        blob = lzma.decompress(data)
    except lzma.LZMAError as e:
        raise PipelineError(f"{source}: not an lzma artifact ({e})") from None
    if not blob.startswith(ARTIFACT_MAGIC):
        raise PipelineError(f"{source}: bad artifact magic")
    try:
        pos = len(ARTIFACT_MAGIC)
        head_len = int.from_bytes(blob[pos:pos + 8], "little")
        body = pos + 8 + head_len
        state, header = {}, json.loads(blob[pos + 8:body])
        config = header["config"]

        def array(dt, shape, off, _):
            return np.frombuffer(blob, dtype=np.dtype(dt), count=int(np.prod(shape)), offset=body + off).reshape(shape)

        parts_of = [{part: (placed if placed == "rans" else array(*placed)) for part, placed in e["parts"].items()}
                    for e in header["tensors"]]
        for part, key in RANS_PARTS.items():
            coded = [i for i, parts in enumerate(parts_of) if isinstance(parts.get(part), str)]
            if not coded:
                continue
            rans = header[key]
            families = [rans["families"].index(coding_family(header["tensors"][i]["name"])) for i in coded]
            arrays = {k: array(*placed) for k, placed in rans["arrays"].items()}
            shapes = [coded_shape(header["tensors"][i], part) for i in coded]
            for i, q in zip(coded, rans_decode_matrices(arrays, shapes, families, rans["offset"])):
                parts_of[i][part] = q
        for e, parts in zip(header["tensors"], parts_of):
            if e["scheme"] not in STORED_SCHEMES:
                raise PipelineError(f"{source}: tensor {e['name']} has unknown scheme {e['scheme']!r}")
            state[e["name"]] = dequantize_parts(e["scheme"], parts, e["shape"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise PipelineError(f"{source}: malformed artifact ({type(e).__name__}: {e})") from None
    return state, config


def state_checksum(state: dict[str, Tensor]) -> str:
    """sha256 over the names and float32 bytes of a state dict (same on every rank iff same weights)."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# --- the byte budget: planner and fit ---------------------------------------------------------------

PLANNER_SAMPLE_VALUES = 262_144     # size of the Gaussian sample each scheme's bits per parameter is measured on


@functools.lru_cache(maxsize=None)
def sampled_bits_per_param(scheme: str, shape: tuple[int, ...], sigmas: float, preset: int) -> float:
    """Bits per parameter of `scheme` (SDClip k = sigmas for integers) as the artifact codes it (coded_bytes),
    measured on a seeded Gaussian matrix with the tensor's row length, at most PLANNER_SAMPLE_VALUES values."""
    cols = shape[-1] if len(shape) == 2 else 1024
    rows = max(1, min(shape[0] if len(shape) == 2 else 256, PLANNER_SAMPLE_VALUES // cols))
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    stored, parts = quantize_tensor(w, scheme, sigmas, None, preset)
    return 8 * coded_bytes([dict(name="sample.weight", scheme=stored, parts=parts)], preset) / w.numel()


def plan_artifact(hp: Hyperparameters, spec: QuantSpec) -> list[dict]:
    """Predicted artifact bytes per (weight_group, scheme) for the configured shape at `spec`, before
    training: params x sampled_bits_per_param / 8. Builds the model on the meta device (no memory)."""
    with torch.device("meta"):
        state = GPT(hp).state_dict()
    groups: dict[tuple[str, str], list[float]] = {}
    for name, t in state.items():
        scheme = choose_scheme(name, t, spec, ternary_patterns(hp))
        sigmas = spec.sigmas_of(quant_group(name)) if scheme.startswith("int") else 0.0
        g = groups.setdefault((weight_group(name), scheme), [0, 0.0, 0.0])
        g[0] += t.numel()
        g[1] += t.numel() * sampled_bits_per_param(scheme, tuple(t.shape), round(sigmas, 6), hp.lzma_preset) / 8
        g[2] += t.numel() if scheme.startswith("int") else 0
    return [dict(name=group, scheme=scheme, params=params, bits_per_param=8 * nbytes / max(params, 1),
                 bytes=round(nbytes), sdclip_params=int(sd)) for (group, scheme), (params, nbytes, sd) in groups.items()]


def next_factor(points: list[tuple[float, int]], target: float, sdclip_params: int) -> float:
    """The factor on the settings' SDClip k expected to bring code + model to `target` bytes, from the (factor,
    total bytes) points measured so far: interpolated in log k between the nearest points on either side of the
    target when there are such, else extrapolated from the last point along the secant through the last two
    (when it falls) or along the -log2 k rule (each doubling of k saves one bit per weight of the sdclip_params:
    H(q) ~ b - log2 k + c). Kept within [FIT_MIN_SCALE, FIT_MAX_SCALE]."""
    over = [p for p in points if p[1] > target]
    under = [p for p in points if p[1] <= target]
    if over and under:
        (f0, b0), (f1, b1) = min(over, key=lambda p: p[1]), max(under, key=lambda p: p[1])
        log_f = math.log2(f0) + (math.log2(f1) - math.log2(f0)) * (b0 - target) / (b0 - b1)
    else:
        f0, b0 = points[-1]
        slope = -max(sdclip_params, 1) / 8.0                  # bytes per doubling of k
        if len(points) > 1 and points[-2][0] != f0:
            secant = (b0 - points[-2][1]) / math.log2(f0 / points[-2][0])
            slope = secant if secant < 0 else slope
        log_f = math.log2(f0) + (target - b0) / slope
    return min(FIT_MAX_SCALE, max(FIT_MIN_SCALE, 2.0 ** log_f))


def fit_target(budget: int) -> tuple[float, float]:
    """(lowest total the fit is content with, total it aims at): FIT_WINDOW under the budget, and its middle."""
    return budget * (1 - FIT_WINDOW), budget * (1 - FIT_WINDOW / 2)


@dataclass
class BudgetPlan:
    spec: QuantSpec          # the spec training's late QAT and the export start from
    factor: float            # the common factor on every k (1: the settings fit)
    predicted_bytes: int     # model bytes predicted at `spec`
    groups: list[dict]       # the planner's table at `spec`
    floor_bytes: int         # model bytes predicted at the coarsest setting the fit can reach
    sdclip_params: int       # parameters quantized on an SDClip grid (those a factor on k shrinks)


PLANNER_TOLERANCE = 0.1      # the planner's stated error: within 10% on Gaussian and trained CPU weights (tests, docs/quantization.md)


def plan_budget(hp: Hyperparameters, log: RunLog) -> BudgetPlan:
    """Before training: the bytes the artifact will take, the factor on the settings' k that lands code + model
    in the budget fit's window (next_factor on the predictions: finer when the settings leave room, coarser when
    they are over), and whether the run can fit at all. Refuses (PipelineError) when the code alone is over the
    budget, or the coarsest setting the fit can reach is predicted over it by more than the planner's
    tolerance."""
    bytes_code = code_bytes()
    budget = hp.artifact_budget_bytes
    if bytes_code >= budget:
        raise PipelineError(f"train_gpt.py alone is {bytes_code} bytes, over ARTIFACT_BUDGET_BYTES={budget}")
    lowest_total, target = fit_target(budget)
    tables, factor = {}, 1.0
    for _ in range(FIT_ATTEMPTS):          # the -log2 k rule bends at the ends: a few rounds
        tables[factor] = plan_artifact(hp, QuantSpec.from_settings(hp, factor))
        total = sum(g["bytes"] for g in tables[factor]) + bytes_code
        if lowest_total <= total <= budget:
            break
        points = [(f, sum(g["bytes"] for g in t) + bytes_code) for f, t in tables.items()]
        factor = next_factor(points, target, sum(g["sdclip_params"] for g in tables[1.0]))
        if factor in tables:
            break
    fitting = [f for f, t in tables.items() if sum(g["bytes"] for g in t) + bytes_code <= budget]
    factor = min(fitting) if fitting else max(tables)          # the finest that fits, else the coarsest tried
    spec, table = QuantSpec.from_settings(hp, factor), tables[factor]
    predicted = sum(g["bytes"] for g in table)
    sdclip = sum(g["sdclip_params"] for g in table)
    lowest = precision_ladder(QuantSpec.from_settings(hp))[-1].coarser(FIT_MAX_SCALE)
    floor = sum(g["bytes"] for g in plan_artifact(hp, lowest))
    for g in table:
        log(f"plan: {g['name']} {g['scheme']} params:{g['params']} bits/param:{g['bits_per_param']:.3f} bytes:{g['bytes']}")
    total = predicted + bytes_code
    verdict = "fits" if total <= budget else f"over by {total - budget} bytes"
    log(f"plan: {spec.describe()} (k x {factor:.3f} of the settings): predicted model {predicted} + code {bytes_code} "
        f"= {total} bytes of {budget}: {verdict}")
    if (floor + bytes_code) * (1 - PLANNER_TOLERANCE) > budget:
        raise PipelineError(f"ARTIFACT_BUDGET_BYTES={budget} cannot be met: even the coarsest quantization the budget "
                            f"fit reaches ({lowest.describe()}) is predicted at {floor} model bytes + {bytes_code} code "
                            f"= {floor + bytes_code} bytes, more than the planner's {PLANNER_TOLERANCE:.0%} error above "
                            f"the budget; shrink the model or raise the budget")
    return BudgetPlan(spec, factor, predicted, table, floor, sdclip)


def fit_budget(hp: Hyperparameters, rt: Runtime, quantizer: DistributedQuantizer, plan: BudgetPlan, config: dict,
               log: RunLog, stages: "StageTimes") -> tuple[bytes | None, list[dict] | None, QuantSpec, list[str]]:
    """Quantize and pack until code + model land within FIT_WINDOW under ARTIFACT_BUDGET_BYTES: from the planned
    factor on the settings' k, each attempt moves every k by next_factor on the attempts so far (finer when under,
    coarser when over, within [FIT_MIN_SCALE, FIT_MAX_SCALE]); after FIT_ATTEMPTS, or once k cannot move, it keeps
    the fullest artifact that fitted, or, if none did, tries the next rung of precision_ladder. Every rank takes
    part (GPTQ is split over them); rank 0 packs and decides. Returns (blob, entries, spec, attempts), blob and
    entries on rank 0 only; raises PipelineError on every rank, writing nothing, when nothing fits."""
    bytes_code = code_bytes()
    budget, tried, best = hp.artifact_budget_bytes, [], {}
    lowest_total, target = fit_target(budget)

    def decide(entries: list[dict], spec: QuantSpec, factor: float, points: list[tuple[float, int]]):
        """Rank 0: pack; "done", "next rung", or the factor on the settings' k of the next attempt."""
        with stages("pack"):
            blob = pack_artifact(entries, hp.lzma_preset, dict(config, quant_bits=dict(spec.bits),
                                                               quant_sigmas=dict(spec.sigmas)))
        total = bytes_code + len(blob)
        tried.append(f"{len(blob)} at {spec.describe()}")
        points.append((factor, total))
        log(f"Serialized model {spec.describe()} +lzma: {len(blob)} bytes; code {bytes_code} bytes; "
            f"Total submission size: {total} bytes (budget {budget})")
        if total <= budget and len(blob) > len(best.get("blob", b"")):
            best.update(blob=blob, entries=entries, spec=spec)
        if lowest_total <= total <= budget:
            return "done"
        following = next_factor(points, target, plan.sdclip_params)
        if any(abs(following - f) < 1e-6 for f, _ in points):        # k cannot move further
            return "done" if best else "next rung"
        log(f"budget_fit: {'over' if total > budget else 'under'} by {abs(total - budget)} bytes; k x "
            f"{following:.4f} of the settings")
        return following

    for rung in precision_ladder(plan.spec):
        bits = dict(rung.bits)
        factor = plan.factor if rung == plan.spec else 1.0
        spec = QuantSpec.from_settings(hp, factor).with_bits(**bits)     # == plan.spec on the first rung: QAT's grid
        points: list[tuple[float, int]] = []
        for _ in range(FIT_ATTEMPTS):
            with stages("gptq"):
                entries = quantizer.quantize(spec)
            decision = on_main(rt, lambda: decide(entries, spec, factor, points))
            if decision in ("done", "next rung"):
                break
            spec, factor = QuantSpec.from_settings(hp, decision).with_bits(**bits), decision
        if on_main(rt, lambda: bool(best)):
            fitted = on_main(rt, lambda: best["spec"])
            return best.get("blob"), best.get("entries"), fitted, tried
    raise PipelineError(f"artifact over budget: code {bytes_code} + model > ARTIFACT_BUDGET_BYTES={budget} bytes at "
                        f"every setting tried (model bytes: {'; '.join(on_main(rt, lambda: tried))})")


# -----------------------------------------------------------------------------
# PIPELINE
# run_pipeline() reads as the pipeline, one call per stage. Rank 0 alone writes files; every rank
# takes part in calibration and GPTQ, loads the written artifact back and scores it. Evaluation time
# runs from the artifact's load to the final score, every pass in between counted.
# -----------------------------------------------------------------------------

class StageTimes:
    """Wall time of each stage of the run in ms (summary `stage_ms`), the device synchronised at both
    ends of a stage so its work is counted in it. A stage entered twice adds up."""

    def __init__(self, rt: Runtime):
        self.rt, self.ms = rt, {}

    def sync(self) -> None:
        if self.rt.device.type == "cuda":  # CUDA-only
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.ms[name] = self.ms.get(name, 0.0) + 1e3 * (time.perf_counter() - start)


def environment_report(rt: Runtime) -> list[str]:
    """Versions and hardware, for the head of the log."""
    lines = [f"python:{platform.python_version()} torch:{torch.__version__} numpy:{np.__version__} "
             f"cuda:{torch.version.cuda} platform:{platform.platform()}",
             f"world_size:{rt.world_size} device:{rt.device.type} "
             f"compute_dtype:{rt.autocast_dtype or torch.float32} attention:{attention_backend(rt.device, rt.autocast_dtype)}"]
    if rt.device.type == "cuda":  # CUDA-only
        lines.append(f"gpu:{torch.cuda.get_device_name(rt.device)} x{rt.world_size}")
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
            lines.append(smi)
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        lines.append(f"cpu:{platform.processor() or platform.machine()} threads:{torch.get_num_threads()}")
    return lines


def log_eval(log: RunLog, label: str, r: EvalResult) -> None:
    log(f"{label} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} eval_time:{r.eval_time_ms:.0f}ms "
        f"val_tokens:{r.val_tokens} val_bytes:{r.val_bytes} tok/s:{r.val_tokens / max(r.eval_time_ms, 1e-9) * 1e3:.0f}")


def scheme_label(bits: dict, ternary: str) -> str:
    """final_<label>_roundtrip: e.g. int6_emb7_lzma, int6_mlp5_emb7_lzma, int6_emb7_ternary_lzma."""
    label = f"int{bits['attn']}" + (f"_mlp{bits['mlp']}" if bits["mlp"] != bits["attn"] else "") + f"_emb{bits['embed']}"
    return label + ("_ternary_lzma" if ternary else "_lzma")


def scheme_family(scheme: str) -> str:
    """A stored layout's scheme (ternary_base3 -> ternary, int6_row_awq8 -> int6_row); other schemes unchanged."""
    return scheme.rsplit("_", 1)[0] if scheme.endswith(("_base3", "_mask")) or "_awq" in scheme else scheme


def group_bytes(entries: list[dict], preset: int) -> list[dict]:
    """Per (weight_group, scheme) of the exported entries: params and the bytes of their arrays
    coded on their own (coded_bytes: rANS for the integer matrices, lzma at the artifact's preset). The groups' bytes add up to about the
    artifact's, which compresses them in one stream with the header."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for e in entries:
        groups.setdefault((weight_group(e["name"]), scheme_family(e["scheme"])), []).append(e)
    return [dict(name=g, scheme=scheme, params=sum(int(np.prod(e["shape"])) for e in members),
                 bytes=coded_bytes(members, preset))
            for (g, scheme), members in groups.items()]


@dataclass
class ArtifactResult:
    """The artifact a run scores: written by export_artifact, or given to a re-score (EVAL_ONLY)."""
    path: str
    sha256: str
    bytes_model: int                 # the compressed model file
    bytes_code: int                  # the shipped train_gpt.py (code_bytes)
    quant: dict | None               # how it was quantized and fitted (None for a re-score: not known here)


def export_artifact(hp: Hyperparameters, rt: Runtime, model: GPT, path: str, plan: BudgetPlan,
                    hessians: dict[str, Tensor] | None, log: RunLog, stages: StageTimes) -> ArtifactResult:
    """Quantize (every rank), fit the budget, write the artifact (rank 0; never over an existing file).
    Returns what was written, with its `quant` record, on every rank."""
    config = {name: getattr(hp, name.lower()) for name in ARCH_SETTINGS}
    config.update(recurrence_on=model.recurrence_on, ternary_patterns=hp.ternary_patterns)
    quantizer = DistributedQuantizer(hp, rt, model.state_dict(), hessians)
    blob, entries, spec, tried = fit_budget(hp, rt, quantizer, plan, config, log, stages)

    def write() -> ArtifactResult:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            with open(path, "xb") as f:
                f.write(blob)
        except FileExistsError:
            raise PipelineError(f"{path} already exists; choose another RUN_ID") from None
        bytes_code = code_bytes()
        n_params = sum(int(np.prod(e["shape"])) for e in entries)
        with stages("report"):
            groups = group_bytes(entries, hp.lzma_preset)
        predicted = {(g["name"], g["scheme"]): g["bytes"] for g in plan.groups}
        for g in groups:
            g["predicted_bytes"] = predicted.get((g["name"], g["scheme"]))
            log(f"plan_vs_actual: {g['name']} {g['scheme']} predicted:{g['predicted_bytes']} actual:{g['bytes']} "
                f"bits/param:{8 * g['bytes'] / g['params']:.3f} (compressed alone)")
        log(f"plan_vs_actual: model predicted:{plan.predicted_bytes} (k x {plan.factor:.4f}) actual:{len(blob)} "
            f"(k x {spec.sigmas_of('mlp') / hp.quant_clip_sigmas_mlp:.4f}) ratio:{len(blob) / max(plan.predicted_bytes, 1):.3f}"
            + ("" if len(tried) == 1 else f"; the first attempt, at the planned k: {tried[0]}"))
        lqer = [e["name"] for e in entries if "lqer_a" in e["parts"]]
        quant = dict(groups=groups, bits_per_param=8 * len(blob) / max(n_params, 1), bits=dict(spec.bits),
                     sigmas=dict(spec.sigmas), fit_factor=spec.sigmas_of("mlp") / hp.quant_clip_sigmas_mlp,
                     planned_fit_factor=plan.factor, attempts=len(tried), lqer_tensors=lqer,
                     predicted_bytes_model=plan.predicted_bytes)
        return ArtifactResult(path=path, sha256=hashlib.sha256(blob).hexdigest(), bytes_model=len(blob),
                              bytes_code=bytes_code, quant=quant)

    return on_main(rt, write)


def read_artifact(path: str) -> tuple[bytes, dict[str, Tensor], dict]:
    """(file bytes, float32 state dict, model-shape settings) of an artifact on disk."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PipelineError(f"{path}: cannot read ({e.strerror})") from None
    return (data, *unpack_artifact(data, path))


def settings_for_artifact(hp: Hyperparameters, path: str) -> Hyperparameters:
    """EVAL_ONLY: take the model shape from the artifact; a conflicting explicit setting is an error."""
    _, _, config = read_artifact(path)
    config = {name: value for name, value in config.items() if name in SETTINGS}
    for name, value in config.items():
        if name in hp.explicit and hp.values[name] != value:
            raise PipelineError(f"{name}={hp.values[name]} conflicts with {path}, which was trained with {name}={value}")
    hp = hp.replace(**config)
    validate_settings(hp)        # e.g. TTT_LAST_N against the artifact's NUM_LAYERS
    return hp


@dataclass
class LoadEvidence:
    """What each rank loaded from the artifact on disk, in rank order, and the scheme it was stored with."""
    sha256_per_rank: list[str]
    state_sha256_per_rank: list[str]
    probe_nll_per_rank: list[float]  # mean NLL (nats) of one probe sequence, each rank alone
    quant_bits: dict | None
    quant_ternary: str


def load_artifact_everywhere(rt: Runtime, model: GPT, path: str, probe: np.ndarray) -> LoadEvidence:
    """Every rank reads the artifact from disk and loads it into its own model.

    Returns per-rank evidence that each rank holds the same weights: file sha256, state checksum
    and the mean NLL of a probe sequence computed by that rank alone.
    """
    data, state, config = read_artifact(path)
    model.recurrence_on = bool(config.get("recurrence_on", False))
    set_qat(model, None, ())     # the loaded weights are the quantized values: never re-quantize them
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise PipelineError(f"{path} does not fit the configured model: {e}") from None
    seq = torch.from_numpy(probe).to(rt.device)[None]
    with torch.no_grad(), autocast(rt):
        probe_nll = model(seq[:, :-1], seq[:, 1:], varlen_capacity(1, seq.size(1) - 1, count_segments(probe[None, :-1]))
                          ).double().mean().item()
    evidence = dict(sha256=hashlib.sha256(data).hexdigest(), state=state_checksum(model.state_dict()), probe_nll=probe_nll)
    per_rank = gather(rt, evidence)
    if len({(e["sha256"], e["state"]) for e in per_rank}) != 1:
        raise PipelineError(f"ranks loaded different weights from {path}: {per_rank}")
    return LoadEvidence(sha256_per_rank=[e["sha256"] for e in per_rank], state_sha256_per_rank=[e["state"] for e in per_rank],
                        probe_nll_per_rank=[e["probe_nll"] for e in per_rank], quant_bits=config.get("quant_bits"),
                        quant_ternary=config.get("ternary_patterns", ""))


def eval_projection(hp: Hyperparameters, tokens: np.ndarray, split_tokens: int, window: int, stride: int
                    ) -> dict[str, float]:
    """Projected 8xH100 seconds of each part of the evaluation of the full split (split_tokens), from this stream's
    documents scaled up by split_tokens / tokens.size. Rates from the records' logs (the constants' comments,
    docs/evaluation.md): scoring passes at EVAL_FORWARD_MFU, a third of the training FLOPs per token; LoRA TTT
    as the busiest rank's batches (lora_batches, per phase segment; from a part of the split, its work over the
    ranks) at LORA_STEP_S a step plus their tokens at LORA_TTT_MFU of 2/3 of the training FLOPs; global phases and
    whole-model TTT forward + backward at TTT_ASSUMED_MFU; the audit (ForwardAudit, every rank alike: C2's whole
    vocabulary at the window's length once for each forward that scores; its ~10 forwards per audited batch left
    out); EVAL_LOAD_ASSUMED_S and EVAL_COMPILE_ASSUMED_S fixed. 'scoring' is what TTT falls back to when the
    budget cuts it: the part that must fit (LoRA TTT scores every target itself, so its total leaves it out)."""
    scale = split_tokens / tokens.size
    w = min(window, tokens.size - 1)
    gpus = PROJECTION_GPUS * H100_BF16_DENSE_FLOPS
    fwd = lambda n, t: n * flops_per_token(hp, t) / 3.0 / (gpus * EVAL_FORWARD_MFU)  # noqa: E731
    train = lambda n, t: n * flops_per_token(hp, t) / (gpus * TTT_ASSUMED_MFU)  # noqa: E731
    n_windows = len(scoring_windows(hp.eval_mode, tokens, window, stride)[0])
    plain = len(sliding_windows(tokens.size, hp.train_seq_len, hp.train_seq_len)[0]) * min(hp.train_seq_len, tokens.size - 1)
    parts = dict(load=EVAL_LOAD_ASSUMED_S, compile=EVAL_COMPILE_ASSUMED_S,
                 plain=fwd(plain * scale, hp.train_seq_len), scoring=fwd(n_windows * w * scale, w), ttt=0.0, audit=0.0)
    lora = hp.ttt_enabled and hp.ttt_method == "lora"
    if hp.eval_audit:
        parts["audit"] = fwd(PROJECTION_GPUS * (1 + lora) * hp.vocab_size * w, w)
    if lora:     # the LoRA steps' work, shared by the ranks; the phases
        spans = document_spans(tokens)
        order = np.argsort(-(spans[:, 1] - spans[:, 0]), kind="stable")
        bounds, rows = phase_boundaries(hp, len(spans)), lora_rows(hp, w)
        token_s = flops_per_token(hp, w) * 2 / 3 / (H100_BF16_DENSE_FLOPS * LORA_TTT_MFU)
        for lo, hi in zip([0] + bounds, bounds + [len(spans)]):      # the ranks meet at every phase
            ranks = [sum(steps * LORA_STEP_S + n * token_s for steps, n in
                         (lora_schedule_work([b], rows, hp.ttt_lora_chunk, w) for b in mine))
                     for mine in lora_batches(spans[order[lo:hi]], rows, hp.ttt_lora_chunk, w, PROJECTION_GPUS)]
            # the busiest rank; a part of the split (scale > 1) stands for the work, not for its longest chain
            parts["ttt"] += max(max(ranks), scale * sum(ranks) / PROJECTION_GPUS)
        lengths = spans[order, 1] - spans[order, 0]
        parts["ttt"] += train(sum(int(lengths[:b].sum()) for b in bounds) * scale, w)
    elif hp.ttt_enabled:
        chunks = -(-(tokens.size - 1) // hp.ttt_chunk_tokens)
        parts["ttt"] = train(hp.ttt_epochs * (chunks - 1) * hp.ttt_chunk_tokens * scale, w)
    lora = hp.ttt_enabled and hp.ttt_method == "lora"        # LoRA TTT scores every target itself
    parts["total"] = sum(v for k, v in parts.items() if not (lora and k == "scoring"))
    return parts


def check_eval_budget(hp: Hyperparameters, tokens: np.ndarray, split_tokens: int, window: int, stride: int,
                      log: RunLog) -> dict[str, float]:
    """Project the final evaluation of the full validation split onto 8xH100 (eval_projection) and log it. The
    budget is kept at run time by cutting TTT, so only the passes that cannot be cut and grow with the data (the
    plain pass, the audit, scoring without TTT) are refused above EVAL_TIME_LIMIT_SECONDS (0 = no check); the fixed
    load and compile assumptions are logged beside them, and the run's own clock counts the real ones."""
    parts = eval_projection(hp, tokens, split_tokens, window, stride)
    must = parts["plain"] + parts["scoring"] + parts["audit"]
    log("projected_8xH100_eval:" + " ".join(f"{k}:{v:.1f}s" for k, v in parts.items()) +
        f" (mode {hp.eval_mode}, window {window}, stride {stride}, ttt {hp.ttt_method if hp.ttt_enabled else 'off'}, "
        f"{split_tokens} val tokens; rates from the records' logs: docs/evaluation.md)")
    if hp.eval_time_limit_seconds and must > hp.eval_time_limit_seconds:
        raise PipelineError(f"evaluation without TTT projected at {must:.0f} s on 8xH100 exceeds "
                            f"EVAL_TIME_LIMIT_SECONDS={hp.eval_time_limit_seconds:g}; raise EVAL_STRIDE "
                            f"(or set EVAL_TIME_LIMIT_SECONDS=0)")
    if hp.eval_time_limit_seconds and parts["total"] > hp.eval_time_limit_seconds:
        log(f"warning: TTT projected past EVAL_TIME_LIMIT_SECONDS={hp.eval_time_limit_seconds:g}: the budget will cut it")
    return parts


def main() -> None:
    hp, warnings = read_settings(dict(os.environ))
    if hp.eval_only:
        hp = settings_for_artifact(hp, hp.eval_only)
    rt = init_runtime(hp)
    run_id = on_main(rt, lambda: hp.run_id or str(uuid.uuid4()))
    opened, outputs = {}, () if hp.eval_only else (artifact_path(run_id),)
    on_main(rt, lambda: opened.setdefault("log", RunLog(rt, run_id, outputs=outputs)) and None)
    log = opened.get("log") or RunLog(rt, run_id)   # ranks other than 0 get a silent log
    try:
        run_pipeline(hp, rt, run_id, warnings, log)
    except Exception as e:
        log(f"error: {type(e).__name__}: {e}", console=False)
        raise
    finally:
        log.close()


def training_deadline_ms(hp: Hyperparameters) -> float:
    """The last moment training data may be read, on the training clock: the run's own cap or the
    challenge's 600 s, whichever comes first."""
    cap = hp.max_wallclock_seconds or CHALLENGE_TRAIN_SECONDS
    return 1e3 * min(cap, CHALLENGE_TRAIN_SECONDS)


@dataclass
class Trained:
    """What train_and_export made: the training loop's result, the float weights' score, the artifact, when
    training data was last read against the deadline (ms on the training clock, the slowest rank's), and
    what was read: every rank's reads together cover the stream's first train_tokens_read tokens (training
    and calibration read from offset 0 on), held by the shards train_files_read (paths, in stream order)."""
    result: TrainResult
    pre_quant: EvalResult            # the trained (EMA) weights before quantization, plain windows: a diagnostic
    artifact: ArtifactResult
    train_data_last_read_ms: float
    train_deadline_ms: float
    train_tokens_read: int
    train_files_read: list[str]

    @property
    def read_after_deadline(self) -> bool:
        return self.train_data_last_read_ms > self.train_deadline_ms


def train_and_export(hp: Hyperparameters, rt: Runtime, run_id: str, model: GPT, run_model: nn.Module,
                     val_tokens: np.ndarray, tables, plan: BudgetPlan, log: RunLog, stages: StageTimes,
                     lora: "TTTLoRA | None" = None) -> Trained:
    """Train, calibrate, score the trained weights (a diagnostic), write the artifact. lora: the evaluation's
    per-document TTT adapters, whose graphs the warm-up compiles."""
    stream = TokenStream(find_shards(hp.data_path, "train"), hp.vocab_size)
    accum = grad_accum_steps(hp, rt.world_size)
    loader = DistributedTokenLoader(stream, hp.train_batch_tokens, hp.train_seq_len, rt.world_size, accum,
                                    rt.rank, rt.device)
    log(f"train_shards:{len(stream.files)} train_tokens:{stream.total} "
        f"grad_accum_steps:{accum} tokens_per_micro_batch:{loader.local_tokens}")

    def validate(step: int, train_ms: float) -> None:
        r = evaluate(hp, rt, run_model, val_tokens, tables, hp.train_seq_len, hp.train_seq_len)
        log(f"step:{step}/{hp.iterations} val_loss:{r.val_loss:.4f} val_bpb:{r.val_bpb:.4f} "
            f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")

    t_train = time.perf_counter()
    result = train(hp, rt, model, run_model, loader, log, validate, plan.spec, val_tokens.size, lora)
    stages.ms["compile"] = result.compile_ms
    stages.ms["train"] = 1e3 * (time.perf_counter() - t_train) - result.compile_ms
    if rt.device.type == "cuda":   # the summary's peak_memory_mib is the whole run's (run_pipeline)
        log(f"peak memory allocated in training: {torch.cuda.max_memory_allocated(rt.device) // 2**20} MiB")
    with stages("calibration"):
        hessians, calibration_end_ms = calibrate(hp, rt, model, stream, result.clock, log)
    last_read_ms = agree_max(rt, [result.train_data_last_read_ms])[0]       # the slowest rank's
    tokens_read = int(agree_max(rt, [stream.read_end])[0])                  # the furthest any rank read
    if hp.gptq_calibration == "train":
        last_read_ms = max(last_read_ms, calibration_end_ms)
    with stages("pre_quant_eval"), qat_paused(model):   # the float (EMA) weights, plain windows: a diagnostic
        pre = evaluate(hp, rt, run_model, val_tokens, tables, hp.train_seq_len, hp.train_seq_len)
    log_eval(log, "pre_quant (plain windows)", pre)
    artifact = export_artifact(hp, rt, model, artifact_path(run_id), plan, hessians,
                               log, stages)
    artifact.quant.update(calibration=hp.gptq_calibration, calibration_end_ms=calibration_end_ms,
                          late_qat_step=result.late_qat_step, ternary_qat_step=result.ternary_qat_step)
    return Trained(result=result, pre_quant=pre, artifact=artifact, train_data_last_read_ms=last_read_ms,
                   train_deadline_ms=training_deadline_ms(hp), train_tokens_read=tokens_read,
                   train_files_read=stream.files_read(tokens_read))


def calibrate(hp: Hyperparameters, rt: Runtime, model: GPT, stream: TokenStream, clock: StepClock,
              log: RunLog) -> tuple[dict[str, Tensor] | None, float | None]:
    """GPTQ calibration on every rank, straight after training: Hessians of every quantized matrix's
    inputs over GPTQ_CALIB_SEQS x GPTQ_CALIB_LEN tokens (each rank its share), self-generated or read
    from the training stream. Training-data calibration runs on the training clock (the loop stopped
    GPTQ_RESERVE_SECONDS early). Returns (hessians, when calibration ended on the training clock in ms,
    the slowest rank's); (None, None) when GPTQ is off."""
    if hp.gptq_calibration == "none":
        return None, None
    rows = calibration_rows(rt, hp.gptq_calib_seqs)
    model.eval()
    reads_data = hp.gptq_calibration == "train"
    if reads_data:               # on the training clock: it reads training data
        clock.resume()
        tokens = stream.read(rows.start * hp.gptq_calib_len, len(rows) * hp.gptq_calib_len).astype(np.int64)
        batch = torch.from_numpy(tokens).view(len(rows), hp.gptq_calib_len).to(rt.device)
    else:
        with qat_paused(model):
            batch = generate_calibration(model, rt, hp.gptq_calib_seqs, hp.gptq_calib_len, hp.gptq_calib_temp, hp.seed)
    hessians = collect_hessians(model, rt, list(batch.split(max(1, 65536 // hp.gptq_calib_len))))
    model.train()
    end_ms = None
    if reads_data:
        clock.pause()
        end_ms = agree_max(rt, [clock.train_ms])[0]
    log(f"gptq_calibration: {hp.gptq_calibration} {hp.gptq_calib_seqs}x{hp.gptq_calib_len} tokens, {len(hessians)} "
        "Hessians, " + (f"ended at {end_ms:.0f}ms of the training clock (training-data deadline "
                        f"{training_deadline_ms(hp):.0f}ms)" if reads_data else "no training data read"))
    return hessians, end_ms


def saved_artifact(path: str) -> ArtifactResult:
    """EVAL_ONLY: the artifact given, as a re-score sees it."""
    with open(path, "rb") as f:
        data = f.read()
    return ArtifactResult(path=path, sha256=hashlib.sha256(data).hexdigest(), bytes_model=len(data),
                          bytes_code=code_bytes(), quant=None)


def micro_batch_tokens(hp: Hyperparameters, world_size: int) -> int:
    """Tokens per rank and micro-step on world_size ranks: TRAIN_BATCH_TOKENS / (world_size x grad_accum), the
    micro-steps as grad_accum_steps sets them, without its check that they hold whole sequences (a CPU run's batch
    need not split over 8 ranks)."""
    return hp.train_batch_tokens // (world_size * (hp.grad_accum_steps or max(1, 8 // world_size)))


def training_peak(hp: Hyperparameters, model: GPT, saved: SavedActivations, world_size: int = PROJECTION_GPUS
                  ) -> dict[str, float]:
    """Rank 0's peak allocated memory in a training step on world_size ranks, in GiB by part ('total' among them),
    at the start of backward (every saved activation alive, the loss's gradient being formed): the weights, their
    gradients, DDP's gradient buckets (a second copy when world_size > 1), the optimizer states counted from
    build_optimizers' groups for rank 0 (AdamW: two moments per parameter; Muon: one momentum per matrix this rank
    orthogonalises), the EMA (fp32), the saved activations of one micro-batch (micro_batch_tokens), the varlen
    cu_seqlens (int32, the base capacity per layer visit) with FA3's accumulators of one attention backward
    (fa3_backward_bytes), and the head's transient over the vocabulary (head_bytes). docs/memory.md."""
    rank0 = Runtime(0, world_size, 0, torch.device("cpu"), False, None, None)
    weights, optimizer, ema = 0, 0, 0
    for opt in build_optimizers(model, hp, rank0):
        muon = isinstance(opt, Muon)
        for group in opt.param_groups:
            weights += sum(p.numel() * p.element_size() for p in group["params"])
            ema += sum(4 * p.numel() for p in group["params"])
            mine = group["params"][rank0.rank::world_size] if muon else group["params"]
            optimizer += (1 if muon else 2) * sum(p.numel() * p.element_size() for p in mine)
    tokens = micro_batch_tokens(hp, world_size)
    parts = dict(weights=weights, grads=weights, ddp_buckets=weights if world_size > 1 else 0, optimizer=optimizer,
                 ema=ema if hp.ema_horizon_frac > 0 else 0, activations=saved.bytes(tokens),
                 **varlen_parts(hp, tokens // hp.train_seq_len, hp.train_seq_len),
                 head_transient=tokens * hp.vocab_size * head_bytes(hp, saved.compiled))
    parts = {k: v / GIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def head_bytes(hp: Hyperparameters, compiled: bool) -> int:
    """Bytes per token and vocabulary entry of the head's transient in backward: the logits' gradient, one bf16
    tensor in a compiled graph; in eager two fp32 ones (log_softmax's backward: the gradient in and out beside its
    saved output), two more with the asymmetric softcap (its cap per logit and the logit over it)."""
    return 2 if compiled else 8 + 8 * hp.logit_softcap_asym


def varlen_parts(hp: Hyperparameters, rows: int, seq_len: int) -> dict[str, int]:
    """Bytes of document-isolated attention on CUDA for (rows, seq_len) batches at the base capacity: cu_seqlens
    (int32, one per layer visit) and FA3's accumulators of one attention backward; none without isolation."""
    if not hp.attn_doc_isolation:
        return dict(cu_seqlens=0, fa3_accumulators=0)
    entries = varlen_capacity(rows, seq_len)
    return dict(cu_seqlens=4 * entries * effective_layers(hp),
                fa3_accumulators=fa3_backward_bytes(rows * seq_len, entries, hp.num_heads, hp.num_kv_heads,
                                                    hp.model_dim // hp.num_heads))


def lora_activations(hp: Hyperparameters, compiled: bool) -> SavedActivations:
    """saved_activations of a LoRA TTT forward (training_activations' model and measurement, the base weights frozen
    as the evaluation freezes them, per-document adapters of TTT_LORA_TARGETS on every row)."""
    with torch.random.fork_rng(devices=[]):
        model = GPT(hp.replace(ATTN_DOC_ISOLATION=0))
    model.recurrence_on = True
    for p in model.parameters():
        p.requires_grad_(False)
    adapters = {rows: TTTLoRA(hp, model, rows, torch.device("cpu")) for rows in (1, 2)}
    gen = torch.Generator().manual_seed(0)
    batch = lambda rows: torch.randint(0, hp.vocab_size, (rows, MEMORY_PROBE_TOKENS), generator=gen)  # noqa: E731
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()} | {
        a.weights.untyped_storage().data_ptr() for a in adapters.values()}
    return saved_activations(lambda x: model(x, x, None, adapters[x.size(0)]), batch, exclude, compiled)


def ttt_peak(hp: Hyperparameters, model: GPT, saved: SavedActivations, window: int, val_tokens: int) -> dict[str, float]:
    """A rank's peak allocated memory in the first (longest) LoRA TTT step, in GiB by part ('total' among them): the
    weights (fp32), the adapters of lora_rows() rows with their gradient and RowAdamW's two moments, the step's saved
    activations at rows x the window, the head's transient at the step's peak (one bf16 (tokens, vocab) tensor
    compiled, two fp32 eager: a CPU step's live bytes, tests/test_memory.py), varlen_parts, and the validation stream
    on the device (int64, and the audit's coverage counts, int32). docs/memory.md."""
    rows, tokens = lora_rows(hp, window), lora_rows(hp, window) * window
    parts = dict(weights=sum(p.numel() * 4 for p in model.parameters()),
                 adapters=4 * 4 * rows * lora_layout(hp, model, recurrence=True)[1],
                 activations=saved.bytes(tokens),
                 head_transient=tokens * hp.vocab_size * (2 if saved.compiled else 8),
                 **varlen_parts(hp, rows, window), validation=val_tokens * (8 + (4 if hp.eval_audit else 0)))
    parts = {k: v / GIB for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


@dataclass
class Projections:
    """The model's size and its 8xH100 projections, made before training (at ASSUMED_MFU)."""
    model_params: int
    flops_per_token: float
    h100_step_ms: float
    h100_eval_parts_s: dict[str, float]   # eval_projection's parts, 'total' among them
    h100_train_memory_gib: dict[str, float]   # training_peak's parts per rank, 'total' among them
    h100_train_memory_compiled: bool      # its activations counted in the compiled graph (the run compiles) or eager
    h100_ttt_memory_gib: dict[str, float] | None   # ttt_peak's parts per rank (TTT_METHOD=lora), 'total' among them


@dataclass
class RunSummary:
    """logs/<RUN_ID>.json, every key declared here and filled in one place (summarize) from the stages' typed
    results. tools/harness.py requires SUMMARY_KEYS of every run it submits. Times in ms unless named _s;
    losses in nats per target, bpb in bits per byte. Training keys are None for a re-score (EVAL_ONLY)."""
    # the run
    run_id: str
    seed: int
    preset: str
    hyperparameters: dict[str, object]     # every setting's value
    explicit_settings: list[str]           # the settings set in the environment (a reproduction sets these)
    world_size: int
    device: str
    hardware: str
    torch_version: str
    cuda_version: str | None
    attention: str
    compute_dtype: str
    eval_only: bool
    code_shipped: bool
    code_readable_bytes: int
    code_readable_sha256: str
    # the data (DataFingerprint)
    tokenizer_sha256: str
    val_shards_sha256: str
    tokenizer_check_docs: int
    val_split_tokens: int
    val_full_split: bool
    # the model and its projections (Projections)
    model_params: int
    flops_per_token: float
    assumed_mfu: float
    projected_h100_step_ms: float
    projected_h100_eval_s: float
    projected_h100_eval_parts_s: dict[str, float]
    projected_h100_train_peak_gib: float   # a rank's peak allocated memory in a training step (training_peak)
    projected_h100_train_memory_gib: dict[str, float]   # ... by part, 'total' among them
    projected_h100_train_memory_compiled: bool          # ... with the compiled graph's saved activations, or eager's
    projected_h100_ttt_peak_gib: float | None           # a rank's peak in the first LoRA TTT step (ttt_peak), else None
    projected_h100_ttt_memory_gib: dict[str, float] | None   # ... by part
    # training (Trained)
    train_tokens_read: int | None          # the stream's first N tokens, every rank's reads together
    train_shards_read: list[dict] | None   # the shards holding them: [{"name": file in DATA_PATH, "sha256": ...}]
    steps: int | None
    train_time_ms: float | None
    step_avg_ms: float | None
    tokens_per_s: float | None
    stopped_early: bool | None
    train_flops: float | None
    train_loss: float | None
    pre_quant_val_loss: float | None
    pre_quant_val_bpb: float | None
    train_data_last_read_ms: float | None
    train_deadline_ms: float | None
    train_data_read_after_deadline: bool
    compile: dict | None                   # graphs compiled in the warm-up, recompiles after it, graph breaks
    peak_memory_mib: int | None            # CUDA: the whole run's peak allocated memory
    # the artifact (ArtifactResult) and its load on every rank (LoadEvidence)
    artifact_path: str
    artifact_sha256: str
    bytes_model: int
    bytes_code: int
    bytes_total: int                       # what the 16,000,000-byte cap counts
    quant: dict | None
    quant_scheme: str
    quant_bits: dict | None
    quant_ternary: str
    roundtrip_sha256_per_rank: list[str]
    roundtrip_state_sha256_per_rank: list[str]
    roundtrip_probe_nll_per_rank: list[float]
    # evaluation
    roundtrip_plain_val_loss: float
    roundtrip_plain_val_bpb: float
    quant_gap_bpb: float | None            # plain windows: after the round trip minus before quantization
    val_loss: float                        # the score: the final pass (TTT when on), after the round trip
    val_bpb: float
    val_tokens: int                        # targets scored
    val_bytes: int
    eval_mode: str
    eval_seq_len: int
    eval_stride: int
    ttt: bool
    ttt_summary: dict | None
    eval_compile_ms: float                 # the evaluation graphs compiled in the warm-up ...
    eval_measured_ms: float                # ... plus the artifact's load to the final score ...
    eval_time_ms: float                    # ... is the evaluation time
    compliance: dict | None                # the self-audit (EVAL_AUDIT=1)
    nll_dump: str | None
    stage_ms: dict[str, float]
    wall_ms: float


SUMMARY_KEYS = tuple(f.name for f in dataclasses.fields(RunSummary))


def summarize(hp: Hyperparameters, rt: Runtime, run_id: str, *, data: DataFingerprint, projections: Projections,
              trained: Trained | None, artifact: ArtifactResult, loaded: LoadEvidence, plain: EvalResult,
              final: EvalResult, ttt_summary: dict | None, window: int, stride: int, eval_measured_ms: float,
              eval_compile_ms: float, compliance: dict | None, compile_counts: dict | None, peak_memory_mib: int | None,
              train_shards_read: list[dict] | None, stage_ms: dict[str, float], wall_ms: float) -> dict:
    """The run summary (RunSummary) as the JSON object logs/<RUN_ID>.json holds."""
    result, pre = (trained.result, trained.pre_quant) if trained is not None else (None, None)
    on_cuda = rt.device.type == "cuda"
    summary = RunSummary(
        run_id=run_id, seed=hp.seed, preset=hp.preset, hyperparameters=hp.as_dict(), explicit_settings=sorted(hp.explicit),
        world_size=rt.world_size, device=rt.device.type,
        hardware=torch.cuda.get_device_name(rt.device) if on_cuda else platform.processor() or platform.machine(),
        torch_version=torch.__version__, cuda_version=torch.version.cuda,
        attention=attention_backend(rt.device, rt.autocast_dtype), compute_dtype=str(rt.autocast_dtype or torch.float32),
        eval_only=bool(hp.eval_only), code_shipped=code_shipped(), code_readable_bytes=SOURCE_BYTES,
        code_readable_sha256=SOURCE_SHA256,
        **dataclasses.asdict(data),
        model_params=projections.model_params, flops_per_token=projections.flops_per_token, assumed_mfu=ASSUMED_MFU,
        projected_h100_step_ms=projections.h100_step_ms, projected_h100_eval_s=projections.h100_eval_parts_s["total"],
        projected_h100_eval_parts_s=projections.h100_eval_parts_s,
        projected_h100_train_peak_gib=projections.h100_train_memory_gib["total"],
        projected_h100_train_memory_gib=projections.h100_train_memory_gib,
        projected_h100_train_memory_compiled=projections.h100_train_memory_compiled,
        projected_h100_ttt_peak_gib=projections.h100_ttt_memory_gib and projections.h100_ttt_memory_gib["total"],
        projected_h100_ttt_memory_gib=projections.h100_ttt_memory_gib,
        train_tokens_read=trained and trained.train_tokens_read, train_shards_read=train_shards_read,
        steps=result and result.steps, train_time_ms=result and result.train_time_ms,
        step_avg_ms=result and result.train_time_ms / max(result.steps, 1),
        tokens_per_s=result and result.tokens_seen / max(result.train_time_ms / 1e3, 1e-9),
        stopped_early=result and result.stopped_early, train_flops=result and result.train_flops,
        train_loss=result and result.train_loss, pre_quant_val_loss=pre and pre.val_loss,
        pre_quant_val_bpb=pre and pre.val_bpb,
        train_data_last_read_ms=trained and trained.train_data_last_read_ms,
        train_deadline_ms=trained and trained.train_deadline_ms,
        train_data_read_after_deadline=trained is not None and trained.read_after_deadline,
        compile=compile_counts, peak_memory_mib=peak_memory_mib,
        artifact_path=artifact.path, artifact_sha256=artifact.sha256, bytes_model=artifact.bytes_model,
        bytes_code=artifact.bytes_code, bytes_total=artifact.bytes_model + artifact.bytes_code, quant=artifact.quant,
        quant_scheme=scheme_label(loaded.quant_bits, loaded.quant_ternary), quant_bits=loaded.quant_bits,
        quant_ternary=loaded.quant_ternary, roundtrip_sha256_per_rank=loaded.sha256_per_rank,
        roundtrip_state_sha256_per_rank=loaded.state_sha256_per_rank,
        roundtrip_probe_nll_per_rank=loaded.probe_nll_per_rank,
        roundtrip_plain_val_loss=plain.val_loss, roundtrip_plain_val_bpb=plain.val_bpb,
        quant_gap_bpb=None if pre is None else plain.val_bpb - pre.val_bpb,
        val_loss=final.val_loss, val_bpb=final.val_bpb, val_tokens=final.val_tokens, val_bytes=final.val_bytes,
        eval_mode=hp.eval_mode, eval_seq_len=window, eval_stride=stride, ttt=ttt_summary is not None,
        ttt_summary=ttt_summary, eval_compile_ms=eval_compile_ms, eval_measured_ms=eval_measured_ms,
        eval_time_ms=eval_measured_ms + eval_compile_ms, compliance=compliance, nll_dump=hp.nll_dump or None,
        stage_ms={k: round(v, 1) for k, v in stage_ms.items()}, wall_ms=wall_ms)
    return dataclasses.asdict(summary)


def run_pipeline(hp: Hyperparameters, rt: Runtime, run_id: str, warnings: list[str], log: RunLog) -> None:
    t_run = time.perf_counter()
    stages = StageTimes(rt)
    for line in environment_report(rt):
        log(line, console=False)
    log(f"run_id:{run_id} preset:{hp.preset} seed:{hp.seed}" + (f" eval_only:{hp.eval_only}" if hp.eval_only else ""))
    log(f"code: {'shipped' if code_shipped() else 'readable'} train_gpt.py; the readable source is {SOURCE_BYTES} bytes, "
        f"sha256 {SOURCE_SHA256}; bytes_code {code_bytes()} (its shipped form, tools/ship_code.py)")
    log("hyperparameters:" + json.dumps(hp.as_dict(), sort_keys=True), console=False)
    log("explicit_settings:" + json.dumps(sorted(hp.explicit)), console=False)
    for w in warnings:
        log(f"warning: {w}")
    log(check_attention_backend(hp, rt.device, attention_backend(rt.device, rt.autocast_dtype)))

    # data for evaluation (training data is read only inside train_and_export)
    val_tokens, split_tokens = load_validation_tokens(hp.data_path, hp.vocab_size, hp.val_max_tokens)
    tables = build_bpb_tables(hp.tokenizer_path, hp.vocab_size)
    val_files = find_shards(hp.data_path, "val")
    docs_checked = check_tokenizer_matches_shards(hp.tokenizer_path, hp.data_path,
                                                  load_shard(val_files[0])[:TOKENIZER_CHECK_TOKENS])
    tables = load_byte_sidecar(hp.tokenizer_path, hp.data_path, val_tokens, tables)
    if isinstance(tables, ByteSidecar):
        log(f"val bytes: from the sidecar fineweb_val_bytes_*.bin ({int(tables.nbytes[1:].sum())} bytes, equal to the "
            "count derived from the ids)")
    data = DataFingerprint(tokenizer_sha256=file_sha256([hp.tokenizer_path]), val_shards_sha256=file_sha256(val_files),
                           tokenizer_check_docs=docs_checked, val_split_tokens=split_tokens,
                           val_full_split=val_tokens.size == split_tokens)
    log(f"val_stream_tokens:{val_tokens.size} (of {split_tokens}" + (", partial validation)" if val_tokens.size < split_tokens else ")"))
    log(f"data: tokenizer sha256 {data.tokenizer_sha256} re-encodes the first {docs_checked} validation documents "
        f"to the same ids; {len(val_files)} validation shard(s) sha256 {data.val_shards_sha256}")
    if hp.gptq_calibration != "none" and hp.gptq_calib_seqs < rt.world_size:
        raise PipelineError(f"GPTQ_CALIB_SEQS={hp.gptq_calib_seqs} is fewer than the {rt.world_size} ranks that share it")
    if hp.ttt_enabled and ttt_seqs_per_rank(hp, rt, eval_geometry(hp)[0]) == 0:
        raise PipelineError(f"TTT_CHUNK_TOKENS={hp.ttt_chunk_tokens} holds fewer than one evaluation window of "
                            f"{eval_geometry(hp)[0]} tokens per rank ({rt.world_size} ranks): TTT would never train; raise it")

    # model, and the projections that can refuse a run before it spends any time
    model = build_model(hp, rt)
    n_params = count_parameters(model)
    fpt = flops_per_token(hp, hp.train_seq_len)
    projected_ms = projected_h100_step_ms(fpt, hp.train_batch_tokens)
    log(f"model_params:{n_params} matmul_params:{matmul_params(hp)} layers_run:{effective_layers(hp)} "
        f"flops_per_token:{fpt:.4e} projected_8xH100_step:{projected_ms:.3g}ms (at {ASSUMED_MFU:.0%} MFU of "
        f"{H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s bf16; recurrence on) "
        f"projected_steps_in_600s:{projected_steps(hp, projected_ms):.0f}")
    window, stride = eval_geometry(hp)
    projected_eval = check_eval_budget(hp, val_tokens, split_tokens, window, stride, log)
    plan = plan_budget(hp, log) if not hp.eval_only else None
    use_compile = hp.compile == 1 or (hp.compile == -1 and rt.device.type == "cuda")
    lora = hp.ttt_enabled and hp.ttt_method == "lora"
    memory = on_main(rt, lambda: training_peak(hp, model, training_activations(hp, use_compile)))
    ttt_memory = on_main(rt, lambda: ttt_peak(hp, model, lora_activations(hp, use_compile), window, split_tokens)
                         ) if lora else None
    graph = "compiled" if use_compile else "eager"
    log("projected_8xH100_train_peak:" + " ".join(f"{k}:{v:.2f}GiB" for k, v in memory.items()) +
        f" (per rank, {micro_batch_tokens(hp, PROJECTION_GPUS)} tokens per micro-step, recurrence on; activations saved "
        f"by the {graph} graph, counted on CPU under CUDA's autocast policy)")
    if ttt_memory:
        log("projected_8xH100_ttt_peak:" + " ".join(f"{k}:{v:.2f}GiB" for k, v in ttt_memory.items()) +
            f" (per rank, the first LoRA step: {lora_rows(hp, window)} rows of {window}, {graph} graph)")
    run_model = compile_model(model, bool(hp.compile_optimize_ddp)) if use_compile else model
    # one set of adapters for the warm-up and the evaluation: their graphs are compiled once
    adapters = TTTLoRA(hp, model, lora_rows(hp, window), rt.device, run_states(hp)[-1][0]) if lora and \
        not hp.eval_only else None

    # train and export, or take a saved artifact (a re-score compiles inside its own evaluation time)
    trained = None if hp.eval_only else train_and_export(hp, rt, run_id, model, run_model, val_tokens, tables, plan,
                                                         log, stages, adapters)
    artifact = saved_artifact(hp.eval_only) if trained is None else trained.artifact
    eval_compile_ms = 0.0 if trained is None else trained.result.eval_compile_ms
    graphs_before_eval = compiled_graphs()

    # evaluation, from loading the artifact to the final score: every rank loads it from disk, a plain pass
    # measures the quantization gap, the final pass scores (audited from inside with EVAL_AUDIT=1)
    t_eval = time.perf_counter()
    with stages("load"):
        loaded = load_artifact_everywhere(rt, model, artifact.path, val_tokens[:min(val_tokens.size, hp.train_seq_len + 1)])
    compliance = {}
    probe = ForwardAudit(hp, rt) if hp.eval_audit else None
    with stages("roundtrip_plain_eval"):
        plain = evaluate(hp, rt, run_model, val_tokens, tables, hp.train_seq_len, hp.train_seq_len)
    log_eval(log, "roundtrip (plain windows)", plain)
    ttt = None
    if lora:
        ttt = LoRATestTimeTrainer(hp, rt, model, run_model, window, adapters)
    elif hp.ttt_enabled:
        ttt = TestTimeTrainer(hp, rt, model, run_model, window)
    # the budget counts from the artifact's load, plus the evaluation graphs compiled in the warm-up; its rate is
    # the plain pass's seconds per forward token of one rank
    budget = EvalBudget(hp, rt, t_eval - eval_compile_ms / 1e3, plain.eval_time_ms / 1e3 / max(plain.forward_tokens, 1))
    with stages("eval"):
        if lora:
            final = evaluate_lora_ttt(hp, rt, ttt, val_tokens, tables, window, stride, budget,
                                      collect=bool(hp.nll_dump), audit=bool(hp.eval_audit), probe=probe)
        else:
            final = evaluate(hp, rt, run_model, val_tokens, tables, window, stride, ttt=ttt, collect=bool(hp.nll_dump),
                             audit=bool(hp.eval_audit), mode=hp.eval_mode, budget=budget, probe=probe)
    if probe is not None:        # the audit ran inside the final pass: its time is reported apart from it
        stages.ms["audit"] = probe.ms
        stages.ms["eval"] -= probe.ms
    ttt_summary = None
    if hp.ttt_enabled:
        ttt_summary = dict(method=hp.ttt_method, budget_s=hp.eval_time_limit_seconds or None,
                           plain_s_per_forward_token=budget.rate)
        if lora:
            ttt_summary.update(phases_planned=len(phase_boundaries(hp, len(document_spans(val_tokens)))),
                               phases_done=ttt.phases_done, documents=len(document_spans(val_tokens)),
                               documents_adapted=ttt.docs_adapted, lora_rows=ttt.lora.rows,
                               lora_steps_rank0=ttt.steps, cut=ttt.cut or ("phases" if ttt.phases_cut else None))
        else:
            ttt_summary.update(chunks_trained=ttt.chunks_trained, cut=ttt.cut or None)
        log("ttt: " + json.dumps(ttt_summary, sort_keys=True))
    eval_measured_ms = 1e3 * (time.perf_counter() - t_eval)
    eval_time_ms = eval_measured_ms + eval_compile_ms
    label = f"final_{scheme_label(loaded.quant_bits, loaded.quant_ternary)}" + ("_ttt" if ttt else "")
    log_eval(log, label, final)
    log(f"{label}_roundtrip_exact val_loss:{final.val_loss:.8f} val_bpb:{final.val_bpb:.8f}")
    log(f"eval_time: {eval_time_ms:.0f}ms = {eval_measured_ms:.0f}ms from the artifact's load to the final score "
        f"(every pass counted) + {eval_compile_ms:.0f}ms compiling the evaluation graphs in the warm-up")
    if hp.eval_audit:
        compliance.update(probe.result())
        compliance.update(audit_score_before_update(final.evidence, ttt is not None))
        compliance.update(audit_one_pass(final.evidence))
        if trained is not None:     # a re-score trained nothing: there is no training-data read to check
            compliance.update(no_train_data_after_deadline=not trained.read_after_deadline)
        compliance["all_ok"] = all(v for k, v in compliance.items() if k.endswith("_ok") or k.startswith("no_"))
        log("compliance: " + json.dumps(compliance, sort_keys=True))
    if hp.nll_dump and rt.is_main:
        with open(hp.nll_dump, "xb") as f:        # exactly this path (np.savez would add .npz), never overwritten
            np.savez(f, target=val_tokens[1:], nll=final.nll,
                     bytes=target_bytes(val_tokens[:-1], val_tokens[1:], tables))
        log(f"nll_dump: {hp.nll_dump}")

    train_shards_read = None
    if trained is not None:      # the training shards read, hashed outside both clocks (shared out over the ranks)
        with stages("train_shards_sha256"):
            train_shards_read = [dict(name=os.path.basename(f), sha256=h) for f, h in
                                 zip(trained.train_files_read, shards_sha256(rt, trained.train_files_read))]
        log("train_shards_read:" + json.dumps(dict(tokens=trained.train_tokens_read, shards=train_shards_read),
                                              sort_keys=True), console=False)
    compile_counts = None
    if trained is not None:
        compile_counts = dict(graphs_in_warm_up=trained.result.graphs_compiled,
                              recompiles_in_clock=trained.result.recompiles_in_clock,
                              recompiles_after_warm_up=trained.result.recompiles_in_clock + compiled_graphs()
                              - graphs_before_eval, graph_breaks=graph_breaks())
    overflows = sum(gather(rt, sum(VARLEN_OVERFLOWS.values())))
    if overflows:      # batches of more documents than the base varlen capacity: another shape each (never silent)
        log(f"varlen: {overflows} batch(es) held more documents than the base capacity of "
            f"{VARLEN_SEGMENTS_PER_ROW} per row and ran at a larger one (rank 0: {sorted(VARLEN_OVERFLOWS.items())})")
    peak_memory_mib = None
    if rt.device.type == "cuda":     # the whole run's peak: training, calibration, GPTQ, evaluation and TTT
        peak_memory_mib = torch.cuda.max_memory_allocated(rt.device) // 2**20
        log(f"peak memory allocated: {peak_memory_mib} MiB (the whole run)")
    log.write_summary(summarize(
        hp, rt, run_id, data=data, projections=Projections(n_params, fpt, projected_ms, projected_eval, memory, use_compile,
                                                   ttt_memory),
        trained=trained, artifact=artifact, loaded=loaded, plain=plain, final=final, ttt_summary=ttt_summary,
        window=window, stride=stride, eval_measured_ms=eval_measured_ms, eval_compile_ms=eval_compile_ms,
        compliance=compliance or None, compile_counts=compile_counts, peak_memory_mib=peak_memory_mib,
        train_shards_read=train_shards_read, stage_ms=stages.ms, wall_ms=1e3 * (time.perf_counter() - t_run)))


def entry_point() -> int:
    """Run main(). A PipelineError becomes one clean line on stderr and exit status 2; anything else its
    traceback and exit status 1. A failed rank of a distributed run exits at once, without shutting the
    process group down: its peers may sit in a collective that will never complete (NCCL's shutdown
    would wait on them), and torchrun ends every other rank when one exits with an error."""
    prefix = f"[rank {os.environ.get('RANK', '0')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        main()
        status = 0
    except PipelineError as e:
        print(f"{prefix}train_gpt.py: error: {e}", file=sys.stderr, flush=True)
        status = 2
    except Exception:
        traceback.print_exc()
        print(f"{prefix}train_gpt.py: internal error (traceback above)", file=sys.stderr, flush=True)
        status = 1
    if status and dist.is_initialized() and dist.get_world_size() > 1:
        sys.stdout.flush()
        os._exit(status)
    if dist.is_initialized():
        dist.barrier()     # gloo aborts a rank whose peer leaves while its last send is in flight
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(entry_point())
