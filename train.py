"""Train a student by CoT distillation: L = alpha L_pre + (1 - alpha) L_exp + beta L_att (Eq. 7).

    python train.py --teacher gemma3-270m --student smollm2-135m --data builtin --method molsaki

Stages, each skipped when its output is already in --out: the teacher stage (rationales, CSQA keywords and the
teacher's stepwise attention A_t of Eq. 2, teacher.py), training (this file), evaluation (eval.py). The flags and
their checks are plumbing/flags.py's; what a run directory guarantees (lock, resume, signals, run.json) is
plumbing/rundir.py's.

Methods: `vanilla` (L_pre on gold answers), `dss` (beta = 0), `mmi` (the MMI loss), `molsaki` (Eq. 6 with MoL,
Eq. 4/5); `--layer-map T:S` or `last` is the single-layer ablation of Table 2.

One step (`step`, per micro-batch) reads Eq. 1 to 7 in the paper's order: the answer pass gives L_pre (Eq. 1); the
rationale pass gives L_exp and, under molsaki, the student's stepwise attention A_s and value states through the
capture (capture.py, Eq. 3), so L_att costs no extra forward; the teacher's layer weights p_t come from its cached
A_t (Eq. 4), the student's p_s from the router (Eq. 5); the two mixtures meet in the KL (Eq. 6); then Eq. 7 and one
backward. Both passes' activations are alive until that backward: --grad-accum splits the batch when they do not
fit. Several GPUs (torchrun): `Student`, the LM with its router, in DistributedDataParallel.
"""

import contextlib
import functools
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import capture
import data
import eval as eval_
import losses
import mol
import teacher
from plumbing import cli, fetch, flags, models, rundir


class Student(torch.nn.Module):
    """What training updates: the student LM and, under MoL, its router (Eq. 5), in one module so that one DDP
    wrapper reduces both. Its forward is `step`."""

    def __init__(self, lm, router):
        super().__init__()
        self.lm, self.router = lm, router

    def forward(self, batch, **method):
        return step(self.lm, self.router, batch, **method)


def step(lm, router, batch, method="molsaki", alpha=0.5, beta=1.0, tau1=0.1, layer_map=None,
         read_attention=capture.capture):
    """Eq. 7 on one batch of `data.collate`: (loss, parts). `loss` carries the graph; `parts` are detached: 'loss',
    'pre', 'exp', 'att', 'mmi' and, under molsaki, the batch means of 'p_t' and 'p_s' and 'no_words' (examples
    without a step or critical word). `router` is None under `layer_map` ("T:S" or "last", Table 2's single layers).
    `read_attention(lm, groups, values=True)` reads A_s and the value states during the rationale pass: the capture
    here, eager attention in the benchmark's naive route."""
    device = lm.device
    t = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    zero = torch.zeros((), device=device)
    parts = {"att": zero, "mmi": zero}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pre = lm(t["pre_ids"], attention_mask=t["pre_mask"]).logits  # [B, N, V]
        l_pre = losses.target_cross_entropy(pre, t["pre_labels"])  # Eq. 1, the answer
        if method == "vanilla":
            return l_pre, {"loss": l_pre.detach(), "pre": l_pre.detach()}
        molsaki = method == "molsaki"
        with read_attention(lm, batch["groups"], values=True) if molsaki else contextlib.nullcontext() as cap:
            exp = lm(t["exp_ids"], attention_mask=t["exp_mask"]).logits  # [B, N, V]
        l_exp = losses.target_cross_entropy(exp, t["exp_labels"])  # Eq. 1, the rationale
        if method == "mmi":
            parts["mmi"] = losses.mmi_loss(pre, t["pre_labels"], exp, t["exp_labels"])
        if molsaki:
            A_s = cap.stepwise()  # Eq. 3: per example [L2, S, W], read during the rationale pass
            A_t = [a.to(device) for a in batch["A_t"]]  # per example [L1, S, W], the teacher's (Eq. 2, cached)
            if layer_map:  # one teacher layer against one student layer
                i, j = mol.parse_layer_map(layer_map, len(A_t[0]), len(A_s[0]))
                p_t = mol.one_hot_weights(i, len(A_t[0])).to(device).expand(len(A_t), -1)  # [B, L1]
                p_s = mol.one_hot_weights(j, len(A_s[0])).to(device).expand(len(A_s), -1)  # [B, L2]
            else:
                p_t = torch.stack([mol.teacher_layer_weights(a, tau1) for a in A_t])  # Eq. 4: [B, L1]
                p_s = router(cap.value_states(), t["exp_mask"])  # Eq. 5: [B, L2]
            pairs = [(mol.mix_layers(a_t, pt), mol.mix_layers(a_s, ps))  # Eq. 6: the two mixtures [S, W]
                     for a_t, pt, a_s, ps in zip(A_t, p_t, A_s, p_s, strict=True)]
            parts["att"], used = losses.attention_loss(pairs)  # Eq. 6: KL per step, averaged
            no_words = torch.tensor(float(len(A_s) - used), device=device)  # examples without a step or word
            parts.update(p_t=p_t.mean(0), p_s=p_s.mean(0), no_words=no_words)
        loss = losses.total_loss(l_pre, l_exp, parts["att"] + parts["mmi"], alpha, beta)  # Eq. 7
    return loss, {k: v.detach() for k, v in dict(parts, loss=loss, pre=l_pre, exp=l_exp).items()}


