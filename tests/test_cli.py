"""Every mistake a user can make on the command line of train.py and eval.py gets one line on stderr,
`error: <what and how to fix>`, and exit status 2, with no traceback, before any model is loaded when the flags
alone show it (layer ranges right after the two configs are read). A few cases run as real processes."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import eval as eval_
import train
from plumbing import flags, models

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys, main, argv, expect):
    """main(argv) exits with status 2 and prints exactly one line, `error: ...` containing `expect`."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert "Traceback" not in err


@pytest.fixture
def no_model_loads(monkeypatch, tmp_path_factory):
    """As on a new machine: an empty model cache (the packaged models would be converted first), and neither a
    conversion nor a model load may happen before the flags and files are checked."""
    def refuse(*args, **kwargs):
        raise AssertionError("no model may be converted or loaded before the flags and files are checked")

    monkeypatch.setenv("MOLSAKI_CACHE", str(tmp_path_factory.mktemp("empty-model-cache")))
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "_convert", refuse)


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "Q1?", "answer": "3"}\n{"question": "Q2?", "answer": "three"}\n')
    return path


FLAG_CASES = [  # (argv, what the line says): the flags alone show it
    (["--data", "nosuch"], "neither a training set"),
    (["--eval-sets", "svamp,nosuch"], "unknown test set 'nosuch'"),
    (["--layer-map", "3-4"], "--layer-map: layer map '3-4': expected 'T:S'"),
    (["--layer-map", "1:1", "--method", "dss"], "--layer-map needs --method molsaki"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--batch-size", "6", "--grad-accum", "4"], "must be divisible by processes (1) x --grad-accum (4)"),
    (["--max-steps", "0"], "--max-steps must be at least 1"),
    (["--alpha", "1.5"], "--alpha must lie in [0, 1]"),
    (["--beta", "-1"], "--beta must not be negative"),
    (["--tau2", "0"], "--tau1 and --tau2 must be positive"),
    (["--rationales", "palm", "--data", "gsm8k"], "PaLM rationales exist for --data svamp and csqa only"),
    (["--rationales", "builtin", "--data", "svamp"], "--rationales builtin needs --data builtin"),
    (["--method", "bogus"], "invalid choice: 'bogus'"),
    (["--nope"], "unrecognized arguments: --nope"),
    (["--max-steps", "x"], "invalid int value: 'x'"),
    *(([flag, "nan"], f"{flag} must be a finite number, got nan")
      for flag in ("--lr", "--alpha", "--beta", "--tau1", "--tau2", "--weight-decay", "--max-grad-norm")),
    (["--weight-decay", "-1"], "--weight-decay must not be negative, got -1.0"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be positive, got -1.0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be positive, got 0.0"),
    (["--delimiters", ""], "--delimiters must name at least one character"),
    (["--resume", "--overwrite"], "--resume continues the run in --out, --overwrite starts it again: pass one"),
]


@pytest.mark.parametrize("argv, expect", FLAG_CASES)
def test_train_flag_mistakes(argv, expect, capsys, no_model_loads, tmp_path):
    one_line_error(capsys, train.main, [*argv, "--out", str(tmp_path / "run")], expect)


def test_train_resume_without_checkpoint(capsys, no_model_loads, tmp_path):
    one_line_error(capsys, train.main, ["--resume", "--out", str(tmp_path)], f"--resume: no checkpoint in {tmp_path}")


def test_train_bad_data_file(capsys, no_model_loads, bad_file, tmp_path):
    one_line_error(capsys, train.main, ["--data", str(bad_file), "--out", str(tmp_path)],
                   f"{bad_file}, line 2: malformed record")
    one_line_error(capsys, train.main, ["--eval-sets", str(bad_file), "--data", "builtin", "--out", str(tmp_path),
                                        "--method", "dss"], "line 2: malformed record")


def test_train_layer_map_out_of_range_after_configs(capsys, no_model_loads, tiny_teacher_dir, tiny_student_dir,
                                                    tmp_path):
    """The tiny teacher has 3 layers: 4:1 is out of range, found from the configs before the teacher runs."""
    argv = ["--teacher", tiny_teacher_dir, "--student", tiny_student_dir, "--layer-map", "4:1", "--out", str(tmp_path)]
    one_line_error(capsys, train.main, argv, "teacher layer 4 outside the valid range 1..3")
    argv[-3] = "1:9"
    one_line_error(capsys, train.main, argv, "student layer 9 outside the valid range 1..3")


def test_not_a_model_folder(capsys, no_model_loads, tiny_teacher_dir, tmp_path):
    one_line_error(capsys, train.main, ["--teacher", tiny_teacher_dir, "--student", str(tmp_path), "--out",
                                        str(tmp_path / "run")], "is a folder but not a model folder (no config.json)")
    one_line_error(capsys, eval_.main, ["--checkpoint", str(tmp_path), "--sets", "builtin"],
                   "is a folder but not a model folder")


@pytest.mark.parametrize("argv, expect", [
    (["--sets", "nosuch"], "unknown test set 'nosuch'"),
    (["--sets", ""], "no test set given"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--mode", "rationale"], "invalid choice: 'rationale'"),
])
def test_eval_flag_mistakes(argv, expect, capsys, no_model_loads):
    one_line_error(capsys, eval_.main, ["--checkpoint", "runs/x/checkpoint", *argv], expect)


def test_eval_bad_set_file(capsys, no_model_loads, tiny_student_dir, bad_file):
    one_line_error(capsys, eval_.main, ["--checkpoint", tiny_student_dir, "--sets", f"builtin,{bad_file}"],
                   "line 2: malformed record")


def _dead_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(script, *argv, **env):
    """The script as a user runs it: a new process, its exit status and stderr."""
    proc = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return proc.returncode, proc.stderr


def test_processes_print_one_line(tmp_path, tiny_student_dir):
    """Through real processes: a model name that is no folder, packaged name or reachable hub id (the hub offline),
    and data that is missing and cannot be fetched (an empty data directory, a dead server)."""
    code, err = run_cli("eval.py", "--checkpoint", "no-such-model-xyz", "--sets", "builtin", HF_HUB_OFFLINE="1")
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines() == [err.strip()] and err.startswith(
        "error: model 'no-such-model-xyz' is neither a model folder, a packaged name")
    empty = tmp_path / "data"
    empty.mkdir()
    code, err = run_cli("eval.py", "--checkpoint", tiny_student_dir, "--sets", "svamp", MOLSAKI_DATA=str(empty),
                        MOLSAKI_DATA_URL=f"http://127.0.0.1:{_dead_port()}")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: data file svamp/distilling_step_by_step/") and f"is missing from {empty}" in err
    assert "python -m plumbing.fetch svamp" in err and "--data-dir" in err


def test_train_data_missing_and_not_fetchable(capsys, no_model_loads, tiny_student_dir, tmp_path, monkeypatch):
    """train.py checks its data before the teacher pass: an empty data directory and a dead server, one line."""
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.setenv("MOLSAKI_DATA_URL", f"http://127.0.0.1:{_dead_port()}")
    one_line_error(capsys, train.main, ["--data", "svamp", "--rationales", "palm", "--method", "dss", "--student",
                                        tiny_student_dir, "--data-dir", str(empty), "--out", str(tmp_path / "run")],
                   "python -m plumbing.fetch svamp --data-dir")
    assert not any(p.is_file() for p in empty.rglob("*"))  # nothing half-written


def stops_with_error(capsys, argv, expect, main=train.main):
    """main(argv), past its progress bars, exits 2 with an `error:` line containing `expect`, no traceback; returns
    what it printed on stdout."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: ") and expect in err.strip().splitlines()[-1], err
    return out


def test_train_stage_problems_are_one_line(capsys, tiny_teacher_dir, tiny_student_dir, tmp_path):
    """Found once the teacher stage runs: no item kept a rationale, and a teacher cache built for another run."""
    problems = tmp_path / "hard.jsonl"  # the tiny random teacher answers none of them: no rationale is kept
    problems.write_text("".join(f'{{"question": "What is {k} times 7919?", "answer": {7919 * k}}}\n' for k in (3, 5)))
    common = ["--teacher", tiny_teacher_dir, "--student", tiny_student_dir, "--eval-sets", "", "--max-steps", "1",
              "--batch-size", "2"]
    stops_with_error(capsys, [*common, "--data", str(problems), "--out", str(tmp_path / "a")],
                   "no training example has a rationale (teacher)")
    train.main([*common, "--n-train", "2", "--out", str(tmp_path / "b")])
    (tmp_path / "c").mkdir()
    shutil.copy(tmp_path / "b" / "teacher_cache.pt", tmp_path / "c")
    capsys.readouterr()
    stops_with_error(capsys, [*common, "--n-train", "2", "--delimiters", ".!", "--out", str(tmp_path / "c")],
                   "teacher_cache.pt was built for another run (differs in: delimiters)")


@pytest.mark.parametrize("data", ["builtin", "gsm8k", "csqa", "file"])
def test_train_answer_target_equation_needs_svamp(data, capsys, no_model_loads, tmp_path):
    """DSS's equations exist for SVAMP only: --answer-target equation with other training data is one line."""
    if data == "file":
        data = str(tmp_path / "mine.jsonl")
        Path(data).write_text('{"question": "Q1?", "answer": "3"}\n')
    one_line_error(capsys, train.main, ["--answer-target", "equation", "--data", data, "--out", str(tmp_path / "run")],
                   f"--answer-target equation: equations (DSS's labels) exist for --data svamp only, not {data!r}")


def test_train_answer_target_flag():
    assert flags.parse_args([]).answer_target == "number"
    assert flags.parse_args(["--data", "svamp", "--answer-target", "equation"]).answer_target == "equation"
    assert flags.parse_args(["--data", "svamp", "--answer-target", "number"]).answer_target == "number"


@pytest.mark.parametrize("argv, expect", [
    (["--answer-target", "equation", "--mode", "cot"], "--answer-target equation is read in --mode answer only"),
    (["--answer-target", "sum"], "invalid choice: 'sum'"),
])
def test_eval_answer_target_mistakes(argv, expect, capsys, no_model_loads):
    one_line_error(capsys, eval_.main, ["--checkpoint", "runs/x/checkpoint", *argv], expect)


def outgrow_embeddings(folder):
    """The weights in `folder` cut to 3 embedding rows fewer than its tokenizer's vocabulary (as another model's
    tokenizer beside them would be); returns (tokens, rows), the tokens counted in tokenizer.json's vocabulary."""
    tokens = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(tokens - 3)
    model.save_pretrained(folder)
    return tokens, json.loads((folder / "config.json").read_text())["vocab_size"]


def test_a_tokenizer_larger_than_the_embedding_is_one_line(capsys, tiny_student_dir, tmp_path):
    """A checkpoint whose tokenizer's vocabulary has more tokens than its embedding has rows is refused when it
    loads, naming both sizes: by eval.py, by train.py as --student, and by train.py --resume as the run's checkpoint.
    (The tiny student has fewer tokens than rows, a padded vocabulary, and trains.)"""
    bad = shutil.copytree(tiny_student_dir, tmp_path / "bad")
    tokens, rows = outgrow_embeddings(bad)
    assert tokens == rows + 3
    sizes = f"its tokenizer has {tokens} tokens, more than the {rows} rows of its input embeddings"
    stops_with_error(capsys, ["--checkpoint", str(bad), "--sets", "builtin", "--limit", "1"],
                     f"model '{bad}': {sizes}", eval_.main)
    common = ["--method", "vanilla", "--n-train", "4", "--batch-size", "2", "--max-steps", "1", "--eval-sets", ""]
    stops_with_error(capsys, [*common, "--student", str(bad), "--out", str(tmp_path / "a")], f"model '{bad}': {sizes}")

    run = [*common, "--student", tiny_student_dir, "--out", str(tmp_path / "b")]
    train.main(run)
    checkpoint = tmp_path / "b" / "checkpoint"
    assert outgrow_embeddings(checkpoint) == (tokens, rows)
    capsys.readouterr()
    stops_with_error(capsys, [*run, "--resume"], f"model '{checkpoint}': {sizes}")


def test_train_max_length_that_cuts_every_answer(capsys, tiny_student_dir, tmp_path):
    """--max-length 16 leaves every built-in problem's prompt (longer than 15 tokens) no room for its answer: one
    line counts the cut answers, then one error line, before a step is taken."""
    argv = ["--method", "vanilla", "--n-train", "4", "--batch-size", "2", "--max-steps", "1", "--eval-sets", "",
            "--student", tiny_student_dir, "--max-length", "16", "--out", str(tmp_path)]
    out = stops_with_error(capsys, argv, "--max-length 16 cuts the answer target of all 4 examples wholly")
    assert "[data] --max-length 16 cuts the end of longer texts: the answer target of 4 of 4 examples, 4 of them " \
           "wholly\n" in out
    assert not (tmp_path / "checkpoint").exists() and not (tmp_path / "log.jsonl").exists()
