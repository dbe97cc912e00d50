"""Benchmark: what the attention loss (Eq. 2, 3, 6) costs next to DSS, and what the teacher cache saves.

    python -m experiments.bench                  # smollm2-135m student, gemma3-270m teacher, batch 4, N = 512
    python -m experiments.bench --quick          # tiny random models, under a minute on 2 CPU cores

No paper equation lives here; it measures the routes of attention.py / capture.py inside train.py's training step.
Each configuration runs in its own process, so that its peak memory is its own: a fork of a server process that has
only imported the modules (importing torch and transformers takes 3-7 s, more than a --quick configuration); `--one
'<json>'` runs one in this process and prints its JSON (for profiling). Four sections, one markdown table each on
stdout and in `--out/bench.md`, every number in `--out/bench.json`:

- train: one optimizer step (train.step: the pre and exp passes and Eq. 7; one backward, clipping, AdamW) of dss
  (SDPA), molsaki through the fast capture, and naive (molsaki with its attention read from eager attention), same
  student and batch, as ratios to dss. On a shared machine a whole process runs faster or slower by more than the
  differences measured, so the routes take turns, `--rounds` processes each (dss, molsaki, naive, alternating,
  dss, ...): step time is the median of a route's timed steps, memory the median over its processes, with the ratio
  within each round beside. Each round's alternating process runs the three routes on one model, a step each in
  turn; the time target uses the median of those per-cycle ratios (steps a minute apart).
- capture: forward + backward of the student alone (batch 1, `logits_to_keep=1`) for N in `--lengths`: plain SDPA,
  the capture (loss sum(A * w)), and eager attention (the same loss).
- teacher: examples per second of the teacher cache pass, and teacher forward passes per training example,
  against recomputing the teacher at every step.
- flops: FLOPs of one training step (forward and backward) of vanilla, dss, mmi, molsaki and naive, as the paper's
  Table 5, at the smollm2-135m and GPT-2 large shapes (random weights): torch's FlopCounterMode, plus by hand the
  CPU attention kernels it has no formula for (FLOP_NOTES says what is counted).

Memory. CUDA: `torch.cuda.max_memory_allocated` after a reset at the end of warm-up. CPU: the peak RSS of the timed
steps (VmHWM, reset at the end of warm-up through /proc/self/clear_refs), and the raw `ru_maxrss` of the process.
`work` = that peak minus the memory once the model, batch and optimizer are made (gradients, optimizer state,
activations and allocator slack, not weights and libraries); ratios to dss use `work`. `saved` is exact: the bytes
of the distinct tensors autograd keeps for backward in one step (parameters excluded).
Time. On glibc every configuration first keeps malloc's memory in the process (`--malloc-default` keeps glibc's
settings), so that step times count the work, not the page faults of memory handed back to the OS.
Inputs. A synthetic batch of built-in problems, its exp text N tokens long, with real steps and numbers; the teacher
target A_t is random (the teacher is cached, not part of a step). `--model` / `--teacher` take what train.py takes,
the tiny random models of --quick, `random:FOLDER` (a config and a tokenizer only: random weights of that shape, for
a GPU machine that cannot take the real weights; the same step time and memory) or `random:NAME` of SHAPES. On CUDA
the train and capture sections run under bf16 autocast, as training does. The naive route's reader of eager
attention, with the capture's interface, lives here: train.py has none.
"""

import argparse
import ctypes
import ctypes.util
import json
import multiprocessing
import operator
import os
import resource
import statistics
import sys
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tok_models
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map_only
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

import attention
import capture
import data
import mol
import spans
import train
from plumbing import flags, models, problems
from teacher import build_attention_cache

