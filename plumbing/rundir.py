"""What a run directory (train.py's --out) guarantees: one process works in it at a time, and it holds one run. A
fresh start never overwrites a checkpoint; a resume continues the run it finds only with the run's own training
flags and training data (data files, built-in problems, the teacher's rationales and keywords), and adds to the
run's record, run.json, without rewriting it. A checkpoint is written whole or not at all: a crash or a full disk
keeps the previous one. A signal stops where nothing is lost. No paper equation lives here; every error is a
ValueError of one line that names the path and says how to go on, and a trainer state is read with
`weights_only=True`: a file can hold tensors and plain values, never code.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

import data
from plumbing import fetch, files, flags, problems

CHECKPOINTS = ("checkpoint", "checkpoint.old")  # where --resume looks; .old: a crash between the two renames
# Flags that may change on --resume: where the run writes and how often it saves, what it evaluates at the end,
# the teacher's batch and placement, and where the data lives. Every other flag is part of the training it continues.
MAY_DIFFER = {"out", "resume", "overwrite", "save_every", "eval_sets", "eval_batch_size", "teacher_batch_size",
              "teacher_device_map", "data_dir"}
TEACHER_FILES = ("rationales.jsonl", "keywords.jsonl")  # appended by the teacher stage, then reused as they are


@contextlib.contextmanager
def lock(out):
    """Hold `out`/train.lock (an flock, released by the kernel when the process ends, however it ends), creating
    `out`; an --out that cannot be a run directory is a ValueError."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        f = open(out / "train.lock", "a+")
    except OSError as e:
        raise ValueError(_unusable(out, e)) from None
    with f:
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


def _unusable(out: Path, e: OSError) -> str:
    file = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if file is not None:
        return f"--out {out}: {file} is a file, not a folder; choose another --out"
    return f"--out {out} cannot be created or written ({e.filename}: {e.strerror}); choose another --out"


def checkpoint_dir(out) -> Path | None:
    """The checkpoint --resume continues from, or None."""
    for name in CHECKPOINTS:
        if (Path(out) / name / "trainer_state.pt").is_file():
            return Path(out) / name
    return None


def _flag(key):
    return "--" + key.replace("_", "-")


def start(out: Path, run_flags: dict, resume: bool, overwrite: bool) -> dict | None:
    """The trainer state of `out`'s checkpoint with `resume`, else None. A resume must have the run's training
    flags (`run_flags` against the checkpoint's) and its training data (`_check_data`). Without `resume` a
    checkpoint in `out` is an error, or with `overwrite` is removed together with the old run's log and results."""
    found = checkpoint_dir(out)
    if not resume:
        if found and not overwrite:
            raise ValueError(f"{out} holds a checkpoint of an earlier run: continue it with --resume, choose "
                             "another --out, or pass --overwrite to start again")
        if overwrite:
            for name in (*CHECKPOINTS, "checkpoint.tmp"):
                shutil.rmtree(out / name, ignore_errors=True)
            for path in [out / "log.jsonl", *out.glob("eval_*")]:
                path.unlink(missing_ok=True)
        return None
    if found is None:
        raise ValueError(f"--resume: no checkpoint in {out} (train without --resume, or pass the run's --out)")
    state = files.load_torch(found / "trainer_state.pt", "the run cannot continue from it: start it again with "
                             "--overwrite")
    now = {k: str(v) for k, v in run_flags.items()}
    differ = [k for k in sorted(state["args"]) if k in now and k not in MAY_DIFFER and now[k] != state["args"][k]]
    if differ:
        changes = ", ".join(f"{_flag(k)} {state['args'][k]} (now {now[k]})" for k in differ)
        raise ValueError(f"--resume: {out} was trained with other flags: {changes}; resume with the run's "
                         "own flags, or start a new run in another --out")
    _check_data(out, run_flags)
    return state


def _check_data(out: Path, run_flags: dict):
    """Every file run.json records as read by the training (`training_data`, `teacher_files`) has its recorded
    SHA-256 now."""
    path = out / "run.json"
    record = _read_record(path)
    if "training_data" not in record or "teacher_files" not in record:
        raise ValueError(f"--resume: {path} does not record the data the run trained on, so a resume cannot check "
                         "them: start the run again with --overwrite, or in another --out")
    root = fetch.resolve_data_dir(run_flags["data_dir"])

    def places(training: dict, teacher: dict) -> dict[str, str]:  # SHA-256 by the place a user finds the data
        named = {"builtin": f"the built-in problems (--n-train {run_flags['n_train']})"}
        return {**{named.get(k) or str(root / k if k in fetch.FILES else k): v for k, v in training.items()},
                **{str(out / k): v for k, v in teacher.items()}}

    then = places(record["training_data"], record["teacher_files"])
    now = places(training_data(run_flags["data"], run_flags["n_train"], run_flags["data_dir"]), teacher_files(out))
    differ = [f"{where}: SHA-256 {now[where]} now, {sha} when the run started" if where in now else
              f"{where}: missing now (SHA-256 {sha} when the run started)"
              for where, sha in then.items() if now.get(where) != sha]
    if differ:
        raise ValueError(f"--resume: {out} was trained on other data: {'; '.join(differ)}; restore the run's data, "
                         "or start a new run in another --out")


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


