"""Command-line harness for the Parameter Golf entry.

`demo-data` lets the whole pipeline (tokenizer, shards, training) run on a fresh machine with no
network and no FineWeb download: it builds a small real-English dataset from the docstrings of
Python's own standard library in the form of the default data (CaseOps: the text through
train_gpt.caseops_encode, a SentencePiece BPE tokenizer with the four operators as pieces, challenge-format
shards and the validation byte sidecar), so `train_gpt.py` reads it exactly as it reads the FineWeb CaseOps
shards (`--plain`: the same documents without the transform, as plain sp8192 data is read).

`sweep` writes the manifest of a seed sweep (`logs/<prefix>.sweep.json`) before its first seed trains.
`submit` turns every run of one sweep into a submission: it reads each `logs/<RUN_ID>.json` (the run
summary `train_gpt.py` writes) and `logs/<RUN_ID>.txt`, refuses runs that break a rule (byte cap,
wallclock, training data read after the deadline, failed or missing compliance audit, a summary its
log contradicts, data on disk other than the run's, validation documents in the training shards it
read, seeds that ran different code or settings, seeds left out of the sweep, an existing record
folder), reports the mean and sample std of val_bpb and val_loss and a one-sided Welch t-test against
the published best (and one against REFERENCE_BPB when given), decides whether the runs make a record,
a non-record submission or a practice record, and writes that folder (README.md, submission.json,
train_gpt.py, requirements.txt, the manifest, the logs). `check` makes submit's checks of one seed;
`overlap` checks a data folder's training shards for validation documents before any run.
`run_8xh100.sh` calls sweep, check and submit. `gpu-plan` prints the 8xH100 projections (memory, step time, evaluation
time) of the settings in the environment. `sweep`, `check`, `submit`, `gpu-plan` and `settings-table` import the
train_gpt.py beside tools/ (torch) for the settings and the summary's keys; `demo-data` needs sentencepiece, and
train_gpt.py for the CaseOps transform and byte count (not with `--plain`).

Usage:
    python3 tools/harness.py demo-data OUT_DIR [--vocab-size 1024]
        [--max-chars N] [--seed 0] [--shard-tokens N] [--plain]
    python3 tools/harness.py sweep PREFIX SEED [SEED ...] [--practice]
    python3 tools/harness.py check RUN_ID [--logs logs]
    python3 tools/harness.py overlap DATA_PATH [--shards N]
    python3 tools/harness.py settings-table [--write docs/settings.md]
    python3 tools/harness.py gpu-plan                (the 8xH100 projections of the settings in the environment)
    python3 tools/harness.py submit [RUN_ID ...] [--sweep logs/PREFIX.sweep.json] [--practice]
        [--record-dir DIR] [--reference-bpb "A B C"] [--exclude RUN_ID=REASON]
        [--name NAME] [--author A] [--github-id G] [--date YYYY-MM-DD] [--dry-run]
        (environment defaults: RECORD_DIR, REFERENCE_BPB, SUBMISSION_NAME, AUTHOR, GITHUB_ID)

The functions below are importable (`from tools import harness`) for tests and
for other tooling.  Subcommands are registered in `build_parser()`; a new one
needs an `_add_<name>_command(subparsers)` function that sets `func`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as _dt
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

# sentencepiece and train_gpt.py (torch) are imported inside the functions that use them: importing the
# harness needs only the standard library and numpy.

# Shard format constants.  They mirror train_gpt.py's (and the official
# challenge exporter's): a header of SHARD_HEADER_INTS little-endian int32
# values [magic, version, n_tokens, 0, ...] followed by n_tokens little-endian
# uint16 token ids.
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256

# Token ids of the official challenge tokenizer's special pieces.
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

MIN_DOCSTRING_CHARS = 200
# Python 3.11's standard library yields about 1.65M characters of docstrings,
# so this cap only binds on larger (newer) standard libraries.  A full build
# takes about 12 s on 2 cores, dominated by parsing the standard library.
DEFAULT_MAX_CHARS = 6_000_000
DEFAULT_SHARD_TOKENS = 100_000_000
VAL_FRACTION = 0.05
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


class OutputExistsError(FileExistsError):
    """Raised instead of overwriting a dataset or tokenizer that already exists."""


# ----------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------


def stdlib_python_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Return every `.py` file under `root` (default: the stdlib directory).

    Directories are walked in sorted order and third-party package directories
    (`site-packages`, `dist-packages`) are skipped, so the result is a
    deterministic list for a given Python installation.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def docstrings_in_source(source: bytes) -> list[str]:
    """Return the cleaned module/class/function docstrings of Python `source`.

    Input: the raw bytes of a `.py` file (its encoding declaration is honoured).
    Output: docstrings in `ast.walk` order; an empty list if the file does not
    parse (the stdlib ships deliberately broken test files).
    """
    try:
        with warnings.catch_warnings():  # e.g. invalid escape sequences
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node, clean=True) for node in ast.walk(tree) if isinstance(node, kinds))
    return [doc for doc in docs if doc]


@functools.lru_cache(maxsize=None)
def stdlib_docstrings(min_chars: int = MIN_DOCSTRING_CHARS) -> tuple[str, ...]:
    """Return the deduplicated stdlib docstrings of at least `min_chars` characters.

    Output order is deterministic (sorted file paths, then AST order).  The
    result is cached because scanning the stdlib takes about 10 s.
    """
    seen: set[str] = set()
    docs = []
    for path in stdlib_python_files():
        try:
            source = path.read_bytes()
        except OSError:
            continue
        for doc in docstrings_in_source(source):
            if len(doc) >= min_chars and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return tuple(docs)


def collect_docstrings(max_chars: int = DEFAULT_MAX_CHARS, seed: int = 0) -> list[str]:
    """Return shuffled stdlib docstrings totalling about `max_chars` characters.

    The deterministic docstring list is shuffled with `random.Random(seed)` and
    documents are taken in that order until the running total reaches
    `max_chars` (the last document may overshoot it).
    """
    docs = list(stdlib_docstrings())
    random.Random(seed).shuffle(docs)
    taken, total = [], 0
    for doc in docs:
        if total >= max_chars:
            break
        taken.append(doc)
        total += len(doc)
    return taken


def split_train_val(docs: Sequence[str], val_fraction: float = VAL_FRACTION) -> tuple[list[str], list[str]]:
    """Split `docs` into (train, val); val is the last `val_fraction` (at least 1 doc)."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to split train/val, got {len(docs)}")
    n_val = max(1, int(len(docs) * val_fraction))
    return list(docs[:-n_val]), list(docs[-n_val:])


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------


def train_tokenizer(docs: Sequence[str], vocab_size: int, model_path: str | os.PathLike,
                    user_symbols: Sequence[str] = ()) -> "spm.SentencePieceProcessor":
    """Train a SentencePiece BPE tokenizer on `docs` and write it to `model_path`.

    Each document is one SentencePiece "sentence"; `max_sentence_length` is set
    to the longest document so none is silently dropped.  Special ids follow
    the official challenge tokenizer (pad 0, bos 1, eos 2, unk 3), then
    `user_symbols` (ids 4, 5, ...: always whole pieces, as the CaseOps operators
    are in the records' tokenizer), and unseen characters fall back to bytes.
    Whitespace is kept verbatim (identity normalization, no dummy prefix, no
    whitespace squashing) so decoding returns the exact text and piece lengths
    sum to the text's UTF-8 bytes.
    Training is deterministic: every sentence is used, no sampling.
    Output: the trained model, loaded.
    """
    import sentencepiece as spm

    model = io.BytesIO()
    extra = {"user_defined_symbols": list(user_symbols)} if user_symbols else {}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(docs),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        max_sentence_length=max(len(doc.encode("utf-8")) for doc in docs) + 1,
        num_threads=2,
        minloglevel=1,
        **extra,
    )
    with _atomic_writer(model_path) as f:
        f.write(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def encode_documents(sp: "spm.SentencePieceProcessor", docs: Sequence[str]) -> np.ndarray:
    """Return the uint16 token stream `[BOS] + ids(doc)` for each doc, concatenated (no EOS)."""
    pieces = [np.array([BOS_ID] + ids, dtype=np.int64) for ids in sp.encode(list(docs))]
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    _check_token_range(tokens)
    return tokens.astype(np.uint16)


# ----------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_writer(path: str | os.PathLike) -> Iterator[io.BufferedWriter]:
    """Yield a binary file that replaces `path` only once fully written.

    Data goes to a hidden temporary file in the same directory (created if
    needed), which is moved onto `path` with `os.replace`; on error it is
    deleted and `path` is untouched.  The file gets the usual umask-based
    permissions (unlike `tempfile.mkstemp`'s 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _check_token_range(tokens: np.ndarray) -> None:
    """Raise ValueError naming the first token that is not an integer in [0, 65535]."""
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}")
    bad = np.flatnonzero((tokens < 0) | (tokens > np.iinfo(np.uint16).max))
    if bad.size:
        raise ValueError(f"token {tokens[bad[0]]} at index {bad[0]} does not fit in uint16 [0, 65535]")


def write_shard(path: str | os.PathLike, tokens: Iterable[int]) -> None:
    """Atomically write `tokens` (1-D ints in [0, 65535]) as one challenge-format shard.

    File layout: 256 little-endian int32 [SHARD_MAGIC, SHARD_VERSION, n, 0...]
    then n little-endian uint16 ids.  Raises ValueError on out-of-range values.
    """
    tokens = np.asarray(tokens)
    _check_token_range(tokens)
    if tokens.size >= 2**31:
        raise ValueError(f"{tokens.size} tokens do not fit in the int32 header")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    with _atomic_writer(path) as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def write_split(out_dir: str | os.PathLike, split: str, tokens: np.ndarray, shard_tokens: int) -> list[tuple[Path, int]]:
    """Write `tokens` as `fineweb_{split}_000000.bin`, `_000001`, ... of at most `shard_tokens` each.

    Like the official exporter, a document may continue into the next shard.
    Output: (path, token count) per shard written.
    """
    written = []
    for index, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        path = Path(out_dir) / f"fineweb_{split}_{index:06d}.bin"
        chunk = tokens[start : start + shard_tokens]
        write_shard(path, chunk)
        written.append((path, len(chunk)))
    return written


def write_byte_sidecar(out_dir: str | os.PathLike, tokens: np.ndarray, tokenizer: str | os.PathLike,
                       shard_tokens: int) -> tuple[int, list[tuple[Path, int]]]:
    """Write the CaseOps validation byte sidecar fineweb_val_bytes_XXXXXX.bin beside the validation shards of
    the stream `tokens` (written by write_split with the same `shard_tokens`, so the files pair): per token,
    the UTF-8 bytes of the original text it stands for (train_gpt.stream_bytes with the tokenizer's operators).
    Returns (their total, (path, entries) per file). Raises train_gpt.PipelineError when the tokenizer has no
    CaseOps operators."""
    tg = train_gpt_module()
    sp = tg.open_tokenizer(str(tokenizer))
    operator_ids = tg.caseops_operator_ids(sp)
    if operator_ids is None:
        raise tg.PipelineError(f"{tokenizer} has no CaseOps operator pieces")
    nbytes = tg.stream_bytes(np.asarray(tokens).astype(np.int64), tg.build_bpb_tables(str(tokenizer), sp.vocab_size()),
                             operator_ids)
    return int(nbytes.sum()), write_split(out_dir, "val_bytes", nbytes, shard_tokens)


def tokenizer_path(out_dir: str | os.PathLike, vocab_size: int, caseops: bool = True) -> Path:
    """Return where `build_demo_data` writes the tokenizer model for `vocab_size` (CaseOps or plain)."""
    return Path(out_dir) / "tokenizer" / f"demo_{vocab_size}_bpe{'_caseops' if caseops else ''}.model"


def existing_outputs(out_dir: str | os.PathLike) -> list[Path]:
    """Return shards and tokenizer models already present in `out_dir` (sorted)."""
    out_dir = Path(out_dir)
    return sorted(out_dir.glob("fineweb_*.bin")) + sorted(out_dir.glob("tokenizer/*.model"))


# ----------------------------------------------------------------------------
# Demo dataset
# ----------------------------------------------------------------------------


def build_demo_data(
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    max_chars: int = DEFAULT_MAX_CHARS,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    caseops: bool = True,
) -> dict:
    """Build the stdlib-docstring demo dataset in `out_dir`, all at once, in the default data's form.

    caseops (the default data, as tools/caseops.py builds FineWeb's): every document goes through
    train_gpt.caseops_encode; the tokenizer (trained on the transformed training documents) has the four
    operators as pieces 4-7; beside the validation shards, the byte sidecar fineweb_val_bytes_XXXXXX.bin
    (write_byte_sidecar). caseops=False: the documents as they are, a plain tokenizer, no sidecar.
    Raises OutputExistsError (before doing any work) if `out_dir` already has shards or a
    tokenizer, or holds anything else: the set is built in a hidden sibling folder that is renamed to
    `out_dir` only when complete, so an interrupted build (an exception, a kill) never leaves a half
    set there (a killed build may leave its hidden `.<name>.*.tmp` sibling; an exception removes it).
    Output: a dict with `tokenizer` (Path), `val_shards` and `train_shards` ([(Path, n_tokens)]),
    `val_bytes_shards` (the sidecar's, [] without one), `train_docs`, `val_docs`, `train_tokens`,
    `val_tokens`, `train_bytes`, `val_bytes` (UTF-8 bytes of the original document text: what the non-BOS
    tokens stand for, and what the sidecar sums to); the paths are under `out_dir`.
    """
    out_dir = Path(out_dir)
    clash = existing_outputs(out_dir) or (sorted(out_dir.iterdir()) if out_dir.is_dir() else [])
    if clash or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputExistsError(f"{out_dir} already contains {', '.join(map(str, clash)) or 'a file of that name'}")
    transform, operators = ((train_gpt_module().caseops_encode, train_gpt_module().CASEOPS_OPERATORS) if caseops
                            else (lambda doc: doc, ()))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        train_docs, val_docs = split_train_val(collect_docstrings(max_chars, seed))
        sp = train_tokenizer([transform(doc) for doc in train_docs], vocab_size, tokenizer_path(tmp, vocab_size, caseops),
                             user_symbols=operators)
        result = {"tokenizer": tokenizer_path(out_dir, vocab_size, caseops), "train_docs": len(train_docs),
                  "val_docs": len(val_docs), "val_bytes_shards": []}
        for split, docs in (("val", val_docs), ("train", train_docs)):
            tokens = encode_documents(sp, [transform(doc) for doc in docs])
            written = write_split(tmp, split, tokens, shard_tokens)
            result[f"{split}_shards"] = [(out_dir / path.name, n) for path, n in written]
            result[f"{split}_tokens"] = len(tokens)
            result[f"{split}_bytes"] = sum(len(doc.encode("utf-8")) for doc in docs)
            if caseops and split == "val":
                counted, written = write_byte_sidecar(tmp, tokens, tokenizer_path(tmp, vocab_size), shard_tokens)
                if counted != result["val_bytes"]:     # identity normalization: every original byte is counted
                    raise RuntimeError(f"the demo sidecar counts {counted} bytes, the documents hold {result['val_bytes']}")
                result["val_bytes_shards"] = [(out_dir / path.name, n) for path, n in written]
        if out_dir.is_dir():
            out_dir.rmdir()              # the empty folder it may be (OSError if something appeared meanwhile)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


# ----------------------------------------------------------------------------
# Statistics: Student's t distribution and the one-sided Welch test
# (standard library only; a test checks them against published t-table values)
# ----------------------------------------------------------------------------

MARGIN_NATS = 0.005        # a new record must beat the best by 0.005 nats per token ...
P_THRESHOLD = 0.01         # ... at p < 0.01 (one-sided Welch t-test over seeds)
# Per-seed val_bpb of the accepted best at the time of writing (record #1855): the reference of the t-test, always.
# A reference the user gives (REFERENCE_BPB) is a second test a record must pass too; it can never replace this one.
DEFAULT_REFERENCE_BPB = (1.05989, 1.06125, 1.06209)

_CF_EPS = 1e-15            # relative change that ends the continued fraction
_CF_TINY = 1e-300          # keeps Lentz's method away from division by zero
_CF_MAX_ITER = 100_000


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method.

    It converges fast for x < (a + 1) / (a + b + 2) (within O(sqrt(max(a, b))) terms);
    `_incomplete_beta` uses the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) elsewhere.
    """
    qab, qap, qam = a + b, a + 1.0, a - 1.0

    def guard(v: float) -> float:
        return v if abs(v) > _CF_TINY else _CF_TINY

    c, d = 1.0, 1.0 / guard(1.0 - qab * x / qap)
    h = d
    for m in range(1, _CF_MAX_ITER + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))            # even term d_{2m}
        d = 1.0 / guard(1.0 + aa * d)
        c = guard(1.0 + aa / c)
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))   # odd term d_{2m+1}
        d = 1.0 / guard(1.0 + aa * d)
        c = guard(1.0 + aa / c)
        step = d * c
        h *= step
        if abs(step - 1.0) < _CF_EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _incomplete_beta(a: float, b: float, x: float, y: float) -> float:
    """I_x(a, b) given x and y = 1 - x separately (so neither loses digits to a subtraction)."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, y) / b


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"need a > 0, b > 0, 0 <= x <= 1; got a={a}, b={b}, x={x}")
    return _incomplete_beta(a, b, x, 1.0 - x)


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom (df may be fractional; inf = normal).

    P(|T| > |t|) = I_x(df/2, 1/2) with x = df / (df + t^2).
    """
    if math.isnan(t) or not df > 0:
        raise ValueError(f"need a number t and df > 0; got t={t}, df={df}")
    if math.isinf(df):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    if t == 0.0:
        return 0.5
    t2 = t * t
    if math.isinf(t2):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2))   # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def margin_bpb(val_tokens: int, val_bytes: int, margin_nats: float = MARGIN_NATS) -> float:
    """The required margin in bits per byte: margin_nats / ln 2 * tokens per byte of this run's scoring."""
    return margin_nats / math.log(2.0) * val_tokens / val_bytes


