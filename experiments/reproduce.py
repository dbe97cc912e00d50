"""Reproduce the paper's tables: a grid of train.py runs (settings x methods x seeds), and its report.

    python -m experiments.reproduce --preset small [--seeds 0,1,2] [--dry-run] [--out DIR] [--jobs N]
    python -m experiments.reproduce report DIR

Presets (`PRESETS`; real data is read from $MOLSAKI_DATA, as train.py and eval.py read it):
    table1  Table 1: Llama-3-8B -> GPT-2 large (lr 5e-5, 4000 steps) and Qwen2.5-32B -> TinyLlama-1.1B (lr 1e-4,
            2000 steps), batch 16, teacher rationales, SVAMP and CSQA; vanilla, dss, mmi, molsaki; seeds 0, 1, 2.
    table2  Table 2: Llama-3-8B -> GPT-2 medium on SVAMP, the single-layer maps T:S it lists (32:24 is `last`)
            against MoL, beside dss and mmi; tested on SVAMP and ASDiv.
    table3  Table 3's hybrid setting: PaLM-540B rationales, Llama-3-8B attention, GPT-2 large; dss, mmi, molsaki.
            (Its unified rows, Llama-3-8B rationales and attention, are Table 1's GPT-2 large runs.)
    fig5    Fig. 5 (§4.3): Llama-3-8B -> GPT-2 medium on SVAMP as table2, tested on SVAMP, SingleEq and ASDiv; molsaki
            with one of β, τ1, τ2 changed at a time, the others at the paper's defaults (β 1.0, τ1 0.1, τ2 0.5, the
            `molsaki` run): β 0.1, 0.5, 2, 5; τ1 0.3, 0.5, 0.7, 1; τ2 0.1, 0.3, 0.7, 1 (`FIG5_AXES`; the paper gives
            no axis values). Beside dss and mmi; seeds 0, 1, 2. Its paper numbers are Table 2's (dss, mmi, molsaki).
    small   a grid sized for 2 CPU cores: SVAMP with PaLM rationales, gemma3-270m attention, smollm2-135m student,
            SMALL_STEPS steps of batch 8 at lr 1e-4 for every method; dss and molsaki seeds 0, 1, 2,
            vanilla, mmi, molsaki --layer-map last and molsaki at β = 10 and 100 seed 0; SVAMP, SingleEq, ASDiv,
            GSM8K in answer mode and SVAMP, SingleEq in cot mode too. Compared with Table 3's hybrid rows.
    equation  vanilla and mmi seed 0, dss and molsaki seeds 0, 1, 2, with --answer-target equation (DSS's SVAMP
            label), named vanilla-eq ... molsaki-eq, in the small preset's setting, answer mode only; its default
            --out is the small grid's (runs/reproduce-small), so the report pairs them with the number-target runs
            there.

Layout of DIR (default runs/reproduce-<preset>, equation's runs/reproduce-small): DIR/<setting>/<method>-s<seed>/
is one run, train.py's --out (its run.json, log.jsonl, checkpoint, eval files; train.log, eval_cot.log,
eval_answer.log: each command's output); DIR/<setting>/untrained-student/ and DIR/<setting>/teacher/ are eval.py
in answer mode on the setting's answer sets; DIR/reproduce.log.jsonl lists every command started and ended (exit
status, seconds).

Running a grid (`run_grid`):
- A job is finished when its eval files are there (eval_answer.json, and eval_cot.json when the setting has cot
  sets) and is skipped. Otherwise train.py runs, with --resume when the run directory holds a checkpoint (the
  folders rundir.checkpoint_dir looks in), then `eval.py --mode cot` on the checkpoint.
- Ctrl-C or SIGTERM is forwarded once, as SIGTERM, to the running commands (each runs in its own session, so a
  terminal's Ctrl-C reaches them only this way); train.py saves a checkpoint and exits; nothing new starts, and
  the grid waits for them to exit. An error in the grid's loop does the same before it is raised. A grid that dies
  without either (SIGKILL) leaves no command behind on Linux: each gets SIGTERM when the grid dies (its parent-death
  signal, `_die_with_parent`); elsewhere they run on, and train.py's lock on its run directory keeps a rerun's
  train.py out of it. The same command later continues where it stopped. A run directory written by another
  train.py command (run.json's argv, --out and --resume aside) is an error: two grids are never mixed in one
  directory.
- Shared teacher stage. train.py writes rationales.jsonl (teacher rationales), keywords.jsonl (CSQA keywords) and
  teacher_cache.pt (molsaki) into its --out and reuses them when present (the cache only if its metadata match,
  teacher.load_attention_cache). Runs whose flags agree on everything but training-only flags (`TRAINING_ONLY`) have
  the same teacher stage: the first run that needs most of these files (a molsaki run) goes first, and every
  other run of the group starts once that run has passed its teacher stage (its log.jsonl exists, or it ended),
  with the files it needs copied from it (the cache hardlinked, as train.py only reads or replaces it; the JSONL
  files copied, as train.py appends to them). A file the run already has is kept.
- --jobs N runs N commands at once, each with OMP_NUM_THREADS = max(1, T // N), T being $OMP_NUM_THREADS when set,
  else the CPU count.

The report (`report`: DIR/results.md, results.json, results.png, losses.png; built from the run directories
alone). Per setting, method and test set (and mode): the mean and standard deviation of the accuracy over seeds,
the paper's number beside it (`PAPER`, in the answer-mode columns), and the difference to dss on the same items.
Pairing: seed s of a method with dss seed s when that run exists, else with the lowest dss seed; a method named
`<method>-eq` (trained with --answer-target equation) with dss-eq when there is one, and also, as the label's
effect, with `<method>` (vs_number, its own table). Items are matched by `id` in eval_<set>_<mode>.jsonl (the ids
all paired runs have). The 95% interval of the difference is a paired bootstrap over test items with the seeds
kept apart (`paired_bootstrap`); the table shows its p-value and, beside
it, the exact McNemar p-value of each seed pair (`mcnemar_exact`). Each run's accuracy comes with its 95% Wilson
interval (`wilson`), and each run with its commit, versions and device (run.json), training seconds (sum of `sec`
in log.jsonl), wall seconds of its commands (reproduce.log.jsonl), the loss terms (pre, exp, att, mmi: mean of the
first and of the last 10% of steps) and, for molsaki runs, the mean p_s and p_t of the last 10% of steps. The
untrained student and the teacher are rows of the accuracy table. Every run's SVAMP answer-mode accuracy is also
split into the test items whose gold equation is verbatim a training label (`svamp_overlap`, read from the data
directory) and the rest; a `-eq` run's answer-mode numbers outside SVAMP are marked † (the evaluator computed the
student's equation: calculator-assisted).

What the report does with a directory it cannot read as it is (an error is one `error:` line and exit status 2 on
the command line, `GridError` from `report`; nothing is written then):
- DIR missing, or holding no run with an evaluated set: an error (a wrong path, or a grid that has evaluated
  nothing yet). At the end of a grid, this prints `no report` instead, and the grid's exit status stands.
- run.json that is not JSON: an error naming it (mend it: a resume needs its record of the run's flags and data).
- log.jsonl and reproduce.log.jsonl are appended line by line, so a last line without its newline was cut by a
  kill: it is dropped, as plumbing/files.py's `read_appended` drops it. A line that is not JSON anywhere else, or in
  an eval_<set>_<mode>.jsonl (written whole, then renamed), is an error naming the file and line.
- An empty eval_<set>_<mode>.jsonl: a warning naming it, and the run has no result for that set and mode.
"""