def save_checkpoint(out: Path, step: int, student, tok, opt, sched, run_flags: dict):
    """Write `out`/checkpoint atomically: the student LM and tokenizer (`save_pretrained`), and trainer_state.pt
    (router, optimizer, schedule, step, RNG, `run_flags`). A crash mid-write keeps the previous checkpoint; so does
    a write the OS refuses (disk full, quota, read-only), which is a ValueError naming the path and the reason."""
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        torch.save({"router": student.router.state_dict() if student.router else None,
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "args": {k: str(v) for k, v in run_flags.items()}}, tmp / "trainer_state.pt")
    except Exception as e:  # a failed write, or a bug: only the first is the user's to fix
        reason = _write_failure(out, e)
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        kept = checkpoint_dir(out)
        raise ValueError(f"cannot write the checkpoint of step {step} to {tmp}: {reason}; " + (
            f"the last good checkpoint, {kept}, is kept: make room and continue with --resume" if kept else
            "no checkpoint was saved before it: make room and run the command again")) from None
    if final.exists():  # a complete checkpoint: an .old left by an earlier crash is stale
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


FULL = 1 << 20  # bytes: a disk with less free space after a failed write is full


def _write_failure(folder: Path, e: Exception) -> str | None:
    """The OS's reason a write in `folder` failed with `e`, or None when `e` is no failed write: the errno of an
    OSError in its chain (or in safetensors' message); for torch's writer, which keeps no errno ("unexpected pos"),
    what the folder shows now: its disk full, a read-only file system, no write permission."""
    chain, x = [], e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        if isinstance(x, OSError) and x.errno:
            return os.strerror(x.errno)
        code = re.search(r"\(os error (\d+)\)", str(x))  # safetensors: "I/O error: ... (os error 28)"
        if code:
            return os.strerror(int(code.group(1)))
    if not any("inline_container" in str(x) for x in chain):
        return None
    free = shutil.disk_usage(folder).free
    if free < FULL:
        return f"{os.strerror(errno.ENOSPC)} ({free} bytes free)"
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if not os.access(folder, os.W_OK):
        return os.strerror(errno.EACCES)
    return f"torch's writer failed ({str(e).strip().splitlines()[0]}) with {free} bytes free on its disk"


# ---------------------------------------------------------------------------------------------
# run.json: what made the run, written when it starts; a resume adds to it.


def data_files(names: list[str], data_dir) -> dict[str, str]:
    """SHA-256 of the data files of the sets `names` (`fetch.files_of`, by their path in the data directory
    `data_dir`) and of the files of problems among them (by their path)."""
    root = fetch.resolve_data_dir(data_dir) if any(n in data.SPLITS for n in names) else None
    paths = {p: root / p for n in names if n in data.SPLITS for p in fetch.files_of(n)}
    paths.update({n: Path(n) for n in names if n not in data.SPLITS and n != "builtin"})
    return {k: fetch.sha256(p) for k, p in sorted(paths.items()) if p.is_file()}


def training_data(data_name: str, n_train: int, data_dir) -> dict[str, str]:
    """SHA-256 of the training set --data: its files (`data_files`), or for `builtin` its records, the first
    `n_train` built-in problems (train.training_examples reads seed 0) as JSON, since their generator is code."""
    if data_name != "builtin":
        return data_files([data_name], data_dir)
    records = json.dumps(problems.make_problems(n_train, seed=0), sort_keys=True)
    return {"builtin": hashlib.sha256(records.encode()).hexdigest()}


def teacher_files(out: Path) -> dict[str, str]:
    """SHA-256 of the teacher stage's files in `out` (`TEACHER_FILES`), those there."""
    return {name: fetch.sha256(out / name) for name in TEACHER_FILES if (out / name).is_file()}


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


def _json_flags(run_flags: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in run_flags.items()}


def _read_record(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path}, the record of the run, is missing: start the run again with --overwrite, or "
                         "in another --out")
    record = files.read_json(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return record


def _write_record(path: Path, record: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def write_run_info(out: Path, run_flags: dict, device, resumed_at: int | None):
    """`out`/run.json, written atomically once the run's checks have passed. A fresh start (`resumed_at` None)
    writes the run's record: command line, resolved flags (`run_flags`), versions, git commit and whether tracked
    Python files had changes (`git_state`), SHA-256 of the data files of its sets (`data_files`) and of its
    training data (`training_data`), device. A resume at step `resumed_at` appends to its `resumes` when, from which
    command, commit, versions and device, and the flags that changed; the record stays as it is."""
    commit, dirty = git_state(Path(__file__).resolve().parent)
    now = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__},
           "commit": commit, "dirty": dirty,
           "device": f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"}
    path = out / "run.json"
    if resumed_at is None:
        names = flags.set_names(run_flags["data"], run_flags["eval_sets"])
        record = dict(now, args=_json_flags(run_flags), data_files=data_files(names, run_flags["data_dir"]),
                      training_data=training_data(run_flags["data"], run_flags["n_train"], run_flags["data_dir"]))
    else:
        record = _read_record(path)
        changed = {k: v for k, v in _json_flags(run_flags).items() if k != "resume" and record["args"].get(k) != v}
        record.setdefault("resumes", []).append(dict(now, step=resumed_at, changed=changed))
    _write_record(path, record)


def record_teacher_files(out: Path):
    """run.json's `teacher_files`: SHA-256 of the teacher stage's files (`teacher_files`), recorded once, when the
    run's first teacher stage is complete (what it appended until then is the run's data); a resume checks them."""
    path = out / "run.json"
    record = _read_record(path)
    if "teacher_files" not in record:
        _write_record(path, dict(record, teacher_files=teacher_files(out)))


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
