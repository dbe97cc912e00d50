"""What a run directory guarantees (rundir.py, through train.main on tiny models):
- a signal at any point of a step stops the run at that step's end, and --resume continues it to the same run,
  bit for bit on CPU (weights, router, log), a GPT-2 student with dropout included;
- a signal in the teacher stage or in the final evaluation exits with the same status, keeping what finished;
- one process per --out (a lock; a stale one is taken over), one run per --out (no silent restart, no --resume
  with other training flags or other training data: a file of problems, the built-in problems, the teacher's
  rationales), and a record of the run (run.json) that a resume adds to but never rewrites;
- no file that is read can run code or stop the run with a traceback, and an --out that cannot be a run directory
  or a checkpoint the disk refuses is one line, the last good checkpoint kept."""

import errno
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_cli import one_line_error
from tiny_models import tiny_config
from tiny_tokenizers import bytelevel_tokenizer
from transformers import AutoModelForCausalLM

import eval as eval_
import teacher
import train
from plumbing import flags, problems, rundir

ROOT = Path(__file__).resolve().parents[1]


def argv(teacher, student, out, *extra, method="molsaki", steps=6):
    return ["--teacher", teacher, "--student", student, "--data", "builtin", "--n-train", "16", "--batch-size", "4",
            "--max-steps", str(steps), "--lr", "3e-3", "--eval-sets", "", "--method", method, "--save-every", "4",
            "--out", str(out), *extra]


def refused(capsys, cmd, expect):
    """train.main(cmd) exits 2 with one `error:` line containing `expect` (earlier output set aside)."""
    capsys.readouterr()
    one_line_error(capsys, train.main, cmd, expect)


