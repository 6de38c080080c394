"""CPU-scale compression evidence (quantizers and packings): one trained model, many exports, side by side.

Trains a small model with train_gpt.py's own loop on real text (late QAT off, so the float weights are
the trained ones), collects GPTQ Hessians as the pipeline does (self-generated text), then exports it
several ways and reports for each: bits per parameter after lzma per group (the group's arrays
compressed alone, as the summary's `quant.groups`), the artifact's bytes, and the round-trip gap (val_bpb
of the dequantized model minus the float model's, plain windows, on held-out tokens). Also the byte
layouts lzma was tried on; sp1024 against sp8192 is another script's (tools/frontier_evidence.sh).

    python3 tools/compression_evidence.py --data SP8192_DEV --tokenizer SP8192_MODEL --vocab 8192 \
        --out logs/compression_cpu/x.json

SP8192_DEV is a folder of shards of real text in the challenge's format (fineweb_train_*.bin and
fineweb_val_*.bin; logs/compression_cpu/ used the challenge's sp8192 dev shards), SP8192_MODEL the tokenizer
they were made with (the challenge's fineweb_8192_bpe.model); --vocab is its vocabulary size.

The replaced quantizer (a per-row clip search over fractions of the row's max |w|, least squared error,
GPTQ on each clip's grid keeping the better of GPTQ and round-to-nearest per row) is written out here
so it can be measured against SDClip on the same weights; train_gpt.py no longer has it.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

CLIP_SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8)       # the replaced quantizer's clips, fractions of max |w|


def clip_search_rows(w, bits, hessian=None):
    """The replaced quantizer: per row, the clip (of CLIP_SEARCH) and rounding (GPTQ or nearest) with the
    least (Hessian-weighted when a Hessian is given) error; fp16 scale clip * max|w| / qmax."""
    qmax = 2 ** (bits - 1) - 1
    w = w.detach().float()
    absmax = w.abs().amax(dim=1)
    factor = tg.gptq_factor(hessian) if hessian is not None else None
    best = None
    for clip in CLIP_SEARCH if bits < 8 else (1.0,):
        scale = (clip * absmax / qmax).clamp_min(tg.FP16_TINY).half()
        candidates = [tg.round_rows(w, scale, qmax)]
        if factor is not None and factor.u is not None:
            ordered = w.clone()
            ordered[:, factor.dead] = 0.0
            candidates.append(tg._gptq_columns(ordered[:, factor.order], factor.u, scale, qmax)[:, factor.back])
        for q in candidates:
            deq = tg.dequantize_rows(q, scale)
            err = tg.hessian_error(w, deq, hessian) if hessian is not None else (deq - w).square().sum(dim=1).double()
            if best is None:
                best = [q, scale, err]
            else:
                better = err < best[2]
                best = [torch.where(better[:, None], q, best[0]), torch.where(better, scale, best[1]),
                        torch.minimum(err, best[2])]
    return best[0], best[1]


def export_entries(state, hessians, scheme):
    """Entries like quantize_state_dict's, under one of the schemes compared here: scheme["matrices"] is
    ("clip", bits) or ("sdclip", bits, mlp_k, attn_k); scheme["embed"] is ("clip", bits) or
    ("sdclip", bits, k, gptq); scheme["lqer"] the number of LQER tensors (rank 4)."""
    entries, candidates = [], {}
    for name, t in state.items():
        if not (t.ndim == 2 and name.endswith(".weight")):
            entries.append(dict(name=name, scheme="fp16", shape=list(t.shape), parts={"w": t.detach().half().numpy()}))
            continue
        embedding = name in tg.EMBEDDING_TABLES
        how = scheme["embed"] if embedding else scheme["matrices"]
        hessian = hessians.get(name)
        if how[0] == "clip":                                   # the old export: no GPTQ for the embedding
            q, scale = clip_search_rows(t, how[1], None if embedding else hessian)
        else:
            k = how[2] if embedding else (how[2] if ".mlp." in name else how[3])
            gptq = (how[3] if embedding else True) and hessian is not None
            q, scale = tg.gptq_quantize(t, hessian, how[1], k) if gptq else tg.quantize_rows(t, how[1], k)
        # int4 values are stored under int5_row: dequantization is q * scale whatever the width
        entry = dict(name=name, scheme=f"int{max(how[1], 5)}_row", shape=list(t.shape),
                     parts=tg.to_numpy_parts(dict(q=q, scale=scale)))
        entries.append(entry)
        if scheme.get("lqer"):
            deq = tg.dequantize_rows(q, scale)
            candidates[name] = tg.lqer_candidate(t.float(), deq, hessian, 4)
    return tg.add_lqer(entries, scheme.get("lqer", 0), candidates)


def layouts(entries):
    """The byte layouts compared for lzma: name -> payload bytes (the header is the same for all)."""
    def raw(arr):
        return np.ascontiguousarray(arr).tobytes()

    kinds = tg.PART_ORDER
    per_tensor = b"".join(raw(a) for e in entries for a in e["parts"].values())
    grouped = b"".join(raw(e["parts"][k]) for k in kinds for e in entries if k in e["parts"])
    transposed = b"".join(raw(e["parts"][k].T if k == "q" else e["parts"][k]) for k in kinds for e in entries
                          if k in e["parts"])
    q_offset = lambda q: (q.astype(np.int16) + 64).astype(np.uint8)       # noqa: E731  (|q| <= 63: 0..127)
    nibbles = b"".join(
        raw((q_offset(e["parts"]["q"]) >> 4).astype(np.uint8)) for e in entries if "q" in e["parts"]) + b"".join(
        raw((q_offset(e["parts"]["q"]) & 15).astype(np.uint8)) for e in entries if "q" in e["parts"]) + b"".join(
        raw(e["parts"][k]) for k in kinds if k != "q" for e in entries if k in e["parts"])
    return {"per tensor, parts in order": per_tensor, "grouped by kind (the artifact's)": grouped,
            "grouped, integers transposed": transposed, "grouped, high and low nibbles apart": nibbles}


def lzma_bytes(data: bytes, **filters) -> int:
    if filters:
        chain = [dict(id=lzma.FILTER_LZMA2, preset=9 | lzma.PRESET_EXTREME, **filters)]
        return len(lzma.compress(data, format=lzma.FORMAT_XZ, filters=chain))
    return len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))


def group_bits(entries):
    """Bits per parameter per report group (weight_group x scheme), each group's arrays compressed alone."""
    out = {}
    for g in tg.group_bytes(entries, 9):
        out[f"{g['name']} {g['scheme']}"] = dict(params=g["params"], bytes=g["bytes"], bits=8 * g["bytes"] / g["params"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--val-tokens", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--cache", default="", help="save the trained model and Hessians here, or load them if it exists")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    env = dict(DATA_PATH=args.data, TOKENIZER_PATH=args.tokenizer, VOCAB_SIZE=str(args.vocab), NUM_LAYERS=str(args.layers),
               MODEL_DIM=str(args.dim), NUM_HEADS="4", NUM_KV_HEADS="2", RECUR_LAYERS="1-1", PARALLEL_LAST_N="1",
               TRAIN_SEQ_LEN="256", TRAIN_BATCH_TOKENS="8192", ITERATIONS=str(args.steps), MAX_WALLCLOCK_SECONDS="0",
               LATE_QAT_THRESHOLD="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="50", SEED=str(args.seed),
               VAL_BATCH_SIZE="32768", GPTQ_CALIB_SEQS="8", GPTQ_CALIB_LEN="256")
    hp, _ = tg.read_settings(env)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, None, None)
    model = tg.build_model(hp, rt)
    train_s = None
    if args.cache and os.path.exists(args.cache):          # the trained model and its Hessians, from an earlier run
        saved = torch.load(args.cache, weights_only=False)
        model.load_state_dict(saved["state"])
        model.recurrence_on, hessians, train_s = saved["recurrence_on"], saved["hessians"], saved["train_seconds"]
    else:
        stream = tg.TokenStream(tg.find_shards(hp.data_path, "train"), hp.vocab_size)
        loader = tg.DistributedTokenLoader(stream, hp.train_batch_tokens, hp.train_seq_len, 1, 1, 0, rt.device)
        t0 = time.time()
        tg.train(hp, rt, model, model, loader, print, lambda *a: None)
        train_s = time.time() - t0
        model.eval()
        calibration = tg.generate_calibration(model, rt, hp.gptq_calib_seqs, hp.gptq_calib_len, hp.gptq_calib_temp,
                                              hp.seed)
        hessians = tg.collect_hessians(model, rt, list(calibration.split(8)))
        if args.cache:
            torch.save(dict(state=model.state_dict(), recurrence_on=model.recurrence_on, hessians=hessians,
                            train_seconds=train_s, settings=env), args.cache)
    val, _ = tg.load_validation_tokens(hp.data_path, hp.vocab_size, args.val_tokens)
    tables = tg.build_bpb_tables(hp.tokenizer_path, hp.vocab_size)
    score = lambda m: tg.evaluate(hp, rt, m, val, tables, hp.train_seq_len, hp.train_seq_len).val_bpb  # noqa: E731
    float_bpb = score(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(t.numel() for t in state.values())

    def measure(name, scheme):
        entries = export_entries(state, hessians, scheme)
        blob = tg.pack_artifact(entries, 9, {})
        loaded = tg.GPT(hp)
        loaded.load_state_dict(tg.unpack_artifact(blob, name)[0])
        loaded.recurrence_on = model.recurrence_on
        bpb = score(loaded)
        row = dict(name=name, scheme=scheme, bytes=len(blob), bits_per_param=8 * len(blob) / n_params,
                   val_bpb=bpb, gap_bpb=bpb - float_bpb, groups=group_bits(entries),
                   lqer=[e["name"] for e in entries if "lqer_a" in e["parts"]])
        print(f"{name}: {len(blob)} bytes, {row['bits_per_param']:.3f} bits/param, gap {row['gap_bpb']:+.4f} bpb; " +
              ", ".join(f"{g} {v['bits']:.3f}" for g, v in row["groups"].items() if v["params"] > 10_000), flush=True)
        return row, entries

    rows = []
    old_emb, default_emb = ("clip", 8), ("sdclip", 7, 15.0, True)
    default = ("sdclip", 6, 12.0, 13.0)
    # 1. the matrices' quantizer, the embedding held at the old int8 (max |w| scale, nearest)
    for name, matrices in [("clip search int6 (the old default)", ("clip", 6)), ("clip search int5", ("clip", 5)),
                           ("clip search int4", ("clip", 4)), ("SDClip int6 k=8", ("sdclip", 6, 8.0, 8.0)),
                           ("SDClip int6 k=10", ("sdclip", 6, 10.0, 10.0)), ("SDClip int6 k=12.85", ("sdclip", 6, 12.85, 12.85)),
                           ("SDClip int6 MLP 12 / attn 13", default), ("SDClip int6 k=16", ("sdclip", 6, 16.0, 16.0)),
                           ("SDClip int6 k=20", ("sdclip", 6, 20.0, 20.0))]:
        rows.append(measure(f"matrices: {name}; embedding: old int8", dict(matrices=matrices, embed=old_emb))[0])
    # 2. the embedding's quantizer, the matrices held at the SDClip default
    for name, embed in [("old int8 (max |w|, nearest)", old_emb), ("SDClip int7 k=15, nearest", ("sdclip", 7, 15.0, False)),
                        ("SDClip int7 k=12, GPTQ (head Hessian)", ("sdclip", 7, 12.0, True)),
                        ("SDClip int7 k=15, GPTQ (head Hessian): the default", default_emb),
                        ("SDClip int7 k=18, GPTQ (head Hessian)", ("sdclip", 7, 18.0, True))]:
        row, entries = measure(f"matrices: SDClip default; embedding: {name}", dict(matrices=default, embed=embed))
        rows.append(row)
        if embed == default_emb:
            default_entries, target = entries, row["bytes"]
    # 3. LQER on 3 tensors, with k coarsened until it costs no more bytes than the default
    rows.append(measure("the default + LQER on 3 tensors", dict(matrices=default, embed=default_emb, lqer=3))[0])
    factor = 1.0
    for _ in range(8):
        scheme = dict(matrices=("sdclip", 6, 12 * factor, 13 * factor), embed=("sdclip", 7, 15 * factor, True), lqer=3)
        size = len(tg.pack_artifact(export_entries(state, hessians, scheme), 9, {}))
        if size <= target:
            break
        factor *= 2 ** (8 * (size - target) / (n_params - 25_000))
    rows.append(measure(f"the default with k x {factor:.4f} + LQER on 3 tensors (equal bytes)", scheme)[0])
    # byte layouts of the default export
    header = len(json.dumps([e["name"] for e in default_entries]))
    layout_rows = {}
    for name, payload in layouts(default_entries).items():
        layout_rows[name] = lzma_bytes(payload)
        print(f"layout {name}: {layout_rows[name]} bytes", flush=True)
    grouped = layouts(default_entries)["grouped by kind (the artifact's)"]
    for filters in (dict(lc=0, lp=0, pb=0), dict(lc=1, lp=0, pb=0), dict(pb=0)):
        key = "grouped, lzma " + " ".join(f"{k}={v}" for k, v in filters.items())
        layout_rows[key] = lzma_bytes(grouped, **filters)
        print(f"layout {key}: {layout_rows[key]} bytes", flush=True)
    q = np.concatenate([e["parts"]["q"].reshape(-1) for e in default_entries if "q" in e["parts"]])
    p = np.bincount(q.astype(np.int64) - q.min()) / q.size
    entropy_bytes = -(p[p > 0] * np.log2(p[p > 0])).sum() * q.size / 8
    result = dict(settings=env, cache=args.cache, train_seconds=train_s, float_val_bpb=float_bpb, n_params=n_params,
                  val_tokens=int(val.size), rows=rows, layouts=layout_rows, header_bytes=header,
                  integer_values=int(q.size), integer_order0_entropy_bytes=entropy_bytes,
                  integer_lzma_bytes=lzma_bytes(q.astype(np.int8).tobytes()))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "x") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
