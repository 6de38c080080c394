"""Command-line harness for the Parameter Golf entry.

This file exists so the whole pipeline (tokenizer, shards, training) can run on
a fresh machine with no network and no FineWeb download.  Its `demo-data`
subcommand builds a small real-English dataset from the docstrings of Python's
own standard library, trains a SentencePiece BPE tokenizer on it, and writes
shards in the challenge's binary format, so `train_gpt.py` can read them
exactly like the official FineWeb shards.

Usage:
    python3 tools/harness.py demo-data OUT_DIR [--vocab-size 1024]
        [--max-chars N] [--seed 0] [--shard-tokens N]

The functions below are importable (`from tools import harness`) for tests and
for other tooling.  Subcommands are registered in `build_parser()`; a new one
needs an `_add_<name>_command(subparsers)` function that sets `func`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import io
import os
import random
import secrets
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

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


def train_tokenizer(docs: Sequence[str], vocab_size: int, model_path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Train a SentencePiece BPE tokenizer on `docs` and write it to `model_path`.

    Each document is one SentencePiece "sentence"; `max_sentence_length` is set
    to the longest document so none is silently dropped.  Special ids follow
    the official challenge tokenizer (pad 0, bos 1, eos 2, unk 3) and unseen
    characters fall back to bytes.  Whitespace is kept verbatim (identity
    normalization, no dummy prefix, no whitespace squashing) so decoding
    returns the exact text and piece lengths sum to the text's UTF-8 bytes.
    Training is deterministic: every sentence is used, no sampling.
    Output: the trained model, loaded.
    """
    model = io.BytesIO()
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
    )
    with _atomic_writer(model_path) as f:
        f.write(model.getvalue())
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def encode_documents(sp: spm.SentencePieceProcessor, docs: Sequence[str]) -> np.ndarray:
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


def tokenizer_path(out_dir: str | os.PathLike, vocab_size: int) -> Path:
    """Return where `build_demo_data` writes the tokenizer model for `vocab_size`."""
    return Path(out_dir) / "tokenizer" / f"demo_{vocab_size}_bpe.model"


def existing_outputs(out_dir: str | os.PathLike, vocab_size: int) -> list[Path]:
    """Return shards and the tokenizer model already present in `out_dir` (sorted)."""
    out_dir = Path(out_dir)
    found = sorted(out_dir.glob("fineweb_*.bin"))
    if tokenizer_path(out_dir, vocab_size).exists():
        found.append(tokenizer_path(out_dir, vocab_size))
    return found


# ----------------------------------------------------------------------------
# Demo dataset
# ----------------------------------------------------------------------------


def build_demo_data(
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    max_chars: int = DEFAULT_MAX_CHARS,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> dict:
    """Build the stdlib-docstring demo dataset in `out_dir`.

    Raises OutputExistsError (before doing any work) if `out_dir` already has
    shards or this vocab's tokenizer.  Writes the tokenizer, then the val and
    train shards.  Output: a dict with `tokenizer` (Path), `val_shards` and
    `train_shards` ([(Path, n_tokens)]), `train_docs`, `val_docs`,
    `train_tokens`, `val_tokens`, `train_bytes`, `val_bytes` (UTF-8 bytes of
    the document text, i.e. what the non-BOS tokens encode).
    """
    clash = existing_outputs(out_dir, vocab_size)
    if clash:
        raise OutputExistsError(f"{out_dir} already contains {', '.join(map(str, clash))}")
    train_docs, val_docs = split_train_val(collect_docstrings(max_chars, seed))
    model_path = tokenizer_path(out_dir, vocab_size)
    sp = train_tokenizer(train_docs, vocab_size, model_path)
    result = {"tokenizer": model_path, "train_docs": len(train_docs), "val_docs": len(val_docs)}
    for split, docs in (("val", val_docs), ("train", train_docs)):
        tokens = encode_documents(sp, docs)
        result[f"{split}_shards"] = write_split(out_dir, split, tokens, shard_tokens)
        result[f"{split}_tokens"] = len(tokens)
        result[f"{split}_bytes"] = sum(len(doc.encode("utf-8")) for doc in docs)
    return result


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _run_demo_data(args: argparse.Namespace) -> int:
    """Run `demo-data`: build the dataset and print one line per file plus a summary."""
    try:
        info = build_demo_data(args.out_dir, args.vocab_size, args.max_chars, args.seed, args.shard_tokens)
    except OutputExistsError as exc:
        print(f"demo-data: refusing to overwrite existing data: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {info['tokenizer']} (vocab {args.vocab_size})")
    for path, n_tokens in info["val_shards"] + info["train_shards"]:
        print(f"wrote {path} ({n_tokens:,} tokens)")
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
        description="Build tokenizer + challenge-format shards from stdlib docstrings (no network needed).",
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
    p.set_defaults(func=_run_demo_data)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="harness.py", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo_data_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the chosen subcommand, return its exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
