"""Where eval_projection's LoRA TTT rates come from: a fit of record #1855's logged TTT times (docs/evaluation.md).

    python3 tools/eval_projection_fit.py train_seed42.log train_seed0.log train_seed1234.log
    python3 tools/eval_projection_fit.py --ranges train_seed42.log train_seed0.log train_seed1234.log \
        > tools/fineweb_doc_ranges_1855.json       # the batch ranges alone (tools/gpu_probe.py's lengths)

The logs are #1855's (openai/parameter-golf, records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_
9HpStack_1.0611/). 1. FineWeb-like document lengths: #1855's TTT logs each batch of 64 documents (sorted by length)
with its shortest and longest length (`ttp: b<k>/782 ... dl:<lo>-<hi>`); the batches logged (rank 0's, over the
three seeds) are interpolated, log-uniformly within and between batches, to 50,000 lengths. 2. #1855's scheme
simulated on them (782 batches of 64 claimed from a queue longest first by 8 ranks, rows of min(2048, 48 (c + 1)),
3 phases with barriers at 833 / 1,666 / 2,500 documents, phases at the rate its logs show), each chunk step taking
a + b x tokens: b from LORA_TTT_MFU, a fitted to the three seeds' total TTT times. 3. The fit checked against
#2019's configuration (windows of 2,560, 3 phases; measured 420-493 s). 4. Our default's projection on the same
lengths (eval_projection).
"""
from __future__ import annotations

import heapq
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402

CHUNK, BATCH, DOCS = 48, 64, 50_000
RANGES_SOURCE = ("record #1855's TTT logs (openai/parameter-golf records/track_10min_16mb/2026-04-27_SP8192_LQER_"
                 "SparseGate_BOSSmearFix_9HpStack_1.0611/train_seed{42,0,1234}.log), each `ttp: b<k>/782 ... dl:<lo>-<hi>`: "
                 "batch k of 782 (64 documents of FineWeb's validation split, sorted by length), its shortest and longest "
                 "document in tokens; tools/eval_projection_fit.py --ranges")


def batch_ranges(paths: list[str]) -> dict[int, tuple[int, int]]:
    """{batch k: (its shortest, its longest document)} of the TTT batches #1855's logs name (`ttp: b<k>/782 ...
    dl:<lo>-<hi>`), over the logs given. `--ranges` prints them as tools/fineweb_doc_ranges_1855.json holds them."""
    known = {}
    for path in paths:
        for k, lo, hi in re.findall(r"ttp: b(\d+)/782 .*?dl:(\d+)-(\d+)", Path(path).read_text()):
            known[int(k)] = (int(lo), int(hi))
    return known


def lengths_from_logs(paths: list[str]) -> np.ndarray:
    return lengths_from_ranges(batch_ranges(paths))


def lengths_from_ranges(known: dict[int, tuple[int, int]]) -> np.ndarray:
    """50,000 FineWeb-like lengths (inputs per document, longest first) from the batch ranges `known`: log-uniform
    within each batch, the batches no log names interpolated (in log length) between those it does."""
    ks = np.array(sorted(known))
    lo = np.exp(np.interp(np.arange(1, 783), ks, np.log([known[k][0] for k in ks])))
    hi = np.exp(np.interp(np.arange(1, 783), ks, np.log([known[k][1] for k in ks])))
    out = []
    for k in range(782):
        n = BATCH if k < 781 else DOCS - 781 * BATCH
        out.append(np.exp(np.linspace(np.log(lo[k]), np.log(hi[k]), n)))
    return np.sort(np.concatenate(out).astype(np.int64) - 1)[::-1]       # inputs per document, longest first


def phase_times(path: str) -> tuple[float, float]:
    """(LoRA seconds, phase seconds) of one log: the TTT total less the phases (from `ttpp` to `ttpr`)."""
    text = Path(path).read_text()
    total = float(re.search(r"total_eval_time:([\d.]+)s", text).group(1))
    starts = [float(t) for t in re.findall(r"ttpp: phase:\d/3 .* t:([\d.]+)s", text)]
    ends = [float(t) for t in re.findall(r"ttpr: phase:\d/3 t:([\d.]+)s", text)]
    phases = sum(e - s for s, e in zip(starts, ends))
    return total - phases, phases


