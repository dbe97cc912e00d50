"""Train a student by CoT distillation: L = alpha L_pre + (1 - alpha) L_exp + beta L_att (Eq. 7).

    python train.py --teacher gemma3-270m --student smollm2-135m --data builtin --method molsaki

Stages, each skipped when its output is already in --out (SPEC §1): teacher rationales (data.py),
teacher attention cache (data.py through attention.py), training (this file), evaluation (eval.py).

Methods (SPEC §6): `vanilla` (L_pre on gold answers), `dss` (beta = 0), `mmi` (MMI loss, beta 0.1),
`molsaki` (Eq. 6 with MoL, Eq. 4/5); `--layer-map T:S` or `last` is the single-layer ablation.
Per step: one forward for L_exp and the backward of the rest of Eq. 7, then one forward for L_pre and its backward
(one pass's graph alive at a time; MMI, which reads the answer logits, runs L_pre first); under molsaki the L_exp
pass also yields the student's stepwise attention and value states (attention.capture), so L_att costs no extra
forward. Several processes (torchrun): the student in torch's DistributedDataParallel, the router's gradients
averaged in one flattened all-reduce.

The run directory (rundir.py) holds one run: a lock keeps a second process out, a checkpoint is only continued
with --resume and the same training flags, and Ctrl-C or SIGTERM ends the step in progress, saves it and exits
(130 or 143); outside the loop (teacher stage, evaluation) they stop at once, keeping what has finished. Every
(re)start writes `run.json` (command, flags, versions, commit, data checksums, device) into --out, once the checks
have passed.

Public functions: `parse_args`, `check_inputs`, `training_examples`, `teacher_cache`, `features`, `collate`,
`step_losses`, `write_run_info`, `train`, `main`.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import attention
import cli
import data
import eval as eval_
import fetch
import losses
import models
import mol
import problems
import rundir
import spans

METHODS = ("vanilla", "dss", "mmi", "molsaki")
DATA_SETS = ("builtin", "svamp", "gsm8k", "csqa")  # --data names; anything else is a file of problems
EVAL_SETS = {"builtin": "builtin", "math": "svamp,singleeq,asdiv,gsm8k", "csqa": "csqa"}  # per task (SPEC §8)


# Schedule defaults: the paper's (SPEC §9, GPT-2 students; TinyLlama used --lr 1e-4 --max-steps 2000) for real
# data, and a short one for the built-in problems: about 15 minutes on 2 CPU cores, a minute on a GPU.
SCHEDULE = {"paper": {"lr": 5e-5, "batch_size": 16, "max_steps": 4000, "warmup": 0},
            "builtin": {"lr": 1e-4, "batch_size": 8, "max_steps": 50, "warmup": 5}}


def parse_args(argv=None):
    p = cli.Parser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--teacher", default="gemma3-270m", help="hub id, folder, or a packaged name (gemma3-270m, smollm2-135m)")
    a("--student", default="smollm2-135m", help="hub id, folder, or a packaged name (gemma3-270m, smollm2-135m)")
    a("--teacher-dtype", default="auto", choices=["auto", *models.DTYPES],
      help="teacher weights for its rationale and attention passes: auto = bfloat16 on CUDA, float32 on CPU")
    a("--data", default="builtin", help=f"training set: {', '.join(DATA_SETS)}, or a JSON / JSONL file of problems")
    a("--data-dir", default=None, help="folder of the data sets (else $MOLSAKI_DATA, else ~/.cache/molsaki/data)")
    a("--rationales", default=None, choices=["builtin", "teacher", "palm"],
      help="rationale source (builtin: --data builtin only; palm: svamp or csqa); None = builtin or teacher")
    a("--palm-filter", default="all", choices=["all", "correct"],
      help="PaLM items kept: every one with a rationale (all, as DSS) or only those PaLM answered right")
    a("--n-train", type=int, default=200, help="number of built-in training problems")
    a("--method", default="molsaki", choices=METHODS, help="training objective (SPEC §6)")
    a("--alpha", type=float, default=0.5, help="weight of L_pre; L_exp gets 1 - alpha (Eq. 7)")
    a("--beta", type=float, default=None, help="weight of L_att (molsaki) or L_MMI (mmi); None = 1.0 or 0.1")
    a("--tau1", type=float, default=0.1, help="teacher MoL temperature (Eq. 4)")
    a("--tau2", type=float, default=0.5, help="student router temperature (Eq. 5)")
    a("--layer-map", default=None, help="single-layer ablation instead of MoL: 'T:S' (1-based) or 'last'")
    a("--delimiters", default=".", help="characters that end a step (SPEC §3)")
    a("--lr", type=float, default=None, help="AdamW learning rate; None = 5e-5 (paper), 1e-4 (builtin)")
    a("--batch-size", type=int, default=None, help="global batch (all processes); None = 16 (paper), 8 (builtin)")
    a("--grad-accum", type=int, default=1, help="micro-batches per process and step")
    a("--max-steps", type=int, default=None, help="optimizer steps; None = 4000 (paper), 50 (builtin)")
    a("--warmup", type=int, default=None, help="linear warmup steps, then linear decay; None = 0 (paper), 5")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0, as the HF Trainer DSS used)")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    a("--seed", type=int, default=0, help="model init of the router and data order")
    a("--max-length", type=int, default=512, help="tokens per text (student and teacher)")
    a("--save-every", type=int, default=500, help="checkpoint every K steps (and at the end)")
    a("--resume", action="store_true", help="continue from --out/checkpoint, with the run's own training flags")
    a("--overwrite", action="store_true", help="start again in an --out that holds a run: its checkpoint, log "
      "and results are removed (its teacher-stage files are kept)")
    a("--teacher-batch-size", type=int, default=8, help="batch of the teacher's generation and attention pass")
    a("--eval-sets", default=None,
      help="comma-separated names or files, '' for none; None = the training task's sets (EVAL_SETS)")
    a("--eval-batch-size", type=int, default=16, help="batch of the final evaluation")
    a("--out", default=None, help="run directory; None = runs/<data>[-palm]-<method>[-sl<T>-<S>]-s<seed>")
    args = p.parse_args(argv)
    for k, v in SCHEDULE["builtin" if args.data == "builtin" else "paper"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    task = "math"
    if args.data not in DATA_SETS:
        if not Path(args.data).is_file():
            p.error(f"--data {args.data!r} is neither a training set ({', '.join(DATA_SETS)}) nor a file of problems")
        try:
            task = data.task_of(data.load_file(args.data)[0])
        except ValueError as e:
            p.error(f"--data: {e}")
    elif args.data == "csqa":
        task = "csqa"
    if args.eval_sets is None:
        args.eval_sets = EVAL_SETS["builtin" if args.data == "builtin" else task]
    if args.beta is None:
        args.beta = {"molsaki": 1.0, "mmi": 0.1}.get(args.method, 0.0)
    args.rationales = args.rationales or ("builtin" if args.data == "builtin" else "teacher")
    if args.out is None:  # each README command its own directory: an ablation never overwrites the main run
        name = args.data if args.data in DATA_SETS else Path(args.data).stem
        parts = [name, "palm" if args.rationales == "palm" else "", args.method,
                 f"sl{args.layer_map.replace(':', '-')}" if args.layer_map else "", f"s{args.seed}"]
        args.out = "runs/" + "-".join(part for part in parts if part)
    args.out = Path(args.out)
    problem = _flag_problem(args)
    if problem:
        p.error(problem)
    return args


def _flag_problem(args) -> str | None:
    """What is wrong with the flags alone (before any file is read or model loaded), or None."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    numbers = {"--alpha": args.alpha, "--beta": args.beta, "--tau1": args.tau1, "--tau2": args.tau2, "--lr": args.lr,
               "--weight-decay": args.weight_decay, "--max-grad-norm": args.max_grad_norm}
    checks = [
        *((not math.isfinite(v), f"{k} must be a finite number, got {v}") for k, v in numbers.items()),
        (args.rationales == "builtin" and args.data != "builtin", "--rationales builtin needs --data builtin"),
        (args.rationales == "palm" and args.data not in ("svamp", "csqa"),
         f"--rationales palm: PaLM rationales exist for --data svamp and csqa only, not {args.data!r}"),
        (args.batch_size < 1, f"--batch-size must be at least 1, got {args.batch_size}"),
        (args.grad_accum < 1, f"--grad-accum must be at least 1, got {args.grad_accum}"),
        (args.batch_size % (world * max(1, args.grad_accum)) != 0,
         f"--batch-size {args.batch_size} must be divisible by processes ({world}) x --grad-accum ({args.grad_accum})"),
        (args.max_steps < 1, f"--max-steps must be at least 1, got {args.max_steps}"),
        (not 0 <= args.alpha <= 1, f"--alpha must lie in [0, 1], got {args.alpha}"),
        (args.beta < 0, f"--beta must not be negative, got {args.beta}"),
        (args.tau1 <= 0 or args.tau2 <= 0, f"--tau1 and --tau2 must be positive, got {args.tau1}, {args.tau2}"),
        (args.lr <= 0, f"--lr must be positive, got {args.lr}"),
        (args.weight_decay < 0, f"--weight-decay must not be negative, got {args.weight_decay}"),
        (args.max_grad_norm <= 0, f"--max-grad-norm must be positive, got {args.max_grad_norm}"),
        (not args.delimiters, "--delimiters must name at least one character that ends a step"),
        (args.warmup < 0, f"--warmup must not be negative, got {args.warmup}"),
        (min(args.save_every, args.teacher_batch_size, args.eval_batch_size, args.n_train, args.max_length) < 1,
         "--save-every, --teacher-batch-size, --eval-batch-size, --n-train and --max-length must be at least 1"),
        (args.layer_map is not None and args.method != "molsaki", "--layer-map needs --method molsaki"),
        (args.resume and args.overwrite, "--resume continues the run in --out, --overwrite starts it again: pass one"),
    ]
    for bad, message in checks:
        if bad:
            return message
    if args.layer_map:
        try:
            mol.parse_layer_map(args.layer_map, 10**9, 10**9)  # its form; the range needs the models' configs
        except ValueError as e:
            return f"--layer-map: {e}"
    if args.eval_sets:
        problem = eval_.check_sets(args.eval_sets.split(","))
        if problem:
            return f"--eval-sets: {problem}"
    return None


