"""The memory projection (train_gpt.py: saved_bytes, CudaAutocastPolicy, saved_activations, training_peak) against
independent counts: a hand-made forward, the model at several sizes and depths, the dtypes CUDA autocast gives
(the installed torch's own op lists), every call the forward makes, and the live memory of a real training step."""

import re
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import train_gpt
from _helpers import cpu_runtime, tiny_hp

RMS_NORM_FP32 = torch.torch_version.TorchVersion(torch.__version__) >= (2, 12)


def autocast_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# --- saved_bytes ---------------------------------------------------------------------------------------------

def test_saved_bytes_counts_each_storage_once():
    """x * x saves x twice, and x.exp() * 2 saves exp's output: x and exp(x) once each; the excluded storage (a
    parameter) not at all."""
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 4, requires_grad=True)
    counted = train_gpt.saved_bytes(lambda: ((x * x).exp() * 2) @ w, exclude={w.untyped_storage().data_ptr()})
    assert counted == 3 * x.numel() * 4        # x, exp(x*x) (saved by exp), exp(x*x)*2 (saved by the matmul)
    assert train_gpt.saved_bytes(lambda: (x * x) @ w) == 2 * x.numel() * 4 + w.numel() * 4


def rows_of(hp, rows, T=32, seed=0):
    return torch.randint(0, hp.vocab_size, (rows, T), generator=torch.Generator().manual_seed(seed))


def model_saved(hp, rows, recurrence=True):
    """Bytes a training forward of `rows` rows saves (parameters excluded), eager, CUDA's policy."""
    model = train_gpt.GPT(hp)
    model.recurrence_on = recurrence
    x = rows_of(hp, rows)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with autocast_bf16(), train_gpt.CudaAutocastPolicy():
        return train_gpt.saved_bytes(lambda: model(x, x), params)


