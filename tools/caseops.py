"""CaseOps data: challenge-format shards of case-transformed text plus the validation byte sidecar.

    python3 tools/caseops.py build --docs DOCS.jsonl --out DIR --tokenizer CASEOPS.model --val-docs N
    python3 tools/caseops.py build --plain --docs DOCS.jsonl --out DIR --tokenizer SP.model --val-docs N
    python3 tools/caseops.py sidecar --data DIR --tokenizer CASEOPS.model
    python3 tools/caseops.py docs --data DIR --tokenizer SP.model --out DOCS.jsonl

build: one JSON object a line with a `text` field; the first N documents are the validation split (the
official FineWeb export: N = 50,000), the rest training. Each document is caseops_encode'd (train_gpt.py),
tokenized as [BOS] + ids and written as fineweb_{val,train}_XXXXXX.bin; beside the validation shards,
fineweb_val_bytes_XXXXXX.bin (same header, one uint16 per token) holds the bytes of the ORIGINAL text each
token stands for: train_gpt.stream_bytes, equal over every document to the plain sp8192 tables' count.
sidecar: (re)writes that sidecar from the validation shards' ids (e.g. over a downloaded CaseOps export,
whose own sidecar counts other bytes: docs/caseops.md). build --plain: the same split of the same documents with
a plain tokenizer, no transform and no sidecar (the control of a CaseOps comparison).
docs: decodes a shard folder back into a documents file, refusing any document whose text does not
re-encode to the same ids (the development shards become input for build).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402
from tools import harness  # noqa: E402

SHARD_TOKENS = harness.DEFAULT_SHARD_TOKENS


def read_docs(path: str) -> list[str]:
    """The `text` of each line of a JSON-lines file (blank lines skipped)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise train_gpt.PipelineError(f"{path}:{n}: not a JSON object with a string `text`")
                docs.append(obj["text"])
    return docs


def write_sidecar(out_dir: str, tokens: np.ndarray, tokenizer: str, shard_tokens: int) -> int:
    """Write fineweb_val_bytes_XXXXXX.bin for the validation stream `tokens`; returns its byte total."""
    sp = train_gpt.open_tokenizer(tokenizer)
    operator_ids = train_gpt.caseops_operator_ids(sp)
    if operator_ids is None:
        raise train_gpt.PipelineError(f"{tokenizer} has no CaseOps operator pieces")
    nbytes = train_gpt.stream_bytes(tokens.astype(np.int64), train_gpt.build_bpb_tables(tokenizer, sp.vocab_size()),
                                     operator_ids)
    harness.write_split(out_dir, "val_bytes", nbytes, shard_tokens)
    return int(nbytes.sum())


def build(docs_path: str, out_dir: str, tokenizer: str, val_docs: int, shard_tokens: int = SHARD_TOKENS,
          plain: bool = False) -> dict:
    """Write the CaseOps shards and the sidecar of `docs_path` into the new folder `out_dir` (plain: the
    documents as they are, with a tokenizer that is not CaseOps, and no sidecar)."""
    import sentencepiece as spm
    docs = read_docs(docs_path)
    if not 0 < val_docs < len(docs):
        raise train_gpt.PipelineError(f"--val-docs {val_docs}: need 1 to {len(docs) - 1} of the {len(docs)} documents")
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    if (train_gpt.caseops_operator_ids(sp) is None) != plain:
        raise train_gpt.PipelineError(f"{tokenizer} " + ("is a CaseOps tokenizer: drop --plain" if plain else
                                                         "has no CaseOps operator pieces (--plain builds without them)"))
    transform = (lambda d: d) if plain else train_gpt.caseops_encode
    os.makedirs(out_dir, exist_ok=False)
    val = harness.encode_documents(sp, [transform(d) for d in docs[:val_docs]])
    train = harness.encode_documents(sp, [transform(d) for d in docs[val_docs:]])
    harness.write_split(out_dir, "val", val, shard_tokens)
    harness.write_split(out_dir, "train", train, shard_tokens)
    info = dict(val_docs=val_docs, train_docs=len(docs) - val_docs, val_tokens=int(val.size), train_tokens=int(train.size))
    if not plain:
        info["val_bytes"] = write_sidecar(out_dir, val, tokenizer, shard_tokens)
    return info


def rewrite_sidecar(data_dir: str, tokenizer: str) -> int:
    """Replace the sidecar of `data_dir`'s validation shards (one sidecar file per shard)."""
    shards = train_gpt.find_shards(data_dir, "val")
    for old in glob.glob(os.path.join(data_dir, "fineweb_val_bytes_[0-9]*.bin")):
        os.remove(old)
    for index, shard in enumerate(shards):
        if os.path.basename(shard) != f"fineweb_val_{index:06d}.bin":
            raise train_gpt.PipelineError(f"{shard}: validation shards must be numbered 000000, 000001, ...")
    tokens = [np.asarray(train_gpt.load_shard(s)) for s in shards]
    sp = train_gpt.open_tokenizer(tokenizer)
    nbytes = train_gpt.stream_bytes(np.concatenate(tokens).astype(np.int64),
                                    train_gpt.build_bpb_tables(tokenizer, sp.vocab_size()), train_gpt.caseops_operator_ids(sp))
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
            print(json.dumps(build(args.docs, args.out, args.tokenizer, args.val_docs, args.shard_tokens, args.plain)))
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