def refused_while_training(capsys, cmd, expect):
    """train.main(cmd) exits 2 with one `error:` line containing `expect`, among the progress bars of training."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main(cmd)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert stop.value.code == 2 and len(errors) == 1 and expect in errors[0] and "Traceback" not in err, err


def read_log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "sec"} for r in rows]


def trainer_state(out):
    return torch.load(Path(out) / "checkpoint" / "trainer_state.pt", weights_only=True)


@pytest.fixture(scope="module")
def dropout_student_dir(tmp_path_factory):
    """GPT-2 with dropout 0.1 everywhere: every training forward draws from the RNG."""
    cfg = tiny_config("gpt2")
    cfg.attn_pdrop = cfg.resid_pdrop = cfg.embd_pdrop = 0.1
    tok = bytelevel_tokenizer()
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2-dropout")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def uninterrupted(tiny_teacher_dir, dropout_student_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train.main(argv(tiny_teacher_dir, dropout_student_dir, out))
    return out


# ---------------------------------------------------------------------------------------------
# 1. A signal anywhere in step 3 stops the run after step 3; --resume then equals the uninterrupted run.

POINTS = {  # where in step 3 the signal arrives: (owner, attribute, before or after the call)
    "forward": (train, "step", "before"),  # before dropout draws
    "backward": (torch.Tensor, "backward", "after"),  # after dropout drew and the gradients are in .grad
    "update": (torch.optim.AdamW, "step", "before"),  # the parameter update
    "schedule": (torch.optim.lr_scheduler.LambdaLR, "step", "after"),
    "row": (torch.optim.lr_scheduler.LambdaLR, "get_last_lr", "before"),  # after step += 1, before the log row
}


def signal_in_step(monkeypatch, out, point, signum, step=3):
    """Send `signum` to this process once, at `point` of training step `step` (the log then has step - 1 rows)."""
    owner, name, when = POINTS[point]
    original, sent = getattr(owner, name), []

    def hooked(*args, **kwargs):
        log = Path(out) / "log.jsonl"
        due = not sent and log.exists() and len(log.read_text().splitlines()) == step - 1
        if due and when == "before":
            sent.append(os.kill(os.getpid(), signum))
        result = original(*args, **kwargs)
        if due and when == "after":
            sent.append(os.kill(os.getpid(), signum))
        return result

    monkeypatch.setattr(owner, name, hooked)
    return sent


@pytest.mark.parametrize("point, signum", [("forward", signal.SIGINT), ("backward", signal.SIGTERM),
                                           ("update", signal.SIGTERM), ("schedule", signal.SIGINT),
                                           ("row", signal.SIGTERM)])
def test_signal_in_a_step_resumes_bit_for_bit(point, signum, uninterrupted, tiny_teacher_dir, dropout_student_dir,
                                              tmp_path, monkeypatch, capsys):
    cmd = argv(tiny_teacher_dir, dropout_student_dir, tmp_path)
    sent = signal_in_step(monkeypatch, tmp_path, point, signum)
    with pytest.raises(SystemExit) as stop:
        train.main(cmd)
    assert sent and stop.value.code == 128 + signum  # 130 for SIGINT, 143 for SIGTERM
    assert "Traceback" not in capsys.readouterr().err
    assert trainer_state(tmp_path)["step"] == 3 and [r["step"] for r in read_log(tmp_path)] == [1, 2, 3]
    monkeypatch.undo()
    train.main([*cmd, "--resume"])

    assert without_time(read_log(tmp_path)) == without_time(read_log(uninterrupted))
    w, w0 = (load_file(Path(d) / "checkpoint" / "model.safetensors") for d in (tmp_path, uninterrupted))
    assert w.keys() == w0.keys() and all(torch.equal(w[k], w0[k]) for k in w)
    r, r0 = trainer_state(tmp_path)["router"], trainer_state(uninterrupted)["router"]
    assert all(torch.equal(r[k], r0[k]) for k in r0)


def test_signal_in_teacher_stage_and_in_evaluation(tiny_teacher_dir, tiny_student_dir, tmp_path, monkeypatch, capsys):
    cmd = argv(tiny_teacher_dir, tiny_student_dir, tmp_path, steps=2)
    build = teacher.build_attention_cache

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(*args, **kwargs)

    monkeypatch.setattr(teacher, "build_attention_cache", killed)
    with pytest.raises(SystemExit) as stop:
        train.main(cmd)
    err = capsys.readouterr().err
    assert stop.value.code == 143 and "Traceback" not in err and "interrupted by SIGTERM" in err
    assert not (tmp_path / "teacher_cache.pt").exists() and not (tmp_path / "checkpoint").exists()
    monkeypatch.undo()

    # The evaluation at the end: the signal arrives while the second set is scored; the first set's file stays.
    sets = []
    for name in ("first", "second"):
        sets.append(tmp_path / f"{name}.jsonl")
        sets[-1].write_text("".join(json.dumps({"question": f"What is {k} plus 1?", "answer": k + 1}) + "\n"
                                    for k in range(3)))
    cmd = [*cmd, "--eval-sets", ",".join(map(str, sets))]
    evaluate, calls = eval_.evaluate, []

    def second_killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(eval_, "evaluate", second_killed)
    with pytest.raises(SystemExit) as stop:
        train.main(cmd)
    assert stop.value.code == 143 and "Traceback" not in capsys.readouterr().err
    assert (tmp_path / "eval_first_answer.jsonl").is_file() and not (tmp_path / "eval_second_answer.jsonl").exists()
    assert trainer_state(tmp_path)["step"] == 2
    train.main([*cmd, "--resume"])  # continues: the evaluation of the missing set only
    assert calls == [1, 1, 1]
    assert json.loads((tmp_path / "eval_answer.json").read_text()).keys() == {"first", "second"}


# ---------------------------------------------------------------------------------------------
# 2. One process per run directory.


def test_second_process_on_one_out_is_refused_and_a_stale_lock_taken_over(tiny_teacher_dir, tiny_student_dir,
                                                                           tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom plumbing import rundir\nwith rundir.lock(sys.argv[1]):\n"
         "    print('held', flush=True)\n    time.sleep(120)", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(capsys, argv(tiny_teacher_dir, tiny_student_dir, tmp_path, steps=2),
                       f"{tmp_path} is in use by another train.py (pid {holder.pid})")
        assert not (tmp_path / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "train.lock").read_text().strip() == str(holder.pid)  # left behind by the killed process
    train.main(argv(tiny_teacher_dir, tiny_student_dir, tmp_path, steps=2))
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]


# ---------------------------------------------------------------------------------------------
# 3. One run per run directory: no silent restart, no resume with other training flags.


def test_same_command_again_is_refused_until_resume_or_overwrite(tiny_teacher_dir, tiny_student_dir, tmp_path,
                                                                 capsys):
    cmd = argv(tiny_teacher_dir, tiny_student_dir, tmp_path, method="dss", steps=2)
    train.main(cmd)
    (tmp_path / "eval_builtin_answer.jsonl").write_text("{}\n")  # a result of the first run
    before = (tmp_path / "checkpoint" / "model.safetensors").read_bytes(), (tmp_path / "log.jsonl").read_text()
    refused(capsys, cmd, f"{tmp_path} holds a checkpoint of an earlier run: continue it with "
                                            "--resume, choose another --out, or pass --overwrite")
    assert ((tmp_path / "checkpoint" / "model.safetensors").read_bytes(), (tmp_path / "log.jsonl").read_text()) \
        == before
    train.main([*cmd, "--overwrite"])
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    assert not (tmp_path / "eval_builtin_answer.jsonl").exists()
    refused(capsys, [*cmd, "--overwrite", "--resume"], "pass one")


def test_resume_with_other_training_flags_is_refused(tiny_teacher_dir, tiny_student_dir, tmp_path, capsys):
    cmd = argv(tiny_teacher_dir, tiny_student_dir, tmp_path, steps=2)
    train.main(cmd)
    run_json = (tmp_path / "run.json").read_text()
    changed = [*cmd, "--resume", "--lr", "1e-3", "--beta", "2", "--max-steps", "4", "--seed", "1"]
    refused(capsys, changed,
                   f"--resume: {tmp_path} was trained with other flags: --beta 1.0 (now 2.0), --lr 0.003 (now 0.001), "
                   "--max-steps 2 (now 4), --seed 0 (now 1)")
    refused(capsys, [*cmd, "--resume", "--method", "dss"], "--method molsaki (now dss)")
    assert (tmp_path / "run.json").read_text() == run_json  # written only once the checks pass
    # What does not change training may: how often it saves, what it evaluates at the end.
    train.main([*cmd, "--resume", "--save-every", "1", "--eval-sets", ""])
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["args"]["save_every"] == 4 and record["resumes"][0]["changed"] == {"save_every": 1}


# ---------------------------------------------------------------------------------------------
# 4. Files that are read: no code runs, a damaged one is one line.


class CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def test_trainer_state_runs_no_code_and_damage_is_one_line(tiny_teacher_dir, tiny_student_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cmd = argv(tiny_teacher_dir, tiny_student_dir, out, method="dss", steps=2)
    train.main(cmd)
    path = out / "checkpoint" / "trainer_state.pt"
    good = path.read_bytes()
    state = torch.load(path, weights_only=True)
    torch.save(dict(state, extra=CreatesAFile(tmp_path / "pwned")), path)
    refused(capsys, [*cmd, "--resume"], f"{path} cannot be read")
    assert not (tmp_path / "pwned").exists()
    path.write_bytes(good[: len(good) // 2])  # cut short, as by a full disk
    refused(capsys, [*cmd, "--resume"], f"{path} cannot be read")


def test_log_cut_mid_line_is_repaired_on_resume(tiny_teacher_dir, tiny_student_dir, tmp_path):
    cmd = argv(tiny_teacher_dir, tiny_student_dir, tmp_path, method="dss", steps=2)
    train.main(cmd)
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a hard kill in the middle of a row the checkpoint never saw
    train.main([*cmd, "--resume"])
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]


def test_lock_is_released_on_exit(tmp_path):
    with rundir.lock(tmp_path):
        pass
    with rundir.lock(tmp_path):  # not held any more: a second lock in the same process succeeds
        pass


# ---------------------------------------------------------------------------------------------
# 5. A resume never changes what a run is: the training data are the run's, and run.json keeps the run's record.


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_problems(path, n=8):
    path.write_text("".join(json.dumps({"question": f"What is {k} plus 3?", "answer": k + 3}) + "\n"
                            for k in range(n)))
    return path.read_bytes()


def test_resume_refuses_an_edited_file_of_problems_and_keeps_the_record(tiny_teacher_dir, tiny_student_dir, tmp_path,
                                                                          capsys):
    mine, out = tmp_path / "mine.jsonl", tmp_path / "run"
    original = write_problems(mine)
    cmd = [*argv(tiny_teacher_dir, tiny_student_dir, out, method="vanilla", steps=2), "--data", str(mine)]
    train.main(cmd)
    record = json.loads((out / "run.json").read_text())
    assert record["training_data"] == {str(mine): sha256(original)} and record["teacher_files"] == {}
    assert "resumes" not in record

    edited = original.replace(b'"answer": 3}', b'"answer": 4}', 1)  # the first problem's answer
    assert edited != original
    mine.write_bytes(edited)
    refused(capsys, [*cmd, "--resume"], f"--resume: {out} was trained on other data: {mine}: SHA-256 "
                                        f"{sha256(edited)} now, {sha256(original)} when the run started")
    assert json.loads((out / "run.json").read_text()) == record
    mine.write_bytes(original)
    train.main([*cmd, "--resume", "--save-every", "1"])
    resumed = json.loads((out / "run.json").read_text())
    assert {k: resumed[k] for k in record} == record  # every field of the run's own record, as it was
    (entry,) = resumed["resumes"]
    assert entry["step"] == 2 and entry["changed"] == {"save_every": 1}
    assert entry["argv"] == sys.argv and entry["commit"] == rundir.git_state(ROOT)[0]  # in process: pytest's


def test_resume_refuses_other_builtin_problems(tiny_teacher_dir, tiny_student_dir, tmp_path, capsys, monkeypatch):
    """The built-in problems come from code: a changed generator changes the run's data."""
    cmd = argv(tiny_teacher_dir, tiny_student_dir, tmp_path, method="dss", steps=2)
    train.main(cmd)
    made = problems.make_problems(16, seed=0)
    then = sha256(json.dumps(made, sort_keys=True).encode())
    assert json.loads((tmp_path / "run.json").read_text())["training_data"] == {"builtin": then}

    changed = [dict(made[0], answer="999"), *made[1:]]
    monkeypatch.setattr(problems, "make_problems", lambda n, seed=0: [dict(r) for r in changed][:n])
    refused(capsys, [*cmd, "--resume"], f"the built-in problems (--n-train 16): SHA-256 "
                                        f"{sha256(json.dumps(changed, sort_keys=True).encode())} now, {then} when")


