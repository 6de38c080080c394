"""Re-tokenize a shard folder with another SentencePiece model: the same documents, another vocabulary.

Every shard's documents (split at BOS) are decoded with the source tokenizer and encoded with the target
one, then written as challenge-format shards of the same split names. With it sp1024 and sp8192 can be
compared on exactly the same held-out (and training) documents, which bits per byte makes comparable.

    python3 tools/retokenize.py SRC_DIR SRC_TOKENIZER DEST_DIR DEST_TOKENIZER
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import harness  # noqa: E402


def documents(tokens: np.ndarray, bos: int) -> list[np.ndarray]:
    """The token ids of each document (BOS dropped); every document starts with BOS."""
    starts = np.flatnonzero(tokens == bos)
    return [tokens[a + 1:b] for a, b in zip(starts, list(starts[1:]) + [tokens.size])]


def main() -> int:
    import sentencepiece as spm
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src_dir")
    ap.add_argument("src_tokenizer")
    ap.add_argument("dest_dir")
    ap.add_argument("dest_tokenizer")
    args = ap.parse_args()
    src = spm.SentencePieceProcessor(model_file=args.src_tokenizer)
    dest = spm.SentencePieceProcessor(model_file=args.dest_tokenizer)
    os.makedirs(args.dest_dir, exist_ok=False)
    for path in sorted(glob.glob(os.path.join(args.src_dir, "fineweb_*_*.bin"))):
        raw = np.fromfile(path, dtype="<u2", offset=harness.SHARD_HEADER_INTS * 4)
        texts = [src.decode(d.tolist()) for d in documents(raw, src.bos_id())]
        out = harness.encode_documents(dest, texts)
        harness.write_shard(os.path.join(args.dest_dir, os.path.basename(path)), out)
        print(f"{path}: {raw.size:,} -> {out.size:,} tokens ({len(texts):,} documents)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
