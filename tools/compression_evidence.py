"""CPU-scale compression evidence (issue 12): one trained model, many exports, measured side by side.

Trains a small model with train_gpt.py's own loop on real text (late QAT off, so the float weights are
the trained ones), collects GPTQ Hessians as the pipeline does (self-generated text), then exports it
several ways and reports for each: bits per parameter after lzma per group (the group's arrays
compressed alone, as the summary's `quant.groups`), the artifact's bytes, and the round-trip gap (val_bpb
of the dequantized model minus the float model's, plain windows, on held-out tokens). Also the byte
layouts lzma was tried on, and sp1024 against sp8192 is the other script (tools/evidence.sh).

    python3 tools/compression_evidence.py --data ../shared/data/sp8192_dev \
        --tokenizer ../shared/tokenizers/fineweb_8192_bpe.model --vocab 8192 --out logs/compression_cpu/x.json

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
    """Entries as quantize_state_dict makes them, under one of the schemes compared here."""
    if scheme["kind"] == "sdclip":
        spec = tg.QuantSpec((("embed", scheme["embed_bits"]), ("mlp", scheme["bits"]), ("attn", scheme["bits"])),
                            (("embed", scheme["embed_k"]), ("mlp", scheme["mlp_k"]), ("attn", scheme["attn_k"])))
        return tg.quantize_state_dict(state, spec, hessians=hessians, preset=9, lqer_tensors=scheme.get("lqer", 0),
                                      lqer_rank=4)
    entries = []
    for name, t in state.items():
        if t.ndim == 2 and name.endswith(".weight"):
            bits = scheme["embed_bits"] if name in tg.EMBEDDING_TABLES else scheme["bits"]
            hessian = hessians.get(name) if name not in tg.EMBEDDING_TABLES else None   # the old export: no emb GPTQ
            q, scale = clip_search_rows(t, bits, hessian)
            # int4 values are stored under int5_row: dequantization is q * scale whatever the width
            entries.append(dict(name=name, scheme=f"int{max(bits, 5)}_row", shape=list(t.shape),
                                parts=tg.to_numpy_parts(dict(q=q, scale=scale))))
        else:
            entries.append(dict(name=name, scheme="fp16", shape=list(t.shape), parts={"w": t.detach().half().numpy()}))
    return entries


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
    stream = tg.TokenStream(tg.find_shards(hp.data_path, "train"), hp.vocab_size)
    loader = tg.DistributedTokenLoader(stream, hp.train_batch_tokens, hp.train_seq_len, 1, 1, 0, rt.device)
    t0 = time.time()
    tg.train(hp, rt, model, model, loader, print, lambda *a: None)
    train_s = time.time() - t0
    val, _ = tg.load_validation_tokens(hp.data_path, hp.vocab_size, args.val_tokens)
    tables = tg.build_bpb_tables(hp.tokenizer_path, hp.vocab_size)
    score = lambda m: tg.evaluate(hp, rt, m, val, tables, hp.train_seq_len, hp.train_seq_len).val_bpb  # noqa: E731
    float_bpb = score(model)
    model.eval()
    calibration = tg.generate_calibration(model, rt, hp.gptq_calib_seqs, hp.gptq_calib_len, hp.gptq_calib_temp, hp.seed)
    hessians = tg.collect_hessians(model, rt, list(calibration.split(8)))
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
    old = lambda bits, emb: dict(kind="clip_search", bits=bits, embed_bits=emb)  # noqa: E731
    new = lambda bits, mlp, attn, emb_bits, emb, lqer=0: dict(kind="sdclip", bits=bits, mlp_k=mlp, attn_k=attn,  # noqa: E731
                                                             embed_bits=emb_bits, embed_k=emb, lqer=lqer)
    for name, scheme in [("clip search int6, int8 embeddings (the old default)", old(6, 8)),
                         ("clip search int5, int8 embeddings", old(5, 8)),
                         ("clip search int4, int8 embeddings", old(4, 8)),
                         ("clip search int4, int6 embeddings", old(4, 6)),
                         ("SDClip int6 k=8, int7 embeddings k=15", new(6, 8, 8, 7, 15)),
                         ("SDClip int6 k=10, int7 embeddings k=15", new(6, 10, 10, 7, 15)),
                         ("SDClip int6 k=12.85, int7 embeddings k=15", new(6, 12.85, 12.85, 7, 15)),
                         ("SDClip int6 k=16, int7 embeddings k=15", new(6, 16, 16, 7, 15)),
                         ("SDClip int6 MLP 12 / attn 13, int7 embeddings k=15 (default)", new(6, 12, 13, 7, 15)),
                         ("SDClip default + LQER on 3 tensors", new(6, 12, 13, 7, 15, lqer=3)),
                         ("SDClip int6 k=20, int8 embeddings k=20", new(6, 20, 20, 8, 20))]:
        row, entries = measure(name, scheme)
        rows.append(row)
        if scheme.get("kind") == "sdclip" and scheme["mlp_k"] == 12 and not scheme.get("lqer"):
            default_entries = entries
    # LQER at equal bytes: coarsen k until the LQER artifact is no larger than the default's
    target = next(r["bytes"] for r in rows if r["name"].endswith("(default)"))
    factor = 1.0
    for _ in range(8):
        scheme = new(6, 12 * factor, 13 * factor, 7, 15 * factor, lqer=3)
        size = len(tg.pack_artifact(export_entries(state, hessians, scheme), 9, {}))
        if size <= target:
            break
        factor *= 2 ** (8 * (size - target) / (n_params - 25_000))
    row, _ = measure(f"SDClip default k x {factor:.4f} + LQER on 3 tensors (equal bytes)", scheme)
    rows.append(row)
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
    result = dict(settings=env, train_seconds=train_s, float_val_bpb=float_bpb, n_params=n_params,
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