def test_resume_refuses_edited_teacher_rationales_but_not_what_the_teacher_stage_appended(
        tiny_teacher_dir, tiny_student_dir, tmp_path, capsys):
    """Two problems have a kept rationale from before; the teacher stage appends its attempts at the other two (the
    tiny random teacher answers wrong: phase 1, then phase 2). What it appended is the run's; an edit after is not."""
    mine, out = tmp_path / "mine.jsonl", tmp_path / "run"
    write_problems(mine, n=4)
    out.mkdir()
    kept = [{"id": f"mine-{k}", "rationale": f"{k} plus 3 is {k + 3}.", "statement": f"The answer is {k + 3}.",
             "phase": 1, "teacher_answer": str(k + 3), "correct": True} for k in (0, 1)]
    (out / "rationales.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    cmd = [*argv(tiny_teacher_dir, tiny_student_dir, out, method="dss", steps=2), "--data", str(mine),
           "--rationales", "teacher", "--teacher-batch-size", "2"]
    train.main(cmd)
    rationales = (out / "rationales.jsonl").read_bytes()
    assert len(rationales.splitlines()) == 2 + 2 * 2  # the kept two, and two attempts at each other problem
    record = json.loads((out / "run.json").read_text())
    assert record["teacher_files"] == {"rationales.jsonl": sha256(rationales)}

    train.main([*cmd, "--resume"])  # nothing edited: the resume runs (at its last step already)
    assert (out / "rationales.jsonl").read_bytes() == rationales
    edited = rationales.replace(b"0 plus 3 is 3.", b"0 plus 3 is 4.")
    (out / "rationales.jsonl").write_bytes(edited)
    refused(capsys, [*cmd, "--resume"], f"{out / 'rationales.jsonl'}: SHA-256 {sha256(edited)} now, "
                                        f"{sha256(rationales)} when the run started")
    (out / "rationales.jsonl").unlink()  # the teacher would make new ones
    refused(capsys, [*cmd, "--resume"], f"{out / 'rationales.jsonl'}: missing now (SHA-256 {sha256(rationales)} "
                                        "when the run started)")
    assert {k: v for k, v in json.loads((out / "run.json").read_text()).items() if k != "resumes"} == record


