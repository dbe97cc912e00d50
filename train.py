"""Train a student by CoT distillation: L = alpha L_pre + (1 - alpha) L_exp + beta L_att (Eq. 7).

    python train.py --teacher gemma3-270m --student smollm2-135m --data builtin --method molsaki

Stages, each skipped when its output is already in --out: the teacher stage (rationales, CSQA keywords and the
teacher's stepwise attention A_t of Eq. 2, data.py), training (this file), evaluation (eval.py). The flags and
their checks are flags.py's; what a run directory guarantees (lock, resume, signals, run.json) is rundir.py's.

Methods: `vanilla` (L_pre on gold answers), `dss` (beta = 0), `mmi` (the MMI loss), `molsaki` (Eq. 6 with MoL,
Eq. 4/5); `--layer-map T:S` or `last` is the single-layer ablation of Table 2.

One step (`step`, per micro-batch): the answer pass gives L_pre (Eq. 1); the rationale pass gives L_exp and, under
molsaki, the student's stepwise attention A_s and value states through the capture (capture.py), so L_att (Eq. 6)
costs no extra forward; then Eq. 7 and one backward. Both passes' activations are alive until that backward:
--grad-accum splits the batch when they do not fit. Several GPUs (torchrun): `Student`, the LM with its router,
in DistributedDataParallel.

Public functions: `Student`, `step`, `check_inputs`, `teacher_stage`, `batch_indices`, `fit`, `train`, `main`.
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
from plumbing import cli, fetch, flags, models, rundir


class Student(torch.nn.Module):
    """What training updates: the student LM and, under MoL, its router (Eq. 5), in one module so that one DDP
    wrapper reduces both. Its forward is `step`."""

    def __init__(self, lm, router):
        super().__init__()
        self.lm, self.router = lm, router

    def forward(self, args, batch, feats):
        return step(args, self.lm, self.router, batch, feats)


def step(args, lm, router, batch, feats, read_attention=capture.capture):
    """Eq. 7 on one micro-batch: (loss, parts). `loss` carries the graph; `parts` are detached: 'loss', 'pre',
    'exp', 'att', 'mmi' and, under molsaki, the mean 'p_s' and 'no_words' (examples without a step or critical
    word). `read_attention(lm, groups, values=True)` is how A_s and the value states are read during the rationale
    pass: the capture here; eager attention in the benchmark's naive route."""
    device = lm.device
    t = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        pre = lm(t["pre_ids"], attention_mask=t["pre_mask"]).logits  # [B, N, V]
        l_pre = losses.target_cross_entropy(pre, t["pre_labels"])  # Eq. 1
        if args.method == "vanilla":
            return l_pre, {"loss": l_pre.detach(), "pre": l_pre.detach()}
        groups = [f["groups"] for f in feats] if args.method == "molsaki" else None
        with read_attention(lm, groups, values=True) if groups else contextlib.nullcontext() as cap:
            exp = lm(t["exp_ids"], attention_mask=t["exp_mask"]).logits  # [B, N, V]
        l_exp = losses.target_cross_entropy(exp, t["exp_labels"])
        zero = torch.zeros((), device=device)
        parts, extra = {"att": zero, "mmi": zero}, zero
        if args.method == "mmi":
            parts["mmi"] = extra = losses.mmi_loss(pre, t["pre_labels"], exp, t["exp_labels"])
        if groups:
            A_s = cap.stepwise()  # per example [L2, S, W]
            if args.layer_map:
                s = mol.parse_layer_map(args.layer_map, feats[0]["p_t"].shape[0], len(A_s[0]))[1]
                p_s = mol.one_hot_weights(s, len(A_s[0])).to(device).expand(len(feats), -1)
            else:
                p_s = router(cap.value_states(), t["exp_mask"])  # [B, L2], Eq. 5
            pairs = [(f["A_t"].to(device), mol.mix_layers(a, p)) for f, a, p in zip(feats, A_s, p_s, strict=True)]
            parts["att"], used = losses.attention_loss(pairs)  # Eq. 6
            parts["p_s"] = p_s.detach().mean(0)
            parts["no_words"] = torch.tensor(float(len(feats) - used), device=device)
            extra = parts["att"]
        loss = losses.total_loss(l_pre, l_exp, extra, args.alpha, args.beta)  # Eq. 7
    parts.update(loss=loss.detach(), pre=l_pre.detach(), exp=l_exp.detach(), att=parts["att"].detach(),
                 mmi=parts["mmi"].detach())
    return loss, parts


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

    teacher = functools.cache(load_teacher)
    if _rank() != 0:
        dist.barrier()
    try:
        examples = data.training_examples(args, teacher)
        if not examples:
            raise ValueError(f"no training example has a rationale ({args.rationales}): see the counts above")
        cache = data.teacher_cache(args, examples, teacher) if args.method == "molsaki" else None
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


def fit(args, examples, cache, state, device):
    """Train from step 0, or from `state` (--resume), to --max-steps; returns the last step's log row."""
    source = rundir.checkpoint_dir(args.out) if state else args.student
    attn = capture.register() if args.method == "molsaki" else "sdpa"
    lm, tok = models.load_model(str(source), attn_implementation=attn)
    feats = data.features(args, examples, tok, cache, lm.config.num_hidden_layers)
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
                    loss, parts = model(args, data.collate(fb, tok.pad_token_id), fb)
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
            if cache is not None:
                row["p_t"] = torch.stack([feats[i]["p_t"] for i in idx]).mean(0).tolist()  # the global batch
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