def test_saved_bytes_grow_linearly_with_the_rows():
    """Every activation scales with the rows: 1, 2, 3, 5 rows give equal steps per row (exactly), and
    saved_activations' per_token is that step over a row's tokens."""
    hp = tiny_hp(ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole", NUM_LAYERS=4, RECUR_LAYERS="0-1", RECUR_PASSES=2)
    b = {r: model_saved(hp, r) for r in (1, 2, 3, 5)}
    step = b[2] - b[1]
    assert step > 0 and b[3] - b[2] == step and b[5] - b[3] == 2 * step
    saved = train_gpt.training_activations(hp, compiled=False)
    model = train_gpt.GPT(hp)
    model.recurrence_on = True
    per_token = (model_saved(hp, 2) - model_saved(hp, 1)) / 32
    # training_activations measures at MEMORY_PROBE_TOKENS per row: per-token bytes do not depend on the row length
    assert saved.per_token == pytest.approx(per_token, rel=0.02)


def test_each_layer_visit_adds_the_same_bytes():
    """Depth recurrence over layer 0 (additive skips, SKIP_GATES=0): each pass from the second repeat on adds the
    same bytes, one visit (exactly); the first repeat adds one bf16 (rows, T, d) tensor less, its input being the
    first visit's output, which the U-Net skip saves anyway. A third layer (a plain block, the skip count unchanged:
    2 // 2 = 3 // 2 encoder layers) adds one visit plus autocast's bf16 copies of its weights."""
    base = dict(ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole", SKIP_GATES=0, PARALLEL_LAST_N=0,
                XSA_LAST_N=3)
    rows, T, d = 2, 32, 32
    by_passes = [model_saved(tiny_hp(**base, RECUR_LAYERS=""), rows)]
    by_passes += [model_saved(tiny_hp(**base, RECUR_LAYERS="0-0", RECUR_PASSES=p), rows) for p in (2, 3, 4)]
    first, second, third = (b - a for a, b in zip(by_passes, by_passes[1:]))
    assert second == third > 0 and first == second - rows * T * d * 2
    hp2, hp3 = (tiny_hp(**base, NUM_LAYERS=n, RECUR_LAYERS="") for n in (2, 3))
    new_layer = train_gpt.GPT(hp3).blocks[2]
    weight_copies = sum(2 * m.weight.numel() for m in new_layer.modules() if isinstance(m, torch.nn.Linear))
    assert model_saved(hp3, rows) - model_saved(hp2, rows) == second + weight_copies


# --- CUDA's autocast policy on the CPU -------------------------------------------------------------------------

def test_cuda_policy_dtypes():
    """Under CPU bf16 autocast, rms_norm, square, sum and F.normalize stay bf16; with CudaAutocastPolicy they come
    out as CUDA autocast gives them: fp32 (rms_norm only from torch 2.12); matmuls stay bf16 either way."""
    x = torch.randn(4, 8).bfloat16()
    w = torch.randn(8, 8)
    calls = [lambda: F.rms_norm(x, (8,)), lambda: x.square(), lambda: x.sum(-1), lambda: F.normalize(x, dim=-1),
             lambda: F.linear(x, w)]
    with autocast_bf16():
        assert [f().dtype for f in calls] == [torch.bfloat16] * 5
        with train_gpt.CudaAutocastPolicy():
            got = [f().dtype for f in calls]
            assert torch.allclose(F.normalize(x, dim=-1).float(), F.normalize(x.float(), dim=-1), atol=1e-6)
    rms = torch.float32 if RMS_NORM_FP32 else torch.bfloat16
    assert got == [rms, torch.float32, torch.float32, torch.float32, torch.bfloat16]
    with train_gpt.CudaAutocastPolicy():                     # outside autocast it changes nothing
        assert x.square().dtype == torch.bfloat16


def autocast_lists():
    """The installed torch's CUDA autocast op lists (ATen/autocast_mode.h: AT_FORALL_FP32, ..._FP32_SET_OPT_DTYPE,
    and norm's fp32_append_dtype entries), as {list: the op names}."""
    header = Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"
    if not header.exists():
        pytest.skip("this torch ships no ATen headers")
    text = header.read_text()
    lists = {}
    for name in ("AT_FORALL_FP32", "AT_FORALL_FP32_SET_OPT_DTYPE", "AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE",
                 "AT_FORALL_LOWER_PRECISION_FP"):
        body = re.search(r"#define " + name + r"\(_\)(.*?)\n\n", text, re.S).group(1)
        lists[name] = set(re.findall(r"_\((?:ADD_NS\()?(\w+)", body))
    return lists


def test_the_emulated_ops_are_the_ones_cuda_lists():
    """What CudaAutocastPolicy changes, CUDA autocast's own lists (in the installed torch) say: pow (which
    x.square() calls) and rms_norm (from 2.12) run in fp32; sum returns fp32; norm (F.normalize's) appends fp32."""
    lists = autocast_lists()
    assert "pow" in lists["AT_FORALL_FP32"]
    assert ("rms_norm" in lists["AT_FORALL_FP32"]) == RMS_NORM_FP32
    assert "sum" in lists["AT_FORALL_FP32_SET_OPT_DTYPE"] and "norm" in lists["AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE"]
    assert {"linear", "scaled_dot_product_attention"} <= lists["AT_FORALL_LOWER_PRECISION_FP"]


class CallRecorder(TorchFunctionMode):
    """The torch functions a forward calls (as a TorchFunctionMode sees them: a call, not what it calls inside)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.add(getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


# Calls of the forward that autocast_mode.h's lists leave alone on CUDA as on CPU (checked by hand against it: they run
# in their inputs' dtype, or promote; linear and SDPA are lower precision under both), as a TorchFunctionMode names them.
SAME_UNDER_BOTH = {
    "TensorBase.__getitem__", "TensorBase.__setitem__", "TensorBase.add", "TensorBase.mul", "TensorBase.sub",
    "TensorBase.div", "Tensor.__rdiv__", "TensorBase.ne", "TensorBase.remainder", "TensorBase.cos", "TensorBase.sin",
    "TensorBase.float", "TensorBase.to", "TensorBase.mean", "TensorBase.repeat_interleave", "TensorBase.reshape",
    "TensorBase.size", "TensorBase.transpose", "TensorBase.view", "TensorBase.view_as", "getset_descriptor.__get__",
    "_VariableFunctionsClass.arange", "_VariableFunctionsClass.cat", "_VariableFunctionsClass.lerp",
    "_VariableFunctionsClass.outer", "_VariableFunctionsClass.sigmoid", "_VariableFunctionsClass.tanh",
    "_VariableFunctionsClass.zeros_like", "cross_entropy", "embedding", "leaky_relu", "linear",
    "scaled_dot_product_attention",
    "TensorBase.gt", "_VariableFunctionsClass.where",      # the asymmetric softcap, on fp32 logits
} | ({"rms_norm"} if not RMS_NORM_FP32 else set())     # torch < 2.12: rms_norm is in no CUDA list


def test_cuda_policy_covers_every_call_of_the_forward():
    """Every call the frontier forward makes (BigramHash, SmearGate, XSA, gates, two lanes, recurrence, skip gates)
    is either emulated by CudaAutocastPolicy or one both policies treat alike (SAME_UNDER_BOTH): a call added to
    the model that CUDA autocast treats otherwise fails here until it is classified."""
    hp = tiny_hp(BIGRAM_VOCAB=64, ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole", RECUR_LAYERS="0-0",
                 RECUR_PASSES=2, PARALLEL_LAST_N=1, PARALLEL_LANES=2)
    model = train_gpt.GPT(hp)
    model.recurrence_on = True
    x = rows_of(hp, 2)
    recorder = CallRecorder()
    with autocast_bf16(), recorder:
        model(x, x).mean()
    policy = train_gpt.CudaAutocastPolicy
    emulated = {f.__qualname__ for f in policy.FP32 | policy.FP32_RESULT | {F.normalize}}
    assert {"TensorBase.square", "normalize", "TensorBase.sum", "Tensor.__rpow__"} <= recorder.names
    assert recorder.names - emulated - SAME_UNDER_BOTH == set()


# --- compiled: the partition inductor saves --------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_count_is_inductors(monkeypatch):
    """saved_activations(compiled=True) counts through the backend aot_eager_decomp_partition (inductor's
    decompositions and min-cut partition, no code generated); inductor itself saves the same bytes, and fewer
    than eager."""
    hp = tiny_hp(ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole", NUM_LAYERS=1, PARALLEL_LAST_N=0,
                 RECUR_LAYERS="", VOCAB_SIZE=128)
    model = train_gpt.GPT(hp)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = lambda rows: rows_of(hp, rows, T=16)                        # noqa: E731
    counted = train_gpt.saved_activations(lambda x: model(x, x), batch, params, compiled=True)
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **dict(kw, backend="inductor")))
    inductor = train_gpt.saved_activations(lambda x: model(x, x), batch, params, compiled=True)
    eager = train_gpt.saved_activations(lambda x: model(x, x), batch, params, compiled=False)
    assert (counted.per_token, counted.fixed) == (inductor.per_token, inductor.fixed)
    assert counted.compiled and counted.per_token < 0.8 * eager.per_token


# --- training_peak against a real training step ----------------------------------------------------------------

class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by storages created under this mode (each counted until it is freed): an
    allocator's view, independent of what autograd saves."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, key, n):
        if self.live.pop(key, None) is not None:
            self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.live:
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if key:
                    self.live[key] = n
                    self.now += n
                    weakref.finalize(storage, self._free, key, n)
        self.peak = max(self.peak, self.now)
        return out


def test_training_peak_matches_a_training_step():
    """One eager training step on one rank (forward, backward, every optimizer, the EMA's update), after a first
    step made the optimizer states: its peak live bytes (LiveBytes), plus the weights and optimizer states made
    before, equal training_peak's total within 3% (the head's transient included; without it, 10% short)."""
    hp = tiny_hp(MODEL_DIM=64, VOCAB_SIZE=1024, RECUR_LAYERS="1-1", RECUR_PASSES=3, NUM_LAYERS=3, PARALLEL_LAST_N=1,
                 ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole", TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=1024)
    torch.manual_seed(0)
    model = train_gpt.GPT(hp)
    model.recurrence_on = True
    optimizers = train_gpt.build_optimizers(model, hp, cpu_runtime())
    tokens = train_gpt.micro_batch_tokens(hp, 1)
    x = rows_of(hp, tokens // hp.train_seq_len, T=hp.train_seq_len)

    def step():
        with autocast_bf16(), train_gpt.CudaAutocastPolicy():
            loss = model(x, x).mean()
        loss.backward()
        for opt in optimizers:
            opt.step()
        for p in model.parameters():
            p.grad = None

    step()
    before = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        t.numel() * t.element_size() for opt in optimizers for s in opt.state.values() for t in s.values()
        if torch.is_tensor(t))
    live = LiveBytes()
    with live:
        ema = train_gpt.WeightEMA(model, 0.05)
        step()
        ema.update(0.01)
    measured = before + live.peak
    parts = train_gpt.training_peak(hp, model, train_gpt.training_activations(hp, compiled=False), world_size=1)
    predicted = parts["total"] * train_gpt.GIB
    assert parts["ddp_buckets"] == 0 and parts["head_transient"] > 0.1 * parts["total"]
    assert predicted == pytest.approx(measured, rel=0.03)


def test_ttt_peak_matches_a_lora_step():
    """One eager LoRA TTT step (the rows' forward with their adapters, backward, RowAdamW's step) after a first one
    made the optimizer's moments: its peak live bytes plus the weights, adapters and moments made before equal
    ttt_peak's total but flash's parts (no validation stream here) within 3%. Document isolation is off in both, as
    in lora_activations (CPU SDPA would save a document mask flash does not have)."""
    hp = tiny_hp(MODEL_DIM=64, VOCAB_SIZE=1024, RECUR_LAYERS="1-1", RECUR_PASSES=3, NUM_LAYERS=3, PARALLEL_LAST_N=1,
                 TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=128, TTT_LORA_BATCH_TOKENS=4 * 128, TTT_LORA_RANK=8)
    torch.manual_seed(0)
    model = train_gpt.GPT(hp.replace(ATTN_DOC_ISOLATION=0))
    model.recurrence_on = True
    for p in model.parameters():
        p.requires_grad_(False)
    rows = train_gpt.lora_rows(hp, 128)
    lora = train_gpt.TTTLoRA(hp, model, rows, torch.device("cpu"))
    opt = train_gpt.RowAdamW(lora.weights, 1e-4, (0.0, 0.99), 0.5)
    x = rows_of(hp, rows, T=128)

    def step():
        with autocast_bf16(), train_gpt.CudaAutocastPolicy():
            loss = model(x, x, None, lora).mean()
        loss.backward()
        opt.step(torch.ones(rows, dtype=torch.bool))

    step()
    before = sum(p.numel() * p.element_size() for p in model.parameters()) + 3 * lora.weights.numel() * 4
    live = LiveBytes()
    with live:
        step()
    parts = train_gpt.ttt_peak(hp, model, train_gpt.lora_activations(hp, compiled=False), 128, 0)
    assert parts["adapters"] * train_gpt.GIB == 4 * 4 * lora.weights.numel()
    cpu = parts["total"] - parts["fa3_accumulators"] - parts["cu_seqlens"]        # flash's, not on the CPU
    assert cpu * train_gpt.GIB == pytest.approx(before + live.peak, rel=0.03)


def test_optimizer_states_as_the_optimizers_hold_them():
    """training_peak's optimizer part on one rank = the bytes of every state tensor build_optimizers' optimizers
    hold after a step (AdamW's two moments, Muon's momentum; the step counters are not tensors of the weights'
    size); on 2 ranks Muon keeps momentum only for the matrices rank 0 orthogonalises (every other one of a shape)."""
    hp = tiny_hp(ATTN_DOC_ISOLATION=0, EVAL_MODE="sliding", TTT_METHOD="whole")
    model = train_gpt.GPT(hp)
    optimizers = train_gpt.build_optimizers(model, hp, cpu_runtime())
    x = rows_of(hp, 2, T=16)
    model(x, x).mean().backward()
    for opt in optimizers:
        opt.step()
    held = sum(t.numel() * t.element_size() for opt in optimizers for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)
    saved = train_gpt.SavedActivations(0.0, 0.0, False)
    assert train_gpt.training_peak(hp, model, saved, world_size=1)["optimizer"] * train_gpt.GIB == held
    muon = optimizers[2]
    momentum = sum(4 * p.numel() for p in muon.state if "momentum_buffer" in muon.state[p])
    rank0 = sum(4 * p.numel() for group in muon.param_groups for p in group["params"][0::2])
    two = train_gpt.training_peak(hp, model, saved, world_size=2)["optimizer"] * train_gpt.GIB
    assert two == held - momentum + rank0 and rank0 < momentum


# --- tools/harness.py gpu-plan -----------------------------------------------------------------------------------

PLAN_ENV = {"NUM_LAYERS": "2", "RECUR_LAYERS": "0-0", "PARALLEL_LAST_N": "1", "MODEL_DIM": "64", "NUM_HEADS": "4",
            "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "0", "TRAIN_BATCH_TOKENS": "4096", "EVAL_STRIDE": "32",
            "COMPILE": "0", "EVAL_MODE": "sliding", "TTT_METHOD": "whole"}


def test_gpu_plan_is_the_projections(demo_data):
    """gpu-plan's numbers are train_gpt's projections for the environment's settings (COMPILE=0: the eager count;
    step time; the evaluation by part, scaled to --split-tokens; the training varlen capacity; the LoRA step's peak
    with TTT_METHOD=lora), every one with its assumptions, the fields that do not apply null with a reason."""
    from tools import harness
    env = dict(PLAN_ENV, DATA_PATH=str(demo_data["dir"]), TOKENIZER_PATH=str(demo_data["tokenizer"]),
               VOCAB_SIZE=str(demo_data["vocab"]))
    plan = harness.gpu_plan(env, split_tokens=1_000_000)
    hp, _ = train_gpt.read_settings(env)
    memory = train_gpt.training_peak(hp, train_gpt.GPT(hp), train_gpt.training_activations(hp, compiled=False))
    assert plan["train_memory_parts_gib"] == memory and plan["train_peak_gib"] == memory["total"] == plan["train_peak_eager_gib"]
    assert plan["train_graph"] == "eager"
    assert plan["step_ms"] == train_gpt.projected_h100_step_ms(train_gpt.flops_per_token(hp, 64), 4096)
    val, _ = train_gpt.load_validation_tokens(hp.data_path, hp.vocab_size, 0)
    assert plan["eval_parts"] == train_gpt.eval_projection(hp, val, 1_000_000, 64, 32)
    assert plan["eval_s"] == plan["eval_parts"]["total"] and "1000000" in plan["assumptions"]["eval_s"]
    assert plan["ttt_peak_gib"] is None and set(plan["why_null"]) == {"ttt_peak_gib", "ttt_memory_parts_gib"}
    assert plan["cu_seqlens_entries"] == train_gpt.varlen_capacity(4096 // 8 // 64, 64) == 8 * 16 + 1
    assert all(plan["assumptions"][k] for k in ("train_peak_gib", "ttt_peak_gib", "cu_seqlens_entries", "step_ms",
                                                  "eval_s"))
    env = dict(env, EVAL_MODE="documents", TTT_METHOD="lora", TTT_LORA_BATCH_TOKENS="256")
    hp, _ = train_gpt.read_settings(env)
    ttt = train_gpt.ttt_peak(hp, train_gpt.GPT(hp), train_gpt.lora_activations(hp, compiled=False), 64, 1_000_000)
    assert harness.gpu_plan(env, split_tokens=1_000_000)["ttt_memory_parts_gib"] == ttt


def test_gpu_plan_without_data_and_with_bad_settings(tmp_path, capsys, monkeypatch):
    """No validation shards: the evaluation fields are null with the reason, the rest is projected. A batch that
    does not split over 8 ranks is refused in one line, exit 2."""
    from tools import harness
    plan = harness.gpu_plan(dict(PLAN_ENV, DATA_PATH=str(tmp_path)))
    assert plan["eval_s"] is None and plan["eval_parts"] is None and plan["train_peak_gib"] > 0
    assert "no validation tokens" in plan["why_null"]["eval_s"] and plan["assumptions"]["eval_s"] is None
    for k, v in dict(PLAN_ENV, DATA_PATH=str(tmp_path), TRAIN_BATCH_TOKENS="4000").items():
        monkeypatch.setenv(k, v)
    assert harness.main(["gpu-plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-plan: error: TRAIN_BATCH_TOKENS=4000")