def _set_names(args) -> list[str]:
    """The training set and the test sets of a run, each once: names of data.SPLITS, `builtin`, or files."""
    return list(dict.fromkeys([args.data, *filter(None, args.eval_sets.split(","))]))


def check_inputs(args) -> dict | None:
    """What the flags alone cannot show, cheapest first, before any model is converted or loaded: the data (fetched
    now and checked by its SHA-256, or a file of problems read whole), the run directory (rundir.start: a
    checkpoint without --resume, or --resume with other training flags), then the models' configs (a name that is
    neither a folder, a packaged model nor a reachable hub id; a folder without tokenizer or with damaged weights)
    and --layer-map's range. Returns the trainer state to resume from (or None); a problem is one line (cli.fail)."""
    try:
        names = _set_names(args)
        if any(name in data.SPLITS for name in names):
            root = fetch.resolve_data_dir(args.data_dir)
            for name in (n for n in names if n in data.SPLITS):
                fetch.ensure_files(root, fetch.files_of(name))
        for name in (n for n in names if n not in data.SPLITS and n != "builtin"):
            data.load_file(name)  # a file of problems: every record read now
        state = rundir.start(args)  # every process: each loads the state it resumes from
        student = models.load_config(str(rundir.checkpoint_dir(args.out)) if args.resume else args.student)
        if args.method == "molsaki" or (args.rationales == "teacher" and args.method != "vanilla"):
            teacher = models.load_config(args.teacher)
            if args.layer_map:
                mol.parse_layer_map(args.layer_map, teacher.num_hidden_layers, student.num_hidden_layers)
    except (ValueError, FileNotFoundError, fetch.DataUnavailable) as e:
        cli.fail(e)
    return state