def welch_one_sided(ours: Sequence[float], reference: Sequence[float], margin: float) -> dict:
    """One-sided Welch t-test that `ours` beats `reference` by more than `margin` (lower is better).

    H0: mean(ours) >= mean(reference) - margin.  t = (mean(ours) - mean(reference) + margin) / se,
    se^2 = s1^2/n1 + s2^2/n2 (sample variances), Welch-Satterthwaite df, p = P(T_df <= t).
    Output: t_statistic, welch_df, p_value; each None when a sample has fewer than 2 values or
    both have zero variance (no test is possible).
    """
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.size < 2 or b.size < 2:
        return dict(t_statistic=None, welch_df=None, p_value=None)
    va, vb = float(np.var(a, ddof=1)) / a.size, float(np.var(b, ddof=1)) / b.size
    if va + vb == 0.0:
        return dict(t_statistic=None, welch_df=None, p_value=None)
    t = (float(a.mean()) - float(b.mean()) + margin) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return dict(t_statistic=t, welch_df=df, p_value=student_t_cdf(t, df))


# ----------------------------------------------------------------------------
# Validation text in the training data: every training shard a run read, streamed against the
# validation documents cut into windows of OVERLAP_WINDOW tokens
# ----------------------------------------------------------------------------

# A validation document "occurs in the training data" when every one of its OVERLAP_WINDOW-token windows (its
# body after the BOS cut into consecutive windows, the remainder shorter than a window left out) occurs somewhere
# in the training stream, at any offset, with or without the BOS: a copy of the document, also one whose BOS was
# stripped or that was pasted inside a longer training document. Documents under one window long are not checked
# (the report counts their tokens). Exact matches of token ids only: a paraphrase or re-tokenized text escapes.
OVERLAP_WINDOW = 32
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)              # odd, so invertible mod 2^64
_HASH_BASE_INV = np.uint64(pow(int(_HASH_BASE), -1, 2**64))
_PREFILTER_BITS = 26                                    # a 64 MiB table of the windows' top hash bits
_SCAN_TOKENS = 1 << 22                                  # training tokens hashed per numpy pass


