"""What a run directory (train.py's --out) guarantees: one process, one run, nothing lost on a crash.

No paper equation lives here. train.py calls, in this order:
    lock(out)                          held while the run works: a second process on the same --out is an error;
                                       a lock whose process is gone is taken over (the kernel drops it)
    start(args) -> state | None        the saved trainer state to resume from (--resume), or None for a fresh
                                       start; refuses a fresh start over a checkpoint (unless --overwrite, which
                                       clears the old run) and a --resume whose training flags differ
    open_log(path, step) -> file       log.jsonl for appending after `step`
    save_checkpoint(args, step, student, tok, router, opt, sched)   --out/checkpoint, atomically
    checkpoint_dir(out) -> Path | None the complete checkpoint in `out`

Every error is a ValueError of one line that says how to go on. The trainer state is read with
`weights_only=True`: a file can hold tensors and plain values, never code.
"""

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

import torch

import data

CHECKPOINTS = ("checkpoint", "checkpoint.old")  # where --resume looks; .old: a crash between the two renames
# Flags that may change on --resume: where the run writes and how often it saves, what it evaluates at the end,
# the teacher's batch and where the data lives. Every other flag is part of the training it continues.
MAY_DIFFER = {"out", "resume", "overwrite", "save_every", "eval_sets", "eval_batch_size", "teacher_batch_size",
              "data_dir"}


@contextlib.contextmanager
def lock(out):
    """Hold `out`/train.lock (an flock, released by the kernel when the process ends, however it ends)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ValueError(f"{out} is in use by another train.py (pid {f.read().strip() or '?'}): wait for it "
                             "to end, or choose another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def checkpoint_dir(out) -> Path | None:
    """The checkpoint --resume continues from, or None."""
    for name in CHECKPOINTS:
        if (Path(out) / name / "trainer_state.pt").is_file():
            return Path(out) / name
    return None


def _flag(key):
    return "--" + key.replace("_", "-")


def start(args) -> dict | None:
    """The trainer state of --out's checkpoint with --resume (after checking that the training flags are the
    saved ones), else None. Without --resume a checkpoint in --out is an error, or with --overwrite is removed
    together with the old run's log and results."""
    found = checkpoint_dir(args.out)
    if not args.resume:
        if found and not args.overwrite:
            raise ValueError(f"{args.out} holds a checkpoint of an earlier run: continue it with --resume, choose "
                             "another --out, or pass --overwrite to start again")
        if args.overwrite:
            for name in (*CHECKPOINTS, "checkpoint.tmp"):
                shutil.rmtree(args.out / name, ignore_errors=True)
            for path in [args.out / "log.jsonl", *args.out.glob("eval_*")]:
                path.unlink(missing_ok=True)
        return None
    if found is None:
        raise ValueError(f"--resume: no checkpoint in {args.out} (train without --resume, or pass the run's --out)")
    state = data.load_torch(found / "trainer_state.pt", "the run cannot continue from it: start it again with "
                            "--overwrite")
    now = {k: str(v) for k, v in vars(args).items()}
    differ = [k for k in sorted(state["args"]) if k in now and k not in MAY_DIFFER and now[k] != state["args"][k]]
    if differ:
        changes = ", ".join(f"{_flag(k)} {state['args'][k]} (now {now[k]})" for k in differ)
        raise ValueError(f"--resume: {args.out} was trained with other flags: {changes}; resume with the run's "
                         "own flags, or start a new run in another --out")
    return state


def open_log(path, step):
    """The step log, for appending after `step`: rows of later steps (written after the checkpoint) and a last
    line cut by a hard kill are dropped; a fresh start (step 0) empties it."""
    rows = data.read_appended(Path(path)) if step else []
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
    return open(path, "a")


def save_checkpoint(args, step, student, tok, router, opt, sched):
    """Write --out/checkpoint atomically: a crash mid-write leaves the previous one intact."""
    final, tmp, old = args.out / "checkpoint", args.out / "checkpoint.tmp", args.out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save({"router": router.state_dict() if router else None, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "args": {k: str(v) for k, v in vars(args).items()}}, tmp / "trainer_state.pt")
    if final.exists():  # a complete checkpoint: an .old left by an earlier crash is stale
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
