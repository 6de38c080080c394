"""CaseOps data: challenge-format shards of case-transformed text plus the validation byte sidecar.

    python3 tools/caseops.py build --docs DOCS.jsonl --out DIR --tokenizer CASEOPS.model --val-docs N
        [--train-shards K] [--workers W]
    python3 tools/caseops.py build --plain --docs DOCS.jsonl --out DIR --tokenizer SP.model --val-docs N
    python3 tools/caseops.py sidecar --data DIR --tokenizer CASEOPS.model
    python3 tools/caseops.py docs --data DIR --tokenizer SP.model --out DOCS.jsonl

build: one JSON object a line with a `text` field; the first N documents are the validation split (the
official FineWeb export: N = 50,000), the rest training, up to K full train shards (default: every document).
Each document is caseops_encode'd (train_gpt.py), tokenized as [BOS] + ids and written as
fineweb_{val,train}_XXXXXX.bin; beside the validation shards, fineweb_val_bytes_XXXXXX.bin (same header, one
uint16 per token) holds the bytes of the ORIGINAL text each token stands for: train_gpt.stream_bytes, equal
over every document to the plain sp8192 tables' count. The documents are read as a stream, transformed and
tokenized in batches by W worker processes (default: one per core) and written in document order, so the
files do not depend on W; memory holds the validation split and one train shard. DIR is written whole or not
at all (built in a hidden sibling folder, renamed when complete) and never overwritten.
sidecar: (re)writes that sidecar from the validation shards' ids (e.g. over a downloaded CaseOps export,
whose own sidecar counts other bytes: docs/caseops.md). build --plain: the same split of the same documents with
a plain tokenizer, no transform and no sidecar (the control of a CaseOps comparison).
docs: decodes a shard folder back into a documents file, refusing any document whose text does not
re-encode to the same ids (the development shards become input for build).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import multiprocessing
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402
from tools import harness  # noqa: E402

SHARD_TOKENS = harness.DEFAULT_SHARD_TOKENS
BATCH_DOCS = 64              # documents a worker transforms and tokenizes per task


def iter_docs(path: str) -> Iterator[str]:
    """The `text` of each line of a JSON-lines file (blank lines skipped), read as a stream."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise train_gpt.PipelineError(f"{path}:{n}: not a JSON object with a string `text`")
                yield obj["text"]


def doc_batches(docs: Iterable[str], val_docs: int, batch_docs: int = BATCH_DOCS) -> Iterator[tuple[str, list[str]]]:
    """("val" or "train", up to batch_docs documents) in document order; no batch spans the two splits."""
    split, batch = "val", []
    for index, doc in enumerate(docs):
        doc_split = "val" if index < val_docs else "train"
        if batch and (doc_split != split or len(batch) == batch_docs):
            yield split, batch
            batch = []
        split = doc_split
        batch.append(doc)
    if batch:
        yield split, batch


_worker: dict = {}


def _start_worker(tokenizer: str, plain: bool) -> None:
    import sentencepiece as spm
    _worker["sp"] = spm.SentencePieceProcessor(model_file=tokenizer)
    _worker["transform"] = (lambda doc: doc) if plain else train_gpt.caseops_encode


def _encode_batch(docs: list[str]) -> np.ndarray:
    """[BOS] + ids of each (transformed) document, concatenated, uint16 (harness.encode_documents' layout)."""
    ids = _worker["sp"].encode([_worker["transform"](doc) for doc in docs], num_threads=1)
    tokens = np.concatenate([np.array([train_gpt.BOS_ID] + d, dtype=np.int64) for d in ids])
    if tokens.max() > np.iinfo(np.uint16).max:
        raise train_gpt.PipelineError(f"token id {int(tokens.max())} does not fit the shards' uint16")
    return tokens.astype(np.uint16)


