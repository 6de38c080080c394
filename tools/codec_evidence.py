"""CPU-scale evidence for coding the integers: rANS, lzma and others on the same integers, side by side.

One trained sp8192 model quantized once at the settings' k, its integer matrices stored every way measured.

    python3 tools/codec_evidence.py --data SP8192_DEV --tokenizer SP8192_MODEL \
        --cache artifacts/codec_sp8192_s1337.pt --out logs/codec_cpu/codec_sp8192.json

SP8192_DEV is a folder of sp8192 shards of real text in the challenge's format (fineweb_train_*.bin and
fineweb_val_*.bin; the evidence in logs/codec_cpu/ used the challenge's sp8192 dev shards), SP8192_MODEL the
challenge's fineweb_8192_bpe.model.

Options measured on the same integers (the int6 / int7 "q" arrays of every matrix; scales, fp16 tensors and
LQER factors are the same in all): today's layout (one lzma stream, arrays grouped by kind); lzma per tensor
family with raw-filter settings (literal context / position bits, position bits, match finder, dictionary);
bz2 per family; function-preserving permutations that put similar rows together (MLP hidden units: the
up projection's rows and the down projection's columns together; attention heads within their KV group:
query rows, gain, gate row and output columns together), then lzma; and train_gpt's rANS coder with
tables per family x row class x column class, at several class counts. For each: bytes, decode time,
bit-exact round trip. The whole artifact is packed both ways and loaded; the round-trip gap is measured
once (every option is lossless, so they share it). --cache trains the model first when the file is absent
(the settings of tools/compression_evidence.py, --steps of them).
"""

from __future__ import annotations

import argparse
import bz2
import json
import lzma
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

SETTINGS = dict(VOCAB_SIZE="8192", NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", RECUR_LAYERS="1-1",
                PARALLEL_LAST_N="1", TRAIN_SEQ_LEN="256", TRAIN_BATCH_TOKENS="8192", MAX_WALLCLOCK_SECONDS="0",
                LATE_QAT_THRESHOLD="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="25", SEED="1337", VAL_BATCH_SIZE="32768",
                GPTQ_CALIB_SEQS="8", GPTQ_CALIB_LEN="256")
FILTER_GRID = [dict(lc=lc, lp=lp, pb=pb) for lc in (0, 1, 2, 3, 4) for lp, pb in ((0, 0), (0, 2), (1, 1)) if lc + lp <= 4]


# --- function-preserving permutations ---------------------------------------------------------------------

def similarity_order(rows: np.ndarray, after: np.ndarray | None = None) -> np.ndarray:
    """A greedy nearest-neighbour chain through the rows (L1 distance): each next row is the closest unused
    one, the first the closest to `after` (row 0 when None). (Similarity-sorted rows: record #1855's
    per-group compression.)"""
    rows = rows.astype(np.float32)
    used = np.zeros(len(rows), dtype=bool)
    order, cur = [], rows[0] if after is None else after.astype(np.float32)
    for _ in range(len(rows)):
        dist = np.abs(rows - cur).sum(axis=1)
        dist[used] = np.inf
        best = int(np.argmin(dist)) if order or after is not None else 0
        used[best] = True
        order.append(best)
        cur = rows[best]
    return np.array(order)


def permute_mlp(state: dict, prefix: str, perm: np.ndarray) -> None:
    """Reorder the hidden units of the MLP at `prefix` (e.g. blocks.0.mlp.): fc rows and proj columns."""
    p = torch.as_tensor(perm)
    state[prefix + "fc.weight"] = state[prefix + "fc.weight"][p]
    state[prefix + "proj.weight"] = state[prefix + "proj.weight"][:, p]