# ---------------------------------------------------------------------------------------------
# Stages before training: examples with rationales, and the teacher attention cache.


def training_examples(args):
    """Train records joined with their rationales (and CSQA keywords): `{id, question, answer, rationale}`.
    Every rationale ends before its answer statement (SPEC §2); the answer target of L_pre is always gold."""
    if args.data == "builtin":
        records = problems.make_problems(args.n_train, seed=0)
    elif args.data in DATA_SETS:
        records = data.load_dataset(args.data, "train", args.data_dir)
    else:
        records = data.load_file(args.data)
    if args.method == "vanilla":
        return [dict(r, rationale="") for r in records]
    if args.rationales == "builtin":
        kept = [{"id": r["id"], "rationale": data.split_answer(r["rationale"])[0]} for r in records]
    elif args.rationales == "palm":
        kept = data.load_palm_rationales(args.data, "train", args.data_dir, args.palm_filter)
    else:
        teacher, tok = _teacher(args)
        kept = _rank0_first(lambda: data.teacher_rationales(teacher, tok, records, args.out / "rationales.jsonl",
                                                            args.teacher_batch_size))
    by_id = {r["id"]: r for r in records}
    examples = [dict(by_id[k["id"]], rationale=k["rationale"]) for k in kept if k["rationale"]]
    print(f"[train] {len(examples)} of {len(records)} items have a rationale ({args.rationales}); "
          f"{len(records) - len(examples)} not kept")
    if data.task_of(records[0]) == "csqa" and args.method == "molsaki":  # critical words = the teacher's keywords
        teacher, tok = _teacher(args)
        keywords = _rank0_first(lambda: data.teacher_keywords(teacher, tok, examples, args.out / "keywords.jsonl",
                                                              args.teacher_batch_size))
        examples = [dict(e, keywords=keywords[e["id"]]) for e in examples]
    return examples