import ctypes
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from plumbing import cli

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py and eval.py
SMALL_STEPS = 100  # one epoch of SVAMP train (800 items) at batch 8
N_BOOT = 10000
BASELINES = ("untrained-student", "teacher")
# train.py flags that change training but not the teacher stage (rationales, keywords, attention cache)
TRAINING_ONLY = {"--student", "--method", "--alpha", "--beta", "--tau1", "--tau2", "--layer-map", "--lr",
                 "--batch-size", "--grad-accum", "--max-steps", "--warmup", "--weight-decay", "--max-grad-norm",
                 "--seed", "--save-every", "--eval-sets", "--eval-batch-size", "--out"}

LLAMA3_8B = "meta-llama/Meta-Llama-3-8B"
QWEN25_32B = "Qwen/Qwen2.5-32B"
TINYLLAMA = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"  # the paper names TinyLlama-1.1B, no checkpoint
GPT2_SCHEDULE = ["--lr", "5e-5", "--batch-size", "16", "--max-steps", "4000", "--warmup", "0"]  # paper App. F.2
TINYLLAMA_SCHEDULE = ["--lr", "1e-4", "--batch-size", "16", "--max-steps", "2000", "--warmup", "0"]
MATH_SETS = ["svamp", "singleeq", "asdiv", "gsm8k"]
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class GridError(ValueError):
    """A grid directory that cannot be used as it is; the message names the file and what to do."""


def _setting(teacher, student, data, rationales, schedule, answer_sets, paper, cot_sets=()):
    return {"flags": ["--data", data, "--rationales", rationales, "--teacher", teacher, "--student", student,
                      *schedule],
            "answer_sets": list(answer_sets), "cot_sets": list(cot_sets), "paper": paper}


def _methods(seeds, **flags):
    return {label: {"flags": f, "seeds": list(seeds)} for label, f in flags.items()}


_BASE = {"vanilla": ["--method", "vanilla"], "dss": ["--method", "dss"], "mmi": ["--method", "mmi"],
         "molsaki": ["--method", "molsaki"]}
_SL = {f"molsaki-sl-{t}-{s}": ["--method", "molsaki", "--layer-map", f"{t}:{s}"] for t in (13, 14, 15)
       for s in (8, 17, 24)}
# Fig. 5 (§4.3): one of beta, tau1, tau2 at a time, the other two at the paper's defaults (§4.1: beta 1.0, tau1 0.1,
# tau2 0.5, the `molsaki` run). The paper gives no values for its axes; its text names tau1 0.1 and 0.7 (Fig. 6),
# tau2 0.1, 0.5 and 1.0 (Fig. 6, 8) and a peak of beta at 1.0. A value v of axis a is the method molsaki-<a><v>
# (molsaki-beta0.1, as the small preset's molsaki-beta10) and molsaki-<a>-<v> for tau1 and tau2 (molsaki-tau1-0.7).
FIG5_DEFAULTS = {"beta": 1.0, "tau1": 0.1, "tau2": 0.5}
FIG5_AXES = {"beta": (0.1, 0.5, 1.0, 2.0, 5.0), "tau1": (0.1, 0.3, 0.5, 0.7, 1.0), "tau2": (0.1, 0.3, 0.5, 0.7, 1.0)}
_FIG5 = {f"molsaki-{a}{'' if a == 'beta' else '-'}{v:g}": ["--method", "molsaki", f"--{a}", f"{v:g}"]
         for a, values in FIG5_AXES.items() for v in values if v != FIG5_DEFAULTS[a]}
EQ = "-eq"  # the name of a method trained with --answer-target equation: its number-target method and this suffix
SMALL = "smollm2-135m-gemma3-270m-svamp-palm"  # the small preset's setting; the equation preset's runs join it

# A spec: settings (train.py flags shared by its runs, the test sets, the paper table to compare with) and methods
# (train.py flags, seeds). A setting names --data, --rationales, --teacher and --student, a method --method; every
# flag takes a value.
PRESETS = {
    "table1": {
        "settings": {
            "gpt2-large-llama3-8b-svamp": _setting(LLAMA3_8B, "gpt2-large", "svamp", "teacher", GPT2_SCHEDULE,
                                                   MATH_SETS, "table1-gpt2-large"),
            "gpt2-large-llama3-8b-csqa": _setting(LLAMA3_8B, "gpt2-large", "csqa", "teacher", GPT2_SCHEDULE,
                                                  ["csqa"], "table1-gpt2-large"),
            "tinyllama-1.1b-qwen2.5-32b-svamp": _setting(QWEN25_32B, TINYLLAMA, "svamp", "teacher",
                                                         TINYLLAMA_SCHEDULE, MATH_SETS, "table1-tinyllama"),
            "tinyllama-1.1b-qwen2.5-32b-csqa": _setting(QWEN25_32B, TINYLLAMA, "csqa", "teacher",
                                                        TINYLLAMA_SCHEDULE, ["csqa"], "table1-tinyllama")},
        "methods": _methods([0, 1, 2], **_BASE)},
    "table2": {
        "settings": {"gpt2-medium-llama3-8b-svamp": _setting(LLAMA3_8B, "gpt2-medium", "svamp", "teacher",
                                                             GPT2_SCHEDULE, ["svamp", "asdiv"], "table2")},
        "methods": _methods([0, 1, 2], dss=_BASE["dss"], mmi=_BASE["mmi"], **_SL,
                            **{"molsaki-sl-last": ["--method", "molsaki", "--layer-map", "last"]},
                            molsaki=_BASE["molsaki"])},
    "table3": {
        "settings": {"gpt2-large-llama3-8b-svamp-palm": _setting(LLAMA3_8B, "gpt2-large", "svamp", "palm",
                                                                 GPT2_SCHEDULE, ["svamp", "singleeq", "asdiv"],
                                                                 "table3-hybrid")},
        "methods": _methods([0, 1, 2], dss=_BASE["dss"], mmi=_BASE["mmi"], molsaki=_BASE["molsaki"])},
    "fig5": {
        "settings": {"gpt2-medium-llama3-8b-svamp": _setting(LLAMA3_8B, "gpt2-medium", "svamp", "teacher",
                                                             GPT2_SCHEDULE, ["svamp", "singleeq", "asdiv"], "table2")},
        "methods": _methods([0, 1, 2], dss=_BASE["dss"], mmi=_BASE["mmi"], molsaki=_BASE["molsaki"], **_FIG5)},
    "small": {
        "settings": {SMALL: _setting(
            "gemma3-270m", "smollm2-135m", "svamp", "palm",
            ["--lr", "1e-4", "--batch-size", "8", "--max-steps", str(SMALL_STEPS), "--warmup", "0",
             "--save-every", "10"],  # a kill loses at most 10 steps (~5 min here)
            MATH_SETS, "table3-hybrid", cot_sets=["svamp", "singleeq"])},
        "methods": {**_methods([0, 1, 2], dss=_BASE["dss"], molsaki=_BASE["molsaki"]),
                    **_methods([0], vanilla=_BASE["vanilla"], mmi=_BASE["mmi"],
                               **{"molsaki-sl-last": ["--method", "molsaki", "--layer-map", "last"],
                                  # does a stronger attention signal move anything? (the paper's Fig. 5 sweeps β)
                                  "molsaki-beta10": ["--method", "molsaki", "--beta", "10"],
                                  "molsaki-beta100": ["--method", "molsaki", "--beta", "100"]})}},
}
# Every method trained on DSS's SVAMP labels (the equation), in the small grid's setting and directory (its
# default --out), so that the report pairs them with the number-target runs on the same items: vanilla first (it
# trains on the answers alone and tells what the label gives without a rationale), then mmi, dss and molsaki.
PRESETS["equation"] = {
    "settings": {SMALL: {**PRESETS["small"]["settings"][SMALL], "cot_sets": []}},
    "methods": {**_methods([0], **{m + EQ: [*_BASE[m], "--answer-target", "equation"] for m in ("vanilla", "mmi")}),
                **_methods([0, 1, 2], **{m + EQ: [*_BASE[m], "--answer-target", "equation"]
                                         for m in ("dss", "molsaki")})},
    "out": "runs/reproduce-small"}

