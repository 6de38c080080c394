"""A train_gpt.py run unchanged but for its LoRA forward: every per-document adapter is fed the next position's input
(TTTLoRA.add gets x shifted one position left; the last position reads itself), so a chunk's score reads the token
it predicts once the adapters have trained. The audit inside the final pass must fail it (causality_ok and all_ok
false); the audit before commit 55cee3f, which ran the loaded weights without adapters, passed it
(docs/legality.md, logs/audit_cpu/).

    python3 tools/lora_reads_ahead.py [TRAIN_GPT]     # settings from the environment, as for train_gpt.py

TRAIN_GPT: the train_gpt.py to run (default: this repository's), e.g. an older commit's for the comparison."""

import importlib.util
import sys
from pathlib import Path

import torch

path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "train_gpt.py").resolve()
spec = importlib.util.spec_from_file_location("train_gpt", path)
train_gpt = importlib.util.module_from_spec(spec)
sys.modules["train_gpt"] = train_gpt
spec.loader.exec_module(train_gpt)
honest_add = train_gpt.TTTLoRA.add


def reads_ahead(self, slot, target, x, out):
    return honest_add(self, slot, target, torch.cat((x[:, 1:], x[:, -1:]), dim=1), out)


train_gpt.TTTLoRA.add = reads_ahead
sys.exit(train_gpt.entry_point())
