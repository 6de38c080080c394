"""Data stage: shard reading, the endless train stream, the distributed loader, validation tokens.

References: shards written by tools/harness.py (and hand-made broken ones), and plain numpy
slicing of the concatenated tokens."""

import hashlib
import os

import numpy as np
import pytest
import torch

import train_gpt
from tools import harness
from train_gpt import PipelineError

HEADER_BYTES = 256 * 4


def write_raw(path, header_ints, tokens, trailing=b""):
    """A shard written by hand: the given header ints (padded to 256) then uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:len(header_ints)] = header_ints
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes() + trailing)
    return str(path)


def test_shard_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = np.concatenate([[0, 1, 65535], rng.integers(0, 65536, 1000)])
    path = tmp_path / "fineweb_train_000000.bin"
    harness.write_shard(path, tokens)
    loaded = train_gpt.load_shard(str(path))
    assert loaded.dtype == np.uint16 and loaded.shape == tokens.shape
    np.testing.assert_array_equal(loaded, tokens)
    assert train_gpt.read_shard_header(str(path)) == tokens.size


def test_empty_shard_round_trip(tmp_path):
    path = tmp_path / "empty.bin"
    harness.write_shard(path, [])
    assert train_gpt.load_shard(str(path)).size == 0


@pytest.mark.parametrize("case", ["bad_magic", "bad_version", "too_few_tokens", "too_many_tokens",
                                  "trailing_byte", "negative_count", "truncated_header", "empty_file", "missing"])
def test_header_errors_name_the_file(tmp_path, case):
    path = tmp_path / f"shard_{case}.bin"
    tokens = np.arange(10)
    if case == "bad_magic":
        write_raw(path, [20240521, 1, 10], tokens)
    elif case == "bad_version":
        write_raw(path, [20240520, 2, 10], tokens)
    elif case == "too_few_tokens":
        write_raw(path, [20240520, 1, 10], tokens[:9])
    elif case == "too_many_tokens":
        write_raw(path, [20240520, 1, 10], np.arange(11))
    elif case == "trailing_byte":
        write_raw(path, [20240520, 1, 10], tokens, trailing=b"\0")
    elif case == "negative_count":
        write_raw(path, [20240520, 1, -10], [])
    elif case == "truncated_header":
        path.write_bytes(np.array([20240520, 1, 0] + [0] * 100, dtype="<i4").tobytes())
    elif case == "empty_file":
        path.write_bytes(b"")
    with pytest.raises(PipelineError) as err:
        train_gpt.load_shard(str(path))
    assert str(path) in str(err.value)


def test_find_shards_sorted_and_empty(tmp_path):
    for i in (2, 0, 1):
        harness.write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [1, 2])
    harness.write_shard(tmp_path / "fineweb_val_000000.bin", [1, 2])
    harness.write_shard(tmp_path / "fineweb_val_bytes_000000.bin", [0, 2])     # a CaseOps byte sidecar
    found = train_gpt.find_shards(str(tmp_path), "train")
    assert [os.path.basename(f) for f in found] == [f"fineweb_train_{i:06d}.bin" for i in range(3)]
    assert [os.path.basename(f) for f in train_gpt.find_shards(str(tmp_path), "val")] == ["fineweb_val_000000.bin"]
    with pytest.raises(PipelineError) as err:
        train_gpt.find_shards(str(tmp_path / "nothing_here"), "train")
    assert os.path.join(str(tmp_path / "nothing_here"), "fineweb_train_*.bin") in str(err.value)


@pytest.fixture
def shards(tmp_path):
    """Four train shards of sizes 7, 0, 13, 5 (one empty) holding the distinct tokens 0..24."""
    sizes = [7, 0, 13, 5]
    tokens = np.arange(sum(sizes))
    files, pos = [], 0
    for i, n in enumerate(sizes):
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        harness.write_shard(path, tokens[pos:pos + n])
        files.append(str(path))
        pos += n
    return files, tokens


def test_token_stream_read_equals_slicing_the_concatenation(shards):
    files, tokens = shards
    stream = train_gpt.TokenStream(files, vocab_size=1024)
    assert stream.total == tokens.size
    repeated = np.tile(tokens, 10)
    for start in range(0, 3 * tokens.size):
        for n in (1, 2, 5, 6, 7, 8, 13, 20, 25, 26, 60):
            expected = repeated[start % tokens.size:start % tokens.size + n]
            np.testing.assert_array_equal(stream.read(start, n), expected, err_msg=f"start={start} n={n}")


def test_token_stream_errors(shards, tmp_path):
    files, _ = shards
    with pytest.raises(PipelineError) as err:
        train_gpt.TokenStream([files[1]], vocab_size=1024)  # only the empty shard
    assert files[1] in str(err.value)
    with pytest.raises(PipelineError) as err:              # tokens 20..24 live in the 4th shard: at start-up
        train_gpt.TokenStream(files, vocab_size=20)
    assert files[3] in str(err.value) and "VOCAB_SIZE=20" in str(err.value)


def test_token_stream_checks_every_read_past_the_start_up_sample(shards, monkeypatch):
    files, _ = shards
    monkeypatch.setattr(train_gpt, "TRAIN_SHARD_CHECK_TOKENS", 0)   # no start-up check: the reads still check
    stream = train_gpt.TokenStream(files, vocab_size=20)
    stream.read(0, 20)
    with pytest.raises(PipelineError) as err:
        stream.read(15, 10)
    assert files[3] in str(err.value) and "VOCAB_SIZE=20" in str(err.value)


def test_token_stream_names_the_shards_read(shards):
    """files_read(read_end): the shards holding the stream's first read_end tokens; a wrapped read names them all."""
    files, _ = shards                                  # sizes 7, 0, 13, 5
    stream = train_gpt.TokenStream(files, vocab_size=1024)
    assert stream.read_end == 0 and stream.files_read(0) == []
    stream.read(0, 7)
    assert stream.read_end == 7 and stream.files_read(stream.read_end) == files[:1]
    stream.read(3, 5)                                  # into the third shard (the second is empty)
    assert stream.read_end == 8 and stream.files_read(stream.read_end) == files[:3]
    stream.read(1, 2)                                  # an earlier span: the furthest read stays
    assert stream.read_end == 8
    stream.read(24, 3)                                 # wraps around: every shard was read
    assert stream.read_end == 27 and stream.files_read(stream.read_end) == files


