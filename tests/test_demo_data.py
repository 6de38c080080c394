"""Tests for `tools/harness.py demo-data`: shard format, tokenizer, round trip, safety, determinism. The demo set
has the default data's form (CaseOps text, a tokenizer with the four operators, the validation byte sidecar);
`--plain` builds the same documents without the transform."""

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt
from _helpers import time_limit
from tools import harness

REPO_ROOT = Path(__file__).resolve().parents[1]
# A limit for hangs only (time_limit, tests/_helpers.py): a build through the CLI took at most 13.5 s.
CLI_TIMEOUT_S = time_limit(13.5)
MAX_CHARS = 300_000
VOCAB = 512
SEED = 0


def read_shard(path):
    """Parse a shard by hand: return (header int32[256], uint16 tokens)."""
    raw = Path(path).read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    return header, np.frombuffer(raw[1024:], dtype="<u2")


def digests(directory):
    """Map each file under `directory` (relative path) to its sha256."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


def run_cli(*args):
    """Run the harness CLI in a subprocess and return the CompletedProcess."""
    cmd = [sys.executable, str(REPO_ROOT / "tools" / "harness.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT_S)


def split_docs(tokens):
    """Split a token stream at BOS markers into per-document id lists (BOS dropped)."""
    starts = np.flatnonzero(tokens == harness.BOS_ID)
    assert starts.size and starts[0] == 0, "stream must start with BOS"
    return [tokens[s + 1 : e].tolist() for s, e in zip(starts, list(starts[1:]) + [len(tokens)])]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A small demo dataset built in-process: (out_dir, build_demo_data result)."""
    out_dir = tmp_path_factory.mktemp("demo")
    return out_dir, harness.build_demo_data(out_dir, vocab_size=VOCAB, max_chars=MAX_CHARS, seed=SEED)


def table_bytes(sp, ids, operators=()):
    """Brute force, per token of one document: a byte token is 1 byte, another piece its UTF-8 length without a
    leading "▁", which counts 1 byte unless the previous token is a boundary (here: the document's BOS), as
    train_gpt.py's tables count; a CaseOps operator stands for no byte of the original text."""
    counted = []
    for position, i in enumerate(ids):
        piece = sp.id_to_piece(i)
        if piece in operators:
            counted.append(0)
        elif sp.is_byte(i):
            counted.append(1)
        elif piece.startswith("\u2581"):
            counted.append(len(piece[1:].encode()) + (position > 0))
        else:
            counted.append(len(piece.encode()))
    return counted


def test_write_shard_layout(tmp_path):
    tokens = [1, 0, 65535, 300, 7]
    path = tmp_path / "shard.bin"
    harness.write_shard(path, tokens)
    header, payload = read_shard(path)
    assert path.stat().st_size == 1024 + 2 * len(tokens)
    assert header[0] == harness.SHARD_MAGIC == 20240520
    assert header[1] == harness.SHARD_VERSION == 1
    assert header[2] == len(tokens)
    assert not header[3:].any()
    assert payload.tolist() == tokens
    assert [p.name for p in tmp_path.iterdir()] == ["shard.bin"], "temp file left behind"


@pytest.mark.parametrize("bad", [[1, -1], [65536], [[1, 2]], [1.5]])
def test_write_shard_rejects_bad_tokens(tmp_path, bad):
    with pytest.raises(ValueError) as err:
        harness.write_shard(tmp_path / "bad.bin", bad)
    if bad in ([1, -1], [65536]):
        assert str(bad[-1]) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_write_split_shards_and_concatenates(tmp_path):
    tokens = np.arange(25, dtype=np.uint16)
    written = harness.write_split(tmp_path, "train", tokens, shard_tokens=10)
    assert [(p.name, n) for p, n in written] == [
        ("fineweb_train_000000.bin", 10),
        ("fineweb_train_000001.bin", 10),
        ("fineweb_train_000002.bin", 5),
    ]
    assert np.concatenate([read_shard(p)[1] for p, _ in written]).tolist() == tokens.tolist()


def test_collect_docstrings_respects_budget_and_seed():
    docs = harness.collect_docstrings(MAX_CHARS, SEED)
    total = sum(map(len, docs))
    assert total >= MAX_CHARS and total - len(docs[-1]) < MAX_CHARS
    assert all(len(d) >= harness.MIN_DOCSTRING_CHARS for d in docs)
    assert len(set(docs)) == len(docs)
    assert harness.collect_docstrings(MAX_CHARS, SEED) == docs
    assert harness.collect_docstrings(MAX_CHARS, SEED + 1) != docs