# The paper's accuracies (%), each the mean of three seeds, shown beside our answer-mode columns; its SingleEq
# and ASDiv are subsets of 108 and 406 items (ours: the full sets).
PAPER = {
    "table1-gpt2-large": {
        "title": "Table 1: teacher Llama3-8B, student GPT2-Large",
        "rows": {"vanilla": dict(svamp=10.0, singleeq=12.1, asdiv=9.2, gsm8k=4.2, csqa=16.7),
                 "dss": dict(svamp=48.0, singleeq=36.1, asdiv=30.3, gsm8k=12.4, csqa=19.1),
                 "mmi": dict(svamp=47.0, singleeq=37.9, asdiv=30.7, gsm8k=12.5, csqa=19.4),
                 "molsaki": dict(svamp=49.5, singleeq=39.8, asdiv=32.2, gsm8k=15.1, csqa=21.0)}},
    "table1-tinyllama": {
        "title": "Table 1: teacher Qwen2.5-32B, student TinyLlama-1.1B",
        "rows": {"vanilla": dict(svamp=14.5, singleeq=21.4, asdiv=14.3, gsm8k=6.7, csqa=17.8),
                 "dss": dict(svamp=59.5, singleeq=48.1, asdiv=33.5, gsm8k=13.8, csqa=28.9),
                 "mmi": dict(svamp=64.5, singleeq=48.1, asdiv=42.6, gsm8k=14.0, csqa=25.8),
                 "molsaki": dict(svamp=68.5, singleeq=51.8, asdiv=43.3, gsm8k=16.9, csqa=30.3)}},
    "table2": {
        "title": "Table 2: teacher Llama3-8B, student GPT2-Medium, single-layer maps T:S against MoL",
        "rows": {"dss": dict(svamp=35.0, asdiv=23.3), "mmi": dict(svamp=42.5, asdiv=26.3),
                 "molsaki-sl-13-8": dict(svamp=36.5, asdiv=25.1), "molsaki-sl-13-17": dict(svamp=38.5, asdiv=26.6),
                 "molsaki-sl-13-24": dict(svamp=35.0, asdiv=26.1), "molsaki-sl-14-8": dict(svamp=36.0, asdiv=26.6),
                 "molsaki-sl-14-17": dict(svamp=42.5, asdiv=28.3), "molsaki-sl-14-24": dict(svamp=43.0, asdiv=28.1),
                 "molsaki-sl-15-8": dict(svamp=35.5, asdiv=27.3), "molsaki-sl-15-17": dict(svamp=36.5, asdiv=26.6),
                 "molsaki-sl-15-24": dict(svamp=39.0, asdiv=24.6), "molsaki-sl-last": dict(svamp=43.0, asdiv=28.1),
                 "molsaki": dict(svamp=44.5, asdiv=30.5)}},
    "table3-hybrid": {
        "title": "Table 3, hybrid: rationales PaLM-540B, attention Llama3-8B, student GPT2-Large",
        "rows": {"dss": dict(svamp=43.0, singleeq=33.3, asdiv=33.0),
                 "mmi": dict(svamp=42.0, singleeq=29.6, asdiv=34.9),
                 "molsaki": dict(svamp=45.5, singleeq=37.9, asdiv=34.5)}},
}


# ---------------------------------------------------------------------------------------------
# Statistics.


def wilson(k, n, z=1.96):
    """Wilson score interval (lo, hi) of the proportion k / n; z = 1.96 gives 95%."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b, c):
    """Exact two-sided McNemar p-value from the discordant counts b (items only the first run got right) and c
    (only the second): 2 P(X <= min(b, c)) for X ~ Binomial(b + c, 1/2), at most 1; 1 when b = c = 0."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n)