# ---------------------------------------------------------------------------------------------
# Before training: the checks, and the teacher stage.


def check_inputs(args) -> dict | None:
    """What the flags alone cannot show, cheapest first, before any model is converted or loaded: the data (fetched
    now and checked by its SHA-256, or a file of problems read whole), the run directory (rundir.start), then the
    models' configs (a name that is neither a folder, a packaged model nor a reachable hub id; a folder without
    tokenizer or with damaged weights) and --layer-map's range. Returns the trainer state to resume from (or
    None); a problem is one line (cli.fail)."""
    try:
        names = flags.set_names(args.data, args.eval_sets)
        root = fetch.resolve_data_dir(args.data_dir)
        for name in (n for n in names if n in data.SPLITS):
            fetch.ensure_files(root, fetch.files_of(name))
        for name in (n for n in names if n not in data.SPLITS and n != "builtin"):
            data.load_file(name)  # a file of problems: every record read now
        state = rundir.start(args.out, vars(args), args.resume, args.overwrite)  # every process loads its state
        student = models.load_config(str(rundir.checkpoint_dir(args.out)) if args.resume else args.student)
        if args.method == "molsaki" or (args.rationales == "teacher" and args.method != "vanilla"):
            teacher = models.load_config(args.teacher)
            if args.layer_map:
                mol.parse_layer_map(args.layer_map, teacher.num_hidden_layers, student.num_hidden_layers)
    except (ValueError, FileNotFoundError, fetch.DataUnavailable) as e:
        cli.fail(e)
    return state


def training_examples(args, load_teacher) -> list[dict]:
    """The run's training examples as its flags say (teacher.training_examples); `load_teacher()` gives (model,
    tokenizer), called only when the teacher must generate."""
    return teacher.training_examples(
        args.data, None if args.method == "vanilla" else args.rationales, load_teacher, args.out,
        data_dir=args.data_dir, n_train=args.n_train, palm_filter=args.palm_filter, answer_target=args.answer_target,
        keywords=args.method == "molsaki", batch_size=args.teacher_batch_size)


def attention_cache(args, examples, load_teacher) -> dict:
    """The run's teacher attention cache, --out/teacher_cache.pt, built or reused (teacher.attention_cache)."""
    meta = teacher.cache_meta(args.teacher, examples, args.delimiters, args.max_length)
    return teacher.attention_cache(args.out / "teacher_cache.pt", meta, examples, load_teacher,
                                   args.teacher_batch_size)


def teacher_stage(args) -> tuple[list[dict], dict | None]:
    """The training examples with their rationales and, under molsaki, the teacher attention cache (Eq. 2), each
    reused from --out when there. The teacher loads only if something is missing. Rank 0 first; the other
    processes then read what it wrote."""
    def load_teacher():  # --teacher-device-map auto: accelerate places the layers; the model is not moved after
        dtype = models.resolve_dtype(args.teacher_dtype, _device())
        device_map = args.teacher_device_map
        model, tok = models.load_model(args.teacher, dtype=dtype, attn_implementation=capture.register(),
                                       device_map=device_map)
        return (model if device_map else model.to(_device())).eval(), tok

    if _rank() != 0:
        dist.barrier()
    try:
        load = functools.cache(load_teacher)
        examples = training_examples(args, load)
        if not examples:
            raise ValueError(f"no training example has a rationale ({args.rationales}): see the counts above")
        cache = attention_cache(args, examples, load) if args.method == "molsaki" else None
    except ValueError as e:
        cli.fail(e)
    if _rank() == 0 and dist.is_initialized():
        dist.barrier()
    return examples, cache


# ---------------------------------------------------------------------------------------------
# The loop: AdamW, linear warmup and decay, clipping, checkpoints, data parallel.


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _device():
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def batch_indices(step, n, batch_size, seed):
    """Example indices of global step `step`: consecutive slices of per-epoch seeded permutations."""
    start, out = step * batch_size, []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out += perm[offset:offset + batch_size - len(out)]
    return out


def objective(args) -> dict:
    """The method and its numbers, as `step` takes them."""
    return {"method": args.method, "alpha": args.alpha, "beta": args.beta, "tau1": args.tau1,
            "layer_map": args.layer_map}


def features(args, examples, tok, cache) -> list[dict]:
    """data.features as the run's flags say: the rationale task unless vanilla, the teacher's A_t under molsaki."""
    return data.features(examples, tok, args.max_length, args.method != "vanilla", cache, args.delimiters)