def test_run_record_from_explicit_parameters(tmp_path):
    """The run-directory functions take the run directory, a dict of the run's flags and booleans, no namespace:
    a fresh start writes the record, the teacher files are recorded once, a resume appends and rewrites nothing."""
    out = tmp_path / "run"
    out.mkdir()
    run_flags = vars(flags.parse_args(["--data", "builtin", "--n-train", "8", "--eval-sets", "", "--out", str(out)]))
    assert rundir.start(out, run_flags, resume=False, overwrite=False) is None
    rundir.write_run_info(out, run_flags, torch.device("cpu"), None)
    (out / "rationales.jsonl").write_text('{"id": "a"}\n')
    rundir.record_teacher_files(out)
    record = json.loads((out / "run.json").read_text())
    assert record["training_data"] == {
        "builtin": sha256(json.dumps(problems.make_problems(8, seed=0), sort_keys=True).encode())}
    assert record["teacher_files"] == {"rationales.jsonl": sha256(b'{"id": "a"}\n')}
    assert record["args"] == {k: str(v) if k == "out" else v for k, v in run_flags.items()}

    with open(out / "rationales.jsonl", "a") as f:
        f.write('{"id": "b"}\n')
    rundir.record_teacher_files(out)  # recorded already: kept as it was
    rundir.write_run_info(out, dict(run_flags, resume=True, eval_batch_size=2), torch.device("cpu"), 3)
    resumed = json.loads((out / "run.json").read_text())
    assert {k: resumed[k] for k in record} == record
    assert [(r["step"], r["changed"]) for r in resumed["resumes"]] == [(3, {"eval_batch_size": 2})]

    # start with resume: the checkpoint's flags and run.json's record of the data, which must be there.
    (out / "checkpoint").mkdir()
    torch.save({"args": {k: str(v) for k, v in run_flags.items()}}, out / "checkpoint" / "trainer_state.pt")
    (out / "rationales.jsonl").write_text('{"id": "a"}\n')
    assert rundir.start(out, dict(run_flags, resume=True), resume=True, overwrite=False)["args"]["n_train"] == "8"
    (out / "run.json").write_text(json.dumps({k: v for k, v in resumed.items() if k != "teacher_files"}))
    with pytest.raises(ValueError, match="run.json does not record the data the run trained on"):
        rundir.start(out, dict(run_flags, resume=True), resume=True, overwrite=False)
    (out / "run.json").unlink()
    with pytest.raises(ValueError, match="run.json, the record of the run, is missing"):
        rundir.start(out, dict(run_flags, resume=True), resume=True, overwrite=False)


