"""CaseOps: the case transform (a bijection), the operators of the record's tokenizer, the validation byte
sidecar of tools/caseops.py, and the bytes train_gpt.py counts with it: over every document exactly what the
plain sp8192 tables count for the same document, so CaseOps and sp8192 scores divide by identical bytes."""

import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import train_gpt
from _helpers import OFFICIAL_TOKENIZERS, cpu_runtime, random_gpt, time_limit, tiny_hp
from test_pipeline import TRAIN_GPT, run_train, succeeded, summary
from tools import caseops, harness

SP8192 = OFFICIAL_TOKENIZERS / "fineweb_8192_bpe.model"
CASEOPS = OFFICIAL_TOKENIZERS / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
needs_tokenizers = pytest.mark.skipif(not (SP8192.is_file() and CASEOPS.is_file()),
                                      reason=f"{OFFICIAL_TOKENIZERS} lacks the sp8192 or CaseOps model "
                                             "(PGOLF_OFFICIAL_FILES names the folder of the challenge's tokenizers)")
T, A, C, E = train_gpt.CASEOPS_OPERATORS

ADVERSARIAL = [
    "", " ", "a", "A", "I", "Hello", "HELLO", "hELLO", "HeLLo", "iPhone", "eBay", "McDONALD", "NASA's", "ABc", "aBC",
    "The NASA  Launch\n\nof iPhone   x ", "x1Y2Z", "CamelCaseWord snake_case_WORD",
    T, A, C, E, E + E, T + "a", E + "A", A + "nasa", "Hello" + T + "World", E + T + "Hello" + E + E + "WORLD " + A + "x",
    "\ue000\ue005 private-use neighbours", "Ｈｅｌｌｏ ﬁ Å A\u030a ÉCOLE école ß ẞ", "ΑΒΓ Ωmega абв Ж 中文 😀 ǅ ǈ",
    "tab\tTAB\r\nCRLF\x00NUL",
]


def reference_encode(text: str) -> str:
    """The scheme as the record's lossless_caps.py documents it, written as a character loop."""
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch in (T, A, C, E):
            out += [E, ch]
            i += 1
            continue
        if not ("a" <= ch.lower() <= "z" and ch.isascii()):
            out.append(ch)
            i += 1
            continue
        j = i
        while j < len(text) and text[j].isascii() and text[j].isalpha():
            j += 1
        word = text[i:j]
        if word.islower():
            out.append(word)
        elif len(word) >= 2 and word.isupper():
            out += [A, word.lower()]
        else:
            for k, ch in enumerate(word):
                if ch.isupper():
                    out.append(T if k == 0 else C)
                out.append(ch.lower())
        i = j
    return "".join(out)


def original_bytes(caseops_text: str) -> int:
    """Brute force: UTF-8 bytes of a CaseOps text with every operator dropped, except one that ESC made literal
    (the text may not be an exact CaseOps text: NFKC makes "A" + combining ring a TITLE before "å")."""
    n, escaped = 0, False
    for ch in caseops_text:
        if escaped or ch not in (T, A, C, E):
            n += len(ch.encode("utf-8"))
            escaped = False
        elif ch == E:
            escaped = True
    return n


def random_strings(n: int, seed: int = 0) -> list[str]:
    alphabet = "aAbBzZ  \n.'" + T + A + C + E + "éÉΩж中😀\ue000"
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 24))) for _ in range(n)]


def round_trip_failures(encode, strings) -> list[str]:
    """The strings the pair (encode, train_gpt.caseops_decode) does not carry back to themselves."""
    bad = []
    for s in strings:
        try:
            if train_gpt.caseops_decode(encode(s)) != s:
                bad.append(s)
        except train_gpt.CaseOpsError:
            bad.append(s)
    return bad


def test_transform_is_the_documented_scheme():
    assert train_gpt.caseops_encode("The NASA  iPhone, I said.") == f"{T}the {A}nasa  i{C}phone, {T}i said."
    assert train_gpt.caseops_encode("HeLLo " + E) == f"{T}he{C}l{C}lo {E}{E}"
    for s in ADVERSARIAL + random_strings(2000):
        assert train_gpt.caseops_encode(s) == reference_encode(s), repr(s)


