"""val_bpb byte tables: build_bpb_tables + target_bytes against a brute-force count from the pieces,
and against the UTF-8 length of the decoded documents."""

import re

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt
from _helpers import OFFICIAL_FILES, OFFICIAL_TOKENIZERS
from train_gpt import PipelineError

# the official tokenizers and held-out shards of the same export; sp8192 is the default vocabulary
OFFICIAL = {"sp1024": (OFFICIAL_TOKENIZERS / "fineweb_1024_bpe.model", OFFICIAL_FILES / "data/sp1024_dev/fineweb_val_000000.bin"),
            "sp8192": (OFFICIAL_TOKENIZERS / "fineweb_8192_bpe.model", OFFICIAL_FILES / "data/sp8192_dev/fineweb_val_000000.bin")}
BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
# No text starts with whitespace: by the official rule a document's first "▁" (after BOS) counts
# 0 bytes, which equals the decoded text only when documents do not start with a space (true of the
# challenge's exporter and of the demo data).
TEXTS = [
    "Hello world. This is a plain English sentence, with punctuation!",
    "Héllo wörld, naïve café — déjà vu: ‘quotes’ and “more quotes”.",
    "Emoji 🙂🚀 and CJK 漢字かな mixed with ASCII 123.",
    "Line one\nLine two\n\n\tindented line   with  runs of   spaces ",
    "x",
    "trailing spaces   ",
    "€100 or £80? ½ price — 50% off!!!",
]


@pytest.fixture(scope="module", params=sorted(OFFICIAL))
def tokenizer_path(request):
    """Each official tokenizer when OFFICIAL_FILES has it; without it, the demo tokenizer stands in for
    sp1024 and sp8192 is skipped."""
    path, _ = OFFICIAL[request.param]
    if path.is_file():
        return str(path)
    if request.param == "sp8192":
        pytest.skip(f"{path} is absent (PGOLF_OFFICIAL_FILES names the folder of the challenge's tokenizers)")
    return str(request.getfixturevalue("demo_data")["tokenizer"])


@pytest.fixture(scope="module")
def sp(tokenizer_path):
    return spm.SentencePieceProcessor(model_file=tokenizer_path)


def brute_force_bytes(sp, tokens):
    """Bytes of each target tokens[1:], from the piece strings alone (the challenge's rule, as the official
    train_gpt.py's build_sentencepiece_luts counts them)."""
    n = sp.vocab_size()
    special = {i for i in (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) if i >= 0}

    def boundary(t):
        return t >= n or t in special

    out = []
    for prev, t in zip(tokens[:-1], tokens[1:]):
        prev, t = int(prev), int(t)
        if boundary(t):
            out.append(0)
            continue
        piece = sp.id_to_piece(t)
        if BYTE_PIECE.fullmatch(piece):
            out.append(1)
        elif piece.startswith("\u2581"):
            out.append(len(piece[1:].encode("utf-8")) + (0 if boundary(prev) else 1))
        else:
            out.append(len(piece.encode("utf-8")))
    return np.array(out, dtype=np.int64)


def pieces_by_kind(sp):
    n = sp.vocab_size()
    special = [i for i in (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) if i >= 0]
    byte = [i for i in range(n) if BYTE_PIECE.fullmatch(sp.id_to_piece(i))]
    space = [i for i in range(n) if sp.id_to_piece(i).startswith("\u2581") and i not in byte]
    multibyte = [i for i in range(n) if i not in byte and i not in special
                 and len(sp.id_to_piece(i).lstrip("\u2581").encode()) > len(sp.id_to_piece(i).lstrip("\u2581"))]
    plain = [i for i in range(n) if i not in special and i not in byte and i not in space]
    return special, byte, space, multibyte, plain


def test_tokenizer_has_the_challenge_layout(sp):
    special, byte, space, _, _ = pieces_by_kind(sp)
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert train_gpt.BOS_ID == sp.bos_id()
    assert len(byte) == 256 and space


def test_hand_made_sequence_matches_brute_force(sp, tokenizer_path):
    n = sp.vocab_size()
    vocab = n + 40                                    # embedding rows beyond the tokenizer's ids
    special, byte, space, multibyte, plain = pieces_by_kind(sp)
    rng = np.random.default_rng(0)
    # every kind of token after every kind of token, plus long random runs
    kinds = [special, byte[:5] + byte[-5:], space[:20], multibyte[:10] or plain[:3], plain[:20], list(range(n, vocab))]
    seq = [sp.bos_id()]
    for before in kinds:
        for after in kinds:
            for _ in range(3):
                seq += [int(rng.choice(before)), int(rng.choice(after))]
    seq += rng.integers(0, vocab, 3000).tolist()
    tokens = np.array(seq, dtype=np.int64)

    tables = train_gpt.build_bpb_tables(tokenizer_path, vocab)
    base, lead, boundary = tables
    assert base.shape == lead.shape == boundary.shape == (vocab,)
    assert base.dtype == np.int64 and lead.dtype == bool and boundary.dtype == bool
    got = train_gpt.target_bytes(tokens[:-1], tokens[1:], tables)
    expected = brute_force_bytes(sp, tokens)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    # the sequence really exercised each rule
    assert 0 in expected and 1 in expected and expected.max() >= 3
    assert any(lead[t] and boundary[p] for p, t in zip(tokens[:-1], tokens[1:]))
    assert any(lead[t] and not boundary[p] for p, t in zip(tokens[:-1], tokens[1:]))


def split_documents(tokens, bos):
    starts = np.flatnonzero(tokens == bos)
    assert starts.size and starts[0] == 0
    return [tokens[s + 1:e] for s, e in zip(starts, list(starts[1:]) + [tokens.size])]


def test_whole_documents_bytes_equal_decoded_utf8(sp, tokenizer_path):
    docs = [np.array(sp.encode(text), dtype=np.int64) for text in TEXTS]
    shards = [shard for tok, shard in OFFICIAL.values() if str(tok) == tokenizer_path and shard.is_file()]
    if shards:
        val = train_gpt.load_shard(str(shards[0]))[:200_000].astype(np.int64)
        docs += split_documents(val, sp.bos_id())[:-1]    # whole documents only (the last may be cut)
    stream = np.concatenate([np.concatenate([[sp.bos_id()], d]) for d in docs])
    tables = train_gpt.build_bpb_tables(tokenizer_path, sp.vocab_size())
    per_target = train_gpt.target_bytes(stream[:-1], stream[1:], tables)
    expected = sum(len(sp.decode(d.tolist()).encode("utf-8")) for d in docs)
    assert int(per_target.sum()) == expected
    assert (per_target[stream[1:] == sp.bos_id()] == 0).all()       # later BOS tokens: 0 bytes
    for d in docs[:len(TEXTS)]:                                     # and document by document
        doc_stream = np.concatenate([[sp.bos_id()], d])
        assert int(train_gpt.target_bytes(doc_stream[:-1], doc_stream[1:], tables).sum()) == \
            len(sp.decode(d.tolist()).encode("utf-8"))


def test_tokenizer_larger_than_vocab_errors(tokenizer_path, sp):
    with pytest.raises(PipelineError) as err:
        train_gpt.build_bpb_tables(tokenizer_path, sp.vocab_size() - 1)
    assert tokenizer_path in str(err.value) and str(sp.vocab_size() - 1) in str(err.value)


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(PipelineError) as err:
        train_gpt.build_bpb_tables(str(tmp_path / "missing.model"), 1024)
    assert "missing.model" in str(err.value)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(PipelineError) as err:
        train_gpt.build_bpb_tables(str(junk), 1024)
    assert str(junk) in str(err.value)