def _rank0_first(stage):
    """Run a stage that writes a resumable file on rank 0 first; the other processes then read its result."""
    if _rank() != 0:
        dist.barrier()
    result = stage()
    if _rank() == 0 and dist.is_initialized():
        dist.barrier()
    return result


_TEACHER = {}


def _teacher(args):
    """The teacher, loaded once per process and only when a stage needs it."""
    if "model" not in _TEACHER:
        dtype = models.resolve_dtype(args.teacher_dtype, _device())
        model, tok = models.load_model(args.teacher, dtype=dtype, attn_implementation=attention.ATTN)
        _TEACHER["model"], _TEACHER["tok"] = model.to(_device()).eval(), tok
    return _TEACHER["model"], _TEACHER["tok"]


def teacher_cache(args, examples):
    meta = {"teacher": args.teacher, "exp_prompt": data.EXP_PROMPT, "delimiters": args.delimiters,
            "critical": "keywords" if data.task_of(examples[0]) == "csqa" else "numbers", "max_length": args.max_length,
            "texts": data.texts_hash(examples)}
    path = args.out / "teacher_cache.pt"
    if path.exists():
        print(f"[train] reusing teacher attention cache {path}")
        return data.load_attention_cache(path, meta)
    teacher, tok = _teacher(args)
    rank, world = _rank(), _world()  # each process computes its shard; all of them get every item
    cache = data.build_attention_cache(teacher, tok, examples[rank::world], meta, args.max_length,
                                       args.teacher_batch_size)
    if world > 1:
        shards = [None] * world
        dist.all_gather_object(shards, cache["items"])
        cache["items"] = {k: v for shard in shards for k, v in shard.items()}
    if rank == 0:
        data.save_atomic(cache, path)
    return cache


