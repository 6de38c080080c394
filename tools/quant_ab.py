"""CPU-scale A/B of AWQ-lite and of the GPTQ calibration source on one small trained model (issue 26;
docs/quantization.md, "AWQ-lite and the calibration source"). Every export quantizes the same trained weights
with train_gpt's own functions; what changes is the calibration text (self-generated, or training tokens, in the
old and new default amounts, each drawn twice to show the draw's noise) and AWQ-lite (off, on at the settings'
k, on at the bytes of the export without it). Reported per export: artifact bytes, round-trip val_bpb (plain
windows), and the Hessian-weighted error of the GPTQ'd matrices under one reference Hessian (training tokens no
calibration read), relative to w H w^T.

    python3 tools/quant_ab.py --data DIR --tokenizer MODEL --cache artifacts/quant_ab_s1337.pt \
        --out logs/quant_cpu/quant_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt as tg  # noqa: E402

SHAPE = dict(VOCAB_SIZE="8192", NUM_LAYERS="3", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", RECUR_LAYERS="1-1",
             PARALLEL_LAST_N="1", TRAIN_SEQ_LEN="256", TRAIN_BATCH_TOKENS="4096", MAX_WALLCLOCK_SECONDS="0",
             VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="20", VAL_BATCH_SIZE="32768")
# (label, source, sequences, length, seed or stream offset in tokens): the old default, the new, each drawn twice
CALIBRATIONS = [("self 32x1024 (old default)", "self", 32, 1024, 1337), ("self 32x1024, seed 1338", "self", 32, 1024, 1338),
                ("train 32x1024", "train", 32, 1024, 0), ("train 32x1024, other tokens", "train", 32, 1024, 2_000_000),
                ("train 768x2048 (new default)", "train", 768, 2048, 0),
                ("train 768x2048, other tokens", "train", 768, 2048, 2_000_000)]
REFERENCE_OFFSET, REFERENCE_SEQS = 4_000_000, 64          # the reference Hessian's tokens (no calibration reads them)


def train_tokens(stream: tg.TokenStream, seqs: int, length: int, offset: int) -> torch.Tensor:
    return torch.from_numpy(stream.read(offset, seqs * length).astype("int64")).view(seqs, length)


def hessians_of(model, rt, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return tg.collect_hessians(model, rt, list(batch.split(max(1, 65536 // batch.shape[1]))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--val-tokens", type=int, default=65_536)
    ap.add_argument("--cache", default="", help="save the trained model here, or load it if it exists")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    env = dict(SHAPE, DATA_PATH=args.data, TOKENIZER_PATH=args.tokenizer, ITERATIONS=str(args.steps), SEED=str(args.seed))
    hp, _ = tg.read_settings(env)
    rt = tg.Runtime(0, 1, 0, torch.device("cpu"), False, None, None)
    model = tg.build_model(hp, rt)
    stream = tg.TokenStream(tg.find_shards(hp.data_path, "train"), hp.vocab_size)
    if args.cache and os.path.exists(args.cache):
        saved = torch.load(args.cache, weights_only=False)
        model.load_state_dict(saved["state"])
        model.recurrence_on, train_s = saved["recurrence_on"], saved["train_seconds"]
    else:
        loader = tg.DistributedTokenLoader(stream, hp.train_batch_tokens, hp.train_seq_len, 1, 1, 0, rt.device)
        t0 = time.time()
        tg.train(hp, rt, model, model, loader, print, lambda *a: None)
        train_s = time.time() - t0
        if args.cache:
            os.makedirs(os.path.dirname(args.cache) or ".", exist_ok=True)
            torch.save(dict(state=model.state_dict(), recurrence_on=model.recurrence_on, train_seconds=train_s,
                            settings=env), args.cache)
    model.eval()
    tg.set_qat(model, None, ())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    val, _ = tg.load_validation_tokens(hp.data_path, hp.vocab_size, args.val_tokens)
    tables = tg.build_bpb_tables(hp.tokenizer_path, hp.vocab_size)

    def score(weights: dict[str, torch.Tensor]) -> float:
        model.load_state_dict(weights)
        return tg.evaluate(hp, rt, model, val, tables, hp.train_seq_len, hp.train_seq_len).val_bpb

    float_bpb = score(state)
    reference = hessians_of(model, rt, train_tokens(stream, REFERENCE_SEQS, 1024, REFERENCE_OFFSET))
    code = tg.code_bytes()
    spec = tg.QuantSpec.from_settings(hp)
    rows = []

    def export(label: str, hessians: dict, awq_groups: int, budget: int | None = None) -> dict:
        """Quantize and pack at the settings' k, or budget-fit to `budget` (code + model bytes) from there."""
        h = hp.replace(AWQ_GROUPS=awq_groups, ARTIFACT_BUDGET_BYTES=budget or tg.CHALLENGE_CAP_BYTES)
        quantizer = tg.DistributedQuantizer(h, rt, state, hessians)
        t0 = time.time()
        if budget is None:
            entries = quantizer.quantize(spec)
            blob, fitted, tried = tg.pack_artifact(entries, h.lzma_preset, {}), spec, ["1 pack"]
        else:
            plan = tg.BudgetPlan(spec, 1.0, 0, [], 0, sum(t.numel() for n, t in state.items() if n in hessians))
            blob, entries, fitted, tried = tg.fit_budget(h, rt, quantizer, plan, {}, lambda *a, **k: None,
                                                         tg.StageTimes(rt))
        quant_s = time.time() - t0
        weights = {e["name"]: tg.dequantize_parts(e["scheme"], e["parts"], e["shape"]) for e in entries}
        err = sum(tg.hessian_error(state[n], weights[n], reference[n]).sum().item() for n in hessians)
        norm = sum(tg.hessian_error(state[n], torch.zeros_like(state[n]), reference[n]).sum().item() for n in hessians)
        row = dict(label=label, awq_groups=awq_groups, awq=sorted(quantizer.awq), model_bytes=len(blob),
                   bytes_total=code + len(blob), fit_factor=fitted.sigmas_of("mlp") / hp.quant_clip_sigmas_mlp,
                   packs=len(tried), roundtrip_bpb=score(weights), relative_hessian_error=err / norm, quant_s=quant_s)
        row["gap"] = row["roundtrip_bpb"] - float_bpb
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    for label, source, seqs, length, draw in CALIBRATIONS:
        model.load_state_dict(state)
        t0 = time.time()
        if source == "self":
            batch = tg.generate_calibration(model, rt, seqs, length, hp.gptq_calib_temp, draw)
        else:
            batch = train_tokens(stream, seqs, length, draw)
        hessians = hessians_of(model, rt, batch)
        calib_s = time.time() - t0
        off = export(f"{label}, AWQ off", hessians, 0)
        on = export(f"{label}, AWQ-lite 1 x 64 at int8", hessians, 1)
        off["calibration_s"] = on["calibration_s"] = calib_s
        if "default" in label:      # AWQ at equal bytes: both fitted to the bytes of the export without it
            for groups in (0, 1):
                export(f"{label}, AWQ {'on' if groups else 'off'}, fitted to {off['bytes_total']} bytes", hessians, groups,
                       off["bytes_total"])
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(settings=env, float_bpb=float_bpb, train_seconds=train_s, val_tokens=int(val.size),
                       code_bytes=code, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