def paired_bootstrap(a, b, n_boot=N_BOOT, seed=0):
    """Paired bootstrap over test items of the accuracy difference mean(a) - mean(b).

    a, b: 0/1 arrays [S, n] (or [n]); row s of `a` is paired with row s of `b` (one seed pair) and column i is
    the same test item in every row. A replicate draws n items with replacement, the same for every row, and
    averages the S per-pair differences on them: seeds stay apart, never pooled as if they were more items.
    Returns {"diff", "lo", "hi", "p"}: the observed difference, the 2.5 and 97.5 percentiles of the replicates,
    and the two-sided p-value of that percentile interval, 2 min(#{rep <= 0} + 1, #{rep >= 0} + 1) / (n_boot + 1)
    at most 1 (0 lies outside the 95% interval about when p < 0.05)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.shape != b.shape or a.shape[1] == 0:
        raise ValueError(f"a and b need one shape [S, n] with n > 0, got {a.shape} and {b.shape}")
    d = (a - b).mean(0)  # per item, the mean over seed pairs
    n, rng, reps = len(d), np.random.default_rng(seed), np.empty(n_boot)
    for start in range(0, n_boot, 1000):  # 1000 replicates at a time: [1000, n] indices
        m = min(1000, n_boot - start)
        reps[start:start + m] = d[rng.integers(0, n, (m, n))].mean(1)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    p = 2 * min((reps <= 0).sum() + 1, (reps >= 0).sum() + 1) / (n_boot + 1)
    return {"diff": float(d.mean()), "lo": float(lo), "hi": float(hi), "p": min(1.0, float(p))}


# ---------------------------------------------------------------------------------------------
# The grid: jobs, their commands, the shared teacher stage.


def _flags(argv):
    """{flag: value} of a train.py argument list in which every flag takes a value."""
    if len(argv) % 2 or not all(f.startswith("--") for f in argv[::2]):
        raise ValueError(f"expected flag-value pairs, got {argv}")
    return dict(zip(argv[::2], argv[1::2], strict=True))


def _needs(argv):
    """The teacher-stage files train.py writes into its --out for these arguments."""
    f = _flags(argv)
    needs = ["rationales.jsonl"] if f["--method"] != "vanilla" and f["--rationales"] == "teacher" else []
    if f["--method"] == "molsaki":
        needs += ["keywords.jsonl"] * (f["--data"] == "csqa") + ["teacher_cache.pt"]
    return needs


def grid(spec, out, seeds=None):
    """The jobs of a grid, in the order they run: per setting its two baselines, then its runs seed by seed, each
    seed's in the spec's order (`seeds` replaces every method's), each group's teacher-stage donor first. A job is
    a dict: name (its path under `out`), dir, setting, method, seed (None for a baseline), main (train.py, or
    eval.py for a baseline), cot (eval.py --mode cot, or None), needs (teacher-stage files), donor (the name of the
    run that computes them first, or None)."""
    out = Path(out)
    py, train_py, eval_py = sys.executable, os.path.relpath(ROOT / "train.py"), os.path.relpath(ROOT / "eval.py")
    jobs = []
    for name, setting in spec["settings"].items():
        answer, cot = ",".join(setting["answer_sets"]), ",".join(setting["cot_sets"])
        for base, model in zip(BASELINES, ("--student", "--teacher"), strict=True):
            d = out / name / base
            jobs.append({"name": f"{name}/{base}", "dir": d, "setting": name, "method": base, "seed": None,
                         "main": [py, eval_py, "--checkpoint", _flags(setting["flags"])[model], "--mode", "answer",
                                  "--sets", answer, "--out", str(d)],
                         "cot": None, "needs": [], "donor": None})
        runs, donors = [], {}
        for label, method in spec["methods"].items():
            for seed in seeds if seeds is not None else method["seeds"]:
                d = out / name / f"{label}-s{seed}"
                argv = [*setting["flags"], *method["flags"], "--seed", str(seed), "--eval-sets", answer,
                        "--out", str(d)]
                key = tuple(sorted((k, v) for k, v in _flags(argv).items() if k not in TRAINING_ONLY))
                runs.append({"name": f"{name}/{label}-s{seed}", "dir": d, "setting": name, "method": label,
                             "seed": seed, "main": [py, train_py, *argv], "needs": _needs(argv), "key": key,
                             "cot": [py, eval_py, "--checkpoint", str(d / "checkpoint"), "--mode", "cot", "--sets",
                                     cot, "--out", str(d)] if cot else None})
        for run in sorted(runs, key=lambda r: -len(r["needs"])):  # stable: the first of those that need the most
            if run["needs"]:
                donors.setdefault(run["key"], run)
        for run in runs:
            donor = donors.get(run.pop("key"))
            run["donor"] = donor["name"] if run["needs"] and donor is not run else None
        # seed by seed in the spec's order, so that a grid stopped early holds whole seeds of every method
        order = {label: i for i, label in enumerate(spec["methods"])}
        runs.sort(key=lambda r: (r["seed"], order[r["method"]]))
        jobs += sorted(runs, key=lambda r: not (r["needs"] and r["donor"] is None))
    return jobs


def commands(job):
    """What a job still has to run, in order: its main command unless eval_answer.json is there (train.py gets
    --resume when the run directory holds a checkpoint), then the cot eval unless eval_cot.json is there."""
    d, todo = job["dir"], []
    if not (d / "eval_answer.json").exists():
        resume = any((d / c / "trainer_state.pt").exists() for c in ("checkpoint", "checkpoint.old"))
        todo.append(job["main"] + ["--resume"] * resume)
    if job["cot"] and not (d / "eval_cot.json").exists():
        todo.append(job["cot"])
    return todo


def _check_made_by(jobs):
    """Refuse run directories whose run.json records another train.py command than the grid's."""

    def key(argv):
        f = _flags([a for a in argv if a != "--resume"])
        for name in ("--out", "--save-every"):  # where the run writes and how often it saves do not change it
            f.pop(name, None)
        return f

    wrong = [str(job["dir"]) for job in jobs if job["seed"] is not None and (job["dir"] / "run.json").exists()
             and key(_read_json(job["dir"] / "run.json")["argv"][1:]) != key(job["main"][2:])]
    if wrong:
        raise GridError(f"run directories made by another command (choose another --out): {', '.join(wrong)}")


def _share(job, by_name):
    """Bring the donor's teacher-stage files into the job's run directory, atomically; a file already there stays."""
    if job["donor"] is None:
        return
    job["dir"].mkdir(parents=True, exist_ok=True)
    for name in job["needs"]:
        src, dst, tmp = by_name[job["donor"]]["dir"] / name, job["dir"] / name, job["dir"] / f"{name}.tmp"
        if dst.exists() or not src.exists():
            continue
        tmp.unlink(missing_ok=True)
        if name.endswith(".pt"):
            try:
                os.link(src, tmp)
            except OSError:  # another file system
                shutil.copyfile(src, tmp)
        else:  # JSONL: train.py appends to it, so never a shared inode
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        print(f"[reproduce] {job['name']}: {name} from {job['donor']}")


def _threads(jobs):
    budget = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
    return max(1, budget // jobs)


def _event(out, row):
    with open(Path(out) / "reproduce.log.jsonl", "a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")


def _die_with_parent():
    """The preexec_fn of a command: on Linux, the command gets SIGTERM when this process dies, however it dies
    (prctl's parent-death signal), and never starts when this process died before prctl took effect. None on
    other systems (no prctl)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None).prctl, os.getpid()

    def preexec():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # until exec, this process's handler would swallow it
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGTERM))
        if os.getppid() != parent:  # the parent is gone already: no signal will come
            os._exit(1)

    return preexec


def _start(job, env, out, running):
    """Start the job's next command in its own session, dying with this process, and add the job to `running`."""
    cmd = job["todo"][0]
    job["dir"].mkdir(parents=True, exist_ok=True)
    log = "train.log" if cmd[1].endswith("train.py") else f"eval_{_flags(cmd[2:])['--mode']}.log"
    with open(job["dir"] / log, "a") as f:
        job["proc"] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                       preexec_fn=_die_with_parent())
    running[job["name"]] = job
    job["t0"], job["signalled"] = time.time(), False
    _event(out, {"event": "start", "job": job["name"], "cmd": cmd})
    print(f"[reproduce] {job['name']}: {Path(cmd[1]).name} {'--resume ' * (cmd[-1] == '--resume')}"
          f"(output in {job['dir'] / log})", flush=True)


def _end(running):
    """SIGTERM to each running command not signalled yet, then wait for every one to exit (a Ctrl-C stops the
    wait)."""
    if running:
        print(f"[reproduce] an error stops the grid: {len(running)} running command(s) save and exit", flush=True)
    for job in running.values():
        if not job["signalled"]:
            job["proc"].send_signal(signal.SIGTERM)
    for job in running.values():
        job["proc"].wait()


def run_grid(spec, out, jobs=1, seeds=None):
    """Run every job of the grid that is not finished, `jobs` commands at a time, then write the report. Returns
    0 when all finished, 1 when a command failed (the others still ran), 130 when stopped by SIGINT or SIGTERM.
    An error in its loop ends the running commands (SIGTERM, then a wait for them) before it is raised."""
    plan = grid(spec, out, seeds)
    _check_made_by(plan)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    events = out / "reproduce.log.jsonl"
    if events.exists() and not events.read_text().endswith("\n"):  # a kill mid-row: drop it before appending
        events.write_text("".join(json.dumps(r) + "\n" for r in _read_jsonl(events, appended=True)))
    env = dict(os.environ, OMP_NUM_THREADS=str(_threads(jobs)), PYTHONUNBUFFERED="1")
    by_name = {job["name"]: job for job in plan}
    waiting, running, failed, stop, announced = list(plan), {}, [], [], False
    handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running or (waiting and not stop):
            for job in list(waiting):
                if stop or len(running) >= jobs:
                    break
                donor = job["donor"] and by_name[job["donor"]]
                if donor and not (donor["dir"] / "log.jsonl").exists() and (
                        any(w is donor for w in waiting) or donor["name"] in running):
                    continue  # the donor has not passed its teacher stage yet
                waiting.remove(job)
                job["todo"] = commands(job)
                if job["todo"]:
                    _share(job, by_name)
                    _start(job, env, out, running)
            for job in list(running.values()):
                if stop and not job["signalled"]:
                    if not announced:
                        print(f"[reproduce] stopping: {len(running)} running command(s) save and exit", flush=True)
                        announced = True
                    job["proc"].send_signal(signal.SIGTERM)
                    job["signalled"] = True
                rc = job["proc"].poll()
                if rc is None:
                    continue
                _event(out, {"event": "end", "job": job["name"], "rc": rc, "sec": round(time.time() - job["t0"], 3)})
                job["todo"].pop(0)
                if rc == 0 and job["todo"] and not stop:
                    _start(job, env, out, running)
                    continue
                del running[job["name"]]
                if rc != 0 and not stop:
                    failed.append(job["name"])
                    print(f"[reproduce] {job['name']} failed (exit status {rc}); see its log", flush=True)
            time.sleep(0.2)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        _end(running)  # only after an error in this loop: no command outlives it
    if stop:
        print("[reproduce] stopped; the same command continues where it stopped", flush=True)
        return 130
    try:
        report(out)
    except GridError as e:
        print(f"[reproduce] no report: {e}", flush=True)
    if failed:
        print(f"[reproduce] failed: {', '.join(failed)}")
    return 1 if failed else 0


def dry_run(spec, out, jobs=1, seeds=None):
    """The commands the grid would run now, one job after another, as text (nothing is run or written)."""
    plan = grid(spec, out, seeds)
    _check_made_by(plan)
    n_runs = sum(job["seed"] is not None for job in plan)
    lines = [f"# {n_runs} runs and {len(plan) - n_runs} baselines in {out}; each command with "
             f"OMP_NUM_THREADS={_threads(jobs)}, {jobs} at a time"]
    for job in plan:
        todo = commands(job)
        shared = f" (its {', '.join(job['needs'])} from {job['donor']})" if job["donor"] else ""
        lines.append(f"# {job['name']}" + (shared if todo else ": finished"))
        lines += [shlex.join(cmd) for cmd in todo]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The report.

SET_ORDER = ["svamp", "singleeq", "asdiv", "gsm8k", "csqa"]
METHOD_ORDER = [*BASELINES, "vanilla", "dss", "mmi", "molsaki"]


def _natural(name):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _column_key(col):
    name, mode = col.rsplit("/", 1)
    return mode != "answer", SET_ORDER.index(name) if name in SET_ORDER else len(SET_ORDER), name


def _method_key(method):
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), _natural(method)