def simulate_1855(lengths: np.ndarray, window: int, a: float, b: float, phase_rate: float) -> float:
    """Seconds of #1855's phased LoRA TTT on these lengths: batches claimed from a queue, barriers at the phases."""
    asc = np.sort(lengths)
    batches = sorted((asc[i:i + BATCH] for i in range(0, len(asc), BATCH)), key=lambda x: -x.max())
    cost = []
    for x in batches:
        c = np.arange(-(-int(x.max()) // CHUNK))
        cost.append(len(c) * a + BATCH * np.minimum(window, (c + 1) * CHUNK).sum() * b)
    bounds, longest = [833, 1666, 2500], np.sort(lengths)[::-1]
    free, running, q, done, p, paused = [(0.0, r) for r in range(8)], {}, 0, 0, 0, False
    while q < len(batches) or running:
        while free and q < len(batches) and not paused:
            t, r = heapq.heappop(free)
            running[r] = (t + cost[q], len(batches[q]))
            q += 1
        r = min(running, key=lambda k: running[k][0])
        t, n = running.pop(r)
        done += n
        heapq.heappush(free, (t, r))
        paused = paused or (p < len(bounds) and done >= bounds[p])
        if paused and not running:
            t = max(f for f, _ in free) + int(longest[:bounds[p]].sum()) / phase_rate
            free, p, paused = [(t, rr) for _, rr in free], p + 1, False
    return max(t for t, _ in free)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--ranges"] and len(argv) == 4:
        ranges = batch_ranges(argv[1:])
        print(json.dumps({"source": RANGES_SOURCE, "batches": [[k, *ranges[k]] for k in sorted(ranges)]}))
        return 0
    if len(argv) != 3:
        print(__doc__)
        return 2
    lengths = lengths_from_logs(argv)
    measured = [phase_times(p) for p in argv]
    hp1855, _ = train_gpt.read_settings({"EVAL_SEQ_LEN": "2048", "TTT_PHASES": "3", "TTT_PHASE_DOCS_FRAC": "0.05",
                                        "LOGIT_SOFTCAP_ASYM": "0", "QK_GAIN_INIT": "5.0"})
    flops = lambda t: train_gpt.flops_per_token(hp1855, t)                                     # noqa: E731
    phase_tokens = sum(int(lengths[:n].sum()) for n in (833, 1666, 2500))
    phase_rate = phase_tokens / np.mean([ph for _, ph in measured])                          # tokens/s, 8 GPUs
    print(f"lengths: {len(lengths)} documents, {lengths.sum():,} inputs, longest {lengths.max():,}")
    print(f"#1855 measured (LoRA s, phase s): {[(round(l), round(p, 1)) for l, p in measured]}; phases "
          f"{phase_tokens:,} tokens -> TTT_ASSUMED_MFU {phase_tokens * flops(2048) / np.mean([p for _, p in measured]) / (8 * train_gpt.H100_BF16_DENSE_FLOPS):.4f}")
    b = flops(2048) * 2 / 3 / (train_gpt.H100_BF16_DENSE_FLOPS * train_gpt.LORA_TTT_MFU)
    totals = [sum(m) for m in measured]
    fits = sorted((abs(simulate_1855(lengths, 2048, a, b, phase_rate) - np.mean(totals)), a)
                  for a in np.arange(0.0, 0.12, 0.005))
    a = fits[0][1]
    print(f"fit: b = {b:.3e} s/token (LORA_TTT_MFU {train_gpt.LORA_TTT_MFU}), a = {a:.3f} s/step: #1855 simulated "
          f"{simulate_1855(lengths, 2048, a, b, phase_rate):.0f} s against {min(totals):.0f}-{max(totals):.0f} s measured")
    b2560 = b * flops(2560) / flops(2048)
    print(f"check: #2019's configuration (windows of 2,560, 3 phases) simulated "
          f"{simulate_1855(lengths, 2560, a, b2560, phase_rate * 2048 / 2560):.0f} s; #2019 measured 420-493 s")
    rng = np.random.default_rng(0)
    tokens = np.concatenate([np.concatenate(([train_gpt.BOS_ID], rng.integers(2, 8192, n))) for n in lengths])
    hp, _ = train_gpt.read_settings({})
    parts = train_gpt.eval_projection(hp, tokens.astype(np.int64), tokens.size, *train_gpt.eval_geometry(hp))
    print("our default on these lengths (eval_projection, s): " + " ".join(f"{k}:{v:.0f}" for k, v in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