# ---------------------------------------------------------------------------------------------
# 6. Every bad path and every refused write is one line.


def os_reason(action, path):
    """What the OS says when `action(path)` fails: the oracle of the error line."""
    with pytest.raises(OSError) as e:
        action(path)
    return f"({e.value.filename}: {e.value.strerror})"


def test_out_that_cannot_be_a_run_directory_is_one_line(tiny_teacher_dir, tiny_student_dir, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    cases = [(a_file, f"--out {a_file}: {a_file} is a file, not a folder; choose another --out"),
             (a_file / "run", f"--out {a_file / 'run'}: {a_file} is a file, not a folder; choose another --out")]
    if Path("/sys/kernel").is_dir() and Path("/proc/self").is_dir():  # Linux: places nobody can write
        nowhere = Path("/proc/molsaki-no-such-folder/run")
        cases.append((nowhere, f"--out {nowhere} cannot be created or written "
                               f"{os_reason(lambda p: p.mkdir(parents=True), nowhere)}"))
        sysfs = Path("/sys/molsaki-run")
        cases.append((sysfs, f"--out {sysfs} cannot be created or written {os_reason(Path.mkdir, sysfs)}"))
        locked = Path("/sys/kernel")  # exists, but the lock file cannot be created in it
        cases.append((locked, f"--out {locked} cannot be created or written "
                               f"{os_reason(lambda p: open(p / 'train.lock', 'a+'), locked)}"))
    for out, expect in cases:
        refused(capsys, argv(tiny_teacher_dir, tiny_student_dir, out, steps=2), expect)
    assert a_file.read_text() == "not a folder\n"


TORCH_WRITER = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"  # torch.save on a full disk


@pytest.mark.parametrize("failure", ["errno", "torch"])
def test_failed_checkpoint_write_is_one_line_and_the_last_checkpoint_resumes(failure, uninterrupted, tiny_teacher_dir,
                                                                            dropout_student_dir, tmp_path,
                                                                            monkeypatch, capsys):
    """The disk fills while step 6 is saved (the checkpoint of step 4 is there): with an OSError, or with torch's
    writer error, which keeps no errno (the disk then shows no free space). One line; checkpoint 4 stays, and
    --resume from it equals the uninterrupted run."""
    cmd = argv(tiny_teacher_dir, dropout_student_dir, tmp_path)
    save, saves = torch.save, []

    def disk_full_at_step_6(obj, path, *args, **kwargs):
        if Path(path).name == "trainer_state.pt":
            saves.append(obj["step"])
            if obj["step"] == 6:
                Path(path).write_bytes(b"PK\x03\x04 cut short")
                if failure == "errno":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=0))
                raise RuntimeError(TORCH_WRITER)
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_6)
    expect = (f"cannot write the checkpoint of step 6 to {tmp_path / 'checkpoint.tmp'}: No space left on device"
              + ("" if failure == "errno" else " (0 bytes free)")
              + f"; the last good checkpoint, {tmp_path / 'checkpoint'}, is kept: make room and continue with --resume")
    refused_while_training(capsys, cmd, expect)
    assert saves == [4, 6] and trainer_state(tmp_path)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]

    monkeypatch.undo()  # room again
    train.main([*cmd, "--resume"])
    assert without_time(read_log(tmp_path)) == without_time(read_log(uninterrupted))
    w, w0 = (load_file(Path(d) / "checkpoint" / "model.safetensors") for d in (tmp_path, uninterrupted))
    assert w.keys() == w0.keys() and all(torch.equal(w[k], w0[k]) for k in w)


class Raises:
    """A student or tokenizer whose save_pretrained raises `error` after writing a file into the folder."""

    def __init__(self, error):
        self.lm, self.router, self.error = self, None, error

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"cut")
        raise self.error


def test_write_reasons_from_safetensors_and_bugs_keep_their_traceback(tmp_path):
    """safetensors says the errno in its message; an error that is no failed write (a bug) is raised as it is.
    Either way the half-written folder is removed and the checkpoint there is kept."""
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer_state.pt").write_bytes(b"step 4")
    full = Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # SafetensorError
    with pytest.raises(ValueError, match=re.escape(f"to {tmp_path / 'checkpoint.tmp'}: No space left on device; the "
                                                   f"last good checkpoint, {tmp_path / 'checkpoint'}, is kept")):
        rundir.save_checkpoint(tmp_path, 6, Raises(full), None, None, None, {})
    bug = TypeError("cannot pickle 'generator' object")
    with pytest.raises(TypeError) as raised:
        rundir.save_checkpoint(tmp_path, 6, Raises(bug), None, None, None, {})
    assert raised.value is bug
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert (tmp_path / "checkpoint" / "trainer_state.pt").read_bytes() == b"step 4"
