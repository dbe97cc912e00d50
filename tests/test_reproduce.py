"""Tests for reproduce.py and train.py's run.json: the statistics against hand-computed cases, every preset's
dry-run prints commands that train.py's and eval.py's parsers accept, a two-method x two-seed grid on tiny models
is stopped mid-run by SIGTERM and finished by the same command without redoing finished work, and the report's
numbers equal a recount of the per-item files (the grid's, and a synthetic grid with known numbers). With fake
commands: no command outlives its grid (killed by SIGKILL, or ended by an error). A mistake or a damaged directory
is one `error:` line and exit status 2, or a warning and the rest of the report."""

import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval as eval_
from experiments import reproduce
from plumbing import fetch, flags, rundir

ROOT = Path(__file__).resolve().parents[1]
Z = 1.96


def wilson_by_hand(k, n):
    p = k / n
    denominator = 1 + Z**2 / n
    centre = (p + Z**2 / (2 * n)) / denominator
    half = Z * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2)) / denominator
    return centre - half, centre + half


def binomial_two_sided(b, c):
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n)


# ---------------------------------------------------------------------------------------------
# 1. Statistics.


def test_wilson_by_hand():
    # k = 8, n = 10: p = 0.8, z^2 = 3.8416, centre = (0.8 + 0.19208) / 1.38416, half = 1.96 sqrt(0.025604) / 1.38416
    assert reproduce.wilson(8, 10) == pytest.approx((0.716738 - 0.226581, 0.716738 + 0.226581), abs=2e-6)
    assert reproduce.wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook values
    assert reproduce.wilson(0, 10) == pytest.approx((0.0, 0.38416 / 1.38416))
    for k, n in [(1, 7), (21, 200), (199, 200), (508, 508)]:
        assert reproduce.wilson(k, n) == pytest.approx(wilson_by_hand(k, n))
    with pytest.raises(ValueError):
        reproduce.wilson(3, 0)


def test_mcnemar_exact_by_hand():
    assert reproduce.mcnemar_exact(1, 6) == pytest.approx(2 * (1 + 7) / 2**7)  # 0.125
    assert reproduce.mcnemar_exact(6, 1) == reproduce.mcnemar_exact(1, 6)
    assert reproduce.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert reproduce.mcnemar_exact(0, 0) == 1.0 and reproduce.mcnemar_exact(4, 4) == 1.0
    for b, c in [(3, 11), (20, 35), (0, 1)]:
        assert reproduce.mcnemar_exact(b, c) == pytest.approx(binomial_two_sided(b, c))


def test_paired_bootstrap_cases():
    rng = random.Random(0)
    a = [[rng.random() < 0.4 for _ in range(150)] for _ in range(3)]
    same = reproduce.paired_bootstrap(a, a, 2000, seed=0)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p": 1.0}
    # Constant difference: seed pair 0 differs on every item (+1), seed pair 1 on none, so every resample of
    # the items gives the mean of the two pairs, +0.5.
    ones, zeros = [1] * 150, [0] * 150
    const = reproduce.paired_bootstrap([ones, a[1]], [zeros, a[1]], 2000, seed=0)
    assert const == pytest.approx({"diff": 0.5, "lo": 0.5, "hi": 0.5, "p": 2 / 2001})
    # Two items, d = (1, 0): a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4.
    two = reproduce.paired_bootstrap([1, 0], [0, 0], 20000, seed=1)
    assert (two["diff"], two["lo"], two["hi"]) == (0.5, 0.0, 1.0)
    assert two["p"] == pytest.approx(0.5, abs=0.03)
    # The observed difference is the mean of the per-seed differences; a 1-D pair is one seed.
    b = [[rng.random() < 0.5 for _ in range(150)] for _ in range(3)]
    res = reproduce.paired_bootstrap(a, b, 2000, seed=0)
    assert res["diff"] == pytest.approx(statistics.mean(sum(x) / 150 - sum(y) / 150 for x, y in zip(a, b, strict=True)))
    assert res["lo"] < res["diff"] < res["hi"] and res == reproduce.paired_bootstrap(a, b, 2000, seed=0)
    assert reproduce.paired_bootstrap(a[0], b[0], 500, 3) == reproduce.paired_bootstrap([a[0]], [b[0]], 500, 3)


# ---------------------------------------------------------------------------------------------
# 2. Presets: every dry-run command parses; the dry run writes nothing.

RUNS = {"table1": 48, "table2": 39, "table3": 9, "fig5": 45, "small": 11, "equation": 8}