# ---------------------------------------------------------------------------------------------
# Features: token ids, target labels, and the student's step/word groups aligned with the teacher's.


def _task(tok, prompt, target, max_length):
    """ids and labels of prompt + target (+ EOS); labels only on target tokens (-100 elsewhere)."""
    enc = tok(prompt + target, return_offsets_mapping=True, truncation=True, max_length=max_length - 1)
    ids = enc["input_ids"] + [tok.eos_token_id]
    labels = [t if e > len(prompt) else -100 for t, (_, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    return ids, labels + [tok.eos_token_id]


def features(args, examples, tok, cache, n_student_layers):
    """One dict per example; under molsaki also the student groups and the mixed teacher target A_t [S, W]."""
    out = []
    for e in examples:
        f = {"id": e["id"]}
        f["pre_ids"], f["pre_labels"] = _task(tok, data.PRE_PROMPT.format(question=e["question"]),
                                              " " + e["answer"], args.max_length)
        if args.method != "vanilla":
            f["exp_ids"], f["exp_labels"] = _task(tok, data.EXP_PROMPT.format(question=e["question"]),
                                                  " " + e["rationale"], args.max_length)
        if args.method == "molsaki":
            text, steps, words = spans.example_spans(e["question"], e["rationale"], data.EXP_PROMPT,
                                                     e.get("keywords"), args.delimiters)
            _, st, wt = spans.encode(tok, text, steps, words, args.max_length - 1)
            item = cache["items"][e["id"]]
            step_ids = spans.align(st, dict.fromkeys(item["step_ids"]))
            word_ids = spans.align(wt, dict.fromkeys(item["word_ids"]))
            rows = [item["step_ids"].index(k) for k in step_ids]
            cols = [item["word_ids"].index(k) for k in word_ids]
            A_t = item["A"][:, rows][:, :, cols]  # [L1, S, W], the steps and words both models keep
            p_t = (mol.one_hot_weights(mol.parse_layer_map(args.layer_map, A_t.shape[0], n_student_layers)[0],
                                       A_t.shape[0]) if args.layer_map else mol.teacher_layer_weights(A_t, args.tau1))
            f.update(A_t=mol.mix_layers(A_t, p_t), p_t=p_t,
                     groups=([st[k] for k in step_ids], [wt[k] for k in word_ids]))
        out.append(f)
    return out


def _pad(rows, value):
    N = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (N - len(r)) for r in rows])  # [B, N]


def collate(batch, pad_id):
    """Right-padded tensors for each task (positions are not shifted, so groups stay valid)."""
    out = {"ids": [f["id"] for f in batch]}
    for task in ("pre", "exp"):
        if f"{task}_ids" in batch[0]:
            ids = [f[f"{task}_ids"] for f in batch]
            out[f"{task}_ids"] = _pad(ids, pad_id)
            out[f"{task}_labels"] = _pad([f[f"{task}_labels"] for f in batch], -100)
            out[f"{task}_mask"] = _pad([[1] * len(r) for r in ids], 0)
    return out


# ---------------------------------------------------------------------------------------------
# One step's losses.