def test_demo_shards_and_tokenizer(demo):
    out_dir, info = demo
    assert [p.name for p, _ in info["val_shards"]] == ["fineweb_val_000000.bin"]
    assert [p.name for p, _ in info["val_bytes_shards"]] == ["fineweb_val_bytes_000000.bin"]
    assert [p.name for p, _ in info["train_shards"]] == ["fineweb_train_000000.bin"]
    sp = spm.SentencePieceProcessor(model_file=str(info["tokenizer"]))
    assert info["tokenizer"] == out_dir / "tokenizer" / f"demo_{VOCAB}_bpe_caseops.model"
    assert sp.vocab_size() == VOCAB
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    # the operators are pieces 4-7, as in the records' CaseOps tokenizer
    assert train_gpt.caseops_operator_ids(sp) == dict(zip(train_gpt.CASEOPS_OPERATORS, range(4, 8)))
    (sidecar, n_entries), = info["val_bytes_shards"]
    assert read_shard(sidecar)[0][2] == n_entries == info["val_tokens"]
    for split in ("train", "val"):
        (path, n_tokens), = info[f"{split}_shards"]
        header, tokens = read_shard(path)
        assert header[2] == n_tokens == len(tokens) == info[f"{split}_tokens"]
        assert tokens[0] == harness.BOS_ID
        assert np.count_nonzero(tokens == harness.BOS_ID) == info[f"{split}_docs"]
        assert tokens.max() < VOCAB
        assert not np.isin(tokens, [harness.PAD_ID, harness.EOS_ID, harness.UNK_ID]).any()


def test_val_round_trip_and_byte_counts(demo):
    """Decoding val gives the CaseOps text of the held-out docstrings, which caseops_decode turns back into them
    exactly; the sidecar holds, per token, the bytes of the original text (a brute-force count from the pieces),
    summing to the docstrings' true UTF-8 size; and train_gpt.py reads the set as it reads FineWeb CaseOps data."""
    out_dir, info = demo
    sp = spm.SentencePieceProcessor(model_file=str(info["tokenizer"]))
    _, val_tokens = read_shard(info["val_shards"][0][0])
    decoded = [sp.decode(ids) for ids in split_docs(val_tokens)]

    expected = harness.collect_docstrings(MAX_CHARS, SEED)[-info["val_docs"] :]
    assert decoded == [train_gpt.caseops_encode(d) for d in expected]
    assert [train_gpt.caseops_decode(d) for d in decoded] == expected
    assert set(expected) <= set(harness.stdlib_docstrings())
    assert decoded != expected                                  # the transform did something
    _, train_tokens = read_shard(info["train_shards"][0][0])
    assert not set(decoded) & {sp.decode(ids) for ids in split_docs(train_tokens)}

    _, sidecar = read_shard(info["val_bytes_shards"][0][0])
    brute = [0]                                                 # BOS: no byte
    for ids in split_docs(val_tokens):
        brute += table_bytes(sp, ids, train_gpt.CASEOPS_OPERATORS) + [0]
    assert sidecar.tolist() == brute[:-1]
    assert int(sidecar.sum()) == info["val_bytes"] == sum(len(d.encode()) for d in expected)
    tokens = val_tokens.astype(np.int64)
    assert train_gpt.check_tokenizer_matches_shards(str(info["tokenizer"]), str(out_dir), tokens) == 16
    counted = train_gpt.load_byte_sidecar(str(info["tokenizer"]), str(out_dir), tokens,
                                          train_gpt.build_bpb_tables(str(info["tokenizer"]), VOCAB))
    assert isinstance(counted, train_gpt.ByteSidecar) and counted.nbytes.tolist() == sidecar.tolist()


