"""Time one per-document LoRA chunk step (LoRATestTimeTrainer.chunk_step: the rows' forward with their adapters,
the score, the loss's backward and the adapters' AdamW step), eager against torch.compile'd, at each row length
the evaluation uses, on this machine (CPU: inductor's C++ kernels). A benchmark, not a test: it prints a table.

    python3 tools/lora_step_benchmark.py [--layers 4] [--dim 128] [--rows 8] [--window 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def step_times(hp, model, run_models: dict, rows: int, window: int, repeats: int) -> dict[int, dict[str, list[float]]]:
    """{row length: {name: seconds of each timed chunk step}}: at each length one untimed step of every run model
    first (compiles, warms), then the models' steps interleaved, so that a load that comes and goes on a shared
    machine falls on both alike."""
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False, None, None)
    trainers = {name: train_gpt.LoRATestTimeTrainer(hp, rt, model, m, window) for name, m in run_models.items()}
    tokens = torch.randint(2, hp.vocab_size, (rows * window + 1,), generator=torch.Generator().manual_seed(0))
    tokens[::window] = train_gpt.BOS_ID
    for p in model.parameters():
        p.requires_grad_(False)
    out = {}
    for length in train_gpt.lora_lengths(window):
        start = np.arange(rows, dtype=np.int64) * window
        step = train_gpt.LoRAStep(length, start, np.full(rows, length), np.full(rows, max(0, length - 48)),
                                  np.full(rows, length), np.ones(rows, dtype=bool), np.zeros(rows, dtype=bool))
        meta = torch.from_numpy(np.stack([step.start, step.valid, step.score_from, step.score_to, step.learn,
                                          step.fresh]).astype(np.int64))
        times = {name: [] for name in trainers}
        for i in range(repeats + 1):
            for name, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.chunk_step(tokens, step, meta, None)
                if i:
                    times[name].append(time.perf_counter() - t0)
        out[length] = times
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    env = dict(NUM_LAYERS=str(args.layers), MODEL_DIM=str(args.dim), NUM_HEADS="4", NUM_KV_HEADS="2",
               VOCAB_SIZE="1024", RECUR_LAYERS="1-1", PARALLEL_LAST_N="1", XSA_LAST_N=str(args.layers),
               TRAIN_SEQ_LEN=str(args.window), EVAL_SEQ_LEN="0", EVAL_STRIDE="64", ROPE_DIMS="16",
               TTT_LORA_BATCH_TOKENS=str(args.rows * args.window))
    hp, _ = train_gpt.read_settings(env)
    torch.manual_seed(0)
    model = train_gpt.GPT(hp)
    model.recurrence_on = True
    print(f"{args.layers}L x {args.dim}, {args.rows} rows, window {args.window}, LoRA targets {hp.ttt_lora_targets} "
          f"rank {hp.ttt_lora_rank}; torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{args.repeats} steps after one untimed")
    t0 = time.perf_counter()
    times = step_times(hp, model, {"eager": model, "compiled": train_gpt.compile_model(model)}, args.rows, args.window,
                       args.repeats)
    print(f"(both, compiles included: {time.perf_counter() - t0:.1f} s; eager and compiled steps interleaved)")
    print("| row length | eager ms/step | compiled ms/step | eager / compiled |")
    print("|---|---|---|---|")
    for length, t in times.items():
        e, c = statistics.median(t["eager"]) * 1e3, statistics.median(t["compiled"]) * 1e3
        print(f"| {length} | {e:.1f} | {c:.1f} | {e / c:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