def step_losses(args, model, router, batch, feats, device, scale=1.0, sync=True):
    """Loss components of one micro-batch, detached: {'loss', 'pre', 'exp', 'att', 'mmi', 'p_s', 'no_words'}; their
    gradients (times `scale`) are added to .grad one task at a time, so only one pass's graph is alive at a time.
    The rationale pass (the longer one) goes first: the gradient buffers, allocated by the first backward, then
    sit beside the answer pass's activations, not beside the rationale pass's. MMI's L_exp side reads the answer
    logits (detached), so for MMI the answer pass goes first. Under DistributedDataParallel only the last backward,
    with `sync`, reduces gradients."""
    student = getattr(model, "module", model)  # DDP wraps the student; the capture hooks the student itself
    t = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    zero = torch.zeros((), device=device)
    vanilla = args.method == "vanilla"

    def quiet(last):  # DDP reduces the gradients in the last backward of a step only
        return model.no_sync() if isinstance(model, DDP) and not (last and sync) else contextlib.nullcontext()

    def answer_task(last):  # alpha L_pre (Eq. 7's first term), its backward; the logits detached
        with quiet(last):
            with autocast:
                logits = model(t["pre_ids"], attention_mask=t["pre_mask"]).logits
                l_pre = losses.target_cross_entropy(logits, t["pre_labels"])
            (scale * (1.0 if vanilla else args.alpha) * l_pre).backward()
        return logits.detach(), l_pre.detach()

    if vanilla:
        l_pre = answer_task(last=True)[1]
        return {"loss": l_pre, "pre": l_pre}
    pre = answer_task(last=False) if args.method == "mmi" else None  # MMI's answer side is a constant
    groups = [f["groups"] for f in feats] if args.method == "molsaki" else None
    with quiet(last=pre is not None):  # the last backward of the step when the answer pass ran first (MMI)
        with autocast:
            if groups:
                with attention.capture(student, groups, values=True) as cap:
                    exp = model(t["exp_ids"], attention_mask=t["exp_mask"]).logits
            else:
                exp = model(t["exp_ids"], attention_mask=t["exp_mask"]).logits
            l_exp = losses.target_cross_entropy(exp, t["exp_labels"])
        out = {"att": zero, "mmi": zero}
        extra = zero
        if args.method == "mmi":
            out["mmi"] = extra = losses.mmi_loss(pre[0], t["pre_labels"], exp, t["exp_labels"])
        if groups:
            A_s = cap.stepwise()  # per example [L2, S, W]
            if args.layer_map:
                s = mol.parse_layer_map(args.layer_map, feats[0]["p_t"].shape[0], len(A_s[0]))[1]
                p_s = mol.one_hot_weights(s, len(A_s[0])).to(device).expand(len(feats), -1)
            else:
                p_s = router(cap.value_states(), t["exp_mask"])  # [B, L2], Eq. 5
            pairs = [(f["A_t"].to(device), mol.mix_layers(a, p)) for f, a, p in zip(feats, A_s, p_s, strict=True)]
            out["att"], used = losses.attention_loss(pairs)
            out["p_s"], out["no_words"] = p_s.detach().mean(0), torch.tensor(float(len(feats) - used), device=device)
            extra = out["att"]
        (scale * losses.total_loss(zero, l_exp, extra, args.alpha, args.beta)).backward()  # the rest of Eq. 7
    del exp  # the logits [B, N, V]: the answer pass runs without them
    l_pre = pre[1] if pre is not None else answer_task(last=True)[1]
    out.update(pre=l_pre, exp=l_exp.detach(), att=out["att"].detach(), mmi=out["mmi"].detach())
    out["loss"] = losses.total_loss(out["pre"], out["exp"], extra.detach(), args.alpha, args.beta)
    return out


# ---------------------------------------------------------------------------------------------
# The loop: AdamW, linear warmup and decay, clipping, checkpoints, resume, data parallel.


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _world():
    return dist.get_world_size() if dist.is_initialized() else 1


def _device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _average(tensors, world):
    """All-reduce the mean of `tensors` over the processes in one flattened call (the router's gradients and the
    logged losses: small, and outside DDP)."""
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    for t, v in zip(tensors, (flat / world).split([t.numel() for t in tensors]), strict=True):
        t.copy_(v.view_as(t))


def _value_dim(config):
    """d of Eq. 5: kv_heads x head_dim, the width of the value states the attention function receives."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def batch_indices(step, n, batch_size, seed):
    """Example indices of global step `step`: consecutive slices of per-epoch seeded permutations."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out += perm[offset:offset + batch_size - len(out)]
    return out