def encoded_batches(batches: Iterable[tuple[str, list[str]]], tokenizer: str, plain: bool, workers: int
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """(split, tokens) of each batch, in order, encoded by `workers` processes with at most 2 batches per worker
    in flight (reading stops when the consumer stops); the workers end with the generator."""
    with multiprocessing.Pool(workers, initializer=_start_worker, initargs=(tokenizer, plain)) as pool:
        pending: collections.deque = collections.deque()
        for split, docs in batches:
            pending.append((split, pool.apply_async(_encode_batch, (docs,))))
            if len(pending) >= 2 * workers:
                split_done, result = pending.popleft()
                yield split_done, result.get()
        while pending:
            split_done, result = pending.popleft()
            yield split_done, result.get()


def write_stream(out_dir: Path, split: str, chunks: Iterable[np.ndarray], shard_tokens: int, max_shards: int = 0
                 ) -> tuple[list[tuple[Path, int]], int]:
    """Write the concatenated token chunks as fineweb_{split}_000000.bin, _000001, ... of shard_tokens each (the
    last one shorter; stopping after max_shards full shards when max_shards > 0), as write_split cuts one array.
    Returns ((path, tokens) per shard, the documents begun in them: their BOS tokens)."""
    written, parts, filled, docs = [], [], 0, 0

    def flush() -> None:
        path = out_dir / f"fineweb_{split}_{len(written):06d}.bin"
        harness.write_shard(path, np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16))
        written.append((path, filled))

    for chunk in chunks:
        while chunk.size:
            take = min(chunk.size, shard_tokens - filled)
            parts.append(chunk[:take])
            docs += int(np.count_nonzero(chunk[:take] == train_gpt.BOS_ID))
            filled, chunk = filled + take, chunk[take:]
            if filled == shard_tokens:
                flush()
                parts, filled = [], 0
                if max_shards and len(written) == max_shards:
                    return written, docs
    if filled or not written:
        flush()
    return written, docs


def build(docs_path: str, out_dir: str, tokenizer: str, val_docs: int, shard_tokens: int = SHARD_TOKENS,
          plain: bool = False, train_shards: int = 0, workers: int = 1) -> dict:
    """Write the CaseOps shards and the sidecar of `docs_path` into the new folder `out_dir` (plain: the
    documents as they are, with a tokenizer that is not CaseOps, and no sidecar). Returns the counts: val_docs,
    train_docs (documents begun in the train shards), val_tokens, train_tokens, train_shards, val_bytes (CaseOps)."""
    if val_docs < 1:
        raise train_gpt.PipelineError(f"--val-docs {val_docs}: need at least 1 validation document")
    if os.path.lexists(out_dir):
        raise train_gpt.PipelineError(f"--out {out_dir} already exists; a data folder is never overwritten")
    sp = train_gpt.open_tokenizer(tokenizer)
    if (train_gpt.caseops_operator_ids(sp) is None) != plain:
        raise train_gpt.PipelineError(f"{tokenizer} " + ("is a CaseOps tokenizer: drop --plain" if plain else
                                                         "has no CaseOps operator pieces (--plain builds without them)"))
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        val_parts: list[np.ndarray] = []

        def train_chunks(encoded: Iterator[tuple[str, np.ndarray]]) -> Iterator[np.ndarray]:
            for split, tokens in encoded:       # every validation batch comes first
                if split == "val":
                    val_parts.append(tokens)
                else:
                    yield tokens

        encoded = encoded_batches(doc_batches(iter_docs(docs_path), val_docs), tokenizer, plain, workers)
        try:
            train, train_docs = write_stream(tmp, "train", train_chunks(encoded), shard_tokens, train_shards)
        finally:
            encoded.close()                     # stops the workers, also when the train shards are full
        val = np.concatenate(val_parts) if val_parts else np.zeros(0, dtype=np.uint16)
        found = int(np.count_nonzero(val == train_gpt.BOS_ID))
        if found < val_docs or train_docs == 0:
            raise train_gpt.PipelineError(f"--val-docs {val_docs}: {docs_path} holds {found + train_docs} documents; "
                                          "need more than the validation ones")
        harness.write_split(tmp, "val", val, shard_tokens)
        info = dict(val_docs=val_docs, train_docs=train_docs, val_tokens=int(val.size),
                    train_tokens=sum(n for _, n in train), train_shards=len(train))
        if not plain:
            info["val_bytes"] = harness.write_byte_sidecar(tmp, val, tokenizer, shard_tokens)[0]
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def rewrite_sidecar(data_dir: str, tokenizer: str) -> int:
    """Replace the sidecar of `data_dir`'s validation shards (one sidecar file per shard); everything is checked and
    counted before the old sidecar is touched, and each file is replaced whole (harness.write_shard)."""
    shards = train_gpt.find_shards(data_dir, "val")
    for index, shard in enumerate(shards):
        if os.path.basename(shard) != f"fineweb_val_{index:06d}.bin":
            raise train_gpt.PipelineError(f"{shard}: validation shards must be numbered 000000, 000001, ...")
    sp = train_gpt.open_tokenizer(tokenizer)
    operator_ids = train_gpt.caseops_operator_ids(sp)
    if operator_ids is None:
        raise train_gpt.PipelineError(f"{tokenizer} has no CaseOps operator pieces: plain data has no sidecar")
    tokens = [np.asarray(train_gpt.load_shard(s)) for s in shards]
    nbytes = train_gpt.stream_bytes(np.concatenate(tokens).astype(np.int64),
                                    train_gpt.build_bpb_tables(tokenizer, sp.vocab_size()), operator_ids)
    for old in glob.glob(os.path.join(data_dir, "fineweb_val_bytes_[0-9]*.bin")):
        if os.path.basename(old) not in {os.path.basename(s).replace("_val_", "_val_bytes_") for s in shards}:
            os.remove(old)                      # a sidecar file no shard pairs with
    start = 0
    for index, part in enumerate(tokens):
        harness.write_shard(os.path.join(data_dir, f"fineweb_val_bytes_{index:06d}.bin"), nbytes[start:start + part.size])
        start += part.size
    return int(nbytes.sum())