DEFAULTS = {  # the real models at the default shape, and --quick: tiny random models
    "full": {"model": "smollm2-135m", "teacher": "gemma3-270m", "batch_size": 4, "seq_len": 512, "steps": 3,
             "warmup": 2, "rounds": 3, "lengths": "128,256,512,1024,2048", "cache_examples": 64,
             "teacher_batch_size": 8, "threads": 0, "flop_models": "random:smollm2-135m,random:gpt2-large@1x512"},
    "quick": {"model": "tiny-llama", "teacher": "tiny-gemma3", "batch_size": 2, "seq_len": 256, "steps": 2,
              "warmup": 1, "rounds": 2, "lengths": "128,256", "cache_examples": 8, "teacher_batch_size": 4,
              "threads": 1, "flop_models": "tiny-llama,tiny-gpt2"},
}
COMPARE = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}
TARGETS = {"time": ("<=", 1.10), "memory": ("<=", 1.10), "capture_memory": (">=", 8.0), "teacher_passes": ("==", 1.0)}
SVAMP_TRAIN = 800  # the paper's schedule: 4000 steps x batch 16 over the 800 SVAMP training items
TEACHER_LAYERS = 18  # A_t's layers before mixing (gemma3-270m); only its mixed [S, W] enters a step
TRAIN_ROUTES = {"dss": "sdpa", "molsaki": capture.register(), "naive": "eager"}
FLOP_ROUTES = {"vanilla": "sdpa", "dss": "sdpa", "mmi": "sdpa", "molsaki": capture.register(), "naive": "eager"}
TABLE5 = {"gpt2-large": {"vanilla": 2.007, "dss": 6.081, "mmi": 6.0810010, "molsaki": 6.0810273}}  # x 1e11 FLOPs
CAPTURE_ROUTES = {"sdpa": "sdpa", "capture": capture.register(), "eager": "eager"}
SECTIONS = ("train", "capture", "teacher", "flops")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--quick", action="store_true", help="tiny random models and small sizes (None below = its values)")
    a("--model", default=None, help="student: hub id, folder, packaged name, tiny-llama, random:FOLDER (see load); "
      "None = smollm2-135m")
    a("--teacher", default=None, help="teacher of the cache pass (the same kinds, or tiny-gemma3); None = gemma3-270m")
    a("--batch-size", type=int, default=None, help="training batch; None = 4")
    a("--seq-len", type=int, default=None, help="tokens of each exp text in the training step; None = 512")
    a("--steps", type=int, default=None, help="timed steps per configuration and round (alternating: cycles); None = 3")
    a("--warmup", type=int, default=None, help="untimed steps first, in every process (alternating: 1 cycle); None = 2")
    a("--rounds", type=int, default=None, help="processes per training route, run in turn (dss, molsaki, naive, "
      "alternating, dss, ...); the step time is the median of all their timed steps; None = 3")
    a("--lengths", default=None, help="comma-separated N of the capture section; None = 128,...,2048")
    a("--cache-examples", type=int, default=None, help="built-in problems through the teacher cache; None = 64")
    a("--teacher-batch-size", type=int, default=None, help="batch of the cache pass; None = 8")
    a("--threads", type=int, default=None, help="torch threads in each child, 0 = torch's default; None = 0 "
      "(--quick: 1, since tiny ops on a busy machine only wait for each other's threads)")
    a("--flop-models", default=None, help="comma-separated students of the flops section, each MODEL[@BxN] (default "
      "shape: --batch-size x --seq-len); random:smollm2-135m and random:gpt2-large are those shapes with random "
      "weights; None = random:smollm2-135m,random:gpt2-large@1x512")
    a("--sections", default=",".join(SECTIONS), help="which sections to run, comma-separated")
    a("--malloc-default", action="store_true", help="keep glibc's malloc settings (see pin_malloc): freed "
      "memory goes back to the OS and is faulted in again, at a cost that differs by route and by run")
    a("--out", default="runs/bench", help="run directory for bench.json and bench.md")
    a("--one", default=None, help="internal: run one configuration (JSON) in this process, print its result")
    args = p.parse_args(argv)
    for k, v in DEFAULTS["quick" if args.quick else "full"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.lengths = [int(n) for n in str(args.lengths).split(",")]
    args.sections = args.sections.split(",")
    if not set(args.sections) <= set(SECTIONS):
        p.error(f"--sections: choose among {', '.join(SECTIONS)}, got {args.sections}")
    try:
        args.flop_models = [_flop_model(m, args.batch_size, args.seq_len) for m in args.flop_models.split(",")]
    except ValueError:
        p.error(f"--flop-models: each entry MODEL or MODEL@BxN (random:gpt2-large@1x512), got {args.flop_models}")
    args.out = Path(args.out)
    return args


def _flop_model(spec, batch_size, seq_len):
    """MODEL[@BxN] -> (MODEL, B, N)."""
    model, _, shape = spec.partition("@")
    b, n = (int(x) for x in shape.split("x")) if shape else (batch_size, seq_len)
    return model, b, n


# ---------------------------------------------------------------------------------------------
# Models: the packaged / hub ones through models.load_model, and two tiny random ones for --quick.


def byte_tokenizer():
    """A fast byte-level tokenizer with no merges: one token per byte (256) and <|endoftext|> (eos, pad)."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(name):
    common = dict(vocab_size=257, max_position_embeddings=4096, eos_token_id=256, pad_token_id=256, bos_token_id=256)
    llama = dict(common, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    if name == "tiny-llama":
        return LlamaConfig(**llama, num_hidden_layers=4, num_key_value_heads=2)
    if name == "tiny-gemma3":
        return Gemma3TextConfig(**llama, num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
                                sliding_window=64, layer_types=["sliding_attention"] * 2 + ["full_attention"])
    if name == "tiny-gpt2":  # attention dropout 0.1, as GPT-2's: the capture's second SDPA call (capture.py)
        return GPT2Config(**common, n_embd=64, n_layer=2, n_head=4)
    return None


SHAPES = {  # random:NAME without such a folder: these students' configurations, built here (no download)
    "smollm2-135m": lambda: LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                        max_position_embeddings=8192, tie_word_embeddings=True),
    "gpt2-large": lambda: GPT2Config(vocab_size=50257, n_embd=1280, n_layer=36, n_head=20, n_positions=1024),
}


def load(name, attn):
    """A model and its tokenizer: tiny-llama / tiny-gemma3 / tiny-gpt2, `random:FOLDER` (a folder with only a config
    and a tokenizer: random weights of that shape, for a machine that cannot take the real ones; time and memory are
    the same), `random:NAME` of SHAPES (with the tokenizer of smollm2-135m, a byte-level BPE as GPT-2's, which is not
    available offline), or anything models.load_model takes."""
    folder = name.removeprefix("random:")
    if name.startswith("random:") and folder in SHAPES and not Path(folder).is_dir():
        config, tok = SHAPES[folder](), AutoTokenizer.from_pretrained(models._path("smollm2-135m"))
    elif name.startswith("random:"):
        config, tok = AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    elif tiny_config(name) is not None:
        config, tok = tiny_config(name), byte_tokenizer()
    else:
        return models.load_model(name, attn_implementation=attn)
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn), tok


# ---------------------------------------------------------------------------------------------
# The synthetic batch.


def long_examples(tok, n_examples, n_tokens, seed=0):
    """`{id, question, answer, rationale}`: a built-in problem's question and answer, and the rationales of
    consecutive problems until `data.EXP_PROMPT` + question + rationale has at least n_tokens tokens."""
    pool = problems.make_problems(400, seed=seed)
    out, i = [], 0
    for b in range(n_examples):
        first, parts = pool[i % len(pool)], []
        head = data.EXP_PROMPT.format(question=first["question"]) + " "
        while len(tok(head + " ".join(parts))["input_ids"]) < n_tokens:
            parts.append(pool[i % len(pool)]["rationale"])
            i += 1
        out.append({"id": f"bench-{b}", "question": first["question"], "answer": first["answer"],
                    "rationale": " ".join(parts)})
    return out


def fake_cache(tok, examples, max_length, seed=0):
    """A teacher cache in teacher.build_attention_cache's format with a random A_t [L1, S, W] per example, on
    every step and word that counts for this tokenizer (so the teacher keeps the student's sets)."""
    g = torch.Generator().manual_seed(seed)
    items = {}
    for e in examples:
        text, steps, words = spans.example_spans(e["question"], e["rationale"], data.EXP_PROMPT)
        _, st, wt = spans.encode(tok, text, steps, words, max_length - 1)
        items[e["id"]] = {"A": torch.rand(TEACHER_LAYERS, len(st), len(wt), generator=g),
                          "step_ids": sorted(st), "word_ids": sorted(wt)}
    return {"meta": {}, "items": items}


def _groups(tok, example, n_tokens):
    """(input_ids [1, N], [(steps, words)]) of one exp text, truncated to n_tokens."""
    text, steps, words = spans.example_spans(example["question"], example["rationale"], data.EXP_PROMPT)
    ids, st, wt = spans.encode(tok, text, steps, words, n_tokens)
    return torch.tensor([ids]), [([st[k] for k in sorted(st)], [wt[k] for k in sorted(wt)])]


# ---------------------------------------------------------------------------------------------
# The naive route: train.step with A and the value states read from eager attention.


def _attention_modules(model):
    """Each layer's attention module, in layer order: the modules that own a value projection (`v_proj`) or GPT-2's
    fused query-key-value projection (`c_attn`)."""
    return [m for m in model.modules() if hasattr(m, "v_proj") or hasattr(m, "c_attn")]


class _EagerRead:
    """What one forward pass under `eager_attention` records: per layer the eager probabilities [B, H, N, N] and
    the value states [B, N, d]."""

    def __init__(self, groups):
        self.groups, self.probs, self.values = groups, {}, {}

    def stepwise(self):
        """Per example [L, S_b, W_b] (`attention.stepwise_from_attentions_batched`, in float32 under autocast too,
        as the capture sums)."""
        probs = [self.probs[i] for i in sorted(self.probs)]
        with torch.autocast(probs[0].device.type, enabled=False):
            return attention.stepwise_from_attentions_batched(probs, self.groups)

    def value_states(self):
        """[B, L, N, d], as `capture.Capture.value_states`: the router's input (Eq. 5)."""
        return torch.stack([self.values[i] for i in sorted(self.values)], 1)


@contextmanager
def eager_attention(model, groups, values=False):
    """`capture.capture`'s interface (`train.step`'s read_attention) on a model with eager attention: forward hooks
    on each layer's attention module record the probabilities it returns beside its output (in transformers 5 an
    eager attention module returns (output, probabilities) whether or not output_attentions is asked; under
    attention dropout, as GPT-2's in training, they are the post-dropout ones, as output_attentions gives them),
    and with values=True hooks on its value projection record the value states: the output of `v_proj`, or the
    value third of GPT-2's `c_attn`."""
    if model.config._attn_implementation != "eager":
        raise ValueError(f"model attention is '{model.config._attn_implementation}': eager_attention needs "
                         "model.set_attn_implementation('eager')")
    read, d = _EagerRead(groups), capture.value_dim(model.config)

    def keep_probs(i):
        def hook(module, args, out):
            if out[1] is None:
                raise ValueError(f"{type(module).__name__} returned no attention probabilities")
            read.probs[i] = out[1]
        return hook

    def keep_values(i):
        return lambda module, args, out: read.values.__setitem__(i, out[..., -d:])  # v_proj: all of it; c_attn: V

    hooks = []
    try:
        for i, m in enumerate(_attention_modules(model)):
            hooks.append(m.register_forward_hook(keep_probs(i)))
            if values:
                hooks.append((m.v_proj if hasattr(m, "v_proj") else m.c_attn).register_forward_hook(keep_values(i)))
        yield read
    finally:
        for h in hooks:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Measuring one configuration (inside its own process).


def _rss(field):
    """VmRSS / VmHWM of this process in bytes (None without /proc)."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(field + ":"))
    except OSError:
        return None
    return int(line.split()[1]) * 1024


def _memory_now(device):
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss("VmRSS")


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def _peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss("VmHWM")


@contextmanager
def saved_bytes(model):
    """The most bytes autograd keeps for backward at once inside the block: per pass (the tensors saved until the
    next backward starts using them), the distinct storages saved, parameters excluded; the largest pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    passes, state = [{}], {"unpacked": False}

    def pack(x):
        if state["unpacked"]:  # a backward ran since the last save: a new pass
            passes.append({})
            state["unpacked"] = False
        s = x.untyped_storage()
        if s.data_ptr() not in params:
            passes[-1][s.data_ptr()] = s.nbytes()
        return x

    def unpack(x):
        state["unpacked"] = True
        return x

    box = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield box
    box["bytes"] = max(sum(p.values()) for p in passes)


def _measure(step, model, device, warmup, steps):
    """Median time of `steps` calls of step() after `warmup`; memory as the module docstring says."""
    with torch.no_grad():  # fault in weights that loading left lazily mapped, so that `base` holds them
        sum(float(p.sum()) for p in model.parameters())
    base = _memory_now(device)
    for _ in range(warmup):
        step()
    _sync(device)
    _reset_peak(device)
    times = [_timed(step, device)[0] for _ in range(steps)]
    peak = _peak(device)
    with saved_bytes(model) as saved:
        step()
    return {"sec": statistics.median(times), "times": times, "base": base, "peak": peak,
            "work": None if peak is None else peak - base, "saved": saved["bytes"],
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    """(seconds, result) of fn(), the device synchronized before and after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _stepper(run, params, opt=None, max_norm=None):
    """step(): run() (the forward and backward passes of one step), clipping and the optimizer step where given;
    the gradients are then dropped."""
    def step():
        run()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        if opt:
            opt.step()
        for p in params:
            p.grad = None

    return step


def _route_step(route, cfg, student, tok, router, opt):
    """One optimizer step of `route` (a method of train.py, or naive: molsaki through eager attention) on `student`,
    whose attention must be the route's (or molsaki, which is plain SDPA outside a capture, for the others):
    (step as _stepper gives it, batch, features, run), run() being the step's passes and their backward alone:
    `train.step` and one backward of its loss, the naive route's attention read by `eager_attention`."""
    N = cfg["seq_len"]
    method = "molsaki" if route == "naive" else route
    args = flags.parse_args(["--method", method, "--max-length", str(N), "--student", cfg["model"]])
    examples = long_examples(tok, cfg["batch_size"], N)
    cache = fake_cache(tok, examples, N) if method == "molsaki" else None
    feats = train.features(args, examples, tok, cache)
    batch = data.collate(feats, tok.pad_token_id)
    read = eager_attention if route == "naive" else capture.capture
    params = [p for g in opt.param_groups for p in g["params"]] if opt else []

    def run():
        loss, _ = train.step(student, router if method == "molsaki" else None, batch, **train.objective(args),
                             read_attention=read)
        loss.backward()

    return _stepper(run, params, opt, args.max_grad_norm), batch, feats, run


def _student(cfg, attn, device, routes):
    """The student, the router of `routes` (molsaki and naive have one; else None) and one AdamW over both."""
    student, tok = load(cfg["model"], attn)
    student.to(device).train()
    router = None
    if {"molsaki", "naive"} & set(routes):
        router = mol.StudentRouter(capture.value_dim(student.config), student.config.num_hidden_layers,
                                   flags.parse_args([]).tau2).to(device)
    params = list(student.parameters()) + (list(router.parameters()) if router else [])
    return student, tok, router, torch.optim.AdamW(params, lr=1e-6)


def bench_train(cfg, device):
    """One optimizer step of dss / molsaki (fast capture) / naive (eager attention)."""
    route = cfg["route"]
    if route == "alternate":
        return bench_alternate(cfg, device)
    student, tok, router, opt = _student(cfg, TRAIN_ROUTES[route], device, [route])
    step, batch, feats, _ = _route_step(route, cfg, student, tok, router, opt)
    out = _measure(step, student, device, cfg["warmup"], cfg["steps"])
    out.update(exp_tokens=batch["exp_mask"].sum(1).tolist(), pre_tokens=batch["pre_mask"].sum(1).tolist(),
               router={"molsaki": "value states (capture)", "naive": "value states (hooks)"}.get(route, "none"),
               steps=[len(f.get("groups", ([], []))[0]) for f in feats],
               words=[len(f.get("groups", ([], []))[1]) for f in feats])
    return out


def bench_alternate(cfg, device):
    """The three routes in one process, one step each in turn, the order rotating from cycle to cycle, so that
    each cycle's ratios compare steps taken within a minute of each other. One model: its attention is molsaki
    (plain SDPA outside a capture, so dss steps run exactly as with SDPA), switched to eager for naive steps.
    The first cycle is warm-up; `steps` cycles are timed."""
    student, tok, router, opt = _student(cfg, capture.register(), device, TRAIN_ROUTES)
    steps = {r: _route_step(r, cfg, student, tok, router, opt)[0] for r in TRAIN_ROUTES}
    routes, times = list(TRAIN_ROUTES), {r: [] for r in TRAIN_ROUTES}
    for cycle in range(1 + cfg["steps"]):
        for route in routes[cycle % len(routes):] + routes[:cycle % len(routes)]:
            student.set_attn_implementation(TRAIN_ROUTES[route] if route == "naive" else capture.register())
            sec = _timed(steps[route], device)[0]
            if cycle:
                times[route].append(sec)
    return {"times": times}


def bench_capture(cfg, device):
    """Forward + backward of the student alone, batch 1, N tokens: sdpa / capture / eager (bf16 autocast on CUDA,
    as in training: in float32, CUDA's SDPA with grouped-query attention falls back to the N x N math kernel)."""
    route, N = cfg["route"], cfg["seq_len"]
    model, tok = load(cfg["model"], CAPTURE_ROUTES[route])
    model.to(device).train()
    ids, groups = _groups(tok, long_examples(tok, 1, N)[0], N)
    ids, mask = ids.to(device), torch.ones_like(ids, device=device)
    S, W = len(groups[0][0]), len(groups[0][1])
    w = torch.randn(model.config.num_hidden_layers, S, W, generator=torch.Generator().manual_seed(0)).to(device)

    @torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")  # as in training
    def loss():  # forward only
        if route == "sdpa":
            return model(ids, attention_mask=mask, logits_to_keep=1).logits.float().sum()
        if route == "capture":
            with capture.capture(model, groups) as cap:
                model(ids, attention_mask=mask, logits_to_keep=1)
            return (cap.stepwise()[0] * w).sum()
        with eager_attention(model, groups) as cap:
            model(ids, attention_mask=mask, logits_to_keep=1)
        return (cap.stepwise()[0] * w).sum()

    out = _measure(_stepper(lambda: loss().backward(), list(model.parameters())), model, device, cfg["warmup"],
                   cfg["steps"])
    out.update(tokens=ids.shape[1], steps=S, words=W, critical_tokens=sum(len(t) for t in groups[0][1]))
    return out


def bench_teacher(cfg, device):
    """The cache pass over built-in problems: time, and teacher forward calls counted by a pre-hook."""
    model, tok = load(cfg["teacher"], capture.register())
    model.to(device).eval()
    examples = problems.make_problems(cfg["cache_examples"], seed=0)
    meta = {"delimiters": "."}
    bs = cfg["teacher_batch_size"]
    build_attention_cache(model, tok, examples[:bs], meta, cfg["max_length"], bs)  # warm-up
    calls = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(len(args[0] if args else kwargs["input_ids"])), with_kwargs=True)
    sec, cache = _timed(lambda: build_attention_cache(model, tok, examples, meta, cfg["max_length"], bs), device)
    hook.remove()
    tokens = sum(len(tok(data.EXP_PROMPT.format(question=e["question"]) + " " + e["rationale"])["input_ids"])
                 for e in examples)
    paper = flags.SCHEDULE["paper"]
    return {"examples": len(examples), "cached": len(cache["items"]), "forward_calls": len(calls),
            "examples_seen": sum(calls), "sec": sec, "examples_per_sec": len(examples) / sec,
            "tokens_per_sec": tokens / sec, "passes_per_example": sum(calls) / len(examples),
            "passes_per_example_no_cache": paper["max_steps"] * paper["batch_size"] / SVAMP_TRAIN,
            "schedule": f"{paper['max_steps']} steps x {paper['batch_size']} / {SVAMP_TRAIN} SVAMP items"}


# ---------------------------------------------------------------------------------------------
# FLOPs of one training step per method, as the paper's Table 5.


def attention_flops(q, k, v, backward=False):
    """FLOPs of one scaled-dot-product attention call, by hand, from the shapes q [B, H, Nq, D], k [B, H_kv, Nk, D]
    and v [B, H_kv, Nk, Dv] (grouped-query attention: H_kv divides H; each query head attends to all Nk keys):

        forward   2 B H Nq Nk (D + Dv)        Q K^T, then P V
        backward  2 B H Nq Nk (3 D + 2 Dv)    Q K^T again (the kernel keeps no P), dP = dO V^T, dV = P^T dO,
                                              dQ = dS K, dK = dS^T Q

    Under a causal mask the hidden half is counted too, as torch's formulas for its flash and efficient kernels
    count it (a test checks this function against FlopCounterMode on those kernels and on plain matmuls)."""
    B, H, Nq, D = q
    Nk, Dv = k[-2], v[-1]
    return 2 * B * H * Nq * Nk * ((3 * D + 2 * Dv) if backward else (D + Dv))


BY_HAND = {  # CPU SDPA kernels, which torch 2.13's FlopCounterMode has no formula for (it counts them 0)
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: attention_flops(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *a, **kw: attention_flops(q, k, v, backward=True),
}
PRODUCTS = {"mv", "addmv", "dot", "vdot", "addr"}  # matrix products the counter has no formula for


class _Shapes(TorchDispatchMode):
    """Beneath FlopCounterMode: the ops it counts (`counted`: matrix products and attention kernels) return zeros of
    the shape their meta kernel gives instead of running (fake=True). FLOPs depend on shapes only, and nothing in a
    step's control flow on those values (masks, labels and token groups come from the batch), so a step at the GPT-2
    large shape is counted in seconds. Records the ops that multiply matrices or attend but that no formula counts."""

    def __init__(self, counted, fake, total):
        super().__init__()
        self.counted, self.fake, self.uncounted = counted, fake, set()
        self.total, self.backward, self.forward = total, False, {"total": 0, "by_hand": 0}  # forward: its share

    def _phase(self):
        """Add the FLOPs counted since the last switch to `forward` when a forward phase ends. An op's count lands
        after it returns, so at the first op of the next phase the counter holds the previous phase's."""
        backward = torch._C._current_graph_task_id() != -1  # inside an autograd backward
        if backward != self.backward:
            now = self.total()
            if backward:
                for k in self.forward:
                    self.forward[k] += now[k] - self.mark[k]
            self.backward, self.mark = backward, now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, packet = kwargs or {}, func._overloadpacket
        self._phase()
        if packet not in self.counted or not self.fake:
            if packet not in self.counted and (packet.__name__ in PRODUCTS or "attention" in packet.__name__):
                self.uncounted.add(packet.__name__)
            return func(*args, **kwargs)
        device = next(t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))
        margs, mkwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        return tree_map_only(torch.Tensor, lambda m: torch.zeros_like(m, device=device), func(*margs, **mkwargs))


@contextmanager
def count_flops(fake=True):
    """Count the FLOPs of the block: torch's FlopCounterMode (2 per multiply-add of every matrix product and attention
    kernel it has a formula for), plus BY_HAND; with fake=True those ops return zeros of their shape (`_Shapes`).
    Yields so_far() -> {"total", "by_hand", "uncounted": names of product or attention ops that nothing counted,
    "forward", "forward_by_hand": the share of the ops run outside autograd's backward}."""
    counter = FlopCounterMode(display=False, custom_mapping=BY_HAND)

    def totals():
        per_op = counter.get_flop_counts().get("Global", {})
        return {"total": sum(per_op.values()), "by_hand": sum(v for k, v in per_op.items() if k in BY_HAND)}

    shapes = _Shapes(counter.flop_registry, fake, totals)
    shapes.mark = {"total": 0, "by_hand": 0}

    def so_far():
        now, forward = totals(), dict(shapes.forward)
        if not shapes.backward:  # the forward phase still open
            forward = {k: forward[k] + now[k] - shapes.mark[k] for k in forward}
        return {**now, "uncounted": sorted(shapes.uncounted), "forward": forward["total"],
                "forward_by_hand": forward["by_hand"]}

    with shapes, counter:
        yield so_far


FLOP_NOTES = [
    "- random:gpt2-large has smollm2-135m's tokenizer (GPT-2's is not available offline; both are byte-level BPE). "
    "Its default batch is 1 x 512 for memory (float32 weights and gradients, 6.2 GB, and under dropout the N x N "
    "tensors of attention); every exp text being N tokens, FLOPs grow as B up to the answer task's padding.",
    "- FLOPs: 2 per multiply-add of each matrix product and attention kernel (torch.utils.flop_counter's rule); "
    "elementwise work (norms, activations, softmax, the losses, clipping, AdamW: tens of FLOPs per parameter or "
    "activation) counts 0 in every method. FLOPs depend on shapes only: random weights, and the matrix products run "
    "as zeros of their shape (the counts of computing them: a test checks).",
    "- By hand (`attention_flops`): CPU SDPA, `aten._scaled_dot_product_flash_attention_for_cpu` and its backward, "
    "which torch 2.13's counter has no formula for: forward 2 B H Nq Nk (D + Dv), backward 2 B H Nq Nk (3 D + 2 Dv) "
    "(Q K^T recomputed); the causal half counted, as torch counts its flash and efficient GPU kernels. Under "
    "attention dropout (GPT-2) CPU SDPA runs its math path: matmuls the counter sees, backward 2 B H Nq Nk 2 (D + Dv).",
    "- Seen by the counter: `_CriticalProbs` with its hand-written backward (dispatched matmuls): over its row blocks "
    "2 B H n kc D forward, 3x that backward (softmax recomputed, dQ, dK), checked by a test. The capture's SDPA call "
    "runs at head size D + 8 (the critical-token value column), and under dropout a second call gives pi.",
    "- The paper's Table 5 (GPT2-Large, x 1e11) does not say what it counts; its vanilla / dss (0.33) follows its "
    "texts (here: an exp text of N tokens beside a short answer task), its molsaki / dss (1 + 4.5e-6) counts the "
    "router only, the attention being taken from the forward pass as it is.",
]


def bench_flops(cfg, device):
    """FLOPs of one training step of each method of FLOP_ROUTES on one student: the step's forward (train.step; for
    naive, its attention read by eager_attention) and its backward, by count_flops. Clipping and AdamW, elementwise,
    are left out (they count 0). One model, as bench_alternate: molsaki attention (plain SDPA outside a capture), eager
    for naive."""
    student, tok, router, _ = _student(cfg, capture.register(), device, FLOP_ROUTES)
    out = {"params": sum(p.numel() for p in student.parameters()), "layers": student.config.num_hidden_layers}
    for route in FLOP_ROUTES:
        _, batch, feats, run = _route_step(route, cfg, student, tok, router, None)
        student.set_attn_implementation("eager" if route == "naive" else capture.register())
        with count_flops(cfg.get("fake", True)) as flops:
            run()
        out[route] = flops()
        student.zero_grad(set_to_none=True)
        if router:
            router.zero_grad(set_to_none=True)
        if route == "molsaki":
            out.update(exp_tokens=batch["exp_mask"].sum(1).tolist(), pre_tokens=batch["pre_mask"].sum(1).tolist(),
                       words=[len(f["groups"][1]) for f in feats],
                       critical_tokens=[len({j for w in f["groups"][1] for j in w}) for f in feats])
    return out


def pin_malloc():
    """glibc: serve every allocation from the heap (no mmap) and never hand freed heap memory back to the OS, as
    PyTorch's caching allocator keeps its blocks on CUDA. With glibc's default, memory freed during a step goes back
    to the OS and is faulted in again at its next use: on 2 cores of an x86_64 VM (torch 2.13, 2026-11), about 0.85M
    page faults per step and 2 s of a 12 s step, varying from process to process. With the mmap threshold raised to
    its 32 MB limit instead, the logits and the larger activations still come from mmap (README, benchmark).
    Returns whether it applied (not on other C libraries)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, TypeError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    # trim threshold -1: never (its largest positive value, 2**31 - 1, still trims once 2 GB lie free at the top)
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))


def run_one(cfg):
    """Run one configuration in this process and return its measurements (a JSON-able dict)."""
    pinned = cfg.get("pin_malloc", True) and pin_malloc()
    torch.manual_seed(0)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = train._device()
    fn = {"train": bench_train, "capture": bench_capture, "teacher": bench_teacher, "flops": bench_flops}[cfg["kind"]]
    out = fn(cfg, device)
    out.update(cfg, device=str(device), threads=torch.get_num_threads(), malloc="pinned" if pinned else "default")
    return out


# ---------------------------------------------------------------------------------------------
# The parent: one process per configuration, then the tables.


def configs(args):
    process = {"threads": args.threads, "pin_malloc": not args.malloc_default}
    common = dict(process, model=args.model, warmup=args.warmup, steps=args.steps)
    out = [dict(common, kind="train", route=r, round=i, batch_size=args.batch_size, seq_len=args.seq_len)
           for i in range(args.rounds) for r in [*TRAIN_ROUTES, "alternate"]]
    out += [dict(common, kind="capture", route=r, seq_len=n) for n in args.lengths for r in CAPTURE_ROUTES]
    out.append(dict(process, kind="teacher", teacher=args.teacher, cache_examples=args.cache_examples,
                    teacher_batch_size=args.teacher_batch_size, max_length=args.seq_len))
    out += [dict(process, kind="flops", model=m, batch_size=b, seq_len=n) for m, b, n in args.flop_models]
    return [c for c in out if c["kind"] in args.sections]


def _run_to_pipe(cfg, conn):
    """Child process body: run one configuration, send its result (or the error) back; prints go to stderr."""
    try:
        with redirect_stdout(sys.stderr):
            conn.send(run_one(cfg))
    except Exception as e:  # reported in the table; a crash (out of memory) shows as a closed pipe
        conn.send(dict(cfg, error=f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _child(cfg):
    """Run cfg in a fresh process forked from a server that has imported torch and transformers once."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["train"])  # torch, transformers and the project, imported once by the server
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run_to_pipe, args=(cfg, send))
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        result = None
    proc.join()
    return result if result is not None else dict(cfg, error=f"process died (exit code {proc.exitcode})")


def _mb(x):
    return "-" if x is None else f"{x / 2**20:,.0f}"


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _x(r, digits=2):
    return "-" if r is None else f"{r:.{digits}f}x"


def _pool(runs):
    """One training route's rounds -> one row: the median of all their timed steps, the median memory."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    row = {k: v for k, v in ok[0].items() if k != "round"}
    row.update(times=[t for r in ok for t in r["times"]], rounds=len(ok))
    row["sec"] = statistics.median(row["times"])
    for k in ("base", "peak", "work", "saved", "ru_maxrss"):
        values = [r[k] for r in ok if r.get(k) is not None]
        row[k] = statistics.median(values) if values else None
    return row


def summarize(results):
    """Ratios and target checks from the raw per-configuration results."""
    runs = {}
    for r in results:
        if r["kind"] == "train":
            runs.setdefault(r["route"], []).append(r)
    alternate = runs.pop("alternate", [])
    alternate_errors = [r["error"] for r in alternate if "error" in r]
    alternate = [r for r in alternate if "error" not in r]
    train_rows = {route: _pool(rs) for route, rs in runs.items()}
    dss = train_rows.get("dss", {})
    for route, r in train_rows.items():  # the ratio within each round: how much it moves from process to process
        pairs = zip(runs[route], runs["dss"], strict=True)
        r["round_sec_ratios"] = [_ratio(a.get("sec"), b.get("sec")) for a, b in pairs]
        r.update({f"{k}_ratio": _ratio(r.get(k), dss.get(k)) for k in ("sec", "work", "peak", "saved")})
        if alternate:  # per cycle: this route's step over the dss step of the same cycle
            r["alt_times"] = [t for a in alternate for t in a["times"][route]]
            r["alt_ratios"] = [t / d for a in alternate for t, d in zip(a["times"][route], a["times"]["dss"],
                                                                       strict=True)]
            r["alt_sec"], r["alt_ratio"] = statistics.median(r["alt_times"]), statistics.median(r["alt_ratios"])
    capture_rows = []
    for n in sorted({r["seq_len"] for r in results if r["kind"] == "capture"}):
        by = {r["route"]: r for r in results if r["kind"] == "capture" and r["seq_len"] == n}
        row = {"seq_len": n, "words": next((r["words"] for r in by.values() if "words" in r), None),
               **{f"{m}_{k}": by.get(k, {}).get(m) for k in CAPTURE_ROUTES for m in ("sec", "saved", "work", "error")}}
        base = row["saved_sdpa"]
        for k in ("capture", "eager"):  # memory the route keeps beyond what plain SDPA keeps
            row[f"extra_{k}"] = None if row[f"saved_{k}"] is None or base is None else row[f"saved_{k}"] - base
        row.update({f"{m}_ratio": _ratio(row[f"{m}_eager"], row[f"{m}_capture"]) for m in ("extra", "saved", "sec")})
        capture_rows.append(row)
    teacher = next((r for r in results if r["kind"] == "teacher"), {})
    mol_row = train_rows.get("molsaki", {})
    largest = next((row for row in reversed(capture_rows) if row["extra_ratio"] is not None), {})
    values = {"time": mol_row.get("alt_ratio", mol_row.get("sec_ratio")), "memory": mol_row.get("work_ratio"),
              "capture_memory": largest.get("extra_ratio"), "teacher_passes": teacher.get("passes_per_example")}
    targets = {k: {"value": v, "target": f"{TARGETS[k][0]} {TARGETS[k][1]}",
                   "met": None if v is None else COMPARE[TARGETS[k][0]](v, TARGETS[k][1])} for k, v in values.items()}
    targets["time"]["measured"] = ("alternating" if "alt_ratio" in mol_row else "own processes") if mol_row else None
    targets["capture_memory"]["seq_len"] = largest.get("seq_len")
    return {"train": list(train_rows.values()), "alternate_errors": alternate_errors, "capture": capture_rows,
            "teacher": teacher, "targets": targets, "flops": _flop_rows(results)}


def _flop_rows(results):
    """One row per student and method of the flops section: FLOPs and ratios to dss (ours and the paper's)."""
    rows = []
    for r in (r for r in results if r["kind"] == "flops"):
        if "error" in r:
            rows.append(r)
            continue
        paper = TABLE5.get(r["model"].removeprefix("random:"), {})
        shape = {k: r.get(k) for k in ("model", "batch_size", "seq_len", "params", "layers", "pre_tokens",
                                        "critical_tokens")}
        rows += [dict(r[m], **shape, method=m,
                      forward_ratio=_ratio(r[m]["forward"], r["dss"]["forward"]), ratio=_ratio(r[m]["total"],
                      r["dss"]["total"]), paper_ratio=_ratio(paper.get(m), paper.get("dss")))
                 for m in FLOP_ROUTES]
    return rows


def _train_table(rows, args, alternate_errors):
    names = {"dss": "dss (SDPA)", "molsaki": "molsaki, fast capture", "naive": "molsaki, eager attention"}
    first = next((r for r in rows if "device" in r), {})
    out = [f"## Training step: {args.model}, batch {args.batch_size}, N = {args.seq_len}, {first.get('device')}, "
           f"{first.get('threads')} threads, malloc {first.get('malloc')}", "",
           f"Own process: one process per route and round, the median of {args.steps} steps x {args.rounds} rounds "
           f"after {args.warmup}. Alternating: one process per round, the routes in turn, {args.steps} timed cycles "
           "after 1; vs dss is the median of the per-cycle ratios.", "",
           "| route | step (s), own process | vs dss | step (s), alternating | vs dss | work (MB) | vs dss | "
           "peak (MB) | vs dss | saved (MB) | vs dss | router |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {names[r['route']]} | failed: {r['error'][:100]} |||||||||||")
            continue
        alt = f"{r['alt_sec']:.3f} | {_x(r['alt_ratio'])}" if "alt_sec" in r else "- | -"
        out.append(f"| {names[r['route']]} | {r['sec']:.3f} | {_x(r['sec_ratio'])} | {alt} | {_mb(r['work'])} | "
                   f"{_x(r['work_ratio'])} | {_mb(r['peak'])} | {_x(r['peak_ratio'])} | {_mb(r['saved'])} | "
                   f"{_x(r['saved_ratio'])} | {r['router']} |")
    words = next((r["words"] for r in rows if r.get("route") == "molsaki" and "words" in r), None)
    spread = [f"{r['route']} {', '.join(_x(x) for x in r['round_sec_ratios'])}" for r in rows
              if r.get("route") != "dss" and r.get("round_sec_ratios")]
    cycles = [f"{r['route']} {min(r['alt_ratios']):.2f}-{max(r['alt_ratios']):.2f}x" for r in rows
              if r.get("route") != "dss" and r.get("alt_ratios")]
    out += ["", f"Step time vs dss within each round, own processes: {'; '.join(spread) or '-'}. "
            f"Per cycle, alternating: {'; '.join(cycles) or '-'}."]
    out += [f"Alternating process failed: {e[:200]}" for e in alternate_errors]
    return out + ["", f"Critical words per example: {words}. work: peak minus the memory once model, batch and "
                  "optimizer are made (CPU: RSS; CUDA: allocated); peak: CPU VmHWM of the timed steps, CUDA "
                  "max_memory_allocated; saved: what autograd keeps for backward in one step (exact).", ""]


def _capture_table(rows, args):
    out = [f"## The capture alone: forward + backward of {args.model}, batch 1, median of {args.steps} steps", "",
           "| N | W | sdpa (s) | capture (s) | eager (s) | eager / capture | saved: sdpa (MB) | capture (MB) | "
           "eager (MB) | extra: capture (MB) | eager (MB) | eager / capture |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sec = [("-" if r[f"sec_{k}"] is None else f"{r[f'sec_{k}']:.3f}") for k in CAPTURE_ROUTES]
        out.append(f"| {r['seq_len']} | {r['words']} | {' | '.join(sec)} | {_x(r['sec_ratio'])} | "
                   f"{_mb(r['saved_sdpa'])} | {_mb(r['saved_capture'])} | {_mb(r['saved_eager'])} | "
                   f"{_mb(r['extra_capture'])} | {_mb(r['extra_eager'])} | {_x(r['extra_ratio'])} |")
        errors = [f"{k}: {r[f'error_{k}'][:100]}" for k in CAPTURE_ROUTES if r[f"error_{k}"]]
        if errors:
            out.append(f"| {r['seq_len']} | failed: {'; '.join(errors)} |||||||||||")
    return out + ["", "W: critical words. saved: what autograd keeps for backward; extra: saved beyond plain SDPA, "
                  "the memory of the attention route itself.", ""]


def _teacher_table(t, args):
    out = [f"## Teacher side: {args.teacher}, {t.get('examples', '?')} built-in problems, batch "
           f"{args.teacher_batch_size}", ""]
    if "error" in t:
        return out + [f"failed: {t['error']}", ""]
    per = t["sec"] / t["examples"]
    return out + [
        "| | value |", "|---|---|",
        f"| cache pass | {t['examples_per_sec']:.1f} examples/s, {t['tokens_per_sec']:,.0f} tokens/s |",
        f"| teacher forward calls / examples seen by the teacher | {t['forward_calls']} / {t['examples_seen']} |",
        f"| teacher passes per training example, with the cache | {t['passes_per_example']:g} |",
        f"| same, recomputing the teacher every step ({t['schedule']}) | {t['passes_per_example_no_cache']:g} |",
        f"| teacher seconds per training example, cache / recomputing | {per:.3f} / "
        f"{per * t['passes_per_example_no_cache']:.2f} |", ""]


def _flops_table(rows):
    names = {"molsaki": "molsaki, fast capture", "naive": "molsaki, eager attention"}
    out = ["## FLOPs of one training step (forward and backward): FlopCounterMode, and by hand what it cannot see", "",
           "| student (random weights) | B x N | method | forward (GFLOP) | vs dss | forward + backward (GFLOP) | "
           "vs dss | of which by hand (GFLOP) | paper, Table 5: vs dss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | failed: {r['error'][:200]} |||||||")
            continue
        out.append(f"| {r['model'].removeprefix('random:')} | {r['batch_size']} x {r['seq_len']} | "
                   f"{names.get(r['method'], r['method'])} | {r['forward'] / 1e9:,.4g} | {_x(r['forward_ratio'], 4)} | "
                   f"{r['total'] / 1e9:,.4g} | {_x(r['ratio'], 4)} | {r['by_hand'] / 1e9:,.4g} | "
                   f"{_x(r['paper_ratio'], 7)} |")
    shapes = [f"{r['model'].removeprefix('random:')}: {r['params'] / 1e6:,.1f}M parameters, {r['layers']} layers, "
              f"answer task {min(r['pre_tokens'])}-{max(r['pre_tokens'])} tokens, critical tokens K "
              f"{min(r['critical_tokens'])}-{max(r['critical_tokens'])} per example" for r in rows
              if r.get("method") == "molsaki"]
    uncounted = sorted({op for r in rows for op in r.get("uncounted", [])})
    return out + ["", f"- Batches: {'; '.join(shapes)}.", *FLOP_NOTES,
                  f"- Matrix-product or attention ops that nothing counted: {', '.join(uncounted) or 'none'}.", ""]


def tables(summary, args):
    """The markdown report of `summary`: one table per section that ran, then the targets."""
    m = summary.get("machine", {})
    out = [f"Load average before / after: {m.get('loadavg_before')} / {m.get('loadavg_after')}; "
           f"OMP_NUM_THREADS={m.get('omp_num_threads')}", ""]
    if summary["train"]:
        out += _train_table(summary["train"], args, summary["alternate_errors"])
    if summary["capture"]:
        out += _capture_table(summary["capture"], args)
    if summary["teacher"]:
        out += _teacher_table(summary["teacher"], args)
    if summary["flops"]:
        out += _flops_table(summary["flops"])
    labels = {"time": "molsaki / dss step time", "memory": "molsaki / dss work memory",
              "capture_memory": "eager / capture extra memory", "teacher_passes": "teacher passes per example"}
    out += ["## Targets", "", "| target | value | met |", "|---|---|---|"]
    for k, t in summary["targets"].items():
        v = "-" if t["value"] is None else f"{t['value']:.3g}"
        where = f" at N = {t['seq_len']}" if t.get("seq_len") else f" ({t['measured']})" if t.get("measured") else ""
        met = "not run" if t["met"] is None else "yes" if t["met"] else "no"
        out.append(f"| {labels[k]}{where} {t['target']} | {v} | {met} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(json.loads(args.one))))
        return None
    t0, load = time.time(), os.getloadavg()
    results = []
    for cfg in configs(args):
        t1 = time.time()
        results.append(_child(cfg))
        where = f"round {cfg['round'] + 1}/{args.rounds}" if "round" in cfg else cfg.get("seq_len", "")
        print(f"[bench] {cfg['kind']} {cfg.get('route', cfg.get('model', ''))} {where}: {time.time() - t1:.1f} s",
              file=sys.stderr, flush=True)
    summary = summarize(results)
    machine = {"loadavg_before": [round(x, 2) for x in load], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
               "torch": torch.__version__, "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    summary.update(results=results, args={k: str(v) for k, v in vars(args).items()}, machine=machine,
                   wall_sec=time.time() - t0)
    report = tables(summary, args)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(summary, indent=1))
    (args.out / "bench.md").write_text(report)
    print(f"[bench] {time.time() - t0:.0f} s; wrote {args.out / 'bench.json'}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