def _data_files(args) -> dict[str, str]:
    """SHA-256 of the data files of this run's training and test sets (`fetch.files_of`, as found in the data
    directory, where check_inputs fetched them) and of any file of problems it names."""
    names = _set_names(args)
    root = fetch.resolve_data_dir(args.data_dir) if any(n in data.SPLITS for n in names) else None
    paths = {p: root / p for n in names if n in data.SPLITS for p in fetch.files_of(n)}
    paths.update({n: Path(n) for n in names if n not in data.SPLITS and n != "builtin"})
    return {k: fetch.sha256(p) for k, p in sorted(paths.items()) if p.is_file()}


def git_state(repo) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout at `repo`; (None, None) outside one. Dirty: a tracked Python file differs from
    the commit. Other files, such as run directories and result logs inside the checkout, do not count: the data
    files have their own checksums in run.json."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "*.py"], cwd=repo,
                                capture_output=True, text=True)
    except FileNotFoundError:  # git not installed
        return None, None
    if head.returncode or status.returncode:
        return None, None
    return head.stdout.strip(), bool(status.stdout.strip())


def write_run_info(args):
    """--out/run.json, what made this run: command line, resolved flags, versions, git commit and whether tracked
    Python files had changes (`git_state`), SHA-256 of the data files, device. Written atomically at every (re)start."""
    commit, dirty = git_state(Path(__file__).resolve().parent)
    device = _device()
    info = {"argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "commit": commit, "dirty": dirty,
            "data_files": _data_files(args),
            "device": f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"}
    tmp = args.out / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, args.out / "run.json")