def export_docs(data_dir: str, tokenizer: str, out_path: str) -> int:
    """Decode every document of the validation then the training shards into `out_path` (validation first,
    so --val-docs of build keeps the split); returns the number of validation documents."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    n_val = 0
    with open(out_path, "x", encoding="utf-8") as f:
        for split in ("val", "train"):
            stream = np.concatenate([np.asarray(train_gpt.load_shard(s)) for s in train_gpt.find_shards(data_dir, split)])
            starts = np.flatnonzero(stream == train_gpt.BOS_ID)
            for a, b in zip(starts, list(starts[1:]) + [stream.size]):
                ids = stream[a + 1:b].tolist()
                text = sp.decode(ids)
                if sp.encode(text) != ids:
                    raise train_gpt.PipelineError(f"{split} document at token {a} does not re-encode to its ids")
                f.write(json.dumps({"text": text}) + "\n")
                n_val += split == "val"
    return n_val


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--docs", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--tokenizer", required=True)
    b.add_argument("--val-docs", type=int, required=True, help="the first N documents are validation (FineWeb: 50000)")
    b.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS)
    b.add_argument("--train-shards", type=int, default=0, help="stop after this many full train shards (0: every document)")
    b.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes that transform and tokenize")
    b.add_argument("--plain", action="store_true", help="no transform, no sidecar: a plain tokenizer's control set")
    s = sub.add_parser("sidecar")
    s.add_argument("--data", required=True)
    s.add_argument("--tokenizer", required=True)
    d = sub.add_parser("docs")
    d.add_argument("--data", required=True)
    d.add_argument("--tokenizer", required=True)
    d.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        if args.command == "build":
            print(json.dumps(build(args.docs, args.out, args.tokenizer, args.val_docs, args.shard_tokens, args.plain,
                                   args.train_shards, max(1, args.workers))))
        elif args.command == "sidecar":
            print(f"val_bytes:{rewrite_sidecar(args.data, args.tokenizer)}")
        else:
            print(f"val_docs:{export_docs(args.data, args.tokenizer, args.out)}")
    except (train_gpt.PipelineError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
