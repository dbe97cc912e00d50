"""What a run directory (train.py's --out) guarantees: one process, one run, nothing lost on a crash or a signal.

No paper equation lives here. train.py calls, in this order:
    lock(out)                          held while the run works: a second process on the same --out is an error;
                                       a lock whose process is gone is taken over (the kernel drops it)
    start(args) -> state | None        the saved trainer state to resume from (--resume), or None for a fresh
                                       start; refuses a fresh start over a checkpoint (unless --overwrite, which
                                       clears the old run) and a --resume whose training flags differ
    write_run_info(args)               --out/run.json: what made the run (`git_state`, `data_files`)
    restore(state, student, opt, sched) -> step    the router, optimizer, schedule and RNG of the saved state
    open_log(path, step) -> file       log.jsonl for appending after `step`
    save_checkpoint(args, step, student, tok, opt, sched)   --out/checkpoint, atomically
    checkpoint_dir(out) -> Path | None the complete checkpoint in `out`
    stop_on_signals(), stop_at_step_end(), STOP    SIGINT and SIGTERM: at once outside the training loop, at the
                                       end of the step inside it (the loop saves, then stops); STOP lists them

Every error is a ValueError of one line that says how to go on. The trainer state is read with
`weights_only=True`: a file can hold tensors and plain values, never code.
"""

import contextlib
import fcntl
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

import data
from plumbing import fetch, files, flags

CHECKPOINTS = ("checkpoint", "checkpoint.old")  # where --resume looks; .old: a crash between the two renames
# Flags that may change on --resume: where the run writes and how often it saves, what it evaluates at the end,
# the teacher's batch and placement, and where the data lives. Every other flag is part of the training it continues.
MAY_DIFFER = {"out", "resume", "overwrite", "save_every", "eval_sets", "eval_batch_size", "teacher_batch_size",
              "teacher_device_map", "data_dir"}


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
    state = files.load_torch(found / "trainer_state.pt", "the run cannot continue from it: start it again with "
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
    rows = files.read_appended(Path(path)) if step else []
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
    return open(path, "a")


def restore(state: dict, student, opt, sched) -> int:
    """Load the saved router (student.router), optimizer, schedule and RNG; returns the step they are at."""
    if student.router is not None:
        saved = set(state["router"] or {})
        if saved != set(student.router.state_dict()):
            raise ValueError(f"--resume: the saved router has parameters {sorted(saved)}, this code's router "
                             f"{sorted(student.router.state_dict())} (Eq. 5 has one bias per layer); start the run "
                             "again with --overwrite")
        student.router.load_state_dict(state["router"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"]


def save_checkpoint(args, step, student, tok, opt, sched):
    """Write --out/checkpoint atomically: the student LM and tokenizer (`save_pretrained`), and trainer_state.pt
    (router, optimizer, schedule, step, RNG, flags). A crash mid-write leaves the previous checkpoint intact."""
    final, tmp, old = args.out / "checkpoint", args.out / "checkpoint.tmp", args.out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    student.lm.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    torch.save({"router": student.router.state_dict() if student.router else None, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "args": {k: str(v) for k, v in vars(args).items()}}, tmp / "trainer_state.pt")
    if final.exists():  # a complete checkpoint: an .old left by an earlier crash is stale
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# run.json: what made the run.


def data_files(args) -> dict[str, str]:
    """SHA-256 of the data files of the run's training and test sets (`fetch.files_of`, in the data directory)
    and of any file of problems it names."""
    names = flags.set_names(args)
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


def write_run_info(args, device):
    """--out/run.json: command line, resolved flags, versions, git commit and whether tracked Python files had
    changes (`git_state`), SHA-256 of the data files (`data_files`), device. Written atomically at every (re)start,
    once the run's checks have passed."""
    commit, dirty = git_state(Path(__file__).resolve().parent)
    info = {"argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "commit": commit, "dirty": dirty, "data_files": data_files(args),
            "device": f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"}
    tmp = args.out / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, args.out / "run.json")


# ---------------------------------------------------------------------------------------------
# Signals: SIGINT (Ctrl-C) and SIGTERM stop a run where nothing is lost.

STOP = []  # the signals received since stop_on_signals began


@contextlib.contextmanager
def _handlers(handler):
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def stop_on_signals():
    """A signal stops at once (KeyboardInterrupt) and is listed in STOP: the stage in progress keeps what it has
    written (rationales row by row, evaluation set by set)."""
    def interrupt(signum, frame):
        STOP.append(signum)
        raise KeyboardInterrupt

    STOP.clear()
    with _handlers(interrupt):
        yield


@contextlib.contextmanager
def stop_at_step_end():
    """Inside the training loop a signal only asks to stop (STOP): the step in progress ends (update, schedule, log
    row), the loop saves it and stops. A second signal stops at once; the last checkpoint stays."""
    def ask(signum, frame):
        STOP.append(signum)
        if len(STOP) > 1:
            raise KeyboardInterrupt
        print("\n[train] stopping after this step (a second Ctrl-C stops now, losing the step)", file=sys.stderr)

    with _handlers(ask):
        yield