def train(args):
    """Run every stage that is not done yet, then the evaluation; returns the final step's logged losses. Holds
    --out's lock throughout (rank 0)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = _device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # collectives on objects use the current device
    torch.manual_seed(args.seed)
    held = contextlib.ExitStack()
    try:
        if _rank() == 0:
            held.enter_context(rundir.lock(args.out))
    except ValueError as e:
        cli.fail(e)
    with held:
        state = check_inputs(args)
        if _rank() == 0:
            write_run_info(args)
        row = _train(args, state, device)
        if _rank() == 0 and args.eval_sets:
            eval_.run(args.out / "checkpoint", args.eval_sets.split(","), args.data_dir,
                      batch_size=args.eval_batch_size, out=args.out)
    return row


def _train(args, state, device):
    try:
        examples = training_examples(args)
        if not examples:
            raise ValueError(f"no training example has a rationale ({args.rationales}): see the counts above")
        cache = teacher_cache(args, examples) if args.method == "molsaki" else None
    except ValueError as e:
        cli.fail(e)
    _TEACHER.clear()  # the teacher is not needed from here on

    source = rundir.checkpoint_dir(args.out) if state else args.student
    attn = attention.ATTN if args.method == "molsaki" else "sdpa"
    student, tok = models.load_model(str(source), attn_implementation=attn)
    student.to(device).train()
    world, rank = _world(), _rank()
    model = DDP(student) if world > 1 else student  # torch's data parallel: bucketed, overlapped with backward
    feats = features(args, examples, tok, cache, student.config.num_hidden_layers)
    router = None
    if args.method == "molsaki" and not args.layer_map:
        router = mol.StudentRouter(_value_dim(student.config), student.config.num_hidden_layers, args.tau2).to(device)
    params = list(student.parameters()) + (list(router.parameters()) if router else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / max(1, args.warmup),
                           max(0.0, (args.max_steps - s) / max(1, args.max_steps - args.warmup))))
    step = 0
    if state:
        if router:
            saved = set(state["router"] or {})
            if saved != set(router.state_dict()):
                cli.fail(f"--resume: the router in {source} has parameters {sorted(saved)}, this code's router "
                         f"{sorted(router.state_dict())} (Eq. 5 now has one bias per layer); start the run again "
                         "with --overwrite")
            router.load_state_dict(state["router"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        print(f"[train] resumed from {source} at step {step}")
    del state

    micro = args.batch_size // (world * args.grad_accum)
    log = rundir.open_log(args.out / "log.jsonl", step) if rank == 0 else None
    bar = tqdm(total=args.max_steps, initial=step, desc=args.method, disable=rank != 0)
    row, saved = {}, step
    try:
        with _stop_at_step_end():
            while step < args.max_steps and not _STOP:
                idx = batch_indices(step, len(feats), args.batch_size, args.seed)
                mine = idx[rank * micro * args.grad_accum:(rank + 1) * micro * args.grad_accum]
                sums = {}
                t0 = time.time()
                for m in range(args.grad_accum):  # DDP reduces the student's gradients in the last backward
                    fb = [feats[i] for i in mine[m * micro:(m + 1) * micro]]
                    out = step_losses(args, model, router, collate(fb, tok.pad_token_id), fb, device,
                                      scale=1.0 / args.grad_accum, sync=m == args.grad_accum - 1)
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0) + v.float() / args.grad_accum
                if world > 1:  # with the stop flag: every process stops after the same step
                    sums["stop"] = torch.tensor(float(bool(_STOP)), device=device)
                    _average(([p.grad for p in router.parameters()] if router else []) + list(sums.values()), world)
                    if sums.pop("stop") > 0 and not _STOP:
                        _STOP.append(signal.SIGTERM)
                if not torch.isfinite(sums["loss"]):  # after the all-reduce, so every process stops
                    ids = [feats[i]["id"] for i in idx]
                    last = rundir.checkpoint_dir(args.out)
                    raise FloatingPointError(f"non-finite loss at step {step + 1}, batch ids {ids}; " + (
                        f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"))
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                row = {"step": step, "lr": sched.get_last_lr()[0], "sec": round(time.time() - t0, 3)}
                row.update({k: (v.tolist() if v.dim() else v.item()) for k, v in sums.items()})
                if cache is not None:
                    row["p_t"] = torch.stack([feats[i]["p_t"] for i in idx]).mean(0).tolist()  # the global batch
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "pre", "exp", "att", "mmi") if k in row})
                if rank == 0 and (step % args.save_every == 0 or step == args.max_steps or _STOP):
                    rundir.save_checkpoint(args, step, student, tok, router, opt, sched)
                    saved = step
    finally:
        bar.close()
        if log:
            log.close()
    if _STOP:
        if rank == 0:
            print(f"\n[train] stopped: step {saved} is saved in {args.out / 'checkpoint'}; the same command with "
                  "--resume continues it")
        raise KeyboardInterrupt
    return row


# ---------------------------------------------------------------------------------------------
# Signals: SIGINT (Ctrl-C) and SIGTERM stop a run where nothing is lost, with status 130 or 143.

_STOP = []  # the signals received


def _interrupt(signum, frame):
    """Outside the training loop a signal stops at once: the stage in progress keeps what it has written."""
    _STOP.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_at_step_end():
    """Within the loop a signal only asks to stop: the step in progress ends (update, schedule, log row), its
    checkpoint is saved, then the run stops. A second signal stops at once (the last checkpoint stays)."""
    def ask(signum, frame):
        _STOP.append(signum)
        if len(_STOP) > 1:
            raise KeyboardInterrupt
        print("\n[train] stopping after this step (a second Ctrl-C stops now, losing the step)", file=sys.stderr)

    old = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv=None):
    args = parse_args(argv)
    _STOP.clear()
    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        row = train(args)
    except KeyboardInterrupt:
        signum = _STOP[0] if _STOP else signal.SIGINT
        print(f"[train] interrupted by {signal.Signals(signum).name}; what finished is kept in {args.out}, and the "
              "same command continues it (with --resume once a checkpoint is there)", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"[train] run directory: {args.out}")
    if args.data == "builtin":
        print("[train] the paper's setting on real data: python train.py --data svamp --rationales palm "
              "--teacher meta-llama/Meta-Llama-3-8B --student gpt2-large")
    return row


if __name__ == "__main__":
    main()