def test_inverse_of_transform_is_identity():
    strings = ADVERSARIAL + random_strings(5000, seed=1)
    assert round_trip_failures(train_gpt.caseops_encode, strings) == []
    for s in strings:     # and the image is exactly what re-encodes to itself
        t = train_gpt.caseops_encode(s)
        assert train_gpt.caseops_encode(train_gpt.caseops_decode(t)) == t


def test_a_transform_that_drops_an_escape_is_caught():
    dropped = lambda s: train_gpt.caseops_encode(s).replace(E + T, T)    # noqa: E731
    assert round_trip_failures(dropped, ADVERSARIAL) != []
    # and a text with an operator left dangling is not a CaseOps text
    for bad in (T, A + "1", C + " x", E + "a", "x" + E):
        with pytest.raises(train_gpt.CaseOpsError):
            train_gpt.caseops_decode(bad)


@needs_tokenizers
def test_operators_are_the_record_tokenizers_user_symbols():
    co = spm.SentencePieceProcessor(model_file=str(CASEOPS))
    ids = train_gpt.caseops_operator_ids(co)
    assert ids == {T: 4, A: 5, C: 6, E: 7}
    assert [co.id_to_piece(i) for i in co.encode(train_gpt.caseops_encode("The NASA"))] == [T, "the", "▁", A, "nas", "a"]
    assert train_gpt.caseops_operator_ids(spm.SentencePieceProcessor(model_file=str(SP8192))) is None


def test_stream_bytes_escape_runs_by_hand():
    """ESC ESC TITLE: a literal ESC (3 bytes) then a real TITLE (0), which no (previous, target) table can tell
    from ESC TITLE (a literal TITLE, 3 bytes); an ESC the stream was cut after counts 0."""
    tables = (np.full(16, 2, dtype=np.int64), np.zeros(16, dtype=bool), np.arange(16) < 2)
    ops = {T: 4, A: 5, C: 6, E: 7}
    stream = np.array([1, 9, 7, 7, 4, 9, 7, 4, 5, 9, 7])
    assert train_gpt.stream_bytes(stream, tables, ops).tolist() == [0, 2, 0, 3, 0, 2, 0, 3, 0, 2, 0]
    with pytest.raises(train_gpt.PipelineError, match="ESC at position 1 is not followed by an operator"):
        train_gpt.stream_bytes(np.array([1, 7, 9]), tables, ops)


def documents() -> list[str]:
    """Held-out-like text that does not survive encode -> decode (newlines, indentation, runs of spaces):
    stdlib docstrings, plus the adversarial strings."""
    return harness.collect_docstrings(max_chars=150_000, seed=0) + ADVERSARIAL


def sp8192_bytes(sp, doc: str, tables) -> int:
    return int(train_gpt.stream_bytes(np.array([train_gpt.BOS_ID] + sp.encode(doc)), tables).sum())


@needs_tokenizers
def test_caseops_bytes_equal_sp8192_tables_per_document():
    sp, co = (spm.SentencePieceProcessor(model_file=str(p)) for p in (SP8192, CASEOPS))
    plain, tables = train_gpt.build_bpb_tables(str(SP8192), 8192), train_gpt.build_bpb_tables(str(CASEOPS), 8192)
    ops = train_gpt.caseops_operator_ids(co)
    docs = documents()
    changed = 0
    for doc in docs:
        ids = np.array([train_gpt.BOS_ID] + co.encode(train_gpt.caseops_encode(doc)))
        counted = int(train_gpt.stream_bytes(ids, tables, ops).sum())
        assert counted == sp8192_bytes(sp, doc, plain), repr(doc[:60])
        # brute force: the original text the CaseOps ids decode to, UTF-8 length
        assert counted == original_bytes(co.decode(ids[1:].tolist()))
        changed += sp.decode(sp.encode(doc)) != doc
    assert changed > len(docs) // 2        # the normalization really is exercised
    # the operators' own UTF-8 bytes (what the tables alone would count) are not the original's
    doc = "The NASA iPhone"
    ids = np.array([train_gpt.BOS_ID] + co.encode(train_gpt.caseops_encode(doc)))
    assert int(train_gpt.target_bytes(ids[:-1], ids[1:], tables).sum()) == len(doc) + 3 * 3