def fit(args, examples, cache, state, device):
    """Train from step 0, or from `state` (--resume), to --max-steps; returns the last step's log row."""
    source = rundir.checkpoint_dir(args.out) if state else args.student
    attn = capture.register() if args.method == "molsaki" else "sdpa"
    try:  # a tokenizer larger than the embedding, a --max-length that leaves a task no target
        lm, tok = models.load_model(str(source), attn_implementation=attn)
        feats = features(args, examples, tok, cache)
    except ValueError as e:
        cli.fail(e)
    router = None
    if args.method == "molsaki" and not args.layer_map:
        router = mol.StudentRouter(capture.value_dim(lm.config), lm.config.num_hidden_layers, args.tau2)
    student = Student(lm, router).to(device).train()
    world, rank = dist.get_world_size() if dist.is_initialized() else 1, _rank()
    model = DDP(student) if world > 1 else student  # torch's data parallel: bucketed, overlapped with backward
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / max(1, args.warmup),
                           max(0.0, (args.max_steps - s) / max(1, args.max_steps - args.warmup))))
    step = 0
    if state:
        try:
            step = rundir.restore(state, student, opt, sched)
        except ValueError as e:
            cli.fail(e)
        print(f"[train] resumed from {source} at step {step}")
    del state

    micro = args.batch_size // (world * args.grad_accum)
    log = rundir.open_log(args.out / "log.jsonl", step) if rank == 0 else None
    bar = tqdm(total=args.max_steps, initial=step, desc=args.method, disable=rank != 0)
    row, saved = {}, step
    with rundir.stop_at_step_end(), bar, log or contextlib.nullcontext():
        while step < args.max_steps and not rundir.STOP:
            idx = batch_indices(step, len(feats), args.batch_size, args.seed)
            mine = idx[rank * micro * args.grad_accum:(rank + 1) * micro * args.grad_accum]
            sums, t0 = {}, time.time()
            for m in range(args.grad_accum):  # DDP reduces the gradients in the last backward of the step
                fb = [feats[i] for i in mine[m * micro:(m + 1) * micro]]
                with model.no_sync() if world > 1 and m < args.grad_accum - 1 else contextlib.nullcontext():
                    loss, parts = model(data.collate(fb, tok.pad_token_id), **objective(args))
                    (loss / args.grad_accum).backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0) + v.float() / args.grad_accum
            if world > 1:  # the logged parts are the global batch's; a stop anywhere stops every process
                sums["stop"] = torch.tensor(float(bool(rundir.STOP)), device=device)
                flat = torch.cat([v.flatten() for v in sums.values()])
                dist.all_reduce(flat)
                sums = {k: v.view_as(sums[k]) / world for k, v in zip(sums, flat.split([v.numel() for v in
                                                                                        sums.values()]), strict=True)}
                if sums.pop("stop") > 0 and not rundir.STOP:
                    rundir.STOP.append(signal.SIGTERM)
            if not torch.isfinite(sums["loss"]):  # after the all-reduce, so every process stops
                last = rundir.checkpoint_dir(args.out)
                ids = [feats[i]["id"] for i in idx]
                raise FloatingPointError(f"non-finite loss at step {step + 1}, batch ids {ids}; " + (
                    f"the last good checkpoint is {last}" if last else "no checkpoint was saved before it"))
            torch.nn.utils.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            row = {"step": step, "lr": sched.get_last_lr()[0], "sec": round(time.time() - t0, 3)}
            row.update({k: (v.tolist() if v.dim() else v.item()) for k, v in sums.items()})
            if log:
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix({k: f"{row[k]:.3f}" for k in ("loss", "pre", "exp", "att", "mmi") if k in row})
            if rank == 0 and (step % args.save_every == 0 or step == args.max_steps or rundir.STOP):
                try:
                    rundir.save_checkpoint(args.out, step, student, tok, opt, sched, vars(args))
                except ValueError as e:
                    cli.fail(e)
                saved = step
    if rundir.STOP:
        if rank == 0:
            print(f"\n[train] stopped: step {saved} is saved in {args.out / 'checkpoint'}")
        raise KeyboardInterrupt
    return row


def train(args):
    """Every stage that is not done yet: checks, teacher stage, training, evaluation; returns the last step's log
    row. Rank 0 holds --out's lock throughout."""
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
            rundir.write_run_info(args.out, vars(args), device, state["step"] if state else None)
        examples, cache = teacher_stage(args)
        if _rank() == 0:
            rundir.record_teacher_files(args.out)
        row = fit(args, examples, cache, state, device)
        if _rank() == 0 and args.eval_sets:
            eval_.run(args.out / "checkpoint", args.eval_sets.split(","), args.data_dir,
                      batch_size=args.eval_batch_size, out=args.out, answer_target=args.answer_target)
    return row


def main(argv=None):
    args = flags.parse_args(argv)
    try:
        with rundir.stop_on_signals():
            row = train(args)
    except KeyboardInterrupt:
        signum = rundir.STOP[0] if rundir.STOP else signal.SIGINT
        print(f"[train] interrupted by {signal.Signals(signum).name}; what finished is kept in {args.out}, and the "
              "same command continues it (with --resume once a checkpoint is there)", file=sys.stderr)
        raise SystemExit(128 + signum) from None
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"[train] run directory: {args.out}")
    if args.data == "builtin":
        print("[train] the paper's setting on real data: python train.py --data svamp --rationales palm "
              "--teacher meta-llama/Meta-Llama-3-8B --student gpt2-large")
    return row


if __name__ == "__main__":
    main()