@pytest.mark.parametrize("preset", sorted(reproduce.PRESETS))
def test_dry_run_commands_parse(preset, tmp_path, capsys):
    out = tmp_path / "grid"
    assert reproduce.main(["--preset", preset, "--dry-run", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    cmds = [shlex.split(line) for line in lines if not line.startswith("#")]
    assert cmds and all(argv[0] == sys.executable for argv in cmds)
    parsed = {"train.py": [], "eval.py": []}
    for argv in cmds:
        script = Path(argv[1]).name
        parse = {"train.py": flags.parse_args, "eval.py": eval_.parse_args}[script]
        parsed[script].append(parse(argv[2:]))  # argparse exits on a flag it does not know
    spec = reproduce.PRESETS[preset]
    n_settings = len(spec["settings"])
    n_runs = n_settings * sum(len(m["seeds"]) for m in spec["methods"].values())
    assert len(parsed["train.py"]) == RUNS[preset] == n_runs
    evals = parsed["eval.py"]
    assert sum(a.mode == "answer" for a in evals) == 2 * n_settings  # the untrained student and the teacher
    assert sum(a.mode == "cot" for a in evals) == (RUNS[preset] if preset == "small" else 0)
    for args in parsed["train.py"]:
        assert Path(args.out).is_relative_to(out) and args.eval_sets
    assert not out.exists()
    if preset == "small":
        assert {(a.data, a.rationales, a.teacher, a.student, a.batch_size, a.max_steps, a.lr, a.warmup)
                for a in parsed["train.py"]} == {("svamp", "palm", "gemma3-270m", "smollm2-135m", 8,
                                                  reproduce.SMALL_STEPS, 1e-4, 0)}
        runs = sorted((a.method, a.layer_map or "", a.beta, a.seed) for a in parsed["train.py"])
        assert runs == sorted([("dss", "", 0.0, s) for s in (0, 1, 2)] + [("molsaki", "", 1.0, s) for s in (0, 1, 2)]
                              + [("vanilla", "", 0.0, 0), ("mmi", "", 0.1, 0), ("molsaki", "last", 1.0, 0),
                                 ("molsaki", "", 10.0, 0), ("molsaki", "", 100.0, 0)])
        assert {a.eval_sets for a in parsed["train.py"]} == {"svamp,singleeq,asdiv,gsm8k"}
        assert {",".join(a.sets) for a in evals if a.mode == "cot"} == {"svamp,singleeq"}
        assert {a.checkpoint for a in evals if a.mode == "answer"} == {"smollm2-135m", "gemma3-270m"}
    if preset == "fig5":  # one axis at a time, the others at the paper's defaults (beta 1.0, tau1 0.1, tau2 0.5)
        assert {(a.data, a.rationales, a.teacher, a.student, a.batch_size, a.max_steps, a.lr, a.eval_sets)
                for a in parsed["train.py"]} == {("svamp", "teacher", reproduce.LLAMA3_8B, "gpt2-medium", 16, 4000,
                                                  5e-5, "svamp,singleeq,asdiv")}
        runs = {(Path(a.out).name, a.method, a.beta, a.tau1, a.tau2) for a in parsed["train.py"]}
        points = ([(f"beta{v:g}", v, 0.1, 0.5) for v in (0.1, 0.5, 2.0, 5.0)]
                  + [(f"tau1-{v:g}", 1.0, v, 0.5) for v in (0.3, 0.5, 0.7, 1.0)]
                  + [(f"tau2-{v:g}", 1.0, 0.1, v) for v in (0.1, 0.3, 0.7, 1.0)])
        assert runs == {(f"{m}-s{s}", m, b, 0.1, 0.5) for m, b in (("dss", 0.0), ("mmi", 0.1), ("molsaki", 1.0))
                        for s in (0, 1, 2)} | {(f"molsaki-{n}-s{s}", "molsaki", b, t1, t2)
                                               for n, b, t1, t2 in points for s in (0, 1, 2)}
        assert "molsaki-beta0.1-s0" in {n for n, *_ in runs}  # named as the small preset's molsaki-beta10
    if preset == "equation":  # the small grid's dss and molsaki seed 0 with DSS's labels, beside them in its setting
        assert {(a.method, a.seed, a.answer_target, a.eval_sets) for a in parsed["train.py"]} == {
            (m, s, "equation", "svamp,singleeq,asdiv,gsm8k") for m in ("vanilla", "mmi", "dss", "molsaki")
            for s in ((0, 1, 2) if m in ("dss", "molsaki") else (0,))}
        assert [j["name"].split("/")[1] for j in reproduce.grid(spec, out)] == [  # vanilla first: the label alone
            "untrained-student", "teacher", "molsaki-eq-s0", "vanilla-eq-s0", "mmi-eq-s0", "dss-eq-s0",
            "dss-eq-s1", "molsaki-eq-s1", "dss-eq-s2", "molsaki-eq-s2"]
        small = {j["name"]: j["main"] for j in reproduce.grid(reproduce.PRESETS["small"], out)}
        for job in reproduce.grid(spec, out):
            if job["seed"] is None:  # the baselines are the small grid's: skipped there once it has run them
                assert job["main"] == small[job["name"]]
                continue
            twin = small[job["name"].replace("-eq-s", "-s")]  # same setting directory, number target
            argv = job["main"][:job["main"].index("--answer-target")] + job["main"][job["main"].index("--seed"):]
            assert argv[:-1] == twin[:-1] and job["dir"].parent == Path(twin[-1]).parent
        assert reproduce.parse_args(["--preset", "equation"]).out == reproduce.parse_args(["--preset", "small"]).out


def test_seeds_override_and_job_states(tmp_path, capsys):
    reproduce.main(["--preset", "small", "--dry-run", "--out", str(tmp_path), "--seeds", "5,6"])
    cmds = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    seeds = [flags.parse_args(argv[2:]).seed for argv in cmds if Path(argv[1]).name == "train.py"]
    assert sorted(seeds) == [5] * 7 + [6] * 7
    job = next(j for j in reproduce.grid(reproduce.PRESETS["small"], tmp_path) if j["name"].endswith("/dss-s0"))
    d = job["dir"]
    assert reproduce.commands(job) == [job["main"], job["cot"]]
    (d / "checkpoint").mkdir(parents=True)
    (d / "checkpoint" / "trainer_state.pt").write_bytes(b"")
    assert reproduce.commands(job) == [job["main"] + ["--resume"], job["cot"]]
    (d / "eval_answer.json").write_text("{}")
    assert reproduce.commands(job) == [job["cot"]]
    (d / "eval_cot.json").write_text("{}")
    assert reproduce.commands(job) == []
    # A run directory written by another command is refused, never mixed into this grid.
    argv = job["main"][1:]
    (d / "run.json").write_text(json.dumps({"argv": [*argv[:argv.index("--max-steps") + 1], "7"]}))
    with pytest.raises(ValueError, match="another command"):
        reproduce.dry_run(reproduce.PRESETS["small"], tmp_path)
    (d / "run.json").write_text(json.dumps({"argv": argv + ["--resume"]}))
    assert reproduce.dry_run(reproduce.PRESETS["small"], tmp_path).count("finished") == 1
    at = argv.index("--save-every") + 1  # how often a run saves does not change it
    (d / "run.json").write_text(json.dumps({"argv": [*argv[:at], "3", *argv[at + 1:]]}))
    assert reproduce.dry_run(reproduce.PRESETS["small"], tmp_path).count("finished") == 1


def test_grid_runs_seed_by_seed(tmp_path):
    """Stopped early, the small grid holds whole seeds of every method, the teacher-stage donor first."""
    names = [j["name"].split("/")[1] for j in reproduce.grid(reproduce.PRESETS["small"], tmp_path)]
    assert names == ["untrained-student", "teacher", "molsaki-s0", "dss-s0", "vanilla-s0", "mmi-s0",
                     "molsaki-sl-last-s0", "molsaki-beta10-s0", "molsaki-beta100-s0", "dss-s1", "molsaki-s1",
                     "dss-s2", "molsaki-s2"]


# ---------------------------------------------------------------------------------------------
# 3. run.json: what made a run.


def test_run_json_fields_and_data_files(tmp_path):
    """data_files: the SHA-256 of every file of the run's training and test sets in the fetch table (fetch.FILES),
    of a file of problems it names, and nothing for the built-in problems."""
    root = tmp_path / "data"
    for name in fetch.FILES:
        if name.split("/")[0] in ("svamp", "singleeq"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(name)
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"question": "Q?", "answer": "1"}\n')
    args = flags.parse_args(["--data", "svamp", "--data-dir", str(root), "--eval-sets", f"svamp,singleeq,{mine}",
                             "--out", str(tmp_path / "run")])
    expected = {p: hashlib.sha256(p.encode()).hexdigest() for p in fetch.files_of("svamp") + fetch.files_of("singleeq")}
    expected[str(mine)] = hashlib.sha256(mine.read_bytes()).hexdigest()
    names = flags.set_names(args.data, args.eval_sets)
    assert rundir.data_files(names, args.data_dir) == dict(sorted(expected.items()))
    assert len(expected) == 7  # svamp: 2 split files + 3 PaLM files; singleeq: 1; the file
    assert rundir.data_files(["builtin"], None) == {}

    args.out.mkdir()
    rundir.write_run_info(args.out, vars(args), torch.device("cpu"), None)
    info = json.loads((args.out / "run.json").read_text())
    assert info["argv"] == sys.argv and info["args"]["out"] == str(args.out) and info["args"]["lr"] == args.lr
    assert info["versions"]["torch"] == torch.__version__ and set(info["versions"]) == {"python", "torch",
                                                                                         "transformers"}
    assert info["data_files"] == dict(sorted(expected.items()))
    assert info["device"] == "cpu" or info["device"].startswith("cuda (")
    git = (ROOT / ".git").exists()
    assert (re.fullmatch(r"[0-9a-f]{40}", info["commit"]) and isinstance(info["dirty"], bool)) if git else \
        (info["commit"] is None and info["dirty"] is None)
    assert not (args.out / "run.json.tmp").exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_counts_tracked_changes_only(tmp_path):
    """A run directory inside the checkout and an edited tracked log leave it clean; an edited .py file does not."""
    assert rundir.git_state(tmp_path) == (None, None)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(git + ["init", "-q"], check=True)
    (tmp_path / "train.py").write_text("a\n")
    (tmp_path / "log.jsonl").write_text("{}\n")
    subprocess.run(git + ["add", "train.py", "log.jsonl"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "log.jsonl").write_text("{}\n")
    (tmp_path / "log.jsonl").write_text("{}\n{}\n")
    assert rundir.git_state(tmp_path) == (head, False)
    (tmp_path / "train.py").write_text("b\n")
    assert rundir.git_state(tmp_path) == (head, True)


# ---------------------------------------------------------------------------------------------
# 4. A grid on tiny models: stopped by SIGTERM while dss-s0 trains, then the same command finishes it.

DRIVER = ("import json, sys; from experiments import reproduce; "
          "sys.exit(reproduce.run_grid(json.loads(sys.argv[1]), sys.argv[2], jobs=2))")


def tiny_spec(teacher, student):
    flags = ["--data", "builtin", "--rationales", "builtin", "--teacher", teacher, "--student", student,
             "--n-train", "8", "--batch-size", "4", "--lr", "3e-3", "--warmup", "0", "--eval-batch-size", "100"]
    return {"settings": {"tiny": {"flags": flags, "answer_sets": ["builtin"], "cot_sets": [], "paper": None}},
            "methods": {"dss": {"flags": ["--method", "dss", "--max-steps", "30"], "seeds": [0, 1]},
                        "molsaki": {"flags": ["--method", "molsaki", "--max-steps", "6"], "seeds": [0, 1]}}}


def events(out):
    return [json.loads(line) for line in open(out / "reproduce.log.jsonl")]


@pytest.fixture(scope="module")
def tiny_grid(tiny_teacher_dir, tiny_student_dir, tmp_path_factory):
    """The grid's folder, what was there after the stop ({job: (finished, has checkpoint, eval mtime)}), the
    number of grid events then, and the step dss-s0 was stopped at."""
    out = tmp_path_factory.mktemp("grid")
    cmd = [sys.executable, "-c", DRIVER, json.dumps(tiny_spec(tiny_teacher_dir, tiny_student_dir)), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = out / "tiny" / "dss-s0" / "log.jsonl", time.time() + 240
    while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    first = proc.communicate(timeout=240)[0]
    assert proc.returncode == 130, first
    jobs = ["tiny/" + n for n in ("untrained-student", "teacher", "dss-s0", "dss-s1", "molsaki-s0", "molsaki-s1")]
    before = {}
    for job in jobs:
        done = (out / job / "eval_answer.json").exists()
        before[job] = (done, (out / job / "checkpoint" / "trainer_state.pt").exists(),
                       (out / job / "eval_answer.json").stat().st_mtime_ns if done else None)
    n_events = len(events(out))
    stopped_at = torch.load(out / "tiny/dss-s0/checkpoint/trainer_state.pt", weights_only=False)["step"]
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    return out, before, n_events, stopped_at


def test_grid_stops_and_continues(tiny_grid):
    out, before, n_events, stopped_at = tiny_grid
    assert not before["tiny/dss-s0"][0] and 1 <= stopped_at < 30  # stopped mid-training, saved by train.py
    rows = [json.loads(line) for line in open(out / "tiny/dss-s0/log.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 31))
    log = events(out)
    first, second = log[:n_events], log[n_events:]
    assert {e["job"] for e in first if e["event"] == "start"} >= {"tiny/untrained-student", "tiny/teacher",
                                                                   "tiny/dss-s0"}
    restarted = {e["job"]: e["cmd"] for e in second if e["event"] == "start"}
    assert set(restarted) == {job for job, (done, _, _) in before.items() if not done}  # nothing finished redone
    for job, cmd in restarted.items():
        assert (cmd[-1] == "--resume") == before[job][1], (job, cmd)
    assert "tiny/dss-s0" in restarted
    for job, (done, _, mtime) in before.items():
        assert (out / job / "eval_answer.json").exists()
        if done:
            assert (out / job / "eval_answer.json").stat().st_mtime_ns == mtime
    assert all(e["rc"] == 0 for e in second if e["event"] == "end")
    # The molsaki runs share one teacher stage: molsaki-s1 got molsaki-s0's cache (one file, two names).
    s0, s1 = out / "tiny/molsaki-s0/teacher_cache.pt", out / "tiny/molsaki-s1/teacher_cache.pt"
    assert s0.stat().st_ino == s1.stat().st_ino
    assert "reusing teacher attention cache" in (out / "tiny/molsaki-s1/train.log").read_text()
    assert not (out / "tiny/dss-s1/teacher_cache.pt").exists()
    # run.json, written by train.py itself.
    info = json.loads((out / "tiny/molsaki-s1/run.json").read_text())
    assert info["argv"][0] == "train.py" and info["argv"][1:] == restarted["tiny/molsaki-s1"][2:]
    assert info["args"]["method"] == "molsaki" and info["args"]["seed"] == 1 and info["data_files"] == {}
    assert info["args"]["out"] == str(out / "tiny/molsaki-s1") and info["device"] == "cpu"
    assert (out / "results.md").exists() and (out / "results.json").exists()


def recount(out, setting, columns, methods):
    """The report's numbers, recounted from the eval_<set>_<mode>.jsonl files alone."""
    items = {}
    for d in (out / setting).iterdir():
        for col in columns:
            name, mode = col.split("/")
            path = d / f"eval_{name}_{mode}.jsonl"
            if path.exists():
                items.setdefault(d.name, {})[col] = {json.loads(x)["id"]: json.loads(x)["correct"]
                                                     for x in open(path)}
    acc = {run: {c: sum(v.values()) / len(v) for c, v in cols.items()} for run, cols in items.items()}
    summary = {}
    for method in methods:
        runs = sorted((int(r.rsplit("-s", 1)[1]), r) for r in items if r.rsplit("-s", 1)[0] == method)
        for col in columns:
            values = [acc[r][col] for _, r in runs]
            summary[method, col] = {"mean": statistics.mean(values),
                                    "sd": statistics.stdev(values) if len(values) > 1 else None}
            dss = dict((int(r.rsplit("-s", 1)[1]), r) for r in items if r.rsplit("-s", 1)[0] == "dss")
            if method != "dss":
                pairs = [(s, r, dss.get(s, dss[min(dss)])) for s, r in runs]
                summary[method, col]["diff"] = statistics.mean(acc[r][col] - acc[t][col] for _, r, t in pairs)
                summary[method, col]["mcnemar"] = []
                for _, r, t in pairs:
                    x, y = items[r][col], items[t][col]
                    b = sum(x[i] and not y[i] for i in x)
                    c = sum(y[i] and not x[i] for i in x)
                    summary[method, col]["mcnemar"].append((b, c, binomial_two_sided(b, c)))
    return items, acc, summary


def check_report(results, out, setting, columns, methods):
    items, acc, summary = recount(out, setting, columns, methods)
    s = results["settings"][setting]
    assert set(s["runs"]) == set(items) and s["columns"] == columns
    for run, cols in acc.items():
        for col, a in cols.items():
            got = s["runs"][run]["accuracy"][col]
            k, n = sum(items[run][col].values()), len(items[run][col])
            assert (got["k"], got["n"], got["acc"]) == (k, n, pytest.approx(a))
            assert got["wilson"] == pytest.approx(list(wilson_by_hand(k, n)), abs=1e-12)
    for (method, col), want in summary.items():
        got = s["methods"][method][col]
        assert got["mean"] == pytest.approx(want["mean"])
        assert got["sd"] == (None if want["sd"] is None else pytest.approx(want["sd"]))
        if "diff" in want:
            assert got["vs_dss"]["diff"] == pytest.approx(want["diff"])
            assert got["vs_dss"]["lo"] <= got["vs_dss"]["diff"] + 1e-12 <= got["vs_dss"]["hi"] + 2e-12
            assert [(m["b"], m["c"], pytest.approx(m["p"])) for m in got["vs_dss"]["mcnemar"]] == want["mcnemar"]
        else:
            assert "vs_dss" not in got
    return s


def test_report_of_the_grid_equals_a_recount(tiny_grid, capsys):
    out = tiny_grid[0]
    assert reproduce.main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert printed.strip() == (out / "results.md").read_text().strip()
    s = check_report(results, out, "tiny", ["builtin/answer"], ["dss", "molsaki"])
    for base in reproduce.BASELINES:
        assert s["methods"][base]["builtin/answer"]["seeds"] == [None] and base in printed
    runs = s["runs"]
    assert runs["dss-s0"]["steps"] == 30 and runs["molsaki-s0"]["steps"] == 6
    assert runs["dss-s0"]["train_s"] > 0 and runs["dss-s0"]["wall_s"] > runs["dss-s0"]["train_s"]
    assert set(runs["molsaki-s0"]["losses"]) == {"pre", "exp", "att", "mmi"} and len(runs["molsaki-s0"]["p_s"]) == 3
    assert runs["dss-s0"]["versions"]["torch"] == torch.__version__
    log = [json.loads(line) for line in (out / "tiny" / "dss-s0" / "log.jsonl").read_text().splitlines()]
    assert runs["dss-s0"]["curves"]["exp"] == [r["exp"] for r in log] and len(log) == 30
    assert (out / "results.png").stat().st_size > 0 and (out / "losses.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------
# 5. The report on a synthetic grid with known numbers (no models): pairing, paper numbers, loss summaries.


def test_report_of_a_synthetic_grid(tmp_path):
    setting = "smollm2-135m-gemma3-270m-svamp-palm"  # the small preset's: compared with Table 3's hybrid rows
    rng = random.Random(1)
    columns = ["svamp/answer", "singleeq/answer", "svamp/cot"]
    rates = {"untrained-student": 0.05, "teacher": 0.3, "vanilla-s0": 0.1, "dss-s0": 0.2, "dss-s1": 0.25,
             "molsaki-s0": 0.3, "molsaki-s1": 0.2, "molsaki-s2": 0.35}
    for run, rate in rates.items():
        d = tmp_path / setting / run
        d.mkdir(parents=True)
        for col in columns:
            name, mode = col.split("/")
            n = {"svamp": 200, "singleeq": 50}[name]
            ids = [f"{name}-{i}" for i in range(n)]
            rng.shuffle(ids)  # the report matches items by id, not by line
            (d / f"eval_{name}_{mode}.jsonl").write_text(
                "".join(json.dumps({"id": i, "output": "", "correct": rng.random() < rate}) + "\n" for i in ids))
        if run not in reproduce.BASELINES:
            rows = [{"step": s, "sec": 0.5, "loss": 1.0, "pre": 2.0 - s / 100, "exp": 1.0, "att": 0.01, "mmi": 0.0,
                     "p_s": [0.5, 0.5] if s <= 80 else [0.25, 0.75], "p_t": [0.9, 0.1]} for s in range(1, 101)]
            (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "run.json").write_text(json.dumps({"commit": "ab" * 20, "dirty": True, "device": "cpu",
                                                    "versions": {"python": "3.11", "torch": "2", "transformers": "5"}}))
    results = reproduce.report(tmp_path)
    s = check_report(results, tmp_path, setting, columns, ["vanilla", "dss", "molsaki"])
    molsaki = s["methods"]["molsaki"]["svamp/answer"]
    assert molsaki["vs_dss"]["pairs"] == [[0, 0], [1, 1], [2, 0]]  # no dss seed 2: paired with dss seed 0
    assert molsaki["paper"] == 45.5 and s["methods"]["dss"]["singleeq/answer"]["paper"] == 33.3
    assert molsaki["vs_dss"]["n_items"] == 200 and s["methods"]["vanilla"]["svamp/answer"]["paper"] is None
    assert s["methods"]["molsaki"]["svamp/cot"]["paper"] is None  # the paper scores answer mode only
    run = s["runs"]["molsaki-s2"]
    assert run["losses"]["pre"] == pytest.approx([2.0 - 5.5 / 100, 2.0 - 95.5 / 100])  # steps 1-10 and 91-100
    assert run["p_s"] == pytest.approx([0.25, 0.75]) and run["train_s"] == 50.0 and run["wall_s"] is None
    assert run["commit"] == "ab" * 20 and s["paper_table"] == "table3-hybrid"
    md = (tmp_path / "results.md").read_text()
    m = s["methods"]["molsaki"]["svamp/answer"]
    assert f"| molsaki | 0,1,2 | {100 * m['mean']:.1f} ± {100 * m['sd']:.1f} (45.5) |" in md
    assert "abababababab"[:10] + " (changed)" in md and "2: 0.750, 1: 0.250" in md


def test_report_splits_svamp_at_the_label_overlap_and_marks_calculated_numbers(tmp_path, monkeypatch):
    """Every SVAMP answer-mode number is split into the test items whose gold equation is a training label and the
    rest (counted by hand here); a -eq run's answer-mode numbers outside SVAMP carry the calculator mark."""
    correct = {"dss-s0": "1100110011", "dss-eq-s0": "1110000001"}
    for run, bits in correct.items():
        d = tmp_path / reproduce.SMALL / run
        d.mkdir(parents=True)
        for name in ("svamp", "singleeq"):
            (d / f"eval_{name}_answer.jsonl").write_text("".join(
                json.dumps({"id": f"svamp-test-{i}" if name == "svamp" else f"singleeq-{i}", "correct": b == "1"})
                + "\n" for i, b in enumerate(bits)))
    monkeypatch.setattr(reproduce, "svamp_overlap", lambda: {"svamp-test-0", "svamp-test-1", "svamp-test-5"})
    results = reproduce.report(tmp_path)
    runs = results["settings"][reproduce.SMALL]["runs"]
    assert results["svamp_overlap"] == ["svamp-test-0", "svamp-test-1", "svamp-test-5"]
    for run, overlap, rest in (("dss-s0", (3, 3), (3, 7)), ("dss-eq-s0", (2, 3), (2, 7))):  # (right, n) by hand
        split = runs[run]["svamp_overlap"]
        assert (split["overlap"]["k"], split["overlap"]["n"]) == overlap
        assert (split["rest"]["k"], split["rest"]["n"]) == rest
        assert "singleeq/answer" in runs[run]["accuracy"]
    md = (tmp_path / "results.md").read_text()
    assert "| dss-eq-s0 | 40.0 [16.8, 68.7] (n=10) | 66.7 [20.8, 93.9] (n=3) | 28.6 [8.2, 64.1] (n=7) |" in md
    assert "| dss-eq-s0 | 40.0 [" in md and "| dss-eq-s0 | 40.0† [" not in md  # SVAMP: the label's own set
    assert re.search(r"\| dss-eq-s0 \| 40\.0 \[[^|]*\| 40\.0† \[", md)  # SingleEq: computed by the evaluator
    assert "| dss-s0 | 60.0 [" in md and "60.0†" not in md


@pytest.mark.skipif(not (Path(os.environ.get("MOLSAKI_DATA", "/nonexistent")) / "svamp").is_dir(),
                    reason="needs the SVAMP files ($MOLSAKI_DATA)")
def test_svamp_overlap_is_the_test_labels_found_among_the_training_labels():
    root = Path(os.environ["MOLSAKI_DATA"]) / "svamp" / "distilling_step_by_step"
    train, test = ([json.loads(line)["label"] for line in (root / f"svamp_{split}.json").read_text().splitlines()
                    if line.strip()] for split in ("train", "test"))
    expected = {f"svamp-test-{i}" for i, label in enumerate(test) if label in set(train)}
    assert reproduce.svamp_overlap() == expected and len(expected) == 44 and len(test) == 200


def test_report_pairs_equation_target_runs(tmp_path):
    """The equation preset's runs (dss-eq, molsaki-eq) in the small grid's setting: each -eq method against dss-eq
    (the same target) and against its own number-target method (vs_number), on the same items, seed with seed."""
    correct = {"dss-s0": "1100110011", "molsaki-s0": "1110110011", "dss-eq-s0": "1000110001",
               "molsaki-eq-s0": "1011110001", "dss-s1": "0110110011"}
    for run, bits in correct.items():
        d = tmp_path / reproduce.SMALL / run
        d.mkdir(parents=True)
        ids = [f"svamp-{i}" for i in range(len(bits))]
        (d / "eval_svamp_answer.jsonl").write_text(  # lines in another order: items are matched by id
            "".join(json.dumps({"id": i, "correct": b == "1"}) + "\n"
                    for i, b in reversed(list(zip(ids, bits, strict=True)))))
        (d / "log.jsonl").write_text(json.dumps({"step": 1, "sec": 1.0, "pre": 1.0}) + "\n")
    m = reproduce.report(tmp_path)["settings"][reproduce.SMALL]["methods"]
    col = "svamp/answer"

    def diff(a, b):
        return (correct[a].count("1") - correct[b].count("1")) / 10

    assert m["molsaki-eq"][col]["vs_dss"]["dss"] == "dss-eq" and m["molsaki"][col]["vs_dss"]["dss"] == "dss"
    assert m["molsaki-eq"][col]["vs_dss"]["diff"] == pytest.approx(diff("molsaki-eq-s0", "dss-eq-s0"))
    assert "vs_dss" not in m["dss-eq"][col] and "vs_number" not in m["molsaki"][col]
    for method in ("dss", "molsaki"):
        v = m[f"{method}-eq"][col]["vs_number"]
        assert v["method"] == method and v["pairs"] == [[0, 0]] and v["n_items"] == 10
        assert v["diff"] == pytest.approx(diff(f"{method}-eq-s0", f"{method}-s0"))
    # molsaki-eq 1011110001 vs molsaki 1110110011: only -eq right on item 3, only molsaki on 1 and 8
    assert [(x["b"], x["c"]) for x in m["molsaki-eq"][col]["vs_number"]["mcnemar"]] == [(1, 2)]
    md = (tmp_path / "results.md").read_text()
    assert "| molsaki-eq (vs dss-eq) | svamp | 0:0 |" in md and "| molsaki-eq (vs molsaki) | svamp | 0:0 |" in md
    assert "| dss-eq (vs dss) | svamp | 0:0 | -20.0 |" in md and "| molsaki | svamp | 0:0 |" in md
    shutil.rmtree(tmp_path / reproduce.SMALL / "dss-eq-s0")  # no dss-eq: molsaki-eq against dss
    m = reproduce.report(tmp_path)["settings"][reproduce.SMALL]["methods"]
    assert m["molsaki-eq"][col]["vs_dss"]["dss"] == "dss" and m["molsaki-eq"][col]["vs_dss"]["pairs"] == [[0, 0]]


# ---------------------------------------------------------------------------------------------
# 6. The grid's commands never outlive it: fake train.py and eval.py that write their pid and wait.

FAKE = """import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[sys.argv.index("--out") + 1])
def stop(signum, frame):
    (out / "sigterm").write_text("")
    time.sleep(0.5)  # as train.py saving its checkpoint
    (out / "exited").write_text("")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(out / "pid.tmp").write_text(str(os.getpid()))
os.replace(out / "pid.tmp", out / "pid")
time.sleep(float(os.environ.get("FAKE_SECONDS", "60")))
sys.exit(int(os.environ.get("FAKE_STATUS", "0")))
"""
FAKE_DRIVER = ("import json, pathlib, sys; from experiments import reproduce; "
               "reproduce.ROOT = pathlib.Path(sys.argv[3]); "
               "sys.exit(reproduce.run_grid(json.loads(sys.argv[1]), sys.argv[2]))")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")


@pytest.fixture
def fake_root(tmp_path):
    """A folder with fake train.py and eval.py, to stand for reproduce.ROOT."""
    root = tmp_path / "fake"
    root.mkdir()
    for script in ("train.py", "eval.py"):
        (root / script).write_text(FAKE)
    return root


def fake_spec():
    flags = ["--data", "builtin", "--rationales", "builtin", "--teacher", "t", "--student", "s"]
    return {"settings": {"fake": {"flags": flags, "answer_sets": ["builtin"], "cot_sets": [], "paper": None}},
            "methods": {"dss": {"flags": ["--method", "dss"], "seeds": [0]}}}


def alive(pid):
    """Whether process `pid` runs (a zombie does not: its new parent may be slow to reap an orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_for(condition, seconds=30):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.02)
    return condition()


def end(pid_file):
    """Kill what a test left running (only on a failure)."""
    if pid_file.exists() and alive(int(pid_file.read_text())):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


@linux
def test_commands_stop_when_the_grid_is_killed(fake_root, tmp_path):
    """SIGKILL leaves the grid no time to forward anything: its running command still gets SIGTERM and exits."""
    out, env = tmp_path / "grid", dict(os.environ, PYTHONPATH=str(ROOT))
    pid_file = out / "fake" / "untrained-student" / "pid"
    driver = subprocess.Popen([sys.executable, "-c", FAKE_DRIVER, json.dumps(fake_spec()), str(out), str(fake_root)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(pid_file.exists)
        pid = int(pid_file.read_text())
        driver.kill()
        driver.wait(timeout=10)
        assert wait_for(lambda: not alive(pid), 10), "the command outlived its grid"
        assert (pid_file.parent / "sigterm").exists()
    finally:
        driver.kill()
        end(pid_file)


@linux
def test_a_command_whose_grid_died_before_it_started_never_runs(tmp_path, monkeypatch):
    """The parent-death signal is set in the child between fork and exec; when the grid died before that, no signal
    will come, so the child checks its parent and exits before the command runs. Simulated with a parent pid that
    no process has."""
    marker = tmp_path / "ran"
    cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: -1)
        orphan = reproduce._die_with_parent()
    assert subprocess.Popen(cmd, preexec_fn=orphan).wait(timeout=10) == 1 and not marker.exists()
    assert subprocess.Popen(cmd, preexec_fn=reproduce._die_with_parent()).wait(timeout=10) == 0 and marker.exists()


def test_an_error_in_the_grid_ends_its_commands(fake_root, tmp_path, monkeypatch):
    """An exception in the grid's loop while a command runs: the command gets SIGTERM, and the grid waits for it to
    exit before the exception leaves run_grid."""
    out = tmp_path / "grid"
    d, real = out / "fake" / "untrained-student", reproduce.commands

    def commands(job):
        if job["name"] != "fake/untrained-student":
            assert wait_for((d / "pid").exists)  # its SIGTERM handler is set
            raise OSError("disk full")
        return real(job)

    monkeypatch.setattr(reproduce, "ROOT", fake_root)
    monkeypatch.setattr(reproduce, "commands", commands)
    try:
        with pytest.raises(OSError, match="disk full"):
            reproduce.run_grid(fake_spec(), out, jobs=2)
        assert (d / "sigterm").exists() and (d / "exited").exists(), "run_grid returned before its command exited"
    finally:
        end(d / "pid")


def test_a_grid_that_evaluated_nothing_has_no_report(fake_root, tmp_path, monkeypatch, capsys):
    """Every command failed: the grid says why there is no report and keeps its exit status."""
    out = tmp_path / "grid"
    monkeypatch.setattr(reproduce, "ROOT", fake_root)
    monkeypatch.setenv("FAKE_SECONDS", "0")
    monkeypatch.setenv("FAKE_STATUS", "1")
    assert reproduce.run_grid(fake_spec(), out, jobs=3) == 1
    printed = capsys.readouterr().out
    assert f"no report: {out} holds no evaluated run" in printed and "failed: fake/untrained-student" in printed
    assert not (out / "results.md").exists() and not (out / "results.json").exists()


def test_a_grid_killed_mid_row_appends_after_whole_rows(fake_root, tmp_path, monkeypatch, capsys):
    """The driver was killed while writing a row of reproduce.log.jsonl: the next grid drops the cut row first,
    so the log it appends to stays one JSON object a line."""
    out = tmp_path / "grid"
    out.mkdir()
    (out / "reproduce.log.jsonl").write_text('{"time": 1.0, "event": "start"}\n{"time": 2.0, "ev')
    monkeypatch.setattr(reproduce, "ROOT", fake_root)
    monkeypatch.setenv("FAKE_SECONDS", "0")
    monkeypatch.setenv("FAKE_STATUS", "1")
    reproduce.run_grid(fake_spec(), out, jobs=3)
    rows = [json.loads(line) for line in (out / "reproduce.log.jsonl").read_text().splitlines()]
    assert rows[0] == {"time": 1.0, "event": "start"} and all(r["event"] in ("start", "end") for r in rows[1:])
    assert len(rows) > 1


# ---------------------------------------------------------------------------------------------
# 7. Mistakes and damage: one `error:` line and exit status 2, or a warning and the rest of the report.


def one_line_error(capsys, argv, expect):
    """reproduce.main(argv) exits with status 2 and prints exactly one line, `error: ...` containing `expect`."""
    with pytest.raises(SystemExit) as stop:
        reproduce.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err


def small_grid(root):
    """One setting, runs dss-s0 and molsaki-s0: four svamp items each, run.json, three steps in log.jsonl."""
    for run, correct in {"dss-s0": [1, 0, 1, 1], "molsaki-s0": [1, 1, 1, 0]}.items():
        d = root / "setting" / run
        d.mkdir(parents=True)
        (d / "eval_svamp_answer.jsonl").write_text(
            "".join(json.dumps({"id": i, "correct": bool(c)}) + "\n" for i, c in enumerate(correct)))
        (d / "run.json").write_text(json.dumps({"commit": None, "device": "cpu"}))
        (d / "log.jsonl").write_text("".join(json.dumps({"step": s, "sec": 1.0, "pre": 1.0}) + "\n" for s in (1, 2, 3)))
    return root / "setting"


def missing_dir(root):
    return root / "nosuch", f"{root / 'nosuch'}: no such directory"


def no_runs(root):
    (root / "setting" / "dss-s0").mkdir(parents=True)  # a grid that has started, and evaluated nothing yet
    return root, f"{root} holds no evaluated run"


def bad_run_json(root):
    path = small_grid(root) / "dss-s0" / "run.json"
    path.write_text('{"commit": "ab')
    return root, f"{path}: not valid JSON"


def bad_log_line(root):
    path = small_grid(root) / "molsaki-s0" / "log.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[1][:9], lines[2]]) + "\n")  # a line cut, then more lines
    return root, f"{path}, line 2: not valid JSON"


def cut_eval_file(root):
    path = small_grid(root) / "dss-s0" / "eval_svamp_answer.jsonl"
    path.write_text(path.read_text()[:-5])  # eval.py renames whole files into place: no kill cuts one
    return root, f"{path}, line 4: not valid JSON"


@pytest.mark.parametrize("case", [missing_dir, no_runs, bad_run_json, bad_log_line, cut_eval_file])
def test_report_refuses_with_one_line(case, tmp_path, capsys):
    target, expect = case(tmp_path)
    one_line_error(capsys, ["report", str(target)], expect)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "results.md").exists()


def test_report_drops_a_cut_last_line_of_the_logs(tmp_path):
    """log.jsonl and reproduce.log.jsonl grow line by line: a kill can cut the last line, which is left out."""
    grid = small_grid(tmp_path)
    log = grid / "molsaki-s0" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "se')
    (tmp_path / "reproduce.log.jsonl").write_text(
        json.dumps({"event": "end", "job": "setting/molsaki-s0", "rc": 0, "sec": 5.0}) + '\n{"event": "en')
    run = reproduce.report(tmp_path)["settings"]["setting"]["runs"]["molsaki-s0"]
    assert (run["steps"], run["train_s"], run["wall_s"]) == (3, 3.0, 5.0)
    assert log.read_text().endswith('{"step": 4, "se')  # the report only reads the run directories


def test_report_skips_an_empty_eval_file(tmp_path, capsys):
    """An empty eval file: a warning naming it, and that run has no result there; the rest is reported."""
    grid = small_grid(tmp_path)
    (grid / "dss-s0" / "eval_gsm8k_answer.jsonl").write_text('{"id": 0, "correct": true}\n')
    empty = grid / "molsaki-s0" / "eval_gsm8k_answer.jsonl"
    empty.write_text("")
    s = reproduce.report(tmp_path)["settings"]["setting"]
    assert f"warning: {empty} is empty" in capsys.readouterr().err
    assert s["columns"] == ["svamp/answer", "gsm8k/answer"]
    assert set(s["runs"]["molsaki-s0"]["accuracy"]) == {"svamp/answer"} and set(s["methods"]["molsaki"]) == {
        "svamp/answer"}
    assert s["runs"]["dss-s0"]["accuracy"]["gsm8k/answer"]["acc"] == 1.0
    assert s["methods"]["molsaki"]["svamp/answer"]["vs_dss"]["diff"] == pytest.approx(0.0)  # 3 of 4 each


@pytest.mark.parametrize("argv, expect", [
    (["--preset", "nosuch"], "invalid choice: 'nosuch'"),
    (["--preset", "small", "--seeds", "0,x", "--dry-run"], "--seeds: expected comma-separated integers"),
    (["--preset", "small", "--jobs", "0"], "--jobs must be at least 1"),
    (["report"], "the following arguments are required: DIR"),
])
def test_command_line_mistakes_are_one_line(argv, expect, capsys):
    one_line_error(capsys, argv, expect)


def test_a_run_directory_the_grid_cannot_use_is_one_line(tmp_path, capsys):
    job = next(j for j in reproduce.grid(reproduce.PRESETS["small"], tmp_path) if j["name"].endswith("/dss-s0"))
    job["dir"].mkdir(parents=True)
    (job["dir"] / "run.json").write_text(json.dumps({"argv": ["train.py", "--max-steps", "7"]}))
    argv = ["--preset", "small", "--dry-run", "--out", str(tmp_path)]
    one_line_error(capsys, argv, "run directories made by another command (choose another --out)")
    (job["dir"] / "run.json").write_text("{")
    one_line_error(capsys, argv, f"{job['dir'] / 'run.json'}: not valid JSON")