def write_docs(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    """tools/caseops.py build over 40 validation + 200 training documents (stdlib docstrings and the
    adversarial strings), small shards so the sidecar spans several files."""
    if not CASEOPS.is_file():
        pytest.skip(f"no CaseOps tokenizer in {OFFICIAL_TOKENIZERS} (PGOLF_OFFICIAL_FILES names the folder)")
    root = tmp_path_factory.mktemp("caseops")
    docs = ADVERSARIAL + harness.collect_docstrings(max_chars=400_000, seed=1)[:240 - len(ADVERSARIAL)]
    jsonl = write_docs(root / "docs.jsonl", docs)
    proc = subprocess.run([sys.executable, str(TRAIN_GPT.parent / "tools" / "caseops.py"), "build", "--docs", str(jsonl),
                           "--out", str(root / "data"), "--tokenizer", str(CASEOPS), "--val-docs", "40",
                           "--shard-tokens", "1000"], capture_output=True, text=True,
                          timeout=time_limit(2.3))      # the build took 2.3 s (time_limit: tests/_helpers.py)
    assert proc.returncode == 0, proc.stderr
    return dict(dir=root / "data", docs=docs, val_docs=docs[:40], info=json.loads(proc.stdout))


def val_stream(data_dir: Path) -> np.ndarray:
    return np.concatenate([np.asarray(train_gpt.load_shard(f)) for f in train_gpt.find_shards(str(data_dir), "val")]
                          ).astype(np.int64)


def run_tool(*args):
    return subprocess.run([sys.executable, str(TRAIN_GPT.parent / "tools" / "caseops.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=time_limit(2.3))


def folder_digests(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_build_streams_in_document_order_whatever_the_workers(demo_data, tmp_path):
    """The tool reads the documents as a stream and tokenizes them in worker processes: 1 and 2 workers write
    identical files; --train-shards K stops after K full shards, the start of the same stream; an existing
    folder is refused and a failed build leaves nothing (the demo's CaseOps tokenizer: no official files needed)."""
    docs = write_docs(tmp_path / "docs.jsonl", ADVERSARIAL + harness.collect_docstrings(max_chars=200_000, seed=2))
    common = ("build", "--docs", docs, "--tokenizer", demo_data["tokenizer"], "--val-docs", 30, "--shard-tokens", 4000)
    one, two, cut = (tmp_path / name for name in ("one", "two", "cut"))
    info = {}
    for out, extra in ((one, ("--workers", 1)), (two, ("--workers", 2)), (cut, ("--workers", 2, "--train-shards", 2))):
        proc = run_tool(*common, "--out", out, *extra)
        assert proc.returncode == 0, proc.stderr
        info[out.name] = json.loads(proc.stdout)
    assert folder_digests(one) == folder_digests(two) and info["one"] == info["two"]
    assert info["one"]["train_shards"] > 3 and info["one"]["val_docs"] == 30
    assert (info["cut"]["train_shards"], info["cut"]["train_tokens"]) == (2, 8000)
    first_two = {"fineweb_train_000000.bin", "fineweb_train_000001.bin"}
    assert folder_digests(cut) == {n: b for n, b in folder_digests(one).items() if "train" not in n or n in first_two}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "docs.jsonl", "one", "two"]
    refused = run_tool(*common, "--out", one)
    assert refused.returncode == 2 and f"--out {one} already exists" in refused.stderr and "Traceback" not in refused.stderr
    with open(docs, "a", encoding="utf-8") as f:
        f.write("not json\n")
    broken = run_tool(*common, "--out", tmp_path / "broken")
    assert broken.returncode == 2 and f"{docs}:{len(docs.read_text().splitlines())}: not a JSON object" in broken.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "docs.jsonl", "one", "two"]   # no half folder


@needs_tokenizers
def test_build_writes_shards_and_a_parallel_sidecar(caseops_data):
    d = caseops_data["dir"]
    val_files = train_gpt.find_shards(str(d), "val")       # the sidecar is not taken for a validation shard
    sidecars = sorted(d.glob("fineweb_val_bytes_*.bin"))
    assert len(val_files) >= 2 and [p.name.replace("_bytes", "") for p in sidecars] == [Path(f).name for f in val_files]
    for f, s in zip(val_files, sidecars):
        assert train_gpt.read_shard_header(f) == train_gpt.read_shard_header(str(s))
    tokens = val_stream(d)
    assert np.count_nonzero(tokens == train_gpt.BOS_ID) == 40
    sidecar = np.concatenate([np.asarray(train_gpt.load_shard(str(s))) for s in sidecars])
    assert sidecar[tokens == train_gpt.BOS_ID].sum() == 0
    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    plain = train_gpt.build_bpb_tables(str(SP8192), 8192)
    starts = list(np.flatnonzero(tokens == train_gpt.BOS_ID)) + [tokens.size]
    for k, doc in enumerate(caseops_data["val_docs"]):      # per document: the sp8192 tables' count
        assert int(sidecar[starts[k]:starts[k + 1]].sum()) == sp8192_bytes(sp, doc, plain)
    assert caseops_data["info"]["val_bytes"] == int(sidecar.sum())


@needs_tokenizers
def test_pipeline_reads_the_sidecar_and_refuses_a_wrong_one(caseops_data, tmp_path):
    d = caseops_data["dir"]
    tokens = val_stream(d)
    tables = train_gpt.build_bpb_tables(str(CASEOPS), 8192)
    counted = train_gpt.load_byte_sidecar(str(CASEOPS), str(d), tokens, tables)
    assert isinstance(counted, train_gpt.ByteSidecar)
    assert train_gpt.check_tokenizer_matches_shards(str(CASEOPS), str(d), tokens) == 16
    # a copy whose sidecar is off by one byte at one token, then one without a sidecar
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.glob("fineweb_val*.bin"):
        (bad / f.name).write_bytes(f.read_bytes())
    first = sorted(bad.glob("fineweb_val_bytes_*.bin"))[0]
    raw = bytearray(first.read_bytes())
    raw[1024 + 2 * 5] += 1
    first.write_bytes(bytes(raw))
    total = int(counted.nbytes.sum())
    with pytest.raises(train_gpt.PipelineError,
                       match=rf"sidecar counts {total + 1} bytes, the tokens stand for {total} \(first difference at position 5"):
        train_gpt.load_byte_sidecar(str(CASEOPS), str(bad), tokens, tables)
    caseops.rewrite_sidecar(str(bad), str(CASEOPS))      # tools/caseops.py sidecar repairs it
    assert train_gpt.load_byte_sidecar(str(CASEOPS), str(bad), tokens, tables).nbytes.sum() == counted.nbytes.sum()
    for f in bad.glob("fineweb_val_bytes_*.bin"):
        f.unlink()
    with pytest.raises(train_gpt.PipelineError, match="CaseOps tokenizer but .* no fineweb_val_bytes"):
        train_gpt.load_byte_sidecar(str(CASEOPS), str(bad), tokens, tables)
    # the plain tokenizer's tables stand when there is no sidecar
    assert train_gpt.load_byte_sidecar(str(SP8192), str(bad), tokens, tables) is tables


@needs_tokenizers
def test_tokenizer_check_refuses_text_that_is_not_caseops():
    co = spm.SentencePieceProcessor(model_file=str(CASEOPS))
    docs = [f"The NASA launch number {k}, said Ms. McDonald." for k in range(8)] + ["Ｈｅｌｌｏ", "A\u030a ring"]
    good = harness.encode_documents(co, [train_gpt.caseops_encode(d) for d in docs] + [""]).astype(np.int64)
    assert train_gpt.check_tokenizer_matches_shards(str(CASEOPS), "d", good) == len(docs)   # NFKC's few tolerated
    assert not train_gpt.is_caseops_text(co.decode(good[-6:-1].tolist()))
    # the same documents tokenized without the transform: they re-encode to the same ids, but are not CaseOps
    plain = harness.encode_documents(co, docs + [""]).astype(np.int64)
    with pytest.raises(train_gpt.PipelineError, match="not CaseOps text"):
        train_gpt.check_tokenizer_matches_shards(str(CASEOPS), "d", plain)
    # written by a transform that dropped the escape of literal operators
    dropped = harness.encode_documents(co, [train_gpt.caseops_encode(d).replace(E + T, T) for d in
                                            [T + " " + d for d in docs]] + [""]).astype(np.int64)
    with pytest.raises(train_gpt.PipelineError, match="not CaseOps text"):
        train_gpt.check_tokenizer_matches_shards(str(CASEOPS), "d", dropped)


@needs_tokenizers
def test_sidecar_bpb_equals_brute_force(caseops_data):
    stream = val_stream(caseops_data["dir"])
    tokens = stream[:np.flatnonzero(stream == train_gpt.BOS_ID)[12]]      # the first 12 documents, whole
    counted = train_gpt.load_byte_sidecar(str(CASEOPS), str(caseops_data["dir"]), tokens,
                                          train_gpt.build_bpb_tables(str(CASEOPS), 8192))
    hp = tiny_hp(VOCAB_SIZE=8192)
    model = random_gpt(hp)
    r = train_gpt.evaluate(hp, cpu_runtime(), model, tokens, counted, 16, 8, collect=True)
    # brute force: the original bytes of each document, from the text its CaseOps ids decode to
    co = spm.SentencePieceProcessor(model_file=str(CASEOPS))
    starts = list(np.flatnonzero(tokens == train_gpt.BOS_ID)) + [tokens.size]
    brute = sum(original_bytes(co.decode(tokens[a + 1:b].tolist())) for a, b in zip(starts[:-1], starts[1:]))
    assert r.val_bytes == brute
    assert r.val_bpb == pytest.approx(float(np.sum(r.nll, dtype=np.float64)) / (math.log(2) * brute), rel=1e-9)
    with pytest.raises(train_gpt.PipelineError, match="not its own"):     # positions, not ids: the stream's own
        train_gpt.target_bytes(tokens[1:-1], tokens[2:], counted)


# --- the default data path and its pairings, on the demo sets (no official files needed) ------------------------

@pytest.fixture(scope="module")
def plain_demo(demo_data, tmp_path_factory):
    """The session's demo documents without the transform (demo-data --plain): a plain tokenizer, no sidecar."""
    from conftest import DEMO_MAX_CHARS
    out = tmp_path_factory.mktemp("plain_demo") / "plain"
    info = harness.build_demo_data(out, vocab_size=demo_data["vocab"], max_chars=DEMO_MAX_CHARS, seed=0, caseops=False)
    assert info["val_bytes"] == demo_data["val_bytes"] and info["val_docs"] == demo_data["val_docs"]
    return dict(info, dir=out, vocab=demo_data["vocab"])


def without_sidecar(demo, folder: Path) -> Path:
    """The demo's shards, less the byte sidecar."""
    folder.mkdir()
    for path, _ in demo["val_shards"] + demo["train_shards"]:
        (folder / Path(path).name).symlink_to(path)
    return folder


def test_a_sidecar_is_refused_with_a_tokenizer_that_is_not_caseops(plain_demo, tmp_path):
    """A byte sidecar marks CaseOps data: a plain tokenizer beside one is the wrong pairing, refused by name even
    when the sidecar holds what the plain tables count (so no byte comparison would catch it)."""
    tokenizer, data = str(plain_demo["tokenizer"]), tmp_path / "plain_with_sidecar"
    data.mkdir()
    (data / "fineweb_val_000000.bin").symlink_to(plain_demo["val_shards"][0][0])
    tokens = np.asarray(train_gpt.load_shard(str(data / "fineweb_val_000000.bin"))).astype(np.int64)
    tables = train_gpt.build_bpb_tables(tokenizer, plain_demo["vocab"])
    harness.write_split(data, "val_bytes", train_gpt.stream_bytes(tokens, tables), harness.DEFAULT_SHARD_TOKENS)
    with pytest.raises(train_gpt.PipelineError, match=f"DATA_PATH={data} has a byte sidecar .* but TOKENIZER_PATH="
                                                      f"{re.escape(tokenizer)} is not a CaseOps tokenizer"):
        train_gpt.load_byte_sidecar(tokenizer, str(data), tokens, tables)
    before = (data / "fineweb_val_bytes_000000.bin").read_bytes()       # and the tool writes none for it
    with pytest.raises(train_gpt.PipelineError, match="no CaseOps operator pieces"):
        caseops.rewrite_sidecar(str(data), tokenizer)
    assert (data / "fineweb_val_bytes_000000.bin").read_bytes() == before


@pytest.mark.slow
def test_the_sp8192_preset_reads_plain_data_at_its_default_paths(plain_demo, tmp_path):
    """PRESET=sp8192 with neither DATA_PATH nor TOKENIZER_PATH set reads ./data/datasets/fineweb10B_sp8192 with
    ./data/tokenizers/fineweb_8192_bpe.model (here the plain demo set, put there) and counts bytes with the tables;
    the default preset, in the same folder, looks for the CaseOps data and says so."""
    data = tmp_path / "data"
    (data / "datasets").mkdir(parents=True)
    (data / "tokenizers").mkdir()
    (data / "datasets" / "fineweb10B_sp8192").symlink_to(plain_demo["dir"])
    (data / "tokenizers" / "fineweb_8192_bpe.model").symlink_to(plain_demo["tokenizer"])
    succeeded(run_train(tmp_path, None, RUN_ID="plain", PRESET="sp8192", VOCAB_SIZE=plain_demo["vocab"], ITERATIONS=2))
    s = summary(tmp_path, "plain")
    assert s["preset"] == "sp8192" and "DATA_PATH" not in s["explicit_settings"]
    assert (s["hyperparameters"]["DATA_PATH"], s["hyperparameters"]["TOKENIZER_PATH"]) == (
        "./data/datasets/fineweb10B_sp8192", "./data/tokenizers/fineweb_8192_bpe.model")
    assert s["val_bytes"] == plain_demo["val_bytes"]
    log = (tmp_path / "logs" / "plain.txt").read_text(encoding="utf-8").split("=" * 100 + "\n", 1)[1]
    assert "val bytes: from the sidecar" not in log and "val_tokens:" in log
    default = run_train(tmp_path, None, RUN_ID="default", VOCAB_SIZE=plain_demo["vocab"], ITERATIONS=2)
    assert default.returncode == 2 and "Traceback" not in default.stderr
    assert "./data/datasets/fineweb10B_sp8192_caseops/fineweb_val_*.bin" in default.stderr


@pytest.mark.parametrize("pairing", ["caseops tokenizer, plain shards", "plain tokenizer, caseops shards",
                                     "no sidecar"])
def test_a_wrong_pairing_is_refused_before_training(demo_data, plain_demo, pairing, tmp_path):
    """The CaseOps tokenizer on plain shards, a plain tokenizer on CaseOps shards, CaseOps shards without their
    byte sidecar: each ends the run in one line naming the paths, before the model is built (exit 2)."""
    data, tokenizer, message = {
        "caseops tokenizer, plain shards": (plain_demo["dir"], demo_data["tokenizer"], "did not write the shards"),
        "plain tokenizer, caseops shards": (demo_data["dir"], plain_demo["tokenizer"], "did not write the shards"),
        "no sidecar": (without_sidecar(demo_data, tmp_path / "bare"), demo_data["tokenizer"],
                       "is a CaseOps tokenizer but DATA_PATH=.* has no fineweb_val_bytes_\\*.bin sidecar"),
    }[pairing]
    proc = run_train(tmp_path, demo_data, RUN_ID="pairing", DATA_PATH=data, TOKENIZER_PATH=tokenizer)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line, = proc.stderr.strip().splitlines()
    assert f"TOKENIZER_PATH={tokenizer}" in line and f"DATA_PATH={data}" in line and re.search(message, line), line
    log = (tmp_path / "logs" / "pairing.txt").read_text(encoding="utf-8").split("=" * 100 + "\n", 1)[1]
    assert "model_params:" not in log and not (tmp_path / "artifacts").exists()


@pytest.mark.slow
@needs_tokenizers
def test_caseops_data_trains_and_scores_through_the_pipeline(caseops_data, tmp_path):
    demo = dict(dir=caseops_data["dir"], tokenizer=CASEOPS, vocab=8192)
    succeeded(run_train(tmp_path, demo, RUN_ID="caseops", ITERATIONS=2))
    s = summary(tmp_path, "caseops")
    sp = spm.SentencePieceProcessor(model_file=str(SP8192))
    plain = train_gpt.build_bpb_tables(str(SP8192), 8192)
    assert s["val_bytes"] == sum(sp8192_bytes(sp, doc, plain) for doc in caseops_data["val_docs"])