def _hash_shards(rank, world_size, files):
    rt = train_gpt.Runtime(rank, world_size, 0, torch.device("cpu"), True, None, None)
    return train_gpt.shards_sha256(rt, files)


def test_shards_sha256_is_shared_over_the_ranks(shards):
    """Each rank hashes its share of the files; every rank ends with every file's sha256, in order."""
    from _helpers import run_distributed
    files, _ = shards
    expected = [hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files]
    single = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False, None, None)
    assert train_gpt.shards_sha256(single, files) == expected
    assert run_distributed(_hash_shards, 2, files) == [expected] * 2


def test_validation_tokens(tmp_path):
    harness.write_shard(tmp_path / "fineweb_val_000000.bin", [1, 5, 6, 7])
    harness.write_shard(tmp_path / "fineweb_val_000001.bin", [1, 8, 9])
    val, split = train_gpt.load_validation_tokens(str(tmp_path), 1024, 0)
    assert val.tolist() == [1, 5, 6, 7, 1, 8, 9] and split == 7
    val, split = train_gpt.load_validation_tokens(str(tmp_path), 1024, 5)
    assert val.tolist() == [1, 5, 6, 7, 1] and split == 7             # the split's length, for val_full_split
    with pytest.raises(PipelineError) as err:
        train_gpt.load_validation_tokens(str(tmp_path), 1024, 1)
    assert "fineweb_val_000000.bin" in str(err.value)
    with pytest.raises(PipelineError) as err:
        train_gpt.load_validation_tokens(str(tmp_path), 9, 0)
    assert "fineweb_val_000001.bin" in str(err.value) and "VOCAB_SIZE=9" in str(err.value)
    with pytest.raises(PipelineError) as err:
        train_gpt.load_validation_tokens(str(tmp_path / "missing"), 1024, 0)
    assert "fineweb_val_*.bin" in str(err.value)


# --- the distributed loader ---------------------------------------------------------------

SEQ_LEN = 16
BATCH_TOKENS = 8 * 4 * SEQ_LEN     # 8 chunks of 4 sequences per optimizer step, whatever the world size
STEPS = 12                         # enough to wrap around the stream


@pytest.fixture
def loader_stream(tmp_path):
    tokens = np.arange(3001) % 65536                 # every position distinct: a token names its position
    harness.write_shard(tmp_path / "fineweb_train_000000.bin", tokens[:1000])
    harness.write_shard(tmp_path / "fineweb_train_000001.bin", tokens[1000:])
    return train_gpt.TokenStream(train_gpt.find_shards(str(tmp_path), "train"), 65536), tokens


