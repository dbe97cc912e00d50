"""What a run directory guarantees (rundir.py, through train.main on tiny models):
- a signal at any point of a step stops the run at that step's end, and --resume continues it to the same run,
  bit for bit on CPU (weights, router, log), a GPT-2 student with dropout included;
- a signal in the teacher stage or in the final evaluation exits with the same status, keeping what finished;
- one process per --out (a lock; a stale one is taken over), one run per --out (no silent restart, no --resume
  with other training flags), and no file that is read can run code or stop the run with a traceback."""

import json
import os
import pathlib
import signal
import subprocess
import sys
from pathlib import Path

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
from plumbing import rundir

ROOT = Path(__file__).resolve().parents[1]


def argv(teacher, student, out, *extra, method="molsaki", steps=6):
    return ["--teacher", teacher, "--student", student, "--data", "builtin", "--n-train", "16", "--batch-size", "4",
            "--max-steps", str(steps), "--lr", "3e-3", "--eval-sets", "", "--method", method, "--save-every", "4",
            "--out", str(out), *extra]


def refused(capsys, cmd, expect):
    """train.main(cmd) exits 2 with one `error:` line containing `expect` (earlier output set aside)."""
    capsys.readouterr()
    one_line_error(capsys, train.main, cmd, expect)


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
    assert json.loads((tmp_path / "run.json").read_text())["args"]["save_every"] == 1


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