def permute_heads(state: dict, prefix: str, perm: np.ndarray, heads: int, kv_heads: int) -> None:
    """Reorder the query heads of the attention at `prefix` (e.g. blocks.0.attn.) by `perm`, which must
    keep every head within its key-value group: c_q's row blocks, q_gain, the gate's rows, proj's column
    blocks."""
    group = heads // kv_heads
    if any(perm[h] // group != h // group for h in range(heads)):
        raise ValueError("a head left its key-value group")
    head_dim = state[prefix + "c_q.weight"].shape[0] // heads
    rows = head_rows(perm, head_dim)
    state[prefix + "c_q.weight"] = state[prefix + "c_q.weight"][rows]
    state[prefix + "proj.weight"] = state[prefix + "proj.weight"][:, rows]
    state[prefix + "q_gain"] = state[prefix + "q_gain"][torch.as_tensor(perm)]
    if prefix + "gate.weight" in state:
        state[prefix + "gate.weight"] = state[prefix + "gate.weight"][torch.as_tensor(perm)]


def head_rows(perm: np.ndarray, head_dim: int) -> torch.Tensor:
    return torch.as_tensor(np.concatenate([np.arange(h * head_dim, (h + 1) * head_dim) for h in perm]))


def similarity_permuted(state: dict, hessians: dict, hp) -> tuple[dict, dict]:
    """The float state with every MLP's hidden units and every attention's heads (within their KV group)
    similarity-sorted by their quantized up-projection (query) rows at the settings' k, and the GPTQ
    Hessians that go with it (a matrix whose input columns moved gets its Hessian permuted the same way)."""
    state, hessians = dict(state), dict(hessians)
    spec = tg.QuantSpec.from_settings(hp)
    for name in [n for n in state if n.endswith(".mlp.fc.weight")]:
        q, _ = tg.quantize_rows(state[name], spec.bits_of("mlp"), spec.sigmas_of("mlp"))
        perm = similarity_order(q.numpy())
        permute_mlp(state, name[:-len("fc.weight")], perm)
        proj = name.replace("fc.weight", "proj.weight")
        if proj in hessians:
            hessians[proj] = hessians[proj][perm][:, perm]
    group, head_dim = hp.num_heads // hp.num_kv_heads, hp.model_dim // hp.num_heads
    for name in [n for n in state if n.endswith(".attn.c_q.weight")]:
        q, _ = tg.quantize_rows(state[name], spec.bits_of("attn"), spec.sigmas_of("attn"))
        heads, perm = q.numpy().reshape(hp.num_heads, -1), []
        for g in range(hp.num_kv_heads):    # the chain runs on across groups, so a group of two heads can swap
            perm.extend(g * group + similarity_order(heads[g * group:(g + 1) * group], heads[perm[-1]] if perm else None))
        perm = np.array(perm)
        permute_heads(state, name[:-len("c_q.weight")], perm, hp.num_heads, hp.num_kv_heads)
        proj = name.replace("c_q.weight", "proj.weight")
        if proj in hessians:
            rows = head_rows(perm, head_dim)
            hessians[proj] = hessians[proj][rows][:, rows]
    return state, hessians


# --- the options ----------------------------------------------------------------------------------------

def families(entries: list[dict]) -> dict[str, list[np.ndarray]]:
    out: dict[str, list[np.ndarray]] = {}
    for e in entries:
        if e["scheme"].startswith("int") and "q" in e["parts"]:
            out.setdefault(tg.coding_family(e["name"]), []).append(e["parts"]["q"])
    return out


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def lzma_option(data: bytes, **filters) -> tuple[int, float, bool]:
    """(bytes, decode seconds, round trip exact) of one lzma stream (raw filters when any are given)."""
    if filters:
        packed = lzma.compress(data, format=lzma.FORMAT_XZ,
                               filters=[dict(id=lzma.FILTER_LZMA2, preset=9 | lzma.PRESET_EXTREME, **filters)])
    else:
        packed = lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    back, seconds = timed(lzma.decompress, packed)
    return len(packed), seconds, back == data


def integer_options(entries: list[dict], tag: str) -> dict:
    """Bytes / decode seconds / exactness of each way of storing these entries' integer matrices."""
    fams = families(entries)
    raw = {f: b"".join(np.ascontiguousarray(q).tobytes() for q in qs) for f, qs in fams.items()}
    rows = {}
    size, sec, ok = lzma_option(b"".join(raw.values()))
    rows[f"{tag}lzma, one stream (today's layout)"] = dict(bytes=size, decode_s=sec, exact=ok)
    per = [lzma_option(r) for r in raw.values()]
    rows[f"{tag}lzma per family"] = dict(bytes=sum(p[0] for p in per), decode_s=sum(p[1] for p in per),
                                         exact=all(p[2] for p in per))
    best_total, best_sec, best_settings = 0, 0.0, {}
    for fam, data in raw.items():
        grid = [(lzma_option(data, **f), f) for f in FILTER_GRID]
        (size, sec, ok), best = min(grid, key=lambda g: g[0][0])
        for extra in (dict(mf=lzma.MF_HC4), dict(mf=lzma.MF_BT2), dict(dict_size=1 << 20), dict(nice_len=273)):
            trial = lzma_option(data, **best, **extra)
            if trial[0] < size:
                (size, sec, ok), best = trial, {**best, **extra}
        best_total, best_sec, best_settings[fam] = best_total + size, best_sec + sec, best
        assert ok
    rows[f"{tag}lzma per family, best raw filters"] = dict(bytes=best_total, decode_s=best_sec, exact=True,
                                                          filters={f: {k: int(v) for k, v in s.items()} for f, s in best_settings.items()})
    bz = [bz2.compress(r, 9) for r in raw.values()]
    back, sec = timed(lambda: [bz2.decompress(b) for b in bz])
    rows[f"{tag}bz2 per family"] = dict(bytes=sum(map(len, bz)), decode_s=sec, exact=back == list(raw.values()))
    for r_cls, c_cls in ((1, 1), (1, 4), (2, 4), (4, 4), (2, 8)):
        tg.CODER_ROW_CLASSES, tg.CODER_COL_CLASSES = r_cls, c_cls
        qs = [q for f in fams.values() for q in f]
        fam_ids = [i for i, f in enumerate(fams.values()) for _ in f]
        offset = max(int(np.abs(q).max()) for q in qs)
        arrays = tg.rans_code_matrices(qs, fam_ids, len(fams), offset)
        side = lzma.compress(b"".join(a.tobytes() for k, a in arrays.items() if k not in ("states", "words")),
                             format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
        back, sec = timed(tg.rans_decode_matrices, arrays, [list(q.shape) for q in qs], fam_ids, offset)
        rows[f"{tag}rANS, {r_cls} row x {c_cls} column classes per family"] = dict(
            bytes=arrays["states"].nbytes + arrays["words"].nbytes + len(side), side_bytes=len(side),
            state_bytes=arrays["states"].nbytes, decode_s=sec, exact=all(np.array_equal(a, b) for a, b in zip(back, qs)))
    tg.CODER_ROW_CLASSES, tg.CODER_COL_CLASSES = 2, 4
    entropy = 0.0
    for qs in fams.values():
        v = np.concatenate([q.reshape(-1) for q in qs]).astype(np.int64)
        p = np.bincount(v - v.min()) / v.size
        entropy += -(p[p > 0] * np.log2(p[p > 0])).sum() * v.size / 8
    rows[f"{tag}order-0 entropy per family (no tables, a bound for one table per family)"] = dict(bytes=round(entropy))
    return rows


# --- the model --------------------------------------------------------------------------------------------

def trained_model(hp, rt, cache: str):
    model = tg.build_model(hp, rt)
    if os.path.exists(cache):
        saved = torch.load(cache, weights_only=False)
        model.load_state_dict(saved["state"])
        model.recurrence_on = saved["recurrence_on"]
        return model, saved["hessians"], saved["train_seconds"]
    stream = tg.TokenStream(tg.find_shards(hp.data_path, "train"), hp.vocab_size)
    loader = tg.DistributedTokenLoader(stream, hp.train_batch_tokens, hp.train_seq_len, 1, 1, 0, rt.device)
    t0 = time.time()
    tg.train(hp, rt, model, model, loader, print, lambda *a: None)
    train_s = time.time() - t0
    model.eval()
    calibration = tg.generate_calibration(model, rt, hp.gptq_calib_seqs, hp.gptq_calib_len, hp.gptq_calib_temp, hp.seed)
    hessians = tg.collect_hessians(model, rt, list(calibration.split(8)))
    torch.save(dict(state=model.state_dict(), recurrence_on=model.recurrence_on, hessians=hessians,
                    train_seconds=train_s), cache)
    return model, hessians, train_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder of sp8192 shards of real text (train and val)")
    ap.add_argument("--tokenizer", required=True, help="the challenge's sp8192 tokenizer, fineweb_8192_bpe.model")
    ap.add_argument("--cache", required=True, help="the trained model and its Hessians (trained here when absent)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--val-tokens", type=int, default=50_000)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    settings = dict(SETTINGS, DATA_PATH=args.data, TOKENIZER_PATH=args.tokenizer)
    hp, _ = tg.read_settings(dict(settings, ITERATIONS=str(args.steps)))
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, None, None)
    model, hessians, train_s = trained_model(hp, rt, args.cache)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = tg.QuantSpec.from_settings(hp)
    config = {name: hp.values[name] for name in tg.ARCH_SETTINGS}

    def export(st):
        return tg.quantize_state_dict(st, spec, tg.ternary_patterns(hp), hessians, 9, hp.lqer_tensors, hp.lqer_rank)

    entries = export(state)
    result = dict(settings=settings, steps=args.steps, cache=args.cache, train_seconds=train_s, spec=spec.describe(),
                  lqer_tensors=hp.lqer_tensors, n_params=sum(t.numel() for t in state.values()),
                  integers=sum(e["parts"]["q"].size for e in entries if "q" in e["parts"]))
    result["options"] = integer_options(entries, "")
    for name, row in result["options"].items():
        print(f"{name}: {row}", flush=True)
    # the permuted model: the same function (logits on random tokens), its integers reordered and requantized
    permuted, permuted_hessians = similarity_permuted(state, hessians, hp)
    probe = torch.randint(0, hp.vocab_size, (2, hp.train_seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.logits(probe)
        model.load_state_dict(permuted)
        after = model.logits(probe)
        model.load_state_dict(state)
    result["permutation_max_logit_change"] = float((after - before).abs().max())
    permuted_entries = tg.quantize_state_dict(permuted, spec, tg.ternary_patterns(hp), permuted_hessians, 9,
                                              hp.lqer_tensors, hp.lqer_rank)
    result["options_permuted"] = integer_options(permuted_entries, "permuted: ")
    for name, row in result["options_permuted"].items():
        print(f"{name}: {row}", flush=True)
    # the whole artifact both ways, loaded, and the round-trip gap they share
    artifact = {}
    for coder in tg.INT_CODERS:
        blob, pack_s = timed(tg.pack_artifact, entries, 9, config, coder)
        (loaded, _), load_s = timed(tg.unpack_artifact, blob, coder)
        artifact[coder] = dict(bytes=len(blob), pack_s=pack_s, load_s=load_s, state=tg.state_checksum(loaded))
        print(f"artifact {coder}: {artifact[coder]}", flush=True)
    result["artifact"] = artifact
    result["artifact_same_weights"] = artifact["rans"]["state"] == artifact["lzma"]["state"]
    predicted = sum(g["bytes"] for g in tg.plan_artifact(hp, spec))        # the planner (no LQER factors in it)
    result["planner"] = dict(predicted_bytes=predicted, actual_bytes=artifact["rans"]["bytes"],
                             actual_over_predicted=artifact["rans"]["bytes"] / predicted, tolerance=tg.PLANNER_TOLERANCE)
    print(f"planner: {result['planner']}", flush=True)
    val, _ = tg.load_validation_tokens(hp.data_path, hp.vocab_size, args.val_tokens)
    tables = tg.build_bpb_tables(hp.tokenizer_path, hp.vocab_size)
    score = lambda m: tg.evaluate(hp, rt, m, val, tables, hp.train_seq_len, hp.train_seq_len).val_bpb  # noqa: E731
    float_bpb = score(model)
    loaded_model = tg.GPT(hp)
    loaded_model.load_state_dict(tg.unpack_artifact(tg.pack_artifact(entries, 9, config), "rans")[0])
    loaded_model.recurrence_on = model.recurrence_on
    result.update(float_val_bpb=float_bpb, roundtrip_val_bpb=score(loaded_model), val_tokens=int(val.size))
    result["roundtrip_gap_bpb"] = result["roundtrip_val_bpb"] - float_bpb
    print(f"float {float_bpb:.5f} round trip {result['roundtrip_val_bpb']:.5f}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "x") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