def test_plain_demo_is_the_same_documents_without_the_transform(tmp_path):
    """--plain: a tokenizer without operators, no sidecar, and the tables count the docstrings' true size."""
    proc = run_cli("demo-data", tmp_path / "plain", "--plain", "--vocab-size", VOCAB, "--max-chars", MAX_CHARS // 4)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == [
        "fineweb_train_000000.bin", "fineweb_val_000000.bin", "tokenizer"]
    model = tmp_path / "plain" / "tokenizer" / f"demo_{VOCAB}_bpe.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert train_gpt.caseops_operator_ids(sp) is None
    _, val_tokens = read_shard(tmp_path / "plain" / "fineweb_val_000000.bin")
    docs = split_docs(val_tokens)
    expected = harness.collect_docstrings(MAX_CHARS // 4, SEED)[-len(docs):]
    assert [sp.decode(ids) for ids in docs] == expected
    assert sum(sum(table_bytes(sp, ids)) for ids in docs) == sum(len(d.encode()) for d in expected)
    tables = train_gpt.build_bpb_tables(str(model), VOCAB)
    assert train_gpt.load_byte_sidecar(str(model), str(tmp_path / "plain"), val_tokens.astype(np.int64), tables) is tables


def test_cli_refuses_to_overwrite(demo):
    out_dir, _ = demo
    before = digests(out_dir)
    proc = run_cli("demo-data", out_dir, "--vocab-size", VOCAB, "--max-chars", MAX_CHARS)
    assert proc.returncode == 2
    assert str(out_dir) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert digests(out_dir) == before


def test_cli_build_is_deterministic(demo, tmp_path):
    """A fresh process with the same arguments writes byte-identical files."""
    out_dir, info = demo
    proc = run_cli("demo-data", tmp_path, "--vocab-size", VOCAB, "--max-chars", MAX_CHARS, "--seed", SEED)
    assert proc.returncode == 0, proc.stderr
    assert f"val {info['val_tokens']:,} tokens" in proc.stdout
    assert len(proc.stdout.splitlines()) == 5  # tokenizer, val shard, its byte sidecar, train shard, summary
    assert digests(tmp_path) == digests(out_dir)


def test_shard_constants_mirror_train_gpt():
    """harness keeps its own copy (it must not import torch); the two must never drift."""
    import train_gpt
    assert (harness.SHARD_MAGIC, harness.SHARD_VERSION, harness.SHARD_HEADER_INTS) == (
        train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, train_gpt.SHARD_HEADER_INTS)
    assert harness.BOS_ID == train_gpt.BOS_ID


def test_an_interrupted_build_leaves_nothing_and_a_rerun_succeeds(tmp_path, monkeypatch):
    """The set is built in a hidden sibling and renamed into place: a build that fails midway (after
    the tokenizer and the val shard, while encoding train) leaves no half set to make every rerun refuse."""
    out_dir = tmp_path / "demo"
    real_encode = harness.encode_documents
    calls = []

    def encode_then_fail(sp, docs):
        calls.append(len(docs))
        if len(calls) == 2:                      # val is written; train is next
            raise KeyboardInterrupt("interrupted midway")
        return real_encode(sp, docs)

    monkeypatch.setattr(harness, "encode_documents", encode_then_fail)
    with pytest.raises(KeyboardInterrupt):
        harness.build_demo_data(out_dir, vocab_size=VOCAB, max_chars=MAX_CHARS // 4, seed=SEED)
    assert calls and list(tmp_path.iterdir()) == []          # no out_dir, no hidden temporary folder
    monkeypatch.setattr(harness, "encode_documents", real_encode)
    info = harness.build_demo_data(out_dir, vocab_size=VOCAB, max_chars=MAX_CHARS // 4, seed=SEED)
    assert sorted(p.name for p in out_dir.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin",
                                                          "fineweb_val_bytes_000000.bin", "tokenizer"]
    assert info["tokenizer"] == out_dir / "tokenizer" / f"demo_{VOCAB}_bpe_caseops.model" and info["tokenizer"].is_file()
    assert [p for p, _ in info["train_shards"] + info["val_shards"]] == [
        out_dir / "fineweb_train_000000.bin", out_dir / "fineweb_val_000000.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_a_killed_build_does_not_block_the_next(tmp_path):
    """What a killed build leaves (its hidden temporary sibling, half full) is not the set: a rerun builds it."""
    stale = tmp_path / ".demo.12345.deadbeef.tmp"
    harness.write_shard(stale / "fineweb_val_000000.bin", [1, 2, 3])
    proc = run_cli("demo-data", tmp_path / "demo", "--vocab-size", VOCAB, "--max-chars", MAX_CHARS // 4)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "demo" / "fineweb_train_000000.bin").is_file()


def test_a_folder_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(harness.OutputExistsError, match="notes.txt"):
        harness.build_demo_data(tmp_path, vocab_size=VOCAB, max_chars=MAX_CHARS // 4, seed=SEED)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