@functools.cache
def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64 (uint64 arithmetic wraps), by doubling (numpy's cumprod is slow here)."""
    p = np.ones(1, dtype=np.uint64)
    while p.size < n:
        p = np.concatenate([p, p * (p[-1:] * base)])
    return p[:n]


def read_shard(path: Path) -> tuple[np.ndarray, bytes]:
    """(the tokens, the file's bytes) of a challenge-format shard; ValueError naming what is wrong with it."""
    data = Path(path).read_bytes()
    header = np.frombuffer(data[:4 * SHARD_HEADER_INTS], dtype="<i4")
    if header.size < SHARD_HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION \
            or len(data) != 4 * SHARD_HEADER_INTS + 2 * int(header[2]):
        raise ValueError(f"{path} is not a challenge shard (bad header or size)")
    return np.frombuffer(data, dtype="<u2", offset=4 * SHARD_HEADER_INTS), data


class ValidationWindows:
    """The validation stream's documents (BOS-delimited) cut into windows of OVERLAP_WINDOW tokens, hashed
    (polynomial hash mod 2^64 of the token ids), for `scan`."""

    def __init__(self, tokens: np.ndarray):
        k = OVERLAP_WINDOW
        self.tokens = tokens
        self.doc_starts = np.flatnonzero(tokens == BOS_ID)
        ends = np.append(self.doc_starts[1:], tokens.size)
        self.windows_per_doc = (ends - self.doc_starts - 1) // k
        n = int(self.windows_per_doc.sum())
        self.doc = np.repeat(np.arange(self.doc_starts.size), self.windows_per_doc)
        first = np.repeat(np.cumsum(self.windows_per_doc) - self.windows_per_doc, self.windows_per_doc)
        self.starts = np.repeat(self.doc_starts + 1, self.windows_per_doc) + k * (np.arange(n) - first)
        powers = _powers(_HASH_BASE, k)
        hashes = np.concatenate([(tokens[s[:, None] + np.arange(k)].astype(np.uint64) + np.uint64(1)) @ powers
                                 for s in np.array_split(self.starts, max(1, n // 65536))]) if n else np.zeros(0, np.uint64)
        self.hashes, self.example, self.which = np.unique(hashes, return_index=True, return_inverse=True)
        self.table = np.zeros(1 << _PREFILTER_BITS, dtype=bool)
        self.table[self.hashes >> np.uint64(64 - _PREFILTER_BITS)] = True

    def scan(self, tokens: np.ndarray, before: np.ndarray) -> np.ndarray:
        """Which of the unique window hashes occur in `tokens` (a training shard), `before` (the previous shard's
        last OVERLAP_WINDOW - 1 tokens) prepended so windows across the boundary count: a boolean per hash, each
        hit confirmed token by token (a hash collision is no match)."""
        k, found = OVERLAP_WINDOW, np.zeros(self.hashes.size, dtype=bool)
        powers, inverse = _powers(_HASH_BASE, _SCAN_TOKENS + k), _powers(_HASH_BASE_INV, _SCAN_TOKENS + k)
        for lo in range(0, max(tokens.size, 1), _SCAN_TOKENS):
            chunk = np.concatenate([before, tokens[lo:lo + _SCAN_TOKENS]])
            before = chunk[-(k - 1):]
            if chunk.size < k or not self.hashes.size:
                continue
            prefix = np.zeros(chunk.size + 1, dtype=np.uint64)      # prefix[i] = sum_{j<i} (t_j + 1) base^j
            np.cumsum((chunk.astype(np.uint64) + np.uint64(1)) * powers[:chunk.size], out=prefix[1:])
            h = (prefix[k:] - prefix[:-k]) * inverse[:chunk.size - k + 1]   # the window at i, as if it started at 0
            at = np.flatnonzero(self.table[h >> np.uint64(64 - _PREFILTER_BITS)])
            slot = np.minimum(np.searchsorted(self.hashes, h[at]), self.hashes.size - 1)
            hit = self.hashes[slot] == h[at]
            at, slot = at[hit], slot[hit]
            same = (chunk[at[:, None] + np.arange(k)]
                    == self.tokens[self.starts[self.example[slot]][:, None] + np.arange(k)]).all(axis=1)
            found[slot[same]] = True
        return found


@functools.cache
def _validation_windows(files: tuple[tuple[str, int, int], ...]) -> ValidationWindows:
    """ValidationWindows of the validation shards (path, size, mtime_ns), concatenated in that order."""
    return ValidationWindows(np.concatenate([read_shard(Path(f))[0] for f, _, _ in files]))


@functools.cache
def _scanned(val_files: tuple, shard: tuple[str, int, int], previous: tuple[str, int, int] | None) -> tuple[str, np.ndarray]:
    """(the sha256 of `shard`, the indices of the validation window hashes found in it with its previous shard's
    last tokens prepended)."""
    tokens, data = read_shard(Path(shard[0]))
    before = np.zeros(0, np.uint16)
    if previous:
        tail = min(OVERLAP_WINDOW - 1, (previous[1] - 4 * SHARD_HEADER_INTS) // 2)
        before = np.fromfile(previous[0], dtype="<u2", offset=previous[1] - 2 * tail) if tail else before
    return hashlib.sha256(data).hexdigest(), np.flatnonzero(_validation_windows(val_files).scan(tokens, before))


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path), st.st_size, st.st_mtime_ns


def validation_shards(data_path: str | None) -> list[Path]:
    """The numbered validation shards fineweb_val_NNNNNN.bin in data_path, sorted (train_gpt.py's find_shards:
    the CaseOps byte sidecar fineweb_val_bytes_* is no shard)."""
    if not data_path or not Path(data_path).is_dir():
        return []
    return sorted(p for p in Path(data_path).glob("fineweb_val_*.bin") if p.stem[len("fineweb_val_"):].isdigit())


def train_val_overlap(val_files: Sequence[Path], train_files: Sequence[Path]) -> dict:
    """Every training shard in `train_files` (in stream order) streamed against the validation shards'
    documents: `found_docs` (indices of the validation documents every window of which occurs in them),
    `docs`, `docs_checked` (at least one window long), `unchecked_tokens` (in shorter documents), `windows`,
    `windows_found`, `first_found_offset` (validation-stream offset of the first found document's BOS, or None),
    `train_sha256` (each training shard's sha256, measured on the way), `train_tokens`, `seconds`. Each shard's
    result is cached for this process (submit checks seeds that read the same shards)."""
    t0 = time.perf_counter()
    val_key = tuple(_file_key(p) for p in val_files)
    vw = _validation_windows(val_key)
    found, shas, tokens, previous = np.zeros(vw.hashes.size, dtype=bool), [], 0, None
    for path in train_files:
        key = _file_key(path)
        sha, hits = _scanned(val_key, key, previous)
        found[hits] = True
        shas.append(sha)
        tokens += (key[1] - 4 * SHARD_HEADER_INTS) // 2
        previous = key if key[1] > 4 * SHARD_HEADER_INTS else previous      # an empty shard passes the tail on
    window_found = found[vw.which]
    per_doc = np.bincount(vw.doc, weights=window_found, minlength=vw.doc_starts.size)
    docs = np.flatnonzero((per_doc == vw.windows_per_doc) & (vw.windows_per_doc > 0))
    lengths = np.diff(np.append(vw.doc_starts, vw.tokens.size))
    return dict(found_docs=docs.tolist(), docs=int(vw.doc_starts.size), docs_checked=int((vw.windows_per_doc > 0).sum()),
                unchecked_tokens=int(lengths[vw.windows_per_doc == 0].sum()),
                windows=int(window_found.size), windows_found=int(window_found.sum()),
                first_found_offset=int(vw.doc_starts[docs[0]]) if docs.size else None,
                train_sha256=shas, train_tokens=tokens, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------
# Submission: read the seeds' run summaries, check them, summarize, assemble a record
# ----------------------------------------------------------------------------

TRACK = "10min_16mb"
NON_RECORD_TRACK = "non_record_16mb"
RECORDS = "records"                   # under the repository root: the folder of the submitted code
RECORD_TRACK_DIR = Path(RECORDS) / f"track_{TRACK}"                  # records (they may beat the best)
NON_RECORD_TRACK_DIR = Path(RECORDS) / f"track_{NON_RECORD_TRACK}"   # on-track runs that miss the bar
MIN_RECORD_SEEDS = 3                  # a record's significance needs at least 3 seeds
# The (tokenizer, validation split) pairs a record may be scored on: the sha256 of the tokenizer file -> its name,
# the validation split's token count (or the range it is known to lie in), and the validation shards' sha256
# (their bytes concatenated in sorted name order), None until pinned: no FineWeb can be downloaded where this
# was written, so `check` prints a run's value on a known tokenizer, to be pasted here from the first run on the
# official download. Until then the split's content is pinned only by its token count.
# CaseOps (the 50,000 FineWeb validation documents through tools/caseops.py, record #1855's tokenizer):
# the records' logs print val_tokens 47,851,520 after cutting the stream to 1 + a multiple of 2,048,
# so the whole split holds 47,851,521 .. 47,853,568 tokens; the exact count is not published.
KNOWN_DATA_PAIRS = {
    "4f5e8adb109c66b4886963bc75a7befd73bda36d27fd7102df8e9e66503b0e2a": dict(
        name="sp1024 fineweb_1024_bpe.model", val_split_tokens=62_021_632, val_shards_sha256=None),
    "4e979c92754cc9d7bdebd9dfe5edf3fc0b41b38714b394e4297fa851e3afd516": dict(
        name="sp8192 fineweb_8192_bpe.model", val_split_tokens=40_540_160, val_shards_sha256=None),
    "97754754561f20def5edd99765ca0668f880bd94e67316d54aa10ab25f45cc4d": dict(
        name="CaseOps sp8192 fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
        val_split_tokens=(47_851_521, 47_853_568), val_shards_sha256=None),
}
RECORD, NON_RECORD, PRACTICE = "record", "non-record", "practice record"
CHALLENGE_CAP_BYTES = 16_000_000      # decimal: code bytes + compressed model bytes
CHALLENGE_TRAIN_MS = 600_000          # 600 s of training on 8xH100 ...
CHALLENGE_EVAL_MS = 600_000           # ... and 600 s of evaluation
LOG_SOURCE_END = "=" * 100 + "\n"     # train_gpt.py's log: its own source, this line, then the run
# Keys train_gpt.py writes from the data-pair contract on; a summary without them is read as unknown data.
DATA_KEYS = ("tokenizer_sha256", "val_shards_sha256")
SWEEP_SUFFIX = ".sweep.json"          # run_8xh100.sh's manifest: logs/<prefix>.sweep.json
# Settings that may differ between the seeds of one record, and that the reproduction command
# leaves out (the launcher sets them: SEED from SEEDS, RUN_ID per seed, EVAL_AUDIT=1).
PER_RUN_SETTINGS = ("SEED", "RUN_ID", "NLL_DUMP", "EVAL_ONLY")
LAUNCHER_SETTINGS = ("SEED", "RUN_ID", "EVAL_AUDIT", "EVAL_ONLY", "NLL_DUMP")
COMPLIANCE_CHECKS = ("causality_ok", "rows_independent_ok", "normalization_ok", "scoring_forward_ok", "score_before_update_ok",
                     "one_pass_ok", "no_train_data_after_deadline", "all_ok")


class SeedRun:
    """One seed's run: its summary logs/<RUN_ID>.json, and the raw bytes of that file and of logs/<RUN_ID>.txt."""

    def __init__(self, run_id: str, summary: dict, json_bytes: bytes, txt_bytes: bytes):
        self.run_id, self.summary, self.json_bytes, self.txt_bytes = run_id, summary, json_bytes, txt_bytes
        self.seed = summary["seed"]
        self.hp = summary["hyperparameters"] or {}
        self.label = f"seed {self.seed} ({run_id})"
        self.missing_data: list[str] = []        # check_data: the run's data files not on disk here
        self.overlap: dict | None = None         # check_data: train_val_overlap of the shards it read


def load_runs(log_dir: str | os.PathLike, run_ids: Sequence[str]) -> tuple[list[SeedRun], list[str]]:
    """Read logs/<RUN_ID>.json and .txt of every run. Output: (runs, reasons it cannot go on)."""
    runs, reasons = [], []
    for run_id in run_ids:
        json_path, txt_path = Path(log_dir) / f"{run_id}.json", Path(log_dir) / f"{run_id}.txt"
        try:
            json_bytes = json_path.read_bytes()
            summary = json.loads(json_bytes)
        except OSError:
            reasons.append(f"{json_path} is missing: run {run_id} did not finish")
            continue
        except ValueError as exc:
            reasons.append(f"{json_path} is not valid JSON ({exc})")
            continue
        missing = [k for k in train_gpt_module().SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
        if missing:
            reasons.append(f"{json_path} lacks {', '.join(missing)}")
            continue
        if summary["run_id"] != run_id:
            reasons.append(f"{json_path} is the summary of run {summary['run_id']!r}, not {run_id!r}")
            continue
        try:
            txt_bytes = txt_path.read_bytes()
        except OSError:
            reasons.append(f"{txt_path} (the train log) is missing")
            continue
        runs.append(SeedRun(run_id, summary, json_bytes, txt_bytes))
    return runs, reasons


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_run(run: SeedRun) -> list[str]:
    """The reasons one seed's run cannot be part of a submission (empty: it can). Nothing the run says
    about itself is taken on trust where it can be checked: the artifact must be on disk, and its size
    and sha256 are measured here; the training-data deadline is the challenge's, checked against the
    times the run recorded, not against its own flag alone."""
    s, hp, reasons = run.summary, run.hp, []
    who = run.label
    if s["eval_only"]:
        return [f"{who} is an EVAL_ONLY re-score, not a training run"]
    for key in ("val_bpb", "val_loss", "bytes_total", "bytes_code", "train_time_ms", "eval_time_ms", "val_tokens",
                "val_bytes", "train_data_last_read_ms"):
        if not _number(s[key]):
            reasons.append(f"{who} has no {key} ({s[key]!r})")
    if reasons:
        return reasons
    artifact = Path(s["artifact_path"]) if s["artifact_path"] else None
    if artifact is None or not artifact.is_file():
        reasons.append(f"{who}: its artifact {s['artifact_path']} is not on disk: its size and sha256 cannot be checked")
        return reasons
    data = artifact.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != s["artifact_sha256"]:
        reasons.append(f"{who}: {artifact} has sha256 {digest}, not the {s['artifact_sha256']} its run wrote")
    if len(data) != s["bytes_model"]:
        reasons.append(f"{who}: {artifact} is {len(data):,} bytes, not the {s['bytes_model']} its run reported")
    per_rank = s["roundtrip_sha256_per_rank"]
    if not isinstance(per_rank, list) or len(per_rank) != s["world_size"] or any(h != digest for h in per_rank):
        reasons.append(f"{who}: roundtrip_sha256_per_rank {per_rank!r} is not {s['world_size']} (world_size) copies of "
                       f"the artifact's measured sha256 {digest}")
    total = s["bytes_code"] + len(data)
    budget = hp.get("ARTIFACT_BUDGET_BYTES")
    if total > CHALLENGE_CAP_BYTES:
        reasons.append(f"{who} is over the byte cap: code {s['bytes_code']:,} + artifact {len(data):,} = {total:,} "
                       f"> {CHALLENGE_CAP_BYTES:,}")
    elif _number(budget) and total > budget:
        reasons.append(f"{who} is over its budget: {total:,} bytes > ARTIFACT_BUDGET_BYTES={budget:,}")
    cap_s = hp.get("MAX_WALLCLOCK_SECONDS")
    if _number(cap_s) and cap_s > 0 and s["train_time_ms"] > 1e3 * cap_s:
        reasons.append(f"{who} trained past its wallclock cap: train_time_ms {s['train_time_ms']:.0f} > "
                       f"1000 * MAX_WALLCLOCK_SECONDS = {1e3 * cap_s:.0f}")
    if s["train_time_ms"] > CHALLENGE_TRAIN_MS:
        reasons.append(f"{who} trained past the challenge's 600 s: train_time_ms {s['train_time_ms']:.0f} > "
                       f"{CHALLENGE_TRAIN_MS}")
    calibration = s["quant"] or {}
    reads = {"train_data_last_read_ms": s["train_data_last_read_ms"]}
    if calibration.get("calibration") == "train":
        reads["quant.calibration_end_ms"] = calibration.get("calibration_end_ms")
    deadline = min(CHALLENGE_TRAIN_MS, 1e3 * cap_s) if _number(cap_s) and cap_s > 0 else CHALLENGE_TRAIN_MS
    for key, ms in reads.items():
        if not _number(ms) or ms > deadline:
            reasons.append(f"{who} read training data after the deadline: {key} = {ms} ms > {deadline:.0f} ms "
                           "(the earlier of its cap and the challenge's 600 s)")
    if s["train_data_read_after_deadline"] is not False:
        reasons.append(f"{who} says it read training data after its deadline (train_data_read_after_deadline="
                       f"{s['train_data_read_after_deadline']})")
    compliance = s["compliance"]
    if not isinstance(compliance, dict):
        reasons.append(f"{who} has no compliance audit (compliance is null: run it with EVAL_AUDIT=1)")
    else:
        failed = [k if k in compliance else f"{k} (missing)" for k in COMPLIANCE_CHECKS if compliance.get(k) is not True]
        if failed:
            reasons.append(f"{who} failed the compliance audit: {', '.join(failed)}")
    if s["eval_time_ms"] > CHALLENGE_EVAL_MS:
        reasons.append(f"{who} evaluated for longer than the challenge's 600 s: eval_time_ms {s['eval_time_ms']:.0f}")
    if s["val_full_split"] is True and s["val_tokens"] + 1 != s["val_split_tokens"]:
        reasons.append(f"{who} says it scored the whole split, but val_tokens {s['val_tokens']:,} + 1 is not its "
                       f"val_split_tokens {s['val_split_tokens']!r}")
    reasons += check_data(run)
    if run.missing_data and on_track_seed(run):
        reasons.append(f"{who}: its data is not on disk here ({'; '.join(run.missing_data)}): a run on the track "
                       "(8xH100, the whole split, a known data pair) is checked against the tokenizer, the validation "
                       "shards and every training shard it read, so it cannot be submitted without them")
    return reasons + unexplained_settings(run) + check_log(run)


def check_data(run: SeedRun) -> list[str]:
    """The run's data files as they are on disk here (paths as the run recorded them, relative to where it ran),
    against what its summary says: the tokenizer's and the validation shards' sha256 and token count
    (measure_data), each training shard it read (train_shards_read) by its sha256, and the validation documents
    against those training shards (train_val_overlap): a validation document found in them refuses the run,
    whatever it is submitted as. Files that are not on disk are listed in run.missing_data (a run on the track
    is refused without them, check_run); the overlap found, or None, is kept in run.overlap.
    Output: the reasons (empty: none)."""
    s, who, reasons = run.summary, run.label, []
    tokenizer, data_path = run.hp.get("TOKENIZER_PATH"), run.hp.get("DATA_PATH")
    measured = measure_data(tokenizer, data_path)
    for key, value in measured.items():
        claimed = s.get(key)
        if value is not None and claimed is not None and claimed != value:
            reasons.append(f"{who} says {key} {claimed}, but its files here measure {value}")
    shards = s.get("train_shards_read")
    if not isinstance(shards, list) or not shards or not all(isinstance(x, dict) and {"name", "sha256"} <= set(x)
                                                              for x in shards):
        reasons.append(f"{who}'s summary does not name the training shards it read (train_shards_read {shards!r}): "
                       "its training data cannot be checked against the validation documents")
        shards = []
    missing = [] if measured["tokenizer_sha256"] else [f"the tokenizer {tokenizer}"]
    val_files = validation_shards(data_path)
    if not val_files:
        missing.append(f"validation shards in {data_path}")
    train_files = [Path(data_path or ".") / str(x["name"]) for x in shards]
    absent = [f for f in train_files if not f.is_file()]
    run.missing_data = missing + [f"the training shard(s) {', '.join(map(str, absent))}"] * bool(absent)
    if val_files and train_files and not absent:
        try:
            run.overlap = train_val_overlap(val_files, train_files)
        except ValueError as exc:
            return reasons + [f"{who}: {exc}"]
        for x, sha in zip(shards, run.overlap["train_sha256"]):
            if sha != x["sha256"]:
                reasons.append(f"{who}: its training shard {x['name']} in {data_path} has sha256 {sha}, not the "
                               f"{x['sha256']} its run read")
        found = run.overlap["found_docs"]
        if found:
            reasons.append(f"{who}: {len(found):,} of the {run.overlap['docs']:,} validation documents occur in the "
                           f"{len(train_files)} training shard(s) it read (every {OVERLAP_WINDOW}-token window of each, "
                           f"the first document at validation token {run.overlap['first_found_offset']:,}): it trained "
                           "on validation text")
    return reasons


def data_report(run: SeedRun) -> str:
    """One line on what check_data found: the overlap measured (documents and windows found, time), or why
    it was not measured."""
    o = run.overlap
    if o is None:
        return (f"{run.label}: training data not checked against the validation documents: "
                + ("; ".join(run.missing_data) + " not on disk here" if run.missing_data else "no training shards named"))
    return (f"{run.label}: {o['docs_checked']:,} validation documents ({o['windows']:,} windows of {OVERLAP_WINDOW} "
            f"tokens; {o['unchecked_tokens']:,} tokens in shorter documents) against the {len(o['train_sha256'])} "
            f"training shard(s) it read ({o['train_tokens']:,} tokens, {o['seconds']:.1f} s): {len(o['found_docs']):,} "
            f"documents found in them, {o['windows_found'] / max(o['windows'], 1):.2%} of the windows")


def on_track_seed(run: SeedRun) -> bool:
    """The seed, alone, meets the track's conditions: 8xH100, the whole validation split, a known data pair."""
    return on_track_hardware(run.summary) and run.summary["val_full_split"] is True and known_data_pair([run])[0] is not None


def unexplained_settings(run: SeedRun) -> list[str]:
    """A training run's settings come from its preset's defaults or its environment: a value that differs from
    train_gpt.py's default for the run's PRESET while the summary's explicit_settings does not name it would
    leave the reproduction command (which sets exactly those) short of the run. Output: the reasons."""
    tg, hp = train_gpt_module(), run.hp
    preset = tg.PRESETS.get(hp.get("PRESET"))
    if preset is None:
        return [f"{run.label} ran PRESET={hp.get('PRESET')!r}, which train_gpt.py does not have"]
    reasons = []
    if set(hp) != set(tg.SETTINGS):
        reasons.append(f"{run.label}: its hyperparameters are not train_gpt.py's settings (missing: "
                       f"{sorted(set(tg.SETTINGS) - set(hp))}, unknown: {sorted(set(hp) - set(tg.SETTINGS))})")
    explicit = set(run.summary["explicit_settings"] or ())
    hidden = [f"{name}={hp[name]!r}" for name, row in tg.SETTINGS.items()
              if name in hp and name not in explicit and hp[name] != preset.get(name, row.default)]
    if hidden:
        reasons.append(f"{run.label} ran settings that are neither PRESET={hp['PRESET']!r}'s defaults nor in its "
                       "explicit_settings: " + ", ".join(hidden))
    return reasons


_HEADLINE = re.compile(r"^final_\S+_roundtrip_exact val_loss:(\S+) val_bpb:(\S+)$", re.M)
_COMPLIANCE_LINE = re.compile(r"^compliance: (.*)$", re.M)
_EVAL_TIME_LINE = re.compile(r"^eval_time: (\d+)ms", re.M)
_SUMMARY_LINE = re.compile(r"^summary: (.*) sha256 ([0-9a-f]{64})$", re.M)
_VAL_STREAM_LINE = re.compile(r"^val_stream_tokens:(\d+) \(of (\d+)(, partial validation)?\)$", re.M)
_DATA_LINE = re.compile(r"^data: tokenizer sha256 ([0-9a-f]{64}) .* validation shard\(s\) sha256 ([0-9a-f]{64})$", re.M)
_RUNTIME_LINE = re.compile(r"^world_size:(\d+) device:(\S+) ", re.M)
_GPU_LINE = re.compile(r"^gpu:(.*) x(\d+)$", re.M)
_EXPLICIT_LINE = re.compile(r"^explicit_settings:(\[.*\])$", re.M)
_HYPERPARAMETERS_LINE = re.compile(r"^hyperparameters:(\{.*\})$", re.M)
_TRAIN_SHARDS_LINE = re.compile(r"^train_shards_read:(\{.*\})$", re.M)


def check_log(run: SeedRun) -> list[str]:
    """The summary against the lines its run logged after the source. Each of these lines appears
    exactly once (an appended copy is refused, not read): the last, `summary: <path> sha256 <hex>`, must
    name the summary's own sha256 (an edited summary no longer matches the log that vouches for it); the
    headline `final_<scheme>_roundtrip_exact val_loss:%.8f val_bpb:%.8f` must print the summary's val_loss
    and val_bpb; `compliance: {json}` must equal its compliance dict; `eval_time: <N>ms` its eval_time_ms
    to 1 ms; `val_stream_tokens:N (of M[, partial validation])` its val_tokens + 1, val_split_tokens and
    val_full_split; `data: tokenizer sha256 ...` its tokenizer_sha256 and val_shards_sha256; the runtime
    line its world_size and device, on CUDA the `gpu:` line its hardware, and `explicit_settings: [...]` its
    explicit_settings (the reproduction command sets them), `hyperparameters: {...}` its hyperparameters, and
    `train_shards_read: {...}` its train_tokens_read and train_shards_read.
    Someone who rewrites both
    files consistently is not stopped here: the artifact, the data and the code are checked elsewhere.
    Output: the reasons they disagree (empty: they agree)."""
    s, who, reasons = run.summary, run.label, []
    text = run.txt_bytes.decode("utf-8", errors="replace")
    end = text.find("\n" + LOG_SOURCE_END)
    text = text[end + 1 + len(LOG_SOURCE_END):] if end >= 0 else text

    def one(rx: re.Pattern, what: str):
        found = rx.findall(text)
        if len(found) != 1:
            reasons.append(f"{who}: its log has {len(found)} {what} lines, not one")
            return None
        return found[0]

    summary_line = one(_SUMMARY_LINE, "'summary: <path> sha256 <hex>'")
    if summary_line is not None:
        digest = hashlib.sha256(run.json_bytes).hexdigest()
        if summary_line[1] != digest:
            reasons.append(f"{who}: its log vouches for a summary with sha256 {summary_line[1]}; its summary has {digest}")
        if not text.rstrip("\n").endswith(f"summary: {summary_line[0]} sha256 {summary_line[1]}"):
            reasons.append(f"{who}: its log goes on after the summary line")
    headline = one(_HEADLINE, "final_<scheme>_roundtrip_exact")
    printed = (format(s["val_loss"], ".8f"), format(s["val_bpb"], ".8f"))
    if headline is not None and headline != printed:
        reasons.append(f"{who}: its log's headline says val_loss:{headline[0]} val_bpb:{headline[1]}; "
                       f"the summary says {printed[0]} / {printed[1]}")
    line = one(_COMPLIANCE_LINE, "compliance")
    try:
        logged = json.loads(line) if line is not None else None
    except ValueError:
        logged = None
    if line is not None and logged != s["compliance"]:
        reasons.append(f"{who}: its log's compliance line ({line[:200]}) is not the summary's compliance dict")
    eval_time = one(_EVAL_TIME_LINE, "eval_time")
    if eval_time is not None and abs(int(eval_time) - s["eval_time_ms"]) > 1:
        reasons.append(f"{who}: its log's eval_time ({eval_time} ms) is not the summary's eval_time_ms "
                       f"{s['eval_time_ms']:.0f}")
    stream = one(_VAL_STREAM_LINE, "val_stream_tokens")
    if stream is not None and (int(stream[0]) != s["val_tokens"] + 1 or int(stream[1]) != s["val_split_tokens"]
                               or (not stream[2]) != (s["val_full_split"] is True)):
        reasons.append(f"{who}: its log scored {stream[0]} of {stream[1]} validation tokens{stream[2]}; the summary "
                       f"says val_tokens {s['val_tokens']} (+1), val_split_tokens {s['val_split_tokens']}, "
                       f"val_full_split {s['val_full_split']}")
    data = one(_DATA_LINE, "data")
    if data is not None and data != (s.get("tokenizer_sha256"), s.get("val_shards_sha256")):
        reasons.append(f"{who}: its log's data line (tokenizer {data[0]}, validation shards {data[1]}) is not the "
                       "summary's tokenizer_sha256 / val_shards_sha256")
    runtime = one(_RUNTIME_LINE, "world_size/device")
    if runtime is not None and runtime != (str(s["world_size"]), s["device"]):
        reasons.append(f"{who}: its log ran {runtime[0]} process(es) on {runtime[1]}; the summary says "
                       f"{s['world_size']} on {s['device']}")
    settings = one(_HYPERPARAMETERS_LINE, "hyperparameters")
    try:
        logged = json.loads(settings) if settings is not None else None
    except ValueError:
        logged = None
    if settings is not None and logged != s["hyperparameters"]:
        reasons.append(f"{who}: its log's hyperparameters line is not the summary's hyperparameters")
    explicit = one(_EXPLICIT_LINE, "explicit_settings")
    try:
        logged = json.loads(explicit) if explicit is not None else None
    except ValueError:
        logged = None
    if explicit is not None and logged != s["explicit_settings"]:
        reasons.append(f"{who}: its log's explicit settings ({explicit[:200]}) are not the summary's explicit_settings")
    read = one(_TRAIN_SHARDS_LINE, "train_shards_read")
    try:
        logged = json.loads(read) if read is not None else None
    except ValueError:
        logged = None
    if read is not None and logged != dict(tokens=s.get("train_tokens_read"), shards=s.get("train_shards_read")):
        reasons.append(f"{who}: its log's train_shards_read line is not the summary's train_tokens_read / "
                       "train_shards_read")
    if s["device"] == "cuda":
        gpu = one(_GPU_LINE, "gpu")
        if gpu is not None and gpu[0] != s["hardware"]:
            reasons.append(f"{who}: its log ran on {gpu[0]}; the summary says {s['hardware']}")
    return reasons


def full_validation(runs: Sequence[SeedRun]) -> bool:
    """Every seed scored every target of the whole validation split (no VAL_MAX_TOKENS)."""
    return all(r.summary["val_full_split"] is True for r in runs)


class NeedsTrainGpt(RuntimeError):
    """train_gpt.py beside tools/ cannot be imported (torch missing, or no such file)."""


@functools.cache
def train_gpt_module():
    """train_gpt.py beside tools/, imported on first use (it needs torch): the run summary's keys (SUMMARY_KEYS),
    the settings and presets (SETTINGS, PRESETS) are declared there once, and read from there. The harness
    belongs with the train_gpt.py beside it: submit refuses runs of any other code (check_runs)."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import train_gpt
    except ImportError as exc:
        raise NeedsTrainGpt(f"this command reads {root}/train_gpt.py's declarations and cannot import it ({exc}); "
                            "install requirements.txt (torch)") from None
    return train_gpt


@functools.cache
def _ship_code_module():
    """tools/ship_code.py (standard library only), beside this file, however the harness was started."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("ship_code", Path(__file__).with_name("ship_code.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shipped_code(code_path: Path) -> tuple[bytes | None, list[str]]:
    """The train_gpt.py a record ships for the readable source at code_path: its shipped form, made by
    tools/ship_code.py in a subprocess (train_gpt.py's own ship_code(), which imports torch; the harness
    does not) and checked by tools/ship_code.verify_shipped (same AST and line numbers, the readable
    source's sha256). Output: (the shipped bytes, []) or (None, the reasons)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train_gpt.py"
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("ship_code.py")), "write", str(out),
                               "--source", str(code_path)], capture_output=True, text=True)
        if proc.returncode:
            return None, [f"cannot make the shipped form of {code_path}: "
                          + ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1]]
        reasons = _ship_code_module().verify_shipped(str(out), str(code_path))
        return (None, reasons) if reasons else (out.read_bytes(), [])


def check_runs(runs: Sequence[SeedRun], code: bytes | None, code_path: str, shipped: bytes | None = None) -> list[str]:
    """Every reason the runs cannot be assembled into one submission: each seed's own, then the
    seeds against each other and against the train_gpt.py the record would hold: `shipped`, the
    shipped form of the readable source `code` (each run counted its size as bytes_code, recorded
    the readable source's sha256, and logged the readable source or, run from the shipped file, the
    code it unpacks to)."""
    reasons = [r for run in runs for r in check_run(run)]
    seeds = [run.seed for run in runs]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if repeated:
        reasons.append(f"seed(s) {', '.join(map(str, repeated))} appear more than once: seeds must be distinct runs")
    code_bytes = {run.summary["bytes_code"] for run in runs}
    if len(code_bytes) > 1:
        reasons.append("the seeds disagree on code bytes (" + ", ".join(f"{r.label}: {r.summary['bytes_code']}"
                                                                       for r in runs) + "): they ran different train_gpt.py")
    if code is None:
        reasons.append(f"{code_path} is missing: the record needs the script that ran")
    elif shipped is not None:
        digest = hashlib.sha256(code).hexdigest()
        for run in runs:
            if run.summary["bytes_code"] != len(shipped):
                reasons.append(f"{run.label} counted {run.summary['bytes_code']} code bytes; the shipped form of "
                               f"{code_path} is {len(shipped)}")
            if run.summary.get("code_readable_sha256") != digest:
                reasons.append(f"{run.label} ran a readable source of sha256 {run.summary.get('code_readable_sha256')}, "
                               f"not {code_path}'s {digest}")
            if not any(run.txt_bytes.startswith(source + LOG_SOURCE_END.encode()) for source in logged_sources(code, shipped)):
                reasons.append(f"{run.label}: its log records a train_gpt.py different from {code_path} and from its "
                               "shipped form: the record's copy would not be the code that ran")
    for key in ("val_tokens", "val_bytes", "val_split_tokens") + DATA_KEYS:
        if len({run.summary.get(key) for run in runs}) > 1:
            reasons.append(f"the seeds scored different validation sets ({key}: "
                           + ", ".join(f"{r.label}: {r.summary.get(key)}" for r in runs) + ")")
    if runs:
        first = runs[0]
        for run in runs[1:]:
            names = sorted(k for k in set(first.hp) | set(run.hp)
                           if k not in PER_RUN_SETTINGS and first.hp.get(k) != run.hp.get(k))
            if names:
                reasons.append(f"{run.label} ran different settings from {first.label}: " + ", ".join(
                    f"{k}={run.hp.get(k)!r} vs {first.hp.get(k)!r}" for k in names))
    return reasons


def measure_data(tokenizer: str | None, data_path: str | None) -> dict:
    """What the run's data files measure here (paths as the run recorded them, relative to where it ran):
    `tokenizer_sha256` of the TOKENIZER_PATH file, `val_shards_sha256` of the validation shards' bytes
    (validation_shards: the numbered ones, never the CaseOps byte sidecar) concatenated in sorted filename
    order, `val_split_tokens` from their headers. Each is None when its files are not on disk here."""
    out = dict(tokenizer_sha256=None, val_shards_sha256=None, val_split_tokens=None)
    if tokenizer and Path(tokenizer).is_file():
        out["tokenizer_sha256"] = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    shards = validation_shards(data_path)
    if shards:
        digest, tokens = hashlib.sha256(), 0
        for shard in shards:
            data = shard.read_bytes()
            digest.update(data)
            tokens += int(np.frombuffer(data[:4 * SHARD_HEADER_INTS], dtype="<i4")[2])
        out["val_shards_sha256"], out["val_split_tokens"] = digest.hexdigest(), tokens
    return out


def known_data_pair(runs: Sequence[SeedRun]) -> tuple[str | None, str]:
    """(the known FineWeb pair's name, '') when every seed's tokenizer_sha256 is in KNOWN_DATA_PAIRS, its
    val_split_tokens is that pair's, and its val_shards_sha256 is the pair's pinned one (when pinned);
    otherwise (None, why not)."""
    shas = {r.summary.get("tokenizer_sha256") for r in runs}
    splits = {r.summary["val_split_tokens"] for r in runs}
    vals = {r.summary.get("val_shards_sha256") for r in runs}
    if len(shas) != 1 or len(splits) != 1 or len(vals) != 1:
        return None, "the seeds disagree on their data"
    sha, split, val = shas.pop(), splits.pop(), vals.pop()
    if sha not in KNOWN_DATA_PAIRS:
        return None, (f"tokenizer sha256 {sha} is not a known FineWeb tokenizer" if sha else
                      "the summaries carry no tokenizer_sha256")
    pair = KNOWN_DATA_PAIRS[sha]
    tokens = pair["val_split_tokens"]
    lo, hi = tokens if isinstance(tokens, tuple) else (tokens, tokens)
    if not (isinstance(split, int) and lo <= split <= hi):
        known = f"{lo:,}" if lo == hi else f"{lo:,} to {hi:,}"
        return None, f"the {pair['name']} validation split has {known} tokens, these runs' has {split!r}"
    if pair["val_shards_sha256"] is not None and val != pair["val_shards_sha256"]:
        return None, (f"the {pair['name']} validation shards have sha256 {pair['val_shards_sha256']}, these runs' "
                      f"have {val}")
    return pair["name"], ""


def pin_instruction(runs: Sequence[SeedRun]) -> str | None:
    """One line when the runs' tokenizer is a known one whose validation shards' sha256 is not pinned yet: their
    value, and where to paste it (from a run on the official download)."""
    name, _ = known_data_pair(runs)
    sha = runs[0].summary.get("tokenizer_sha256") if runs else None
    if name is None or KNOWN_DATA_PAIRS[sha]["val_shards_sha256"] is not None:
        return None
    return (f"the {name} validation shards' sha256 is not pinned: these runs' is {runs[0].summary['val_shards_sha256']}; "
            f"if they are the official download, pin it: in tools/harness.py set KNOWN_DATA_PAIRS[\"{sha}\"]"
            f"[\"val_shards_sha256\"] to \"{runs[0].summary['val_shards_sha256']}\"")


def on_track_hardware(summary: dict) -> bool:
    """True for a run on the track's machine: CUDA, 8 processes, H100 SXM GPUs (as the run recorded; the
    PCIe and NVL cards also carry 'H100' in their names, e.g. 'NVIDIA H100 PCIe')."""
    name = str(summary["hardware"])
    return (summary["device"] == "cuda" and summary["world_size"] == 8 and "H100" in name
            and not any(other in name for other in ("PCIe", "NVL")))


def classify(runs: Sequence[SeedRun], stats: dict, practice: bool = False) -> tuple[str, list[str]]:
    """What the runs make, and why not more: (RECORD, []) for >= MIN_RECORD_SEEDS seeds on 8xH100 that
    scored the whole validation split of a known FineWeb data pair and beat the reference by MARGIN_NATS at
    p < P_THRESHOLD (against the published best, and against REFERENCE_BPB too when given); (NON_RECORD, the
    significance conditions unmet) for such runs that miss the bar;
    (PRACTICE_RECORD, the track conditions unmet) for anything else, and always with `practice` (the demo)."""
    unmet = []
    if practice:
        unmet.append("a practice sweep (the demo set: run_8xh100.sh without FineWeb shards)")
    if not all(on_track_hardware(r.summary) for r in runs):
        unmet.append(f"not run on the track's hardware (8xH100): these ran on "
                     f"{_one_value([hardware_line(r.summary) for r in runs])}")
    if not full_validation(runs):
        unmet.append("partial validation: these scored part of it (VAL_MAX_TOKENS): " + ", ".join(
            f"{r.label}: {r.summary['val_tokens'] + 1:,} of {r.summary['val_split_tokens']:,} tokens"
            for r in runs if r.summary["val_full_split"] is not True))
    name, why = known_data_pair(runs)
    if name is None:
        unmet.append(f"not a known FineWeb tokenizer and validation split: {why}")
    if unmet:
        return PRACTICE, unmet
    if len(runs) < MIN_RECORD_SEEDS:
        unmet.append(f"{len(runs)} seed(s): a record needs at least {MIN_RECORD_SEEDS}")
    tests = [("the published best", stats)] + [("REFERENCE_BPB", stats["user_reference"])] * bool(stats["user_reference"])
    for against, test in tests:
        if test["p_value"] is None:
            unmet.append(f"no significance test against {against} (it needs at least 2 seeds on each side with some "
                         "spread)")
        elif not test["p_value"] < P_THRESHOLD:
            unmet.append(f"not significant: p = {test['p_value']:.3g} for beating {against} by {MARGIN_NATS} nats "
                         f"(needs p < {P_THRESHOLD})")
    return (NON_RECORD, unmet) if unmet else (RECORD, [])


def hardware_line(summary: dict) -> str | None:
    """The run's hardware as its summary recorded it, e.g. '8x NVIDIA H100 80GB HBM3'."""
    if summary["hardware"] is None:
        return None
    if summary["device"] == "cuda":
        return f"{summary['world_size']}x {summary['hardware']}"
    return f"{summary['hardware']} ({summary['device']}, {summary['world_size']} processes)"


def _one_value(values: Sequence) -> object:
    """The common value of the seeds, or their distinct values joined by ' / '; None if none recorded one."""
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    if not distinct:
        return None
    return distinct[0] if len(distinct) == 1 else " / ".join(map(str, distinct))


def seed_statistics(runs: Sequence[SeedRun], reference: Sequence[float] | None = None) -> dict:
    """Mean and sample std of val_bpb and val_loss over the seeds, and the Welch test against the published best's
    per-seed values (DEFAULT_REFERENCE_BPB): t_statistic, welch_df, p_value. `reference` (REFERENCE_BPB), when
    given and other than those, adds a second test, `user_reference` (its values, mean, t, df, p; else None)."""
    bpb = np.array([run.summary["val_bpb"] for run in runs], dtype=np.float64)
    loss = np.array([run.summary["val_loss"] for run in runs], dtype=np.float64)
    first = runs[0].summary
    margin = margin_bpb(first["val_tokens"], first["val_bytes"])
    best = np.asarray(DEFAULT_REFERENCE_BPB, dtype=np.float64)
    user = None
    if reference is not None and tuple(float(v) for v in reference) != tuple(DEFAULT_REFERENCE_BPB):
        ref = np.asarray(reference, dtype=np.float64)
        user = dict(val_bpb=[float(v) for v in ref], mean=float(ref.mean()), **welch_one_sided(bpb, ref, margin))
    return dict(
        n_seeds=len(runs), val_bpb_mean=float(bpb.mean()), val_loss_mean=float(loss.mean()),
        val_bpb_std=float(np.std(bpb, ddof=1)) if bpb.size > 1 else None,
        val_loss_std=float(np.std(loss, ddof=1)) if loss.size > 1 else None,
        margin_bpb=margin, reference_val_bpb=[float(v) for v in best], reference_mean=float(best.mean()),
        **welch_one_sided(bpb, best, margin), user_reference=user)


def _hp(run: SeedRun, name: str, fmt: str = "") -> str:
    value = run.hp.get(name)
    return "?" if value is None else format(value, fmt)


def technique_summary(run: SeedRun) -> str:
    """One line on what the configuration is, from the run's resolved settings and its quant record."""
    s, hp = run.summary, run.hp
    ttt = "no TTT"
    if hp.get("TTT_ENABLED") and hp.get("TTT_METHOD") == "lora":
        done = s.get("ttt_summary") or {}
        ttt = (f"score-first per-document LoRA TTT (rank {_hp(run, 'TTT_LORA_RANK')}, {_hp(run, 'TTT_LORA_CHUNK')}-target "
               f"chunks scored before they train, lr {_hp(run, 'TTT_LORA_LR')}) with {_hp(run, 'TTT_PHASES')} global SGD "
               f"phases on scored documents (done: {done.get('phases_done', '?')} phases, "
               f"{done.get('documents_adapted', '?')} of {done.get('documents', '?')} documents adapted"
               + (f"; cut by the evaluation budget: {done['cut']}" if done.get("cut") else "") + ")")
    elif hp.get("TTT_ENABLED"):
        trained = "every parameter" if not hp.get("TTT_LAST_N") else f"last {_hp(run, 'TTT_LAST_N')} blocks"
        ttt = (f"score-first TTT ({_hp(run, 'TTT_EPOCHS')} SGD steps per {_hp(run, 'TTT_CHUNK_TOKENS')}-token chunk, "
               f"{trained}, lr {_hp(run, 'TTT_LR')} {_hp(run, 'TTT_LR_SCHEDULE')})")
    shape = f"{_hp(run, 'NUM_LAYERS')} layers x {_hp(run, 'MODEL_DIM')}"
    if hp.get("RECUR_LAYERS"):
        shape += f" (layers {_hp(run, 'RECUR_LAYERS')} x{_hp(run, 'RECUR_PASSES')} from {_hp(run, 'RECUR_START_FRAC')} of the run)"
    if hp.get("PARALLEL_LAST_N"):
        shape += f", last {_hp(run, 'PARALLEL_LAST_N')} blocks parallel ({_hp(run, 'PARALLEL_LANES')} lanes)"
    q = s.get("quant") or {}
    quant = s.get("quant_scheme") or "?"
    if q:
        sigmas = ", ".join(f"{g} {k:.2f}" for g, k in (q.get("sigmas") or {}).items())
        quant += (f" (SDClip k: {sigmas}; GPTQ calibration: {q.get('calibration')}; LQER on "
                  f"{len(q.get('lqer_tensors') or [])} tensors; "
                  + (f"late QAT from step {q['late_qat_step']})" if q.get("late_qat_step") is not None
                     else "late QAT never switched on)"))
    return (f"PRESET={_hp(run, 'PRESET')}: {shape}, {_hp(run, 'NUM_HEADS')} heads / {_hp(run, 'NUM_KV_HEADS')} KV heads, "
            f"MLP {_hp(run, 'MLP_MULT')}x, vocab {_hp(run, 'VOCAB_SIZE')}, tied embeddings; Muon + Adam, "
            f"{_hp(run, 'TRAIN_BATCH_TOKENS')} tokens/step at seq {_hp(run, 'TRAIN_SEQ_LEN')}; {quant} artifact loaded "
            f"back on every rank; eval window {s.get('eval_seq_len')} stride {s.get('eval_stride')}; {ttt}")


def default_name(run: SeedRun) -> str:
    return f"{_hp(run, 'PRESET')}_{_hp(run, 'NUM_LAYERS')}x{_hp(run, 'MODEL_DIM')}_{run.summary.get('quant_scheme') or 'model'}"


def safe_dir_name(text: str) -> str:
    """`text` with every run of characters other than letters, digits, '.', '_' and '-' made one '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "submission"


def sweep_prefix(run_ids: Sequence[str]) -> str:
    """The common part of the seeds' RUN_IDs (run_8xh100.sh names them <prefix>_seed<SEED>)."""
    common = os.path.commonprefix(list(run_ids))
    return re.sub(r"_?(seed\d*)?$", "", common) or common


def run_prefix(run_ids: Sequence[str]) -> str:
    """sweep_prefix as a folder name."""
    return safe_dir_name(sweep_prefix(run_ids))


# --- the sweep: every run of one launch is submitted, crashed or audit-failed seeds included ---------

def write_sweep(log_dir: str | os.PathLike, prefix: str, seeds: Sequence[str], code_path: str | os.PathLike,
                env: dict, practice: bool) -> Path:
    """Write <log_dir>/<prefix>.sweep.json before the sweep's first seed trains: its seeds and run ids
    (<prefix>_seed<SEED>), the sha256 of the code, the settings set in `env` (less the per-run ones), and
    whether it is a practice sweep (the demo). Raises OutputExistsError if that manifest exists."""
    code = Path(code_path).read_bytes()
    names = set(train_gpt_module().SETTINGS) - set(LAUNCHER_SETTINGS)
    manifest = dict(prefix=prefix, seeds=list(seeds), run_ids=[f"{prefix}_seed{seed}" for seed in seeds],
                    code_sha256=hashlib.sha256(code).hexdigest(), code_bytes=len(code),
                    settings={k: env[k] for k in sorted(names) if k in env}, practice=practice,
                    created_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    path = Path(log_dir) / f"{prefix}{SWEEP_SUFFIX}"
    if path.exists():
        raise OutputExistsError(f"{path} already exists: a sweep's manifest is never overwritten (set another RUN_ID)")
    with _atomic_writer(path) as f:
        f.write(_json_bytes(manifest))
    return path


def read_sweep(path: Path, run_ids: Sequence[str]) -> tuple[dict | None, list[str], list[str]]:
    """The sweep manifest at `path` and the runs to submit: all of the manifest's. Output: (manifest,
    run ids, reasons it cannot go on): a missing or unreadable manifest, or `run_ids` (when given) other
    than the manifest's, every run left out or foreign named."""
    try:
        manifest = json.loads(path.read_text())
        listed = [str(r) for r in manifest["run_ids"]]
    except OSError:
        return None, list(run_ids), [f"{path} (the sweep manifest run_8xh100.sh writes before the first seed) is "
                                     "missing: every run of a sweep is submitted, so the sweep must be known"]
    except (ValueError, KeyError, TypeError) as exc:
        return None, list(run_ids), [f"{path} is not a sweep manifest ({exc!r})"]
    reasons = []
    if run_ids:
        left_out = [r for r in listed if r not in run_ids]
        foreign = [r for r in run_ids if r not in listed]
        if left_out:
            reasons.append(f"run(s) {', '.join(left_out)} of sweep {path} are left out: every seed of a sweep is "
                           "submitted, a crashed or failed one too")
        if foreign:
            reasons.append(f"run(s) {', '.join(foreign)} are not in sweep {path}")
    return manifest, listed, reasons


def logged_sources(code: bytes, shipped: bytes | None) -> tuple[bytes, ...]:
    """What a run of this code logs as its source: the readable file, or (run from the shipped file) the
    code the shipped file unpacks to."""
    return (code,) if shipped is None else (code, _ship_code_module().unpack_shipped(shipped)[0])


def check_record_dir(record_dir: Path, kind: str, unmet: Sequence[str], repo: Path) -> list[str]:
    """Where the runs may go: a record only into <repo>/records/track_10min_16mb/, a non-record only into
    <repo>/records/track_non_record_16mb/, a practice record under no records/ at all. Real paths on both
    sides (a symlinked folder, or records/ itself a link, is seen through), and any `records/track_*`
    folder on the resolved path counts, whatever repository the code was copied from."""
    real = Path(os.path.realpath(record_dir))
    allowed = {RECORD: RECORD_TRACK_DIR, NON_RECORD: NON_RECORD_TRACK_DIR}
    home = Path(os.path.realpath(repo / allowed[kind])) if kind in allowed else None
    tracks = [part for above, part in zip(real.parts, real.parts[1:]) if above == RECORDS and part.startswith("track_")]
    inside = real.is_relative_to(Path(os.path.realpath(repo / RECORDS))) or tracks
    if not inside or (home is not None and real.is_relative_to(home) and tracks == [allowed[kind].name]):
        return []
    return [f"{record_dir} is under records/ ({real}), where a {kind} may not go"
            + (f" (its folder is {home})" if home is not None else "") + (": " + "; ".join(unmet) if unmet else "")]


def check_sweep(manifest: dict, path: Path, runs: Sequence[SeedRun], code: bytes | None, log_dir: str | os.PathLike,
                excluded: dict[str, str] | None = None, shipped: bytes | None = None) -> list[str]:
    """The runs against their sweep: the manifest's code and seeds, and no training run of the same code in
    `log_dir` left out of it, whatever its settings (two sweeps that differ in a setting that changes
    nothing would otherwise be two draws to choose from), unless `excluded` names it with a reason (written
    into the submission). The same code: a log whose source has the same AST, docstrings left out
    (logged_code_form), as `code`, so a copy that differs in comments, docstrings or layout counts. A run's
    settings are read from its log, which a summary edit does not change; re-scores (EVAL_ONLY) train
    nothing and are not runs of a sweep. Output: the reasons (empty: none)."""
    reasons, excluded = [], excluded or {}
    if code is not None and manifest.get("code_sha256") != hashlib.sha256(code).hexdigest():
        reasons.append(f"sweep {path} ran code with sha256 {manifest.get('code_sha256')}, not the train_gpt.py "
                       "the record would hold")
    seeds = dict(zip(manifest["run_ids"], manifest.get("seeds") or []))
    for run in runs:
        if str(seeds.get(run.run_id)) != str(run.seed):
            reasons.append(f"{run.label}: sweep {path} launched {run.run_id} with seed {seeds.get(run.run_id)}")
    ids = {run.run_id for run in runs}
    for run_id in sorted(set(excluded) & ids):
        reasons.append(f"--exclude {run_id}: it is a run of sweep {path}, which is submitted whole")
    if code is None or not runs:
        return reasons
    heads = [source + LOG_SOURCE_END.encode() for source in logged_sources(code, shipped)]
    same_code = _ship_code_module().without_docstrings(code)
    for txt in sorted(Path(log_dir).glob("*.txt")):
        if txt.stem in ids or txt.stem in excluded:
            continue
        log = txt.read_bytes()
        if not any(log.startswith(head) for head in heads) and logged_code_form(log) != same_code:
            continue
        hp = logged_settings(txt)
        if hp is not None and hp.get("EVAL_ONLY"):
            continue                                    # a re-score: it trained nothing
        reasons.append(f"{txt} is a run of the same train_gpt.py that is not in sweep {path}: seeds are never picked; "
                       f"name it with --exclude {txt.stem}=REASON (the submission lists it) or move it out of {log_dir}")
    return reasons


def logged_code_form(log: bytes) -> str | None:
    """The code a train log begins with (what stands before a LOG_SOURCE_END line: the first such prefix that
    parses, so the line inside a string of the code does not cut it short) as tools/ship_code.py's
    without_docstrings: the AST with docstrings left out, blind to comments and layout; None when no prefix
    parses."""
    sep, end = b"\n" + LOG_SOURCE_END.encode(), -1
    while (end := log.find(sep, end + 1)) >= 0:
        try:
            return _ship_code_module().without_docstrings(log[:end + 1])
        except (SyntaxError, ValueError):
            continue
    return None


def logged_settings(txt: Path) -> dict | None:
    """A run's resolved settings from its log's `hyperparameters:` line; None when it has none."""
    match = re.search(r"^hyperparameters:(\{.*\})$", txt.read_text(errors="replace"), re.M)
    try:
        return json.loads(match.group(1)) if match else None
    except ValueError:
        return None


KIND_LINES = {RECORD: "A record: it meets every condition of the track and beats the reference.",
              NON_RECORD: "A non-record submission (on the track, on the whole FineWeb validation split), not a "
                          "record: {why}.",
              PRACTICE: "Not run on 8xH100 with FineWeb as the track runs: a practice record, not a leaderboard "
                        "submission: {why}."}


def build_submission(runs: Sequence[SeedRun], stats: dict, *, kind: str, unmet: Sequence[str], sweep: dict,
                     name: str, author: str | None, github_id: str | None, date: str) -> dict:
    """submission.json: RULES.md's fields in its order, then the test's inputs and versions, then what the
    runs make (`kind`: record, non-record or practice record) and the conditions they do not meet, the
    data pair, and the sweep."""
    first = runs[0]
    fmt = lambda v: "n/a" if v is None else f"{v:.5f}"  # noqa: E731
    on_track = all(on_track_hardware(r.summary) for r in runs)
    verdict = ("" if stats["p_value"] is None else
               f"; one-sided Welch p = {stats['p_value']:.3g} for beating the reference by "
               f"{MARGIN_NATS} nats ({stats['margin_bpb']:.5f} bpb)")
    partial = "" if full_validation(runs) else (
        f" Partial validation: scored the first {first.summary['val_tokens'] + 1:,} of the split's "
        f"{first.summary['val_split_tokens']:,} tokens (VAL_MAX_TOKENS).")
    blurb = (f"{technique_summary(first)}. Mean val_bpb {stats['val_bpb_mean']:.5f} "
             f"(sample std {fmt(stats['val_bpb_std'])}) over {len(runs)} seed(s){verdict}."
             + " " + KIND_LINES[kind].format(why="; ".join(unmet)) + partial)
    return {
        "author": author, "github_id": github_id, "name": name, "blurb": blurb, "date": date,
        "val_loss": stats["val_loss_mean"], "val_bpb": stats["val_bpb_mean"],
        "bytes_total": max(r.summary["bytes_total"] for r in runs), "bytes_code": first.summary["bytes_code"],
        "track": TRACK, "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): {
            "val_loss": r.summary["val_loss"], "val_bpb": r.summary["val_bpb"],
            "artifact_bytes": r.summary["bytes_total"], "steps": r.summary["steps"],
            "step_avg_ms": r.summary["step_avg_ms"], "eval_time_s": r.summary["eval_time_ms"] / 1e3,
            "train_time_s": r.summary["train_time_ms"] / 1e3, "run_id": r.run_id, "ttt": r.summary.get("ttt_summary"),
            "artifact_sha256": r.summary["artifact_sha256"]} for r in runs},
        "val_bpb_std": stats["val_bpb_std"],
        "hardware": _one_value([hardware_line(r.summary) for r in runs]),
        "pytorch_version": _one_value([r.summary["torch_version"] for r in runs]),
        "t_statistic": stats["t_statistic"], "welch_df": stats["welch_df"], "p_value": stats["p_value"],
        "technique_summary": technique_summary(first),
        "val_loss_std": stats["val_loss_std"], "margin_bpb": stats["margin_bpb"],
        "reference_val_bpb": stats["reference_val_bpb"], "user_reference": stats["user_reference"],
        "cuda_version": _one_value([r.summary["cuda_version"] for r in runs]),
        "on_track_hardware": on_track,
        "val_full_split": full_validation(runs),
        "kind": kind, "not_a_record_because": list(unmet),
        "tokenizer_sha256": _one_value([r.summary.get("tokenizer_sha256") for r in runs]),
        "val_shards_sha256": _one_value([r.summary.get("val_shards_sha256") for r in runs]),
        "val_split_tokens": _one_value([r.summary["val_split_tokens"] for r in runs]),
        "known_data_pair": known_data_pair(runs)[0],
        "train_data": {str(r.seed): dict(
            tokens_read=r.summary.get("train_tokens_read"), shards_read=len(r.summary.get("train_shards_read") or []),
            val_docs_in_train_checked=r.overlap is not None,
            **({k: r.overlap[k] for k in ("docs", "docs_checked", "windows", "windows_found")} if r.overlap else {}))
            for r in runs},
        "sweep": {k: sweep.get(k) for k in ("prefix", "seeds", "run_ids", "code_sha256", "practice")},
    }


# How far an EVAL_ONLY re-score of an artifact may land from its run's val_bpb. On the CPU, with the same number
# of processes, every sum is made in the same order: bit for bit (tests/test_seeds.py re-scores a record this way).
# On CUDA, kernels that accumulate with atomics (flash attention's backward in LoRA TTT, split reductions) are not
# deterministic, so TTT trains along a slightly different path; and the evaluation budget cuts TTT where the clock
# says, so a re-score may cut at another document. The tolerance is a tenth of the record margin: an assumption
# (no GPU re-score has been measured); the check prints the difference and both TTT cuts, so the first one measures it.
RESCORE_TOLERANCE_NATS = MARGIN_NATS / 10
RESCORE_TOLERANCE_NOTE = {
    False: "0: on the CPU, with the same number of processes, a re-score reproduces the run bit for bit.",
    True: f"{RESCORE_TOLERANCE_NATS} nats per token, a tenth of the record margin, in bpb at the run's tokens per byte "
          "(an assumption, not measured): CUDA kernels that accumulate with atomics make TTT's path differ slightly, "
          "and the evaluation budget may cut TTT at another document (the line prints both cuts)."}


def rescore_tolerance_bpb(summary: dict) -> float:
    """How far a re-score (EVAL_ONLY, the same number of processes) of the run's artifact may land from its
    val_bpb: 0 on the CPU, RESCORE_TOLERANCE_NATS in bpb at the run's val_tokens / val_bytes on CUDA."""
    if summary["device"] != "cuda":
        return 0.0
    return margin_bpb(summary["val_tokens"], summary["val_bytes"], RESCORE_TOLERANCE_NATS)


def _env_value(value: object) -> str:
    return shlex.quote(value if isinstance(value, str) else repr(value))


def explicit_settings(run: SeedRun) -> dict[str, object]:
    """The settings a command must set to reproduce the run: those its environment set (the summary's
    `explicit_settings`, which the run recorded), with their values, less the launcher's own."""
    return {k: run.hp[k] for k in sorted(run.summary["explicit_settings"]) if k not in LAUNCHER_SETTINGS and k in run.hp}


def _rebase(path: str, start: Path) -> str:
    """`path` (relative to the runs' working directory, or absolute) as seen from `start`."""
    return path if os.path.isabs(path) else os.path.relpath(path, start)


def _env_line(settings: dict) -> str:
    return " ".join(f"{k}={_env_value(v)}" for k, v in settings.items())


def _fmt(value, spec: str) -> str:
    """`value` formatted with `spec`; 'n/a' for None, and as recorded for anything that is not a number."""
    if value is None:
        return "n/a"
    return format(value, spec) if _number(value) else str(value)


def record_readme(runs: Sequence[SeedRun], sub: dict, stats: dict, record_dir: Path, code: bytes) -> str:
    """README.md of the record: technique stack, per-seed table, significance, audit, commands."""
    first, s = runs[0], runs[0].summary
    explicit = explicit_settings(first)
    nproc = s["world_size"]
    data = {k: _rebase(str(first.hp.get(k, "")), record_dir) for k in ("DATA_PATH", "TOKENIZER_PATH")}
    in_folder = dict(explicit, **data)
    torchrun = f"torchrun --standalone --nproc_per_node={nproc} train_gpt.py"
    seeds = " ".join(str(r.seed) for r in runs)
    lines = [f"# {sub['name']}", ""]
    why = "".join(f"\n- {reason}" for reason in sub["not_a_record_because"])
    lines += [{RECORD: "**Record.** Every condition of a record is met: at least 3 seeds on 8xH100, the whole "
                       "validation split of a known FineWeb tokenizer and split, and the significance bar.",
               NON_RECORD: "**Non-record submission.** On the track's hardware and the whole FineWeb validation "
                           "split, but not a record:" + why,
               PRACTICE: "**Practice record.** The figures below are not leaderboard figures, and this folder is "
                         "not a submission:" + why}[sub["kind"]], "",
              f"Data: tokenizer sha256 `{sub['tokenizer_sha256']}`, validation shards sha256 "
              f"`{sub['val_shards_sha256']}` ({sub['val_split_tokens']:,} tokens): "
              + (f"the known FineWeb pair {sub['known_data_pair']}." if sub["known_data_pair"] else
                 "not a known FineWeb pair."), "",
              "Training data: " + "; ".join(
                  f"seed {seed} read the stream's first {_fmt(t['tokens_read'], ',')} tokens, {t['shards_read']} "
                  "shard(s) (names and sha256 in its summary's `train_shards_read`), "
                  + (f"in which {t['windows_found']:,} of the {t['windows']:,} {OVERLAP_WINDOW}-token windows of the "
                     f"{t['docs_checked']:,} validation documents occur and no whole document"
                     if t["val_docs_in_train_checked"] else "not checked against the validation documents (not on disk)")
                  for seed, t in sub["train_data"].items()) + ".", "",
              f"Sweep `{sub['sweep']['prefix']}`: seeds {', '.join(map(str, sub['sweep']['seeds']))}, every one of "
              "them below (its manifest is in this folder).", ""]
    if sub.get("excluded_runs"):
        lines += ["Other runs of the same code, left out by the submitter with these reasons: " + "; ".join(
            f"`{run_id}`: {why}" for run_id, why in sub["excluded_runs"].items()) + ".", ""]
    if not sub["val_full_split"]:
        lines += [f"**Partial validation.** The runs scored only the first {s['val_tokens'] + 1:,} of the validation "
                  f"split's {s['val_split_tokens']:,} tokens (`VAL_MAX_TOKENS`): not a score on the challenge's "
                  "validation set, and never a record.", ""]
    lines += [sub["blurb"], "",
              f"**val_bpb {sub['val_bpb']:.8f}** (mean of {len(runs)} seed(s), sample std "
              f"{_fmt(sub['val_bpb_std'], '.8f')}), val_loss {sub['val_loss']:.8f} nats per token; largest artifact "
              f"{sub['bytes_total']:,} bytes (code {sub['bytes_code']:,} + model); {sub['hardware']}, "
              f"PyTorch {sub['pytorch_version']}, CUDA {sub['cuda_version'] or 'n/a'}.", "",
              "## Technique stack", "",
              f"- `PRESET={_hp(first, 'PRESET')}`: {_hp(first, 'NUM_LAYERS')} layers x {_hp(first, 'MODEL_DIM')}, "
              f"{_hp(first, 'NUM_HEADS')} query heads / {_hp(first, 'NUM_KV_HEADS')} KV heads, MLP "
              f"{_hp(first, 'MLP_MULT')}x, vocab {_hp(first, 'VOCAB_SIZE')}, {s.get('model_params', '?'):,} parameters."
              if isinstance(s.get("model_params"), int) else
              f"- `PRESET={_hp(first, 'PRESET')}`: {_hp(first, 'NUM_LAYERS')} layers x {_hp(first, 'MODEL_DIM')}.",
              f"- Training: {_hp(first, 'TRAIN_BATCH_TOKENS')} tokens per step at sequence length "
              f"{_hp(first, 'TRAIN_SEQ_LEN')}; Muon (lr {_hp(first, 'MATRIX_LR')}) for the block matrices, Adam "
              f"(lr {_hp(first, 'SCALAR_LR')}, tied embedding {_hp(first, 'TIED_EMBED_LR')}) for the rest; warmdown "
              f"over the last {_hp(first, 'WARMDOWN_FRAC')} of the run; wallclock cap "
              f"{_hp(first, 'MAX_WALLCLOCK_SECONDS')} s, at most {_hp(first, 'ITERATIONS')} steps.",
              f"- Artifact: {s.get('quant_scheme') or '?'} (lzma preset {_hp(first, 'LZMA_PRESET')}), written by "
              "rank 0, read back from disk and scored by every rank.",
              f"- Evaluation: window {s.get('eval_seq_len')}, stride {s.get('eval_stride')}"
              + (" (sliding window)" if s.get("eval_stride") != s.get("eval_seq_len") else "")
              + f"; {'score-first test-time training' if first.hp.get('TTT_ENABLED') else 'no test-time training'}; "
              "compliance self-audit on (`EVAL_AUDIT=1`).",
              f"- Summary: {sub['technique_summary']}", "",
              "## Results per seed", "",
              "| seed | run | val_bpb | val_loss | pre-quant val_bpb | steps | step avg (ms) | train (s) | eval (s) "
              "| bytes_total | audit |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        x = r.summary
        lines.append(f"| {r.seed} | `{r.run_id}` | {x['val_bpb']:.8f} | {x['val_loss']:.8f} | "
                     f"{_fmt(x.get('pre_quant_val_bpb'), '.8f')} | {x['steps']} | {_fmt(x['step_avg_ms'], '.2f')} | "
                     f"{x['train_time_ms'] / 1e3:.1f} | {x['eval_time_ms'] / 1e3:.1f} | {x['bytes_total']:,} | "
                     f"{'all_ok' if (x['compliance'] or {}).get('all_ok') else 'FAILED'} |")
    lines += [f"| **mean** | | **{stats['val_bpb_mean']:.8f}** | {stats['val_loss_mean']:.8f} | | | | | | | |",
              f"| sample std | | {_fmt(stats['val_bpb_std'], '.8f')} | {_fmt(stats['val_loss_std'], '.8f')} "
              "| | | | | | | |", ""]
    lines += ["## Significance", "",
              f"One-sided Welch t-tests, required margin {MARGIN_NATS} nats per token = {stats['margin_bpb']:.6f} bpb at "
              f"this scoring's {s['val_tokens']:,} tokens over {s['val_bytes']:,} bytes (margin_bpb = {MARGIN_NATS} / "
              "ln 2 * val_tokens / val_bytes). H0: our mean >= reference mean - margin. The reference is always the "
              "published best's per-seed val_bpb; a reference the submitter gave (REFERENCE_BPB) is a second test "
              "that a record must pass too.", ""]
    user = stats["user_reference"]
    for against, values, test in [("the published best", stats["reference_val_bpb"], stats)] + [
            ("REFERENCE_BPB", user and user["val_bpb"], user)] * bool(user):
        head = f"- Against {against} ({', '.join(f'{v:.5f}' for v in values)}; mean {float(np.mean(values)):.5f}): "
        if test["p_value"] is None:
            lines.append(head + "no test: it needs at least 2 seeds on each side with some spread.")
        else:
            met = test["p_value"] < P_THRESHOLD
            lines.append(head + f"t = {test['t_statistic']:.4f}, Welch df = {test['welch_df']:.3f}, p = "
                         f"{test['p_value']:.3g}: p < {P_THRESHOLD} is **{'met' if met else 'not met'}**.")
    lines += ["", "## Compliance audit (per seed)", "",
              "| seed | " + " | ".join(COMPLIANCE_CHECKS) + " |", "|---:|" + "---|" * len(COMPLIANCE_CHECKS)]
    for r in runs:
        c = r.summary["compliance"] or {}
        lines.append(f"| {r.seed} | " + " | ".join(str(c.get(k)) for k in COMPLIANCE_CHECKS) + " |")
    lines += ["", "## Reproduce", "",
              "On an 8xH100 box, in the directory the runs ran in (it holds `run_8xh100.sh`, `tools/`, "
              "`requirements.txt`, and the FineWeb data under `./data`: for CaseOps, the default, built from the official "
              "documents file by `python3 tools/caseops.py build --docs data/docs_selected.jsonl --val-docs 50000 "
              "--train-shards 80 --tokenizer data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model "
              "--out data/datasets/fineweb10B_sp8192_caseops`; for `PRESET=sp8192` from openai/parameter-golf's downloader: "
              "`MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf python3 data/cached_challenge_fineweb.py --variant "
              "sp8192 --train-shards 128`, `--variant sp1024` for sp1024), the one command:",
              "", "```bash", "pip install -r requirements.txt",
              " ".join(filter(None, [f'SEEDS="{seeds}"', f"NPROC={nproc}" if nproc != 8 else "",
                                     _env_line(explicit), "bash run_8xh100.sh"])), "```", "",
              f"This folder's `train_gpt.py` is the shipped form of the readable source (sha256 "
              f"`{s.get('code_readable_sha256')}`, the source every log begins with): {s['bytes_code']:,} bytes, the "
              "`bytes_code` each run counted, which unpacks to the same code with comments and docstrings removed "
              "(same AST and line numbers); `python3 tools/ship_code.py verify train_gpt.py --source <readable "
              "train_gpt.py>` checks it, `python3 tools/ship_code.py unpack train_gpt.py code.py` shows it.", "",
              f"Settings not named are `train_gpt.py`'s defaults for `PRESET={_hp(first, 'PRESET')}`; every resolved "
              "setting is in each log's `hyperparameters:` line and in the `.json` summaries. This folder's "
              "`train_gpt.py` also runs on its own, from inside this folder (one seed; it writes `logs/` and "
              "`artifacts/` here):", "", "```bash",
              f"SEED={first.seed} RUN_ID=repro_{first.run_id} EVAL_AUDIT=1 {_env_line(in_folder)} {torchrun}", "```",
              "", "## Re-score a saved artifact (EVAL_ONLY) and check the NLL dump", "",
              "The artifacts are not in this folder: each run wrote `artifacts/<RUN_ID>.pgolf.xz` next to its logs. "
              "Check one against the sha256 its summary recorded, score it from inside this folder with `EVAL_ONLY` "
              "(the model's shape comes from the artifact; SEED draws the per-document LoRA adapters as the run did) "
              "and the same number of processes, compare the re-score's val_bpb with the seed's (the line prints the "
              "difference and each one's TTT cut, and exits 1 past the tolerance), then recompute val_bpb from the "
              "re-score's per-target NLL dump (`target`, `nll` in nats as float64, `bytes`): it must print the "
              f"re-score's val_bpb. Tolerance: {RESCORE_TOLERANCE_NOTE[s['device'] == 'cuda']}", ""]
    for r in runs:
        artifact = _rebase(r.summary["artifact_path"], record_dir)
        npz = f"rescore_{r.run_id}.npz"
        tolerance = rescore_tolerance_bpb(r.summary)
        lines += [f"Seed {r.seed} (val_bpb {r.summary['val_bpb']:.8f}):", "", "```bash",
                  f"echo {shlex.quote(r.summary['artifact_sha256'] + '  ' + artifact)} | sha256sum -c -",
                  f"SEED={r.seed} EVAL_ONLY={shlex.quote(artifact)} RUN_ID=rescore_{r.run_id} NLL_DUMP={npz} EVAL_AUDIT=1 "
                  f"{_env_line(in_folder)} {torchrun}",
                  f"python3 -c \"import json; a, b = (json.load(open(p)) for p in ('{r.run_id}.json', "
                  f"'logs/rescore_{r.run_id}.json')); d = b['val_bpb'] - a['val_bpb']; print('re-score val_bpb %.8f, "
                  f"the run %.8f: difference %+.3g bpb (tolerance {tolerance:.3g}); TTT cut: %s, the run %s' % "
                  f"(b['val_bpb'], a['val_bpb'], d, (b['ttt_summary'] or {{}}).get('cut'), "
                  f"(a['ttt_summary'] or {{}}).get('cut'))); raise SystemExit(abs(d) > {tolerance!r})\"",
                  f"python3 -c \"import math, numpy as np; d = np.load('{npz}'); "
                  f"print('%.8f' % (d['nll'].sum() / (math.log(2) * d['bytes'].sum())))\"", "```", ""]
    lines += ["## Files", "",
              "- `submission.json`: the fields above (`seed_results` per seed; `bytes_total` is the largest over seeds).",
              "- `train_gpt.py`: the script the runs ran, shipped compressed (it unpacks to the source at the top "
              "of each log, comments and docstrings removed).",
              "- `requirements.txt`: the packages it needs.",
              "- " + ", ".join(f"`{r.run_id}.txt`" for r in runs) + ": the train logs; "
              + ", ".join(f"`{r.run_id}.json`" for r in runs) + ": the run summaries the figures above come from.",
              "", f"Assembled by `tools/harness.py submit` on {sub['date']}.", ""]
    return "\n".join(lines)


def write_record(record_dir: Path, files: dict[str, bytes]) -> None:
    """Create `record_dir` holding `files`, all at once: they are written into a hidden sibling folder
    that is then renamed; a record folder that already exists is never touched."""
    record_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_dir.parent / f".{record_dir.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if record_dir.exists():
            raise FileExistsError(f"{record_dir} appeared while the record was being written")
        os.rename(tmp, record_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()


def update_top_level(path: Path, sub: dict) -> str:
    """Make `sub` the entry's top-level submission.json unless that file already holds a better score."""
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    best = current.get("val_bpb") if isinstance(current, dict) else None
    if _number(best) and best <= sub["val_bpb"]:
        return f"kept {path}: it holds val_bpb {best:.8f}, not worse than this record's {sub['val_bpb']:.8f}"
    with _atomic_writer(path) as f:
        f.write(_json_bytes(sub))
    return f"wrote {path} (val_bpb {sub['val_bpb']:.8f})"


def print_summary(runs: Sequence[SeedRun], stats: dict | None) -> None:
    print(f"submit: {len(runs)} seed(s)")
    print(f"  {'seed':>6} {'val_bpb':>12} {'val_loss':>12} {'bytes_total':>12} {'steps':>7} {'train_s':>8} "
          f"{'eval_s':>7}  audit")
    for r in runs:
        x = r.summary
        audit = "all_ok" if isinstance(x["compliance"], dict) and x["compliance"].get("all_ok") else "FAILED/none"
        seconds = {k: x[k] / 1e3 if _number(x[k]) else x[k] for k in ("train_time_ms", "eval_time_ms")}
        print(f"  {r.seed!s:>6} {_fmt(x['val_bpb'], '12.8f')} {_fmt(x['val_loss'], '12.8f')} {x['bytes_total']!s:>12} "
              f"{x['steps']!s:>7} {_fmt(seconds['train_time_ms'], '8.1f')} {_fmt(seconds['eval_time_ms'], '7.1f')}  "
              f"{audit}")
    if stats is None:
        return
    print(f"  mean val_bpb {stats['val_bpb_mean']:.8f} (sample std {_fmt(stats['val_bpb_std'], '.8f')}), "
          f"mean val_loss {stats['val_loss_mean']:.8f} (sample std {_fmt(stats['val_loss_std'], '.8f')})")
    user = stats["user_reference"]
    for against, mean, test in [("the published best", stats["reference_mean"], stats)] + [
            ("REFERENCE_BPB", user and user["mean"], user)] * bool(user):
        line = f"  Welch one-sided vs {against} (mean {mean:.5f}) - margin {stats['margin_bpb']:.6f} bpb: "
        if test["p_value"] is None:
            print(line + "no test (needs >= 2 seeds with some spread)")
        else:
            print(line + f"t={test['t_statistic']:.4f} df={test['welch_df']:.3f} p={test['p_value']:.3g} "
                  f"(record needs p < {P_THRESHOLD}: {'met' if test['p_value'] < P_THRESHOLD else 'not met'})")


def submit(run_ids: Sequence[str], *, log_dir: str | os.PathLike = "logs", code_path: str | os.PathLike = "train_gpt.py",
           requirements_path: str | os.PathLike = "requirements.txt", record_dir: str | os.PathLike | None = None,
           reference: Sequence[float] | None = None, name: str | None = None, author: str | None = None,
           github_id: str | None = None, date: str | None = None, top_level: str | os.PathLike = "submission.json",
           sweep: str | os.PathLike | None = None, practice: bool = False, exclude: dict[str, str] | None = None,
           dry_run: bool = False) -> tuple[int, dict | None]:
    """Check, summarize and assemble one sweep's runs into a record folder (paths relative to the
    directory the runs ran in). Output: (exit status, submission dict or None).

    The runs are every run of the sweep manifest `sweep` (default <log_dir>/<prefix of run_ids>.sweep.json);
    `run_ids`, when given, must be exactly those. 0: assembled (or, with dry_run, would be); 1: refused,
    every reason printed, nothing written. What the runs make (`classify`) decides where they go: a record
    to <repo>/records/track_10min_16mb/<date>_<name>/, and only a record may update the top-level
    submission.json; a non-record to <repo>/records/track_non_record_16mb/<date>_<name>/; a practice
    record (always with `practice`) to <log_dir>/<prefix>_record/. <repo> is the folder of `code_path`;
    a record_dir whose real path is under <repo>/records/ must be in its kind's folder there.
    """
    sweep_path = Path(sweep) if sweep else Path(log_dir) / f"{sweep_prefix(run_ids)}{SWEEP_SUFFIX}"
    manifest, run_ids, reasons = read_sweep(sweep_path, run_ids) if run_ids or sweep else (None, [], [
        "no runs: name a sweep manifest (--sweep) or its RUN_IDs"])
    runs, load_reasons = load_runs(log_dir, run_ids) if not reasons else ([], [])
    if reasons or load_reasons:
        if runs:
            print_summary(runs, None)
        for reason in reasons + load_reasons:
            print(f"submit: refusing to assemble: {reason}", file=sys.stderr)
        return 1, None
    code_path, requirements_path = Path(code_path), Path(requirements_path)
    code = code_path.read_bytes() if code_path.is_file() else None
    shipped, reasons = shipped_code(code_path) if code is not None else (None, [])
    reasons += (check_runs(runs, code, str(code_path), shipped)
                + check_sweep(manifest, sweep_path, runs, code, log_dir, exclude, shipped))
    if not requirements_path.is_file():
        reasons.append(f"{requirements_path} is missing: the record needs it")
    numbers_ok = all(_number(r.summary[k]) for r in runs for k in ("val_bpb", "val_loss", "val_tokens", "val_bytes"))
    stats = seed_statistics(runs, reference) if numbers_ok else None
    print_summary(runs, stats)
    for line in [data_report(run) for run in runs] + [pin_instruction(runs)]:
        if line:
            print(f"  {line}")
    if stats is None:
        reasons.append("the seeds' scores are not numbers")
        kind, unmet = PRACTICE, []
    else:
        kind, unmet = classify(runs, stats, practice=practice or manifest.get("practice") is True)
    date = date or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    name = name or default_name(runs[0])
    repo = Path(os.path.realpath(code_path)).parent
    if record_dir is None:
        record_dir = ({RECORD: repo / RECORD_TRACK_DIR, NON_RECORD: repo / NON_RECORD_TRACK_DIR}[kind]
                      / f"{date}_{safe_dir_name(name)}" if kind != PRACTICE else Path(log_dir) / f"{run_prefix(run_ids)}_record")
    record_dir = Path(record_dir)
    if os.path.lexists(record_dir):
        reasons.append(f"{record_dir} already exists: a record is never overwritten (set RECORD_DIR elsewhere)")
    reasons += check_record_dir(record_dir, kind, unmet, repo)
    if reasons:
        for reason in reasons:
            print(f"submit: refusing to assemble: {reason}", file=sys.stderr)
        return 1, None
    sub = build_submission(runs, stats, kind=kind, unmet=unmet, sweep=manifest, name=name, author=author,
                           github_id=github_id, date=date)
    sub["excluded_runs"] = dict(sorted((exclude or {}).items()))
    if dry_run:
        print(f"submit: dry run: would write {record_dir} (a {kind})")
        return 0, sub
    files = {"README.md": record_readme(runs, sub, stats, record_dir, code).encode(),
             "submission.json": _json_bytes(sub), "train_gpt.py": shipped,
             "requirements.txt": requirements_path.read_bytes(), sweep_path.name: _json_bytes(manifest)}
    for r in runs:
        files[f"{r.run_id}.txt"], files[f"{r.run_id}.json"] = r.txt_bytes, r.json_bytes
    write_record(record_dir, files)
    print(f"submit: wrote {record_dir}/ ({', '.join(files)})")
    if kind == RECORD:
        print(f"submit: {update_top_level(Path(top_level), sub)}")
    else:
        print(f"submit: a {kind}, not a record ({'; '.join(unmet)}): {top_level} untouched")
    return 0, sub


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _run_demo_data(args: argparse.Namespace) -> int:
    """Run `demo-data`: build the dataset and print one line per file plus a summary."""
    try:
        info = build_demo_data(args.out_dir, args.vocab_size, args.max_chars, args.seed, args.shard_tokens,
                               caseops=not args.plain)
    except OutputExistsError as exc:
        print(f"demo-data: refusing to overwrite existing data: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {info['tokenizer']} (vocab {args.vocab_size}{'' if args.plain else ', the CaseOps operators ids 4-7'})")
    for path, n_tokens in info["val_shards"] + info["val_bytes_shards"] + info["train_shards"]:
        print(f"wrote {path} ({n_tokens:,} {'byte counts' if '_bytes_' in path.name else 'tokens'})")
    per_token = {
        split: info[f"{split}_bytes"] / (info[f"{split}_tokens"] - info[f"{split}_docs"]) for split in ("train", "val")
    }
    print(
        f"demo-data: train {info['train_tokens']:,} tokens ({info['train_docs']} docs), "
        f"val {info['val_tokens']:,} tokens ({info['val_docs']} docs), "
        f"bytes/token (UTF-8 bytes per non-BOS token) train {per_token['train']:.3f} val {per_token['val']:.3f}"
    )
    return 0


def _positive_int(text: str) -> int:
    """Parse a command-line integer that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_demo_data_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the `demo-data` subcommand."""
    p = subparsers.add_parser(
        "demo-data",
        help="build a small offline dataset from Python stdlib docstrings",
        description="Build a CaseOps tokenizer, challenge-format shards and the byte sidecar from stdlib docstrings "
                    "(no network needed).",
    )
    p.add_argument("out_dir", type=Path, help="output directory (must not already contain shards)")
    p.add_argument("--vocab-size", type=_positive_int, default=1024, help="tokenizer vocabulary size (default 1024)")
    p.add_argument(
        "--max-chars",
        type=_positive_int,
        default=DEFAULT_MAX_CHARS,
        help=f"stop collecting docstrings at this many characters (default {DEFAULT_MAX_CHARS:,})",
    )
    p.add_argument("--seed", type=int, default=0, help="document shuffle seed (default 0)")
    p.add_argument(
        "--shard-tokens",
        type=_positive_int,
        default=DEFAULT_SHARD_TOKENS,
        help=f"maximum tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})",
    )
    p.add_argument("--plain", action="store_true",
                   help="without the CaseOps transform: a plain tokenizer and no byte sidecar (plain sp8192's data path)")
    p.set_defaults(func=_run_demo_data)


def _reference_values(text: str) -> tuple[float, ...]:
    """Parse REFERENCE_BPB / --reference-bpb: at least 2 positive numbers, separated by spaces or commas."""
    try:
        values = tuple(float(v) for v in re.split(r"[,\s]+", text.strip()) if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be numbers separated by spaces or commas, got {text!r}") from None
    if len(values) < 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"needs at least 2 positive per-seed val_bpb values, got {text!r}")
    return values


def _exclusion(text: str) -> tuple[str, str]:
    run_id, _, why = text.partition("=")
    if not run_id.strip() or not why.strip():
        raise argparse.ArgumentTypeError(f"must be RUN_ID=REASON, got {text!r}")
    return run_id.strip(), why.strip()


def _iso_date(text: str) -> str:
    try:
        return _dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date YYYY-MM-DD, got {text!r}") from None


def _run_check(args: argparse.Namespace) -> int:
    """Run `check`: one finished seed against every check `submit` makes of a seed alone."""
    runs, reasons = load_runs(args.logs, [args.run_id])
    reasons += [reason for run in runs for reason in check_run(run)]
    for line in [data_report(run) for run in runs if not run.summary["eval_only"]] + [pin_instruction(runs)] * bool(runs):
        if line:
            print(f"check: {line}")
    for reason in reasons:
        print(f"check: {reason}", file=sys.stderr)
    if not reasons:
        print(f"check: {args.run_id} passes every check of a seed")
    return 1 if reasons else 0


def _add_check_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the `check` subcommand (run_8xh100.sh runs it after each seed, before the next one trains)."""
    p = subparsers.add_parser("check", help="check one finished seed as submit would, before the sweep goes on",
                              description="Read logs/<RUN_ID>.json and .txt and run every check submit makes of a seed "
                              "alone (artifact, byte cap, clocks, audit, summary against its log, its data on disk and "
                              "the validation documents against the training shards it read); exit 1 with the reasons "
                              "if submit would refuse it.")
    p.add_argument("run_id", metavar="RUN_ID")
    p.add_argument("--logs", default="logs", help="folder of the runs' logs (default logs)")
    p.set_defaults(func=_run_check)


def _run_overlap(args: argparse.Namespace) -> int:
    """Run `overlap`: a data folder's validation documents against its first training shards."""
    train = sorted(p for p in Path(args.data_path).glob("fineweb_train_*.bin")
                   if p.stem[len("fineweb_train_"):].isdigit())[:args.shards]
    val = validation_shards(args.data_path)
    if not train or not val:
        print(f"overlap: {args.data_path} needs fineweb_val_*.bin and fineweb_train_*.bin shards", file=sys.stderr)
        return 2
    try:
        o = train_val_overlap(val, train)
    except ValueError as exc:
        print(f"overlap: {exc}", file=sys.stderr)
        return 2
    print(f"overlap: {o['docs_checked']:,} of {o['docs']:,} validation documents ({o['windows']:,} windows of "
          f"{OVERLAP_WINDOW} tokens) against {len(train)} training shard(s) ({o['train_tokens']:,} tokens) in "
          f"{o['seconds']:.1f} s ({1e9 * o['seconds'] / max(o['train_tokens'], 1):.1f} ns per training token): "
          f"{len(o['found_docs']):,} documents found in them"
          + (f" (the first at validation token {o['first_found_offset']:,})" if o["found_docs"] else "")
          + f", {o['windows_found']:,} windows ({o['windows_found'] / max(o['windows'], 1):.2%})")
    return 1 if o["found_docs"] else 0


def _add_overlap_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the `overlap` subcommand (a data folder, before any run: what check will find)."""
    p = subparsers.add_parser("overlap", help="validation documents found in a data folder's training shards",
                              description="Stream the first SHARDS training shards of DATA_PATH against its validation "
                              "documents, as check does for the shards a run read; exit 1 if a validation document "
                              "occurs in them (a run on them would be refused).")
    p.add_argument("data_path", metavar="DATA_PATH")
    p.add_argument("--shards", type=_positive_int, default=None, help="the first N training shards (default all)")
    p.set_defaults(func=_run_overlap)


def _run_submit(args: argparse.Namespace) -> int:
    """Run `submit`: check, summarize, and (unless --dry-run) assemble the record."""
    status, _ = submit(args.run_ids, log_dir=args.logs, code_path=args.code, requirements_path=args.requirements,
                       record_dir=args.record_dir, reference=args.reference_bpb, name=args.name, author=args.author,
                       github_id=args.github_id, date=args.date, top_level=args.top_level, sweep=args.sweep,
                       practice=args.practice, exclude=dict(args.exclude), dry_run=args.dry_run)
    return status


def _run_sweep(args: argparse.Namespace) -> int:
    """Run `sweep`: write the manifest of a sweep about to start."""
    try:
        path = write_sweep(args.logs, args.prefix, args.seeds, args.code, dict(os.environ), args.practice)
    except OutputExistsError as exc:
        print(f"sweep: {exc}", file=sys.stderr)
        return 2
    print(f"sweep: wrote {path}")
    return 0


def _add_sweep_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the `sweep` subcommand (run_8xh100.sh calls it before the first seed trains)."""
    p = subparsers.add_parser("sweep", help="write the manifest of a sweep before its first seed trains",
                              description="Write <logs>/<PREFIX>.sweep.json: the seeds, their run ids "
                              "<PREFIX>_seed<SEED>, the code's sha256, the settings set in the environment, and "
                              "whether it is a practice sweep. `submit` takes every run it lists.")
    p.add_argument("prefix", help="the sweep's RUN_ID prefix")
    p.add_argument("seeds", nargs="+", metavar="SEED")
    p.add_argument("--logs", default="logs", help="folder of the runs' logs (default logs)")
    p.add_argument("--code", default="train_gpt.py", help="the script the seeds will run")
    p.add_argument("--practice", action="store_true", help="a practice sweep (the demo): never a record")
    p.set_defaults(func=_run_sweep)


def _add_submit_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the `submit` subcommand. Its environment defaults are read when the parser is built."""
    env = os.environ
    p = subparsers.add_parser(
        "submit",
        help="check, summarize and assemble the seeds' runs into a record folder",
        description="Read logs/<RUN_ID>.json and .txt of each seed (paths relative to where the runs ran), refuse "
        "runs that break a rule (every reason printed, exit 1, nothing written), print mean/std and the one-sided "
        "Welch test against the reference, then write the record folder: README.md, submission.json, "
        "train_gpt.py, requirements.txt and the logs.",
    )
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID",
                   help="one run per seed (run_8xh100.sh: <prefix>_seed<SEED>); default: every run of --sweep")
    p.add_argument("--sweep", default=None,
                   help="the sweep manifest (default <logs>/<prefix of the RUN_IDs>.sweep.json); every run it lists "
                   "is submitted")
    p.add_argument("--practice", action="store_true", help="a practice record whatever the runs (run_8xh100.sh's demo)")
    p.add_argument("--exclude", type=_exclusion, action="append", default=[], metavar="RUN_ID=REASON",
                   help="another run of the same code in --logs that is not part of the sweep, and why; written into "
                   "submission.json and the README (repeatable)")
    p.add_argument("--logs", default="logs", help="folder of the runs' logs (default logs)")
    p.add_argument("--code", default="train_gpt.py", help="the script to copy; must be the one the logs recorded")
    p.add_argument("--requirements", default="requirements.txt", help="requirements file to copy")
    p.add_argument("--record-dir", default=env.get("RECORD_DIR") or None,
                   help="record folder to create (env RECORD_DIR); default records/track_10min_16mb/<date>_<name> for "
                   "a record, records/track_non_record_16mb/<date>_<name> for a non-record, <logs>/<prefix>_record for "
                   "a practice record")
    p.add_argument("--reference-bpb", type=_reference_values, default=env.get("REFERENCE_BPB") or None,
                   help="per-seed val_bpb of a second reference a record must beat too (env REFERENCE_BPB); the test "
                   "against the published best (" + " ".join(map(str, DEFAULT_REFERENCE_BPB)) + ") is always made")
    p.add_argument("--name", default=env.get("SUBMISSION_NAME") or None,
                   help="submission name (env SUBMISSION_NAME; default <preset>_<layers>x<dim>_<quant>)")
    p.add_argument("--author", default=env.get("AUTHOR") or None, help="author (env AUTHOR; default null)")
    p.add_argument("--github-id", default=env.get("GITHUB_ID") or None, help="GitHub id (env GITHUB_ID; default null)")
    p.add_argument("--date", type=_iso_date, default=None, help="submission date YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--top-level", default="submission.json",
                   help="the entry's submission.json, updated only by records that beat it (default submission.json)")
    p.add_argument("--dry-run", action="store_true", help="check and summarize only; write nothing")
    p.set_defaults(func=_run_submit)


# --- the one-GPU rehearsal's report (tools/gpu_rehearsal.sh) ------------------------------------------

H100_BF16_DENSE_FLOPS = 989e12      # per GPU, dense bf16: the MFU reference (train_gpt.py's constant)
TRACK_GPUS = 8


def rehearsal_report(summary: dict) -> dict:
    """What a one-GPU rehearsal run measured, and the 8xH100 step time it implies. On one GPU every step
    runs the 8 micro-batches that 8 GPUs run side by side (GRAD_ACCUM_STEPS defaults to 8 // world), so the
    implied 8xH100 step is the measured step / 8, before the gradient all-reduce (not measured here).
    MFU = the run's train_flops (every training step at its own FLOPs per token, recurrence on or off,
    all ranks) / (train_time_ms / 1e3 * world_size * H100_BF16_DENSE_FLOPS); None without train_flops."""
    hp, stages = summary["hyperparameters"], summary.get("stage_ms") or {}
    step_ms, tokens_per_s = summary["step_avg_ms"], summary["tokens_per_s"]
    gpus, train_flops, train_ms = summary["world_size"], summary.get("train_flops"), summary["train_time_ms"]
    implied = step_ms * gpus / TRACK_GPUS if _number(step_ms) else None
    return {
        "run_id": summary["run_id"], "hardware": hardware_line(summary), "torch_version": summary["torch_version"],
        "attention": summary.get("attention"), "compute_dtype": summary.get("compute_dtype"), "shape": f"{hp.get('NUM_LAYERS')}L x {hp.get('MODEL_DIM')}, MLP "
        f"{hp.get('MLP_MULT')}x, vocab {hp.get('VOCAB_SIZE')}, seq {hp.get('TRAIN_SEQ_LEN')}, "
        f"{hp.get('TRAIN_BATCH_TOKENS')} tokens/step", "steps": summary["steps"], "step_ms": step_ms,
        "tokens_per_s": tokens_per_s, "flops_per_token": summary["flops_per_token"],
        "mfu": (train_flops / (train_ms / 1e3 * gpus * H100_BF16_DENSE_FLOPS)
                if _number(train_flops) and _number(train_ms) and train_ms > 0 else None),
        "peak_memory_mib": summary.get("peak_memory_mib"), "compile_s": stages.get("compile", 0) / 1e3,
        "compile": summary.get("compile"), "stage_s": {k: round(v / 1e3, 2) for k, v in stages.items()},
        "wall_s": summary["wall_ms"] / 1e3, "eval_time_s": summary["eval_time_ms"] / 1e3,
        "eval_parts_s": {"compile_in_warm_up": (summary.get("eval_compile_ms") or 0) / 1e3,
                         **{k: round(stages[k] / 1e3, 2) for k in ("load", "audit", "roundtrip_plain_eval", "eval")
                            if k in stages}},
        "projected_8xh100_eval_parts_s": summary.get("projected_h100_eval_parts_s"), "ttt": summary.get("ttt_summary"),
        "implied_8xh100_step_ms": implied,
        "implied_8xh100_steps_in_600s": 600e3 / implied if implied else None,
        "projected_8xh100_step_ms": summary.get("projected_h100_step_ms"),
        "bytes_total": summary["bytes_total"], "val_bpb": summary["val_bpb"],
        "pre_quant_val_bpb": summary.get("pre_quant_val_bpb"), "quant_gap_bpb": summary.get("quant_gap_bpb"),
        "compliance_all_ok": (summary.get("compliance") or {}).get("all_ok"),
    }


def _run_rehearsal_report(args: argparse.Namespace) -> int:
    try:
        summary = json.loads(Path(args.summary).read_text())
    except (OSError, ValueError) as exc:
        print(f"rehearsal-report: cannot read {args.summary}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rehearsal_report(summary), indent=2))
    return 0


def _add_rehearsal_report_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rehearsal-report", help="one JSON of what a one-GPU rehearsal run measured",
                              description="Read a run summary logs/<RUN_ID>.json (tools/gpu_rehearsal.sh) and print "
                              "step time, tokens/s, MFU, peak memory, compile time and recompiles, each stage's "
                              "time and the 8xH100 step time it implies, as one JSON.")
    p.add_argument("summary", help="logs/<RUN_ID>.json")
    p.set_defaults(func=_run_rehearsal_report)


# --- the 8xH100 plan of the settings in the environment (train_gpt.py's projections) -----------------------

REFERENCE_PEAK_MIB = 41_717     # record #1855's training peak per GPU (train_seed42.log: "peak memory allocated")


def gpu_plan(env: dict[str, str], split_tokens: int | None = None) -> dict:
    """The 8xH100 projections of train_gpt.py for the settings in `env`, as one JSON-ready dict: train_peak_gib
    (training_peak: a rank's peak in a training step, with the graph the run compiles, COMPILE=-1 or 1, else eager;
    train_peak_eager_gib beside it), step_ms (projected_h100_step_ms, recurrence on), eval_s and eval_parts
    (eval_projection of the validation shards at DATA_PATH, scaled to split_tokens when given, e.g. FineWeb's from a
    development set; null without shards), ttt_peak_gib (ttt_peak: a rank's peak in the first LoRA TTT step; null
    without TTT_METHOD=lora) and cu_seqlens_entries (a rank's varlen capacity in training, varlen_capacity's base;
    null without document isolation). `assumptions` says what each rests on, `why_null` why a field is null.
    PipelineError (train_gpt's) for settings a run would refuse."""
    tg = train_gpt_module()
    hp, warnings = tg.read_settings(dict(env))
    gpus = tg.PROJECTION_GPUS
    tg.grad_accum_steps(hp, gpus)                       # the batch must split over 8 ranks as the run splits it
    model = tg.GPT(hp)
    compiled = hp.compile != 0                          # COMPILE=-1 compiles on CUDA
    saved = tg.training_activations(hp, compiled)
    memory = tg.training_peak(hp, model, saved)
    eager = memory if not compiled else tg.training_peak(hp, model, tg.training_activations(hp, False))
    fpt = tg.flops_per_token(hp, hp.train_seq_len)
    step_ms = tg.projected_h100_step_ms(fpt, hp.train_batch_tokens)
    tokens_micro = tg.micro_batch_tokens(hp, gpus)
    plan = {"preset": hp.preset, "explicit_settings": sorted(hp.explicit), "warnings": warnings,
            "torch_version": tg.torch.__version__,
            "train_peak_gib": memory["total"], "train_memory_parts_gib": memory, "train_graph": "compiled" if compiled else "eager",
            "train_peak_eager_gib": eager["total"], "train_saved_bytes_per_token": saved.per_token,
            "train_saved_bytes_fixed": saved.fixed,
            "ttt_peak_gib": None, "ttt_memory_parts_gib": None, "cu_seqlens_entries": None,
            "step_ms": step_ms, "steps_in_600s": tg.projected_steps(hp, step_ms),
            "eval_s": None, "eval_parts": None}
    why_null = {"ttt_peak_gib": "TTT is off or not TTT_METHOD=lora", "ttt_memory_parts_gib": "as ttt_peak_gib",
                "cu_seqlens_entries": "ATTN_DOC_ISOLATION=0: no varlen attention"}
    window, stride = tg.eval_geometry(hp)
    rows = tokens_micro // hp.train_seq_len
    if hp.attn_doc_isolation:
        plan["cu_seqlens_entries"] = tg.varlen_capacity(rows, hp.train_seq_len)
    try:
        val_tokens, shard_tokens = tg.load_validation_tokens(hp.data_path, hp.vocab_size, hp.val_max_tokens)
    except tg.PipelineError as exc:
        why_null["eval_s"] = why_null["eval_parts"] = f"no validation tokens to project from: {exc}"
    else:
        split_tokens = split_tokens or shard_tokens
        parts = tg.eval_projection(hp, val_tokens, split_tokens, window, stride)
        plan.update(eval_s=parts["total"], eval_parts=parts)
        eval_from = f"the {val_tokens.size} validation tokens at {hp.data_path} scaled to the split's {split_tokens}"
    if hp.ttt_enabled and hp.ttt_method == "lora":
        ttt = tg.ttt_peak(hp, model, tg.lora_activations(hp, compiled), window, split_tokens or 0)
        plan.update(ttt_peak_gib=ttt["total"], ttt_memory_parts_gib=ttt)
    plan["why_null"] = {k: v for k, v in why_null.items() if plan[k] is None}
    plan["assumptions"] = {
        "train_peak_gib": f"rank 0 of {gpus}, {tokens_micro} tokens per micro-step, recurrence on, late QAT off; "
                          "activations saved for backward counted on a CPU copy of the model under bf16 autocast with "
                          "CUDA's dtype policy (train_gpt.CudaAutocastPolicy), "
                          + ("through torch.compile's min-cut partition (the graph the run compiles)" if compiled else "eager")
                          + "; weights, gradients, DDP buckets, optimizer states and EMA counted from the parameters; "
                          "the head's transient gradient of the logits; allocated memory (the allocator reserves more: "
                          f"#1855 reserved 47,140 MiB for {REFERENCE_PEAK_MIB:,} MiB allocated); record #1855 measured "
                          f"{REFERENCE_PEAK_MIB / 1024:.2f} GiB with its own compiled graph and fused kernels "
                          "(docs/memory.md)",
        "ttt_peak_gib": (f"rank 0's first LoRA step: {tg.lora_rows(hp, window)} rows of the {window}-token window "
                         f"(TTT_LORA_BATCH_TOKENS), adapters of {hp.ttt_lora_targets} with their gradient and two AdamW "
                         "moments, the step's saved activations counted as train_peak_gib's (base weights frozen), the "
                         "head's transient, FA3's accumulators, the validation stream on the device (docs/memory.md)"),
        "cu_seqlens_entries": (f"varlen_capacity's base for {rows} rows of {hp.train_seq_len}: "
                               f"{tg.VARLEN_SEGMENTS_PER_ROW} segments a row (FineWeb averages ~3.5); a batch of more "
                               "takes a larger capacity, counted and logged"),
        "step_ms": f"{fpt:.4e} FLOPs per token (6 N + 6 L T d, recurrence on) x {hp.train_batch_tokens} tokens on {gpus} "
                   f"H100s at {tg.ASSUMED_MFU:.0%} MFU of {tg.H100_BF16_DENSE_FLOPS / 1e12:.0f} TFLOP/s bf16; "
                   "steps_in_600s with recurrence off before RECUR_START_FRAC",
        "eval_s": (f"eval_projection of {eval_from}: scoring passes at {tg.EVAL_FORWARD_MFU:.0%} MFU, LoRA steps at "
                   f"{tg.LORA_STEP_S:g} s each plus their tokens at {tg.LORA_TTT_MFU:.0%} MFU, phases at "
                   f"{tg.TTT_ASSUMED_MFU:.1%} (each rate from #1855's logs; the fit over-projects #2019 by 10-30%), load "
                   f"{tg.EVAL_LOAD_ASSUMED_S:g} s and compile {tg.EVAL_COMPILE_ASSUMED_S:g} s assumed; window {window}, "
                   f"stride {stride}, mode {hp.eval_mode} (docs/evaluation.md)") if plan["eval_s"] is not None else None,
    }
    return plan


def _run_gpu_plan(args: argparse.Namespace) -> int:
    tg = train_gpt_module()
    try:
        plan = gpu_plan(dict(os.environ), args.split_tokens)
    except tg.PipelineError as exc:
        print(f"gpu-plan: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan, indent=2))
    return 0


def _add_gpu_plan_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gpu-plan", help="one JSON of the 8xH100 projections for the settings in the environment",
                              description="Project a run of the settings in the environment onto 8xH100: a rank's "
                              "training peak memory, the step time, the evaluation time by part, each with the "
                              "assumptions it rests on (train_gpt.py's projections; about a minute on 2 CPU cores).")
    p.add_argument("--split-tokens", type=_positive_int, metavar="N",
                   help="project the evaluation of a validation split of N tokens from the shards at DATA_PATH (default: "
                        "their own count; FineWeb's sp8192 split is 40,540,160 tokens)")
    p.set_defaults(func=_run_gpu_plan)


# --- docs/settings.md's settings table, generated from train_gpt.py's declarations --------------------------

SETTINGS_BEGIN = "<!-- settings:begin (generated from train_gpt.py's SETTINGS; tests keep it equal) -->"
SETTINGS_END = "<!-- settings:end -->"


def settings_table() -> str:
    """A markdown table of every setting: variable, type, default, rule (its range or choices, and the name of
    any further check), meaning; one row per Setting, in declaration order."""
    lines = ["| Variable | Type | Default | Rule | Meaning |", "|---|---|---|---|---|"]
    for name, row in train_gpt_module().SETTINGS.items():
        rule = "; ".join(part for part in (row.rule().removeprefix("must be "), row.check and "check: " + row.check.__name__.replace("_", " "))
                         if part)
        meaning = row.meaning.replace("|", "\\|")
        lines.append(f"| `{name}` | {row.type.__name__} | `{row.default!r}` | {rule} | {meaning} |")
    return "\n".join(lines) + "\n"


def readme_with_settings(text: str) -> str:
    """`text` (docs/settings.md) with the block between SETTINGS_BEGIN and SETTINGS_END replaced by settings_table().
    ValueError when the markers are missing."""
    start, end = text.find(SETTINGS_BEGIN), text.find(SETTINGS_END)
    if start < 0 or end < start:
        raise ValueError(f"the file lacks the lines {SETTINGS_BEGIN!r} ... {SETTINGS_END!r}")
    return text[:start + len(SETTINGS_BEGIN)] + "\n" + settings_table() + text[end:]


def _run_settings_table(args: argparse.Namespace) -> int:
    if args.write is None:
        print(settings_table(), end="")
        return 0
    path = Path(args.write)
    try:
        path.write_text(readme_with_settings(path.read_text(encoding="utf-8")), encoding="utf-8")
    except (OSError, ValueError) as exc:
        print(f"settings-table: {path}: {exc}", file=sys.stderr)
        return 2
    print(f"settings-table: wrote {path}'s settings table")
    return 0


def _add_settings_table_command(subparsers: argparse._SubParsersAction) -> None:
    """Register the `settings-table` subcommand (docs/settings.md's table after a setting changes)."""
    p = subparsers.add_parser("settings-table", help="print the settings table, or write it into docs/settings.md",
                              description="The settings table generated from train_gpt.py's declarations.")
    p.add_argument("--write", metavar="FILE", help="replace the table between the markers in this file")
    p.set_defaults(func=_run_settings_table)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="harness.py", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_data_command(subparsers)
    _add_submit_command(subparsers)
    _add_sweep_command(subparsers)
    _add_check_command(subparsers)
    _add_overlap_command(subparsers)
    _add_rehearsal_report_command(subparsers)
    _add_gpu_plan_command(subparsers)
    _add_settings_table_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the chosen subcommand, return its exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NeedsTrainGpt as exc:
        print(f"harness.py {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