def _read_json(path):
    """run.json; not JSON is a GridError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise GridError(f"{path}: not valid JSON ({e}); mend it (a resume needs its record of the run's flags and "
                        "data)") from None


def _read_jsonl(path, appended=False):
    """The rows of a JSONL file; a line that is not JSON is a GridError naming the file and line. In a file
    `appended` line by line, a last line without its newline was cut by a kill: it is dropped."""
    text = Path(path).read_text()
    if appended and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    rows = []
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise GridError(f"{path}, line {n}: not valid JSON ({e.msg}); mend or delete that line") from None
    return rows


def _load(d):
    """A run or baseline directory: {"items": {column: {id: correct}}, "info": run.json, "log": rows}; an empty
    eval file is left out with a warning."""
    items = {}
    for path in sorted(d.glob("eval_*_*.jsonl")):
        name, mode = path.stem[len("eval_"):].rsplit("_", 1)
        rows = _read_jsonl(path)
        if not rows:
            print(f"[reproduce] warning: {path} is empty: {d.name} has no {name} ({mode}) result", file=sys.stderr)
            continue
        items[f"{name}/{mode}"] = {str(r["id"]): bool(r["correct"]) for r in rows}
    info = _read_json(d / "run.json") if (d / "run.json").exists() else {}
    log = _read_jsonl(d / "log.jsonl", appended=True) if (d / "log.jsonl").exists() else []
    return {"items": items, "info": info, "log": log}


def _accuracy(items):
    k, n = sum(items.values()), len(items)
    return {"k": k, "n": n, "acc": k / n, "wilson": list(wilson(k, n))}


def _training(log):
    """Loss terms (each step's; the mean of the first and of the last 10% of steps) and the layer weights of the
    last 10%."""
    if not log:
        return {}
    m = max(1, len(log) // 10)
    out = {"steps": log[-1]["step"], "train_s": round(sum(r["sec"] for r in log), 1),
           "losses": {k: [float(np.mean([r[k] for r in log[:m]])), float(np.mean([r[k] for r in log[-m:]]))]
                      for k in ("pre", "exp", "att", "mmi") if k in log[0]},
           "curves": {k: [r[k] for r in log] for k in ("pre", "exp", "att", "mmi") if k in log[0]}}
    for k in ("p_s", "p_t"):
        if k in log[0]:
            out[k] = np.mean([r[k] for r in log[-m:]], 0).tolist()
    return out


def _paper(setting):
    for preset in PRESETS.values():
        if setting in preset["settings"]:
            return preset["settings"][setting]["paper"]
    return None


def _compare(runs, col, dss):
    """Difference of `runs` ({seed: items}) to the reference runs `dss` (dss's, or for vs_number the number-target
    method's) on column `col`: seed s paired with reference seed s, else the lowest reference seed."""
    pairs = [(s, s if s in dss else min(dss)) for s in sorted(runs)]
    ids = sorted(set.intersection(*[set(runs[s][col]) for s, _ in pairs], *[set(dss[t][col]) for _, t in pairs]))
    a = np.array([[runs[s][col][i] for i in ids] for s, _ in pairs], dtype=float)
    b = np.array([[dss[t][col][i] for i in ids] for _, t in pairs], dtype=float)
    boot = paired_bootstrap(a, b, N_BOOT, seed=0)
    mcnemar = []
    for (s, t), x, y in zip(pairs, a, b, strict=True):
        only_m, only_dss = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        mcnemar.append({"seed": s, "dss_seed": t, "b": only_m, "c": only_dss, "p": mcnemar_exact(only_m, only_dss)})
    return {"pairs": [list(p) for p in pairs], "n_items": len(ids), "diff": boot["diff"], "lo": boot["lo"],
            "hi": boot["hi"], "p_bootstrap": boot["p"], "mcnemar": mcnemar}


def svamp_overlap(data_dir=None):
    """The ids of SVAMP's test items (DSS's split) whose gold equation, DSS's label, is verbatim the label of a
    training item; None when the data cannot be read here."""
    import data  # with torch: only when a report has SVAMP to split

    try:
        train, test = (data.load_dataset("svamp", split, data_dir, equations=True) for split in ("train", "test"))
    except (OSError, ValueError) as e:  # no data directory, nothing fetchable (DataUnavailable), a damaged file
        print(f"[reproduce] no SVAMP overlap: {e}", file=sys.stderr)
        return None
    labels = {r["equation"] for r in train}
    return {r["id"] for r in test if r["equation"] in labels}


def _overlap(items, ids):
    """Accuracy of one run's SVAMP answer items on the overlap `ids` and on the rest."""
    parts = {"overlap": {i: c for i, c in items.items() if i in ids},
             "rest": {i: c for i, c in items.items() if i not in ids}}
    return {k: _accuracy(v) for k, v in parts.items() if v}


def _setting_results(out, d, overlap=None):
    wall = {}
    if (out / "reproduce.log.jsonl").exists():
        for row in _read_jsonl(out / "reproduce.log.jsonl", appended=True):
            if row["event"] == "end":
                wall[row["job"]] = wall.get(row["job"], 0.0) + row["sec"]
    runs, items = {}, {}  # items: method -> seed -> column -> {id: correct}
    for sub in sorted(p for p in d.iterdir() if p.is_dir()):
        found = re.fullmatch(r"(.+)-s(\d+)", sub.name)
        if sub.name not in BASELINES and not found:
            continue
        run = _load(sub)
        if not run["items"]:
            continue
        method, seed = (sub.name, None) if sub.name in BASELINES else (found.group(1), int(found.group(2)))
        items.setdefault(method, {})[seed] = run["items"]
        info = run["info"]
        runs[sub.name] = {"method": method, "seed": seed,
                          "accuracy": {c: _accuracy(v) for c, v in sorted(run["items"].items())},
                          "commit": info.get("commit"), "dirty": info.get("dirty"),
                          "versions": info.get("versions"), "device": info.get("device"),
                          "wall_s": round(wall[f"{d.name}/{sub.name}"], 1) if f"{d.name}/{sub.name}" in wall else None,
                          **_training(run["log"])}
        if overlap is not None and "svamp/answer" in run["items"]:
            runs[sub.name]["svamp_overlap"] = _overlap(run["items"]["svamp/answer"], overlap)
    columns = sorted({c for r in runs.values() for c in r["accuracy"]}, key=_column_key)
    paper = _paper(d.name)
    rows = PAPER[paper]["rows"] if paper else {}
    methods = {}
    for method in sorted(items, key=_method_key):
        methods[method] = {}
        for col in columns:
            seeds = sorted(s for s in items[method] if col in items[method][s]) if method not in BASELINES else [None]
            accs = [_accuracy(items[method][s][col])["acc"] for s in seeds if col in items[method][s]]
            if not accs:
                continue
            set_name, mode = col.rsplit("/", 1)
            entry = {"seeds": seeds, "mean": float(np.mean(accs)),
                     "sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
                     "paper": rows.get(method, {}).get(set_name) if mode == "answer" else None}
            mine = {s: items[method][s] for s in seeds}
            ref = "dss" + EQ if method.endswith(EQ) and "dss" + EQ in items else "dss"  # dss of the same target
            dss = {s: v for s, v in items.get(ref, {}).items() if col in v}
            if method not in (*BASELINES, ref) and dss:
                entry["vs_dss"] = {"dss": ref, **_compare(mine, col, dss)}
            number = {s: v for s, v in items.get(method.removesuffix(EQ), {}).items() if col in v}
            if method.endswith(EQ) and number:  # the same method trained on numbers: the label's effect
                entry["vs_number"] = {"method": method.removesuffix(EQ), **_compare(mine, col, number)}
            methods[method][col] = entry
    return {"paper_table": paper, "columns": columns, "runs": runs, "methods": methods}


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def _header(col):
    name, mode = col.rsplit("/", 1)
    return name if mode == "answer" else f"{name} ({mode})"


def _calculator(method, col):
    """† on a `-eq` method's answer-mode number outside SVAMP: an equation computed by the evaluator."""
    return "†" if method.endswith(EQ) and col.endswith("/answer") and not col.startswith("svamp/") else ""


def _diff_row(name, col, v):
    pairs = ", ".join(f"{a}:{b}" for a, b in v["pairs"])
    mc = ", ".join(f"{x['p']:.3g} ({x['b']}/{x['c']})" for x in v["mcnemar"])
    return (f"| {name} | {_header(col)} | {pairs} | {100 * v['diff']:+.1f} | [{100 * v['lo']:+.1f}, "
            f"{100 * v['hi']:+.1f}] | {v['p_bootstrap']:.3g} | {mc} |")


def _markdown(results):
    lines = [f"# Results: `{results['dir']}`", "",
             "Accuracy in % of the test items. `answer`: the answer task, greedy, 16 tokens, its first number "
             "(Distilling Step-by-Step's protocol; the paper does not say how it reads answers); `(cot)`: the "
             "rationale task, its answer read after the last \"answer is\", else its last number. A `-eq` run "
             "(`--answer-target equation`, DSS's SVAMP label) measures equation-writing accuracy: it writes an "
             "expression (64 tokens) and the evaluator computes its value. Outside SVAMP, where the label is not "
             "the data set's own, that is calculator-assisted (marked †): not comparable with the number-target runs "
             "or the paper's rows. Paper numbers: mean of three seeds; its SingleEq and ASDiv are 108- and 406-item "
             "subsets (here: the full sets). A run still in progress shows the sets it has finished.", ""]
    for name, s in results["settings"].items():
        cols, runs = s["columns"], s["runs"]
        lines += [f"## {name}", ""]
        if s["paper_table"]:
            lines += [f"Compared with the paper's {PAPER[s['paper_table']]['title']}.", ""]
        lines += ["### Accuracy: mean ± sd over seeds (paper)", "",
                  "| method | seeds | " + " | ".join(map(_header, cols)) + " |", "|---|---|" + "---|" * len(cols)]
        for method, entries in s["methods"].items():
            cells = []
            for col in cols:
                e = entries.get(col)
                cell = "–" if e is None else _pct(e["mean"]) + (f" ± {_pct(e['sd'])}" if e["sd"] is not None else "")
                cell += _calculator(method, col) if e else ""
                cells.append(cell + (f" ({e['paper']:.1f})" if e and e["paper"] is not None else ""))
            seeds = next((e["seeds"] for e in entries.values()), [])
            lines.append(f"| {method} | {','.join(map(str, seeds)) if method not in BASELINES else '–'} | "
                         + " | ".join(cells) + " |")
        diffs = [(m if e["vs_dss"]["dss"] == "dss" else f"{m} (vs {e['vs_dss']['dss']})", c, e["vs_dss"])
                 for m, entries in s["methods"].items() for c, e in entries.items() if "vs_dss" in e]
        if diffs:
            lines += ["", "### Difference to dss on the same items (percentage points)", "",
                      "Seed s is paired with dss seed s, else with the lowest dss seed; a method trained with "
                      f"`--answer-target equation` (named `-eq`) with dss{EQ} when there is one. 95% interval and p: "
                      f"paired bootstrap over the test items ({N_BOOT} resamples, the same items for every seed pair, "
                      "the pairs' differences averaged). McNemar: exact two-sided p of each seed pair, b = items only "
                      "the method got right, c = items only dss got right.", "",
                      "| method | set | pairs (seed:dss seed) | Δ | 95% interval | p (bootstrap) | McNemar p (b/c) |",
                      "|---|---|---|---|---|---|---|"]
            lines += [_diff_row(*d) for d in diffs]
        eq = [(m, c, e["vs_number"]) for m, entries in s["methods"].items() for c, e in entries.items()
              if "vs_number" in e]
        if eq:
            lines += ["", "### Equation target against number target: the same method on the same items "
                      "(percentage points)", "",
                      "A `-eq` run (`--answer-target equation`: DSS's SVAMP label, the equation) against the run of "
                      "the same method trained on the number (seed s with seed s, else the lowest seed); interval, p "
                      "and McNemar as above, b = items only the `-eq` run got right.", "",
                      "| method | set | pairs (seed:seed) | Δ | 95% interval | p (bootstrap) | McNemar p (b/c) |",
                      "|---|---|---|---|---|---|---|"]
            lines += [_diff_row(f"{m} (vs {v['method']})", c, v) for m, c, v in eq]
        order = sorted(runs, key=lambda r: (_method_key(runs[r]["method"]), runs[r]["seed"] or 0))
        lines += ["", "### Each run: accuracy [95% Wilson interval]", "",
                  "| run | " + " | ".join(map(_header, cols)) + " |", "|---|" + "---|" * len(cols)]
        for r in order:
            acc, method = runs[r]["accuracy"], runs[r]["method"]
            lines.append(f"| {r} | " + " | ".join(
                f"{_pct(acc[c]['acc'])}{_calculator(method, c)} [{_pct(acc[c]['wilson'][0])}, "
                f"{_pct(acc[c]['wilson'][1])}]" if c in acc else "–" for c in cols) + " |")
        split = [r for r in order if "svamp_overlap" in runs[r]]
        if split and results["svamp_overlap"] is not None:
            n = len(results["svamp_overlap"])
            lines += ["", "### SVAMP answer mode: test items whose gold equation is a training label", "",
                      f"{n} of SVAMP's test items (Distilling Step-by-Step's split) have a gold equation that is, "
                      "verbatim, the label of a training item; every SVAMP number in answer mode above mixes them "
                      "with the rest. Accuracy [95% Wilson interval] on each part:", "",
                      "| run | all | overlap | rest |", "|---|---|---|---|"]
            for r in split:
                o, a = runs[r]["svamp_overlap"], runs[r]["accuracy"]["svamp/answer"]
                cells = [f"{_pct(x['acc'])} [{_pct(x['wilson'][0])}, {_pct(x['wilson'][1])}] (n={x['n']})" if x else "–"
                         for x in (a, o.get("overlap"), o.get("rest"))]
                lines.append(f"| {r} | " + " | ".join(cells) + " |")
        trained = [r for r in order if runs[r]["seed"] is not None]
        lines += ["", "### Provenance and time", "",
                  "`train s`: the sum of the step times in log.jsonl; `wall s`: every command of the run "
                  "(teacher stage, loading, evaluation too), from reproduce.log.jsonl.", "",
                  "| run | commit | python / torch / transformers | device | steps | train s | wall s |",
                  "|---|---|---|---|---|---|---|"]
        for r in order:
            x = runs[r]
            commit = (x["commit"] or "")[:10] + (" (changed)" if x["dirty"] else "") if x["commit"] else "–"
            versions = " / ".join(x["versions"].values()) if x["versions"] else "–"
            lines.append(f"| {r} | {commit} | {versions} | {x['device'] or '–'} | {x.get('steps', '–')} | "
                         f"{x.get('train_s', '–')} | {x['wall_s'] if x['wall_s'] is not None else '–'} |")
        lines += ["", "### Loss terms: mean of the first → of the last 10% of steps", "",
                  "| run | pre | exp | att | mmi |", "|---|---|---|---|---|"]
        for r in trained:
            losses = runs[r].get("losses", {})
            lines.append(f"| {r} | " + " | ".join(
                f"{losses[k][0]:.3g} → {losses[k][1]:.3g}" if k in losses else "–"
                for k in ("pre", "exp", "att", "mmi")) + " |")
        weighted = [r for r in trained if "p_s" in runs[r]]
        if weighted:
            lines += ["", "### Layer weights, mean of the last 10% of steps: the three largest (1-based layer: "
                      "weight)", "", "| run | student p_s | teacher p_t |", "|---|---|---|"]
            for r in weighted:
                top = [", ".join(f"{i + 1}: {w[i]:.3f}" for i in np.argsort(w)[::-1][:3])
                       for w in (runs[r]["p_s"], runs[r]["p_t"])]
                lines.append(f"| {r} | {top[0]} | {top[1]} |")
        lines.append("")
    return "\n".join(lines)


def _figure(results, path):
    """results.png: per setting, the mean accuracy of each method and set as a bar, each run as a dot with its
    Wilson interval, the paper's number as a red dash. False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[reproduce] matplotlib is not installed: no results.png (pip install matplotlib)")
        return False
    settings = results["settings"]
    fig, axes = plt.subplots(len(settings), 1, figsize=(11, 4 * len(settings)), squeeze=False)
    for ax, (name, s) in zip(axes[:, 0], settings.items(), strict=True):
        cols, methods = s["columns"], list(s["methods"])
        width, labelled = 0.8 / max(1, len(methods)), False
        for i, method in enumerate(methods):
            x = np.arange(len(cols)) + (i - (len(methods) - 1) / 2) * width
            means = [100 * s["methods"][method][c]["mean"] if c in s["methods"][method] else np.nan for c in cols]
            ax.bar(x, means, width, label=method, alpha=0.6)
            paper = [s["methods"][method].get(c, {}).get("paper") for c in cols]
            if any(v is not None for v in paper):
                ax.scatter(x, [np.nan if v is None else v for v in paper], marker="_", s=300, color="red",
                           label=None if labelled else "paper")
                labelled = True
            seeds = [r for r in s["runs"].values() if r["method"] == method]
            for j, run in enumerate(seeds):
                xs = x + (j - (len(seeds) - 1) / 2) * width / (len(seeds) + 1)
                acc = [run["accuracy"].get(c) for c in cols]
                ok = [k for k, a in enumerate(acc) if a]
                y = np.array([100 * acc[k]["acc"] for k in ok])
                lo, hi = (np.array([100 * acc[k]["wilson"][e] for k in ok]) for e in (0, 1))
                ax.errorbar(xs[ok], y, yerr=[y - lo, hi - y], fmt="o", ms=2.5, color="black", lw=0.8)
        ax.set_xticks(range(len(cols)), [_header(c) for c in cols])
        ax.set_ylabel("accuracy %")
        ax.set_title(f"{name}: mean over seeds (bars), each run with its 95% Wilson interval")
        ax.legend(fontsize=7, ncol=min(len(methods), 7))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _loss_figure(results, path):
    """losses.png: per setting, each loss term of every trained run over its steps (moving mean of 10 steps); the
    colour is the method, the line style the seed."""
    import matplotlib.pyplot as plt  # _figure has checked that it is there

    settings = results["settings"]
    terms = ("pre", "exp", "att", "mmi")
    fig, axes = plt.subplots(len(settings), len(terms), figsize=(14, 3.2 * len(settings)), squeeze=False)
    for row, (name, s) in zip(axes, settings.items(), strict=True):
        methods = sorted({r["method"] for r in s["runs"].values() if r["seed"] is not None}, key=_method_key)
        colour = {m: f"C{i}" for i, m in enumerate(methods)}
        for ax, term in zip(row, terms, strict=True):
            ax.set_visible(False)  # until a run has the term (mmi: only MMI runs)
            for r in s["runs"].values():
                y = r.get("curves", {}).get(term)
                if not y or not any(y):
                    continue
                ax.set_visible(True)
                k = min(10, len(y))
                ax.plot(np.arange(k, len(y) + 1), np.convolve(y, np.ones(k) / k, "valid"), lw=0.9,
                        color=colour[r["method"]], ls=("-", "--", ":", "-.")[r["seed"] % 4],
                        label=f"{r['method']} s{r['seed']}")
            ax.set_title(f"{name}: {term}" if term == "pre" else term, fontsize=9)
            ax.set_xlabel("step")
        if row[0].get_legend_handles_labels()[0]:  # a setting whose runs logged no loss has no curve to name
            row[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out):
    """Write results.json, results.md (also printed), results.png and losses.png into `out` from its run
    directories. A GridError, and nothing written, when `out` is missing, holds no evaluated run, or holds a
    damaged file (the module's docstring says which)."""
    out = Path(out)
    if not out.is_dir():
        raise GridError(f"{out}: {'not a directory' if out.exists() else 'no such directory'} (the grid's --out)")
    dirs = sorted(p for p in out.iterdir() if p.is_dir())
    has_svamp = any(d.glob("*/eval_svamp_answer.jsonl") for d in dirs)
    overlap = svamp_overlap() if has_svamp else None
    settings = {d.name: _setting_results(out, d, overlap) for d in dirs}
    results = {"dir": str(out), "n_boot": N_BOOT, "settings": {k: v for k, v in settings.items() if v["runs"]},
               "svamp_overlap": sorted(overlap) if overlap is not None else None}
    if not results["settings"]:
        raise GridError(f"{out} holds no evaluated run (no <setting>/<run>/eval_<set>_<mode>.jsonl with items): "
                        "not a grid's --out, or a grid that has evaluated nothing yet")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = _markdown(results)
    (out / "results.md").write_text(md)
    if results["settings"] and _figure(results, out / "results.png"):
        _loss_figure(results, out / "losses.png")
    print(md)
    return results


def parse_args(argv=None):
    """The grid's flags, or `report DIR` (then `report` is the directory, else None)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        p = cli.Parser(prog="python -m experiments.reproduce report", description="Rebuild the report of a grid.")
        p.add_argument("report", metavar="DIR", help="the grid's directory (its --out)")
        return p.parse_args(argv[1:])
    p = cli.Parser(description=__doc__.split("\n")[0],
                   epilog="python -m experiments.reproduce report DIR: rebuild the report from the run directories")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--seeds", default=None, help="comma-separated seeds for every method (default: the preset's)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    p.add_argument("--out", default=None, help="the grid's directory (default runs/reproduce-<preset>; equation: "
                                               "the small grid's, runs/reproduce-small)")
    p.add_argument("--jobs", type=int, default=1, help="commands at once")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    args.report = None
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    args.out = args.out or PRESETS[args.preset].get("out", f"runs/reproduce-{args.preset}")
    return args


def main(argv=None):
    """The command line; a GridError is one `error:` line and exit status 2."""
    args = parse_args(argv)
    try:
        if args.report:
            report(args.report)
            return 0
        if args.dry_run:
            print(dry_run(PRESETS[args.preset], args.out, args.jobs, args.seeds))
            return 0
        return run_grid(PRESETS[args.preset], args.out, args.jobs, args.seeds)
    except GridError as e:
        cli.fail(e)


if __name__ == "__main__":
    sys.exit(main())