def step_batches(stream, world, step):
    """{(rank, micro): (x, y)} of one optimizer step, world ranks each with 8 // world micro-steps."""
    accum = 8 // world
    out = {}
    for rank in range(world):
        loader = train_gpt.DistributedTokenLoader(stream, BATCH_TOKENS, SEQ_LEN, world, accum, rank,
                                                  torch.device("cpu"))
        assert loader.local_tokens == BATCH_TOKENS // 8
        for micro in range(accum):
            out[rank, micro] = loader.batch(step, micro)[:2]
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_loader_spans_disjoint_contiguous_and_match_the_stream(loader_stream, world):
    stream, tokens = loader_stream
    accum = 8 // world
    loader = train_gpt.DistributedTokenLoader(stream, BATCH_TOKENS, SEQ_LEN, world, accum, 0, torch.device("cpu"))
    span = loader.local_tokens + 1
    previous_end = 0
    for step in range(STEPS):
        starts = sorted(loader.span_start(step, m, r) for r in range(world) for m in range(accum))
        assert starts[0] == previous_end                     # steps follow each other, no overlap, no gap
        assert starts == [starts[0] + i * span for i in range(8)]   # disjoint and contiguous within the step
        previous_end = starts[-1] + span
        for (rank, micro), (x, y) in step_batches(stream, world, step).items():
            start = loader.span_start(step, micro, rank)
            expected = np.resize(tokens, start + span + tokens.size)[start:start + span]  # wraps around
            assert x.shape == y.shape == (loader.local_tokens // SEQ_LEN, SEQ_LEN) and x.dtype == torch.int64
            np.testing.assert_array_equal(x.flatten().numpy(), expected[:-1])
            np.testing.assert_array_equal(y.flatten().numpy(), expected[1:])


def test_global_batch_is_the_same_for_every_world_size(loader_stream):
    stream, _ = loader_stream
    seen_before = set()
    for step in range(STEPS):
        per_world = {}
        for world in (1, 2, 4):
            batches = step_batches(stream, world, step)
            # chunk order: micro-step major, rank minor (the order the global batch is laid out in)
            ordered = [batches[r, m] for m in range(8 // world) for r in range(world)]
            x = torch.cat([b[0] for b in ordered])
            y = torch.cat([b[1] for b in ordered])
            per_world[world] = (x, y)
            pairs = sorted(zip(map(tuple, x.tolist()), map(tuple, y.tolist())))
            assert pairs == sorted(zip(map(tuple, per_world[1][0].tolist()), map(tuple, per_world[1][1].tolist())))
        for world in (2, 4):
            assert torch.equal(per_world[world][0], per_world[1][0]) and torch.equal(per_world[world][1], per_world[1][1])
        if step < 5:   # before the stream wraps (5 * 8 * 65 < 3001), no input token is seen twice
            this = set(per_world[1][0].flatten().tolist())
            assert len(this) == per_world[1][0].numel() and not this & seen_before
            seen_before |= this


# --- the tokenizer must be the one that wrote the shards ------------------------------------------------

@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A second tokenizer trained on other docstrings, vocabulary 512 like the demo's: it accepts every id
    of the demo shards but did not write them."""
    path = tmp_path_factory.mktemp("other_tokenizer") / "other_512.model"
    harness.train_tokenizer(harness.collect_docstrings(max_chars=200_000, seed=7), 512, path)
    return path


def test_the_tokenizer_that_wrote_the_shards_passes_the_check(demo_data):
    tokens = train_gpt.load_shard(str(demo_data["val_shards"][0][0]))
    assert train_gpt.check_tokenizer_matches_shards(str(demo_data["tokenizer"]), "demo", tokens) == \
        train_gpt.TOKENIZER_CHECK_DOCS


def test_a_tokenizer_that_did_not_write_the_shards_is_refused(demo_data, other_tokenizer):
    """Shards of one tokenizer scored with another's byte tables gave val_bpb ~25% too low with the audit
    all ok; only 'every id below VOCAB_SIZE' was checked."""
    tokens = train_gpt.load_shard(str(demo_data["val_shards"][0][0]))
    with pytest.raises(PipelineError) as err:
        train_gpt.check_tokenizer_matches_shards(str(other_tokenizer), str(demo_data["dir"]), tokens)
    assert f"TOKENIZER_PATH={other_tokenizer}" in str(err.value) and f"DATA_PATH={demo_data['dir']}" in str(err.value)
    with pytest.raises(PipelineError, match="no complete document"):
        train_gpt.check_tokenizer_matches_shards(str(demo_data["tokenizer"]), "d", np.array([5, 6, 1, 7, 8]))


@pytest.mark.slow
def test_a_run_with_the_wrong_tokenizer_ends_before_training_in_seconds(demo_data, other_tokenizer, tmp_path):
    """The log shows it ended before the model and training; the run took 3 s, and time_limit (tests/_helpers.py)
    of that is a limit for hangs only."""
    import time
    from _helpers import time_limit
    from test_pipeline import run_train
    start = time.monotonic()
    proc = run_train(tmp_path, demo_data, RUN_ID="wrong_tokenizer", TOKENIZER_PATH=other_tokenizer)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TOKENIZER_PATH=" in lines[0] and "DATA_PATH=" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "artifacts").exists()
    log = (tmp_path / "logs" / "wrong_tokenizer.txt").read_text().split("=" * 100 + "\n", 1)[1]
    assert "train_shards:" not in log and "model_params:" not in log     # before the model and training
    assert elapsed < time_limit(3.2), elapsed
